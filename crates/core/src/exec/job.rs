//! One stage run, self-contained: the [`JobSpec`] that a local run builds in memory and a Slurm
//! job reads from `<cache>/jobs/<key>/job.json`; running it into a staging folder and
//! committing it with the store (the same code both ways, so a result a job commits is
//! indistinguishable from a local one); and the exit record a job leaves for the controller.
use super::error::JobError;
use super::events::{CancelFlag, ProgressReporter};
use crate::cache::store::{Commit, ResultRecord, Store, read_json};
use crate::device::Device;
use crate::plan::fingerprint::KeyMaterial;
use crate::stages::{
    ExtendFrom, ResolvedInput, SnapshotTarget, Stage, StageContext, StageError, StageLog,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The job file format; a job refuses files of another.
pub const JOB_FORMAT: u32 = 1;

/// Everything one stage run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub format: u32,
    pub pipeline: String,
    /// The pipeline file's folder (relative paths in commands resolve against it).
    pub pipeline_dir: PathBuf,
    pub stage_id: String,
    pub kind: String,
    /// Every schema field, defaults filled in.
    pub params: serde_json::Map<String, Value>,
    pub inputs: BTreeMap<String, Vec<ResolvedInput>>,
    pub key: String,
    pub material: KeyMaterial,
    /// Replace an existing result (`--force`).
    pub replace: bool,
    /// Shorter variants this run also produces (a steps sweep trained once): each is
    /// committed from the run's snapshot at its step, under its own key.
    #[serde(default)]
    pub snapshots: Vec<SnapshotSpec>,
    /// A cached shorter run of this stage to continue from.
    #[serde(default)]
    pub extend_from: Option<ExtendFrom>,
}

/// A variant served from a snapshot: the step, and the stage id, key and key material it
/// would have had alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotSpec {
    pub step: u64,
    pub stage_id: String,
    pub key: String,
    pub material: KeyMaterial,
}

/// Where a run computes: its device and every device slot it holds.
pub struct Placement<'a> {
    pub device: Device,
    pub devices: &'a [Device],
}

/// A run that finished into its staging folder, not yet committed.
pub struct Staged {
    pub staging: PathBuf,
    pub seconds: f64,
}

/// Runs the stage into a fresh staging folder (its checkpoints in the key's work folder, its
/// log at the key's log path). On failure the staging folder is discarded; a cancelled stage
/// fails with [`StageError::Cancelled`].
pub fn run_in_staging(
    store: &Store,
    stage: &dyn Stage,
    job: &JobSpec,
    placement: &Placement<'_>,
    progress: &ProgressReporter,
    cancel: &CancelFlag,
) -> Result<Staged, JobError> {
    let staging = store.create_staging(&job.key)?;
    let work = store.work_dir(&job.key);
    std::fs::create_dir_all(&work).map_err(|source| JobError::CreateDir {
        path: work.clone(),
        source,
    })?;
    let log = StageLog::create(&store.log_path(&job.key));
    let shared_root = store.root().join("shared");
    let out = staging.join("out");
    let started = Instant::now();
    let snapshots: Vec<SnapshotTarget> = (job.snapshots.iter())
        .map(|s| SnapshotTarget {
            step: s.step,
            stage_id: s.stage_id.clone(),
            key: s.key.clone(),
        })
        .collect();
    let context = StageContext {
        stage_id: &job.stage_id,
        params: &job.params,
        inputs: &job.inputs,
        out_dir: &out,
        work_dir: &work,
        pipeline_dir: &job.pipeline_dir,
        progress,
        cancel,
        device: placement.device,
        devices: placement.devices,
        log: &log,
        shared_root: &shared_root,
        key: &job.key,
        pipeline: &job.pipeline,
        snapshots: &snapshots,
        extend_from: job.extend_from.as_ref(),
    };
    let result = crate::panics::catch(|| stage.run(&context))
        .unwrap_or_else(|problem| Err(StageError::Panicked { problem }));
    match result {
        Ok(()) => Ok(Staged {
            staging,
            seconds: started.elapsed().as_secs_f64(),
        }),
        Err(error) => {
            log.line(&format!("dreampipe: stage failed: {error}"));
            let _ = store.discard(&staging);
            Err(error.into())
        }
    }
}

