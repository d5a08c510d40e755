//! txt2img against diffusers 0.42.1's StableDiffusionPipeline (tests/fixtures/sd-tiny/pipeline,
//! produced as its README's "Pipeline" section says): for every scheduler the initial noise, the
//! UNet inputs/outputs, the latents after every step, the final latents, the image and the PNG;
//! the prompt embeddings; batches; per-run generators under concurrency; bf16; v-prediction.
use dreampipe::sd::pipeline::{Event, StableDiffusion, Txt2Img, Txt2ImgError, Txt2ImgOutput};
use dreampipe::sd::png::{tensor_to_rgb_bytes, write_rgb_png};
use dreampipe::sd::schedulers::SchedulerKind;
use dreampipe::sd::{pool, rng};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use tch::{Device, Kind, Tensor};

/// Fixture README tolerances: UNet/text encoder outputs and final samples 1e-4, images atol 2e-3,
/// PNG pixels within one 8-bit level.
const TENSOR_TOL: f64 = 1e-4;
const IMAGE_ATOL: f64 = 2e-3;
const PNG_LEVELS: i32 = 1;
/// pipeline.json: the arguments of every fixture run.
const PROMPT: &str = "a photo of sks dog in a bucket";
const SEED: u64 = 1234;
const STEPS: usize = 4;
const GUIDANCE: f64 = 7.5;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn model_dir() -> PathBuf {
    repo_path("models/tiny-sd")
}

fn fixture_tensors(file: &str) -> HashMap<String, Tensor> {
    let path = repo_path("tests/fixtures/sd-tiny/pipeline").join(file);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn pipeline_json() -> Value {
    let path = repo_path("tests/fixtures/sd-tiny/pipeline/pipeline.json");
    // Python's json writes DPM-Solver's lambda_min_clipped as a bare -Infinity.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("-Infinity", "\"-Infinity\"");
    serde_json::from_str(&text).unwrap()
}

use crate::sd_support::assert_close;

/// `assert_close` at `TENSOR_TOL`, the absolute part scaled by the expected tensor's RMS: the
/// tiny random model's latents grow to an RMS of 2–16 (Euler's and LMS's hold the noise at σ_t),
/// and the float32 rounding of another CPU's kernels grows with them — an AMD EPYC (AVX2)
/// measured 2.0e-4 on RMS-16 latents made on an AVX-512 machine, 1.3e-5 of their scale.
fn assert_scaled_close(name: &str, actual: &Tensor, expected: &Tensor) {
    let scale = rms(expected).max(1.0);
    assert_close(name, actual, expected, TENSOR_TOL * scale, TENSOR_TOL);
}

/// The root mean square of a tensor's elements.
fn rms(tensor: &Tensor) -> f64 {
    tensor
        .to_kind(Kind::Double)
        .square()
        .mean(Kind::Double)
        .sqrt()
        .double_value(&[])
}

fn max_abs_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// The pooled model (a test that panicked while holding it leaves it usable).
fn lock(model: &pool::SharedModel) -> std::sync::MutexGuard<'_, StableDiffusion> {
    model
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn request(scheduler: SchedulerKind) -> Txt2Img {
    Txt2Img {
        prompt: PROMPT.to_string(),
        negative_prompt: String::new(),
        seed: SEED,
        steps: STEPS,
        guidance: GUIDANCE,
        scheduler: Some(scheduler),
        width: None,
        height: None,
        batch: 1,
    }
}

/// Every tensor txt2img reported, in order.
#[derive(Default)]
struct Recording {
    noise: Option<Tensor>,
    initial_latents: Option<Tensor>,
    timesteps: Vec<f64>,
    unet_inputs: Vec<Tensor>,
    unet_outputs: Vec<Tensor>,
    step_latents: Vec<Tensor>,
    steps_reported: Vec<(usize, usize)>,
}

impl Recording {
    fn record(&mut self, event: Event<'_>) {
        match event {
            Event::Start { noise, latents } => {
                self.noise = Some(noise.copy());
                self.initial_latents = Some(latents.copy());
            }
            Event::UNet {
                call,
                timestep,
                input,
                output,
            } => {
                assert_eq!(
                    call,
                    self.unet_inputs.len(),
                    "UNet calls are numbered in order"
                );
                self.timesteps.push(timestep.double_value(&[]));
                self.unet_inputs.push(input.copy());
                self.unet_outputs.push(output.copy());
            }
            Event::Step {
                done,
                total,
                latents,
            } => {
                self.steps_reported.push((done, total));
                self.step_latents.push(latents.copy());
            }
        }
    }
}

fn run(model: &StableDiffusion, request: &Txt2Img) -> (Txt2ImgOutput, Recording) {
    let mut recording = Recording::default();
    let output = model
        .txt2img(request, &mut |event| recording.record(event))
        .unwrap_or_else(|e| panic!("txt2img: {e}"));
    (output, recording)
}

/// Runs the fixture request on the pooled float32 CPU model.
fn run_fixture_request(scheduler: SchedulerKind) -> (Txt2ImgOutput, Recording) {
    let model = pool::get(&model_dir(), Device::Cpu, Kind::Float).unwrap();
    let model = lock(&model);
    run(&model, &request(scheduler))
}

/// [batch, 3, h, w] in [-1, 1] -> diffusers' `output_type='np'` layout [batch, h, w, 3] in [0, 1].
fn to_numpy_layout(images: &Tensor) -> Tensor {
    (images / 2.0 + 0.5).clamp(0.0, 1.0).permute([0, 2, 3, 1])
}

fn assert_png_matches(name: &str, image: &Tensor, golden_png: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.png");
    let (height, width) = (image.size()[1] as u32, image.size()[2] as u32);
    write_rgb_png(&path, &tensor_to_rgb_bytes(image), width, height, None).unwrap();
    let ours = image::open(&path).unwrap().to_rgb8();
    let golden = image::open(golden_png).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), golden.dimensions(), "{name}: PNG size");
    let worst = ours
        .as_raw()
        .iter()
        .zip(golden.as_raw())
        .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
        .max()
        .unwrap_or(0);
    assert!(
        worst <= PNG_LEVELS,
        "{name}: PNG pixel differs by {worst} levels"
    );
}

