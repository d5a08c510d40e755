//! Fresh or dirty, and why (cargo-style dirty reasons): the new key material is compared field
//! by field with the material stored beside the stage's last result. Each reason is a
//! [`DirtyReason`]; its `Display` is the wording `plan`, `explain` and the run record show.
use super::fingerprint::{KeyMaterial, material};
use super::graph::Plan;
use crate::cache::CacheError;
use crate::cache::hash::{HashMemo, TreeDigest};
use crate::cache::store::Store;
use crate::pipeline::display_value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// Why a stage will run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirtyReason {
    NeverRun,
    /// The stage's last key is this key, but its result is gone.
    ResultGone,
    /// The stage's last result (this key) is gone, so nothing to compare with.
    PreviousResultGone {
        key: String,
    },
    /// The material differs in no field shown here.
    KeyChanged,
    Forced,
    /// The cached result is damaged (`problem` names the file).
    Damaged {
        problem: String,
    },
    UpstreamRunsFirst {
        name: String,
    },
    KindChanged {
        from: String,
        to: String,
    },
    VersionChanged {
        kind: String,
        from: u32,
        to: u32,
    },
    DeviceChanged {
        from: String,
        to: String,
    },
    ParamChanged {
        field: String,
        from: String,
        to: String,
    },
    ParamAdded {
        field: String,
        value: String,
    },
    ParamRemoved {
        field: String,
        was: String,
    },
    UpstreamChanged {
        name: String,
    },
    UpstreamAdded {
        name: String,
        field: String,
    },
    UpstreamRemoved {
        name: String,
        field: String,
    },
    InputAdded {
        path: String,
        field: String,
    },
    InputRemoved {
        path: String,
        field: String,
    },
    FileChanged {
        path: String,
    },
    FileAdded {
        path: String,
    },
    FileRemoved {
        path: String,
    },
}

impl fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NeverRun => write!(f, "never run before (no earlier result for this stage)"),
            Self::ResultGone => write!(
                f,
                "its result is gone from the cache (removed by gc or quarantined by verify)"
            ),
            Self::PreviousResultGone { key } => write!(
                f,
                "the previous result (key {}) is gone from the cache",
                key.get(..12).unwrap_or(key)
            ),
            Self::KeyChanged => write!(f, "the key changed"),
            Self::Forced => write!(f, "forced with --force"),
            Self::Damaged { problem } => write!(f, "{problem}; it will be recomputed"),
            Self::UpstreamRunsFirst { name } => write!(f, "upstream `{name}` will run first"),
            Self::KindChanged { from, to } => write!(f, "kind changed `{from}` → `{to}`"),
            Self::VersionChanged { kind, from, to } => write!(
                f,
                "the `{kind}` implementation version changed {from} → {to}"
            ),
            Self::DeviceChanged { from, to } => write!(f, "device class changed {from} → {to}"),
            Self::ParamChanged { field, from, to } => write!(f, "`{field}` changed {from} → {to}"),
            Self::ParamAdded { field, value } => write!(f, "`{field}` added (= {value})"),
            Self::ParamRemoved { field, was } => write!(f, "`{field}` removed (was {was})"),
            Self::UpstreamChanged { name } => write!(f, "upstream `{name}` changed"),
            Self::UpstreamAdded { name, field } => {
                write!(f, "upstream `{name}` added to `{field}`")
            }
            Self::UpstreamRemoved { name, field } => {
                write!(f, "upstream `{name}` removed from `{field}`")
            }
            Self::InputAdded { path, field } => write!(f, "input `{path}` added to `{field}`"),
            Self::InputRemoved { path, field } => {
                write!(f, "input `{path}` removed from `{field}`")
            }
            Self::FileChanged { path } => write!(f, "file `{path}` changed"),
            Self::FileAdded { path } => write!(f, "file `{path}` added"),
            Self::FileRemoved { path } => write!(f, "file `{path}` removed"),
        }
    }
}

/// The reasons as the text lines `plan`, `explain` and run records show.
pub fn texts(reasons: &[DirtyReason]) -> Vec<String> {
    reasons.iter().map(ToString::to_string).collect()
}

/// What a run would do with one stage.
#[derive(Debug, Clone)]
pub enum Status {
    /// In the cache under this key.
    Fresh { key: String, output: PathBuf },
    /// Will run; the reasons say why.
    Dirty {
        key: String,
        reasons: Vec<DirtyReason>,
    },
    /// Will run after its upstream; its key is known only then.
    Pending { reasons: Vec<DirtyReason> },
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
                        reasons: vec![DirtyReason::Damaged {
                            problem: damage.problem,
                        }],
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
                        reasons: vec![DirtyReason::Forced],
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
) -> Result<Vec<DirtyReason>, CacheError> {
    let mut reasons = vec![DirtyReason::UpstreamRunsFirst {
        name: upstream.to_string(),
    }];
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
) -> Vec<DirtyReason> {
    let Some(last) = store.last_key(pipeline, stage_id) else {
        return vec![DirtyReason::NeverRun];
    };
    if last == new.key() {
        return vec![DirtyReason::ResultGone];
    }
    match store.load_key_material::<KeyMaterial>(&last) {
        Some(old) => {
            let reasons = reasons(&old, new);
            if reasons.is_empty() {
                vec![DirtyReason::KeyChanged]
            } else {
                reasons
            }
        }
        None => vec![DirtyReason::PreviousResultGone { key: last }],
    }
}

