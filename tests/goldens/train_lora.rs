//! LoRA DreamBooth against diffusers + PEFT (tests/fixtures/lora, made by
//! make_lora_goldens.py from train_dreambooth_lora.py's setup): two optimizer steps on the
//! DreamBooth golden's prior-preservation batch, UNet adapters alone (rank 4, alpha 4) and with
//! text-encoder adapters (rank 2, alpha 3), starting from PEFT's stored initial draw. Plus a
//! whole run: its LoRA files load and change the image, base weights stay as they were.
use dreampipe::sd::lora::files::{DIFFUSERS_FILE, KOHYA_FILE};
use dreampipe::sd::lora::{Component, LoraWeights, ScaledLora};
use dreampipe::sd::pipeline::{StableDiffusion, Txt2Img, Txt2ImgError};
use dreampipe::sd::train::common::{Callbacks, StepBatch};
use dreampipe::sd::train::dreambooth::{self, DreamBoothConfig, DreamBoothTrainer};
use dreampipe::sd::train::lora::{self, LoraSettings};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use tch::{Device, Kind, Tensor};

const MODEL: &str = "models/tiny-sd";
const FIXTURES: &str = "tests/fixtures/lora";
/// The DreamBooth goldens' tolerances (tests/fixtures/sd-tiny/README.md): loss rtol 1e-4,
/// updated weights atol 1e-5.
const LOSS_RTOL: f64 = 1e-4;
const WEIGHT_ATOL: f64 = 1e-5;

fn tensors(file: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .collect()
}

