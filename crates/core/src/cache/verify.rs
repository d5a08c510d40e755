//! `cache verify`: rehash every object and every result file; a mismatch is reported, the
//! object and each result containing it are moved to `quarantine/`, so the next run misses
//! and recomputes them. A result folder whose `result.json` does not read is quarantined too.
use super::CacheError;
use super::hash::{HashMemo, hash_file_uncached};
use super::store::{ResultRecord, Store};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub objects_checked: usize,
    pub results_checked: usize,
    /// One line per problem, naming the object or result file.
    pub problems: Vec<String>,
    pub quarantined_results: Vec<String>,
}

/// Rehashes the whole store; quarantines what is corrupt.
pub fn verify(store: &Store) -> Result<VerifyReport, CacheError> {
    let mut report = VerifyReport::default();
    let corrupt_objects = verify_objects(store, &mut report)?;
    for key in store.result_keys() {
        report.results_checked += 1;
        let problem = match store.lookup(&key) {
            Some(record) => first_problem(store, &record, &corrupt_objects),
            None => Some(format!(
                "result {key}: {}",
                store.unreadable_record(&key).unwrap_or_default()
            )),
        };
        if let Some(problem) = problem {
            report.problems.push(problem);
            quarantine(store, &store.result_dir(&key), &key)?;
            report.quarantined_results.push(key);
        }
    }
    for digest in &corrupt_objects {
        quarantine(store, &store.object_path(digest), digest)?;
    }
    Ok(report)
}

fn verify_objects(
    store: &Store,
    report: &mut VerifyReport,
) -> Result<BTreeSet<String>, CacheError> {
    let mut corrupt = BTreeSet::new();
    let objects = store.root().join("objects");
    for entry in walkdir::WalkDir::new(&objects).min_depth(2).max_depth(2) {
        let entry = entry.map_err(|e| CacheError::io("walk", &objects, e.into()))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !entry.file_type().is_file() || name.contains('.') {
            continue;
        }
        report.objects_checked += 1;
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        let actual = hash_file_uncached(entry.path(), size)?;
        if actual != name {
            report.problems.push(format!(
                "object {name} is corrupt (its content hashes to {actual}); quarantined"
            ));
            corrupt.insert(name);
        }
    }
    Ok(corrupt)
}

/// The first file of `record` that is missing, changed, or linked to a corrupt object.
fn first_problem(
    store: &Store,
    record: &ResultRecord,
    corrupt: &BTreeSet<String>,
) -> Option<String> {
    let out = store.output_dir(&record.key);
    for (name, digest) in &record.files {
        let path = out.join(name);
        let Ok(meta) = std::fs::metadata(&path) else {
            return Some(format!(
                "result {} ({}): file {name} is missing",
                record.key, record.stage_id
            ));
        };
        let bad = corrupt.contains(digest)
            || (!same_inode(&meta, &store.object_path(digest))
                && hash_file_uncached(&path, meta.len()).ok().as_deref() != Some(digest));
        if bad {
            return Some(format!(
                "result {} ({}): file {name} does not match its recorded digest",
                record.key, record.stage_id
            ));
        }
    }
    None
}

fn same_inode(meta: &std::fs::Metadata, other: &Path) -> bool {
    std::fs::metadata(other)
        .map(|o| o.ino() == meta.ino() && o.dev() == meta.dev())
        .unwrap_or(false)
}

fn quarantine(store: &Store, path: &Path, name: &str) -> Result<(), CacheError> {
    let target = store
        .root()
        .join("quarantine")
        .join(format!("{name}-{}", super::store::unique_suffix("at")));
    std::fs::rename(path, &target).map_err(|e| CacheError::io("quarantine", path, e))
}

/// What a run checks before it reuses a result (cheap, every time): every recorded file is
/// there, and its digest — from the hash memo while its (device, inode, size, mtime) is
/// unchanged, else by rehashing it — is the recorded one. Without a memo (`run --verify`)
/// every file is rehashed. Returns the first problem.
pub fn damage(store: &Store, memo: Option<&HashMemo>, record: &ResultRecord) -> Option<Damage> {
    let out = store.output_dir(&record.key);
    for (name, digest) in &record.files {
        let path = out.join(name);
        let hashed = match memo {
            Some(memo) => memo.hash_file(&path),
            None => std::fs::metadata(&path)
                .map_err(|e| CacheError::io("read", &path, e))
                .and_then(|meta| hash_file_uncached(&path, meta.len())),
        };
        let problem = match hashed {
            Ok(actual) if actual == *digest => continue,
            Ok(actual) => format!("file {name} hashes to {actual}, not its recorded {digest}"),
            Err(_) => format!("file {name} is missing or unreadable"),
        };
        return Some(Damage {
            problem: format!(
                "result {} ({}): {problem}",
                short(&record.key),
                record.stage_id
            ),
            digest: digest.clone(),
        });
    }
    None
}

/// A damaged result found by [`damage`].
#[derive(Debug, Clone)]
pub struct Damage {
    pub problem: String,
    /// The recorded digest of the damaged file (its object may be the damaged copy).
    pub digest: String,
}

/// Moves a damaged result to `quarantine/`, and its object too when that no longer hashes to
/// its name (so the recomputed output is not linked back to the damaged copy).
pub fn quarantine_damaged(store: &Store, key: &str, damage: &Damage) -> Result<(), CacheError> {
    quarantine(store, &store.result_dir(key), key)?;
    let object = store.object_path(&damage.digest);
    let Ok(meta) = std::fs::metadata(&object) else {
        return Ok(());
    };
    if hash_file_uncached(&object, meta.len()).ok().as_deref() != Some(damage.digest.as_str()) {
        quarantine(store, &object, &damage.digest)?;
    }
    Ok(())
}

fn short(key: &str) -> &str {
    &key[..12.min(key.len())]
}
