//! The content-addressed cache: hashing with a (device, inode, size, mtime) memo, the result
//! store (staging → atomic rename, hard-linked objects), per-key locks, garbage collection and
//! verification.
//!
//! Layout under the cache root (see `docs/cache.md`):
//! ```text
//! objects/ab/<blake3>        every output file once, read-only, named by its content digest
//! results/<key>/out/...      a committed stage output: hard links into objects/
//! results/<key>/key.json     the full key material (what `explain` compares field by field)
//! results/<key>/result.json  output digest, file manifest, stage id, creation time
//! staging/<key>-<pid>-<n>/   a stage being computed (never visible as a result)
//! work/<key>/                checkpoints a stage may resume from after a crash
//! locks/<key>.lock           per-key lock (flock; released by the kernel when a process dies)
//! logs/<key>.log             each stage's log
//! index/<pipeline>/<stage>   last key committed or reused for a stage (for `explain`)
//! runs/<pipeline>/<stage>    symlink to the stage's latest output (the human path)
//! records/<pipeline>/        JSON run records
//! reports/<pipeline>/        HTML report of the latest run (`runs/<pipeline>/report.html` redirects)
//! quarantine/                results and objects that failed `cache verify`
//! memo.json                  hash memo
//! ```
pub mod gc;
pub mod hash;
pub mod lock;
pub mod store;
pub mod verify;

use std::path::{Path, PathBuf};

/// Errors from the cache; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache: {action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cache: `{path}` is not valid JSON ({source}); delete it or run `dreampipe cache verify`"
    )]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A stage's output that cannot be stored as it is (the path is relative to `$OUT`).
    #[error("the output `{path}` {problem}")]
    Output { path: String, problem: String },
    #[error("cancelled while waiting for the lock on key {key}")]
    Cancelled { key: String },
}

impl CacheError {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}