fn record() -> serde_json::Value {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("lora.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_rel(name: &str, found: f64, expected: f64, rtol: f64) {
    let error = (found - expected).abs() / expected.abs();
    eprintln!("{name}: found {found}, expected {expected} (rel {error:e})");
    assert!(
        error <= rtol,
        "{name}: found {found}, expected {expected} (rel error {error:e})"
    );
}

fn config(dir: &Path, settings: LoraSettings, text: bool) -> DreamBoothConfig {
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
    config.dreambooth.train_text_encoder = text;
    config.training.learning_rate = 1e-3;
    config.lora = Some(settings);
    config
}

/// The worst difference between the trainer's adapters and the golden's `<prefix>.*`.
fn worst_difference(
    trainer: &DreamBoothTrainer,
    golden: &HashMap<String, Tensor>,
    prefix: &str,
) -> f64 {
    let mut worst: f64 = 0.0;
    for (name, tensor) in trainer.trainables() {
        let expected = &golden[&format!("{prefix}.{name}")];
        let difference = (tensor - expected).abs().max().double_value(&[]);
        worst = worst.max(difference);
    }
    worst
}

fn check_case(name: &str) {
    let record = record();
    let case = &record["cases"][name];
    let settings = LoraSettings {
        rank: case["rank"].as_i64().unwrap(),
        alpha: case["lora_alpha"].as_f64().unwrap(),
    };
    let text = case["train_text_encoder"].as_bool().unwrap();
    let golden = tensors(&Path::new(FIXTURES).join(format!("train_{name}.safetensors")));
    let batch_golden = tensors(Path::new(
        "tests/fixtures/sd-tiny/training/dreambooth.safetensors",
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = DreamBoothTrainer::new(&config(dir.path(), settings, text), 2).unwrap();
    // The adapters PEFT made, by the same names, and nothing else trains.
    let names: Vec<&String> = trainer.trainables().iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.len() as u64,
        case["trainable_tensors"].as_u64().unwrap()
    );
    let initial: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| ((*n).clone(), golden[&format!("init.{n}")].shallow_clone()))
        .collect();
    lora::set_adapter_weights(trainer.trainables(), &initial);
    let batch = || StepBatch {
        latents: batch_golden["latents"].shallow_clone(),
        noise: batch_golden["noise"].shallow_clone(),
        timesteps: batch_golden["timesteps"].shallow_clone(),
        input_ids: batch_golden["input_ids"].shallow_clone(),
        xl: None,
    };
    for (index, step) in case["steps"].as_array().unwrap().iter().enumerate() {
        let report = trainer.train_step(&[batch()]).unwrap();
        assert_rel(
            &format!("{name} loss {index}"),
            report.loss,
            step["loss"].as_f64().unwrap(),
            LOSS_RTOL,
        );
        let norm = report.grad_norm.unwrap();
        assert_rel(
            &format!("{name} grad norm {index}"),
            norm,
            step["grad_norm"].as_f64().unwrap(),
            LOSS_RTOL,
        );
        let worst = worst_difference(&trainer, &golden, &format!("step{}", index + 1));
        eprintln!("{name} step {}: adapters within {worst:e}", index + 1);
        assert!(
            worst <= WEIGHT_ATOL,
            "{name} step {}: adapters differ by {worst}",
            index + 1
        );
    }
    let after = tch::no_grad(|| trainer.batch_loss(&batch()).unwrap().double_value(&[]));
    assert_rel(
        &format!("{name} loss after"),
        after,
        case["loss_after_step2"].as_f64().unwrap(),
        LOSS_RTOL,
    );
}

#[test]
fn unet_adapters_train_as_diffusers_and_peft() {
    check_case("unet");
}

#[test]
fn unet_and_text_encoder_adapters_train_as_diffusers_and_peft() {
    check_case("unet_te");
}

#[test]
fn peft_initialisation_gaussian_down_zero_up() {
    let dir = tempfile::tempdir().unwrap();
    let settings = LoraSettings {
        rank: 4,
        alpha: 4.0,
    };
    let trainer = DreamBoothTrainer::new(&config(dir.path(), settings, true), 2).unwrap();
    let downs: Vec<Tensor> = trainer
        .trainables()
        .iter()
        .filter(|(n, _)| n.ends_with("lora_A.weight"))
        .map(|(_, t)| t.flatten(0, -1))
        .collect();
    let all = Tensor::cat(&downs, 0);
    let std = all.std(true).double_value(&[]);
    // std 1/rank = 0.25 over ~10k draws.
    assert!((std - 0.25).abs() < 0.01, "lora_A std {std}");
    for (name, tensor) in trainer.trainables() {
        if name.ends_with("lora_B.weight") {
            assert_eq!(
                tensor.abs().sum(Kind::Float).double_value(&[]),
                0.0,
                "{name}"
            );
        }
    }
}

fn write_images(dir: &Path, count: u32, tint: u8) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        let image = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([tint, (x * 8 + i * 20) as u8, (y * 8) as u8])
        });
        image.save(dir.join(format!("{i}.png"))).unwrap();
    }
}

fn render(model: &mut StableDiffusion, lora: Option<&LoraWeights>) -> Tensor {
    let request = Txt2Img {
        prompt: "a photo of sks dog".to_string(),
        negative_prompt: String::new(),
        seed: 3,
        steps: 3,
        guidance: 7.5,
        scheduler: None,
        width: Some(32),
        height: Some(32),
        batch: 1,
    };
    let loras: Vec<ScaledLora<'_>> = lora
        .map(|weights| ScaledLora {
            weights,
            scale: 1.0,
        })
        .into_iter()
        .collect();
    model
        .with_loras(&loras, |model| model.txt2img(&request, &mut |_| {}))
        .unwrap_or_else(|e: Txt2ImgError| panic!("{e}"))
        .images
}

