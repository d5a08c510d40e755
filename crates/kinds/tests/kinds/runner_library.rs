//! The runner as a library, with custom stage kinds (the way the Stable Diffusion stages plug
//! in): sweep ids and fan-out, defaults, model path-or-reference inputs, GPU slots, progress
//! events, and the images stage.
use dreampipe_core::cache::hash::HashMemo;
use dreampipe_core::cache::store::Store;
use dreampipe_core::exec::events::{CancelFlag, Event};
use dreampipe_core::exec::executor::{ExecOptions, Outcome, RunRecord, execute};
use dreampipe_core::pipeline::{LoadOptions, Pipeline, load_str};
use dreampipe_core::plan::graph::Plan;
use dreampipe_core::stages::{
    DeviceClass, ParamSpec, ParamType, Registry, Stage, StageContext, StageError,
};
use dreampipe_kinds::registry;
use serde_json::json;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A stand-in for a training stage: GPU class, numeric params, a model input. It records when
/// each stage ran; with `meet == 2` the first two `db` variants to start wait for each other
/// (a rendezvous, not a sleep), so two device slots are observed at once however loaded the
/// machine is.
struct FakeTrain {
    meet: usize,
    rendezvous: Mutex<Rendezvous>,
    arrived: Condvar,
    intervals: Mutex<Vec<(String, Instant, Instant)>>,
}

#[derive(Default)]
struct Rendezvous {
    running: usize,
    db_arrivals: usize,
}

/// How long a `db` variant waits for its partner before giving up (a broken executor that
/// never runs two at once then fails the test instead of hanging it).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(30);

impl FakeTrain {
    fn start(&self, stage_id: &str) {
        let mut state = self.rendezvous.lock().expect("rendezvous");
        state.running += 1;
        self.arrived.notify_all();
        if !stage_id.starts_with("db") {
            return;
        }
        state.db_arrivals += 1;
        if state.db_arrivals > self.meet {
            return;
        }
        let (_state, _timeout) = self
            .arrived
            .wait_timeout_while(state, RENDEZVOUS_TIMEOUT, |s| s.running < self.meet)
            .expect("rendezvous");
    }

    fn finish(&self, stage_id: &str, started: Instant) {
        self.rendezvous.lock().expect("rendezvous").running -= 1;
        let interval = (stage_id.to_string(), started, Instant::now());
        self.intervals.lock().expect("intervals").push(interval);
    }

    /// The largest number of recorded stage intervals that overlap in time.
    fn max_overlap(&self) -> usize {
        let intervals = self.intervals.lock().expect("intervals");
        let others_running_at = |i: usize, at: &Instant| {
            (intervals.iter().enumerate())
                .filter(|(j, (_, s, e))| *j != i && s <= at && at < e)
                .count()
        };
        (intervals.iter().enumerate())
            .map(|(i, (_, start, _))| 1 + others_running_at(i, start))
            .max()
            .unwrap_or(0)
    }
}

/// The fake kind's fields, typed as a real kind's are.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FakeTrainParams {
    model: dreampipe_core::stages::params::Input,
    learning_rate: f64,
    steps: u64,
    seed: i64,
    log_every: u64,
}

impl Stage for FakeTrain {
    fn kind(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "test stage"
    }
    fn device_class(&self) -> DeviceClass {
        DeviceClass::Gpu
    }
    fn schema(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required("model", ParamType::PathOrStageRef, "base model"),
            ParamSpec::optional("learning_rate", ParamType::Number, json!(5e-6), "lr")
                .range(0.0, 1.0),
            ParamSpec::optional("steps", ParamType::Integer, json!(100), "steps").range(1.0, 1e6),
            ParamSpec::optional("seed", ParamType::Integer, json!(0), "seed"),
            ParamSpec::optional(
                "log_every",
                ParamType::Integer,
                json!(10),
                "progress cadence",
            )
            .not_in_key(),
        ]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let started = Instant::now();
        self.start(ctx.stage_id);
        let params: FakeTrainParams = ctx.typed()?;
        let steps = params.steps;
        ctx.progress.step_with_metric(steps, steps, "loss", 0.25);
        let model = ctx.input_paths("model")[0].to_path_buf();
        let text = format!(
            "model={} lr={} seed={} device={:?}",
            model
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            params.learning_rate,
            params.seed,
            ctx.device
        );
        std::fs::write(ctx.out_dir.join("weights.txt"), text)
            .map_err(|e| StageError::io("write", ctx.out_dir, e))?;
        self.finish(ctx.stage_id, started);
        Ok(())
    }
}

fn fake_registry() -> (Registry, Arc<FakeTrain>) {
    fake_registry_meeting(1)
}

