//! The real `dreampipe sample` binary: its PNG equals diffusers' fixture image and carries the
//! A1111 parameters text; batches; the error lines and exit codes for bad input.
use dreampipe::sd::png::read_parameters_text;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// pipeline.json's request: prompt, seed and (with --steps 4 --scheduler ddim) the DDIM run.
const PROMPT: &str = "a photo of sks dog in a bucket";
/// PNG pixels may differ by one 8-bit level (fixture README: images atol 2e-3 before rounding).
const PNG_LEVELS: i32 = 1;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs `dreampipe --device cpu sample --model models/tiny-sd --prompt PROMPT --seed 1234
/// --steps 4 --scheduler ddim --out OUT EXTRA...` from the repository root.
fn sample(out: &Path, extra: &[&str]) -> Output {
    Command::new(crate::dreampipe())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "--device",
            "cpu",
            "sample",
            "--model",
            "models/tiny-sd",
            "--prompt",
            PROMPT,
        ])
        .args([
            "--seed",
            "1234",
            "--steps",
            "4",
            "--scheduler",
            "ddim",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .expect("the dreampipe binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The A1111 model hash sample writes: the first 10 hex digits of blake3(unet weights).
fn tiny_model_hash() -> String {
    let weights = std::fs::read(repo_path(
        "models/tiny-sd/unet/diffusion_pytorch_model.safetensors",
    ))
    .unwrap();
    blake3::hash(&weights).to_hex()[..10].to_string()
}

fn max_level_difference(a: &Path, b: &Path) -> i32 {
    let a = image::open(a).unwrap().to_rgb8();
    let b = image::open(b).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (i32::from(*x) - i32::from(*y)).abs())
        .max()
        .unwrap_or(0)
}

#[test]
fn sample_writes_the_diffusers_image_with_its_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let output = sample(&out, &[]);
    assert!(
        output.status.success(),
        "sample failed: {}",
        stderr(&output)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{}\n", out.display())
    );
    let golden = repo_path("tests/fixtures/sd-tiny/pipeline/ddim.png");
    let worst = max_level_difference(&out, &golden);
    assert!(
        worst <= PNG_LEVELS,
        "PNG differs from diffusers' by {worst} levels"
    );
    let expected = format!(
        "{PROMPT}\nSteps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 64x64, Model hash: {}, Model: tiny-sd",
        tiny_model_hash()
    );
    assert_eq!(
        read_parameters_text(&out).unwrap().as_deref(),
        Some(expected.as_str())
    );
}

/// diffusers with two images per prompt draws one randn of shape [2, 4, 32, 32]; image 0's
/// noise is then the single-image noise, so x-0.png is the fixture image and x-1.png is new.
#[test]
fn batch_of_two_writes_numbered_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let output = sample(
        &out,
        &["--batch", "2", "--negative-prompt", "blurry, low quality"],
    );
    assert!(
        output.status.success(),
        "sample failed: {}",
        stderr(&output)
    );
    let (first, second) = (dir.path().join("x-0.png"), dir.path().join("x-1.png"));
    let stdout = format!("{}\n{}\n", first.display(), second.display());
    assert_eq!(String::from_utf8_lossy(&output.stdout), stdout);
    assert!(!out.exists(), "a batch writes only numbered files");
    assert!(
        max_level_difference(&first, &second) > 16,
        "the two images must differ"
    );
    for (index, path) in [&first, &second].into_iter().enumerate() {
        let expected = format!(
            "{PROMPT}\nNegative prompt: blurry, low quality\nSteps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, \
             Size: 64x64, Model hash: {}, Model: tiny-sd, Batch size: 2, Batch pos: {index}",
            tiny_model_hash()
        );
        assert_eq!(
            read_parameters_text(path).unwrap().as_deref(),
            Some(expected.as_str())
        );
    }
}

#[test]
fn batch_image_zero_equals_the_single_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let output = sample(&out, &["--batch", "2"]);
    assert!(
        output.status.success(),
        "sample failed: {}",
        stderr(&output)
    );
    let golden = repo_path("tests/fixtures/sd-tiny/pipeline/ddim.png");
    let worst = max_level_difference(&dir.path().join("x-0.png"), &golden);
    assert!(
        worst <= PNG_LEVELS,
        "x-0.png differs from the single-image run by {worst} levels"
    );
}

#[test]
fn width_that_is_not_a_multiple_of_the_vae_factor_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let output = sample(&out, &["--width", "63"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "error: width 63: must be a positive multiple of 2 (the VAE scale factor of this model)\n"
    );
    assert!(!out.exists());
}

#[test]
fn missing_model_folder_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let output = Command::new(crate::dreampipe())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "--device",
            "cpu",
            "sample",
            "--model",
            "models/no-such-model",
            "--prompt",
            "a dog",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "error: models/no-such-model: model folder not found (pass a diffusers folder with model_index.json)\n"
    );
}
