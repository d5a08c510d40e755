//! Sweep expansion: a stage's `matrix:` becomes one stage per combination, with readable ids
//! (`db[learning_rate=2e-6,steps=400]`). Downstream stages fan out over their upstreams'
//! variants (matching shared axes), upstream stages without a matrix run once. A field marked
//! [`ParamSpec::gathers`](crate::stages::ParamSpec::gathers) does not fan out: it reads every
//! variant (compatible with the stage's own axes), each named by its variant id.
use super::StageDraft;
use super::{Coord, StageInstance, display_value};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

/// Most variants one stage may expand to (its own matrix times its upstreams' fan-out); a
/// guard against typos such as a 10,000-value list, generous enough for a 1,000-run sweep.
pub const MAX_VARIANTS_PER_STAGE: usize = 4096;
/// Most stages a whole pipeline may expand to.
pub const MAX_TOTAL_STAGES: usize = 20_000;

/// A sweep that is too large.
#[derive(Debug)]
pub struct SweepError {
    pub stage: String,
    pub message: String,
}

/// Expands `drafts` visited in `order` (upstreams first) into concrete stages.
pub fn expand(drafts: Vec<StageDraft>, order: &[usize]) -> Result<Vec<StageInstance>, SweepError> {
    let mut stages: Vec<StageInstance> = Vec::new();
    let mut variants_of: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut by_coords: BTreeMap<String, VariantIndex> = BTreeMap::new();
    for &index in order {
        let draft = &drafts[index];
        let upstream_combos = upstream_combinations(draft, &variants_of, &stages);
        let own = own_combinations(draft)?;
        let count = upstream_combos.len().saturating_mul(own.len());
        if count > MAX_VARIANTS_PER_STAGE {
            return Err(SweepError {
                stage: draft.name.clone(),
                message: format!(
                    "the sweep expands to {count} stages, more than the limit of {MAX_VARIANTS_PER_STAGE}; sweep fewer values"
                ),
            });
        }
        if stages.len() + count > MAX_TOTAL_STAGES {
            return Err(SweepError {
                stage: draft.name.clone(),
                message: format!(
                    "the pipeline expands to more than {MAX_TOTAL_STAGES} stages; sweep fewer values"
                ),
            });
        }
        let mut ids = Vec::new();
        for base in &upstream_combos {
            for (own_coords, own_values) in &own {
                let known = (&variants_of, &by_coords);
                let instance = instantiate(draft, base, own_coords, own_values, known, &stages);
                ids.push(stages.len());
                stages.push(instance);
            }
        }
        by_coords.insert(draft.name.clone(), index_variants(&ids, &stages));
        variants_of.insert(draft.name.clone(), ids);
    }
    Ok(stages)
}

/// A stage's variants by their sorted coordinates, so fanning out finds each one in O(1).
type VariantIndex = HashMap<Vec<Coord>, usize>;

fn index_variants(ids: &[usize], stages: &[StageInstance]) -> VariantIndex {
    ids.iter()
        .map(|&id| (sorted(stages[id].coords.clone()), id))
        .collect()
}

fn sorted(mut coords: Vec<Coord>) -> Vec<Coord> {
    coords.sort();
    coords
}

fn compatible(a: &[Coord], b: &[Coord]) -> bool {
    a.iter().all(|x| {
        b.iter()
            .all(|y| x.origin != y.origin || x.field != y.field || x.value == y.value)
    })
}

fn merge(a: &[Coord], b: &[Coord]) -> Vec<Coord> {
    let mut merged = a.to_vec();
    for coord in b {
        if !merged
            .iter()
            .any(|m| m.origin == coord.origin && m.field == coord.field)
        {
            merged.push(coord.clone());
        }
    }
    merged
}

/// The coordinate sets this stage fans out over: one per compatible choice of upstream variants.
fn upstream_combinations(
    draft: &StageDraft,
    variants_of: &BTreeMap<String, Vec<usize>>,
    stages: &[StageInstance],
) -> Vec<Vec<Coord>> {
    let mut combos: Vec<Vec<Coord>> = vec![Vec::new()];
    let gathered = gathered_fields(draft);
    let mut upstream_names: Vec<&String> = draft
        .refs
        .iter()
        .filter(|(field, _)| !gathered.contains(&field.as_str()))
        .flat_map(|(_, names)| names)
        .collect();
    upstream_names.sort();
    upstream_names.dedup();
    for name in upstream_names {
        let variants = variants_of.get(name).map(Vec::as_slice).unwrap_or_default();
        let mut next = Vec::new();
        let mut seen = std::collections::HashSet::new(); // linear dedup for big sweeps
        for combo in &combos {
            for &variant in variants {
                let coords = &stages[variant].coords;
                let merged = merge(combo, coords);
                if compatible(combo, coords) && seen.insert(merged.clone()) {
                    next.push(merged);
                }
            }
        }
        combos = next;
    }
    combos
}