/// A registry whose first `meet` `db` variants wait for each other before running.
fn fake_registry_meeting(meet: usize) -> (Registry, Arc<FakeTrain>) {
    let train = Arc::new(FakeTrain {
        meet,
        rendezvous: Mutex::new(Rendezvous::default()),
        arrived: Condvar::new(),
        intervals: Mutex::new(Vec::new()),
    });
    (registry().with(train.clone()), train)
}

const SWEEP: &str = r#"
defaults:
  seed: 42
stages:
  ti:
    kind: train
    model: models/base
  db:
    kind: train
    model: ti
    matrix:
      learning_rate: [2e-6, 5e-6]
      steps: [400, 1200]
  grid:
    kind: command
    needs: db
    run: cp $IN_DB/weights.txt $OUT/
"#;

fn load_sweep(dir: &Path, registry: Registry) -> Pipeline {
    std::fs::create_dir_all(dir.join("models/base")).expect("mkdir");
    std::fs::write(dir.join("models/base/unet.bin"), b"base weights").expect("write");
    load_str(
        SWEEP,
        &dir.join("p.yaml"),
        dir,
        &LoadOptions {
            overrides: vec![],
            registry,
        },
    )
    .expect("valid")
}

fn run(
    plan: Plan,
    store: &Store,
    devices: Vec<dreampipe_core::device::Device>,
) -> (RunRecord, Vec<Event>) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let n = plan.len();
        let options = ExecOptions {
            verify: false,
            jobs: 4,
            devices,
            selected: vec![true; n],
            forced: vec![false; n],
            locked: None,
            slurm: None,
        };
        let record = execute(
            Arc::new(plan),
            store.clone(),
            Arc::new(HashMemo::in_memory()),
            options,
            sender,
            CancelFlag::default(),
        )
        .await;
        let mut events = Vec::new();
        while let Ok(event) = receiver.try_recv() {
            events.push(event);
        }
        (record, events)
    })
}

/// The sweep project, run once in `dir` on `devices` with a fresh fake registry and store.
struct SweepRun {
    registry: Registry,
    train: Arc<FakeTrain>,
    store: Store,
    record: RunRecord,
    events: Vec<Event>,
}

/// Runs the sweep on `devices`; with two or more, the first two `db` variants meet (see
/// [`FakeTrain`]).
fn run_sweep(dir: &Path, devices: Vec<dreampipe_core::device::Device>) -> SweepRun {
    let (registry, train) = fake_registry_meeting(devices.len().min(2));
    let store = Store::open(&dir.join("cache")).expect("store");
    let (record, events) = run(
        Plan::new(load_sweep(dir, registry.clone())),
        &store,
        devices,
    );
    SweepRun {
        registry,
        train,
        store,
        record,
        events,
    }
}

#[test]
fn sweep_ids_fan_out_defaults_and_model_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (registry, _) = fake_registry();
    let pipeline = load_sweep(dir.path(), registry);
    let ids: Vec<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "ti",
            "db[learning_rate=2e-6,steps=400]",
            "db[learning_rate=2e-6,steps=1200]",
            "db[learning_rate=5e-6,steps=400]",
            "db[learning_rate=5e-6,steps=1200]",
            "grid[learning_rate=2e-6,steps=400]",
            "grid[learning_rate=2e-6,steps=1200]",
            "grid[learning_rate=5e-6,steps=400]",
            "grid[learning_rate=5e-6,steps=1200]",
        ]
    );
    let grid = &pipeline.stages[7];
    assert_eq!(grid.refs["needs"], [("db".to_string(), 3)]);
    assert_eq!(
        pipeline.stages[1].params["seed"],
        json!(42),
        "defaults apply to stages whose schema has the field"
    );
    assert_eq!(
        pipeline.stages[1].refs["model"],
        [("ti".to_string(), 0)],
        "`model: ti` is a reference"
    );
    assert_eq!(
        pipeline.stages[0].paths["model"][0].0, "models/base",
        "`model: models/base` is a path"
    );
}

#[test]
fn gpu_stages_take_one_slot_per_device_and_report_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let SweepRun {
        train,
        store,
        record,
        events,
        ..
    } = run_sweep(dir.path(), vec![dreampipe_core::device::Device::Cpu]);
    assert!(record.success);
    assert_eq!(
        train.max_overlap(),
        1,
        "one GPU stage at a time on one device"
    );
    assert!(events.iter().any(|e| matches!(e, Event::Progress { id, step: 1200, total: 1200, metric: Some((name, _)) } if id == "db[learning_rate=5e-6,steps=1200]" && name == "loss")));
    let weights = std::fs::read_to_string(
        store
            .output_dir(record.stages[4].key.as_ref().expect("key"))
            .join("weights.txt"),
    )
    .expect("weights");
    assert_eq!(weights, "model=out lr=0.000005 seed=42 device=Cpu");

    let dir2 = tempfile::tempdir().expect("tempdir");
    let SweepRun {
        train: train2,
        record: record2,
        ..
    } = run_sweep(
        dir2.path(),
        vec![
            dreampipe_core::device::Device::Cpu,
            dreampipe_core::device::Device::Cpu,
        ],
    );
    assert!(
        record2.success,
        "{:?}",
        record2
            .stages
            .iter()
            .map(|s| (&s.id, &s.error))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        train2.max_overlap(),
        2,
        "two devices: two independent GPU stages at once"
    );
}

