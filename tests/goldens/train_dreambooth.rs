//! DreamBooth against the diffusers goldens (tests/fixtures/sd-tiny/training, README
//! "DreamBooth": loss rtol 1e-4, updated weights atol 1e-5), driven through the real
//! `DreamBoothTrainer::train_step`; plus whole runs on synthetic images: output folder loads and
//! samples, resume equals an uninterrupted run, a NaN loss stops with the last checkpoint.
use dreampipe::sd::pipeline::{StableDiffusion, Txt2Img};
use dreampipe::sd::train::TrainError;
use dreampipe::sd::train::common::{Callbacks, Progress, StepBatch};
use dreampipe::sd::train::dreambooth::{self, DreamBoothConfig, DreamBoothTrainer};
use dreampipe::sd::train::lr_schedule::LrScheduler;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

const MODEL: &str = "models/tiny-sd";
const FIXTURES: &str = "tests/fixtures/sd-tiny/training";
/// Fixture README tolerances for training.
const LOSS_RTOL: f64 = 1e-4;
const WEIGHT_ATOL: f64 = 1e-5;

fn tensors(file: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(file)
        .expect("safetensors readable")
        .into_iter()
        .collect()
}

fn fixture_json() -> serde_json::Value {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("dreambooth.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_rel(name: &str, found: f64, expected: f64, rtol: f64) {
    let error = (found - expected).abs() / expected.abs();
    assert!(
        error <= rtol,
        "{name}: found {found}, expected {expected} (rel error {error:e})"
    );
}

/// The DreamBooth golden's batch, latents and noise in `kind` (bf16 as under mixed precision).
fn fixture_batch(golden: &HashMap<String, Tensor>, kind: Kind) -> StepBatch {
    StepBatch {
        latents: golden["latents"].to_kind(kind),
        noise: golden["noise"].to_kind(kind),
        timesteps: golden["timesteps"].shallow_clone(),
        input_ids: golden["input_ids"].shallow_clone(),
        xl: None,
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[0])
}

/// The fixture's setup: prior preservation, text encoder trained, lr 1e-3, constant schedule.
fn golden_config(dir: &Path) -> DreamBoothConfig {
    let mut config = DreamBoothConfig::new(
        PathBuf::from(MODEL),
        dir.join("instance"),
        "a photo of sks dog",
        dir.join("out"),
        dir.join("work"),
    );
    config.dreambooth.with_prior_preservation = true;
    config.class_data_dir = Some(dir.join("class"));
    config.dreambooth.class_prompt = Some("a photo of dog".to_string());
    config.dreambooth.train_text_encoder = true;
    config.training.learning_rate = 1e-3;
    config
}

/// AdamW's epsilon in the fixture run.
const ADAM_EPS: f64 = 1e-8;
/// A first AdamW step moves a weight by `lr * g / (|g| + eps)`. Where the clipped gradient is
/// within 10x eps of zero that quotient is ill-conditioned: float32 summation-order noise in
/// the gradient (~1e-9 absolute) changes the step by a few % of lr, more than the atol. Such
/// elements are checked against `lr` instead of the atol.
const ILL_CONDITIONED_GRAD: f64 = 10.0 * ADAM_EPS;
/// At most this fraction of the elements may be ill-conditioned exceptions.
const MAX_EXCEPTION_FRACTION: f64 = 1e-4;

fn snapshot_grads(variables: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    variables
        .iter()
        .map(|(name, t)| (name.clone(), t.grad().detach().copy()))
        .collect()
}

/// Compares every tensor of a golden state dict with the trainer's variables: atol 1e-5, except
/// elements whose clipped gradient is ill-conditioned (see ILL_CONDITIONED_GRAD), which must
/// still be within `lr`. Returns (elements, exceptions).
fn assert_state_matches(
    file: &str,
    variables: &HashMap<String, Tensor>,
    grads: &HashMap<String, Tensor>,
    clip_coef: f64,
    lr: f64,
) -> (i64, i64) {
    let expected = tensors(&Path::new(FIXTURES).join(file));
    assert_eq!(expected.len(), variables.len(), "{file}: tensor count");
    let (mut elements, mut exceptions) = (0, 0);
    for (name, golden) in &expected {
        let found = variables
            .get(name)
            .unwrap_or_else(|| panic!("{file}: no variable {name}"));
        let diff = (found - golden).abs();
        let beyond = diff.gt(WEIGHT_ATOL);
        let clipped_grad = grads[name].abs() * clip_coef;
        let unexplained = beyond.logical_and(&clipped_grad.ge(ILL_CONDITIONED_GRAD));
        assert_eq!(
            unexplained.sum(Kind::Int64).int64_value(&[]),
            0,
            "{file}: {name} differs by up to {:e} where the gradient is well-conditioned",
            diff.max().double_value(&[])
        );
        assert!(
            diff.max().double_value(&[]) <= lr,
            "{file}: {name} moved by more than lr"
        );
        elements += diff.numel() as i64;
        exceptions += beyond.sum(Kind::Int64).int64_value(&[]);
    }
    (elements, exceptions)
}

#[test]
fn two_steps_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let golden = tensors(&Path::new(FIXTURES).join("dreambooth.safetensors"));
    let json = fixture_json();
    let mut trainer = DreamBoothTrainer::new(&golden_config(dir.path()), 2).unwrap();
    // The prompts tokenise to the fixture's ids.
    let ids = Tensor::cat(
        &[
            trainer.tokenize("a photo of sks dog").repeat([2, 1]),
            trainer.tokenize("a photo of dog").repeat([2, 1]),
        ],
        0,
    );
    assert!(ids.equal(&golden["input_ids"]));
    // The VAE posterior of the stored pixels (what the loop samples latents from).
    let posterior = trainer.vae().encode(&golden["pixel_values"]);
    assert!(
        posterior
            .mean
            .allclose(&golden["latent_mean"], 1e-4, 1e-4, false)
    );
    assert!(
        posterior
            .std
            .allclose(&golden["latent_std"], 1e-4, 1e-4, false)
    );
    let batch = || fixture_batch(&golden, Kind::Float);
    let steps = json["steps"].as_array().unwrap();
    let lr = json["hyper"]["lr"].as_f64().unwrap();

    let loss1 = trainer.accumulate_gradients(&[batch()]).unwrap();
    assert_rel(
        "loss_step1",
        loss1,
        scalar(&golden["loss_step1"]),
        LOSS_RTOL,
    );
    let unet = trainer.unet_store().variables();
    let text = trainer.text_encoder_store().variables();
    let (unet_grads, text_grads) = (snapshot_grads(&unet), snapshot_grads(&text));
    assert!(unet_grads["conv_out.weight"].allclose(
        &golden["grad.unet.conv_out.weight"],
        1e-4,
        1e-6,
        false
    ));
    assert!(
        text_grads["text_model.embeddings.token_embedding.weight"].allclose(
            &golden["grad.text_encoder.token_embedding"],
            1e-4,
            1e-6,
            false
        )
    );
    let norm1 = trainer.apply_gradients(lr).expect("step");
    let expected_norm1 = steps[0]["grad_total_norm_before_clip"].as_f64().unwrap();
    assert_rel("grad norm step 1", norm1, expected_norm1, LOSS_RTOL);
    let coef = steps[0]["clip_coef"].as_f64().unwrap();
    let (n1, e1) = assert_state_matches(
        "dreambooth_unet_after_step1.safetensors",
        &unet,
        &unet_grads,
        coef,
        lr,
    );
    let (n2, e2) = assert_state_matches(
        "dreambooth_text_encoder_after_step1.safetensors",
        &text,
        &text_grads,
        coef,
        lr,
    );
    println!(
        "{} of {} updated elements beyond atol (ill-conditioned)",
        e1 + e2,
        n1 + n2
    );
    let fraction = (e1 + e2) as f64 / (n1 + n2) as f64;
    assert!(
        fraction <= MAX_EXCEPTION_FRACTION,
        "{} of {} elements beyond atol",
        e1 + e2,
        n1 + n2
    );

    let second = trainer.train_step(&[batch()]).unwrap();
    assert_rel(
        "loss_step2",
        second.loss,
        scalar(&golden["loss_step2"]),
        LOSS_RTOL,
    );
    let norm2 = steps[1]["grad_total_norm_before_clip"].as_f64().unwrap();
    assert_rel(
        "grad norm step 2",
        second.grad_norm.unwrap(),
        norm2,
        LOSS_RTOL,
    );
    let after = trainer.batch_loss(&batch()).unwrap().double_value(&[]);
    assert_rel(
        "loss_after_step2",
        after,
        scalar(&golden["loss_after_step2"]),
        LOSS_RTOL,
    );
}

