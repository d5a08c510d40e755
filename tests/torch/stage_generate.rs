//! The `generate` stage through the real binary on models/tiny-sd (CPU, 2 steps, 64×64): image i
//! has the pixels of `dreampipe sample --seed <seed+i>`, batches give the same images, raising
//! `count` reuses the memoized images, reruns are cached, and bad fields fail with their message.
use crate::stage_support::*;
use dreampipe::sd::png::read_parameters_text;
use std::path::Path;

const PROMPT: &str = "a photo of a dog";
const SEED: u64 = 7;
/// A batch runs the same noise through libtorch kernels that block differently for batch 2
/// than for batch 1 on CPU, so float rounding may move a pixel by one 8-bit level (measured: 1);
/// a wrong seed changes most pixels by far more.
const BATCH_LEVELS: u8 = 1;

/// A pipeline named `gen` with one `generate` stage `class`.
fn write_pipeline(dir: &Path, count: u64, batch_size: u64, scheduler: &str) -> std::path::PathBuf {
    let path = dir.join("gen.yaml");
    let yaml = format!(
        "stages:\n  class:\n    kind: generate\n    model: {}\n    prompt: {PROMPT}\n    count: {count}\n    scheduler: {scheduler}\n    steps: 2\n    width: 64\n    height: 64\n    seed: {SEED}\n    batch_size: {batch_size}\n",
        tiny_model()
    );
    std::fs::write(&path, yaml).expect("write pipeline");
    path
}

#[test]
fn images_equal_sample_with_seed_plus_index_for_any_batch_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one_by_one = dir.path().join("cache-1");
    let batched = dir.path().join("cache-2");
    run_ok(&one_by_one, &write_pipeline(dir.path(), 3, 1, "ddim"));
    run_ok(&batched, &write_pipeline(dir.path(), 3, 2, "ddim"));
    let single = stage_output(&one_by_one, "gen", "class");
    let batch = stage_output(&batched, "gen", "class");
    for index in 0..3u64 {
        let name = format!("images/{index:04}.png");
        let reference = dir.path().join(format!("sample-{index}.png"));
        sample(&reference, PROMPT, SEED + index, "ddim");
        assert_eq!(pixels(&reference).0, 64);
        let one_by_one = max_level_difference(&single.join(&name), &reference);
        assert_eq!(
            one_by_one, 0,
            "{name} (batch_size 1) differs by {one_by_one} levels"
        );
        let batched = max_level_difference(&batch.join(&name), &reference);
        assert!(
            batched <= BATCH_LEVELS,
            "{name} (batch_size 2) differs by {batched} levels"
        );
    }
    let other_seed = max_level_difference(
        &batch.join("images/0001.png"),
        &dir.path().join("sample-0.png"),
    );
    assert!(
        other_seed > BATCH_LEVELS,
        "seeds 7 and 8 gave the same image"
    );
    let parameters = read_parameters_text(&single.join("images/0001.png"))
        .expect("read PNG")
        .expect("parameters chunk");
    assert_eq!(
        parameters,
        format!(
            "{PROMPT}\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 8, Size: 64x64, Model hash: {}, Model: tiny-sd, dreampipe stage: class, dreampipe key: {}, dreampipe pipeline: gen",
            dreampipe::sd::png::short_weights_hash(&repo_path("models/tiny-sd")),
            stage_key(&one_by_one, "gen", "class")
        )
    );
    let manifest = manifest(&single);
    assert_eq!(
        manifest["images"][2],
        serde_json::json!({"file": "images/0002.png", "seed": 9, "prompt": PROMPT})
    );
    assert_eq!(manifest["images"].as_array().map(Vec::len), Some(3));
}

