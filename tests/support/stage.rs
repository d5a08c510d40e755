//! Shared by the SD stage tests: running the real binary on a pipeline written to a tempdir,
//! `dreampipe sample` for comparison, and reading PNG pixels.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_path(relative: &str) -> PathBuf {
    crate::repo_root().join(relative)
}

/// The tiny model's absolute path (pipeline paths are relative to the pipeline's folder).
pub fn tiny_model() -> String {
    repo_path("models/tiny-sd").display().to_string()
}

/// `dreampipe --device cpu --cache CACHE run PIPELINE --plain`.
pub fn run_pipeline(cache: &Path, pipeline: &Path) -> Output {
    Command::new(crate::dreampipe())
        .args(["--device", "cpu", "--cache"])
        .arg(cache)
        .arg("run")
        .arg(pipeline)
        .arg("--plain")
        .output()
        .expect("run dreampipe")
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the pipeline and asserts success.
pub fn run_ok(cache: &Path, pipeline: &Path) -> String {
    let output = run_pipeline(cache, pipeline);
    let all = text(&output);
    assert!(output.status.success(), "run failed:\n{all}");
    all
}

/// `cache/runs/<pipeline>/<stage>`: the stage's latest output.
pub fn stage_output(cache: &Path, pipeline: &str, stage: &str) -> PathBuf {
    cache.join("runs").join(pipeline).join(stage)
}

/// The log of the stage's latest computed key.
pub fn stage_log(cache: &Path, pipeline: &str, stage: &str) -> String {
    let key = std::fs::read_to_string(cache.join("index").join(pipeline).join(stage))
        .expect("index entry");
    std::fs::read_to_string(cache.join("logs").join(format!("{}.log", key.trim())))
        .expect("stage log")
}

/// `dreampipe --device cpu sample --model models/tiny-sd ...` writing `out`.
pub fn sample(out: &Path, prompt: &str, seed: u64, scheduler: &str) {
    let output = Command::new(crate::dreampipe())
        .args(["--device", "cpu", "sample", "--model"])
        .arg(tiny_model())
        .args(["--prompt", prompt, "--seed", &seed.to_string()])
        .args(["--steps", "2", "--scheduler", scheduler])
        .args(["--width", "64", "--height", "64", "--out"])
        .arg(out)
        .output()
        .expect("run dreampipe sample");
    assert!(output.status.success(), "sample failed: {}", text(&output));
}

/// Decoded RGB pixels and size.
pub fn pixels(path: &Path) -> (u32, u32, Vec<u8>) {
    let image = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    (image.width(), image.height(), image.into_raw())
}

pub fn manifest(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path.join("manifest.json")).expect("manifest"))
        .expect("manifest JSON")
}

/// The largest difference between two images' 8-bit levels (`u8::MAX` when sizes differ).
pub fn max_level_difference(a: &Path, b: &Path) -> u8 {
    let (first, second) = (pixels(a), pixels(b));
    if (first.0, first.1) != (second.0, second.1) {
        return u8::MAX;
    }
    first
        .2
        .iter()
        .zip(&second.2)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// The stage's latest computed key (`cache/index/<pipeline>/<stage>`).
#[allow(dead_code)]
pub fn stage_key(cache: &Path, pipeline: &str, stage: &str) -> String {
    std::fs::read_to_string(cache.join("index").join(pipeline).join(stage))
        .expect("index entry")
        .trim()
        .to_string()
}
