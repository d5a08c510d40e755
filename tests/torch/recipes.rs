//! The shipped pipelines in `pipelines/`: every recipe validates, plans and dry-runs against the
//! bundled tiny model with its sweeps expanded as documented; each recipe also runs end to end
//! on the tiny model with its sizes shrunk by `--set`; `pipelines/demo.yaml` runs end to end
//! with the real binary (every stage, the grid, a report that loads in headless Chromium —
//! required: `apt-get install -y chromium`) and a rerun finds everything cached.
use dreampipe::report::browser::check_page;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One torch thread: on the 2 shared cores of CI, OpenMP's spinning threads made the demo 5–10×
/// slower (measured: 16–20 s with 1 thread, 95–200 s with 2 or the default under load).
const TORCH_THREADS: &str = "1";

/// Each recipe: its file, the stage count before and after sweep expansion, and the stage ids
/// after expansion in plan order.
const RECIPES: [(&str, usize, &[&str]); 8] = [
    (
        "demo.yaml",
        9,
        &[
            "instance",
            "class_images",
            "ti",
            "db",
            "grid",
            "clip",
            "dino",
            "instance_embeddings",
            "eval",
        ],
    ),
    (
        "objects.yaml",
        7,
        &[
            "instance",
            "db[learning_rate=2e-6,max_train_steps=200]",
            "db[learning_rate=2e-6,max_train_steps=400]",
            "db[learning_rate=2e-6,max_train_steps=800]",
            "db[learning_rate=5e-6,max_train_steps=200]",
            "db[learning_rate=5e-6,max_train_steps=400]",
            "db[learning_rate=5e-6,max_train_steps=800]",
            "grid",
            "clip",
            "dino",
            "instance_embeddings",
            "eval",
        ],
    ),
    (
        "faces.yaml",
        9,
        &[
            "instance",
            "class_images",
            "db_prior[learning_rate=1e-6,max_train_steps=800]",
            "db_prior[learning_rate=1e-6,max_train_steps=1200]",
            "db_prior[learning_rate=2e-6,max_train_steps=800]",
            "db_prior[learning_rate=2e-6,max_train_steps=1200]",
            "db_plain[learning_rate=1e-6,max_train_steps=800]",
            "db_plain[learning_rate=1e-6,max_train_steps=1200]",
            "db_plain[learning_rate=2e-6,max_train_steps=800]",
            "db_plain[learning_rate=2e-6,max_train_steps=1200]",
            "grid",
            "clip",
            "dino",
            "instance_embeddings",
            "eval",
        ],
    ),
    (
        "schedulers.yaml",
        7,
        &[
            "instance",
            "db",
            "grid",
            "clip",
            "dino",
            "instance_embeddings",
            "eval",
        ],
    ),
    (
        "text-encoder.yaml",
        8,
        &[
            "instance",
            "class_images",
            "db[train_text_encoder=false]",
            "db[train_text_encoder=true]",
            "grid",
            "clip",
            "dino",
            "instance_embeddings",
            "eval",
        ],
    ),
    (
        "lora-vs-dreambooth.yaml",
        9,
        &[
            "instance",
            "class_images",
            "db",
            "lora",
            "grid",
            "clip",
            "dino",
            "instance_embeddings",
            "eval",
        ],
    ),
    (
        "sdxl-lora.yaml",
        8,
        &[
            "instance",
            "class_images",
            "lora",
            "grid",
            "clip",
            "dino",
            "instance_embeddings",
            "eval",
        ],
    ),
    (
        "ti-then-dreambooth.yaml",
        9,
        &[
            "instance",
            "ti",
            "ti_db",
            "db",
            "grid",
            "clip",
            "dino",
            "instance_embeddings",
            "eval",
        ],
    ),
];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of `pipelines/` (recipes and data) in a temporary folder, beside a link to the
/// repository's `models/`, so that the `<pipeline>.lock` files runs write stay out of the
/// source tree. Its `cache/` is the cache.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(
            &repo_root().join("pipelines"),
            &dir.path().join("pipelines"),
        );
        std::os::unix::fs::symlink(repo_root().join("models"), dir.path().join("models")).unwrap();
        Self { dir }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Runs the binary on the CPU in the workspace; returns (success, stdout, stderr).
    fn dreampipe(&self, args: &[&str]) -> (bool, String, String) {
        dreampipe(self.dir.path(), &self.cache(), args)
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else if !entry.file_name().to_string_lossy().ends_with(".lock") {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs the binary on the CPU in `cwd` with `cache` as its cache; returns (success, stdout,
/// stderr).
fn dreampipe(cwd: &Path, cache: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(crate::dreampipe())
        .current_dir(cwd)
        .env("OMP_NUM_THREADS", TORCH_THREADS)
        .env_remove("DREAMPIPE_DEVICE")
        .arg("--device")
        .arg("cpu")
        .arg("--cache")
        .arg(cache)
        .args(args)
        .output()
        .expect("start the dreampipe binary");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn recipe(file: &str) -> String {
    format!("pipelines/{file}")
}

#[test]
fn the_recipe_list_covers_every_pipeline_file() {
    let mut files: Vec<String> = std::fs::read_dir(repo_root().join("pipelines"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut listed: Vec<String> = RECIPES.iter().map(|(f, _, _)| f.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed);
}

#[test]
fn every_recipe_validates_plans_and_dry_runs_on_the_tiny_model() {
    let work = Workspace::new();
    for (file, stages, ids) in RECIPES {
        let path = recipe(file);
        let (ok, stdout, stderr) = work.dreampipe(&["validate", &path]);
        assert!(ok, "{file}: {stderr}");
        let name = file.trim_end_matches(".yaml");
        assert_eq!(
            stdout,
            format!(
                "pipeline `{name}` is valid: {stages} stage(s), {} after sweep expansion\n",
                ids.len()
            )
        );
        for verb in [&["plan", path.as_str()][..], &["run", "--dry-run", &path]] {
            let (ok, stdout, stderr) = work.dreampipe(verb);
            assert!(ok, "{file} {verb:?}: {stderr}");
            let header = format!(
                "plan for `{name}`: {count} stage(s), 0 fresh, {count} to run\n",
                count = ids.len()
            );
            assert!(stdout.starts_with(&header), "{file} {verb:?}: {stdout}");
            let planned: Vec<&str> = stdout
                .lines()
                .skip(1)
                .map(|line| line.split_whitespace().nth(1).unwrap_or_default())
                .collect();
            assert_eq!(planned, ids, "{file} {verb:?}: {stdout}");
        }
    }
    assert!(
        std::fs::read_dir(work.cache().join("results"))
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(true),
        "plan and --dry-run must not compute anything"
    );
}

/// `--set` values that shrink every recipe to seconds on the tiny model (64 px, 2 steps).
fn shrunk(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join(recipe(file))).unwrap();
    let mut sets = vec![
        "params.resolution=64".to_string(),
        "grid.steps=[2]".to_string(),
        "grid.seeds=[0]".to_string(),
        "grid.prompts=[a photo]".to_string(),
    ];
    if text.contains("clip_like:") {
        // The test fixtures' tiny CLIP / ViT instead of 1.7 GB of random ViT-L/14 weights.
        sets.push("params.clip_like=clip-tiny".to_string());
        sets.push("params.dino_like=dino-tiny".to_string());
    }
    if text.contains("class_count:") {
        sets.push("params.class_count=2".to_string());
        sets.push("class_images.steps=2".to_string());
    }
    let swept = swept_steps(&text);
    if !swept.is_empty() {
        let shrunk: Vec<String> = (1..=swept.len()).map(|n| n.to_string()).collect();
        sets.push(format!("params.steps=[{}]", shrunk.join(", ")));
    }
    for stage in ["db", "db_prior", "db_plain", "ti", "ti_db", "lora"] {
        if text.contains(&format!("\n  {stage}:\n")) {
            if swept.is_empty() {
                sets.push(format!("{stage}.max_train_steps=2"));
            }
            sets.push(format!("{stage}.train_batch_size=1"));
        }
    }
    sets.into_iter()
        .flat_map(|set| ["--set".to_string(), set])
        .collect()
}

/// The `steps: [..]` a recipe sweeps `max_train_steps` over (`params.steps`), if any.
fn swept_steps(text: &str) -> Vec<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("  steps: ["))
        .and_then(|rest| rest.split(']').next())
        .map(|list| list.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default()
}

/// A stage id with the swept steps replaced by their shrunk values (1, 2, …).
fn shrunk_id(id: &str, swept: &[String]) -> String {
    swept
        .iter()
        .enumerate()
        .fold(id.to_string(), |id, (i, steps)| {
            id.replace(
                &format!("max_train_steps={steps}]"),
                &format!("max_train_steps={}]", i + 1),
            )
        })
}

#[test]
fn every_recipe_runs_on_the_tiny_model_when_shrunk() {
    let work = Workspace::new();
    for (file, _, ids) in RECIPES.iter().filter(|(f, _, _)| *f != "demo.yaml") {
        let mut args = vec!["run".to_string(), "--plain".to_string(), recipe(file)];
        args.extend(shrunk(file));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, stderr) = work.dreampipe(&args);
        assert!(ok, "{file}: {stdout}\n{stderr}");
        let name = file.trim_end_matches(".yaml");
        let manifest = read_json(&work.cache().join(format!("runs/{name}/grid/manifest.json")));
        let rows: Vec<&str> = manifest["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|image| image["model"].as_str().unwrap())
            .collect();
        let swept = swept_steps(&std::fs::read_to_string(repo_root().join(recipe(file))).unwrap());
        let mut expected: Vec<String> = (ids.iter())
            .filter(|id| id.starts_with("db") || id.starts_with("ti_db"))
            .map(|id| shrunk_id(id, &swept))
            .collect();
        if file.contains("schedulers") {
            expected = vec!["db".to_string(); 3]; // pndm, lms, ddim at one step count
        } else if file.contains("sdxl") {
            expected = ["lora ×0.5", "lora ×1", "tiny-sdxl"]
                .map(String::from)
                .to_vec();
        } else if file.contains("lora") {
            // The LoRA rows: base_model with the adapter at each of lora_scales.
            expected.extend(["lora ×0.5".to_string(), "lora ×1".to_string()]);
            expected.push("tiny-sd".to_string());
        } else {
            expected.push("tiny-sd".to_string());
        }
        assert_eq!(rows, expected, "{file}");
        let scores = read_json(&work.cache().join(format!("runs/{name}/eval/scores.json")));
        let scored: Vec<&str> = scores["overall"]
            .as_array()
            .unwrap()
            .iter()
            .map(|variant| variant["model"].as_str().unwrap())
            .collect();
        let mut variants: Vec<String> = expected.iter().map(|m| m.to_string()).collect();
        variants.dedup();
        if file.contains("schedulers") {
            // One variant per grid row: the schedulers compared are part of the label.
            variants = ["pndm", "lms", "ddim"]
                .map(|s| format!("db · {s}"))
                .to_vec();
        }
        assert_eq!(scored, variants, "{file}: one score row per grid model");
        assert_eq!(scores["random_weights"], true, "{file}");
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn demo_runs_end_to_end_then_is_fully_cached() {
    let work = Workspace::new();
    let demo = recipe("demo.yaml");
    let (ok, stdout, stderr) = work.dreampipe(&["run", "--plain", &demo]);
    assert!(ok, "{stdout}\n{stderr}");
    for stage in [
        "instance",
        "class_images",
        "ti",
        "db",
        "grid",
        "clip",
        "dino",
        "instance_embeddings",
        "eval",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(stage) && l.contains(" ran ")),
            "{stage} did not run: {stdout}"
        );
    }
    assert!(
        stdout.contains("9 ran, 0 cached, 0 failed, 0 skipped"),
        "{stdout}"
    );
    let grid = work.cache().join("runs/demo/grid");
    let (width, height) = image::image_dimensions(grid.join("grid-0.png")).unwrap();
    assert!(width > 2 * 64 && height > 2 * 64, "grid {width}×{height}");
    let manifest = read_json(&grid.join("manifest.json"));
    let cells: Vec<(String, u64)> = manifest["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["prompt_index"] == 0)
        .map(|i| {
            (
                i["model"].as_str().unwrap().to_string(),
                i["seed"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [("db", 0), ("db", 1), ("tiny-sd", 0), ("tiny-sd", 1)];
    assert_eq!(
        cells,
        expected.map(|(m, s)| (m.to_string(), s)).to_vec(),
        "rows: the DreamBooth model, then the base model; columns: seeds 0 and 1"
    );
    // Scores for both rows, with PRES from the class-prompt grid; random weights, said so.
    let scores = read_json(&work.cache().join("runs/demo/eval/scores.json"));
    for (variant, model) in scores["overall"]
        .as_array()
        .unwrap()
        .iter()
        .zip(["db", "tiny-sd"])
    {
        assert_eq!(variant["model"], model);
        assert_eq!(
            (variant["n"].as_u64(), variant["pres"]["n"].as_u64()),
            (Some(2), Some(2))
        );
    }
    assert_eq!(scores["random_weights"], true);
    let page = report_path(&stdout);
    let check = check_page(&page).unwrap_or_else(|e| panic!("{e}"));
    assert!(check.is_clean(), "{check:?}");
    // Validation samples: ti at steps 8 and 16, db at 6 and 12; then the two grids.
    assert_eq!(check.images_checked, 6, "{check:?}");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("<h2>Scores</h2>") && html.contains("these numbers mean nothing"));

    let (ok, again, stderr) = work.dreampipe(&["run", "--plain", &demo]);
    assert!(ok, "{stderr}");
    assert!(
        work.dir.path().join("pipelines/demo.lock").is_file(),
        "the lock is written next to the copy"
    );
    assert!(
        again.contains("0 ran, 9 cached, 0 failed, 0 skipped"),
        "{again}"
    );
    assert_eq!(report_path(&again), page);
}

/// The page `run` names on its `report: PATH` line.
fn report_path(stdout: &str) -> PathBuf {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .unwrap_or_else(|| panic!("no report line: {stdout}"));
    let page = PathBuf::from(line);
    assert!(page.is_file(), "{}", page.display());
    page
}

/// `pipelines/world/`: the base model's training pipeline validates and plans (its hour of CPU
/// training is not rerun here; models/toy-world is its output), and the demo on that model runs
/// shrunk end to end — the base model and both DreamBooth settings at each swept step count are
/// scored per variant by the world's classifier — then is fully cached.
#[test]
fn the_world_pipelines_plan_and_the_world_demo_runs_shrunk() {
    let work = Workspace::new();
    let (ok, stdout, stderr) = work.dreampipe(&["validate", "pipelines/world/train-base.yaml"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        "pipeline `world-base` is valid: 7 stage(s), 7 after sweep expansion\n"
    );
    let shrink = [
        "params.steps=[1, 2, 3]",
        "class_images.count=4",
        "class_images.steps=2",
        "db_prior.num_class_images=4",
        "grid.steps=2",
        "grid.seeds=[0]",
    ];
    let mut args = vec!["run", "--plain", "pipelines/world/demo.yaml"];
    for set in &shrink {
        args.extend(["--set", set]);
    }
    let (ok, stdout, stderr) = work.dreampipe(&args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("10 ran, 0 cached, 0 failed, 0 skipped"),
        "{stdout}"
    );
    let scores = read_json(&work.cache().join("runs/world-demo/scores/scores.json"));
    let variants: Vec<&str> = (scores["overall"].as_array().unwrap().iter())
        .map(|v| v["model"].as_str().unwrap())
        .collect();
    assert_eq!(variants.len(), 7, "{variants:?}");
    assert_eq!(variants[6], "toy-world", "the base model is the last row");
    for setting in ["db_prior", "db_plain"] {
        for steps in 1..=3 {
            let id = format!("{setting}[max_train_steps={steps}]");
            assert!(variants.contains(&id.as_str()), "{id} in {variants:?}");
        }
    }
    for variant in scores["overall"].as_array().unwrap() {
        // 4 prompts × 1 seed: one subject prompt, three others (one the bare class), two
        // world captions.
        assert_eq!(variant["n"], 4);
        assert_eq!(variant["subject"]["count"], 1);
        assert_eq!(variant["class"]["count"], 1);
        assert_eq!(variant["no_stripes"]["count"], 3);
        assert_eq!(variant["caption"]["count"], 2);
    }
    let (ok, again, stderr) = work.dreampipe(&args);
    assert!(ok, "{stderr}");
    assert!(again.contains("0 ran, 10 cached"), "{again}");
}
