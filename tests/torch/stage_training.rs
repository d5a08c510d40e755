//! The `textual_inversion` and `dreambooth` stages through the real binary on models/tiny-sd
//! (CPU, 64×64): images → generate → textual inversion → DreamBooth with prior preservation
//! and text-encoder training on the TI model → a sample grid of both; the outputs load and
//! sample; reruns are cached; a changed learning rate reruns only DreamBooth and the grid; a run killed with SIGKILL resumes from its
//! last checkpoint to the weights of an uninterrupted run; bad enum fields fail, named.
use crate::runner_support::{Project, RunResult, assert_success, to_result};
use dreampipe::sd::pipeline::{StableDiffusion, Txt2Img};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Resumed training must reproduce uninterrupted training to float rounding.
const RESUME_TOLERANCE: f64 = 1e-6;
/// How long the kill test waits for the first checkpoint before giving up.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(120);

fn tiny_model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/tiny-sd")
        .display()
        .to_string()
}

/// `dreampipe --device cpu --cache <cache> run <pipeline> --plain ...` with one libtorch thread
/// (CI has 2 shared cores; one thread is much faster under contention).
fn command(project: &Project, pipeline: &str, extra: &[&str]) -> Command {
    let mut command = project.command(&["run", pipeline, "--plain"]);
    command.args(extra).env("OMP_NUM_THREADS", "1");
    command
}

fn run(project: &Project, pipeline: &str, extra: &[&str]) -> RunResult {
    to_result(
        command(project, pipeline, extra)
            .output()
            .expect("run dreampipe"),
    )
}

/// Three distinct synthetic 64×64 photos in `photos/`.
fn write_photos(project: &Project) {
    let dir = project.path("photos");
    std::fs::create_dir_all(&dir).expect("mkdir photos");
    for index in 0..3u32 {
        let image = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([
                (x * 4 + index * 60) as u8,
                (y * 4) as u8,
                ((x + y) * 2 + index * 30) as u8,
            ])
        });
        image
            .save(dir.join(format!("photo{index}.png")))
            .expect("save photo");
    }
}

const CHAIN: &str = r#"name: train
params:
  db_lr: 1.0e-4
stages:
  photos:
    kind: images
    path: photos
  class:
    kind: generate
    model: MODEL
    prompt: a photo of a dog
    count: 4
    steps: 2
    width: 64
    height: 64
  ti:
    kind: textual_inversion
    model: MODEL
    instance_images: photos
    placeholder_token: <sks>
    initializer_token: dog
    resolution: 64
    train_batch_size: 1
    repeats: 1
    max_train_steps: 20
    learning_rate: 5.0e-3
    lr_warmup_steps: 0
    checkpointing_steps: 10
    validation_prompt: a photo of <sks>
    validation_steps: 10
    validation_inference_steps: 2
  db:
    kind: dreambooth
    model: ti
    instance_images: photos
    instance_prompt: a photo of <sks> dog
    class_images: class
    class_prompt: a photo of a dog
    num_class_images: 4
    train_text_encoder: true
    resolution: 64
    train_batch_size: 1
    max_train_steps: 10
    learning_rate: ${params.db_lr}
    lr_warmup_steps: 0
    checkpointing_steps: 5
    validation_prompt: a photo of <sks> dog
    validation_steps: 5
    validation_inference_steps: 2
  grid:
    kind: sample_grid
    models: [ti, db]
    prompts: [a photo of <sks> dog]
    seeds: [0]
    steps: 2
    width: 64
    height: 64
"#;

fn output(project: &Project, stage: &str) -> PathBuf {
    project.cache().join("runs").join("train").join(stage)
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).expect("metrics line"))
        .collect()
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report.json"))
        .expect("report JSON")
}

