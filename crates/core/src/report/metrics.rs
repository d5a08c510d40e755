//! Reading a training stage's `metrics.jsonl`: one JSON object per line with `step` and
//! optional `loss` / `lr` (other fields are ignored). A run that was killed mid-write leaves a
//! partial last line without its newline; that line is dropped and reported, not an error.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ReportError;

/// One logged training step. `None` (JSON `null`, which is how serde_json writes NaN) marks a
/// value that was not finite or not logged at that step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub step: u64,
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub lr: Option<f64>,
}

/// The parsed file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsLog {
    pub points: Vec<MetricPoint>,
    /// The last line was cut off (no trailing newline, not valid JSON) and was skipped.
    pub truncated_last_line: bool,
}

/// Reads and parses `path`.
pub fn read_metrics_jsonl(path: &Path) -> Result<MetricsLog, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::Io {
        path: PathBuf::from(path),
        action: "read the metrics log",
        reason: e.to_string(),
    })?;
    parse_metrics_jsonl(&text, path)
}

/// Parses the text of a metrics log; `path` only names the file in errors.
pub fn parse_metrics_jsonl(text: &str, path: &Path) -> Result<MetricsLog, ReportError> {
    let mut log = MetricsLog::default();
    let lines: Vec<&str> = text.split('\n').collect();
    let unterminated_last = lines.len() - 1;
    for (index, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<MetricPoint>(line) {
            Ok(point) => log.points.push(point),
            Err(_) if index == unterminated_last => log.truncated_last_line = true,
            Err(e) => {
                return Err(ReportError::Metrics {
                    path: PathBuf::from(path),
                    line: index + 1,
                    reason: format!(
                        "{e}; expected an object like {{\"step\": 10, \"loss\": 0.12, \"lr\": 2e-6}}"
                    ),
                });
            }
        }
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MetricsLog, ReportError> {
        parse_metrics_jsonl(text, Path::new("run/metrics.jsonl"))
    }

    #[test]
    fn parses_points_nulls_and_extra_fields() {
        let log = parse(
            "{\"step\":1,\"loss\":0.5,\"lr\":2e-6}\n\n{\"step\":2,\"loss\":null,\"epoch\":0}\n",
        )
        .unwrap();
        assert_eq!(
            log.points,
            vec![
                MetricPoint {
                    step: 1,
                    loss: Some(0.5),
                    lr: Some(2e-6)
                },
                MetricPoint {
                    step: 2,
                    loss: None,
                    lr: None
                },
            ]
        );
        assert!(!log.truncated_last_line);
    }

    #[test]
    fn tolerates_a_cut_off_last_line() {
        let log = parse("{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"lo").unwrap();
        assert_eq!(log.points.len(), 1);
        assert!(log.truncated_last_line);
        let complete_without_newline = parse("{\"step\":1}\n{\"step\":2}").unwrap();
        assert_eq!(complete_without_newline.points.len(), 2);
        assert!(!complete_without_newline.truncated_last_line);
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error_naming_file_and_line() {
        let err = parse("{\"step\":1}\nnot json\n{\"step\":3}\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("run/metrics.jsonl:2: "), "{err}");
        assert!(err.contains("expected an object like"), "{err}");
        let terminated_bad_last = parse("{\"step\":1}\n{\"step\":\n").unwrap_err().to_string();
        assert!(
            terminated_bad_last.starts_with("run/metrics.jsonl:2: "),
            "{terminated_bad_last}"
        );
    }
}
