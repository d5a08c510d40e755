//! The Slurm executor against a real Slurm: the one-node cluster with two fake GPUs that
//! `scripts/start-slurm.sh` starts (`make test` starts it first; these tests fail, never skip,
//! when it is not there). The tests share the node's two GPUs, so they run one at a time.
use crate::runner_support::{Project, RunResult, assert_success, to_result};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One test on the cluster at a time.
static CLUSTER: Mutex<()> = Mutex::new(());
/// The longest any wait here takes before the test fails.
const PATIENCE: Duration = Duration::from_secs(180);

fn cluster() -> MutexGuard<'static, ()> {
    let guard = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let info = Command::new("sinfo").args(["-h", "-o", "%T %G"]).output();
    let text = info
        .as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    assert!(
        text.contains("gpu:2"),
        "no Slurm node with two fake GPUs ({info:?}); start it with scripts/start-slurm.sh"
    );
    guard
}

fn tiny_model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/tiny-sd")
        .display()
        .to_string()
}

/// `dreampipe --device cpu run PIPELINE --plain --executor slurm …`, polling Slurm quickly.
fn slurm_command(project: &Project, pipeline: &str, extra: &[&str]) -> Command {
    let mut command = project.command(&["run", pipeline, "--plain", "--executor", "slurm"]);
    command
        .args(extra)
        .env("OMP_NUM_THREADS", "1")
        .env("DREAMPIPE_SLURM_POLL_MAX_S", "0.5")
        .env("DREAMPIPE_SLURM_GRACE_S", "2");
    command
}

fn run_on_slurm(project: &Project, pipeline: &str, extra: &[&str]) -> RunResult {
    to_result(
        slurm_command(project, pipeline, extra)
            .output()
            .expect("run dreampipe"),
    )
}

/// One job as squeue lists it.
#[derive(Debug, Clone, PartialEq)]
struct Job {
    id: String,
    name: String,
    state: String,
    gres: String,
    /// The batch script (in the cache of the project that submitted it).
    script: String,
}

/// Every job Slurm still lists (finished ones for ~5 minutes).
fn jobs() -> Vec<Job> {
    let output = Command::new("squeue")
        .args(["-h", "-t", "all", "-o", "%i|%j|%T|%b|%o"])
        .output()
        .expect("squeue");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.trim().split('|').collect();
            (fields.len() == 5).then(|| Job {
                id: fields[0].to_string(),
                name: fields[1].to_string(),
                state: fields[2].to_string(),
                gres: fields[3].to_string(),
                script: fields[4].to_string(),
            })
        })
        .collect()
}

/// Jobs of this project (their script is in its cache; keys alone may repeat across projects).
fn our_jobs(project: &Project) -> Vec<Job> {
    let cache = project.cache().display().to_string();
    (jobs().into_iter())
        .filter(|j| j.script.starts_with(&cache))
        .collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Samples squeue every 50 ms while a run goes: the most jobs named `prefix*` running at once,
/// and each such job's gres.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, BTreeMap<String, String>)>,
}

impl Watcher {
    fn start(prefix: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut most, mut gres) = (0, BTreeMap::new());
            while !flag.load(Ordering::SeqCst) {
                let running: Vec<Job> = (jobs().into_iter())
                    .filter(|j| j.name.starts_with(prefix) && j.state == "RUNNING")
                    .collect();
                most = most.max(running.len());
                for job in running {
                    gres.insert(job.id, job.gres);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (most, gres)
        });
        Self { stop, thread }
    }

    fn finish(self) -> (usize, BTreeMap<String, String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("watcher")
    }
}

fn write_photos(project: &Project) {
    let dir = project.path("photos");
    std::fs::create_dir_all(&dir).expect("mkdir photos");
    for index in 0..3u32 {
        let image = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4 + index * 60) as u8, (y * 4) as u8, (x + y) as u8])
        });
        image
            .save(dir.join(format!("photo{index}.png")))
            .expect("save photo");
    }
}

fn project_with(pipeline: &str) -> Project {
    let project = Project::run_by(crate::front());
    write_photos(&project);
    project.write("sweep.yaml", &pipeline.replace("MODEL", &tiny_model()));
    project
}

const SWEEP: &str = r#"name: sweep
stages:
  photos:
    kind: images
    path: photos
  db:
    kind: dreambooth
    model: MODEL
    instance_images: photos
    instance_prompt: a photo of sks dog
    resolution: 64
    train_batch_size: 1
    max_train_steps: 6
    lr_warmup_steps: 0
    matrix:
      learning_rate: [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4]
  seen:
    kind: command
    resources: {gpus: 1}
    run: echo "$SLURM_JOB_ID ${CUDA_VISIBLE_DEVICES-unset}" > $OUT/seen