/// Writes `count` smooth synthetic RGB images of `width x height` into `dir`.
fn write_images(dir: &Path, count: u32, width: u32, height: u32, tint: u8) {
    std::fs::create_dir_all(dir).unwrap();
    for index in 0..count {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([
                (x * 255 / width) as u8,
                (y * 255 / height) as u8,
                tint.wrapping_add((index * 60) as u8),
            ])
        });
        image.save(dir.join(format!("img{index}.png"))).unwrap();
    }
}

/// A tiny run: resolution 64, batch 1, prior preservation, text encoder trained.
fn tiny_run_config(data: &Path, out: &Path, steps: u64) -> DreamBoothConfig {
    let mut config = DreamBoothConfig::new(
        PathBuf::from(MODEL),
        data.join("instance"),
        "a photo of sks dog",
        out.join("model"),
        out.join("work"),
    );
    config.dreambooth.with_prior_preservation = true;
    config.class_data_dir = Some(data.join("class"));
    config.dreambooth.class_prompt = Some("a photo of dog".to_string());
    config.dreambooth.train_text_encoder = true;
    config.training.resolution = 64;
    config.training.train_batch_size = 1;
    config.training.max_train_steps = Some(steps);
    config.training.learning_rate = 1e-4;
    config.unet.random_flip = true;
    config.training.lr_scheduler = LrScheduler::Linear;
    config.training.lr_warmup_steps = 2;
    config
}

