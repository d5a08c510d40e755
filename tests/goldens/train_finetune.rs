//! Captioned fine-tuning against diffusers' train_text_to_image.py (tests/fixtures/finetune,
//! made by make_finetune_goldens.py): two optimizer steps of the UNet on a fixed batch of two
//! images with two different captions; plus a `finetune` stage on a `toy_world` stage.
use crate::sd_support::assert_mostly_within;
use crate::stage_support::*;
use dreampipe::sd::train::batch::StepBatch;
use dreampipe::sd::train::dreambooth::{DreamBoothConfig, DreamBoothTrainer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

const FIXTURES: &str = "tests/fixtures/finetune";
/// The DreamBooth goldens' tolerances: loss rtol 1e-4, weights atol 1e-5.
const LOSS_RTOL: f64 = 1e-4;
const WEIGHT_ATOL: f64 = 1e-5;

fn assert_rel(name: &str, found: f64, expected: f64) {
    let error = (found - expected).abs() / expected.abs();
    eprintln!("{name}: found {found}, expected {expected} (rel {error:e})");
    assert!(
        error <= LOSS_RTOL,
        "{name}: found {found}, expected {expected}"
    );
}

#[test]
fn two_captioned_steps_match_train_text_to_image() {
    let golden: HashMap<String, Tensor> =
        Tensor::read_safetensors(Path::new(FIXTURES).join("finetune.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(FIXTURES).join("finetune.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = DreamBoothConfig::new(
        PathBuf::from("models/tiny-sd"),
        dir.path().join("images"),
        "",
        dir.path().join("out"),
        dir.path().join("work"),
    );
    config.captions = true;
    config.training.learning_rate = record["lr"].as_f64().unwrap();
    let mut trainer = DreamBoothTrainer::new(&config, 2).unwrap();
    // The captions tokenise to the fixture's ids.
    let ids: Vec<Tensor> = (record["captions"].as_array().unwrap().iter())
        .map(|c| trainer.tokenize(c.as_str().unwrap()))
        .collect();
    assert!(Tensor::cat(&ids, 0).equal(&golden["input_ids"]));
    let batch = || StepBatch {
        latents: golden["latents"].shallow_clone(),
        noise: golden["noise"].shallow_clone(),
        timesteps: golden["timesteps"].shallow_clone(),
        input_ids: golden["input_ids"].shallow_clone(),
        xl: None,
    };
    let variables = trainer.unet_store().variables();
    for (index, step) in record["steps"].as_array().unwrap().iter().enumerate() {
        let report = trainer.train_step(&[batch()]).unwrap();
        assert_rel(
            &format!("loss {index}"),
            report.loss,
            step["loss"].as_f64().unwrap(),
        );
        let norm = report.grad_norm.unwrap();
        assert_rel(
            &format!("grad norm {index}"),
            norm,
            step["grad_norm"].as_f64().unwrap(),
        );
        for (name, expected) in golden
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("step{}.", index + 1)))
        {
            let variable = name.split_once('.').unwrap().1;
            let lr = record["lr"].as_f64().unwrap();
            assert_mostly_within(name, &variables[variable], expected, WEIGHT_ATOL, lr);
        }
    }
    let after = tch::no_grad(|| trainer.batch_loss(&batch()).unwrap().double_value(&[]));
    assert_rel(
        "loss after",
        after,
        record["loss_after_step2"].as_f64().unwrap(),
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// A toy world fine-tunes the tiny model: two steps from captioned images to a diffusers folder
/// that loads; an image without its caption fails naming the file.
#[test]
fn a_finetune_stage_trains_on_a_toy_world() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = format!(
        "name: ft\nstages:\n  world:\n    kind: toy_world\n    count: 4\n    size: 32\n    subject_images: 1\n  tune:\n    kind: finetune\n    model: {}\n    images: world\n    resolution: 32\n    train_batch_size: 2\n    max_train_steps: 2\n    learning_rate: 1.0e-4\n",
        tiny_model()
    );
    let cache = dir.path().join("cache");
    run_ok(&cache, &write(dir.path(), "ft.yaml", &pipeline));
    let out = stage_output(&cache, "ft", "tune");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 2);
    assert!(
        out.join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    dreampipe::sd::pipeline::StableDiffusion::load(&out, tch::Device::Cpu, tch::Kind::Float)
        .expect("the fine-tuned folder loads");

    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    image::RgbImage::new(32, 32)
        .save(photos.join("a.png"))
        .unwrap();
    let bad = format!(
        "name: bad\nstages:\n  tune:\n    kind: finetune\n    model: {}\n    images: photos\n    resolution: 32\n    max_train_steps: 1\n",
        tiny_model()
    );
    let output = run_pipeline(&cache, &write(dir.path(), "bad.yaml", &bad));
    assert!(!output.status.success());
    let caption = photos.join("a.txt");
    assert!(
        text(&output).contains(&format!(
            "{}: no caption file: captioned fine-tuning needs `name.txt` beside each `name.png`",
            caption.display()
        )),
        "{}",
        text(&output)
    );
}
