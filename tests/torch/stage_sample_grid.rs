//! The `sample_grid` stage through the real binary on models/tiny-sd (CPU, 2 steps, 64×64):
//! one grid per prompt with rows = models × schedulers × steps × guidance and columns = seeds,
//! samples equal to `dreampipe sample`, the manifest, a swept upstream gathered into one grid
//! (one row per variant), bad scheduler names rejected at validation.
use crate::stage_support::*;
use dreampipe::kinds::grid::GridLayout;
use dreampipe::sd::png::read_parameters_text;
use std::path::Path;

const PROMPTS: [&str; 2] = ["a photo of a dog", "a red car"];

/// Pipeline `grid`: stage `copy` copies the tiny model (an upstream model stage), stage `grid`
/// samples it and the folder (one `models` list) with `schedulers`.
fn write_pipeline(dir: &Path, schedulers: &str) -> std::path::PathBuf {
    let path = dir.join("grid.yaml");
    let model = tiny_model();
    let yaml = format!(
        "stages:\n  copy:\n    kind: command\n    run: cp -r '{model}'/. \"$OUT\"/\n  grid:\n    kind: sample_grid\n    models: [copy, '{model}']\n    prompts: ['{}', '{}']\n    seeds: [3, 4]\n    schedulers: {schedulers}\n    steps: 2\n    width: 64\n    height: 64\n",
        PROMPTS[0], PROMPTS[1]
    );
    std::fs::write(&path, yaml).expect("write pipeline");
    path
}

#[test]
fn grids_have_one_row_per_model_and_scheduler_and_one_column_per_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    run_ok(&cache, &write_pipeline(dir.path(), "[ddim, euler-a]"));
    let out = stage_output(&cache, "grid", "grid");
    let expected = GridLayout {
        rows: 4,
        columns: 2,
        // The tiny model's 64 px samples, drawn twice as large (under MIN_CELL_SIDE).
        cell_width: 128,
        cell_height: 128,
        scale: 2,
        has_title: true,
    };
    for index in 0..PROMPTS.len() {
        let (width, height, _) = pixels(&out.join(format!("grid-{index}.png")));
        assert_eq!((width, height), (expected.width(), expected.height()));
    }
    let manifest = manifest(&out);
    let images = manifest["images"].as_array().expect("images");
    assert_eq!(images.len(), 2 * 2 * 2 * 2);
    let entry = images
        .iter()
        .find(|e| {
            e["model"] == "tiny-sd"
                && e["scheduler"] == "euler-a"
                && e["seed"] == 4
                && e["prompt_index"] == 1
        })
        .expect("entry for tiny-sd, euler-a, seed 4, prompt 1");
    assert_eq!(
        *entry,
        serde_json::json!({
            "file": "samples/tiny-sd/1/4-euler-a.png",
            "model": "tiny-sd",
            "prompt": PROMPTS[1],
            "prompt_index": 1,
            "seed": 4,
            "scheduler": "euler-a",
            "steps": 2,
            "guidance": 7.5,
        })
    );
    assert_eq!(
        manifest["grids"][1],
        serde_json::json!({"file": "grid-1.png", "prompt": PROMPTS[1]})
    );
    let reference = dir.path().join("reference.png");
    sample(&reference, PROMPTS[1], 4, "euler-a");
    let from_folder = out.join("samples/tiny-sd/1/4-euler-a.png");
    assert_eq!(max_level_difference(&from_folder, &reference), 0);
    let from_stage = out.join("samples/copy/1/4-euler-a.png");
    assert_eq!(max_level_difference(&from_stage, &reference), 0);
    let text = read_parameters_text(&from_stage)
        .expect("read PNG")
        .expect("parameters chunk");
    assert!(
        text.starts_with(&format!(
            "{}\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 4, Size: 64x64",
            PROMPTS[1]
        )),
        "{text}"
    );
    assert!(
        text.ends_with(&format!(
            "Model: copy, dreampipe stage: grid, dreampipe key: {}, dreampipe pipeline: grid",
            stage_key(&cache, "grid", "grid")
        )),
        "{text}"
    );
    // The grid carries its recipe too: the first cell's parameters, the stage, the layout.
    let grid_text = read_parameters_text(&out.join("grid-1.png"))
        .expect("read grid PNG")
        .expect("grid parameters chunk");
    assert_eq!(
        grid_text,
        format!(
            "{}\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 64x64, Model hash: {}, \
             Model: copy, dreampipe stage: grid, dreampipe key: {}, dreampipe pipeline: grid, \
             dreampipe grid rows: copy · ddim | copy · euler-a | tiny-sd · ddim | tiny-sd · euler-a, \
             dreampipe grid columns: seed 3 | seed 4",
            PROMPTS[1],
            grid_text
                .split("Model hash: ")
                .nth(1)
                .and_then(|t| t.split(',').next())
                .unwrap_or(""),
            stage_key(&cache, "grid", "grid")
        )
    );
}

