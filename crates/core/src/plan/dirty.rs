//! Fresh or dirty, and why (cargo-style dirty reasons): the new key material is compared field
//! by field with the material stored beside the stage's last result.
use super::fingerprint::{KeyMaterial, material};
use super::graph::Plan;
use crate::cache::CacheError;
use crate::cache::hash::{HashMemo, TreeDigest};
use crate::cache::store::Store;
use crate::pipeline::display_value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What a run would do with one stage.
#[derive(Debug, Clone)]
pub enum Status {
    /// In the cache under this key.
    Fresh { key: String, output: PathBuf },
    /// Will run; the reasons say why.
    Dirty { key: String, reasons: Vec<String> },
    /// Will run after its upstream; its key is known only then.
    Pending { reasons: Vec<String> },
    /// Not part of this run (`--until` / `--only`).
    NotSelected,
}

/// The status of every stage, in pipeline order.
pub fn assess(
    plan: &Plan,
    store: &Store,
    memo: &HashMemo,
    device: crate::device::Device,
    selected: &[bool],
    forced: &[bool],
) -> Result<Vec<Status>, CacheError> {
    let mut digests: BTreeMap<usize, String> = BTreeMap::new();
    let mut statuses = Vec::with_capacity(plan.len());
    for (index, stage) in plan.pipeline.stages.iter().enumerate() {
        let lookup = |i: usize| digests.get(&i).cloned();
        let built = material(stage, &lookup, memo, device)?;
        let status = match built {
            Err(upstream) => Status::Pending {
                reasons: pending_reasons(plan, store, memo, device, index, &upstream, &digests)?,
            },
            Ok(new) => {
                let key = new.key();
                let found = store.lookup(&key);
                let damage = found
                    .as_ref()
                    .and_then(|record| crate::cache::verify::damage(store, Some(memo), record));
                match found {
                    Some(_) if let Some(damage) = damage => Status::Dirty {
                        key,
                        reasons: vec![format!("{}; it will be recomputed", damage.problem)],
                    },
                    Some(record) if !forced[index] => {
                        digests.insert(index, record.output_digest);
                        Status::Fresh {
                            output: store.output_dir(&key),
                            key,
                        }
                    }
                    Some(_) => Status::Dirty {
                        key,
                        reasons: vec!["forced with --force".to_string()],
                    },
                    None => {
                        let reasons = explain_miss(store, &plan.pipeline.name, &stage.id, &new);
                        Status::Dirty { key, reasons }
                    }
                }
            }
        };
        statuses.push(if selected[index] {
            status
        } else {
            Status::NotSelected
        });
    }
    Ok(statuses)
}

/// For a stage whose upstream will run first: that, plus its own changed fields and files
/// (compared with its last result while ignoring upstream digests, unknown until then).
fn pending_reasons(
    plan: &Plan,
    store: &Store,
    memo: &HashMemo,
    device: crate::device::Device,
    index: usize,
    upstream: &str,
    digests: &BTreeMap<usize, String>,
) -> Result<Vec<String>, CacheError> {
    let mut reasons = vec![format!("upstream `{upstream}` will run first")];
    let stage = &plan.pipeline.stages[index];
    let placeholder = |i: usize| Some(digests.get(&i).cloned().unwrap_or_default());
    let (Ok(mut new), Some(last)) = (
        material(stage, &placeholder, memo, device)?,
        store.last_key(&plan.pipeline.name, &stage.id),
    ) else {
        return Ok(reasons);
    };
    if let Some(old) = store.load_key_material::<KeyMaterial>(&last) {
        new.upstream = old.upstream.clone();
        reasons.extend(self::reasons(&old, &new));
    }
    Ok(reasons)
}

/// Why `new` has no result: compared with the stage's last recorded key.
pub fn explain_miss(
    store: &Store,
    pipeline: &str,
    stage_id: &str,
    new: &KeyMaterial,
) -> Vec<String> {
    let Some(last) = store.last_key(pipeline, stage_id) else {
        return vec!["never run before (no earlier result for this stage)".to_string()];
    };
    if last == new.key() {
        return vec![
            "its result is gone from the cache (removed by gc or quarantined by verify)"
                .to_string(),
        ];
    }
    match store.load_key_material::<KeyMaterial>(&last) {
        Some(old) => {
            let reasons = reasons(&old, new);
            if reasons.is_empty() {
                vec!["the key changed".to_string()]
            } else {
                reasons
            }
        }
        None => vec![format!(
            "the previous result (key {}) is gone from the cache",
            last.get(..12).unwrap_or(&last)
        )],
    }
}