fn synthetic_data() -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    write_images(&data.path().join("instance"), 3, 80, 64, 10);
    write_images(&data.path().join("class"), 2, 64, 72, 200);
    data
}

fn run(
    config: &DreamBoothConfig,
    cancel: &AtomicBool,
    cancel_at: Option<u64>,
) -> Result<Vec<Progress>, TrainError> {
    let mut seen = Vec::new();
    let mut on_progress = |p: &Progress| {
        seen.push(*p);
        if Some(p.step) == cancel_at {
            cancel.store(true, Ordering::Relaxed);
        }
    };
    let mut callbacks = Callbacks {
        on_progress: &mut on_progress,
        cancel,
        validation: None,
        snapshots: None,
    };
    dreambooth::train(config, &mut callbacks)?;
    Ok(seen)
}

#[test]
fn a_run_writes_a_loadable_model_and_metrics() {
    let data = synthetic_data();
    let out = tempfile::tempdir().unwrap();
    let config = tiny_run_config(data.path(), out.path(), 4);
    let progress = run(&config, &AtomicBool::new(false), None).unwrap();
    assert_eq!(
        progress.iter().map(|p| p.step).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    // linear schedule, warmup 2 of 4 steps: lr * [0, 0.5, 1, 0.5]
    let lrs: Vec<f64> = progress.iter().map(|p| p.lr).collect();
    assert_eq!(lrs, [0.0, 0.5e-4, 1e-4, 0.5e-4]);
    let metrics = std::fs::read_to_string(config.output_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (line, p) in lines.iter().zip(&progress) {
        assert_eq!(line["step"].as_u64(), Some(p.step));
        assert_eq!(line["loss"].as_f64(), Some(p.loss));
        assert_eq!(line["grad_norm"].as_f64(), p.grad_norm);
    }
    let model = StableDiffusion::load(&config.output_dir, Device::Cpu, Kind::Float).unwrap();
    let request = Txt2Img {
        prompt: "a photo of sks dog".to_string(),
        negative_prompt: String::new(),
        seed: 1,
        steps: 2,
        guidance: 7.5,
        scheduler: None,
        width: Some(64),
        height: Some(64),
        batch: 1,
    };
    let result = model.txt2img(&request, &mut |_| {}).unwrap();
    assert_eq!(result.images.size(), [1, 3, 64, 64]);
    assert!(bool::try_from(result.images.isfinite().all()).unwrap());
    // The UNet and text encoder changed; the VAE is the base's.
    let base_unet = tensors(Path::new(
        "models/tiny-sd/unet/diffusion_pytorch_model.safetensors",
    ));
    let new_unet = tensors(
        &config
            .output_dir
            .join("unet/diffusion_pytorch_model.safetensors"),
    );
    let changed = new_unet
        .iter()
        .filter(|(name, t)| !t.equal(&base_unet[*name]))
        .count();
    assert!(
        changed > new_unet.len() / 2,
        "only {changed} UNet tensors changed"
    );
    let te = tensors(&config.output_dir.join("text_encoder/model.safetensors"));
    assert!(te.contains_key("text_model.embeddings.token_embedding.weight"));
    let vae_base = std::fs::read("models/tiny-sd/vae/diffusion_pytorch_model.safetensors").unwrap();
    let vae_new = std::fs::read(
        config
            .output_dir
            .join("vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert_eq!(vae_base, vae_new);
}

#[test]
fn resuming_after_a_crash_gives_the_uninterrupted_weights() {
    let data = synthetic_data();
    let straight_dir = tempfile::tempdir().unwrap();
    let mut straight = tiny_run_config(data.path(), straight_dir.path(), 6);
    straight.training.checkpointing_steps = 3;
    let straight_progress = run(&straight, &AtomicBool::new(false), None).unwrap();

    let resumed_dir = tempfile::tempdir().unwrap();
    let mut resumed = tiny_run_config(data.path(), resumed_dir.path(), 6);
    resumed.training.checkpointing_steps = 3;
    resumed.resume_from_checkpoint = true;
    let cancel = AtomicBool::new(false);
    let error = run(&resumed, &cancel, Some(3)).unwrap_err();
    let checkpoint = resumed.work_dir.join("checkpoint-3");
    assert_eq!(
        error.to_string(),
        format!(
            "training cancelled at step 3; progress is saved in {}: run again with resume to continue",
            checkpoint.display()
        )
    );
    assert!(!resumed.output_dir.join("unet").exists());
    let after_resume = run(&resumed, &AtomicBool::new(false), None).unwrap();
    assert_eq!(
        after_resume.iter().map(|p| p.step).collect::<Vec<_>>(),
        [4, 5, 6]
    );
    for (a, b) in straight_progress[3..].iter().zip(&after_resume) {
        assert_eq!(a.loss, b.loss, "loss at step {}", a.step);
    }
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let expected = tensors(&straight.output_dir.join(file));
        let found = tensors(&resumed.output_dir.join(file));
        for (name, t) in &expected {
            let diff = (t - &found[name]).abs().max().double_value(&[]);
            assert!(diff <= 1e-6, "{file}: {name} differs by {diff:e}");
        }
    }
    let metrics = std::fs::read_to_string(resumed.output_dir.join("metrics.jsonl")).unwrap();
    let straight_metrics =
        std::fs::read_to_string(straight.output_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics, straight_metrics);
}

#[test]
fn a_non_finite_loss_stops_and_names_the_last_checkpoint() {
    let data = synthetic_data();
    let out = tempfile::tempdir().unwrap();
    let mut config = tiny_run_config(data.path(), out.path(), 4);
    config.training.learning_rate = 1e30;
    config.training.lr_scheduler = LrScheduler::Constant;
    config.training.checkpointing_steps = 1;
    let error = run(&config, &AtomicBool::new(false), None).unwrap_err();
    let checkpoint = config.work_dir.join("checkpoint-1");
    match &error {
        TrainError::NonFiniteLoss {
            step,
            checkpoint: Some(dir),
            ..
        } => {
            assert_eq!(*step, 2);
            assert_eq!(dir, &checkpoint);
        }
        other => panic!("expected a non-finite loss error, got: {other}"),
    }
    let message = error.to_string();
    assert!(message.starts_with("step 2: the loss is "), "{message}");
    assert!(
        message.ends_with(&format!(
            "(not finite); training stopped. The last good checkpoint is {}; lower learning_rate (or check the data) and resume from it",
            checkpoint.display()
        )),
        "{message}"
    );
    assert!(checkpoint.join("state.json").is_file());
    assert!(!config.output_dir.join("unet").exists());
}

/// Gradient checkpointing sums the same gradients in another order: float32 rounding over a
/// few steps of AdamW (measured ≤ 1e-6 on the tiny model; 1e-5 leaves room).
const CHECKPOINTING_TOLERANCE: f64 = 1e-5;

#[test]
fn gradient_checkpointing_trains_to_the_same_weights() {
    let data = synthetic_data();
    let (plain_out, checkpointed_out) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plain = tiny_run_config(data.path(), plain_out.path(), 3);
    let mut checkpointed = tiny_run_config(data.path(), checkpointed_out.path(), 3);
    checkpointed.training.gradient_checkpointing = true;
    let plain_progress = run(&plain, &AtomicBool::new(false), None).unwrap();
    let checkpointed_progress = run(&checkpointed, &AtomicBool::new(false), None).unwrap();
    for (a, b) in plain_progress.iter().zip(&checkpointed_progress) {
        assert!(
            (a.loss - b.loss).abs() <= CHECKPOINTING_TOLERANCE,
            "{a:?} vs {b:?}"
        );
        let (ga, gb) = (a.grad_norm.unwrap(), b.grad_norm.unwrap());
        assert!(
            (ga - gb).abs() <= CHECKPOINTING_TOLERANCE * ga.max(1.0),
            "{a:?} vs {b:?}"
        );
    }
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let a = tensors(&plain.output_dir.join(file));
        let b = tensors(&checkpointed.output_dir.join(file));
        assert_eq!(a.len(), b.len());
        for (name, tensor) in &a {
            let difference = (tensor - &b[name]).abs().max().double_value(&[]);
            assert!(
                difference <= CHECKPOINTING_TOLERANCE,
                "{file} {name}: {difference}"
            );
        }
    }
}

#[test]
fn unsupported_options_are_rejected_with_the_option_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config(dir.path());
    config.dreambooth.class_prompt = None;
    let error = DreamBoothTrainer::new(&config, 1).err().unwrap();
    assert_eq!(
        error.to_string(),
        "training option 'class_prompt': required with with_prior_preservation"
    );
}

/// User + system CPU seconds of this process (/proc/self/stat fields 14 and 15, in clock
/// ticks of 1/100 s on Linux).
fn cpu_seconds() -> f64 {
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / TICKS_PER_SECOND
}

/// Wall and CPU seconds per step and peak RSS of a tiny CPU run (resolution 64, batch 1, prior
/// preservation). Not a timed test: run with `--ignored --nocapture`, one at a time.
fn benchmark(train_text_encoder: bool) {
    const STEPS: u64 = 10;
    const WARMUP: usize = 2;
    let data = synthetic_data();
    let out = tempfile::tempdir().unwrap();
    let mut config = tiny_run_config(data.path(), out.path(), STEPS);
    config.dreambooth.train_text_encoder = train_text_encoder;
    config.unet.random_flip = false;
    config.training.center_crop = true;
    let mut marks = Vec::new();
    let mut on_progress = |_: &Progress| marks.push((std::time::Instant::now(), cpu_seconds()));
    let cancel = AtomicBool::new(false);
    let mut callbacks = Callbacks {
        on_progress: &mut on_progress,
        cancel: &cancel,
        validation: None,
        snapshots: None,
    };
    dreambooth::train(&config, &mut callbacks).unwrap();
    let (first, last) = (marks[WARMUP - 1], marks[marks.len() - 1]);
    let steps = (marks.len() - WARMUP) as f64;
    let wall = last.0.duration_since(first.0).as_secs_f64() / steps;
    let cpu = (last.1 - first.1) / steps;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?");
    println!(
        "dreambooth tiny cpu train_text_encoder={train_text_encoder}: {wall:.3} s/step wall, {cpu:.3} CPU-s/step (steps {}-{STEPS}), {peak}",
        WARMUP + 1
    );
}

#[test]
#[ignore = "benchmark: run alone with --ignored --nocapture"]
fn benchmark_unet_only() {
    benchmark(false);
}

#[test]
#[ignore = "benchmark: run alone with --ignored --nocapture"]
fn benchmark_with_text_encoder() {
    benchmark(true);
}

#[test]
fn min_snr_weighting_scales_each_sample_by_min_snr_gamma_over_snr() {
    use dreampipe::sd::schedulers::{DdpmScheduler, SchedulerConfig};
    use dreampipe::sd::train::loss::compute_snr;
    let dir = tempfile::tempdir().unwrap();
    let golden = tensors(&Path::new(FIXTURES).join("dreambooth.safetensors"));
    let batch = |start: i64, len: i64| StepBatch {
        latents: golden["latents"].narrow(0, start, len),
        noise: golden["noise"].narrow(0, start, len),
        timesteps: golden["timesteps"].narrow(0, start, len),
        input_ids: golden["input_ids"].narrow(0, start, len),
        xl: None,
    };
    let mut plain_config = golden_config(dir.path());
    plain_config.dreambooth.with_prior_preservation = false;
    let plain = DreamBoothTrainer::new(&plain_config, 1).unwrap();
    let gamma = 5.0;
    let mut snr_config = plain_config.clone();
    snr_config.unet.snr_gamma = Some(gamma);
    let weighted = DreamBoothTrainer::new(&snr_config, 1).unwrap();
    let scheduler_config =
        SchedulerConfig::from_file(Path::new("models/tiny-sd/scheduler/scheduler_config.json"))
            .unwrap();
    let scheduler = DdpmScheduler::new(&scheduler_config).unwrap();
    let snr = compute_snr(
        scheduler.alphas_cumprod(),
        &golden["timesteps"].narrow(0, 0, 2),
    )
    .unwrap();
    let mut expected = 0.0;
    for i in 0..2 {
        let mse = plain.batch_loss(&batch(i, 1)).unwrap().double_value(&[]);
        let s = snr.double_value(&[i]);
        expected += s.min(gamma) / s * mse / 2.0;
    }
    let found = weighted.batch_loss(&batch(0, 2)).unwrap().double_value(&[]);
    assert_rel("min-SNR loss", found, expected, 1e-5);
    // gamma above every SNR: weights are 1, the plain loss.
    let mut huge = plain_config.clone();
    huge.unet.snr_gamma = Some(1e12);
    let unweighted = DreamBoothTrainer::new(&huge, 1).unwrap();
    let a = unweighted
        .batch_loss(&batch(0, 2))
        .unwrap()
        .double_value(&[]);
    let b = plain.batch_loss(&batch(0, 2)).unwrap().double_value(&[]);
    assert_rel("gamma above all SNRs", a, b, 1e-6);
}

#[test]
fn bf16_frozen_modules_8bit_adam_accumulation_offset_noise_and_cached_latents_run() {
    let data = synthetic_data();
    let out = tempfile::tempdir().unwrap();
    let mut config = tiny_run_config(data.path(), out.path(), 2);
    config.dreambooth.train_text_encoder = false;
    config.training.mixed_precision = dreampipe::sd::train::common::MixedPrecision::Bf16;
    config.training.optimizer = dreampipe::sd::train::common::OptimizerKind::AdamW8bit;
    config.training.gradient_accumulation_steps = 2;
    config.dreambooth.offset_noise = true;
    config.unet.snr_gamma = Some(5.0);
    config.training.lr_scheduler = LrScheduler::Constant;
    // No random augmentation: the VAE moments are cached once.
    config.unet.random_flip = false;
    config.training.center_crop = true;
    let progress = run(&config, &AtomicBool::new(false), None).unwrap();
    assert_eq!(progress.len(), 2);
    assert!(
        progress
            .iter()
            .all(|p| p.loss.is_finite() && p.grad_norm.unwrap().is_finite())
    );
    // The frozen text encoder is copied from the base, the UNet is new (float32).
    let base_te = std::fs::read("models/tiny-sd/text_encoder/model.safetensors").unwrap();
    let new_te = std::fs::read(config.output_dir.join("text_encoder/model.safetensors")).unwrap();
    assert_eq!(base_te, new_te);
    let unet = tensors(
        &config
            .output_dir
            .join("unet/diffusion_pytorch_model.safetensors"),
    );
    assert!(unet.values().all(|t| t.kind() == Kind::Float));
    StableDiffusion::load(&config.output_dir, Device::Cpu, Kind::Float).unwrap();
}

/// The bf16 mixed-precision goldens (tests/fixtures/train/make_mixed_precision_goldens.py).
const MIXED_PRECISION_FIXTURES: &str = "tests/fixtures/train/mixed_precision";

fn mixed_precision_goldens() -> (HashMap<String, Tensor>, serde_json::Value) {
    let json = std::fs::read_to_string(format!("{MIXED_PRECISION_FIXTURES}.json")).unwrap();
    let tensors = tensors(Path::new(&format!(
        "{MIXED_PRECISION_FIXTURES}.safetensors"
    )));
    (tensors, serde_json::from_str(&json).unwrap())
}

/// `‖found − expected‖ / ‖expected‖`.
fn relative_l2(found: &Tensor, expected: &Tensor) -> f64 {
    let found = found.to_kind(Kind::Double);
    let expected = expected.to_kind(Kind::Double);
    (&found - &expected).norm().double_value(&[]) / expected.norm().double_value(&[])
}

/// bf16 keeps 8 significant bits. On the machine that made the golden (Intel Xeon, ATen's
/// avx512 kernels) the step is bit-identical to diffusers up to the loss (same libtorch ops
/// under the same autocast policy): loss and gradients equal, updates 8e-7 (relative L2), the
/// loss after the step 5e-5. With ATen's `default` / `avx2` kernels the bf16 roundings differ:
/// loss 9e-5, gradients up to 7.3e-3 (relative L2), and a first AdamW step, which moves each
/// weight by ±lr from the gradient's sign, flips for gradients near zero: updates up to 5.9e-2
/// (relative L2; a missing or wrong step is 1 or more).
const BF16_LOSS_RTOL: f64 = 1e-3;
const BF16_GRAD_RTOL: f64 = 2e-2;
const BF16_UPDATE_RTOL: f64 = 0.2;

/// diffusers' train_dreambooth.py with `--mixed_precision bf16`: the trained UNet and text
/// encoder keep float32 weights and run under CPU autocast; latents and noise are bf16.
#[test]
fn a_bf16_autocast_step_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, json) = mixed_precision_goldens();
    let inputs = tensors(&Path::new(FIXTURES).join("dreambooth.safetensors"));
    let mut config = golden_config(dir.path());
    config.training.mixed_precision = dreampipe::sd::train::common::MixedPrecision::Bf16;
    let mut trainer = DreamBoothTrainer::new(&config, 2).unwrap();
    let batch = || fixture_batch(&inputs, Kind::BFloat16);
    let loss = trainer.accumulate_gradients(&[batch()]).unwrap();
    report_and_assert_rel(
        "bf16 loss",
        loss,
        scalar(&golden["db.loss_step1"]),
        BF16_LOSS_RTOL,
    );
    let unet = trainer.unet_store().variables();
    let text = trainer.text_encoder_store().variables();
    let to_q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    for (name, found) in [
        ("unet.conv_out.weight", unet["conv_out.weight"].grad()),
        (&format!("unet.{to_q}"), unet[to_q].grad()),
        (
            "text_encoder.token_embedding",
            text["text_model.embeddings.token_embedding.weight"].grad(),
        ),
    ] {
        let error = relative_l2(&found, &golden[&format!("db.grad.{name}")]);
        println!("bf16 grad {name}: relative L2 {error:e}");
        assert!(
            error <= BF16_GRAD_RTOL,
            "grad {name}: relative L2 {error:e}"
        );
    }
    let before: Vec<Tensor> = [&unet["conv_out.weight"], &unet[to_q]]
        .map(|t| t.detach().copy())
        .into();
    let norm = trainer
        .apply_gradients(json["dreambooth"]["lr"].as_f64().unwrap())
        .unwrap();
    let expected_norm = json["dreambooth"]["grad_norm_before_clip"]
        .as_f64()
        .unwrap();
    report_and_assert_rel("bf16 grad norm", norm, expected_norm, BF16_GRAD_RTOL);
    // The update itself (after − before), not the weights: a missing or wrong step shows.
    for (name, before) in ["conv_out.weight", to_q].iter().zip(&before) {
        let expected = &golden[&format!("db.after.unet.{name}")] - before;
        let error = relative_l2(&(&unet[*name] - before), &expected);
        println!("bf16 update of {name}: relative L2 {error:e}");
        assert!(error <= BF16_UPDATE_RTOL, "{name}: relative L2 {error:e}");
    }
    let after = tch::no_grad(|| trainer.batch_loss(&batch()).unwrap().double_value(&[]));
    let expected = scalar(&golden["db.loss_after_step1"]);
    report_and_assert_rel("bf16 loss after step 1", after, expected, BF16_LOSS_RTOL);
}

