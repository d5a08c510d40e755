//! Helpers for the SD model tests: repository paths, reading the diffusers goldens, and the
//! elementwise `|actual - expected| <= atol + rtol * |expected|` check the fixture README uses.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use tch::Tensor;

/// libtorch's global CPU generator is one per process, shared by every test of this binary:
/// writing a model folder seeds and draws from it, building a tch `nn::linear` draws from it, and
/// tests seed it (`tch::manual_seed`) to reproduce a draw. Whoever seeds or draws from it holds
/// this lock meanwhile.
static GLOBAL_RNG: Mutex<()> = Mutex::new(());

pub fn global_rng() -> MutexGuard<'static, ()> {
    GLOBAL_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `relative` under the repository root.
pub fn repo_path(relative: &str) -> PathBuf {
    crate::repo_root().join(relative)
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
/// (computed in float64 on the CPU, whatever the tensors' kind and device).
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(actual.size(), expected.size(), "{name}: shape");
    let actual = actual
        .to_kind(tch::Kind::Double)
        .to_device(tch::Device::Cpu);
    let expected = expected
        .to_kind(tch::Kind::Double)
        .to_device(tch::Device::Cpu);
    let difference = (&actual - &expected).abs();
    let allowed = expected.abs() * rtol + atol;
    let worst = (&difference - &allowed).max().double_value(&[]);
    let max_difference = difference.max().double_value(&[]);
    assert!(
        worst <= 0.0,
        "{name}: max |difference| {max_difference:e} exceeds atol {atol:e} + rtol {rtol:e}"
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

/// Distance in units in the last place between two floats of one format: 0 for equal values
/// (and for +0/-0), 1 for neighbours, growing across zero. `bits` are the IEEE-754 bit patterns
/// reinterpreted as signed integers.
fn ulp_distance(bits_a: i64, bits_b: i64, magnitude_mask: i64) -> u64 {
    let ordered = |bits: i64| {
        if bits < 0 {
            -(bits & magnitude_mask)
        } else {
            bits
        }
    };
    ordered(bits_a).abs_diff(ordered(bits_b))
}

/// The largest ULP distance between `actual` and `expected` (equal shapes; float32 compared as
/// float32, anything else as float64).
pub fn max_ulps(actual: &Tensor, expected: &Tensor) -> u64 {
    assert_eq!(actual.size(), expected.size(), "shape");
    let single = actual.kind() == tch::Kind::Float && expected.kind() == tch::Kind::Float;
    if single {
        let values = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32 values");
        let bits = |x: f32| i64::from(x.to_bits() as i32);
        let (a, b) = (values(actual), values(expected));
        let mask = i64::from(i32::MAX);
        (a.iter().zip(&b))
            .map(|(x, y)| ulp_distance(bits(*x), bits(*y), mask))
            .max()
            .unwrap_or(0)
    } else {
        let values = |t: &Tensor| {
            Vec::<f64>::try_from(t.flatten(0, -1).to_kind(tch::Kind::Double)).expect("f64 values")
        };
        let (a, b) = (values(actual), values(expected));
        (a.iter().zip(&b))
            .map(|(x, y)| ulp_distance(x.to_bits() as i64, y.to_bits() as i64, i64::MAX))
            .max()
            .unwrap_or(0)
    }
}

/// Largest `|actual - expected|`.
pub fn max_abs_difference(actual: &Tensor, expected: &Tensor) -> f64 {
    (actual.to_kind(tch::Kind::Double) - expected.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// With `DREAMPIPE_GOLDEN_REPORT` set, prints how far a golden comparison was (for measuring
/// the worst difference per CPU kernel set: `ATEN_CPU_CAPABILITY=default|avx2|avx512`).
pub fn report_golden_difference(name: &str, actual: &Tensor, expected: &Tensor) {
    if std::env::var_os("DREAMPIPE_GOLDEN_REPORT").is_some() {
        eprintln!(
            "golden-difference {name}: {} ulp, max |difference| {:e}",
            max_ulps(actual, expected),
            max_abs_difference(actual, expected)
        );
    }
}

/// Asserts `actual` is within `max` ULPs of `expected` everywhere: for goldens made on another
/// CPU, whose vectorized kernels may round differently. Not for values that cross or sit near
/// zero, where one rounding step is many ULPs (use an atol there).
pub fn assert_within_ulps(name: &str, actual: &Tensor, expected: &Tensor, max: u64) {
    report_golden_difference(name, actual, expected);
    let worst = max_ulps(actual, expected);
    assert!(
        worst <= max,
        "{name}: {worst} ULPs from the golden (allowed {max}); max |difference| {:e}",
        max_abs_difference(actual, expected)
    );
}

/// Initial noise drawn from torch's CPU generator with a seed: the uniform draws are the same
/// everywhere, but the Box-Muller transform runs through vectorized log/sin/cos kernels that
/// round differently per CPU kernel set, so values near zero differ by thousands of ULPs while
/// the absolute difference stays tiny. Measured against the goldens on an Intel Xeon (AVX-512):
/// 0 with ATen's `avx512` and `avx2` kernels, 1.31e-6 (8,035 ULPs) with `default`.
pub const NOISE_ATOL: f64 = 4e-6;
pub const NOISE_RTOL: f64 = 1e-6;

/// Asserts seeded noise (or noise times `scale`, e.g. a scheduler's `init_noise_sigma`) equals
/// the golden's up to [`NOISE_ATOL`]·scale + [`NOISE_RTOL`]·|golden|.
pub fn assert_noise_close(name: &str, actual: &Tensor, expected: &Tensor, scale: f64) {
    report_golden_difference(name, actual, expected);
    let (actual, expected) = (
        actual.to_kind(tch::Kind::Double),
        expected.to_kind(tch::Kind::Double),
    );
    assert_close(name, &actual, &expected, NOISE_ATOL * scale, NOISE_RTOL);
}

/// AdamW's first steps move a weight by about `lr · g / (|g| + eps)`: where a gradient is near
/// zero that quotient is ill-conditioned, and float32 summation-order noise (another kernel set,
/// another backward order) changes the step by up to ~lr (the DreamBooth golden test explains
/// it). So: every element within `atol`, but for at most one in 10,000 (and at least one), which
/// must stay within 2·lr.
pub fn assert_mostly_within(name: &str, found: &Tensor, expected: &Tensor, atol: f64, lr: f64) {
    let difference = (found - expected).abs();
    let worst = difference.max().double_value(&[]);
    let outside = difference.gt(atol).sum(tch::Kind::Int64).int64_value(&[]);
    let allowed = ((difference.numel() as f64) * 1e-4).ceil().max(1.0) as i64;
    eprintln!("{name}: worst {worst:e}, {outside} elements beyond {atol:e}");
    assert!(
        outside <= allowed && worst <= 2.0 * lr,
        "{name}: {outside} elements beyond {atol} (allowed {allowed}), worst {worst}"
    );
}
