//! Helpers for the SD model tests: repository paths, reading the diffusers goldens, and the
//! elementwise `|actual - expected| <= atol + rtol * |expected|` check the fixture README uses.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// `relative` under the repository root.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Every tensor of the safetensors file at `relative` (under the repository root), by name.
pub fn read_golden(relative: &str) -> HashMap<String, Tensor> {
    let file = repo_path(relative);
    Tensor::read_safetensors(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .into_iter()
        .collect()
}

/// Asserts equal shapes and `|actual - expected| <= atol + rtol * |expected|` everywhere
/// (computed in the tensors' own kind).
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(actual.size(), expected.size(), "{name}: shape");
    let difference = (actual - expected).abs();
    let allowed = expected.abs() * rtol + atol;
    let worst = (&difference - &allowed).max().double_value(&[]);
    let max_difference = difference.max().double_value(&[]);
    assert!(
        worst <= 0.0,
        "{name}: max |difference| {max_difference:e} exceeds atol {atol} + rtol {rtol}"
    );
}

/// Copies the model component folder at `relative` (`config.json` and
/// `diffusion_pytorch_model.safetensors`) to a temp dir, passing the config text through `edit`.
pub fn copied_component(relative: &str, edit_config: impl Fn(&str) -> String) -> tempfile::TempDir {
    let source = repo_path(relative);
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(source.join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), edit_config(&config)).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(source.join(weights), dir.path().join(weights)).unwrap();
    dir
}
