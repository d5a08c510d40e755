//! A stage's key: blake3 over its key material, serialized as canonical JSON (sorted maps).
//!
//! | enters the key              | from                                                  |
//! |-----------------------------|-------------------------------------------------------|
//! | `kind`, `version`           | the stage kind and its implementation version         |
//! | `device_class`              | `cpu` for CPU stages; the device type for GPU stages  |
//! | `params`                    | every schema field with defaults filled, except input  |
//! |                             | fields and fields marked not-in-key                    |
//! | `upstream`                  | per input field, each upstream stage's output digest   |
//! | `inputs`                    | per input field, each path's file digests (walkdir,    |
//! |                             | sorted relative paths + blake3 of contents)            |
//!
//! Not in the key: paths' absolute locations, the environment (`$OUT`, `$IN_*`), stage ids,
//! file modification times. The full material is stored as `key.json` beside each result.
use crate::cache::CacheError;
use crate::cache::hash::{HashMemo, TreeDigest};
use crate::device::Device;
use crate::pipeline::StageInstance;
use crate::stages::DeviceClass;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Everything that can change a stage's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyMaterial {
    pub kind: String,
    pub version: u32,
    pub device_class: String,
    pub params: BTreeMap<String, Value>,
    /// field → upstream stage name → its output digest.
    pub upstream: BTreeMap<String, BTreeMap<String, String>>,
    /// field → path as written → relative file → digest.
    pub inputs: BTreeMap<String, BTreeMap<String, TreeDigest>>,
}

impl KeyMaterial {
    /// The key: blake3 of the canonical JSON.
    pub fn key(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// The device class text that enters the key.
pub fn device_class(instance: &StageInstance, device: Device) -> String {
    match (instance.kind.device_class(), device) {
        (DeviceClass::Cpu, _) | (DeviceClass::Gpu, Device::Cpu) => "cpu".to_string(),
        (DeviceClass::Gpu, Device::Cuda(_)) => "cuda".to_string(),
    }
}

/// Builds the key material; `upstream_digest(index)` gives a finished upstream's output digest.
/// `Ok(Err(name))` means upstream `name` has no output yet (it will run first).
pub fn material(
    instance: &StageInstance,
    upstream_digest: &dyn Fn(usize) -> Option<String>,
    memo: &HashMemo,
    device: crate::device::Device,
) -> Result<Result<KeyMaterial, String>, CacheError> {
    let schema = instance.kind.schema();
    let params = schema
        .iter()
        .filter(|spec| !spec.ty.is_input())
        .filter_map(|spec| {
            let value = instance.params.get(spec.name)?;
            spec.keys(value)
                .then(|| (spec.name.to_string(), value.clone()))
        })
        .collect();
    // Input fields added to a kind later (`keyed_when_set`) enter the key only when they name
    // something.
    let later_field = |field: &str| {
        schema
            .iter()
            .any(|spec| spec.name == field && !spec.key_default)
    };
    let mut upstream = BTreeMap::new();
    for (field, refs) in &instance.refs {
        if refs.is_empty() && later_field(field) {
            continue;
        }
        let mut digests = BTreeMap::new();
        for (name, index) in refs {
            match upstream_digest(*index) {
                Some(digest) => digests.insert(name.clone(), digest),
                None => return Ok(Err(name.clone())),
            };
        }
        upstream.insert(field.clone(), digests);
    }
    let mut inputs = BTreeMap::new();
    for (field, paths) in &instance.paths {
        if paths.is_empty() && later_field(field) {
            continue;
        }
        let mut trees = BTreeMap::new();
        for (written, resolved) in paths {
            trees.insert(written.clone(), memo.hash_tree(resolved)?);
        }
        inputs.insert(field.clone(), trees);
    }
    Ok(Ok(KeyMaterial {
        kind: instance.kind.kind().to_string(),
        version: instance.kind.version(),
        device_class: device_class(instance, device),
        params,
        upstream,
        inputs,
    }))
}
