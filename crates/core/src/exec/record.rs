//! The run record: what happened to each stage of a run (written as JSON under
//! `<cache>/records/`, read by the summary, the report and tests).
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What happened to a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Cached,
    Ran,
    Failed,
    Skipped,
    NotSelected,
}

/// One stage in the run record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub status: Outcome,
    pub duration_s: f64,
    pub key: Option<String>,
    pub output: Option<PathBuf>,
    pub output_digest: Option<String>,
    pub params: serde_json::Value,
    pub log: Option<PathBuf>,
    pub error: Option<String>,
    /// When the stage's own work ran (after it got its slot), in seconds since the run
    /// started: (start, end). None when it did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran: Option<(f64, f64)>,
    /// Why it ran (dirty reasons), when it ran.
    pub reasons: Vec<String>,
}

/// The machine-readable record of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub pipeline: String,
    pub file: PathBuf,
    pub cache_root: PathBuf,
    pub started_unix: u64,
    pub duration_s: f64,
    pub success: bool,
    pub cancelled: bool,
    pub stages: Vec<StageRecord>,
}
