//! The `sample_grid` stage through the real binary on models/tiny-sd (CPU, 2 steps, 64×64):
//! one grid per prompt with rows = models × schedulers and columns = seeds, samples equal to
//! `dreampipe sample`, the manifest, a sweep upstream fanning the grid out, bad scheduler names.
mod stage_support;
use dreampipe::report::grid::GridLayout;
use dreampipe::sd::png::read_parameters_text;
use stage_support::*;
use std::path::Path;

const PROMPTS: [&str; 2] = ["a photo of a dog", "a red car"];

/// Pipeline `grid`: stage `copy` copies the tiny model (an upstream model stage), stage `grid`
/// samples it and the folder with `schedulers`.
fn write_pipeline(dir: &Path, schedulers: &str) -> std::path::PathBuf {
    let path = dir.join("grid.yaml");
    let model = tiny_model();
    let yaml = format!(
        "stages:\n  copy:\n    kind: command\n    run: cp -r '{model}'/. \"$OUT\"/\n  grid:\n    kind: sample_grid\n    models: [copy]\n    model_folders: ['{model}']\n    prompts: ['{}', '{}']\n    seed: 3\n    seed_count: 2\n    schedulers: {schedulers}\n    steps: 2\n    width: 64\n    height: 64\n",
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
        cell_width: 64,
        cell_height: 64,
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
        text.ends_with("Model: copy, dreampipe stage: grid"),
        "{text}"
    );
}

#[test]
fn bad_scheduler_name_fails_with_its_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = run_pipeline(
        &dir.path().join("cache"),
        &write_pipeline(dir.path(), "[ddim, dpm]"),
    );
    assert!(!output.status.success());
    let all = text(&output);
    assert!(
        all.contains(
            "stage `grid`: field `schedulers`: unknown scheduler \"dpm\"; use one of: ddim, pndm, lms, euler, euler-a, dpm++, ddpm"
        ),
        "{all}"
    );
}

/// The runner fans a stage out over a swept upstream instead of gathering the variants: two
/// `copy` variants give two grid stages, each reading one variant.
#[test]
fn a_swept_model_stage_fans_the_grid_out_per_variant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sweep.yaml");
    let yaml = "stages:\n  copy:\n    kind: command\n    matrix:\n      run: ['echo a', 'echo b']\n  grid:\n    kind: sample_grid\n    models: [copy]\n    prompts: [a dog]\n";
    std::fs::write(&path, yaml).expect("write");
    let pipeline = dreampipe::pipeline::load(&path, &Default::default()).expect("valid");
    let grids: Vec<_> = pipeline
        .stages
        .iter()
        .filter(|s| s.name == "grid")
        .collect();
    assert_eq!(grids.len(), 2);
    let mut upstreams: Vec<usize> = grids
        .iter()
        .map(|grid| {
            let refs = &grid.refs["models"];
            assert_eq!(refs.len(), 1, "{}", grid.id);
            refs[0].1
        })
        .collect();
    upstreams.dedup();
    assert_eq!(upstreams.len(), 2, "each grid reads its own variant");
    assert_eq!(grids[0].id, "grid[run=echo a]");
}