fn report_and_assert_rel(name: &str, found: f64, expected: f64, rtol: f64) {
    println!("{name}: {found} vs {expected}");
    assert_rel(name, found, expected, rtol);
}

/// fp16 loss scaling in a real step (driven here on the CPU with bf16 autocast and a crafted
/// scaler): a scale that makes the gradients non-finite (an infinite one, so the test does not
/// depend on how large this model's gradients are) skips the update, counts the skip and holds
/// the lr schedule, as accelerate does; the next finite step updates with the schedule's first
/// learning rate.
#[test]
fn an_overflowing_loss_scale_skips_the_update_and_holds_the_schedule() {
    use dreampipe::sd::train::grad_scaler::{GradScaler, GradScalerState};
    let dir = tempfile::tempdir().unwrap();
    let inputs = tensors(&Path::new(FIXTURES).join("dreambooth.safetensors"));
    let mut config = golden_config(dir.path());
    config.training.mixed_precision = dreampipe::sd::train::common::MixedPrecision::Bf16;
    config.training.lr_scheduler = LrScheduler::Linear;
    config.training.lr_warmup_steps = 0;
    let mut trainer = DreamBoothTrainer::new(&config, 4).unwrap();
    let batch = || fixture_batch(&inputs, Kind::BFloat16);
    trainer
        .precision_mut()
        .set_grad_scaler(GradScaler::new(f64::INFINITY, 2000));
    let weight = trainer.unet_store().variables()["conv_out.weight"].shallow_clone();
    let before = weight.detach().copy();
    let skipped = trainer.train_step(&[batch()]).unwrap();
    assert_eq!(skipped.skipped_steps, Some(1));
    assert_eq!(skipped.lr, config.training.learning_rate);
    assert!(weight.equal(&before), "a skipped step changed the weights");
    let state = trainer.precision_mut().scaler_state().unwrap();
    assert_eq!((state.scale, state.skipped_steps), (f64::INFINITY, 1));
    trainer
        .precision_mut()
        .restore_scaler(Some(GradScalerState {
            scale: 65536.0,
            ..state
        }));
    let finite = trainer.train_step(&[batch()]).unwrap();
    assert_eq!(finite.skipped_steps, Some(1));
    assert_eq!(
        finite.lr, config.training.learning_rate,
        "the schedule did not advance"
    );
    assert!(!weight.equal(&before), "the finite step did not update");
    assert_eq!(trainer.step(), 2);
}