/// Commits a staged run under its key (nothing partial is kept on failure), first the
/// snapshots it left for shorter variants (each under its own key), and removes the key's work
/// folder once the result is in.
pub fn commit_staged(
    store: &Store,
    job: &JobSpec,
    staged: Staged,
) -> Result<ResultRecord, JobError> {
    for snapshot in &job.snapshots {
        commit_snapshot(store, job, snapshot, staged.seconds);
    }
    let commit = Commit {
        key: &job.key,
        stage_id: &job.stage_id,
        kind: &job.kind,
        material: &job.material,
        duration_s: staged.seconds,
    };
    let committed = store.commit(&commit, &staged.staging, job.replace);
    if committed.is_err() {
        let _ = store.discard(&staged.staging);
    }
    let record = committed?;
    keep_final_state(store, &job.key);
    let _ = std::fs::remove_dir_all(store.work_dir(&job.key));
    Ok(record)
}

/// Moves the training state a run ended with (if it left one) to `states/<key>`.
fn keep_final_state(store: &Store, key: &str) {
    let state = store.work_dir(key).join(crate::stages::FINAL_STATE_DIR);
    if !state.is_dir() {
        return;
    }
    let target = store.state_dir(key);
    let _ = std::fs::remove_dir_all(&target);
    if let Some(parent) = target.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::rename(&state, &target);
}

/// Commits the snapshot of `snapshot.step` under its variant's key, unless that key has a
/// result or is locked by someone computing it. Best effort: a variant whose snapshot is
/// missing (the run resumed past its step) is computed on its own afterwards.
fn commit_snapshot(store: &Store, job: &JobSpec, snapshot: &SnapshotSpec, seconds: f64) {
    let folder = crate::stages::snapshot_folder(&store.work_dir(&job.key), snapshot.step);
    if !folder.is_dir() || store.lookup(&snapshot.key).is_some() {
        return;
    }
    let Ok(Some(_lock)) = store.try_lock_key(&snapshot.key) else {
        return;
    };
    let Ok(staging) = store.create_staging(&snapshot.key) else {
        return;
    };
    let out = staging.join("out");
    let moved = std::fs::remove_dir(&out).and_then(|()| std::fs::rename(&folder, &out));
    let commit = Commit {
        key: &snapshot.key,
        stage_id: &snapshot.stage_id,
        kind: &job.kind,
        material: &snapshot.material,
        duration_s: seconds,
    };
    if moved.is_err() || store.commit(&commit, &staging, false).is_err() {
        let _ = store.discard(&staging);
    }
}

/// What a finished job tells the controller (`<cache>/jobs/<key>/exit-<job id>.json`). A job
/// stopped by a signal (scancel, time limit, preemption) writes none: Slurm's state says why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub ok: bool,
    pub error: Option<String>,
    pub output_digest: Option<String>,
    pub seconds: f64,
}

/// The folder of a key's job file, script and exit records.
pub fn jobs_dir(store: &Store, key: &str) -> PathBuf {
    store.root().join("jobs").join(key)
}

/// The job file of `key`.
pub fn job_file(store: &Store, key: &str) -> PathBuf {
    jobs_dir(store, key).join("job.json")
}

/// The exit record a job with Slurm id `job_id` leaves.
pub fn exit_path(store: &Store, key: &str, job_id: &str) -> PathBuf {
    jobs_dir(store, key).join(format!("exit-{job_id}.json"))
}