/// One fixture run: every stored tensor of `pipeline/<name>.safetensors` and the PNG.
fn check_scheduler(kind: SchedulerKind, name: &str) {
    let golden = fixture_tensors(&format!("{name}.safetensors"));
    let json = &pipeline_json()["runs"][name];
    let (output, recording) = run_fixture_request(kind);

    crate::sd_support::assert_noise_close(
        &format!("{name}: initial noise"),
        recording.noise.as_ref().unwrap(),
        &golden["initial_noise"],
        1.0,
    );
    let init_sigma = json["init_noise_sigma"].as_f64().unwrap();
    let initial = recording.initial_latents.as_ref().unwrap();
    crate::sd_support::assert_noise_close(
        &format!("{name}: initial_latents"),
        initial,
        &golden["initial_latents"],
        init_sigma,
    );
    crate::sd_support::assert_noise_close(
        &format!("{name}: init_noise_sigma"),
        initial,
        &(&golden["initial_noise"] * init_sigma),
        init_sigma,
    );

    let calls = json["num_unet_calls"].as_u64().unwrap() as usize;
    let expected_timesteps: Vec<f64> = json["timesteps_passed_to_unet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(
        recording.timesteps, expected_timesteps,
        "{name}: timesteps passed to the UNet"
    );
    assert_eq!(
        Vec::<f64>::try_from(golden["timesteps"].to_kind(Kind::Double)).unwrap(),
        expected_timesteps
    );
    let reported: Vec<(usize, usize)> = (1..=calls).map(|done| (done, calls)).collect();
    assert_eq!(recording.steps_reported, reported, "{name}: step events");

    for (call, latents) in recording.step_latents.iter().enumerate() {
        let expected = golden["step_latents"].get(call as i64);
        assert_scaled_close(&format!("{name}: step_latents[{call}]"), latents, &expected);
    }
    if let Some(inputs) = golden.get("step_unet_input") {
        for call in 0..calls {
            let (input, output) = (&recording.unet_inputs[call], &recording.unet_outputs[call]);
            let tag = format!("{name}: step_unet_input[{call}]");
            assert_scaled_close(&tag, input, &inputs.get(call as i64));
            let tag = format!("{name}: step_unet_output[{call}]");
            assert_scaled_close(&tag, output, &golden["step_unet_output"].get(call as i64));
        }
    }
    assert_scaled_close(
        &format!("{name}: latents"),
        &output.latents,
        &golden["latents"],
    );
    assert_close(
        &format!("{name}: image"),
        &to_numpy_layout(&output.images),
        &golden["image"],
        IMAGE_ATOL,
        0.0,
    );
    let png = repo_path("tests/fixtures/sd-tiny/pipeline").join(format!("{name}.png"));
    assert_png_matches(name, &output.images.get(0), &png);
    assert_eq!(
        (output.width, output.height, output.scheduler),
        (64, 64, kind)
    );
}

