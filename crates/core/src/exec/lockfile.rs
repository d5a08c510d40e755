//! `<pipeline>.lock`: each stage's key and output digest after a successful run. `run --locked`
//! compares against it so whoever reproduces a shared recipe knows they got the same artifacts.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One stage's entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockEntry {
    pub key: String,
    pub output: String,
}

/// The whole lock file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LockFile {
    pub pipeline: String,
    pub stages: BTreeMap<String, LockEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockFileError {
    #[error("--locked: cannot read `{path}`: {source}; run once without --locked to create it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--locked: `{path}` is not a valid lock file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `pipelines/x.yaml` → `pipelines/x.lock`.
pub fn path_for(pipeline_file: &Path) -> PathBuf {
    pipeline_file.with_extension("lock")
}

pub fn read(path: &Path) -> Result<LockFile, LockFileError> {
    let bytes = std::fs::read(path).map_err(|source| LockFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| LockFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

pub fn write(path: &Path, lock: &LockFile) -> Result<(), LockFileError> {
    let mut text = serde_json::to_string_pretty(lock).unwrap_or_default();
    text.push('\n');
    std::fs::write(path, text).map_err(|source| LockFileError::Write {
        path: path.to_path_buf(),
        source,
    })
}
