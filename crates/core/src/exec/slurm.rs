//! The Slurm executor's controller side. The DAG, cache lookups and keys stay in the submitting
//! process; each dirty stage becomes one job: a job file (`exec::job::JobSpec`) and a batch
//! script under `<cache>/jobs/<key>/`, submitted with `sbatch --parsable`. The job runs
//! `dreampipe-torch job FILE`, computes into staging and commits with the store, then leaves an
//! exit record. One poller asks `squeue` about every job in flight in one call, with a capped
//! backoff; completion is the exit record (with a grace period for NFS attribute caches), never
//! `sacct`. Cancelling the run `scancel`s every job it submitted. Jobs an earlier, killed
//! controller left running are found by their comment (`dreampipe:<key>`) and waited for.
use super::error::{SlurmError, SlurmJobFailure};
use super::job::{self, ExitRecord, JobSpec};
use crate::cache::store::Store;
use crate::pipeline::Resources;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, oneshot};

/// States in which a job still runs or may run again.
const ACTIVE_STATES: [&str; 12] = [
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
];

/// The comment that marks a job as this cache's run of `key`.
fn comment_for(key: &str) -> String {
    format!("dreampipe:{key}")
}

/// How the controller talks to Slurm.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    /// `sbatch`, `squeue`, `scancel`, `scontrol` (from PATH unless `DREAMPIPE_SLURM_BIN` names
    /// their folder).
    pub bin_dir: Option<PathBuf>,
    /// The binary a job runs (`dreampipe-torch`, on the shared filesystem).
    pub torch_binary: PathBuf,
    /// Jobs in flight at once.
    pub jobs: usize,
    /// Resubmissions of a failed job.
    pub retries: usize,
    /// First and longest pause between two status polls.
    pub poll_min: Duration,
    pub poll_max: Duration,
    /// How long a finished job may lack its exit record before the stage fails.
    pub grace: Duration,
}

impl SlurmOptions {
    /// Defaults, with `DREAMPIPE_SLURM_POLL_MAX_S` and `DREAMPIPE_SLURM_GRACE_S` for tests and
    /// clusters with slow filesystems.
    pub fn new(torch_binary: PathBuf, jobs: usize, retries: usize) -> Self {
        let seconds = |name: &str, default: f64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map(Duration::from_secs_f64)
                .unwrap_or(Duration::from_secs_f64(default))
        };
        Self {
            bin_dir: std::env::var_os("DREAMPIPE_SLURM_BIN").map(PathBuf::from),
            torch_binary,
            jobs: jobs.max(1),
            retries,
            poll_min: Duration::from_millis(250),
            poll_max: seconds("DREAMPIPE_SLURM_POLL_MAX_S", 15.0),
            grace: seconds("DREAMPIPE_SLURM_GRACE_S", 10.0),
        }
    }

    fn command(&self, name: &str) -> std::process::Command {
        match &self.bin_dir {
            Some(dir) => std::process::Command::new(dir.join(name)),
            None => std::process::Command::new(name),
        }
    }
}

/// How a job ended, as far as the controller can tell.
#[derive(Debug, Clone)]
pub enum JobEnd {
    /// The job wrote its exit record.
    Exited(ExitRecord),
    /// Slurm says it ended (or forgot it) without an exit record.
    Ended { state: String, reason: String },
    /// This run cancelled it.
    Cancelled,
}

struct Watched {
    key: String,
    /// When Slurm first reported the job finished (or stopped listing it) without an exit
    /// record; the grace period counts from here.
    ended_since: Option<(Instant, String, String)>,
    done: oneshot::Sender<JobEnd>,
}

/// The controller: submits, watches and cancels this run's jobs.
pub struct Slurm {
    pub options: SlurmOptions,
    store: Store,
    in_flight: Semaphore,
    watched: Mutex<HashMap<String, Watched>>,
    /// Jobs an earlier controller left in the queue, by key (read once, at the first submit).
    earlier: Mutex<Option<HashMap<String, String>>>,
    squeue_calls: AtomicU64,
    closed: AtomicBool,
}