#[test]
fn ddim_matches_diffusers() {
    check_scheduler(SchedulerKind::Ddim, "ddim");
}

#[test]
fn pndm_matches_diffusers() {
    check_scheduler(SchedulerKind::Pndm, "pndm");
}

#[test]
fn lms_matches_diffusers() {
    check_scheduler(SchedulerKind::Lms, "lms");
}

#[test]
fn euler_matches_diffusers() {
    check_scheduler(SchedulerKind::Euler, "euler");
}

#[test]
fn euler_ancestral_matches_diffusers() {
    check_scheduler(SchedulerKind::EulerAncestral, "euler_ancestral");
}

#[test]
fn dpm_solver_multistep_matches_diffusers() {
    check_scheduler(SchedulerKind::DpmSolverMultistep, "dpmsolver_multistep");
}

#[test]
fn ddpm_matches_diffusers() {
    check_scheduler(SchedulerKind::Ddpm, "ddpm");
}

#[test]
fn prompt_embeddings_match_diffusers_encode_prompt() {
    let golden = fixture_tensors("prompt_embeds.safetensors");
    let model = pool::get(&model_dir(), Device::Cpu, Kind::Float).unwrap();
    let model = lock(&model);
    let _no_grad = tch::no_grad_guard();
    for (text, key) in [(PROMPT, "prompt"), ("", "negative_prompt")] {
        let ids = Tensor::from_slice(&model.tokenizer.encode(text).ids).unsqueeze(0);
        assert!(ids.equal(&golden[&format!("{key}_ids")]), "{key}: ids");
        let embeds = model.encode_prompt(text, 1).unwrap();
        assert_close(
            key,
            &embeds,
            &golden[&format!("{key}_embeds")],
            TENSOR_TOL,
            TENSOR_TOL,
        );
    }
    let repeated = model.encode_prompt(PROMPT, 3).unwrap();
    assert_eq!(repeated.size(), [3, 77, 32]);
    assert!(repeated.get(2).equal(&repeated.get(0)));
}

/// The fixture's scheduler (`_class_name` PNDMScheduler) is used when none is requested.
#[test]
fn default_scheduler_is_the_models_own() {
    let model = pool::get(&model_dir(), Device::Cpu, Kind::Float).unwrap();
    let model = lock(&model);
    let mut req = request(SchedulerKind::Ddim);
    req.scheduler = None;
    let (output, _) = run(&model, &req);
    assert_eq!(output.scheduler, SchedulerKind::Pndm);
    assert_close(
        "pndm latents",
        &output.latents,
        &fixture_tensors("pndm.safetensors")["latents"],
        TENSOR_TOL,
        TENSOR_TOL,
    );
}

