//! `cache gc`: removes old results (`--keep-last N` per stage, or oldest first until the store
//! fits `--max-size`), never a result whose key is in `protected` (the keys the given pipelines
//! reference), then deletes objects no result links any more (link count 1) and staging
//! folders of dead processes.
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
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed_results: Vec<String>,
    pub removed_objects: usize,
    pub freed_bytes: u64,
    pub removed_staging: usize,
    /// Results kept because a running stage held their lock.
    pub in_use: Vec<String>,
}

pub fn gc(store: &Store, policy: &GcPolicy) -> Result<GcReport, CacheError> {
    let mut report = GcReport::default();
    let results = store.results();
    let mut doomed = doomed_by_keep_last(&results, policy);
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
    report.removed_staging = sweep_staging(store);
    Ok(report)
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
