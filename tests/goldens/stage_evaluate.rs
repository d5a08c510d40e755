//! The `evaluate` stage through the real binary: on the fixed images of tests/fixtures/eval its
//! `scores.json` equals the reference computed with transformers 5.24.0
//! (make_eval_goldens.py) — same structure, every number within 1e-6; on the tiny model's
//! sample_grid it scores every variant and prompt, and the real images' embeddings are computed
//! once and reused from the cache by a second evaluate stage.
use crate::stage_support::*;
use serde_json::Value;
use std::path::Path;

/// The bound for the metrics against the transformers reference. Measured: 7.1e-8
/// (avx512, the reference's CPU), 1.3e-7 (avx2), 2.4e-7 (default kernels).
const METRIC_ATOL: f64 = 1e-6;
const FIXTURES: &str = "tests/fixtures/eval";

fn fixture(relative: &str) -> String {
    repo_path(&format!("{FIXTURES}/{relative}"))
        .display()
        .to_string()
}

fn models() -> String {
    format!(
        "    clip_model: '{}'\n    dino_model: '{}'\n",
        fixture("clip-tiny"),
        fixture("dino-tiny")
    )
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read JSON")).expect("JSON")
}

/// Asserts equal JSON structure (keys in order, strings, integers, booleans, nulls) and floats
/// within `atol`; returns the largest float difference.
fn assert_json_close(path: &str, actual: &Value, expected: &Value, atol: f64) -> f64 {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            let keys = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(a), keys(e), "{path}: keys");
            a.iter()
                .map(|(k, v)| assert_json_close(&format!("{path}.{k}"), v, &e[k], atol))
                .fold(0.0, f64::max)
        }
        (Value::Array(a), Value::Array(e)) => {
            assert_eq!(a.len(), e.len(), "{path}: length");
            a.iter()
                .zip(e)
                .enumerate()
                .map(|(i, (x, y))| assert_json_close(&format!("{path}[{i}]"), x, y, atol))
                .fold(0.0, f64::max)
        }
        (Value::Number(a), Value::Number(e)) if e.is_f64() => {
            let difference = (a.as_f64().unwrap() - e.as_f64().unwrap()).abs();
            assert!(
                difference <= atol,
                "{path}: {a} vs {e} (difference {difference:e})"
            );
            difference
        }
        _ => {
            assert_eq!(actual, expected, "{path}");
            0.0
        }
    }
}

#[test]
fn scores_of_fixed_images_equal_the_transformers_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = dir.path().join("scores.yaml");
    let yaml = format!(
        "stages:\n  eval:\n    kind: evaluate\n    generated: '{}'\n    real: '{}'\n{}    identifier: sks\n    class_prompt: a photo of dog\n    batch_size: 5\n",
        fixture("images/grid"),
        fixture("images/real"),
        models()
    );
    std::fs::write(&pipeline, yaml).expect("write pipeline");
    let cache = dir.path().join("cache");
    run_ok(&cache, &pipeline);
    let scores = read_json(&stage_output(&cache, "scores", "eval").join("scores.json"));
    let expected = read_json(&repo_path(&format!("{FIXTURES}/scores.json")));
    let worst = assert_json_close("scores", &scores, &expected, METRIC_ATOL);
    eprintln!("largest metric difference from the reference: {worst:e}");
    // The reference has PRES for both variants from the class-prompt rows.
    assert_eq!(scores["overall"][1]["model"], "db[learning_rate=2e-6]");
    assert_eq!(scores["overall"][1]["pres"]["n"], 2);
    assert_eq!(scores["overall"][1]["n"], 4);
}

/// Pipeline `grid-eval`: the tiny model and a copy of it (an upstream stage) sampled for a
/// subject prompt and the class prompt, scored against the fixture's real images (an images
/// stage); `eval2` scores the same grid against the same subject with another class prompt.
fn write_grid_pipeline(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("grid-eval.yaml");
    let model = tiny_model();
    let evaluate = |name: &str, class_prompt: &str| {
        format!(
            "  {name}:\n    kind: evaluate\n    generated: grid\n    real: dog\n{}    identifier: sks\n    class_prompt: {class_prompt}\n",
            models()
        )
    };
    let yaml = format!(
        "stages:\n  dog:\n    kind: images\n    path: '{}'\n  copy:\n    kind: command\n    run: cp -r '{model}'/. \"$OUT\"/\n  grid:\n    kind: sample_grid\n    models: [copy, '{model}']\n    prompts: [a photo of sks dog, a photo of dog]\n    seeds: [0, 1]\n    steps: 2\n    width: 64\n    height: 64\n{}{}",
        fixture("images/real"),
        evaluate("eval", "a photo of dog"),
        evaluate("eval2", "a dog"),
    );
    std::fs::write(&path, yaml).expect("write pipeline");
    path
}