#[test]
fn raising_count_reuses_memoized_images_and_rerun_is_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    run_ok(&cache, &write_pipeline(dir.path(), 2, 1, "euler-a"));
    let first = stage_output(&cache, "gen", "class")
        .canonicalize()
        .expect("output");
    assert!(stage_log(&cache, "gen", "class").contains("generate: 2 generated, 0 reused"));

    let pipeline = write_pipeline(dir.path(), 3, 1, "euler-a");
    let rerun = run_ok(&cache, &pipeline);
    assert!(rerun.contains("[run]     class"), "{rerun}");
    let log = stage_log(&cache, "gen", "class");
    assert!(log.contains("generate: 1 generated, 2 reused"), "{log}");
    let second = stage_output(&cache, "gen", "class")
        .canonicalize()
        .expect("output");
    assert_ne!(first, second);
    let new_key = stage_key(&cache, "gen", "class");
    for name in ["images/0000.png", "images/0001.png"] {
        // Reused pixels, restamped with the new stage key.
        assert_eq!(
            max_level_difference(&first.join(name), &second.join(name)),
            0,
            "{name}"
        );
        let text = read_parameters_text(&second.join(name))
            .expect("read PNG")
            .expect("parameters chunk");
        assert!(
            text.ends_with(&format!(
                "dreampipe stage: class, dreampipe key: {new_key}, dreampipe pipeline: gen"
            )),
            "{text}"
        );
    }
    let reference = dir.path().join("sample-2.png");
    sample(&reference, PROMPT, SEED + 2, "euler-a");
    assert_eq!(
        max_level_difference(&second.join("images/0002.png"), &reference),
        0
    );

    let cached = run_ok(&cache, &pipeline);
    assert!(cached.contains("[cached]  class"), "{cached}");
}

#[test]
fn bad_scheduler_is_a_validation_error_with_a_suggestion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = run_pipeline(
        &dir.path().join("cache"),
        &write_pipeline(dir.path(), 1, 1, "eulr"),
    );
    assert!(!output.status.success());
    let all = text(&output);
    assert!(
        all.contains(
            "stage `class`, field `scheduler`: unknown value \"eulr\"; did you mean `euler`?"
        ),
        "{all}"
    );
}

/// Sets a file's mtime `days` days back.
fn age(path: &Path, days: u64) {
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open memo entry");
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(days * 86_400);
    file.set_modified(then).expect("set mtime");
}

fn memo_entries(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut list: Vec<_> = std::fs::read_dir(cache.join("shared/generate"))
        .expect("memo folder")
        .flatten()
        .map(|e| e.path())
        .collect();
    list.sort();
    list
}

/// Reusing a memo entry refreshes its mtime; `cache gc` prunes entries unused since before the
/// oldest surviving result and keeps the ones the rerun used.
#[test]
fn cache_gc_prunes_memo_entries_by_last_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    run_ok(&cache, &write_pipeline(dir.path(), 2, 1, "ddim"));
    let used = memo_entries(&cache);
    assert_eq!(used.len(), 2);
    for entry in &used {
        age(entry, 10);
    }
    let stale = cache.join("shared/generate/stale.png");
    std::fs::write(&stale, b"old memo").expect("write");
    age(&stale, 10);
    run_ok(&cache, &write_pipeline(dir.path(), 3, 1, "ddim"));
    assert!(stage_log(&cache, "gen", "class").contains("generate: 1 generated, 2 reused"));
    let output = std::process::Command::new(crate::dreampipe())
        .arg("--cache")
        .arg(&cache)
        .args(["cache", "gc", "--keep-last", "1"])
        .output()
        .expect("run gc");
    let all = text(&output);
    assert!(output.status.success(), "{all}");
    assert!(
        all.contains("removed 1 shared memo file(s) (8 bytes)"),
        "{all}"
    );
    assert!(!stale.exists());
    assert!(
        used.iter().all(|entry| entry.exists()),
        "reused entries stay"
    );
    assert_eq!(memo_entries(&cache).len(), 3);
}