#[test]
fn bad_scheduler_name_is_rejected_by_validation_with_a_suggestion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = run_pipeline(
        &dir.path().join("cache"),
        &write_pipeline(dir.path(), "[ddim, dpm]"),
    );
    assert!(!output.status.success());
    let all = text(&output);
    assert!(
        all.contains(
            "stage `grid`, field `schedulers`: unknown value \"dpm\"; did you mean `ddpm`?"
        ),
        "{all}"
    );
}

/// `db` sweeps two copies of the tiny model; `models: [db]` gathers both into one grid stage
/// with one row per variant (labelled with the variant id), × two step counts.
#[test]
fn a_swept_model_stage_is_gathered_into_one_grid_with_a_row_per_variant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sweep.yaml");
    let model = tiny_model();
    let yaml = format!(
        "stages:\n  db:\n    kind: command\n    matrix:\n      run: [\"cp -r '{model}'/. $OUT/\", \"cp -r '{model}'/. $OUT/ && echo 2 > $OUT/variant.txt\"]\n  grid:\n    kind: sample_grid\n    models: [db]\n    prompts: [a dog]\n    seeds: 5\n    steps: [1, 2]\n    schedulers: [ddim]\n    width: 64\n    height: 64\n"
    );
    std::fs::write(&path, yaml).expect("write");
    let options = dreampipe::pipeline::LoadOptions::new(dreampipe::stages::registry());
    let pipeline = dreampipe::pipeline::load(&path, &options).expect("valid");
    let grids: Vec<_> = pipeline
        .stages
        .iter()
        .filter(|s| s.name == "grid")
        .collect();
    assert_eq!(grids.len(), 1, "one grid stage for the whole sweep");
    assert_eq!(grids[0].id, "grid");
    assert_eq!(grids[0].refs["models"].len(), 2);

    let cache = dir.path().join("cache");
    run_ok(&cache, &path);
    let out = stage_output(&cache, "sweep", "grid");
    let expected = GridLayout {
        rows: 4,
        columns: 1,
        // The tiny model's 64 px samples, drawn twice as large (under MIN_CELL_SIDE).
        cell_width: 128,
        cell_height: 128,
        scale: 2,
        has_title: true,
    };
    let (width, height, _) = pixels(&out.join("grid-0.png"));
    assert_eq!((width, height), (expected.width(), expected.height()));
    let manifest = manifest(&out);
    let rows: Vec<(String, String, i64)> = manifest["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|e| {
            (
                e["model"].as_str().expect("model").to_string(),
                e["file"].as_str().expect("file").to_string(),
                e["steps"].as_i64().expect("steps"),
            )
        })
        .collect();
    let first = format!("db[run=cp -r '{model}'/. $OUT/]");
    let second = format!("db[run=cp -r '{model}'/. $OUT/ && echo 2 > $OUT/variant.txt]");
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].0, first);
    assert_eq!(rows[0].2, 1);
    assert_eq!(rows[1].2, 2);
    assert_eq!(rows[2].0, second);
    assert!(
        rows[1].1.ends_with("/0/5-ddim-s2.png"),
        "steps vary, so file names carry them: {}",
        rows[1].1
    );
    let reference = dir.path().join("reference.png");
    sample(&reference, "a dog", 5, "ddim");
    let two_steps = out.join(&rows[3].1);
    assert_eq!(max_level_difference(&two_steps, &reference), 0);
}

/// `loras` with `lora_weights` apply to every row: the tiny model with two LoRAs at 0.5 and 1.0
/// renders diffusers' `set_adapters(["a", "b"], [0.5, 1.0])` image (tests/fixtures/lora).
#[test]
fn loras_apply_to_every_row_at_their_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = repo_path("tests/fixtures/lora/strong_a.safetensors");
    let b = repo_path("tests/fixtures/lora/strong_b_kohya.safetensors");
    let yaml = format!(
        "name: lg\nstages:\n  grid:\n    kind: sample_grid\n    models: [{}]\n    loras: [{}, {}]\n    lora_weights: [0.5, 1.0]\n    prompts: [a photo of sks dog in a bucket]\n    seeds: [1234]\n    steps: 4\n    guidance: 7.5\n",
        tiny_model(),
        a.display(),
        b.display()
    );
    let path = dir.path().join("lg.yaml");
    std::fs::write(&path, yaml).expect("write pipeline");
    let cache = dir.path().join("cache");
    run_ok(&cache, &path);
    let out = stage_output(&cache, "lg", "grid");
    let manifest = manifest(&out);
    let file = manifest["images"][0]["file"].as_str().expect("file");
    let golden: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(repo_path("tests/fixtures/lora/images.safetensors"))
            .expect("goldens")
            .into_iter()
            .collect();
    let expected = (&golden["a_0.5_b_1"] * 255.0)
        .round()
        .to_kind(tch::Kind::Int);
    let expected: Vec<i64> = Vec::<i64>::try_from(expected.flatten(0, -1)).expect("pixels");
    let (_, _, found) = pixels(&out.join(file));
    let worst = (found.iter().zip(&expected))
        .map(|(p, e)| (i64::from(*p) - e).abs())
        .max()
        .expect("pixels");
    assert!(
        worst <= 1,
        "the grid's image is {worst} levels from diffusers'"
    );
}