"#;

/// A four-variant DreamBooth sweep runs as four jobs, two at a time with one fake GPU each,
/// and commits what a local run of the same pipeline commits; a rerun submits nothing.
#[test]
fn a_sweep_runs_one_job_per_stage_two_at_a_time_and_matches_a_local_run() {
    let _cluster = cluster();
    let (on_slurm, local) = (project_with(SWEEP), project_with(SWEEP));
    let watcher = Watcher::start("dp-db[");
    let started = Instant::now();
    let result = run_on_slurm(&on_slurm, "sweep.yaml", &[]);
    let slurm_seconds = started.elapsed().as_secs_f64();
    let (most, gres) = watcher.finish();
    assert_success(&result);
    let db_jobs: Vec<Job> = (our_jobs(&on_slurm).into_iter())
        .filter(|j| j.name.starts_with("dp-db["))
        .collect();
    assert_eq!(db_jobs.len(), 4, "{db_jobs:?}");
    assert_eq!(most, 2, "DreamBooth jobs running at once");
    assert!(gres.values().all(|g| g == "gres:gpu:1"), "{gres:?}");
    let seen = std::fs::read_to_string(on_slurm.cache().join("runs/sweep/seen/seen")).unwrap();
    let (job, visible) = seen.trim().split_once(' ').expect("two words");
    assert!(
        job.parse::<u64>().is_ok() && ["0", "1"].contains(&visible),
        "{seen}"
    );

    let started = Instant::now();
    let reference = to_result(
        (local.command(&["run", "sweep.yaml", "--plain"]))
            .env("OMP_NUM_THREADS", "1")
            .output()
            .expect("run dreampipe"),
    );
    let local_seconds = started.elapsed().as_secs_f64();
    assert_success(&reference);
    eprintln!("four-variant sweep: Slurm {slurm_seconds:.1} s, local {local_seconds:.1} s");
    for rate in ["1e-4", "2e-4", "3e-4", "4e-4"] {
        let id = format!("db[learning_rate={rate}]");
        for field in ["key", "output_digest"] {
            assert_eq!(
                result.stage_field(&id, field),
                reference.stage_field(&id, field),
                "{id} {field}"
            );
        }
    }

    let before = our_jobs(&on_slurm).len();
    let again = run_on_slurm(&on_slurm, "sweep.yaml", &[]);
    assert_success(&again);
    assert_eq!(again.with_status("cached").len(), 6);
    assert!(!again.stdout.contains("[slurm]"), "{}", again.stdout);
    assert_eq!(our_jobs(&on_slurm).len(), before);
}

const LONG: &str = r#"name: sweep
stages:
  db:
    kind: dreambooth
    model: MODEL
    instance_images: photos
    instance_prompt: a photo of sks dog
    resolution: 64
    train_batch_size: 1
    max_train_steps: 60
    learning_rate: 1.0e-4
    lr_warmup_steps: 0
    checkpointing_steps: 2
"#;

