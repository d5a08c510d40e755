//! `cache gc`: removes result folders whose record does not read, old results (`--keep-last N` per stage, or oldest first until the store
//! fits `--max-size`), never a result whose key is in `protected` (the keys the given pipelines
//! reference), then deletes objects no result links any more (link count 1), staging
//! folders of dead processes, and `shared/` memo files unused since before the oldest result
//! that survives (LRU by mtime: stages refresh an entry's mtime when they reuse it).
use super::CacheError;
use super::store::{ResultRecord, Store, pid_alive};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;

/// What to keep.
#[derive(Debug, Default)]
pub struct GcPolicy {
    /// Keep the N newest results of each stage id.
    pub keep_last: Option<usize>,
    /// Remove the oldest results until the objects take at most this many bytes.
    pub max_size: Option<u64>,
    /// Keys that must survive.
    pub protected: BTreeSet<String>,
    /// Remove every kept training state (`states/`), not only those of removed results.
    pub drop_states: bool,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed_results: Vec<String>,
    pub removed_objects: usize,
    pub freed_bytes: u64,
    pub removed_staging: usize,
    /// Results kept because a running stage held their lock.
    pub in_use: Vec<String>,
    /// Files removed from `shared/`, and their bytes (not in `freed_bytes`).
    pub removed_shared: usize,
    pub freed_shared_bytes: u64,
    /// Training states removed (`states/<key>`), and their bytes.
    pub removed_states: usize,
    pub freed_state_bytes: u64,
    /// Slurm job folders (`jobs/<key>`) and job-log folders (`logs/<key>/`) removed.
    pub removed_job_files: usize,
}

/// A `shared/` file modified this recently is never removed: a running stage may be writing
/// or reusing it (one hour is far longer than a copy or rename takes).
pub const SHARED_GRACE_SECS: u64 = 3600;

pub fn gc(store: &Store, policy: &GcPolicy) -> Result<GcReport, CacheError> {
    let mut report = GcReport::default();
    let results = store.results();
    let mut doomed = doomed_by_keep_last(&results, policy);
    // A folder without a readable record is no result (runs recompute it): always removed.
    doomed.extend(
        store
            .result_keys()
            .into_iter()
            .filter(|key| store.unreadable_record(key).is_some()),
    );
    if let Some(limit) = policy.max_size {
        let mut size = objects_size(store);
        for record in &results {
            if size <= limit {
                break;
            }
            if !policy.protected.contains(&record.key) && doomed.insert(record.key.clone()) {
                size = size.saturating_sub(record.size_bytes);
            }
        }
    }
    for key in &doomed {
        // A result being computed or read by a running stage is kept for a later gc.
        let Some(_lock) = store.try_lock_key(key)? else {
            report.in_use.push(key.clone());
            continue;
        };
        store.discard(&store.result_dir(key))?;
        report.removed_results.push(key.clone());
    }
    sweep_objects(store, &mut report)?;
    sweep_states(store, policy.drop_states, &mut report);
    sweep_job_files(store, &mut report);
    report.removed_staging = sweep_staging(store);
    let oldest_kept = store.results().iter().map(|r| r.created_unix).min();
    sweep_shared(store, oldest_kept, &mut report)?;
    Ok(report)
}

/// Removes the training states of results that are gone (all of them with `drop_all`), except
/// those whose key a running stage holds.
fn sweep_states(store: &Store, drop_all: bool, report: &mut GcReport) {
    let Ok(entries) = std::fs::read_dir(store.root().join("states")) else {
        return;
    };
    for entry in entries.flatten() {
        let key = entry.file_name().to_string_lossy().into_owned();
        if !drop_all && store.lookup(&key).is_some() {
            continue;
        }
        let Ok(Some(_lock)) = store.try_lock_key(&key) else {
            continue;
        };
        let bytes = folder_bytes(&entry.path());
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            report.removed_states += 1;
            report.freed_state_bytes += bytes;
        }
    }
}

/// Removes the Slurm files of finished work: `jobs/<key>` once the key has a result (its job
/// file and exit records are no longer read) or when the key has none and nobody holds its lock
/// (a job that failed or whose result was removed; a rerun writes them anew), and `logs/<key>/`
/// of keys without a result.
fn sweep_job_files(store: &Store, report: &mut GcReport) {
    for (folder, keep_when_result) in [("jobs", false), ("logs", true)] {
        let Ok(entries) = std::fs::read_dir(store.root().join(folder)) else {
            continue;
        };
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            let key = entry.file_name().to_string_lossy().into_owned();
            if keep_when_result && store.lookup(&key).is_some() {
                continue;
            }
            let Ok(Some(_lock)) = store.try_lock_key(&key) else {
                continue; // a run is computing or using this key
            };
            if std::fs::remove_dir_all(entry.path()).is_ok() {
                report.removed_job_files += 1;
            }
        }
    }
}