/// Writes `value` as JSON through a temporary file and a rename, so readers on other nodes
/// never see half a file.
pub fn write_atomically(path: &Path, value: &impl Serialize) -> Result<(), JobError> {
    let text = serde_json::to_vec_pretty(value).map_err(JobError::Encode)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| JobError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let temporary = dir.join(format!(
        ".{}.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&temporary, text)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|source| JobError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads a job file, refusing other formats and files whose key does not match their material.
pub fn read_job(path: &Path) -> Result<JobSpec, JobError> {
    let job: JobSpec = read_json(path).map_err(JobError::JobFile)?;
    if job.format != JOB_FORMAT {
        return Err(JobError::Format {
            path: path.to_path_buf(),
            found: job.format,
            reads: JOB_FORMAT,
        });
    }
    if job.material.key() != job.key {
        return Err(JobError::Damaged {
            path: path.to_path_buf(),
        });
    }
    Ok(job)
}

/// Where a job computes: a GPU kind whose key says `cuda` needs a CUDA device on the node
/// (`cuda_devices`, as Slurm exposed them, numbered from 0); CPU kinds hold no device.
pub fn job_devices(
    stage: &dyn Stage,
    job: &JobSpec,
    cuda_devices: &[Device],
) -> Result<Vec<Device>, JobError> {
    if stage.device_class() == crate::stages::DeviceClass::Cpu {
        return Ok(Vec::new());
    }
    if job.material.device_class != "cuda" {
        return Ok(vec![Device::Cpu]);
    }
    let usable: Vec<Device> = (cuda_devices.iter())
        .filter(|d| matches!(d, Device::Cuda(_)))
        .copied()
        .collect();
    if usable.is_empty() {
        return Err(JobError::NoCuda {
            stage_id: job.stage_id.clone(),
            visible: std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into()),
        });
    }
    Ok(usable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::{ParamSpec, StageContext};

    /// A stage that ends the way its function says.
    struct Ends(fn(&StageContext<'_>) -> Result<(), StageError>);

    impl Stage for Ends {
        fn kind(&self) -> &'static str {
            "ends"
        }
        fn version(&self) -> u32 {
            1
        }
        fn schema(&self) -> Vec<ParamSpec> {
            Vec::new()
        }
        fn summary(&self) -> &'static str {
            "test stage"
        }
        fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
            (self.0)(ctx)
        }
    }

    fn job() -> JobSpec {
        let material = KeyMaterial {
            kind: "ends".to_string(),
            version: 1,
            device_class: "cpu".to_string(),
            params: BTreeMap::new(),
            upstream: BTreeMap::new(),
            inputs: BTreeMap::new(),
        };
        JobSpec {
            format: JOB_FORMAT,
            pipeline: "p".to_string(),
            pipeline_dir: PathBuf::from("."),
            stage_id: "s".to_string(),
            kind: "ends".to_string(),
            params: serde_json::Map::new(),
            inputs: BTreeMap::new(),
            key: material.key(),
            material,
            replace: false,
            snapshots: Vec::new(),
            extend_from: None,
        }
    }

    /// Runs `stage` as [`job`] in a fresh cache (in `dir`).
    fn run(
        stage: &dyn Stage,
        cancel: &CancelFlag,
        dir: &Path,
    ) -> (Result<Staged, JobError>, Store) {
        let store = Store::open(&dir.join("cache")).expect("store");
        let placement = Placement {
            device: Device::Cpu,
            devices: &[],
        };
        let progress = ProgressReporter::new(None);
        let staged = run_in_staging(&store, stage, &job(), &placement, &progress, cancel);
        (staged, store)
    }

    #[test]
    fn a_cancelled_stage_fails_as_cancelled_and_leaves_no_staging() {
        let cancel = CancelFlag::default();
        cancel.cancel();
        let stage = Ends(|ctx| ctx.check_cancelled());
        let dir = tempfile::tempdir().expect("tempdir");
        let (staged, store) = run(&stage, &cancel, dir.path());
        let Err(error) = staged else {
            panic!("a cancelled stage staged a result");
        };
        assert!(matches!(error, JobError::Stage(StageError::Cancelled)));
        assert_eq!(error.to_string(), "cancelled");
        assert!(super::super::error::ExecError::from(error).is_cancelled());
        let staging = std::fs::read_dir(store.root().join("staging")).expect("staging");
        assert_eq!(staging.count(), 0);
    }

    #[test]
    fn a_panicking_stage_fails_with_the_panic_message() {
        let stage = Ends(|_| panic!("bug in a stage"));
        let dir = tempfile::tempdir().expect("tempdir");
        let (staged, _) = run(&stage, &CancelFlag::default(), dir.path());
        let Err(error) = staged else {
            panic!("a panicking stage staged a result");
        };
        assert!(
            matches!(&error, JobError::Stage(StageError::Panicked { problem }) if problem == "bug in a stage"),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "bug in a stage (the stage panicked; RUST_BACKTRACE=1 shows where)"
        );
    }

    #[test]
    fn job_files_of_another_format_or_with_a_wrong_key_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.json");
        let mut old = job();
        old.format = JOB_FORMAT + 1;
        write_atomically(&path, &old).expect("write");
        let error = read_job(&path).unwrap_err();
        assert!(matches!(error, JobError::Format { found, .. } if found == JOB_FORMAT + 1));
        assert_eq!(
            error.to_string(),
            format!(
                "job file `{}` has format {} but this dreampipe reads format {JOB_FORMAT}; submit it with the same dreampipe build",
                path.display(),
                JOB_FORMAT + 1
            )
        );
        let mut damaged = job();
        damaged.key = "0".repeat(64);
        write_atomically(&path, &damaged).expect("write");
        let error = read_job(&path).unwrap_err();
        assert!(matches!(&error, JobError::Damaged { path: p } if *p == path));
        assert_eq!(
            error.to_string(),
            format!(
                "job file `{}` is damaged: its key material does not hash to its key",
                path.display()
            )
        );
    }
}