fn tensors(file: &Path) -> Vec<(String, Tensor)> {
    let mut named = Tensor::read_safetensors(file).expect("read safetensors");
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// The largest absolute difference between two safetensors files with the same keys.
fn max_difference(a: &Path, b: &Path) -> f64 {
    let (first, second) = (tensors(a), tensors(b));
    assert_eq!(
        first.len(),
        second.len(),
        "{} vs {}",
        a.display(),
        b.display()
    );
    first
        .iter()
        .zip(&second)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn images_generate_ti_dreambooth_chain_trains_caches_and_reruns_only_what_changed() {
    let project = Project::new();
    write_photos(&project);
    project.write("train.yaml", &CHAIN.replace("MODEL", &tiny_model()));

    let first = run(&project, "train.yaml", &[]);
    assert_success(&first);
    assert_eq!(
        first.with_status("ran"),
        ["class", "db", "grid", "photos", "ti"]
    );
    // `sample_grid` (like `generate`) reads a textual_inversion output through its `model/`.
    let grid_files = std::fs::read_dir(output(&project, "grid"))
        .expect("grid output")
        .count();
    assert!(grid_files > 0);

    let ti = output(&project, "ti");
    assert!(ti.join("learned_embeds.safetensors").is_file());
    assert!(ti.join("sks.safetensors").is_file());
    assert!(ti.join("model/model_index.json").is_file());
    let ti_metrics = metrics(&ti);
    assert_eq!(ti_metrics.len(), 20);
    assert_eq!(ti_metrics[19]["step"], 20);
    assert!(
        ti_metrics
            .iter()
            .all(|m| m["loss"].as_f64().is_some_and(f64::is_finite))
    );
    assert_eq!(
        report(&ti),
        serde_json::json!({"images": [
            {"path": "validation/step-10.png", "caption": "a photo of <sks>", "step": 10},
            {"path": "validation/step-20.png", "caption": "a photo of <sks>", "step": 20},
        ]})
    );
    assert_eq!(
        image::open(ti.join("validation/step-20.png"))
            .expect("png")
            .width(),
        64
    );
    let parameters = dreampipe::sd::png::read_parameters_text(&ti.join("validation/step-20.png"))
        .expect("read PNG")
        .expect("parameters chunk");
    assert!(
        parameters.starts_with("a photo of <sks>\nSteps: 2, "),
        "{parameters}"
    );
    assert!(
        parameters.contains(", CFG scale: 7.5, Seed: 0, Size: 64x64, Model hash: "),
        "{parameters}"
    );
    assert!(
        parameters.ends_with(&format!(
            ", Model: ti, dreampipe stage: ti, dreampipe key: {}, dreampipe pipeline: train",
            std::fs::read_to_string(project.cache().join("index/train/ti"))
                .expect("index")
                .trim()
        )),
        "{parameters}"
    );

    let db = output(&project, "db");
    let db_metrics = metrics(&db);
    assert_eq!(db_metrics.len(), 10);
    assert!(db_metrics.iter().all(|m| m["grad_norm"].as_f64().is_some()));
    assert_eq!(db_metrics[0]["lr"].as_f64(), Some(1e-4));
    assert_eq!(
        report(&db),
        serde_json::json!({"images": [
            {"path": "validation/step-5.png", "caption": "a photo of <sks> dog", "step": 5},
            {"path": "validation/step-10.png", "caption": "a photo of <sks> dog", "step": 10},
        ]})
    );
    // DreamBooth started from the TI model: the placeholder is in its vocabulary, and both the
    // UNet and the text encoder moved away from their bases.
    let vocab = std::fs::read_to_string(db.join("tokenizer/vocab.json")).expect("vocab");
    assert!(vocab.contains("\"<sks>\""));
    let unet = "unet/diffusion_pytorch_model.safetensors";
    assert!(max_difference(&db.join(unet), &Path::new(&tiny_model()).join(unet)) > 0.0);
    let encoder = "text_encoder/model.safetensors";
    assert!(max_difference(&db.join(encoder), &ti.join("model").join(encoder)) > 0.0);

    let model = StableDiffusion::load(&db, Device::Cpu, Kind::Float).expect("load db output");
    let request = Txt2Img {
        prompt: "a photo of <sks> dog".to_string(),
        negative_prompt: String::new(),
        seed: 1,
        steps: 2,
        guidance: 7.5,
        scheduler: None,
        width: Some(64),
        height: Some(64),
        batch: 1,
    };
    let sampled = model.txt2img(&request, &mut |_| {}).expect("sample");
    assert_eq!(sampled.images.size(), [1, 3, 64, 64]);
    assert!(sampled.images.isfinite().all().int64_value(&[]) == 1);

    let second = run(&project, "train.yaml", &[]);
    assert_success(&second);
    assert_eq!(
        second.with_status("cached"),
        ["class", "db", "grid", "photos", "ti"]
    );
    assert!(second.with_status("ran").is_empty());

    let changed = run(&project, "train.yaml", &["--set", "params.db_lr=2.0e-4"]);
    assert_success(&changed);
    assert_eq!(changed.with_status("ran"), ["db", "grid"]);
    assert_eq!(changed.with_status("cached"), ["class", "photos", "ti"]);
    assert_eq!(
        metrics(&output(&project, "db"))[0]["lr"].as_f64(),
        Some(2e-4)
    );
}

const SINGLE: &str = r#"name: train
stages:
  db:
    kind: dreambooth
    model: MODEL
    instance_images: photos
    instance_prompt: a photo of sks dog
    resolution: 64
    train_batch_size: 1
    max_train_steps: 12
    learning_rate: 1.0e-4
    lr_warmup_steps: 0
    checkpointing_steps: 2
"#;

/// The newest `checkpoint-N` under `<cache>/work/*/`, if any.
fn checkpoint_steps(cache: &Path) -> Vec<u64> {
    let mut steps = Vec::new();
    for work in std::fs::read_dir(cache.join("work"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for entry in std::fs::read_dir(work.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name
                .strip_prefix("checkpoint-")
                .and_then(|s| s.parse().ok())
            {
                steps.push(step);
            }
        }
    }
    steps
}

/// Starts `run` in the background and, once the first checkpoint exists, stops it with
/// `signal` (`-KILL` or `-INT`); returns the exit status.
fn interrupt_after_first_checkpoint(project: &Project, signal: &str) -> std::process::ExitStatus {
    let mut child = command(project, "train.yaml", &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn dreampipe");
    let started = Instant::now();
    while checkpoint_steps(&project.cache()).is_empty() {
        assert!(
            started.elapsed() < CHECKPOINT_WAIT,
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} failed");
    let status = child.wait().expect("reap");
    assert!(
        !output(project, "db").exists(),
        "the run finished before {signal} (checkpoints {:?})",
        checkpoint_steps(&project.cache())
    );
    status
}

/// Reruns the interrupted project and checks that it resumed to the reference's weights and
/// losses.
fn assert_resumes_to(project: &Project, reference: &Project) {
    let resumed = run(project, "train.yaml", &[]);
    assert_success(&resumed);
    assert_eq!(resumed.with_status("ran"), ["db"]);
    let key = std::fs::read_to_string(project.cache().join("index/train/db")).expect("index");
    let log = std::fs::read_to_string(project.cache().join(format!("logs/{}.log", key.trim())))
        .expect("stage log");
    assert!(log.contains("resumed from step "), "log:\n{log}");
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let difference = max_difference(
        &output(project, "db").join(unet),
        &output(reference, "db").join(unet),
    );
    assert!(
        difference <= RESUME_TOLERANCE,
        "resumed weights differ by {difference}"
    );
    let ours = metrics(&output(project, "db"));
    let theirs = metrics(&output(reference, "db"));
    assert_eq!(ours.len(), 12);
    for (a, b) in ours.iter().zip(&theirs) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= RESUME_TOLERANCE,
            "step {}: {la} vs {lb}",
            a["step"]
        );
    }
}

fn project_with(pipeline: &str) -> Project {
    let project = Project::new();
    write_photos(&project);
    project.write("train.yaml", pipeline);
    project
}

#[test]
fn killed_or_interrupted_runs_resume_to_the_uninterrupted_weights() {
    let pipeline = SINGLE.replace("MODEL", &tiny_model());
    let reference = project_with(&pipeline);
    assert_success(&run(&reference, "train.yaml", &[]));

    let killed = project_with(&pipeline);
    let status = interrupt_after_first_checkpoint(&killed, "-KILL");
    assert_eq!(status.code(), None, "SIGKILL leaves no exit code");
    assert_resumes_to(&killed, &reference);

    // Ctrl-C: the runner cancels the stage, which writes a checkpoint before stopping.
    let interrupted = project_with(&pipeline);
    let status = interrupt_after_first_checkpoint(&interrupted, "-INT");
    assert_eq!(status.code(), Some(130));
    let logs: Vec<String> = std::fs::read_dir(interrupted.cache().join("logs"))
        .expect("logs")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    assert!(
        logs.iter().any(|log| log.contains("cancelled at step ")),
        "no cancel checkpoint logged:\n{}",
        logs.join("\n")
    );
    assert_resumes_to(&interrupted, &reference);
}

#[test]
fn invalid_enum_fields_fail_validation_naming_the_field() {
    let project = Project::new();
    write_photos(&project);
    let pipeline = format!(
        "{}    lr_scheduler: bogus\n    optimizer: sgd\n    mixed_precision: fp8\n    dtype: f64\n",
        SINGLE.replace("MODEL", &tiny_model())
    );
    project.write("bad.yaml", &pipeline);
    let (ok, stdout, stderr) = project.dreampipe(&["validate", "bad.yaml"]);
    assert!(!ok, "validate accepted bad enum values:\n{stdout}");
    let expected = [
        "bad.yaml:14:5: stage `db`, field `lr_scheduler`: unknown value \"bogus\" (expected one of: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial)",
        "bad.yaml:15:5: stage `db`, field `optimizer`: unknown value \"sgd\" (expected one of: adamw, adamw8bit)",
        "bad.yaml:16:5: stage `db`, field `mixed_precision`: unknown value \"fp8\" (expected one of: no, fp16, bf16)",
        "bad.yaml:17:5: stage `db`, field `dtype`: unknown value \"f64\" (expected one of: f32, f16, bf16)",
    ];
    for line in expected {
        assert!(stderr.contains(line), "expected {line:?} in:\n{stderr}");
    }
}

#[test]
fn settings_the_device_cannot_run_fail_before_training_naming_the_field() {
    let project = Project::new();
    write_photos(&project);
    let cases = [
        (
            "mixed_precision: fp16",
            "stage `db`: field `mixed_precision`: fp16 needs a CUDA device; on CPU use 'bf16' or 'no'",
        ),
        // Rules between fields fail validation, before anything runs.
        (
            "with_prior_preservation: true",
            "bad.yaml:3:3: stage `db`, field `class_images`: is required with with_prior_preservation: give a folder or a `generate` stage",
        ),
    ];
    for (line, message) in cases {
        let pipeline = format!("{}    {line}\n", SINGLE.replace("MODEL", &tiny_model()));
        project.write("bad.yaml", &pipeline);
        let result = run(&project, "bad.yaml", &[]);
        assert!(!result.success(), "{line}: the run succeeded");
        let all = format!("{}{}", result.stdout, result.stderr);
        assert!(
            all.contains(message),
            "{line}: expected {message:?} in:\n{all}"
        );
    }
    let textual_inversion = format!(
        "stages:\n  ti:\n    kind: textual_inversion\n    model: {}\n    instance_images: photos\n    placeholder_token: <sks>\n    initializer_token: dog\n    gradient_checkpointing: true\n",
        tiny_model()
    );
    project.write("bad.yaml", &textual_inversion);
    let result = run(&project, "bad.yaml", &[]);
    assert!(!result.success());
    let message = "bad.yaml:8:5: stage `ti`, field `gradient_checkpointing`: not supported for textual_inversion (its UNet is frozen; only the text encoder would need it); set it to false";
    assert!(
        result.stderr.contains(message),
        "expected {message:?} in:\n{}",
        result.stderr
    );
}

/// Issue #12, class 1: `images` and the training stages list and size-check image folders by
/// the same rules, so they refuse exactly the same files, with the stage, field and limit.
#[test]
fn images_and_training_stages_refuse_the_same_files_naming_stage_field_and_limit() {
    use dreampipe::imagefile::{LIMIT_TEXT, png_header};
    let project = Project::new();
    write_photos(&project);
    // A hidden file is skipped by both, however large its header.
    std::fs::write(
        project.path("photos/.huge.png"),
        png_header(100_000, 100_000),
    )
    .expect("w");
    let pipeline = format!(
        "{}  photos_in:\n    kind: images\n    path: photos\n  ti:\n    kind: textual_inversion\n    model: {}\n    instance_images: photos\n    placeholder_token: <sks>\n    initializer_token: dog\n",
        SINGLE.replace("MODEL", &tiny_model()),
        tiny_model()
    );
    project.write("p.yaml", &pipeline);
    let limit = format!("over the image limit of {LIMIT_TEXT}; shrink it or remove it");
    let cases: [(&str, Vec<u8>, String); 3] = [
        ("huge.png", png_header(100_000, 100_000), format!("is 100000×100000 pixels, {limit}")),
        ("wide.png", png_header(20_000, 20_000), format!("is 20000×20000 pixels, {limit}")),
        (
            "notes.txt",
            b"x".to_vec(),
            "is not an image file (png, jpg, jpeg, webp); move it out of the folder or start its name with `.`".to_string(),
        ),
    ];
    for (name, bytes, problem) in cases {
        let path = project.path("photos").join(name);
        std::fs::write(&path, bytes).expect("write");
        let result = run(&project, "p.yaml", &[]);
        assert!(!result.success(), "{name}: the run succeeded");
        assert_eq!(
            result.output.status.code(),
            Some(1),
            "{name}: {}",
            result.stderr
        );
        for (stage, field) in [
            ("db", "instance_images"),
            ("photos_in", "path"),
            ("ti", "instance_images"),
        ] {
            let line = format!(
                "[FAILED]  {stage}: stage `{stage}`: field `{field}`: `photos/{name}` {problem}"
            );
            assert!(
                result.stdout.contains(&line),
                "expected {line:?} in:\n{}",
                result.stdout
            );
        }
        std::fs::remove_file(&path).expect("remove");
    }
}

const TWO_SLOTS: &str = r#"name: slots
stages:
  photos:
    kind: images
    path: photos
  db:
    kind: dreambooth
    model: MODEL
    instance_images: photos
    instance_prompt: a photo of sks dog
    resolution: 64
    train_batch_size: 1
    max_train_steps: 6
    lr_warmup_steps: 0
    matrix:
      learning_rate: [1.0e-4, 2.0e-4]
"#;

/// Two DreamBooth variants on two CPU device slots (`--devices cpu,cpu`) train at the same
/// time — their `ran` intervals in the run record overlap for most of their length; no process
/// lock serializes their random draws — and each output is bit for bit (same digest) what the
/// one-slot run, where they train one after the other, produces.
#[test]
fn two_training_stages_on_two_slots_overlap_and_match_one_slot() {
    let pipeline = TWO_SLOTS.replace("MODEL", &tiny_model());
    let (two, one) = (project_with(&pipeline), project_with(&pipeline));
    let parallel = run(&two, "train.yaml", &["--devices", "cpu,cpu"]);
    assert_success(&parallel);
    let serial = run(&one, "train.yaml", &[]);
    assert_success(&serial);
    let ids = ["db[learning_rate=1e-4]", "db[learning_rate=2e-4]"];
    let interval = |result: &RunResult, id: &str| {
        let ran = result.stage_field(id, "ran");
        (
            ran[0].as_f64().expect("start"),
            ran[1].as_f64().expect("end"),
        )
    };
    let (a, b) = (interval(&parallel, ids[0]), interval(&parallel, ids[1]));
    let overlap = (a.1.min(b.1) - a.0.max(b.0)).max(0.0);
    let shorter = (a.1 - a.0).min(b.1 - b.0);
    assert!(
        overlap >= 0.5 * shorter,
        "two slots: {a:?} and {b:?} overlap {overlap:.2} s of {shorter:.2} s"
    );
    let (c, d) = (interval(&serial, ids[0]), interval(&serial, ids[1]));
    assert!(
        c.1 <= d.0 || d.1 <= c.0,
        "one slot: {c:?} and {d:?} overlap"
    );
    for id in ids {
        assert_eq!(
            parallel.stage_field(id, "output_digest"),
            serial.stage_field(id, "output_digest"),
            "{id}"
        );
    }
}

/// Every torch kind on the tiny model, for the version guard below: class images, textual
/// inversion, DreamBooth in float32 and under bf16 autocast, a grid, and the evaluation of the
/// fixed images of tests/fixtures/eval (EVAL) with its tiny CLIP and ViT.
const GUARD: &str = r#"name: train
stages:
  photos:
    kind: images
    path: photos
  class:
    kind: generate
    model: MODEL
    prompt: a photo of a dog
    count: 2
    steps: 2
    width: 64
    height: 64
  ti:
    kind: textual_inversion
    model: MODEL
    instance_images: photos
    placeholder_token: <sks>
    initializer_token: dog
    resolution: 64
    max_train_steps: 3
    learning_rate: 5.0e-3
    lr_warmup_steps: 0
  db:
    kind: dreambooth
    model: MODEL
    instance_images: photos
    instance_prompt: a photo of sks dog
    class_images: class
    class_prompt: a photo of a dog
    num_class_images: 2
    train_text_encoder: true
    resolution: 64
    max_train_steps: 3
    learning_rate: 1.0e-4
    lr_warmup_steps: 0
    matrix:
      mixed_precision: ["no", "bf16"]
  grid:
    kind: sample_grid
    models: [db]
    prompts: [a photo of sks dog]
    seeds: [0]
    steps: 2
    width: 64
    height: 64
  lora:
    kind: dreambooth_lora
    model: MODEL
    instance_images: photos
    instance_prompt: a photo of sks dog
    class_images: class
    class_prompt: a photo of a dog
    num_class_images: 2
    train_text_encoder: true
    resolution: 64
    max_train_steps: 3
    learning_rate: 1.0e-2
    lr_warmup_steps: 0
  lora_grid:
    kind: sample_grid
    models: [lora]
    base_model: MODEL
    prompts: [a photo of sks dog]
    seeds: [0]
    steps: 2
    width: 64
    height: 64
  world:
    kind: toy_world
    count: 4
    size: 32
    subject_images: 1
  ft:
    kind: finetune
    model: MODEL
    images: world
    resolution: 32
    train_batch_size: 2
    max_train_steps: 3
    learning_rate: 1.0e-3
  ae:
    kind: vae
    model: MODEL
    images: world
    resolution: 32
    train_batch_size: 2
    max_train_steps: 3
    learning_rate: 1.0e-3
    kl_scale: 1.0e-3
  world_scores:
    kind: world_score
    generated: [world, grid]
  eval:
    kind: evaluate
    generated: EVAL/images/grid
    real: EVAL/images/real
    clip_model: EVAL/clip-tiny
    dino_model: EVAL/dino-tiny
    identifier: sks
    class_prompt: a photo of dog
"#;

/// The stored outputs of the guard pipeline, per kind with the version that made them.
const KIND_OUTPUTS: &str = "tests/fixtures/kind-outputs.json";
/// Measured against the stored reference (made with ATen's avx512 kernels on an Intel Xeon)
/// under `default` / `avx2`: float32 losses 1.1e-7 relative, bf16 losses 6.8e-5, thumbnails
/// 0.016 levels. Mutations these must catch: running the bf16 UNet without autocast moves the
/// bf16 losses by 3.4e-4; changes of the method (loss, schedule, noise) move float32 losses
/// and images by orders of magnitude more.
const GUARD_LOSS_RTOL: f64 = 1e-5;
const GUARD_BF16_LOSS_RTOL: f64 = 2e-4;
/// Images: gray-level means of 8×8 blocks (a thumbnail tolerating single-pixel rounding).
const GUARD_LEVELS: f64 = 0.5;
/// Evaluate's means against the transformers reference of tests/fixtures/eval/scores.json
/// (measured 7.1e-8 on the goldens' CPU; the issue's bound).
const GUARD_SCORES: f64 = 1e-6;

/// Gray-level means of 8×8 blocks of a PNG (a thumbnail that tolerates single-pixel rounding).
fn thumbnail(path: &Path) -> Vec<f64> {
    let image = image::open(path).expect("image").to_luma8();
    let (width, height) = (image.width() / 8, image.height() / 8);
    let mut blocks = Vec::new();
    for by in 0..8 {
        for bx in 0..8 {
            let mut sum = 0.0;
            for y in by * height..(by + 1) * height {
                for x in bx * width..(bx + 1) * width {
                    sum += f64::from(image.get_pixel(x, y).0[0]);
                }
            }
            blocks.push(sum / f64::from(width * height));
        }
    }
    blocks
}

fn losses(dir: &Path) -> Vec<f64> {
    (metrics(dir).iter())
        .map(|line| line["loss"].as_f64().expect("loss"))
        .collect()
}

/// What the guard pipeline produced, per kind: thumbnails or loss curves.
fn guard_outputs(project: &Project) -> serde_json::Value {
    let class = output(project, "class");
    let mut class_images: Vec<PathBuf> = std::fs::read_dir(class.join("images"))
        .expect("class images")
        .map(|e| e.expect("entry").path())
        .collect();
    class_images.sort();
    let version = |kind: &str| {
        dreampipe::stages::registry()
            .get(kind)
            .expect(kind)
            .version()
    };
    serde_json::json!({
        "generate": {"version": version("generate"),
            "thumbnails": class_images.iter().map(|p| thumbnail(p)).collect::<Vec<_>>()},
        "textual_inversion": {"version": version("textual_inversion"),
            "losses": losses(&output(project, "ti"))},
        "dreambooth": {"version": version("dreambooth"),
            "losses": losses(&output(project, "db[mixed_precision=no]")),
            "bf16_losses": losses(&output(project, "db[mixed_precision=bf16]"))},
        "sample_grid": {"version": version("sample_grid"),
            "thumbnails": [thumbnail(&output(project, "grid").join("grid-0.png"))]},
        "dreambooth_lora": {"version": version("dreambooth_lora"),
            "losses": losses(&output(project, "lora")),
            "thumbnails": [thumbnail(&output(project, "lora_grid").join("grid-0.png"))]},
        "evaluate": {"version": version("evaluate"),
            "means": evaluate_means(&output(project, "eval"))},
        "finetune": {"version": version("finetune"),
            "losses": losses(&output(project, "ft"))},
        "vae": {"version": version("vae"),
            "losses": losses(&output(project, "ae"))},
        "world_score": {"version": version("world_score"),
            "means": world_means(&output(project, "world_scores"))},
    })
}

/// Every variant's world_score rates (-1 where a metric applies to none of its images).
fn world_means(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("scores.json")).expect("scores.json");
    let scores: serde_json::Value = serde_json::from_str(&text).expect("scores JSON");
    let metrics = dreampipe_kinds::sd::world_score::METRICS;
    (scores["overall"].as_array().expect("overall").iter())
        .flat_map(|variant| metrics.map(|(m, _)| variant[m]["mean"].as_f64().unwrap_or(-1.0)))
        .collect()
}

/// Every variant's mean DINO, CLIP-I, CLIP-T and PRES, in `scores.json` order.
fn evaluate_means(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("scores.json")).expect("scores.json");
    let scores: serde_json::Value = serde_json::from_str(&text).expect("scores JSON");
    let mut means = Vec::new();
    for variant in scores["overall"].as_array().expect("overall") {
        for metric in ["dino", "clip_i", "clip_t", "pres"] {
            means.push(variant[metric]["mean"].as_f64().expect("mean"));
        }
    }
    means
}

/// How far two lists of numbers are: the largest |a − b| / scale(b).
fn worst(found: &serde_json::Value, stored: &serde_json::Value, relative: bool) -> f64 {
    let numbers = |v: &serde_json::Value| -> Vec<f64> {
        let mut out = Vec::new();
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::Array(items) => stack.extend(items.iter().rev()),
                other => out.push(other.as_f64().unwrap_or(f64::NAN)),
            }
        }
        out
    };
    let (a, b) = (numbers(found), numbers(stored));
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    (a.iter().zip(&b))
        .map(|(x, y)| (x - y).abs() / if relative { y.abs().max(1e-12) } else { 1.0 })
        .fold(0.0, f64::max)
}