/// diffusers with two images per prompt draws ONE randn of shape [2, 4, 32, 32]; for this size the
/// first image's noise equals the single-image draw, so image 0 is the fixture image.
#[test]
fn batch_of_two_draws_one_noise_tensor() {
    let model = pool::get(&model_dir(), Device::Cpu, Kind::Float).unwrap();
    let model = lock(&model);
    let mut req = request(SchedulerKind::Ddim);
    req.batch = 2;
    let (output, recording) = run(&model, &req);
    let expected_noise = rng::Generator::new(SEED).randn(&[2, 4, 32, 32], Kind::Float);
    assert!(recording.noise.unwrap().equal(&expected_noise));
    assert_eq!(
        recording.unet_inputs[0].size(),
        [4, 4, 32, 32],
        "CFG doubles the batch"
    );
    let golden = fixture_tensors("ddim.safetensors");
    let first = output.latents.get(0).unsqueeze(0);
    assert_scaled_close("image 0 latents", &first, &golden["latents"]);
    assert_close(
        "image 0",
        &to_numpy_layout(&output.images).get(0).unsqueeze(0),
        &golden["image"],
        IMAGE_ATOL,
        0.0,
    );
    let between_images = max_abs_difference(&output.images.get(0), &output.images.get(1));
    assert!(
        between_images > 0.1,
        "images 0 and 1 must differ, max difference {between_images}"
    );
}

#[test]
fn invalid_requests_are_rejected_before_sampling() {
    let model = pool::get(&model_dir(), Device::Cpu, Kind::Float).unwrap();
    let model = lock(&model);
    let mut no_events = |_: Event<'_>| panic!("no event expected");
    let mut req = request(SchedulerKind::Ddim);
    req.width = Some(63);
    let error = model.txt2img(&req, &mut no_events).err().unwrap();
    assert_eq!(
        error.to_string(),
        "width 63: must be a positive multiple of 2 (the VAE scale factor of this model)"
    );
    let mut req = request(SchedulerKind::Ddim);
    req.batch = 0;
    let error = model.txt2img(&req, &mut no_events).err().unwrap();
    assert_eq!(error.to_string(), "batch 0: must be at least 1");
    let mut req = request(SchedulerKind::Ddim);
    req.steps = 0;
    let error = model.txt2img(&req, &mut no_events).err().unwrap();
    assert_eq!(error.to_string(), "steps 0: must be at least 1");
}

#[test]
fn missing_model_folder_is_named() {
    let dir = repo_path("models/no-such-model");
    let error = StableDiffusion::load(&dir, Device::Cpu, Kind::Float)
        .err()
        .unwrap();
    assert!(matches!(error, Txt2ImgError::MissingModel { .. }));
    assert_eq!(
        error.to_string(),
        format!(
            "{}: model folder not found (pass a diffusers folder with model_index.json)",
            dir.display()
        )
    );
}

