//! Reading and writing optimizer state for resume, the one path both optimizers use: one
//! directory holding `optimizer.safetensors` (moment tensors `<index>.<name>`, exact f32 / u8
//! bits, plus the f64 hyperparameters) and `optimizer.json` (optimizer kind, per-parameter
//! shapes, step counts and storage; human-readable). An optimizer says how one parameter's
//! moments are stored ([`SavedMoments`]) and how they are read back ([`SavedParam`]);
//! [`save`] and [`load`] do the rest.
use super::adamw_config::AdamWConfig;
use super::{TrainError, io_error};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Tensor file inside a saved optimizer-state directory.
const TENSORS_FILE: &str = "optimizer.safetensors";
/// Metadata file inside a saved optimizer-state directory.
const META_FILE: &str = "optimizer.json";
/// Name of the f64 tensor holding the hyperparameters bit-exactly (JSON floats are for reading).
const HYPERPARAMS_TENSOR: &str = "hyperparams";
/// Version tag written into `optimizer.json`.
const FORMAT: &str = "dreampipe-optimizer-v1";

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
struct StateMeta {
    format: String,
    optimizer: String,
    hyperparams: HashMap<String, f64>,
    params: Vec<ParamMeta>,
}

/// A loaded optimizer state, checked against the optimizer that loads it.
struct LoadedState {
    dir: PathBuf,
    meta: StateMeta,
    tensors: HashMap<String, Tensor>,
}

/// Storage of a parameter's moments: "none" before its first step, "f32", or "8bit".
const STORAGE_NONE: &str = "none";
pub(crate) const STORAGE_F32: &str = "f32";
pub(crate) const STORAGE_8BIT: &str = "8bit";
/// Names of the two moments (torch's state keys).
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";

/// What an optimizer saves of one parameter that has taken a step.
pub(crate) struct SavedMoments {
    pub step: u64,
    /// [`STORAGE_F32`] or [`STORAGE_8BIT`].
    pub storage: &'static str,
    /// The tensors by name within the parameter (saved as `<index>.<name>`).
    pub tensors: Vec<(String, Tensor)>,
}

impl SavedMoments {
    /// f32 moments, saved as `exp_avg` and `exp_avg_sq`.
    pub fn f32(step: u64, exp_avg: &Tensor, exp_avg_sq: &Tensor) -> Self {
        Self {
            step,
            storage: STORAGE_F32,
            tensors: vec![
                (EXP_AVG.to_string(), exp_avg.shallow_clone()),
                (EXP_AVG_SQ.to_string(), exp_avg_sq.shallow_clone()),
            ],
        }
    }
}

/// Writes the state of optimizer `optimizer` (its hyperparameters `config`) over `params` into
/// `dir`; `moments(index)` gives what parameter `index` saves (None before its first step).
pub(crate) fn save(
    dir: &Path,
    optimizer: &str,
    config: AdamWConfig,
    params: &[Tensor],
    moments: impl Fn(usize) -> Option<SavedMoments>,
) -> Result<(), TrainError> {
    let mut tensors = Vec::new();
    let mut metas = Vec::with_capacity(params.len());
    for (index, param) in params.iter().enumerate() {
        let saved = moments(index);
        let (step, storage) = saved
            .as_ref()
            .map_or((0, STORAGE_NONE), |saved| (saved.step, saved.storage));
        metas.push(ParamMeta {
            shape: param.size(),
            step,
            storage: storage.to_string(),
        });
        let named = saved.into_iter().flat_map(|saved| saved.tensors);
        tensors.extend(named.map(|(name, tensor)| (format!("{index}.{name}"), tensor)));
    }
    let meta = StateMeta {
        format: FORMAT.to_string(),
        optimizer: optimizer.to_string(),
        hyperparams: config.to_map(),
        params: metas,
    };
    write_state(dir, &meta, &config.to_array(), tensors)
}

/// Reads the state [`save`] wrote for `optimizer` over `params` (same count and shapes): the
/// hyperparameters, and for each parameter that had taken a step what `restore` makes of its
/// saved moments.
pub(crate) fn load<S>(
    dir: &Path,
    optimizer: &str,
    params: &[Tensor],
    mut restore: impl FnMut(&mut SavedParam<'_>) -> Result<S, TrainError>,
) -> Result<(AdamWConfig, Vec<Option<S>>), TrainError> {
    let shapes: Vec<Vec<i64>> = params.iter().map(Tensor::size).collect();
    let mut loaded = read_state(dir, optimizer, &shapes)?;
    let config = AdamWConfig::from_slice(&loaded.hyperparams(AdamWConfig::FIELD_NAMES.len())?);
    let metas = loaded.meta.params.clone();
    let mut states = Vec::with_capacity(params.len());
    for (index, (param, meta)) in params.iter().zip(&metas).enumerate() {
        if meta.storage == STORAGE_NONE {
            states.push(None);
            continue;
        }
        let mut saved = SavedParam {
            loaded: &mut loaded,
            index,
            param,
            meta,
        };
        states.push(Some(restore(&mut saved)?));
    }
    Ok((config, states))
}

/// One parameter's saved moments, as [`load`] hands them to the optimizer.
pub(crate) struct SavedParam<'a> {
    loaded: &'a mut LoadedState,
    pub index: usize,
    pub param: &'a Tensor,
    pub meta: &'a ParamMeta,
}

impl SavedParam<'_> {
    /// Tensor `<index>.<name>`, checked to be `kind` with `numel` elements, on the parameter's
    /// device.
    pub fn take(&mut self, name: &str, kind: Kind, numel: usize) -> Result<Tensor, TrainError> {
        let name = format!("{}.{name}", self.index);
        let tensor = self.loaded.take(&name, kind, numel)?;
        Ok(tensor.to_device(self.param.device()))
    }

    /// The f32 moments saved by [`SavedMoments::f32`], shaped like the parameter.
    pub fn f32_moments(&mut self) -> Result<(Tensor, Tensor), TrainError> {
        let (numel, shape) = (self.param.numel(), self.param.size());
        let exp_avg = self.take(EXP_AVG, Kind::Float, numel)?;
        let exp_avg_sq = self.take(EXP_AVG_SQ, Kind::Float, numel)?;
        Ok((
            exp_avg.view(shape.as_slice()),
            exp_avg_sq.view(shape.as_slice()),
        ))
    }

    /// A state that does not fit the optimizer loading it.
    pub fn mismatch(&self, detail: String) -> TrainError {
        TrainError::StateMismatch {
            path: self.loaded.dir.clone(),
            detail,
        }
    }
}

/// Writes `meta` and `tensors` (plus the bit-exact `hyperparams` tensor) into `dir`.
fn write_state(
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
fn read_state(
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
    fn take(&mut self, name: &str, kind: Kind, numel: usize) -> Result<Tensor, TrainError> {
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
    fn hyperparams(&mut self, count: usize) -> Result<Vec<f64>, TrainError> {
        let tensor = self.take(HYPERPARAMS_TENSOR, Kind::Double, count)?;
        Vec::<f64>::try_from(&tensor).map_err(|e| TrainError::StateMismatch {
            path: self.dir.join(TENSORS_FILE),
            detail: format!("tensor '{HYPERPARAMS_TENSOR}' unreadable: {e}"),
        })
    }
}