/// Versions that cannot go stale (docs/cache.md): each torch kind runs on the tiny model and
/// its outputs are compared with the ones stored for its current version. An output that
/// changed beyond float rounding while the version stayed fails until the version is bumped
/// (then results made by the old code are no longer served) and the reference is regenerated
/// with `DREAMPIPE_BLESS=1 cargo test --test torch kind_versions`.
#[test]
fn kind_versions_guard_their_outputs() {
    let eval_fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval");
    let guard = GUARD
        .replace("MODEL", &tiny_model())
        .replace("EVAL", &eval_fixtures.display().to_string());
    let project = project_with(&guard);
    assert_success(&run(&project, "train.yaml", &[]));
    let found = guard_outputs(&project);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(KIND_OUTPUTS);
    if std::env::var_os("DREAMPIPE_BLESS").is_some() {
        let text = serde_json::to_string_pretty(&found).expect("json") + "\n";
        std::fs::write(&path, text).expect("write the reference");
    }
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect(KIND_OUTPUTS)).expect("json");
    let checks = [
        ("generate", "thumbnails", false, GUARD_LEVELS),
        ("textual_inversion", "losses", true, GUARD_LOSS_RTOL),
        ("dreambooth", "losses", true, GUARD_LOSS_RTOL),
        ("dreambooth", "bf16_losses", true, GUARD_BF16_LOSS_RTOL),
        ("dreambooth_lora", "losses", true, GUARD_LOSS_RTOL),
        ("dreambooth_lora", "thumbnails", false, GUARD_LEVELS),
        ("sample_grid", "thumbnails", false, GUARD_LEVELS),
        ("evaluate", "means", false, GUARD_SCORES),
        ("finetune", "losses", true, GUARD_LOSS_RTOL),
        ("vae", "losses", true, GUARD_LOSS_RTOL),
        ("world_score", "means", false, 0.0),
    ];
    let bless = "DREAMPIPE_BLESS=1 cargo test --test torch kind_versions";
    for (kind, field, relative, tolerance) in checks {
        let (now, then) = (&found[kind]["version"], &stored[kind]["version"]);
        assert_eq!(
            now, then,
            "{kind} is at version {now} but {KIND_OUTPUTS} was made by version {then}: check the change is meant, then run `{bless}`"
        );
        let distance = worst(&found[kind][field], &stored[kind][field], relative);
        println!("{kind} {field}: {distance:e} from the reference");
        assert!(
            distance <= tolerance,
            "{kind} {field} changed by {distance:e} (allowed {tolerance:e}) with version {now} unchanged: bump `version()` in crates/kinds/src/sd/{kind}.rs, then run `{bless}`"
        );
    }
}