impl Slurm {
    pub fn new(options: SlurmOptions, store: Store) -> Self {
        let permits = options.jobs.min(Semaphore::MAX_PERMITS);
        Self {
            options,
            store,
            in_flight: Semaphore::new(permits),
            watched: Mutex::new(HashMap::new()),
            earlier: Mutex::new(None),
            squeue_calls: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// `squeue` calls so far (the benchmark's figure).
    pub fn squeue_calls(&self) -> u64 {
        self.squeue_calls.load(Ordering::Relaxed)
    }

    /// One of the `--jobs` places for a job in flight.
    pub async fn place(&self) -> Result<tokio::sync::SemaphorePermit<'_>, SlurmError> {
        self.in_flight
            .acquire()
            .await
            .map_err(|_| SlurmError::LimitClosed)
    }

    /// Writes the job file, the log folder and the batch script of `job`; returns the script.
    pub fn prepare(
        &self,
        job: &JobSpec,
        resources: &Resources,
        needs_torch: bool,
    ) -> Result<PathBuf, SlurmError> {
        let job_file = job::job_file(&self.store, &job.key);
        job::write_atomically(&job_file, job).map_err(SlurmError::JobFile)?;
        let logs = log_dir(&self.store, &job.key);
        // Slurm does not create the --output folder; a job without it fails silently.
        std::fs::create_dir_all(&logs).map_err(|error| SlurmError::CreateLogs {
            path: logs.clone(),
            error,
        })?;
        let script = script_path(&self.store, &job.key);
        let what = ScriptFor::job(job, needs_torch);
        let text = script_text(&what, resources, &self.options.torch_binary, &self.store);
        std::fs::write(&script, text).map_err(|error| SlurmError::WriteScript {
            path: script.clone(),
            error,
        })?;
        Ok(script)
    }

    /// A job for `key` that an earlier controller submitted and that is still queued or
    /// running, if any.
    pub fn earlier_job(&self, key: &str) -> Option<String> {
        let mut earlier = self.earlier.lock().unwrap_or_else(|p| p.into_inner());
        let found = earlier.get_or_insert_with(|| self.queued_by_comment());
        found.remove(key)
    }

    /// Active jobs of this cache by key: the comment names the key and the command is this
    /// cache's script for it (two caches may hold the same key).
    fn queued_by_comment(&self) -> HashMap<String, String> {
        let output = self
            .options
            .command("squeue")
            .args(["-h", "--me", "-o", "%i|%k|%T|%o"])
            .output();
        self.squeue_calls.fetch_add(1, Ordering::Relaxed);
        let Ok(output) = output else {
            return HashMap::new();
        };
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.trim().splitn(4, '|').collect();
                let [id, comment, state, script] = fields[..] else {
                    return None;
                };
                let key = comment.strip_prefix("dreampipe:")?;
                let ours = Path::new(script) == script_path(&self.store, key);
                (ours && ACTIVE_STATES.contains(&state)).then(|| (key.to_string(), id.to_string()))
            })
            .collect()
    }

    /// Submits `script`; returns the job id.
    pub fn submit(&self, script: &Path) -> Result<String, SlurmError> {
        let output = self
            .options
            .command("sbatch")
            .arg("--parsable")
            .arg(script)
            .output()
            .map_err(SlurmError::NoSbatch)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let id = stdout.trim().split(';').next().unwrap_or("").to_string();
        if !output.status.success() || id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(SlurmError::Refused {
                status: output.status,
                stderr: stderr.trim().to_string(),
            });
        }
        Ok(id)
    }

    /// Waits until job `job_id` (running stage `key`) ends; the poller resolves it.
    pub async fn wait(&self, job_id: &str, key: &str) -> JobEnd {
        let (sender, receiver) = oneshot::channel();
        {
            let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            watched.insert(
                job_id.to_string(),
                Watched {
                    key: key.to_string(),
                    ended_since: None,
                    done: sender,
                },
            );
        }
        receiver.await.unwrap_or(JobEnd::Cancelled)
    }

    /// Stops the poller once nothing is watched any more.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Polls Slurm until [`Self::close`]; on `cancel`, scancels every watched job.
    pub async fn poll(&self, cancel: super::events::CancelFlag) {
        let mut delay = self.options.poll_min;
        loop {
            tokio::time::sleep(delay).await;
            if cancel.is_cancelled() {
                self.cancel_all().await;
            }
            let ids = self.watched_ids();
            if ids.is_empty() {
                if self.closed.load(Ordering::SeqCst) {
                    return;
                }
                delay = self.options.poll_min;
                continue;
            }
            let states = self.states(&ids).await;
            let resolved = self.resolve(&ids, states.as_ref());
            delay = if resolved {
                self.options.poll_min
            } else {
                (delay.mul_f64(1.5)).min(self.options.poll_max)
            };
        }
    }

    fn watched_ids(&self) -> Vec<String> {
        let watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        watched.keys().cloned().collect()
    }

    /// `(state, reason)` of each listed job in one squeue call; `None` when squeue did not
    /// answer (the jobs are then left as they are until the next poll).
    async fn states(&self, ids: &[String]) -> Option<HashMap<String, (String, String)>> {
        let mut command = tokio::process::Command::from(self.options.command("squeue"));
        command.args(["-h", "-t", "all", "-o", "%i|%T|%r", "-j", &ids.join(",")]);
        self.squeue_calls.fetch_add(1, Ordering::Relaxed);
        let output = command.output().await.ok()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        // Jobs Slurm has forgotten make squeue fail with "Invalid job id"; the rest still list.
        if !output.status.success() && !stderr.contains("Invalid job id") {
            return None;
        }
        let listed = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let mut fields = line.trim().splitn(3, '|');
                let id = fields.next()?.to_string();
                let state = fields.next()?.to_string();
                Some((id, (state, fields.next().unwrap_or("").to_string())))
            })
            .collect();
        Some(listed)
    }

    /// Resolves the jobs that ended; true when any did.
    fn resolve(&self, ids: &[String], states: Option<&HashMap<String, (String, String)>>) -> bool {
        let mut any = false;
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            let Some(entry) = watched.get_mut(id) else {
                continue;
            };
            let end = self.job_end(id, entry, states);
            if let Some(end) = end
                && let Some(entry) = watched.remove(id)
            {
                let _ = entry.done.send(end);
                any = true;
            }
        }
        any
    }

    fn job_end(
        &self,
        id: &str,
        entry: &mut Watched,
        states: Option<&HashMap<String, (String, String)>>,
    ) -> Option<JobEnd> {
        let exit = job::exit_path(&self.store, &entry.key, id);
        if let Ok(record) = crate::cache::store::read_json::<ExitRecord>(&exit) {
            return Some(JobEnd::Exited(record));
        }
        let states = states?;
        let (state, reason) = match states.get(id) {
            Some((state, _)) if ACTIVE_STATES.contains(&state.as_str()) => {
                entry.ended_since = None;
                return None;
            }
            Some((state, reason)) => (state.clone(), reason.clone()),
            None => ("GONE".to_string(), "no longer listed by squeue".to_string()),
        };
        let (since, state, reason) = entry
            .ended_since
            .get_or_insert_with(|| (Instant::now(), state, reason))
            .clone();
        (since.elapsed() >= self.options.grace).then_some(JobEnd::Ended { state, reason })
    }

    /// Cancels every watched job with one scancel and waits (bounded) until Slurm no longer
    /// lists any of them as active; their stages end as cancelled.
    async fn cancel_all(&self) {
        let ids = self.watched_ids();
        if ids.is_empty() {
            return;
        }
        let mut command = tokio::process::Command::from(self.options.command("scancel"));
        let _ = command.args(&ids).output().await;
        eprintln!(
            "interrupted: cancelled {} Slurm job(s) of this run (scancel {})",
            ids.len(),
            ids.join(" ")
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let still = self.states(&ids).await.is_none_or(|states| {
                states
                    .values()
                    .any(|(state, _)| ACTIVE_STATES.contains(&state.as_str()))
            });
            if !still {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        for (_, entry) in watched.drain() {
            let _ = entry.done.send(JobEnd::Cancelled);
        }
    }

    /// The one-line failure of a job that did not succeed, with its Slurm log's last lines
    /// (a job whose stage failed copies the stage log's last lines there), and that log.
    pub fn failure(&self, key: &str, job_id: &str, end: &JobEnd) -> (SlurmError, PathBuf) {
        let log = log_dir(&self.store, key).join(format!("slurm-{job_id}.log"));
        let job_id = job_id.to_string();
        let end = match end {
            JobEnd::Exited(record) => SlurmJobFailure::Failed {
                job_id,
                error: record.error.clone(),
            },
            JobEnd::Ended { state, reason } => {
                let mut details: Vec<String> = self.exit_code(&job_id).into_iter().collect();
                if !matches!(reason.as_str(), "" | "None") {
                    details.push(reason.clone());
                }
                SlurmJobFailure::Ended {
                    job_id,
                    state: state.clone(),
                    details,
                }
            }
            JobEnd::Cancelled => SlurmJobFailure::Cancelled { job_id },
        };
        let last_lines = match end {
            SlurmJobFailure::Cancelled { .. } => Vec::new(),
            _ => last_lines(&log, 5),
        };
        (SlurmError::Job { end, last_lines }, log)
    }

    /// `exit code N:S` from scontrol while Slurm still knows the job.
    fn exit_code(&self, job_id: &str) -> Option<String> {
        let output = self
            .options
            .command("scontrol")
            .args(["show", "job", "-o", job_id])
            .output();
        let text = String::from_utf8_lossy(&output.ok()?.stdout).into_owned();
        text.split_whitespace()
            .find_map(|field| field.strip_prefix("ExitCode="))
            .map(|code| format!("exit code {code}"))
    }
}

/// The batch script of `key`'s job.
pub fn script_path(store: &Store, key: &str) -> PathBuf {
    job::jobs_dir(store, key).join("job.sh")
}

/// `<cache>/logs/<key>/`: where each attempt's `slurm-<job id>.log` goes.
pub fn log_dir(store: &Store, key: &str) -> PathBuf {
    store.root().join("logs").join(key)
}

/// What a batch script names: the stage, its key and whether the job computes on CUDA.
pub struct ScriptFor<'a> {
    pub stage_id: &'a str,
    pub pipeline: &'a str,
    /// The key, or a placeholder while an upstream has not run (`plan`).
    pub key: &'a str,
    pub cuda: bool,
    /// Whether the kind needs libtorch: then the job runs `dreampipe-torch`, else the front
    /// `dreampipe` beside it (no libtorch to load: a `command` job starts in milliseconds).
    pub needs_torch: bool,
}