/// Under bf16 autocast, the checkpointed backward recomputes each block in the autocast region
/// its forward ran in: the same bf16 roundings, so the same gradients up to summation order.
/// Measured on the tiny model over 2 steps: losses equal, UNet updates (trained − base) 4.7e-3
/// from plain (relative L2; AdamW flips the sign of a few near-zero gradients). Recomputing
/// outside autocast fails outright (bf16 activations meet float32 weights).
const BF16_CHECKPOINTING_UPDATE_RTOL: f64 = 2e-2;

#[test]
fn bf16_gradient_checkpointing_trains_to_the_same_weights() {
    let data = synthetic_data();
    let (plain_out, checkpointed_out) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut plain = tiny_run_config(data.path(), plain_out.path(), 2);
    plain.training.mixed_precision = dreampipe::sd::train::common::MixedPrecision::Bf16;
    let mut checkpointed = tiny_run_config(data.path(), checkpointed_out.path(), 2);
    checkpointed.training.mixed_precision = plain.training.mixed_precision;
    checkpointed.training.gradient_checkpointing = true;
    let plain_progress = run(&plain, &AtomicBool::new(false), None).unwrap();
    let checkpointed_progress = run(&checkpointed, &AtomicBool::new(false), None).unwrap();
    for (a, b) in plain_progress.iter().zip(&checkpointed_progress) {
        println!("bf16 loss plain {} checkpointed {}", a.loss, b.loss);
        assert_rel("bf16 checkpointed loss", b.loss, a.loss, BF16_LOSS_RTOL);
    }
    let file = "unet/diffusion_pytorch_model.safetensors";
    let base = tensors(&Path::new(MODEL).join(file));
    let a = tensors(&plain.output_dir.join(file));
    let b = tensors(&checkpointed.output_dir.join(file));
    let update = |weights: &HashMap<String, Tensor>| {
        let deltas: Vec<Tensor> = (base.iter())
            .map(|(name, t)| (&weights[name] - t).flatten(0, -1))
            .collect();
        Tensor::cat(&deltas, 0)
    };
    let error = relative_l2(&update(&b), &update(&a));
    println!("bf16 checkpointing: UNet updates differ by {error:e} (relative L2)");
    assert!(
        error <= BF16_CHECKPOINTING_UPDATE_RTOL,
        "updates differ by {error:e}"
    );
}