/// A DreamBooth steps sweep (validation every 3 steps, checkpoints every 2).
const STEPS_SWEEP: &str = r#"name: train
stages:
  db:
    kind: dreambooth
    model: MODEL
    instance_images: photos
    instance_prompt: a photo of sks dog
    resolution: 64
    train_batch_size: 1
    learning_rate: 1.0e-4
    lr_scheduler: SCHEDULE
    lr_warmup_steps: 2
    checkpointing_steps: 2
    validation_prompt: a photo of sks dog
    validation_steps: 3
    validation_inference_steps: 2
    matrix:
      max_train_steps: STEPS
"#;

const SWEPT_STEPS: [u64; 3] = [3, 6, 12];

fn steps_sweep(schedule: &str, steps: &str) -> String {
    STEPS_SWEEP
        .replace("MODEL", &tiny_model())
        .replace("SCHEDULE", schedule)
        .replace("STEPS", steps)
}

/// `run --message-format json`: the run record and the optimizer steps each stage executed
/// (its progress events).
fn run_counting_steps(project: &Project) -> (RunResult, std::collections::BTreeMap<String, u64>) {
    let output = command(project, "train.yaml", &["--message-format", "json"])
        .output()
        .expect("run dreampipe");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let mut steps = std::collections::BTreeMap::new();
    let mut record = None;
    for line in stdout.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("a JSON event");
        match event["event"].as_str() {
            Some("progress") => {
                *steps
                    .entry(event["id"].as_str().unwrap().to_string())
                    .or_insert(0) += 1
            }
            Some("run_finished") => {
                let path = event["record"].as_str().expect("record path");
                record = serde_json::from_slice(&std::fs::read(path).unwrap()).ok();
            }
            _ => {}
        }
    }
    let result = RunResult {
        stdout,
        stderr: String::from_utf8_lossy(&output.stderr).to_string(),
        output,
        record,
    };
    (result, steps)
}