/// Field-by-field differences, e.g. "`learning_rate` changed 2e-6 → 5e-6".
pub fn reasons(old: &KeyMaterial, new: &KeyMaterial) -> Vec<DirtyReason> {
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(DirtyReason::KindChanged {
            from: old.kind.clone(),
            to: new.kind.clone(),
        });
    }
    if old.version != new.version {
        out.push(DirtyReason::VersionChanged {
            kind: new.kind.clone(),
            from: old.version,
            to: new.version,
        });
    }
    if old.device_class != new.device_class {
        out.push(DirtyReason::DeviceChanged {
            from: old.device_class.clone(),
            to: new.device_class.clone(),
        });
    }
    param_reasons(old, new, &mut out);
    upstream_reasons(old, new, &mut out);
    input_reasons(old, new, &mut out);
    out
}

fn param_reasons(old: &KeyMaterial, new: &KeyMaterial, out: &mut Vec<DirtyReason>) {
    for (field, (before, after)) in pair_up(&old.params, &new.params) {
        let field = field.to_string();
        match (before, after) {
            (Some(b), Some(a)) if b != a => out.push(DirtyReason::ParamChanged {
                field,
                from: display_value(b),
                to: display_value(a),
            }),
            (None, Some(a)) => out.push(DirtyReason::ParamAdded {
                field,
                value: display_value(a),
            }),
            (Some(b), None) => out.push(DirtyReason::ParamRemoved {
                field,
                was: display_value(b),
            }),
            _ => {}
        }
    }
}

fn upstream_reasons(old: &KeyMaterial, new: &KeyMaterial, out: &mut Vec<DirtyReason>) {
    for (field, (before, after)) in pair_up(&old.upstream, &new.upstream) {
        let empty = BTreeMap::new();
        for (name, (b, a)) in pair_up(before.unwrap_or(&empty), after.unwrap_or(&empty)) {
            let (name, field) = (name.to_string(), field.to_string());
            match (b, a) {
                (Some(b), Some(a)) if b != a => out.push(DirtyReason::UpstreamChanged { name }),
                (None, Some(_)) => out.push(DirtyReason::UpstreamAdded { name, field }),
                (Some(_), None) => out.push(DirtyReason::UpstreamRemoved { name, field }),
                _ => {}
            }
        }
    }
}

fn input_reasons(old: &KeyMaterial, new: &KeyMaterial, out: &mut Vec<DirtyReason>) {
    for (field, (before, after)) in pair_up(&old.inputs, &new.inputs) {
        let empty = BTreeMap::new();
        for (path, (b, a)) in pair_up(before.unwrap_or(&empty), after.unwrap_or(&empty)) {
            let (owned, field) = (path.to_string(), field.to_string());
            match (b, a) {
                (Some(b), Some(a)) => file_reasons(path, b, a, out),
                (None, Some(_)) => out.push(DirtyReason::InputAdded { path: owned, field }),
                (Some(_), None) => out.push(DirtyReason::InputRemoved { path: owned, field }),
                _ => {}
            }
        }
    }
}

fn file_reasons(root: &str, before: &TreeDigest, after: &TreeDigest, out: &mut Vec<DirtyReason>) {
    for (name, (b, a)) in pair_up(before, after) {
        let path = if name.is_empty() {
            root.to_string()
        } else {
            format!("{}/{name}", root.trim_end_matches('/'))
        };
        match (b, a) {
            (Some(b), Some(a)) if b != a => out.push(DirtyReason::FileChanged { path }),
            (None, Some(_)) => out.push(DirtyReason::FileAdded { path }),
            (Some(_), None) => out.push(DirtyReason::FileRemoved { path }),
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
        let found = reasons(&old, &new);
        assert_eq!(
            found,
            [
                DirtyReason::VersionChanged {
                    kind: "train".into(),
                    from: 1,
                    to: 2
                },
                DirtyReason::ParamChanged {
                    field: "learning_rate".into(),
                    from: "2e-6".into(),
                    to: "5e-6".into()
                },
                DirtyReason::ParamRemoved {
                    field: "steps".into(),
                    was: "400".into()
                },
                DirtyReason::UpstreamChanged { name: "ti".into() },
                DirtyReason::FileChanged {
                    path: "dog/3.png".into()
                },
            ]
        );
        assert_eq!(
            texts(&found),
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