/// Two training runs on two threads at once (as two stages on two device slots) draw from
/// generators of their own: each ends with exactly the weights and losses it gets alone (the
/// runs use different seeds, so draws from one shared stream would change both).
#[test]
fn concurrent_runs_train_what_they_train_alone() {
    let data = synthetic_data();
    let outs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let config = |out: &Path, seed: u64| {
        let mut config = tiny_run_config(data.path(), out, 2);
        config.training.seed = seed;
        config
    };
    let seeds = [5u64, 6];
    let alone: Vec<DreamBoothConfig> = (seeds.iter().zip(&outs[..2]))
        .map(|(&seed, out)| config(out.path(), seed))
        .collect();
    let alone_progress: Vec<Vec<Progress>> = (alone.iter())
        .map(|config| run(config, &AtomicBool::new(false), None).unwrap())
        .collect();
    let together: Vec<DreamBoothConfig> = (seeds.iter().zip(&outs[2..]))
        .map(|(&seed, out)| config(out.path(), seed))
        .collect();
    let together_progress: Vec<Vec<Progress>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (together.iter())
            .map(|config| scope.spawn(move || run(config, &AtomicBool::new(false), None).unwrap()))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_ne!(alone_progress[0][0].loss, alone_progress[1][0].loss);
    let file = "unet/diffusion_pytorch_model.safetensors";
    for index in 0..2 {
        assert_eq!(together_progress[index], alone_progress[index]);
        let a = tensors(&alone[index].output_dir.join(file));
        let b = tensors(&together[index].output_dir.join(file));
        assert!(a.iter().all(|(name, t)| t.equal(&b[name])), "run {index}");
    }
}
