//! Helpers for the runner's integration tests: a temporary project folder, running the real
//! binary against it, and reading the JSON run record it writes. Declared by each test binary
//! that uses it, which gives `crate::dreampipe()`, the binary a project runs by default.
#![allow(dead_code)]
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
    /// The binary `command` runs.
    pub binary: PathBuf,
}

/// What one `dreampipe run` did.
pub struct RunResult {
    pub output: Output,
    pub stdout: String,
    pub stderr: String,
    pub record: Option<Value>,
}

impl RunResult {
    /// `stage id → status` from the run record.
    pub fn status(&self, id: &str) -> String {
        let record = self.record.as_ref().unwrap_or_else(|| {
            panic!(
                "no run record; stdout:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        });
        let stages = record["stages"].as_array().expect("stages array");
        let stage = stages
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no stage {id} in record:\n{}", self.stdout));
        stage["status"].as_str().expect("status").to_string()
    }

    /// Ids of the stages with `status`, sorted.
    pub fn with_status(&self, status: &str) -> Vec<String> {
        let record = self.record.as_ref().expect("run record");
        let mut ids: Vec<String> = record["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .filter(|s| s["status"] == status)
            .map(|s| s["id"].as_str().unwrap_or_default().to_string())
            .collect();
        ids.sort();
        ids
    }

    pub fn stage_field(&self, id: &str, field: &str) -> Value {
        let record = self.record.as_ref().expect("run record");
        record["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s[field].clone())
            .unwrap_or(Value::Null)
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }
}

impl Project {
    /// A project run by this test binary's `crate::dreampipe()`.
    pub fn new() -> Self {
        Self::run_by(crate::dreampipe())
    }

    /// A project run by `binary` (the front `dreampipe` or the worker `dreampipe-torch`).
    pub fn run_by(binary: PathBuf) -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            binary,
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn cache(&self) -> PathBuf {
        self.path("cache")
    }

    pub fn write(&self, relative: &str, text: &str) {
        let path = self.path(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, text).expect("write");
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative))
            .unwrap_or_else(|e| panic!("read {relative}: {e}"))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .current_dir(self.dir.path())
            .arg("--device")
            .arg("cpu")
            .arg("--cache")
            .arg(self.cache())
            .args(args);
        command
    }

    pub fn dreampipe(&self, args: &[&str]) -> (bool, String, String) {
        let output = self.command(args).output().expect("run dreampipe");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    }

    pub fn run(&self, pipeline: &str, extra: &[&str]) -> RunResult {
        let mut args = vec!["run", pipeline, "--plain"];
        args.extend_from_slice(extra);
        let output = self.command(&args).output().expect("run dreampipe");
        to_result(output)
    }

    /// Committed results in the cache (one folder per key).
    pub fn result_count(&self) -> usize {
        std::fs::read_dir(self.cache().join("results"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Panics with the run's stdout and stderr unless it succeeded.
pub fn assert_success(result: &RunResult) {
    assert!(
        result.success(),
        "run failed:\n{}\n{}",
        result.stdout,
        result.stderr
    );
}

pub fn to_result(output: Output) -> RunResult {
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let record = stdout
        .lines()
        .find_map(|l| l.strip_prefix("run record: "))
        .and_then(|p| std::fs::read(Path::new(p)).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    RunResult {
        output,
        stdout,
        stderr,
        record,
    }
}
