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