#[test]
fn pool_loads_each_folder_once_per_kind() {
    let first = pool::get(&model_dir(), Device::Cpu, Kind::Float).unwrap();
    let again = pool::get(
        &repo_path("models/../models/tiny-sd"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "the same folder (any spelling) is loaded once"
    );
    let bf16 = pool::get(&model_dir(), Device::Cpu, Kind::BFloat16).unwrap();
    assert!(
        !Arc::ptr_eq(&first, &bf16),
        "another dtype is another model"
    );
    assert_eq!(lock(&bf16).kind, Kind::BFloat16);
}

/// Two runs in two threads at once, each with its own model and seed, draw exactly what they
/// draw alone: each run draws from a generator of its own (Euler ancestral draws noise at every
/// step, so interleaved draws from one shared generator would change both results).
#[test]
fn concurrent_runs_do_not_interleave_random_draws() {
    let seeds = [11u64, 22];
    let request_for = |seed| Txt2Img {
        seed,
        ..request(SchedulerKind::EulerAncestral)
    };
    let load = || StableDiffusion::load(&model_dir(), Device::Cpu, Kind::Float).unwrap();
    let alone: Vec<Tensor> = {
        let model = load();
        seeds
            .iter()
            .map(|&seed| run(&model, &request_for(seed)).0.latents)
            .collect()
    };
    assert!(
        max_abs_difference(&alone[0], &alone[1]) > 0.1,
        "different seeds, different latents"
    );
    let start = Arc::new(Barrier::new(seeds.len()));
    let threads: Vec<_> = seeds
        .iter()
        .map(|&seed| {
            let (start, req) = (Arc::clone(&start), request_for(seed));
            std::thread::spawn(move || {
                let model = load();
                start.wait();
                run(&model, &req).0.latents
            })
        })
        .collect();
    for ((thread, expected), seed) in threads.into_iter().zip(&alone).zip(seeds) {
        let together = thread.join().unwrap();
        assert!(
            together.equal(expected),
            "seed {seed}: concurrent result differs from the single-threaded one"
        );
    }
}

/// bf16 weights on CPU: the run completes with finite values close to float32's.
#[test]
fn bf16_on_cpu_is_close_to_float32() {
    let model = pool::get(&model_dir(), Device::Cpu, Kind::BFloat16).unwrap();
    let model = lock(&model);
    let (output, _) = run(&model, &request(SchedulerKind::Ddim));
    assert_eq!(output.latents.kind(), Kind::BFloat16);
    assert_eq!(output.images.kind(), Kind::Float);
    let golden = fixture_tensors("ddim.safetensors");
    let latents = output.latents.to_kind(Kind::Float);
    assert!(bool::try_from(latents.isfinite().all()).unwrap());
    let relative_error = (&latents - &golden["latents"]).norm().double_value(&[])
        / golden["latents"].norm().double_value(&[]);
    let image_error = max_abs_difference(&to_numpy_layout(&output.images), &golden["image"]);
    eprintln!(
        "bf16 vs f32: latents relative L2 {relative_error:.4}, image max |diff| {image_error:.4}"
    );
    assert!(
        relative_error < BF16_LATENT_REL_TOL,
        "bf16 latents: relative L2 error {relative_error}"
    );
    assert!(
        image_error < BF16_IMAGE_TOL,
        "bf16 image differs from float32 by {image_error}"
    );
}

/// A copy of the tiny model whose scheduler config says `prediction_type: v_prediction`
/// (SD 2.x-style); the weights are shared by hard links / copies.
fn v_prediction_model() -> (tempfile::TempDir, StableDiffusion) {
    let dir = tempfile::tempdir().unwrap();
    let source = model_dir();
    for entry in walk(&source) {
        let target = dir.path().join(entry.strip_prefix(&source).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
    let config_path = dir.path().join("scheduler/scheduler_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["prediction_type"] = Value::from("v_prediction");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let model = StableDiffusion::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    (dir, model)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// With `v_prediction` the UNet output is read as v: DDIM's first step must be
/// x0 = √ᾱ_t·x − √(1−ᾱ_t)·v, ε = √ᾱ_t·v + √(1−ᾱ_t)·x, x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev)·ε
/// (ᾱ from the fixture's DDPM table), and the result differs from the epsilon run.
#[test]
fn v_prediction_configs_sample_with_v_targets() {
    let (_dir, model) = v_prediction_model();
    let (output, recording) = run(&model, &request(SchedulerKind::Ddim));
    let alphas_cumprod = &Tensor::read_safetensors(repo_path(
        "tests/fixtures/sd-tiny/schedulers/add_noise.safetensors",
    ))
    .unwrap()
    .into_iter()
    .find(|(key, _)| key == "alphas_cumprod")
    .unwrap()
    .1;
    let alpha = |t: f64| alphas_cumprod.double_value(&[t as i64]);
    let (a_t, a_prev) = (alpha(recording.timesteps[0]), alpha(recording.timesteps[1]));
    let x = recording
        .initial_latents
        .as_ref()
        .unwrap()
        .to_kind(Kind::Double);
    let halves = recording.unet_outputs[0].to_kind(Kind::Double).chunk(2, 0);
    let v = &halves[0] + (&halves[1] - &halves[0]) * GUIDANCE;
    let x0 = &x * a_t.sqrt() - &v * (1.0 - a_t).sqrt();
    let eps = &v * a_t.sqrt() + &x * (1.0 - a_t).sqrt();
    let expected = x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt();
    assert_close(
        "v-prediction DDIM step 0",
        &recording.step_latents[0],
        &expected,
        1e-5,
        1e-5,
    );

    let epsilon_latents = &fixture_tensors("ddim.safetensors")["latents"];
    assert!(bool::try_from(output.latents.isfinite().all()).unwrap());
    let difference = max_abs_difference(&output.latents, epsilon_latents);
    assert!(
        difference > 0.1,
        "v-prediction must differ from epsilon, max difference {difference}"
    );
    let (euler, _) = run(&model, &request(SchedulerKind::Euler));
    assert!(bool::try_from(euler.images.isfinite().all()).unwrap());
    let euler_epsilon = &fixture_tensors("euler.safetensors")["latents"];
    assert!(max_abs_difference(&euler.latents, euler_epsilon) > 0.1);
}

/// bf16 keeps 8 significant bits (relative rounding 2^-8 ≈ 0.4% per operation). Measured on CPU
/// for this model and request: latents relative L2 error 0.018 (max |diff| 0.32 where |latents|
/// reach 16), image max |diff| 0.022 (in [0, 1]). The bounds leave about 2.5x headroom.
const BF16_LATENT_REL_TOL: f64 = 0.05;
const BF16_IMAGE_TOL: f64 = 0.05;

/// Building a model must not draw from the global generator (tch's default layer init would),
/// or a model loaded by one stage would shift the noise of a run sampling in another.
#[test]
fn loading_a_model_draws_no_random_numbers() {
    let draw = |load: bool| {
        // Runs draw from generators of their own; the tests that seed the global one hold its lock.
        let _rng = crate::sd_support::global_rng();
        tch::manual_seed(5);
        if load {
            drop(StableDiffusion::load(&model_dir(), Device::Cpu, Kind::Float).unwrap());
        }
        Tensor::randn([64], (Kind::Float, Device::Cpu))
    };
    assert!(draw(true).equal(&draw(false)));
}

/// Any multiple of the VAE factor works, also when the latent size (35) is odd: the UNet's
/// upsamplers take the skip connections' sizes.
#[test]
fn odd_latent_widths_give_images_of_the_requested_size() {
    let model = pool::get(&model_dir(), Device::Cpu, Kind::Float).unwrap();
    let model = lock(&model);
    let req = Txt2Img {
        width: Some(70),
        steps: 1,
        ..request(SchedulerKind::Ddim)
    };
    let (output, _) = run(&model, &req);
    assert_eq!(output.latents.size(), [1, 4, 32, 35]);
    assert_eq!(output.images.size(), [1, 3, 64, 70]);
    assert!(bool::try_from(output.images.isfinite().all()).unwrap());
}

/// No process-wide lock serializes seeded work: two Euler-ancestral runs (which draw noise at
/// every step) are both inside their denoising loop at the same moment. Each waits at its first
/// step for the other (30 s at most); with a lock held from seeding to the last step, as before,
/// the second could not start and the meeting would time out.
#[test]
fn two_seeded_runs_are_in_their_loops_at_the_same_time() {
    use std::sync::{Condvar, Mutex};
    let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
    let threads: Vec<_> = [31u64, 32]
        .into_iter()
        .map(|seed| {
            let arrived = Arc::clone(&arrived);
            std::thread::spawn(move || {
                let model = StableDiffusion::load(&model_dir(), Device::Cpu, Kind::Float).unwrap();
                let request = Txt2Img {
                    seed,
                    ..request(SchedulerKind::EulerAncestral)
                };
                let mut met = None;
                let mut on_event = |event: Event<'_>| {
                    if matches!(event, Event::Step { done: 1, .. }) && met.is_none() {
                        let (count, signal) = &*arrived;
                        let mut count = count.lock().unwrap();
                        *count += 1;
                        signal.notify_all();
                        let wait = std::time::Duration::from_secs(30);
                        let (count, _) =
                            signal.wait_timeout_while(count, wait, |c| *c < 2).unwrap();
                        met = Some(*count >= 2);
                    }
                };
                model.txt2img(&request, &mut on_event).unwrap();
                met
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(
            thread.join().unwrap(),
            Some(true),
            "the runs did not overlap"
        );
    }
}
