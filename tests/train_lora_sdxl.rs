//! SDXL LoRA DreamBooth against diffusers + PEFT (tests/fixtures/sdxl-tiny, made by
//! make_sdxl_train_goldens.py from train_dreambooth_lora_sdxl.py's setup): two optimizer steps
//! on a fixed prior-preservation batch (one instance, one class image; per-image time ids),
//! UNet adapters alone (rank 4, alpha 4) and with both text encoders' (rank 2, alpha 3),
//! starting from PEFT's stored initial draw.
use dreampipe::sd::train::batch::{StepBatch, XlBatch};
use dreampipe::sd::train::dreambooth::{DreamBoothConfig, DreamBoothTrainer};
use dreampipe::sd::train::lora::{self, LoraSettings};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

const FIXTURES: &str = "tests/fixtures/sdxl-tiny";
/// The DreamBooth goldens' tolerances: loss rtol 1e-4, adapters atol 1e-5.
const LOSS_RTOL: f64 = 1e-4;
const WEIGHT_ATOL: f64 = 1e-5;

fn tensors(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(Path::new(FIXTURES).join(name))
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_rel(name: &str, found: f64, expected: f64) {
    let error = (found - expected).abs() / expected.abs();
    eprintln!("{name}: found {found}, expected {expected} (rel {error:e})");
    assert!(
        error <= LOSS_RTOL,
        "{name}: found {found}, expected {expected}"
    );
}

fn batch(golden: &HashMap<String, Tensor>) -> StepBatch {
    StepBatch {
        latents: golden["latents"].shallow_clone(),
        noise: golden["noise"].shallow_clone(),
        timesteps: golden["timesteps"].shallow_clone(),
        input_ids: golden["input_ids"].shallow_clone(),
        xl: Some(XlBatch {
            input_ids_2: golden["input_ids_2"].shallow_clone(),
            time_ids: golden["time_ids"].shallow_clone(),
        }),
    }
}

fn check_case(name: &str) {
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(FIXTURES).join("train_lora.json")).unwrap(),
    )
    .unwrap();
    let case = &record["cases"][name];
    let settings = LoraSettings {
        rank: case["rank"].as_i64().unwrap(),
        alpha: case["lora_alpha"].as_f64().unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = DreamBoothConfig::new(
        PathBuf::from(FIXTURES).join("model"),
        dir.path().join("instance"),
        "a photo of sks dog",
        dir.path().join("out"),
        dir.path().join("work"),
    );
    config.dreambooth.with_prior_preservation = true;
    config.class_data_dir = Some(dir.path().join("class"));
    config.dreambooth.class_prompt = Some("a photo of dog".to_string());
    config.dreambooth.train_text_encoder = case["train_text_encoder"].as_bool().unwrap();
    config.training.learning_rate = record["lr"].as_f64().unwrap();
    config.lora = Some(settings);
    let golden = tensors(&format!("train_lora_{name}.safetensors"));
    let mut trainer = DreamBoothTrainer::new(&config, 2).unwrap();
    let names: Vec<String> = trainer
        .trainables()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        names.len() as u64,
        case["trainable_tensors"].as_u64().unwrap()
    );
    let initial: Vec<(String, Tensor)> = (names.iter())
        .map(|n| (n.clone(), golden[&format!("init.{n}")].shallow_clone()))
        .collect();
    lora::set_adapter_weights(trainer.trainables(), &initial);
    let inputs = tensors("train_batch.safetensors");
    for (index, step) in case["steps"].as_array().unwrap().iter().enumerate() {
        let report = trainer.train_step(&[batch(&inputs)]).unwrap();
        assert_rel(
            &format!("{name} loss {index}"),
            report.loss,
            step["loss"].as_f64().unwrap(),
        );
        let norm = report.grad_norm.unwrap();
        assert_rel(
            &format!("{name} grad norm {index}"),
            norm,
            step["grad_norm"].as_f64().unwrap(),
        );
        let worst = (trainer.trainables().iter())
            .map(|(n, t)| {
                let expected = &golden[&format!("step{}.{n}", index + 1)];
                (t - expected).abs().max().double_value(&[])
            })
            .fold(0.0, f64::max);
        eprintln!("{name} step {}: adapters within {worst:e}", index + 1);
        assert!(worst <= WEIGHT_ATOL, "{name} step {}: {worst}", index + 1);
    }
    let after = tch::no_grad(|| {
        trainer
            .batch_loss(&batch(&inputs))
            .unwrap()
            .double_value(&[])
    });
    assert_rel(
        &format!("{name} loss after"),
        after,
        case["loss_after_step2"].as_f64().unwrap(),
    );
}

#[test]
fn sdxl_unet_adapters_train_as_diffusers_and_peft() {
    check_case("unet");
}

#[test]
fn sdxl_unet_and_both_text_encoders_adapters_train_as_diffusers_and_peft() {
    check_case("unet_te");
}