#[test]
fn a_sample_grid_is_scored_per_variant_and_the_real_embeddings_are_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    run_ok(&cache, &write_grid_pipeline(dir.path()));
    let scores = read_json(&stage_output(&cache, "grid-eval", "eval").join("scores.json"));
    let per_image = scores["per_image"].as_array().expect("per_image");
    assert_eq!(per_image.len(), 2 * 2 * 2, "models x prompts x seeds");
    assert_eq!(per_image[0]["file"], "samples/copy/0/0.png");
    let groups = scores["groups"].as_array().expect("groups");
    let labels: Vec<(&str, &str, bool)> = groups
        .iter()
        .map(|g| {
            (
                g["model"].as_str().unwrap(),
                g["prompt"].as_str().unwrap(),
                g["class_prompt"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        labels,
        [
            ("copy", "a photo of sks dog", false),
            ("copy", "a photo of dog", true),
            ("tiny-sd", "a photo of sks dog", false),
            ("tiny-sd", "a photo of dog", true),
        ]
    );
    for variant in scores["overall"].as_array().expect("overall") {
        assert_eq!(
            (variant["n"].as_u64(), variant["pres"]["n"].as_u64()),
            (Some(2), Some(2))
        );
        // The variant's mean is the mean of its subject images' values.
        let model = variant["model"].as_str().unwrap();
        let values: Vec<f64> = per_image
            .iter()
            .filter(|i| i["model"] == model && i["class_prompt"] == false)
            .map(|i| i["clip_t"].as_f64().unwrap())
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!((variant["clip_t"]["mean"].as_f64().unwrap() - mean).abs() < 1e-15);
        for metric in ["dino", "clip_i", "clip_t"] {
            let value = variant[metric]["mean"].as_f64().unwrap();
            assert!((-1.0..=1.0).contains(&value), "{model} {metric} = {value}");
        }
    }
    // Both stages score against the same subject with the same models (one device slot under
    // `--device cpu`, so they run one after the other): one computes the real
    // embeddings, the other reuses them (whichever ran first).
    let logs = [
        stage_log(&cache, "grid-eval", "eval"),
        stage_log(&cache, "grid-eval", "eval2"),
    ];
    let computed = logs
        .iter()
        .filter(|l| l.contains("real embeddings: computed"))
        .count();
    let reused = logs
        .iter()
        .filter(|l| l.contains("real embeddings: reused"))
        .count();
    assert_eq!(
        (computed, reused),
        (1, 1),
        "logs:\n{}\n{}",
        logs[0],
        logs[1]
    );
    let second = read_json(&stage_output(&cache, "grid-eval", "eval2").join("scores.json"));
    // With class prompt "a dog" no image is a class-prompt image: no PRES, four subject images.
    assert_eq!(second["overall"][0]["pres"], Value::Null);
    assert_eq!(second["overall"][0]["n"], 4);
    assert_eq!(
        second["per_image"][0]["dino"],
        scores["per_image"][0]["dino"]
    );
}

/// Runs a one-stage evaluate pipeline with `fields` and returns the failure output.
fn failing_run(fields: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = dir.path().join("bad.yaml");
    std::fs::write(
        &pipeline,
        format!("stages:\n  eval:\n    kind: evaluate\n{fields}"),
    )
    .expect("write pipeline");
    let output = run_pipeline(&dir.path().join("cache"), &pipeline);
    assert!(!output.status.success(), "accepted:\n{}", text(&output));
    text(&output)
}

#[test]
fn bad_inputs_fail_with_the_stage_the_field_and_what_to_do() {
    // A folder of images has no prompts: `prompt` is asked for.
    let folder = failing_run(&format!(
        "    generated: '{}'\n    real: '{}'\n{}",
        fixture("images/real"),
        fixture("images/real"),
        models()
    ));
    assert!(
        folder.contains("stage `eval`: field `prompt`: the images of `real` carry no prompt; set `prompt:` to the prompt they were generated with"),
        "{folder}"
    );
    // A ViT folder given as the CLIP model.
    let swapped = failing_run(&format!(
        "    generated: '{}'\n    real: '{}'\n    clip_model: '{}'\n    dino_model: '{}'\n",
        fixture("images/grid"),
        fixture("images/real"),
        fixture("dino-tiny"),
        fixture("dino-tiny")
    ));
    let config = fixture("dino-tiny/config.json");
    assert!(
        swapped.contains(&format!("stage `eval`: field `clip_model`: {config}: not a CLIPModel config: 'text_config' and 'vision_config' are required (give a transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14)")),
        "{swapped}"
    );
    assert!(
        !swapped.contains("panicked") && !swapped.contains("Error {"),
        "{swapped}"
    );
}

#[test]
fn an_embed_stage_feeds_real_and_other_models_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = dir.path().join("embedded.yaml");
    let yaml = format!(
        "stages:\n  emb:\n    kind: embed\n    images: '{real}'\n{models}  eval:\n    kind: evaluate\n    generated: '{grid}'\n    real: emb\n{models}    identifier: sks\n    class_prompt: a photo of dog\n",
        real = fixture("images/real"),
        grid = fixture("images/grid"),
        models = models(),
    );
    std::fs::write(&pipeline, yaml).expect("write pipeline");
    let cache = dir.path().join("cache");
    run_ok(&cache, &pipeline);
    let scores = read_json(&stage_output(&cache, "embedded", "eval").join("scores.json"));
    let expected = read_json(&repo_path(&format!("{FIXTURES}/scores.json")));
    assert_json_close("scores", &scores, &expected, METRIC_ATOL);
    assert!(
        stage_log(&cache, "embedded", "eval")
            .contains("real embeddings: from the embed stage output")
    );
    let manifest = manifest(&stage_output(&cache, "embedded", "emb"));
    assert_eq!(
        manifest["images"],
        serde_json::json!(["0000.png", "0001.png", "0002.png"])
    );

    // A stored embed output given as a folder (so only the run can compare the models) to an
    // evaluate stage with another DINO folder (the same config text plus a newline).
    let other = dir.path().join("other.yaml");
    let embedded = stage_output(&cache, "embedded", "emb");
    let yaml = format!(
        "stages:\n  dino2:\n    kind: command\n    run: cp -r '{dino}'/. \"$OUT\"/ && echo >> \"$OUT\"/config.json\n  eval:\n    kind: evaluate\n    generated: '{grid}'\n    real: '{real}'\n    clip_model: '{clip}'\n    dino_model: dino2\n",
        dino = fixture("dino-tiny"),
        grid = fixture("images/grid"),
        real = embedded.canonicalize().unwrap().display(),
        clip = fixture("clip-tiny"),
    );
    std::fs::write(&other, yaml).expect("write pipeline");
    let output = run_pipeline(&cache, &other);
    let all = text(&output);
    assert!(!output.status.success(), "{all}");
    assert!(
        all.contains("stage `eval`: field `real`: ")
            && all.contains("embedded with another `dino_model` than this stage's; give the embed stage the same `dino_model`"),
        "{all}"
    );
}

/// `world_score` on the toy world's own pictures (their captions as prompts, from the world's
/// manifest): the classifier reads them as captioned — the ceiling a generated world can reach,
/// as the DreamBooth paper's "real images" row is for DINO — and the report ranks it in its
/// Scores section with the world's metrics.
#[test]
fn world_score_reads_the_worlds_own_pictures_as_captioned() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("world.yaml");
    std::fs::write(
        &pipeline,
        "name: world\nstages:\n  world:\n    kind: toy_world\n    count: 24\n    size: 32\n    subject_images: 1\n  score:\n    kind: world_score\n    generated: [world]\n",
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let output = run_ok(&cache, &pipeline);
    let scores = read_json(&stage_output(&cache, "world", "score").join("scores.json"));
    let overall = &scores["overall"][0];
    assert_eq!(
        (overall["model"].as_str(), overall["n"].as_u64()),
        (Some("world"), Some(24))
    );
    assert_eq!(overall["caption"]["count"], 24);
    assert!(
        overall["caption"]["mean"].as_f64().unwrap() >= 0.95,
        "{overall}"
    );
    assert_eq!(overall["no_stripes"]["mean"], 1.0);
    assert_eq!(
        overall["subject"],
        serde_json::json!({"mean": null, "count": 0})
    );
    let first = &scores["per_image"][0];
    assert_eq!(first["file"], "images/0000.png");
    assert!(
        first["prompt"].as_str().unwrap().ends_with("background"),
        "{first}"
    );
    let report = output
        .lines()
        .find_map(|line| line.strip_prefix("report: "))
        .expect("report path");
    let html = std::fs::read_to_string(report.trim()).unwrap();
    assert!(
        html.contains("<h2>Scores</h2>") && html.contains("<th>no stripes</th>"),
        "{html}"
    );
    assert!(
        !html.contains("Table 1"),
        "the paper's rows belong to evaluate's metrics only"
    );
}
