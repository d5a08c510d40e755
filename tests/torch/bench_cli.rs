//! `dreampipe bench txt2img|dreambooth` on the tiny model: the JSON records have the fields
//! bench/report.py reads, and the DreamBooth step does the same work as diffusers' (same seeded
//! draws, same losses).
use serde_json::Value;
use std::process::Command;

const TINY: &str = "models/tiny-sd";
/// Training-loss tolerance of tests/fixtures/sd-tiny/README.md.
const LOSS_RTOL: f64 = 1e-4;

fn dreampipe(args: &[&str]) -> std::process::Output {
    Command::new(crate::dreampipe())
        .args(["--device", "cpu", "bench"])
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("the dreampipe binary runs")
}

fn record(args: &[&str]) -> Value {
    let output = dreampipe(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench {args:?} failed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().expect("one JSON line");
    serde_json::from_str(line).expect("the line is JSON")
}

fn losses(record: &Value) -> Vec<f64> {
    record["losses"]
        .as_array()
        .expect("losses array")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect()
}

fn assert_losses(actual: &[f64], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            ((a - e) / e).abs() < LOSS_RTOL,
            "loss {a} vs diffusers {e} ({actual:?})"
        );
    }
}

/// Expected values: `bench/diffusers_bench.py dreambooth --model models/tiny-sd --resolution 64
/// --steps 2 [--train-text-encoder]` (torch 2.11.0, diffusers 0.42.1, transformers 5.24.0):
/// the warm-up step's loss then the two timed steps' losses, and the trainable parameter count.
#[test]
fn dreambooth_unet_step_matches_diffusers() {
    let record = record(&[
        "dreambooth",
        "--model",
        TINY,
        "--resolution",
        "64",
        "--steps",
        "2",
        "--threads",
        "1",
    ]);
    assert_eq!(record["bench"], "dreambooth");
    assert_eq!(record["impl"], "dreampipe");
    assert_eq!(record["train_text_encoder"], false);
    assert_eq!(record["trainable_params"], 1_427_012);
    assert_losses(
        &losses(&record),
        &[1.154431700706482, 1.095847249031067, 1.10648512840271],
    );
    let times = record["step_times_s"].as_array().expect("step times");
    assert_eq!(times.len(), 2);
    assert!(record["step_s"].as_f64().expect("step_s") > 0.0);
    assert!(record["peak_rss_mib"].as_f64().expect("rss") > 10.0);
}

#[test]
fn dreambooth_unet_and_text_encoder_step_matches_diffusers() {
    let record = record(&[
        "dreambooth",
        "--model",
        TINY,
        "--resolution",
        "64",
        "--steps",
        "2",
        "--threads",
        "1",
        "--train-text-encoder",
    ]);
    assert_eq!(record["train_text_encoder"], true);
    assert_eq!(record["trainable_params"], 1_527_933);
    assert_losses(
        &losses(&record),
        &[1.154431700706482, 1.0957566499710083, 1.106282114982605],
    );
}

#[test]
fn txt2img_record_has_step_rate_and_time_per_image() {
    let record = record(&[
        "txt2img",
        "--model",
        TINY,
        "--batch",
        "2",
        "--steps",
        "3",
        "--threads",
        "1",
    ]);
    assert_eq!(record["bench"], "txt2img");
    assert_eq!(
        record["size"], 64,
        "the tiny model's default size (sample_size 32 × VAE factor 2)"
    );
    assert_eq!(record["batch"], 2);
    assert_eq!(record["steps"], 3);
    assert_eq!(record["threads"], 1);
    let step = record["unet_step_s"].as_f64().expect("unet_step_s");
    let rate = record["unet_steps_per_s"]
        .as_f64()
        .expect("unet_steps_per_s");
    let total = record["e2e_s"].as_f64().expect("e2e_s");
    let per_image = record["e2e_s_per_image"].as_f64().expect("e2e_s_per_image");
    assert!(step > 0.0 && (rate * step - 1.0).abs() < 1e-2, "{record}");
    assert!(
        total >= 2.0 * step,
        "two timed intervals fit in the whole run: {record}"
    );
    assert!((per_image * 2.0 - total).abs() < 1e-3, "{record}");
}

#[test]
fn txt2img_with_one_step_is_refused_with_the_reason() {
    let output = dreampipe(&["txt2img", "--model", TINY, "--steps", "1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "--steps 1: must be at least 2 (the step rate is measured between step callbacks)"
        ),
        "{stderr}"
    );
}
