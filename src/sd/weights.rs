//! Loading `.safetensors` weight files into a `tch::nn::VarStore` whose variable names are the
//! diffusers/transformers key names (`down_blocks.0.resnets.1.conv1.weight`), with errors that
//! name the tensor and the file for anything missing, unexpected or mis-shaped.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor, nn::VarStore};

/// Why weights could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{file}: cannot read safetensors: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error(
        "{dir}: no weights file: expected {expected} (convert .bin checkpoints to .safetensors)"
    )]
    NoFile { dir: PathBuf, expected: String },
    #[error("{file}: tensor '{tensor}' is missing (the model config expects it)")]
    Missing { tensor: String, file: PathBuf },
    #[error("{file}: unexpected tensor '{tensor}' (not part of the model the config describes)")]
    Unexpected { tensor: String, file: PathBuf },
    #[error("{file}: tensor '{tensor}' has shape {found:?}, the config implies {expected:?}")]
    Shape {
        tensor: String,
        file: PathBuf,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
}

/// Finds a component's weights file: `<stem>.<variant>.safetensors` when a variant (e.g.
/// "fp16") is asked for and present, else `<stem>.safetensors`.
pub fn find_weights_file(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
) -> Result<PathBuf, WeightsError> {
    if let Some(variant) = variant {
        let with_variant = dir.join(format!("{stem}.{variant}.safetensors"));
        if with_variant.is_file() {
            return Ok(with_variant);
        }
    }
    let plain = dir.join(format!("{stem}.safetensors"));
    if plain.is_file() {
        return Ok(plain);
    }
    Err(WeightsError::NoFile {
        dir: dir.to_path_buf(),
        expected: format!("{stem}.safetensors"),
    })
}

/// Reads every tensor of a safetensors file (any float dtype; converted later).
pub fn read_tensors(file: &Path) -> Result<Vec<(String, Tensor)>, WeightsError> {
    Tensor::read_safetensors(file).map_err(|error| WeightsError::Read {
        file: file.to_path_buf(),
        reason: error.to_string(),
    })
}

/// Copies the tensors of `file` into the variables of `vs`. `rename` maps a file key to a
/// variable name, or `None` to skip it (known buffers such as `position_ids`). Every variable
/// must be filled exactly once; shapes must match; dtypes are converted to the variable's kind.
pub fn load_into(
    vs: &VarStore,
    file: &Path,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<(), WeightsError> {
    let variables = vs.variables();
    let mut pending: BTreeMap<String, ()> = variables.keys().map(|k| (k.clone(), ())).collect();
    let tensors = read_tensors(file)?;
    let _guard = tch::no_grad_guard();
    for (key, tensor) in tensors {
        let Some(name) = rename(&key) else { continue };
        let Some(variable) = variables.get(&name) else {
            return Err(WeightsError::Unexpected {
                tensor: key,
                file: file.to_path_buf(),
            });
        };
        copy_checked(variable, &tensor, &key, file)?;
        pending.remove(&name);
    }
    match pending.into_keys().next() {
        Some(tensor) => Err(WeightsError::Missing {
            tensor,
            file: file.to_path_buf(),
        }),
        None => Ok(()),
    }
}

fn copy_checked(
    variable: &Tensor,
    source: &Tensor,
    key: &str,
    file: &Path,
) -> Result<(), WeightsError> {
    if variable.size() != source.size() {
        return Err(WeightsError::Shape {
            tensor: key.to_string(),
            file: file.to_path_buf(),
            expected: variable.size(),
            found: source.size(),
        });
    }
    let mut target = variable.shallow_clone();
    target.copy_(&source.to_kind(variable.kind()).to_device(variable.device()));
    Ok(())
}

/// Saves the variables of `vs` as safetensors (keys sorted), converting to `kind` if given.
pub fn save_var_store(vs: &VarStore, file: &Path, kind: Option<Kind>) -> Result<(), WeightsError> {
    let variables: HashMap<String, Tensor> = vs.variables();
    let mut sorted: Vec<(String, Tensor)> = variables.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let converted: Vec<(String, Tensor)> = sorted
        .into_iter()
        .map(|(name, tensor)| {
            let tensor = tensor.detach().to_device(tch::Device::Cpu);
            (
                name,
                kind.map_or(tensor.shallow_clone(), |k| tensor.to_kind(k)),
            )
        })
        .collect();
    Tensor::write_safetensors(&converted, file).map_err(|error| WeightsError::Read {
        file: file.to_path_buf(),
        reason: error.to_string(),
    })
}