/// Output digests of `max_train_steps` variants trained each on its own.
fn separate_digests(schedule: &str) -> Vec<serde_json::Value> {
    let project = project_with(&steps_sweep(schedule, "[3]"));
    SWEPT_STEPS
        .iter()
        .map(|steps| {
            project.write("train.yaml", &steps_sweep(schedule, &format!("[{steps}]")));
            let result = run(&project, "train.yaml", &[]);
            assert_success(&result);
            result.stage_field(&format!("db[max_train_steps={steps}]"), "output_digest")
        })
        .collect()
}

fn sweep_digests(result: &RunResult) -> Vec<serde_json::Value> {
    SWEPT_STEPS
        .iter()
        .map(|steps| result.stage_field(&format!("db[max_train_steps={steps}]"), "output_digest"))
        .collect()
}

/// A three-value steps sweep with a constant schedule trains once, to the largest count, and
/// each variant's output is bit for bit what training it alone gives (weights, metrics
/// truncated at its step, its validation samples naming it); `plan` says who serves whom.
#[test]
fn a_steps_sweep_trains_once_and_each_variant_equals_its_own_run() {
    let project = project_with(&steps_sweep("constant_with_warmup", "[3, 6, 12]"));
    let (ok, plan, _) = project.dreampipe(&["plan", "train.yaml"]);
    assert!(ok);
    for steps in [3, 6] {
        let line = format!(
            "  served db[max_train_steps={steps}]  from the 12-step run `db[max_train_steps=12]` at step {steps}\n"
        );
        assert!(plan.contains(&line), "{plan}");
    }
    let (result, steps) = run_counting_steps(&project);
    assert_success(&result);
    let executed: u64 = steps.values().sum();
    assert_eq!(executed, 12, "optimizer steps executed: {steps:?}");
    assert_eq!(result.with_status("ran").len(), 3);
    assert_eq!(
        sweep_digests(&result),
        separate_digests("constant_with_warmup")
    );
    let metrics_lines = metrics(&output(&project, "db[max_train_steps=6]")).len();
    assert_eq!(metrics_lines, 6);
}