impl<'a> ScriptFor<'a> {
    pub fn job(job: &'a JobSpec, needs_torch: bool) -> Self {
        Self {
            stage_id: &job.stage_id,
            pipeline: &job.pipeline,
            key: &job.key,
            cuda: job.material.device_class == "cuda",
            needs_torch,
        }
    }
}

/// The batch script of a job: `#SBATCH` lines from `resources`, then the job itself.
pub fn script_text(
    what: &ScriptFor<'_>,
    resources: &Resources,
    torch: &Path,
    store: &Store,
) -> String {
    let mut lines = vec![
        "#!/bin/sh".to_string(),
        format!(
            "# dreampipe: stage `{}` of pipeline `{}`, key {}",
            what.stage_id, what.pipeline, what.key
        ),
    ];
    for flag in sbatch_flags(what, resources, store) {
        lines.push(format!("#SBATCH {flag}"));
    }
    let device = if what.cuda { "cuda" } else { "cpu" };
    let binary = match what.needs_torch {
        true => torch.to_path_buf(),
        false => torch.with_file_name("dreampipe"),
    };
    lines.push(format!(
        "exec {} --cache {} --device {device} job {}",
        shell_quote(&binary.display().to_string()),
        shell_quote(&store.root().display().to_string()),
        shell_quote(&job::job_file(store, what.key).display().to_string()),
    ));
    lines.join("\n") + "\n"
}

