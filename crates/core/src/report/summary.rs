//! The end-of-run summary table and the JSON run record written under
//! `<cache>/records/<pipeline>/`.
use crate::cache::store::file_name_for;
use crate::exec::record::{Outcome, RunRecord};
use std::path::{Path, PathBuf};

fn outcome_text(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Cached => "cached",
        Outcome::Ran => "ran",
        Outcome::Failed => "FAILED",
        Outcome::Skipped => "skipped",
        Outcome::NotSelected => "-",
    }
}

/// Stage | status | duration | output (the human path) or the failure's log.
pub fn table(record: &RunRecord) -> String {
    let width = record
        .stages
        .iter()
        .map(|s| s.id.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut text = format!(
        "{:width$}  {:8} {:>9}  output\n",
        "stage", "status", "duration"
    );
    for stage in &record.stages {
        let where_ = match stage.status {
            Outcome::Cached | Outcome::Ran => record
                .cache_root
                .join("runs")
                .join(file_name_for(&record.pipeline))
                .join(file_name_for(&stage.id))
                .display()
                .to_string(),
            Outcome::Failed => stage
                .log
                .as_ref()
                .map(|l| format!("log: {}", l.display()))
                .unwrap_or_default(),
            _ => String::new(),
        };
        text.push_str(&format!(
            "{:width$}  {:8} {:>8.2}s  {where_}\n",
            stage.id,
            outcome_text(stage.status),
            stage.duration_s
        ));
    }
    let count = |o: Outcome| record.stages.iter().filter(|s| s.status == o).count();
    text.push_str(&format!(
        "{} ran, {} cached, {} failed, {} skipped in {:.2}s\n",
        count(Outcome::Ran),
        count(Outcome::Cached),
        count(Outcome::Failed),
        count(Outcome::Skipped),
        record.duration_s
    ));
    for stage in record.stages.iter().filter(|s| s.status == Outcome::Failed) {
        let log = stage
            .log
            .as_ref()
            .map(|l| format!(" (log: {})", l.display()))
            .unwrap_or_default();
        text.push_str(&format!(
            "stage `{}` failed: {}{log}\n",
            stage.id,
            stage.error.as_deref().unwrap_or("unknown error")
        ));
    }
    text
}

/// Writes the run record as JSON; returns its path.
pub fn write_record(cache_root: &Path, record: &RunRecord) -> std::io::Result<PathBuf> {
    let dir = cache_root
        .join("records")
        .join(file_name_for(&record.pipeline));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!(
        "{}-{}.json",
        record.started_unix,
        std::process::id()
    ));
    let text = serde_json::to_string_pretty(record).map_err(std::io::Error::other)?;
    std::fs::write(&path, text)?;
    Ok(path)
}