#[test]
fn missing_model_is_a_validation_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gen.yaml");
    std::fs::write(
        &path,
        "stages:\n  class:\n    kind: generate\n    model: no-such-model\n    prompt: a dog\n    count: 1\n",
    )
    .expect("write");
    let error = dreampipe::pipeline::load(
        &path,
        &dreampipe::pipeline::LoadOptions::new(dreampipe::stages::registry()),
    )
    .err()
    .expect("rejected")
    .to_string();
    assert_eq!(
        error.replace(&path.display().to_string(), "gen.yaml"),
        "pipeline `gen.yaml` is invalid (1 error):\n  gen.yaml:4:5: stage `class`, field `model`: input `no-such-model` does not exist and is not a stage name (paths are relative to the pipeline's folder)"
    );
}

/// `loras` with `lora_scales`: the image is diffusers' with the LoRA at that weight
/// (tests/fixtures/lora), and the memo keeps runs with and without the LoRA apart.
#[test]
fn loras_apply_at_their_scales_and_enter_the_memo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lora = repo_path("tests/fixtures/lora/strong_a.safetensors");
    let pipeline = |loras: &str| {
        let path = dir.path().join("gen.yaml");
        let yaml = format!(
            "stages:\n  class:\n    kind: generate\n    model: {}\n    prompt: a photo of sks dog in a bucket\n    count: 1\n    steps: 4\n    seed: 1234\n{loras}",
            tiny_model()
        );
        std::fs::write(&path, yaml).expect("write pipeline");
        path
    };
    let cache = dir.path().join("cache");
    run_ok(&cache, &pipeline(""));
    let plain = stage_output(&cache, "gen", "class").join("images/0000.png");
    let plain_copy = dir.path().join("plain.png");
    std::fs::copy(&plain, &plain_copy).expect("copy");
    let with_lora = format!("    loras: [{}]\n    lora_scales: [0.5]\n", lora.display());
    run_ok(&cache, &pipeline(&with_lora));
    let image = stage_output(&cache, "gen", "class").join("images/0000.png");
    let golden: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(repo_path("tests/fixtures/lora/images.safetensors"))
            .expect("goldens")
            .into_iter()
            .collect();
    let expected = (&golden["a_scale_0.5"] * 255.0)
        .round()
        .to_kind(tch::Kind::Int);
    let expected: Vec<i64> = Vec::<i64>::try_from(expected.flatten(0, -1)).expect("pixels");
    let (_, _, found) = pixels(&image);
    let worst = found
        .iter()
        .zip(&expected)
        .map(|(a, b)| (i64::from(*a) - b).abs())
        .max()
        .expect("pixels");
    assert!(
        worst <= 1,
        "generate with the LoRA at 0.5: {worst} levels from diffusers"
    );
    let apart = max_level_difference(&image, &plain_copy);
    assert!(
        apart > 10,
        "the LoRA changed the image by {apart} levels only (memo served the plain image?)"
    );
}

/// A `loras` entry that is neither a `dreambooth_lora` output nor a LoRA file fails the stage
/// naming the field and the entry, in `generate` and `sample_grid` alike.
#[test]
fn a_loras_entry_that_is_not_a_lora_fails_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model();
    for (kind, fields) in [
        ("generate", "prompt: a dog\n    count: 1\n    steps: 1"),
        (
            "sample_grid",
            "models: [{model}]\n    prompts: [a dog]\n    seeds: [1]\n    steps: 1",
        ),
    ] {
        let path = dir.path().join(format!("{kind}.yaml"));
        let fields = fields.replace("{model}", &model);
        let model_field = if kind == "generate" {
            format!("    model: {model}\n")
        } else {
            String::new()
        };
        let yaml = format!(
            "stages:\n  s:\n    kind: {kind}\n{model_field}    {fields}\n    width: 64\n    height: 64\n    loras: [{model}]\n"
        );
        std::fs::write(&path, yaml).expect("write pipeline");
        let output = run_pipeline(&dir.path().join("cache"), &path);
        let all = text(&output);
        assert!(
            !output.status.success(),
            "{kind} ran with a model as a LoRA:\n{all}"
        );
        let expected = format!(
            "stage `s`: field `loras`: `{model}` is not a LoRA: give a `dreambooth_lora` stage or a LoRA .safetensors file"
        );
        assert!(
            all.contains(&expected),
            "{kind}: expected `{expected}` in:\n{all}"
        );
    }
}
