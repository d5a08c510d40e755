//! The `metrics.jsonl` log: one JSON line per optimizer step, trimmed back to the resumed step
//! when a run resumes.
use super::progress::Progress;
use super::{TrainError, io_error};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the per-step metrics file written into the output directory (the stage-output
/// contract's name, shared with the report that reads it).
pub use dreampipe_kinds::output::METRICS_FILE;

/// Appends one JSON line per optimizer step to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`, dropping lines of steps after `resumed_step` (they are
    /// recomputed by the resumed run) — all lines when starting fresh.
    pub fn open(dir: &Path, resumed_step: u64) -> Result<Self, TrainError> {
        let path = dir.join(METRICS_FILE);
        let kept: Vec<String> = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|line| line_step(line).is_some_and(|s| s <= resumed_step))
                .map(str::to_string)
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "create the directory", e))?;
        std::fs::write(&path, text).map_err(|e| io_error(&path, "write", e))?;
        Ok(Self { path })
    }

    pub fn append(&self, progress: &Progress) -> Result<(), TrainError> {
        let line = serde_json::json!({
            "step": progress.step,
            "loss": finite_or_null(progress.loss),
            "lr": progress.lr,
            "grad_norm": progress.grad_norm.map(finite_or_null),
        });
        let mut line = line;
        if let Some(skipped) = progress.skipped_steps {
            line["skipped_steps"] = skipped.into();
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| io_error(&self.path, "open for appending", e))?;
        writeln!(file, "{line}").map_err(|e| io_error(&self.path, "append to", e))
    }
}

fn finite_or_null(value: f64) -> serde_json::Value {
    serde_json::Number::from_f64(value).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn line_step(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("step")?
        .as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_count_skipped_steps_only_with_loss_scaling() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::open(dir.path(), 0).unwrap();
        let progress = Progress {
            step: 1,
            total: 2,
            loss: 0.5,
            lr: 1e-4,
            grad_norm: Some(f64::INFINITY),
            skipped_steps: None,
        };
        log.append(&progress).unwrap();
        log.append(&Progress {
            step: 2,
            skipped_steps: Some(1),
            ..progress
        })
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(
            text,
            "{\"grad_norm\":null,\"loss\":0.5,\"lr\":0.0001,\"step\":1}\n\
             {\"grad_norm\":null,\"loss\":0.5,\"lr\":0.0001,\"skipped_steps\":1,\"step\":2}\n"
        );
    }
}
