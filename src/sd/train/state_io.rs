//! Reading and writing optimizer state for resume: one directory holding
//! `optimizer.safetensors` (moment tensors, exact f32 / u8 bits, plus the f64 hyperparameters)
//! and `optimizer.json` (optimizer kind, per-parameter shapes, step counts; human-readable).
use super::TrainError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Tensor file inside a saved optimizer-state directory.
pub(crate) const TENSORS_FILE: &str = "optimizer.safetensors";
/// Metadata file inside a saved optimizer-state directory.
pub(crate) const META_FILE: &str = "optimizer.json";
/// Name of the f64 tensor holding the hyperparameters bit-exactly (JSON floats are for reading).
pub(crate) const HYPERPARAMS_TENSOR: &str = "hyperparams";
/// Version tag written into `optimizer.json`.
pub(crate) const FORMAT: &str = "dreampipe-optimizer-v1";

/// Per-parameter metadata: its shape, how many optimizer steps it has taken and how its moments
/// are stored ("none" before its first step, "f32", or "8bit").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ParamMeta {
    pub shape: Vec<i64>,
    pub step: u64,
    pub storage: String,
}

/// The JSON half of a saved optimizer state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StateMeta {
    pub format: String,
    pub optimizer: String,
    pub hyperparams: HashMap<String, f64>,
    pub params: Vec<ParamMeta>,
}

/// A loaded optimizer state, checked against the optimizer that loads it.
pub(crate) struct LoadedState {
    pub dir: PathBuf,
    pub meta: StateMeta,
    pub tensors: HashMap<String, Tensor>,
}

fn io_error(path: &Path, action: &'static str, reason: impl ToString) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        action,
        reason: reason.to_string(),
    }
}

/// Writes `meta` and `tensors` (plus the bit-exact `hyperparams` tensor) into `dir`.
pub(crate) fn write_state(
    dir: &Path,
    meta: &StateMeta,
    hyperparams: &[f64],
    mut tensors: Vec<(String, Tensor)>,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "create the directory", e))?;
    tensors.push((
        HYPERPARAMS_TENSOR.to_string(),
        Tensor::from_slice(hyperparams),
    ));
    let tensor_path = dir.join(TENSORS_FILE);
    crate::sd::weights::write_safetensors(&tensors, &tensor_path).map_err(TrainError::Write)?;
    let meta_path = dir.join(META_FILE);
    let json = serde_json::to_string_pretty(meta)
        .map_err(|e| io_error(&meta_path, "serialize optimizer metadata", e))?;
    std::fs::write(&meta_path, json + "\n")
        .map_err(|e| io_error(&meta_path, "write optimizer metadata", e))
}

/// Reads a state directory written by [`write_state`] and checks kind and parameter shapes.
pub(crate) fn read_state(
    dir: &Path,
    optimizer: &str,
    param_shapes: &[Vec<i64>],
) -> Result<LoadedState, TrainError> {
    let meta_path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&meta_path)
        .map_err(|e| io_error(&meta_path, "read optimizer metadata", e))?;
    let meta: StateMeta = serde_json::from_str(&text)
        .map_err(|e| io_error(&meta_path, "parse optimizer metadata", e))?;
    check_meta(dir, &meta, optimizer, param_shapes)?;
    let tensor_path = dir.join(TENSORS_FILE);
    let tensors = Tensor::read_safetensors(&tensor_path)
        .map_err(|e| io_error(&tensor_path, "read optimizer tensors", e))?
        .into_iter()
        .collect();
    Ok(LoadedState {
        dir: dir.to_path_buf(),
        meta,
        tensors,
    })
}

fn check_meta(
    dir: &Path,
    meta: &StateMeta,
    optimizer: &str,
    param_shapes: &[Vec<i64>],
) -> Result<(), TrainError> {
    let mismatch = |detail: String| TrainError::StateMismatch {
        path: dir.to_path_buf(),
        detail,
    };
    if meta.format != FORMAT {
        return Err(mismatch(format!(
            "format '{}', expected '{FORMAT}'",
            meta.format
        )));
    }
    if meta.optimizer != optimizer {
        return Err(mismatch(format!(
            "saved by optimizer '{}', loading into '{optimizer}'",
            meta.optimizer
        )));
    }
    if meta.params.len() != param_shapes.len() {
        return Err(mismatch(format!(
            "{} parameters saved, {} given",
            meta.params.len(),
            param_shapes.len()
        )));
    }
    for (index, (saved, shape)) in meta.params.iter().zip(param_shapes).enumerate() {
        if &saved.shape != shape {
            return Err(mismatch(format!(
                "parameter {index} has shape {:?} in the state, {:?} given",
                saved.shape, shape
            )));
        }
    }
    Ok(())
}

impl LoadedState {
    /// Removes and returns tensor `name`, checking its dtype and element count.
    pub(crate) fn take(
        &mut self,
        name: &str,
        kind: Kind,
        numel: usize,
    ) -> Result<Tensor, TrainError> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| TrainError::StateMismatch {
                path: self.dir.join(TENSORS_FILE),
                detail: format!("tensor '{name}' is missing"),
            })?;
        if tensor.kind() != kind || tensor.numel() != numel {
            return Err(TrainError::StateMismatch {
                path: self.dir.join(TENSORS_FILE),
                detail: format!(
                    "tensor '{name}' is {:?} with {} elements, expected {kind:?} with {numel}",
                    tensor.kind(),
                    tensor.numel()
                ),
            });
        }
        Ok(tensor)
    }

    /// The saved hyperparameters, bit-exact, in the order the optimizer wrote them.
    pub(crate) fn hyperparams(&mut self, count: usize) -> Result<Vec<f64>, TrainError> {
        let tensor = self.take(HYPERPARAMS_TENSOR, Kind::Double, count)?;
        Vec::<f64>::try_from(&tensor).map_err(|e| TrainError::StateMismatch {
            path: self.dir.join(TENSORS_FILE),
            detail: format!("tensor '{HYPERPARAMS_TENSOR}' unreadable: {e}"),
        })
    }
}