#[test]
fn a_run_writes_lora_files_that_change_the_image() {
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("instance"), 3, 200);
    write_images(&dir.path().join("class"), 3, 40);
    let mut config = config(
        dir.path(),
        LoraSettings {
            rank: 4,
            alpha: 8.0,
        },
        true,
    );
    config.training.resolution = 32;
    config.training.train_batch_size = 1;
    config.training.max_train_steps = Some(4);
    config.training.learning_rate = 1e-2;
    let cancel = AtomicBool::new(false);
    let mut on_progress = |_: &_| {};
    let mut callbacks = Callbacks {
        on_progress: &mut on_progress,
        cancel: &cancel,
        validation: None,
        snapshots: None,
    };
    let outcome = dreambooth::train(&config, &mut callbacks).unwrap();
    assert_eq!(outcome.steps, 4);
    let out = dir.path().join("out");
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, [KOHYA_FILE, "metrics.jsonl", DIFFUSERS_FILE]);
    let diffusers = LoraWeights::read(&out.join(DIFFUSERS_FILE)).unwrap();
    let kohya = LoraWeights::read(&out.join(KOHYA_FILE)).unwrap();
    assert_eq!(diffusers.of(Component::Unet).count(), 48);
    assert_eq!(diffusers.of(Component::TextEncoder).count(), 20);
    assert!(
        kohya
            .modules
            .iter()
            .all(|m| m.alpha == Some(8.0) && m.rank() == 4)
    );
    let mut model = StableDiffusion::load(Path::new(MODEL), Device::Cpu, Kind::Float).unwrap();
    let base = render(&mut model, None);
    let with_diffusers = render(&mut model, Some(&diffusers));
    let with_kohya = render(&mut model, Some(&kohya));
    let effect = (&with_diffusers - &base).abs().max().double_value(&[]);
    assert!(
        effect > 1e-2,
        "the trained LoRA changes the image by {effect} only"
    );
    // The diffusers layout folds alpha / rank = 2 into `up`; both layouts are one update.
    let between = (&with_diffusers - &with_kohya)
        .abs()
        .max()
        .double_value(&[]);
    assert!(between < 1e-5, "layouts render {between} apart");
}

/// The memory options dreambooth has work on adapters too: gradient checkpointing recomputes
/// the UNet blocks and gives the same adapters; 8-bit AdamW trains them, also together with
/// checkpointing and bf16 mixed precision.
#[test]
fn gradient_checkpointing_and_8bit_adam_train_the_adapters() {
    let golden = tensors(Path::new(
        "tests/fixtures/sd-tiny/training/dreambooth.safetensors",
    ));
    let batch = || StepBatch {
        latents: golden["latents"].shallow_clone(),
        noise: golden["noise"].shallow_clone(),
        timesteps: golden["timesteps"].shallow_clone(),
        input_ids: golden["input_ids"].shallow_clone(),
        xl: None,
    };
    let settings = LoraSettings {
        rank: 4,
        alpha: 4.0,
    };
    let train = |checkpointing: bool, eight_bit: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), settings, true);
        config.training.gradient_checkpointing = checkpointing;
        if checkpointing && eight_bit {
            config.training.mixed_precision = dreampipe::sd::train::common::MixedPrecision::Bf16;
        }
        if eight_bit {
            config.training.optimizer = dreampipe::sd::train::common::OptimizerKind::AdamW8bit;
        }
        let mut trainer = DreamBoothTrainer::new(&config, 2).unwrap();
        for _ in 0..2 {
            trainer.train_step(&[batch()]).unwrap();
        }
        trainer
            .trainables()
            .iter()
            .map(|(n, t)| (n.clone(), t.detach().copy()))
            .collect::<Vec<_>>()
    };
    let plain = train(false, false);
    let checkpointed = train(true, false);
    let worst = plain
        .iter()
        .zip(&checkpointed)
        .map(|((_, a), (_, b))| (a - b).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(worst <= 1e-6, "checkpointed adapters differ by {worst}");
    let moved = plain
        .iter()
        .filter(|(n, _)| n.ends_with("lora_B.weight"))
        .map(|(_, t)| t.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "the adapters did not train ({moved})");
    let eight_bit = train(false, true);
    let everything = train(true, true); // + bf16 autocast
    assert!(
        everything
            .iter()
            .all(|(_, t)| t.isfinite().all().int64_value(&[]) == 1)
    );
    assert!(
        eight_bit
            .iter()
            .all(|(_, t)| t.isfinite().all().int64_value(&[]) == 1)
    );
}
