//! Reading diffusers `config.json` files key by key, so that every problem (unreadable file,
//! wrong type, unsupported value) is reported with the file and the key it concerns.
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

use crate::sd::weights::WeightsError;

/// Why a model could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{file}: cannot read model config: {reason}")]
    ReadConfig { file: PathBuf, reason: String },
    #[error("{file}: model config is not a JSON object: {reason}")]
    ParseConfig { file: PathBuf, reason: String },
    #[error("{file}: config key '{key}' {problem}")]
    InvalidKey {
        file: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{file}: config key '{key}' = {value} is not supported; {supported}")]
    Unsupported {
        file: PathBuf,
        key: String,
        value: String,
        supported: String,
    },
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Upper bounds on config sizes, about 4–100× what any Stable Diffusion 1.x/2.x/XL model uses:
/// a config over them is refused before anything is allocated (a typo such as
/// `block_out_channels: [1000000]` would otherwise ask libtorch for terabytes).
const SIZE_LIMITS: [(&str, i64); 22] = [
    ("block_out_channels", 8192),
    ("layers_per_block", 16),
    ("sample_size", 1024),
    ("in_channels", 64),
    ("out_channels", 64),
    ("latent_channels", 64),
    ("norm_num_groups", 1024),
    ("cross_attention_dim", 16384),
    ("attention_head_dim", 4096),
    ("num_attention_heads", 1024),
    ("transformer_layers_per_block", 64),
    ("time_embedding_dim", 65536),
    ("conv_in_kernel", 15),
    ("conv_out_kernel", 15),
    ("hidden_size", 16384),
    ("intermediate_size", 65536),
    ("num_hidden_layers", 256),
    ("max_position_embeddings", 4096),
    ("vocab_size", 1_000_000),
    ("projection_dim", 16384),
    ("num_train_timesteps", 100_000),
    ("eos_token_id", 1_000_000),
];

/// Why a config integer `value` of `key` is out of the sane range, if it is.
pub fn size_problem(key: &str, value: i64) -> Option<String> {
    if value < 0 {
        return Some(format!("is {value}; it must not be negative"));
    }
    let (_, limit) = SIZE_LIMITS.iter().find(|(name, _)| *name == key)?;
    (value > *limit).then(|| {
        format!(
            "is {value}, over the limit of {limit} for any Stable Diffusion model; fix the config (nothing was allocated)"
        )
    })
}

/// A parsed `config.json` plus its path, with typed getters that fall back to diffusers'
/// defaults when a key is missing or `null`.
#[derive(Debug, Clone)]
pub struct ConfigReader {
    file: PathBuf,
    map: Map<String, Value>,
}

impl ConfigReader {
    /// Reads and parses `file`.
    pub fn open(file: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(file).map_err(|error| ModelError::ReadConfig {
            file: file.to_path_buf(),
            reason: error.to_string(),
        })?;
        Self::parse(&text, file)
    }

    /// Parses `text` as the contents of `file` (the path is only used in messages).
    pub fn parse(text: &str, file: &Path) -> Result<Self, ModelError> {
        let parse_error = |reason: String| ModelError::ParseConfig {
            file: file.to_path_buf(),
            reason,
        };
        match serde_json::from_str::<Value>(text).map_err(|e| parse_error(e.to_string()))? {
            Value::Object(map) => Ok(Self {
                file: file.to_path_buf(),
                map,
            }),
            _ => Err(parse_error("expected an object at the top level".into())),
        }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|value| !value.is_null())
    }

    fn invalid(&self, key: &str, problem: impl Into<String>) -> ModelError {
        ModelError::InvalidKey {
            file: self.file.clone(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    /// An error saying that `key`'s value is not supported, and what is.
    pub fn unsupported(&self, key: &str, supported: impl Into<String>) -> ModelError {
        ModelError::Unsupported {
            file: self.file.clone(),
            key: key.to_string(),
            value: self.map.get(key).map_or("null".into(), Value::to_string),
            supported: supported.into(),
        }
    }

    fn as_int(&self, key: &str, value: &Value) -> Result<i64, ModelError> {
        let int = value
            .as_i64()
            .ok_or_else(|| self.invalid(key, format!("must be an integer, found {value}")))?;
        match size_problem(key, int) {
            Some(problem) => Err(self.invalid(key, problem)),
            None => Ok(int),
        }
    }

    pub fn int(&self, key: &str, default: i64) -> Result<i64, ModelError> {
        self.value(key).map_or(Ok(default), |v| self.as_int(key, v))
    }

    pub fn optional_int(&self, key: &str) -> Result<Option<i64>, ModelError> {
        self.value(key).map(|v| self.as_int(key, v)).transpose()
    }

    pub fn float(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        self.value(key).map_or(Ok(default), |v| {
            v.as_f64()
                .ok_or_else(|| self.invalid(key, format!("must be a number, found {v}")))
        })
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        self.value(key).map_or(Ok(default), |v| {
            v.as_bool()
                .ok_or_else(|| self.invalid(key, format!("must be true or false, found {v}")))
        })
    }

    /// A string key that may be missing or `null`.
    pub fn optional_string(&self, key: &str) -> Result<Option<String>, ModelError> {
        self.value(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.invalid(key, format!("must be a string, found {v}")))
            })
            .transpose()
    }

    pub fn string(&self, key: &str, default: &str) -> Result<String, ModelError> {
        self.value(key).map_or(Ok(default.to_string()), |v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| self.invalid(key, format!("must be a string, found {v}")))
        })
    }

    fn list<'a>(&'a self, key: &str) -> Result<Option<&'a Vec<Value>>, ModelError> {
        self.value(key)
            .map(|v| {
                v.as_array()
                    .ok_or_else(|| self.invalid(key, format!("must be a list, found {v}")))
            })
            .transpose()
    }

    pub fn int_list(&self, key: &str, default: &[i64]) -> Result<Vec<i64>, ModelError> {
        match self.list(key)? {
            None => Ok(default.to_vec()),
            Some(items) => items.iter().map(|v| self.as_int(key, v)).collect(),
        }
    }

    pub fn string_list(&self, key: &str, default: &[&str]) -> Result<Vec<String>, ModelError> {
        match self.list(key)? {
            None => Ok(default.iter().map(|s| s.to_string()).collect()),
            Some(items) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        self.invalid(key, format!("must be a list of strings, found {v}"))
                    })
                })
                .collect(),
        }
    }

    /// An integer applying to every block, or a list with one integer per block.
    pub fn int_per_block(
        &self,
        key: &str,
        default: i64,
        blocks: usize,
    ) -> Result<Vec<i64>, ModelError> {
        match self.value(key) {
            Some(Value::Array(_)) => {
                let values = self.int_list(key, &[])?;
                if values.len() != blocks {
                    return Err(self.invalid(
                        key,
                        format!(
                            "has {} entries but there are {blocks} down blocks",
                            values.len()
                        ),
                    ));
                }
                Ok(values)
            }
            _ => Ok(vec![self.int(key, default)?; blocks]),
        }
    }

    /// Fails with "`key` = value is not supported; `requirement`" unless `holds`.
    pub fn check(&self, key: &str, holds: bool, requirement: &str) -> Result<(), ModelError> {
        if holds {
            Ok(())
        } else {
            Err(self.unsupported(key, requirement))
        }
    }

    /// Fails unless `key` is missing or `null` (a feature this port does not implement).
    pub fn require_null(&self, key: &str) -> Result<(), ModelError> {
        match self.value(key) {
            None => Ok(()),
            Some(_) => Err(self.unsupported(key, "only null is supported")),
        }
    }

    /// Fails unless `key` is missing, `null`, `false`, or a list of `false`.
    pub fn require_false(&self, key: &str) -> Result<(), ModelError> {
        let all_false = match self.value(key) {
            None | Some(Value::Bool(false)) => true,
            Some(Value::Array(items)) => items.iter().all(|v| v == &Value::Bool(false)),
            Some(_) => false,
        };
        if all_false {
            Ok(())
        } else {
            Err(self.unsupported(key, "only false is supported"))
        }
    }

    /// Fails unless `key` (default `default`) equals one of `allowed`.
    pub fn require_string(
        &self,
        key: &str,
        default: &str,
        allowed: &[&str],
    ) -> Result<(), ModelError> {
        let value = self.string(key, default)?;
        if allowed.contains(&value.as_str()) {
            Ok(())
        } else {
            Err(self.unsupported(key, format!("supported: {}", allowed.join(", "))))
        }
    }
}