/// Field-by-field differences, e.g. "`learning_rate` changed 2e-6 → 5e-6".
pub fn reasons(old: &KeyMaterial, new: &KeyMaterial) -> Vec<String> {
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(format!("kind changed `{}` → `{}`", old.kind, new.kind));
    }
    if old.version != new.version {
        out.push(format!(
            "the `{}` implementation version changed {} → {}",
            new.kind, old.version, new.version
        ));
    }
    if old.device_class != new.device_class {
        out.push(format!(
            "device class changed {} → {}",
            old.device_class, new.device_class
        ));
    }
    for (field, (before, after)) in pair_up(&old.params, &new.params) {
        match (before, after) {
            (Some(b), Some(a)) if b != a => out.push(format!(
                "`{field}` changed {} → {}",
                display_value(b),
                display_value(a)
            )),
            (None, Some(a)) => out.push(format!("`{field}` added (= {})", display_value(a))),
            (Some(b), None) => out.push(format!("`{field}` removed (was {})", display_value(b))),
            _ => {}
        }
    }
    for (field, (before, after)) in pair_up(&old.upstream, &new.upstream) {
        let empty = BTreeMap::new();
        for (name, (b, a)) in pair_up(before.unwrap_or(&empty), after.unwrap_or(&empty)) {
            match (b, a) {
                (Some(b), Some(a)) if b != a => out.push(format!("upstream `{name}` changed")),
                (None, Some(_)) => out.push(format!("upstream `{name}` added to `{field}`")),
                (Some(_), None) => out.push(format!("upstream `{name}` removed from `{field}`")),
                _ => {}
            }
        }
    }
    for (field, (before, after)) in pair_up(&old.inputs, &new.inputs) {
        let empty = BTreeMap::new();
        for (path, (b, a)) in pair_up(before.unwrap_or(&empty), after.unwrap_or(&empty)) {
            match (b, a) {
                (Some(b), Some(a)) => file_reasons(path, b, a, &mut out),
                (None, Some(_)) => out.push(format!("input `{path}` added to `{field}`")),
                (Some(_), None) => out.push(format!("input `{path}` removed from `{field}`")),
                _ => {}
            }
        }
    }
    out
}

fn file_reasons(root: &str, before: &TreeDigest, after: &TreeDigest, out: &mut Vec<String>) {
    for (name, (b, a)) in pair_up(before, after) {
        let shown = if name.is_empty() {
            root.to_string()
        } else {
            format!("{}/{name}", root.trim_end_matches('/'))
        };
        match (b, a) {
            (Some(b), Some(a)) if b != a => out.push(format!("file `{shown}` changed")),
            (None, Some(_)) => out.push(format!("file `{shown}` added")),
            (Some(_), None) => out.push(format!("file `{shown}` removed")),
            _ => {}
        }
    }
}

#[allow(clippy::type_complexity)]
fn pair_up<'a, V>(
    a: &'a BTreeMap<String, V>,
    b: &'a BTreeMap<String, V>,
) -> BTreeMap<&'a str, (Option<&'a V>, Option<&'a V>)> {
    let mut pairs: BTreeMap<&str, (Option<&V>, Option<&V>)> = BTreeMap::new();
    for (k, v) in a {
        pairs.entry(k).or_default().0 = Some(v);
    }
    for (k, v) in b {
        pairs.entry(k).or_default().1 = Some(v);
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn material() -> KeyMaterial {
        KeyMaterial {
            kind: "train".to_string(),
            version: 1,
            device_class: "cuda".to_string(),
            params: [
                ("learning_rate".to_string(), json!(2e-6)),
                ("steps".to_string(), json!(400)),
            ]
            .into(),
            upstream: [(
                "model".to_string(),
                [("ti".to_string(), "d1".to_string())].into(),
            )]
            .into(),
            inputs: [(
                "images".to_string(),
                [(
                    "dog".to_string(),
                    [("3.png".to_string(), "f1".to_string())].into(),
                )]
                .into(),
            )]
            .into(),
        }
    }

    #[test]
    fn reasons_name_each_changed_field_file_and_upstream() {
        let old = material();
        let mut new = material();
        new.params.insert("learning_rate".to_string(), json!(5e-6));
        new.params.remove("steps");
        new.upstream
            .get_mut("model")
            .expect("model")
            .insert("ti".to_string(), "d2".to_string());
        new.inputs
            .get_mut("images")
            .expect("images")
            .get_mut("dog")
            .expect("dog")
            .insert("3.png".to_string(), "f2".to_string());
        new.version = 2;
        assert_eq!(
            reasons(&old, &new),
            [
                "the `train` implementation version changed 1 → 2",
                "`learning_rate` changed 2e-6 → 5e-6",
                "`steps` removed (was 400)",
                "upstream `ti` changed",
                "file `dog/3.png` changed",
            ]
        );
        assert!(reasons(&old, &old).is_empty());
        assert_ne!(old.key(), new.key());
    }
}
