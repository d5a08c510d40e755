//! VAE training against diffusers (tests/fixtures/vae/make_vae_goldens.py: the VAE step of
//! train_autoencoderkl.py without LPIPS and discriminator, on models/tiny-sd's VAE): losses and
//! grad norms rtol 1e-4, watched weights atol 1e-5 after two steps; and the `vae` stage from a
//! `toy_world` to a model folder whose VAE reconstructs better than the base's, with a fitted
//! scaling factor.
use crate::sd_support::{assert_mostly_within, read_golden};
use crate::stage_support::*;
use dreampipe::sd::train::vae::{VaeBatch, VaeTrainConfig, VaeTrainer};
use dreampipe::sd::vae::AutoencoderKL;
use dreampipe_kinds::sd::vae::ReconstructionLoss;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const RTOL: f64 = 1e-4;
const WEIGHT_ATOL: f64 = 1e-5;

fn golden_json() -> serde_json::Value {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/vae/vae_steps.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_rel(name: &str, found: f64, expected: f64) {
    let error = (found - expected).abs() / expected.abs();
    eprintln!("{name}: {found} vs {expected} (rel {error:e})");
    assert!(
        error <= RTOL,
        "{name}: {found} vs {expected} (rel {error:e})"
    );
}

fn two_steps(case: &str, rec_loss: ReconstructionLoss) {
    let dir = tempfile::tempdir().unwrap();
    let json = golden_json();
    let golden = read_golden("tests/fixtures/vae/vae_steps.safetensors");
    let expected = &json["cases"][case];
    let lr = json["lr"].as_f64().unwrap();
    let mut config = VaeTrainConfig::new(
        PathBuf::from(tiny_model()),
        dir.path().join("images"),
        dir.path().join("out"),
        dir.path().join("work"),
    );
    config.training.learning_rate = lr;
    config.rec_loss = rec_loss;
    config.kl_scale = expected["kl_scale"].as_f64().unwrap();
    let mut trainer = VaeTrainer::new(&config, 2).unwrap();
    for (step, record) in expected["steps"].as_array().unwrap().iter().enumerate() {
        let batch = VaeBatch {
            pixels: golden[&format!("step{step}.pixels")].shallow_clone(),
            noise: golden[&format!("step{step}.noise")].shallow_clone(),
        };
        let report = trainer.train_step(&[batch]).unwrap();
        let name = format!("{case} step {step}");
        assert_rel(
            &format!("{name} loss"),
            report.loss,
            record["loss"].as_f64().unwrap(),
        );
        let norm = report.grad_norm.expect("clipped");
        assert_rel(
            &format!("{name} grad norm"),
            norm,
            record["grad_norm"].as_f64().unwrap(),
        );
    }
    let variables = trainer.store().variables();
    for key in json["watched"].as_array().unwrap() {
        let key = key.as_str().unwrap();
        let name = format!("{case}.{key}");
        assert_mostly_within(&name, &variables[key], &golden[&name], WEIGHT_ATOL, lr);
    }
}

#[test]
fn two_l2_steps_match_diffusers() {
    two_steps("l2", ReconstructionLoss::L2);
}

#[test]
fn two_l1_steps_match_diffusers() {
    two_steps("l1", ReconstructionLoss::L1);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Mean squared reconstruction error of the first `count` world images through `vae` (mode).
fn reconstruction_error(vae: &AutoencoderKL, images: &Path, count: usize) -> f64 {
    let pixels: Vec<Tensor> = (0..count)
        .map(|index| {
            let path = images.join(format!("{index:04}.png"));
            let image = image::open(&path).expect("world image").to_rgb8();
            let data = Tensor::from_slice(image.as_raw()).to_kind(Kind::Float);
            (data.view([32, 32, 3]).permute([2, 0, 1]) / 127.5) - 1.0
        })
        .collect();
    let pixels = Tensor::stack(&pixels, 0);
    tch::no_grad(|| {
        let decoded = vae.decode(&vae.encode(&pixels).mode());
        (decoded - &pixels)
            .square()
            .mean(Kind::Float)
            .double_value(&[])
    })
}

/// A `vae` stage trains the tiny model's VAE on a toy world: the output is a complete model
/// folder whose VAE reconstructs the world far better than the base's, with the fitted
/// scaling factor; a second run is served from the cache; `gradient_checkpointing` is refused
/// at validate, naming the field.
#[test]
fn a_vae_stage_learns_a_toy_world() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = format!(
        "name: ae\nstages:\n  world:\n    kind: toy_world\n    count: 32\n    size: 32\n    subject_images: 1\n  ae:\n    kind: vae\n    model: {}\n    images: world\n    resolution: 32\n    train_batch_size: 4\n    max_train_steps: 25\n    learning_rate: 3.0e-3\n    fit_scaling_factor: true\n",
        tiny_model()
    );
    let cache = dir.path().join("cache");
    let file = write(dir.path(), "ae.yaml", &pipeline);
    run_ok(&cache, &file);
    let out = stage_output(&cache, "ae", "ae");
    for part in [
        "model_index.json",
        "unet",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "vae",
    ] {
        assert!(out.join(part).exists(), "{part} missing");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 25);
    let (_vs, trained) =
        AutoencoderKL::load(&out.join("vae"), Device::Cpu, Kind::Float, None).unwrap();
    let (_base_vs, base) = AutoencoderKL::load(
        &Path::new(&tiny_model()).join("vae"),
        Device::Cpu,
        Kind::Float,
        None,
    )
    .unwrap();
    let world = stage_output(&cache, "ae", "world").join("images");
    let (after, before) = (
        reconstruction_error(&trained, &world, 16),
        reconstruction_error(&base, &world, 16),
    );
    eprintln!("reconstruction MSE: base {before}, trained {after}");
    assert!(after < before / 2.0, "trained {after} vs base {before}");
    let factor = trained.scaling_factor();
    assert!(
        factor != base.scaling_factor() && factor > 0.0,
        "scaling factor {factor}"
    );
    assert!(text(&run_pipeline(&cache, &file)).contains("cached"));
    let bad = write(
        dir.path(),
        "bad.yaml",
        &pipeline.replace("fit_scaling_factor: true", "gradient_checkpointing: true"),
    );
    let output = run_pipeline(&cache, &bad);
    assert!(!output.status.success());
    assert!(
        text(&output).contains(
            "stage `ae`, field `gradient_checkpointing`: not supported for vae (the VAE is small next to a UNet); set it to false"
        ),
        "{}",
        text(&output)
    );
}