/// A schedule that depends on the total (cosine) is not shared: each variant trains on its
/// own and `explain` says why.
#[test]
fn a_cosine_steps_sweep_is_not_shared() {
    let project = project_with(&steps_sweep("cosine", "[3, 6, 12]"));
    let (ok, explained, _) = project.dreampipe(&["explain", "train.yaml", "db"]);
    assert!(ok);
    assert!(
        explained.contains("not served by a longer run of the same stage: lr_scheduler `cosine` depends on the total steps (only constant and constant_with_warmup do not)"),
        "{explained}"
    );
    let (result, steps) = run_counting_steps(&project);
    assert_success(&result);
    assert_eq!(steps.values().sum::<u64>(), 3 + 6 + 12, "{steps:?}");
}

/// A shared run killed with SIGKILL after its first checkpoint resumes and still commits every
/// variant, each equal to the uninterrupted sweep's.
#[test]
fn a_killed_shared_run_resumes_and_commits_every_variant() {
    let pipeline = steps_sweep("constant", "[3, 6, 12]");
    let reference = project_with(&pipeline);
    let uninterrupted = run(&reference, "train.yaml", &[]);
    assert_success(&uninterrupted);
    let killed = project_with(&pipeline);
    let status = interrupt_after_first_checkpoint(&killed, "-KILL");
    assert_eq!(status.code(), None, "SIGKILL leaves no exit code");
    let resumed = run(&killed, "train.yaml", &[]);
    assert_success(&resumed);
    assert_eq!(sweep_digests(&resumed), sweep_digests(&uninterrupted));
}