/// The draft's fields that gather all variants of their upstreams.
fn gathered_fields(draft: &StageDraft) -> Vec<&'static str> {
    draft
        .kind
        .schema()
        .into_iter()
        .filter(|spec| spec.gather)
        .map(|spec| spec.name)
        .collect()
}

type OwnCombination = (Vec<Coord>, Vec<(String, Value)>);

fn own_combinations(draft: &StageDraft) -> Result<Vec<OwnCombination>, SweepError> {
    let mut count: usize = 1;
    for (_, values) in &draft.matrix {
        count = count.saturating_mul(values.len());
    }
    if count > MAX_VARIANTS_PER_STAGE {
        return Err(SweepError {
            stage: draft.name.clone(),
            message: format!(
                "the sweep expands to {count} stages, more than the limit of {MAX_VARIANTS_PER_STAGE}; sweep fewer values"
            ),
        });
    }
    let mut combos: Vec<OwnCombination> = vec![(Vec::new(), Vec::new())];
    for (field, values) in &draft.matrix {
        let mut next = Vec::with_capacity(combos.len() * values.len());
        for (coords, assigned) in &combos {
            for value in values {
                let mut coords = coords.clone();
                coords.push(Coord {
                    origin: draft.name.clone(),
                    field: field.clone(),
                    value: display_value(value),
                });
                let mut assigned = assigned.clone();
                assigned.push((field.clone(), value.clone()));
                next.push((coords, assigned));
            }
        }
        combos = next;
    }
    Ok(combos)
}

fn instantiate(
    draft: &StageDraft,
    base: &[Coord],
    own_coords: &[Coord],
    own_values: &[(String, Value)],
    known: (
        &BTreeMap<String, Vec<usize>>,
        &BTreeMap<String, VariantIndex>,
    ),
    stages: &[StageInstance],
) -> StageInstance {
    let (variants_of, by_coords) = known;
    let coords = merge(base, own_coords);
    let mut params = draft.params.clone();
    for (field, value) in own_values {
        params.insert(field.clone(), value.clone());
    }
    let gathered = gathered_fields(draft);
    let refs = draft
        .refs
        .iter()
        .map(|(field, names)| {
            let resolved = if gathered.contains(&field.as_str()) {
                gather(names, &coords, variants_of, stages)
            } else {
                fan_in_one(names, &coords, (variants_of, by_coords), stages)
            };
            (field.clone(), resolved)
        })
        .collect();
    StageInstance {
        id: stage_id(&draft.name, &coords),
        name: draft.name.clone(),
        kind: draft.kind.clone(),
        params,
        refs,
        paths: draft.paths.clone(),
        coords,
        resources: draft.resources.clone(),
    }
}

/// For each name, the variant matching `coords` (the fan-out case): (name, index).
fn fan_in_one(
    names: &[String],
    coords: &[Coord],
    known: (
        &BTreeMap<String, Vec<usize>>,
        &BTreeMap<String, VariantIndex>,
    ),
    stages: &[StageInstance],
) -> Vec<(String, usize)> {
    let (variants_of, by_coords) = known;
    names
        .iter()
        .filter_map(|name| {
            let variants = variants_of.get(name)?;
            // The upstream's axes are those of any of its variants; the matching variant's
            // coordinates are this stage's on those axes.
            let axes = &stages[*variants.first()?].coords;
            let key: Vec<Coord> = coords
                .iter()
                .filter(|c| {
                    axes.iter()
                        .any(|a| a.origin == c.origin && a.field == c.field)
                })
                .cloned()
                .collect();
            let indexed = by_coords
                .get(name)
                .and_then(|index| index.get(&sorted(key)));
            let chosen = indexed.copied().or_else(|| {
                variants
                    .iter()
                    .copied()
                    .find(|&v| stages[v].coords.iter().all(|c| coords.contains(c)))
            })?;
            Some((name.clone(), chosen))
        })
        .collect()
}

/// For each name, every variant compatible with `coords`: (variant id, index).
fn gather(
    names: &[String],
    coords: &[Coord],
    variants_of: &BTreeMap<String, Vec<usize>>,
    stages: &[StageInstance],
) -> Vec<(String, usize)> {
    names
        .iter()
        .filter_map(|name| variants_of.get(name))
        .flatten()
        .filter(|&&v| compatible(coords, &stages[v].coords))
        .map(|&v| (stages[v].id.clone(), v))
        .collect()
}

/// `name` or `name[field=value,…]`.
pub fn stage_id(name: &str, coords: &[Coord]) -> String {
    if coords.is_empty() {
        return name.to_string();
    }
    let parts: Vec<String> = coords
        .iter()
        .map(|c| format!("{}={}", c.field, c.value))
        .collect();
    format!("{name}[{}]", parts.join(","))
}