/// Bytes of the regular files under `dir`.
pub fn folder_bytes(dir: &std::path::Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn doomed_by_keep_last(results: &[ResultRecord], policy: &GcPolicy) -> BTreeSet<String> {
    let Some(keep) = policy.keep_last else {
        return BTreeSet::new();
    };
    let mut by_stage: BTreeMap<&str, Vec<&ResultRecord>> = BTreeMap::new();
    for record in results {
        by_stage.entry(&record.stage_id).or_default().push(record);
    }
    let mut doomed = BTreeSet::new();
    for list in by_stage.values() {
        let excess = list.len().saturating_sub(keep);
        for record in &list[..excess] {
            if !policy.protected.contains(&record.key) {
                doomed.insert(record.key.clone());
            }
        }
    }
    doomed
}

fn objects_size(store: &Store) -> u64 {
    walkdir::WalkDir::new(store.root().join("objects"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn sweep_objects(store: &Store, report: &mut GcReport) -> Result<(), CacheError> {
    let objects = store.root().join("objects");
    for entry in walkdir::WalkDir::new(&objects)
        .min_depth(2)
        .max_depth(2)
        .into_iter()
        .flatten()
    {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() && meta.nlink() == 1 {
            std::fs::remove_file(entry.path())
                .map_err(|e| CacheError::io("remove", entry.path(), e))?;
            report.removed_objects += 1;
            report.freed_bytes += meta.len();
        }
    }
    Ok(())
}

/// Removes `staging/<key>-<pid>-<n>` folders whose process is gone.
fn sweep_staging(store: &Store) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(store.root().join("staging"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().to_string();
        let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !pid_alive(pid)) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Removes `shared/` files last modified before `oldest_kept` (every file when no result is
/// left) and before the grace period; memos are caches, so removal only costs recomputation.
fn sweep_shared(
    store: &Store,
    oldest_kept: Option<u64>,
    report: &mut GcReport,
) -> Result<(), CacheError> {
    let now = super::store::now_unix();
    let grace_cutoff = now.saturating_sub(SHARED_GRACE_SECS);
    let cutoff = oldest_kept.map_or(grace_cutoff, |oldest| oldest.min(grace_cutoff));
    for entry in walkdir::WalkDir::new(store.root().join("shared"))
        .min_depth(1)
        .into_iter()
        .flatten()
    {
        let Ok(meta) = entry.metadata() else { continue };
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(u64::MAX, |d| d.as_secs());
        if meta.is_file() && modified < cutoff {
            std::fs::remove_file(entry.path())
                .map_err(|e| CacheError::io("remove", entry.path(), e))?;
            report.removed_shared += 1;
            report.freed_shared_bytes += meta.len();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn file_aged(path: &std::path::Path, age_secs: u64) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, b"memo").expect("write");
        let file = std::fs::File::options()
            .write(true)
            .open(path)
            .expect("open");
        file.set_modified(SystemTime::now() - Duration::from_secs(age_secs))
            .expect("set mtime");
    }

    #[test]
    fn slurm_job_folders_go_and_job_logs_stay_with_their_results() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let kept = "a".repeat(64);
        let gone = "b".repeat(64);
        let result = store.result_dir(&kept);
        std::fs::create_dir_all(result.join("out")).expect("mkdir");
        let record = serde_json::json!({"key": kept, "stage_id": "db", "kind": "command",
            "output_digest": "d", "size_bytes": 0, "files": {}, "created_unix": 1, "duration_s": 0.0});
        std::fs::write(result.join("result.json"), record.to_string()).expect("record");
        for key in [&kept, &gone] {
            file_aged(&dir.path().join(format!("jobs/{key}/job.json")), 0);
            file_aged(&dir.path().join(format!("logs/{key}/slurm-1.log")), 0);
        }
        file_aged(&dir.path().join(format!("logs/{gone}.log")), 0);
        let mut report = GcReport::default();
        sweep_job_files(&store, &mut report);
        assert_eq!(report.removed_job_files, 3);
        let exists = |relative: String| dir.path().join(relative).exists();
        assert!(!exists(format!("jobs/{kept}")) && !exists(format!("jobs/{gone}")));
        assert!(exists(format!("logs/{kept}/slurm-1.log")) && !exists(format!("logs/{gone}")));
        assert!(
            exists(format!("logs/{gone}.log")),
            "stage logs are not Slurm files"
        );
    }

    #[test]
    fn shared_files_older_than_the_oldest_kept_result_and_the_grace_period_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let shared = dir.path().join("shared/generate");
        let (old, recent, fresh) = (
            shared.join("old.png"),
            shared.join("recent.png"),
            shared.join("fresh.png"),
        );
        file_aged(&old, 10 * 86_400);
        file_aged(&recent, 2 * 86_400);
        file_aged(&fresh, 60);
        let now = super::super::store::now_unix();
        let mut report = GcReport::default();
        sweep_shared(&store, Some(now - 5 * 86_400), &mut report).expect("sweep");
        assert_eq!(report.removed_shared, 1);
        assert_eq!(report.freed_shared_bytes, 4);
        assert!(!old.exists() && recent.exists() && fresh.exists());
        // No result left: everything past the grace period goes, the fresh file stays.
        sweep_shared(&store, None, &mut report).expect("sweep");
        assert_eq!(report.removed_shared, 2);
        assert!(!recent.exists() && fresh.exists());
    }
}