/// Raising `max_train_steps` from 6 to 12 continues from the cached 6-step result's kept
/// training state: 6 more optimizer steps, and the result equals a straight 12-step run
/// (weights, metrics, validation samples renamed to the new stage). `cache gc --drop-states`
/// removes the kept states; the results stay.
#[test]
fn raising_max_train_steps_continues_the_cached_run() {
    let project = project_with(&steps_sweep("constant", "[6]"));
    let (first, steps) = run_counting_steps(&project);
    assert_success(&first);
    assert_eq!(steps.values().sum::<u64>(), 6);
    let states = project.cache().join("states");
    assert_eq!(std::fs::read_dir(&states).unwrap().count(), 1);

    project.write("train.yaml", &steps_sweep("constant", "[12]"));
    let (extended, steps) = run_counting_steps(&project);
    assert_success(&extended);
    assert_eq!(steps.values().sum::<u64>(), 6, "{steps:?}");
    let straight = project_with(&steps_sweep("constant", "[12]"));
    let reference = run(&straight, "train.yaml", &[]);
    assert_success(&reference);
    let id = "db[max_train_steps=12]";
    assert_eq!(
        extended.stage_field(id, "output_digest"),
        reference.stage_field(id, "output_digest")
    );

    let (ok, stdout, stderr) = project.dreampipe(&["cache", "gc", "--drop-states"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("removed 2 training state(s)"), "{stdout}");
    assert_eq!(std::fs::read_dir(&states).unwrap().count(), 0);
    assert_eq!(project.result_count(), 2);
}

/// `run --locked` checks the variants a shared run serves like any computed result: with the
/// cache gone, the sweep trains once again and every output digest matches the lock file.
#[test]
fn a_locked_rerun_checks_the_served_variants() {
    let project = project_with(&steps_sweep("constant", "[3, 6, 12]"));
    assert_success(&run(&project, "train.yaml", &[]));
    std::fs::remove_dir_all(project.cache()).unwrap();
    let (locked, steps) = {
        let output = command(
            &project,
            "train.yaml",
            &["--locked", "--message-format", "json"],
        )
        .output()
        .expect("run dreampipe");
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        let steps = stdout
            .lines()
            .filter(|l| l.contains("\"event\":\"progress\""))
            .count();
        (output, steps)
    };
    assert!(
        locked.status.success(),
        "{}",
        String::from_utf8_lossy(&locked.stderr)
    );
    assert_eq!(steps, 12);
}

/// A `textual_inversion` stage on the tiny SDXL through `dreampipe run`: both embedding files,
/// the A1111/ComfyUI `clip_l` + `clip_g` file, a `model/` with both extended tokenizers, a
/// validation sample rendered from it, and a rerun served from the cache.
#[test]
fn an_sdxl_textual_inversion_stage_writes_both_embeddings_and_validates() {
    let sdxl = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-sdxl");
    let project = project_with(&format!(
        "name: train\nstages:\n  photos_in:\n    kind: images\n    path: photos\n  ti:\n    kind: textual_inversion\n    model: {}\n    instance_images: photos_in\n    placeholder_token: <sks>\n    initializer_token: dog\n    num_vectors: 2\n    resolution: 64\n    train_batch_size: 2\n    max_train_steps: 2\n    learning_rate: 1.0e-2\n    validation_prompt: a photo of <sks> <sks>_1\n    validation_steps: 2\n    validation_inference_steps: 2\n",
        sdxl.display()
    ));
    assert_success(&run(&project, "train.yaml", &[]));
    let out = output(&project, "ti");
    let names = |file: &str| -> Vec<String> {
        tensors(&out.join(file))
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    };
    assert_eq!(names("learned_embeds.safetensors"), ["<sks>"]);
    assert_eq!(names("learned_embeds_2.safetensors"), ["<sks>"]);
    assert_eq!(names("sks.safetensors"), ["clip_g", "clip_l"]);
    for tokenizer in ["tokenizer", "tokenizer_2"] {
        let config = std::fs::read_to_string(
            out.join("model")
                .join(tokenizer)
                .join("tokenizer_config.json"),
        )
        .expect("tokenizer_config.json");
        assert!(config.contains("\"<sks>_1\""), "{tokenizer}: {config}");
    }
    let images = &report(&out)["images"];
    assert_eq!(images[0]["path"], "validation/step-2.png");
    assert!(out.join("validation/step-2.png").is_file());
    let again = run(&project, "train.yaml", &[]);
    assert_success(&again);
    assert!(again.stdout.contains("cached"), "{}", again.stdout);
}