/// The sbatch flags of a job: its name, comment, log and resources.
fn sbatch_flags(what: &ScriptFor<'_>, resources: &Resources, store: &Store) -> Vec<String> {
    let log = log_dir(store, what.key).join("slurm-%j.log");
    let mut flags = vec![
        format!("--job-name={}", job_name(what.stage_id)),
        format!("--comment={}", comment_for(what.key)),
        format!("--output={}", sbatch_path(&log)),
    ];
    let named: BTreeMap<&str, &Option<String>> = BTreeMap::from([
        ("--partition", &resources.partition),
        ("--account", &resources.account),
        ("--qos", &resources.qos),
        ("--time", &resources.time),
        ("--mem", &resources.mem),
    ]);
    for (flag, value) in named {
        if let Some(value) = value {
            flags.push(format!("{flag}={value}"));
        }
    }
    if let Some(cpus) = resources.cpus {
        flags.push(format!("--cpus-per-task={cpus}"));
    }
    match resources.gpus {
        Some(gpus) if gpus > 0 => flags.push(format!("--gres=gpu:{gpus}")),
        _ => {}
    }
    flags.extend(resources.sbatch_args.iter().cloned());
    flags
}

/// `dp-<stage id>` with characters squeue would show badly replaced.
fn job_name(stage_id: &str) -> String {
    let cleaned: String = stage_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-=,[]".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    format!("dp-{cleaned}")
}

/// A path on a `#SBATCH` line (quoted when it has spaces).
fn sbatch_path(path: &Path) -> String {
    let text = path.display().to_string();
    if text.contains(char::is_whitespace) {
        format!("\"{text}\"")
    } else {
        text
    }
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The last `count` non-empty lines of a file (none when it does not read).
fn last_lines(path: &Path, count: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = (text.lines())
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    lines[lines.len().saturating_sub(count)..].to_vec()
}
