//! Steps sweeps trained once. Training stages whose fields, inputs and kind are equal except
//! for their steps field (`max_train_steps`) form a group: when the kind says a run of N steps
//! is the first N steps of a longer one (a schedule that does not depend on the total; every
//! random draw derived from seed and step), the longest variant runs once and leaves a
//! snapshot at each shorter variant's step, committed under that variant's own key. Groups
//! that cannot share say why (`explain`). The other direction too: a run whose key differs
//! from a cached result only in more steps continues from that result's kept training state
//! ([`longest_cached_prefix`]).
use crate::cache::store::Store;
use crate::pipeline::{Pipeline, display_value};
use crate::plan::fingerprint::KeyMaterial;
use crate::stages::ExtendFrom;
use std::collections::BTreeMap;

/// Which stage serves which, for one pipeline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sharing {
    /// Per stage: the stage whose run serves it, and at which step.
    pub served_by: Vec<Option<(usize, u64)>>,
    /// Per stage: the stages its run serves (index, step), fewest steps first.
    pub serves: Vec<Vec<(usize, u64)>>,
    /// Per stage in a steps sweep that cannot share: why.
    pub unshared: Vec<Option<String>>,
}

impl Sharing {
    /// The plan's line for a served stage: `from the 12-step run `db[…]` at step 6`.
    pub fn served_note(&self, pipeline: &Pipeline, index: usize) -> Option<String> {
        let (runner, step) = self.served_by.get(index).copied().flatten()?;
        let runner_stage = &pipeline.stages[runner];
        let field = runner_stage.kind.steps_field()?;
        let total = runner_stage.params.get(field).map(display_value)?;
        Some(format!(
            "from the {total}-step run `{}` at step {step}",
            runner_stage.id
        ))
    }
}

/// Groups the stages of `pipeline` whose only difference is their steps field, among those
/// `selected`.
pub fn sharing(pipeline: &Pipeline, selected: &[bool]) -> Sharing {
    let count = pipeline.stages.len();
    let mut result = Sharing {
        served_by: vec![None; count],
        serves: vec![Vec::new(); count],
        unshared: vec![None; count],
    };
    for members in groups(pipeline, selected).into_values() {
        share_group(pipeline, &members, &mut result);
    }
    result
}

/// (stage index, steps) by everything but the steps field.
fn groups(pipeline: &Pipeline, selected: &[bool]) -> BTreeMap<String, Vec<(usize, u64)>> {
    let mut groups: BTreeMap<String, Vec<(usize, u64)>> = BTreeMap::new();
    for (index, stage) in pipeline.stages.iter().enumerate() {
        let Some(field) = stage.kind.steps_field() else {
            continue;
        };
        let Some(steps) = stage.params.get(field).and_then(|v| v.as_u64()) else {
            continue;
        };
        if !selected.get(index).copied().unwrap_or(false) {
            continue;
        }
        let mut rest = stage.params.clone();
        rest.remove(field);
        let identity = format!(
            "{}\u{0}{}\u{0}{:?}\u{0}{:?}",
            stage.kind.kind(),
            serde_json::Value::Object(rest),
            stage.refs,
            stage.paths
        );
        groups.entry(identity).or_default().push((index, steps));
    }
    groups
}

fn share_group(pipeline: &Pipeline, members: &[(usize, u64)], result: &mut Sharing) {
    let longest = members.iter().map(|(_, s)| *s).max().unwrap_or(0);
    if members.iter().all(|(_, s)| *s == longest) {
        return; // nothing shorter to serve (equal keys are computed once by the key lock)
    }
    let runner_index = members
        .iter()
        .find(|(_, s)| *s == longest)
        .map(|(i, _)| *i)
        .unwrap_or_default();
    let runner = &pipeline.stages[runner_index];
    if let Some(problem) = runner.kind.prefix_problem(&runner.params) {
        for (index, _) in members {
            result.unshared[*index] = Some(format!(
                "not served by a longer run of the same stage: {problem}"
            ));
        }
        return;
    }
    let mut served: Vec<(usize, u64)> = (members.iter())
        .filter(|(_, steps)| *steps < longest)
        .copied()
        .collect();
    served.sort_by_key(|(index, steps)| (*steps, *index));
    for (index, steps) in &served {
        result.served_by[*index] = Some((runner_index, *steps));
    }
    result.serves[runner_index] = served;
}

/// The cached result with the most steps below `material`'s whose key material is otherwise
/// equal and whose training state was kept (`states/<key>`): the run can continue from it.
pub fn longest_cached_prefix(
    store: &Store,
    material: &KeyMaterial,
    field: &str,
) -> Option<ExtendFrom> {
    let steps = material.params.get(field)?.as_u64()?;
    let mut best: Option<(u64, ExtendFrom)> = None;
    for record in store.results() {
        let state_dir = store.state_dir(&record.key);
        if record.kind != material.kind || !state_dir.is_dir() {
            continue;
        }
        let Some(other) = store.load_key_material::<KeyMaterial>(&record.key) else {
            continue;
        };
        let Some(other_steps) = other.params.get(field).and_then(|v| v.as_u64()) else {
            continue;
        };
        if other_steps >= steps || !same_but(&other, material, field) {
            continue;
        }
        if best.as_ref().is_none_or(|(s, _)| other_steps > *s) {
            let base = ExtendFrom {
                step: other_steps,
                stage_id: record.stage_id.clone(),
                key: record.key.clone(),
                state_dir,
                output_dir: store.output_dir(&record.key),
            };
            best = Some((other_steps, base));
        }
    }
    best.map(|(_, base)| base)
}

/// Whether two key materials are equal except for `field` of their params.
fn same_but(a: &KeyMaterial, b: &KeyMaterial, field: &str) -> bool {
    let without = |m: &KeyMaterial| {
        let mut params = m.params.clone();
        params.remove(field);
        params
    };
    a.kind == b.kind
        && a.version == b.version
        && a.device_class == b.device_class
        && a.upstream == b.upstream
        && a.inputs == b.inputs
        && without(a) == without(b)
}