/// Whether a `checkpoint-N` folder exists under the cache's work folders.
fn has_checkpoint(cache: &Path) -> bool {
    std::fs::read_dir(cache.join("work"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|work| {
            std::fs::read_dir(work.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
}

fn spawn_quiet(mut command: Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dreampipe")
}

/// A training job scancel'ed mid-run fails its stage with one line naming the job and its
/// log; the next run continues from the checkpoint the job left.
#[test]
fn a_cancelled_job_names_job_and_log_and_the_rerun_resumes_its_checkpoint() {
    let _cluster = cluster();
    let project = project_with(LONG);
    let child = spawn_quiet(slurm_command(&project, "sweep.yaml", &[]));
    wait_for("a checkpoint", || has_checkpoint(&project.cache()));
    let job = our_jobs(&project).pop().expect("the training job");
    let cancelled = Command::new("scancel").arg(&job.id).status().unwrap();
    assert!(cancelled.success());
    let result = to_result(child.wait_with_output().unwrap());
    assert_eq!(result.output.status.code(), Some(1), "{}", result.stdout);
    let line = (result.stdout.lines())
        .find(|l| l.starts_with("[FAILED]  db:"))
        .unwrap_or_else(|| panic!("no failure line:\n{}", result.stdout))
        .to_string();
    let log = format!("slurm-{}.log", job.id);
    assert!(
        line.contains(&format!("Slurm job {} ended CANCELLED", job.id)) && line.contains(&log),
        "{line}"
    );

    let resumed = run_on_slurm(&project, "sweep.yaml", &[]);
    assert_success(&resumed);
    let key = resumed.stage_field("db", "key");
    let stage_log = project
        .cache()
        .join(format!("logs/{}.log", key.as_str().unwrap()));
    let text = std::fs::read_to_string(stage_log).unwrap();
    assert!(text.contains("resumed from step "), "{text}");
}

/// Two sleeping `command` stages.
const SLEEPERS: &str = "name: sleepers\nstages:\n  one:\n    kind: command\n    run: sleep 60; echo one\n  two:\n    kind: command\n    run: sleep 60; echo two\n";

/// Ctrl-C of the controller scancels every job it submitted: none is left in the queue.
#[test]
fn interrupting_the_controller_leaves_no_job_behind() {
    stopping_the_controller_leaves_no_job_behind("-INT");
}

/// SIGTERM (a scheduler or `kill` stopping the controller) does the same.
#[test]
fn terminating_the_controller_leaves_no_job_behind() {
    stopping_the_controller_leaves_no_job_behind("-TERM");
}

fn stopping_the_controller_leaves_no_job_behind(signal: &str) {
    let _cluster = cluster();
    let project = project_with(SLEEPERS);
    let child = spawn_quiet(slurm_command(&project, "sweep.yaml", &[]));
    wait_for("two running jobs", || {
        our_jobs(&project)
            .iter()
            .filter(|j| j.state == "RUNNING")
            .count()
            == 2
    });
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let result = to_result(child.wait_with_output().unwrap());
    assert_eq!(result.output.status.code(), Some(130), "{}", result.stderr);
    assert!(
        result
            .stderr
            .contains("cancelled 2 Slurm job(s) of this run"),
        "{}",
        result.stderr
    );
    let left: Vec<Job> = (our_jobs(&project).into_iter())
        .filter(|j| ["PENDING", "RUNNING", "COMPLETING"].contains(&j.state.as_str()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A job whose stage exits non-zero shows the stage's last log lines; a job that dies before
/// the stage runs shows Slurm's state, exit code and the job log's last lines.
#[test]
fn failing_jobs_show_their_log_lines() {
    let _cluster = cluster();
    let project = project_with(
        "name: fails\nstages:\n  bad:\n    kind: command\n    run: echo marker-line; exit 3\n",
    );
    let result = run_on_slurm(&project, "sweep.yaml", &[]);
    assert_eq!(result.output.status.code(), Some(1));
    let job = our_jobs(&project).pop().expect("the job");
    let line = (result.stdout.lines())
        .find(|l| l.starts_with("[FAILED]  bad:"))
        .expect("failure line")
        .to_string();
    let expected = format!(
        "[FAILED]  bad: Slurm job {} failed: command exited with status 3; last lines: ",
        job.id
    );
    assert!(line.starts_with(&expected), "{line}");
    assert!(
        line.contains(" | $ echo marker-line; exit 3 | marker-line | "),
        "{line}"
    );
    assert!(line.ends_with(&format!("slurm-{}.log)", job.id)), "{line}");

    let mut broken = slurm_command(&project, "sweep.yaml", &[]);
    broken.env("DREAMPIPE_TORCH", "/nonexistent/dreampipe-torch");
    let result = to_result(broken.output().unwrap());
    let line = (result.stdout.lines())
        .find(|l| l.starts_with("[FAILED]  bad:"))
        .expect("failure line")
        .to_string();
    let job = (our_jobs(&project).into_iter())
        .max_by_key(|j| j.id.parse::<u64>().unwrap_or(0))
        .unwrap();
    let expected = format!(
        "[FAILED]  bad: Slurm job {} ended FAILED (exit code 127:0, NonZeroExitCode) before the stage finished; last lines: ",
        job.id
    );
    assert!(line.starts_with(&expected), "{line}");
    assert!(line.contains("/nonexistent/dreampipe: not found"), "{line}");
}

/// After the controller is killed with SIGKILL its jobs keep running; the next run finds them
/// by their comment and waits for them instead of submitting duplicates.
#[test]
fn a_rerun_after_a_killed_controller_waits_for_its_jobs() {
    let _cluster = cluster();
    let project = project_with(
        "name: nap\nstages:\n  nap:\n    kind: command\n    run: sleep 4; echo rested > $OUT/state\n",
    );
    let mut child = spawn_quiet(slurm_command(&project, "sweep.yaml", &[]));
    wait_for("the running job", || {
        our_jobs(&project).iter().any(|j| j.state == "RUNNING")
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let job = our_jobs(&project).pop().unwrap();
    let rerun = run_on_slurm(&project, "sweep.yaml", &[]);
    assert_success(&rerun);
    assert!(
        rerun.stdout.contains(&format!(
            "[slurm]   nap: waiting for job {} (submitted by an earlier run)",
            job.id
        )),
        "{}",
        rerun.stdout
    );
    assert_eq!(our_jobs(&project).len(), 1, "a duplicate was submitted");
    assert_eq!(
        std::fs::read_to_string(project.cache().join("runs/nap/nap/state")).unwrap(),
        "rested\n"
    );
}

/// `--retries 1` resubmits a failed job once; the stage then succeeds.
#[test]
fn retries_resubmit_a_failed_job() {
    let _cluster = cluster();
    let project = project_with(
        "name: flaky\nstages:\n  flaky:\n    kind: command\n    run: if [ -e \"$PIPELINE_DIR/tried\" ]; then echo ok > $OUT/ok; else touch \"$PIPELINE_DIR/tried\"; exit 5; fi\n",
    );
    let result = run_on_slurm(&project, "sweep.yaml", &["--retries", "1"]);
    assert_success(&result);
    assert!(
        result.stderr.contains("command exited with status 5")
            && result.stderr.contains("resubmitting (retry 1 of 1)"),
        "{}",
        result.stderr
    );
    assert_eq!(our_jobs(&project).len(), 2);
}

/// `plan --executor slurm` prints each job's batch script: resources from the stage, its kind
/// and the `executor:` section mapped to sbatch flags (no cluster needed).
#[test]
fn plan_shows_each_job_script_with_resources_as_sbatch_flags() {
    let project = Project::run_by(crate::front());
    project.write(
        "cluster.yaml",
        "name: cluster\nexecutor:\n  kind: slurm\n  resources: {partition: gpu, time: \"1:00:00\", sbatch_args: [--exclusive]}\n  kinds:\n    command: {account: lab, qos: high}\nstages:\n  prep:\n    kind: command\n    resources: {gpus: 2, mem: 16G, cpus: 4, time: \"0:30:00\"}\n    run: echo hi > $OUT/hi\n",
    );
    let (ok, stdout, stderr) = project.dreampipe(&["plan", "cluster.yaml"]);
    assert!(ok, "{stderr}");
    let cache = std::path::absolute(project.cache())
        .unwrap()
        .display()
        .to_string();
    let key_line = stdout
        .lines()
        .find(|l| l.contains("# dreampipe: stage `prep`"))
        .expect("script header");
    let key = key_line.rsplit(' ').next().unwrap();
    let front = crate::front().display().to_string();
    let expected = format!(
        "plan for `cluster` on Slurm
  job    prep
    #!/bin/sh
    # dreampipe: stage `prep` of pipeline `cluster`, key {key}
    #SBATCH --job-name=dp-prep
    #SBATCH --comment=dreampipe:{key}
    #SBATCH --output={cache}/logs/{key}/slurm-%j.log
    #SBATCH --account=lab
    #SBATCH --mem=16G
    #SBATCH --partition=gpu
    #SBATCH --qos=high
    #SBATCH --time=0:30:00
    #SBATCH --cpus-per-task=4
    #SBATCH --gres=gpu:2
    #SBATCH --exclusive
    exec '{front}' --cache '{cache}' --device cpu job '{cache}/jobs/{key}/job.json'
"
    );
    assert_eq!(stdout, expected);
    assert_eq!(key.len(), 64);
}

/// `--jobs 1` bounds the jobs in flight: two independent stages run one after the other.
#[test]
fn jobs_bounds_the_jobs_in_flight() {
    let _cluster = cluster();
    let project = project_with(
        "name: one-at-a-time\nstages:\n  a:\n    kind: command\n    run: sleep 1; echo a > $OUT/a\n  b:\n    kind: command\n    run: sleep 1; echo b > $OUT/b\n",
    );
    let watcher = Watcher::start("dp-");
    let result = run_on_slurm(&project, "sweep.yaml", &["--jobs", "1"]);
    let (most, seen) = watcher.finish();
    assert_success(&result);
    assert_eq!(our_jobs(&project).len(), 2);
    assert!(seen.len() >= 2, "the watcher saw {seen:?}");
    assert_eq!(most, 1, "jobs running at once");
}