#[test]
fn fields_outside_the_key_do_not_rerun_and_model_folder_changes_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let SweepRun {
        registry,
        store,
        record: first,
        ..
    } = run_sweep(dir.path(), vec![dreampipe_core::device::Device::Cpu]);
    let ran = first
        .stages
        .iter()
        .filter(|s| s.status == Outcome::Ran)
        .count();
    let cached = first
        .stages
        .iter()
        .filter(|s| s.status == Outcome::Cached)
        .count();
    // The fake trainer ignores `steps`, so each pair of grids has one key: computed once.
    assert_eq!((ran, cached), (7, 2));
    let options = LoadOptions {
        overrides: vec!["ti.log_every=1".to_string()],
        registry: registry.clone(),
    };
    let quiet = load_str(SWEEP, &dir.path().join("p.yaml"), dir.path(), &options).expect("valid");
    let (second, _) = run(
        Plan::new(quiet),
        &store,
        vec![dreampipe_core::device::Device::Cpu],
    );
    assert!(
        second.stages.iter().all(|s| s.status == Outcome::Cached),
        "log_every is not in the key"
    );
    std::fs::write(dir.path().join("models/base/vae.bin"), b"new file").expect("write");
    let (third, _) = run(
        Plan::new(load_sweep(dir.path(), registry)),
        &store,
        vec![dreampipe_core::device::Device::Cpu],
    );
    assert_eq!(third.stages[0].status, Outcome::Ran);
    assert_eq!(
        third.stages[0].reasons,
        ["file `models/base/vae.bin` added"]
    );
    assert_eq!(
        third.stages[1].status,
        Outcome::Cached,
        "ti wrote the same bytes: early cutoff"
    );
}

#[test]
fn images_stage_normalizes_a_folder_and_names_a_broken_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("dog");
    std::fs::create_dir_all(&images).expect("mkdir");
    image::RgbImage::from_pixel(40, 20, image::Rgb([200, 10, 10]))
        .save(images.join("1.png"))
        .expect("png");
    image::RgbImage::from_pixel(16, 32, image::Rgb([10, 200, 10]))
        .save(images.join("2.jpg"))
        .expect("jpg");
    let text = "stages:\n  dog:\n    kind: images\n    path: dog\n    resolution: 16\n";
    let store = Store::open(&dir.path().join("cache")).expect("store");
    let pipeline = load_str(
        text,
        &dir.path().join("p.yaml"),
        dir.path(),
        &LoadOptions::new(registry()),
    )
    .expect("valid");
    let (record, _) = run(
        Plan::new(pipeline),
        &store,
        vec![dreampipe_core::device::Device::Cpu],
    );
    assert!(record.success, "{:?}", record.stages[0].error);
    let out = store.output_dir(record.stages[0].key.as_ref().expect("key"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest"))
            .expect("json");
    assert_eq!(
        manifest["images"][0],
        json!({"file": "images/0000.png", "source": "1.png", "width": 16, "height": 16})
    );
    assert_eq!(manifest["images"][1]["source"], "2.jpg");
    let first = image::open(out.join("images/0000.png"))
        .expect("decode")
        .to_rgb8();
    assert_eq!(first.dimensions(), (16, 16));
    assert_eq!(first.get_pixel(8, 8), &image::Rgb([200, 10, 10]));

    std::fs::write(images.join("3.png"), b"not a png").expect("write");
    let pipeline = load_str(
        text,
        &dir.path().join("p.yaml"),
        dir.path(),
        &LoadOptions::new(registry()),
    )
    .expect("valid");
    let (record, _) = run(
        Plan::new(pipeline),
        &store,
        vec![dreampipe_core::device::Device::Cpu],
    );
    let error = record.stages[0].error.clone().unwrap_or_default();
    assert_eq!(
        error,
        format!(
            "stage `dog`: field `path`: `{}` does not decode as an image: Format error decoding Png: Invalid PNG signature.; replace or remove the file",
            images.join("3.png").display()
        )
    );
}

/// A kind whose code panics: the run reports a failure, never a crash or a success.
struct Panicking;

impl Stage for Panicking {
    fn kind(&self) -> &'static str {
        "panics"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "test stage"
    }
    fn schema(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    fn run(&self, _ctx: &StageContext<'_>) -> Result<(), StageError> {
        panic!("bug in a stage");
    }
}

#[test]
fn a_panicking_stage_fails_alone_and_leaves_no_staging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = registry().with(Arc::new(Panicking));
    let text = "stages:\n  boom:\n    kind: panics\n  after:\n    kind: command\n    needs: boom\n    run: echo x > $OUT/x\n  fine:\n    kind: command\n    run: echo y > $OUT/y\n";
    let pipeline = load_str(
        text,
        &dir.path().join("p.yaml"),
        dir.path(),
        &LoadOptions {
            overrides: vec![],
            registry,
        },
    )
    .expect("valid");
    let store = Store::open(&dir.path().join("cache")).expect("store");
    let (record, _) = run(
        Plan::new(pipeline),
        &store,
        vec![dreampipe_core::device::Device::Cpu],
    );
    assert!(!record.success);
    let statuses: Vec<Outcome> = record.stages.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [Outcome::Failed, Outcome::Skipped, Outcome::Ran]);
    assert_eq!(
        record.stages[0].error.as_deref(),
        Some("bug in a stage (the stage panicked; RUST_BACKTRACE=1 shows where)")
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache/staging"))
            .expect("staging")
            .count(),
        0
    );
}

