//! The front binary `dreampipe` (no libtorch) and the torch worker `dreampipe-torch`: cached
//! runs stay in the front, new tensor work and the torch verbs go to the worker, and the
//! worker's CUDA answer is memoized for the front.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::linkage::needed_libraries;

fn worker() -> PathBuf {
    crate::dreampipe()
}

fn front() -> PathBuf {
    crate::front()
}

fn tiny_model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/tiny-sd")
        .display()
        .to_string()
}

/// A one-stage pipeline of a torch kind (two 2-step 64×64 class images on the tiny model).
fn write_pipeline(dir: &Path) -> PathBuf {
    let path = dir.join("handoff.yaml");
    let yaml = format!(
        "name: handoff\nstages:\n  class:\n    kind: generate\n    model: {}\n    prompt: a photo of a dog\n    count: 1\n    steps: 2\n    width: 64\n    height: 64\n",
        tiny_model()
    );
    std::fs::write(&path, yaml).expect("write pipeline");
    path
}

/// Runs the front with `args`; `worker` replaces the worker's path when given.
fn front_run(dir: &Path, args: &[&str], worker: Option<&Path>) -> Output {
    let mut command = Command::new(front());
    command
        .current_dir(dir)
        .env("OMP_NUM_THREADS", "1")
        .env_remove("DREAMPIPE_DEVICE")
        .env_remove("DREAMPIPE_CACHE")
        .args(args);
    match worker {
        Some(path) => command.env("DREAMPIPE_TORCH", path),
        None => command.env_remove("DREAMPIPE_TORCH"),
    };
    command.output().expect("start dreampipe")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn only_the_worker_links_libtorch() {
    let front = needed_libraries(&front());
    assert!(front.contains(&"libc.so.6".to_string()), "{front:?}");
    assert!(
        !front
            .iter()
            .any(|l| l.starts_with("libtorch") || l.starts_with("libc10")),
        "{front:?}"
    );
    let worker = needed_libraries(&worker());
    assert!(
        worker.contains(&"libtorch_cpu.so".to_string()),
        "{worker:?}"
    );
}

#[test]
fn cached_runs_stay_in_the_front_and_new_work_goes_to_the_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pipeline(dir.path());
    let run = ["--device", "cpu", "run", "--plain", "handoff.yaml"];

    let first = front_run(dir.path(), &run, None);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stdout(&first).contains("1 ran, 0 cached, 0 failed"),
        "{}",
        stdout(&first)
    );

    // No worker at all: a cached run, a plan and a validation still work.
    let missing = dir.path().join("no-worker");
    let cached = front_run(dir.path(), &run, Some(&missing));
    assert!(cached.status.success(), "{}", stderr(&cached));
    assert!(
        stdout(&cached).contains("0 ran, 1 cached, 0 failed"),
        "{}",
        stdout(&cached)
    );
    let changed = [
        "--device",
        "cpu",
        "plan",
        "handoff.yaml",
        "--set",
        "class.count=2",
    ];
    let plan = front_run(dir.path(), &changed, Some(&missing));
    assert!(plan.status.success(), "{}", stderr(&plan));
    assert!(
        stdout(&plan).contains("`count` changed 1 → 2"),
        "{}",
        stdout(&plan)
    );

    // New tensor work needs the worker: without it, one clear line.
    let mut rerun = run.to_vec();
    rerun.extend(["--set", "class.count=2"]);
    let refused = front_run(dir.path(), &rerun, Some(&missing));
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        stderr(&refused),
        format!(
            "error: this command needs the torch worker `{}`, which could not be started (No such file or directory (os error 2)); it is built beside `dreampipe` by `cargo build` (or set DREAMPIPE_TORCH to its path)\n",
            missing.display()
        )
    );
    let computed = front_run(dir.path(), &rerun, None);
    assert!(computed.status.success(), "{}", stderr(&computed));
    assert!(
        stdout(&computed).contains("1 ran, 0 cached, 0 failed"),
        "{}",
        stdout(&computed)
    );
}

#[test]
fn torch_verbs_are_the_workers_with_the_same_arguments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let help = front_run(dir.path(), &["sample", "--help"], None);
    assert!(help.status.success(), "{}", stderr(&help));
    let text = stdout(&help);
    assert!(
        text.starts_with("Generate images from a prompt (txt2img)"),
        "{text}"
    );
    assert!(
        text.contains("Usage: dreampipe sample [OPTIONS] --prompt <PROMPT> --out <OUT>"),
        "{text}"
    );
    let missing = dir.path().join("no-worker");
    let refused = front_run(dir.path(), &["--device", "cpu", "doctor"], Some(&missing));
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).starts_with("error: this command needs the torch worker"));
}

#[test]
fn the_worker_memoizes_what_auto_means_for_the_front() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pipeline(dir.path());
    let run = ["--device", "auto", "run", "--plain", "handoff.yaml"];
    let first = front_run(dir.path(), &run, None);
    assert!(first.status.success(), "{}", stderr(&first));
    let memo = std::fs::read_to_string(dir.path().join("cache/devices.json")).expect("memo");
    let stored: serde_json::Value = serde_json::from_str(&memo).expect("json");
    // This machine's libtorch is CPU-only: the worker's answer names the missing library.
    let reason = stored["probe"]["Missing"]["reason"]
        .as_str()
        .expect("a Missing probe");
    assert!(reason.contains("libtorch_cuda.so"), "{memo}");
    let second = front_run(dir.path(), &run, None);
    assert!(
        stdout(&second).contains("0 ran, 1 cached, 0 failed"),
        "{}",
        stdout(&second)
    );
    let cuda = front_run(
        dir.path(),
        &["--device", "cuda", "validate", "handoff.yaml"],
        None,
    );
    assert_eq!(cuda.status.code(), Some(1));
    assert!(
        stderr(&cuda).starts_with("error: --device cuda: this libtorch has no CUDA backend (libtorch_cuda.so not loadable: "),
        "{}",
        stderr(&cuda)
    );
}