/// `resources: {gpus: N}` on `command` stages, on a run with two (fake) CUDA devices: each
/// stage holds its N device slots and sees them as `CUDA_VISIBLE_DEVICES`; two one-GPU stages
/// run at once on different GPUs (they wait for each other, so they must overlap); a two-GPU
/// stage after them sees both (a request for several slots queues fairly: one-GPU stages behind
/// it wait, so it runs after the pair here); a stage without `resources` inherits the variable;
/// asking for more devices than the run has fails naming the stage.
#[test]
fn command_stages_hold_the_gpus_they_ask_for_and_see_them() {
    use dreampipe_core::device::Device;
    let dir = tempfile::tempdir().expect("tempdir");
    let meet = |me: &str, other: &str| {
        format!(
            "touch $PIPELINE_DIR/{me}.here; i=0; while [ ! -e $PIPELINE_DIR/{other}.here ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done; echo \"$CUDA_VISIBLE_DEVICES\" > $OUT/visible"
        )
    };
    let yaml = format!(
        "stages:\n  one:\n    kind: command\n    resources: {{gpus: 1}}\n    run: '{}'\n  two:\n    kind: command\n    resources: {{gpus: 1}}\n    run: '{}'\n  both:\n    kind: command\n    needs: [one, two]\n    resources: {{gpus: 2}}\n    run: echo \"$CUDA_VISIBLE_DEVICES\" > $OUT/visible\n  plain:\n    kind: command\n    run: echo \"${{CUDA_VISIBLE_DEVICES-unset}}\" > $OUT/visible\n  greedy:\n    kind: command\n    resources: {{gpus: 3}}\n    run: echo never > $OUT/visible\n",
        meet("one", "two"),
        meet("two", "one")
    );
    let options = LoadOptions {
        overrides: vec![],
        registry: registry(),
    };
    let pipeline =
        load_str(&yaml, &dir.path().join("p.yaml"), dir.path(), &options).expect("valid");
    let store = Store::open(&dir.path().join("cache")).expect("store");
    let (record, _) = run(
        Plan::new(pipeline),
        &store,
        vec![Device::Cuda(0), Device::Cuda(1)],
    );
    let visible = |id: &str| {
        let stage = record.stages.iter().find(|s| s.id == id).expect("stage");
        let key = stage.key.as_ref().expect("key");
        std::fs::read_to_string(store.output_dir(key).join("visible")).expect("visible")
    };
    let mut pair = [visible("one"), visible("two")];
    pair.sort();
    assert_eq!(
        pair,
        ["0\n", "1\n"],
        "two one-GPU stages at once, one GPU each"
    );
    let mut both: Vec<String> = visible("both")
        .trim()
        .split(',')
        .map(String::from)
        .collect();
    both.sort();
    assert_eq!(both, ["0", "1"]);
    let inherited = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".to_string());
    assert_eq!(visible("plain"), format!("{inherited}\n"));
    let greedy = record
        .stages
        .iter()
        .find(|s| s.id == "greedy")
        .expect("greedy");
    assert_eq!(greedy.status, Outcome::Failed);
    assert_eq!(
        greedy.error.as_deref(),
        Some(
            "stage `greedy` asks for 3 devices (`resources: {gpus: 3}`) but this run has 2 (--devices)"
        )
    );
}
