//! The executor's own checks: `--locked` mismatches, key material errors, and small runs.
use super::locked::{check_locked_key, check_locked_output};
use super::stage::key_material;
use super::*;
use crate::cache::CacheError;
use crate::exec::error::SkipReason;
use crate::exec::lockfile::LockEntry;
use crate::pipeline::{LoadOptions, load_str};
use std::collections::BTreeMap;
use std::path::Path;

fn lock_file(id: &str, key: &str, output: &str) -> LockFile {
    let entry = LockEntry {
        key: key.to_string(),
        output: output.to_string(),
    };
    LockFile {
        pipeline: "p".to_string(),
        stages: BTreeMap::from([(id.to_string(), entry)]),
    }
}

#[test]
fn a_locked_key_mismatch_names_both_keys_shortened() {
    let (locked, key) = ("1".repeat(64), "3".repeat(64));
    let lock = lock_file("a", &locked, &"2".repeat(64));
    let error = check_locked_key(Some(&lock), "a", &key).unwrap_err();
    assert!(
        matches!(&error, ExecError::LockedKeyMismatch { id, key: k, locked: l }
            if id == "a" && *k == key && *l == locked),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "--locked: stage `a` has key 333333333333 but the lock file has 111111111111; \
         its inputs or parameters differ (see `dreampipe explain`)"
    );
    let missing = check_locked_key(Some(&lock), "b", &key).unwrap_err();
    assert!(matches!(&missing, ExecError::NotLocked { id } if id == "b"));
    assert_eq!(
        missing.to_string(),
        "--locked: stage `b` is not in the lock file"
    );
    assert!(check_locked_key(Some(&lock), "a", &locked).is_ok());
    assert!(check_locked_key(None, "b", &key).is_ok());
}

#[test]
fn a_locked_output_mismatch_says_the_stage_is_not_reproducible() {
    let lock = lock_file("a", "k", &"2".repeat(64));
    let error = check_locked_output(Some(&lock), "a", &"4".repeat(64)).unwrap_err();
    assert!(matches!(&error, ExecError::LockedOutputMismatch { id, .. } if id == "a"));
    assert_eq!(
        error.to_string(),
        "--locked: stage `a` produced output 444444444444 but the lock file has \
         222222222222; the stage is not reproducible here"
    );
    assert!(check_locked_output(Some(&lock), "a", &"2".repeat(64)).is_ok());
    assert!(check_locked_output(Some(&lock), "other", "x").is_ok());
}

#[test]
fn an_upstream_without_output_is_an_internal_error_naming_it() {
    let error = key_material(Ok(Err("prep".to_string()))).unwrap_err();
    assert!(matches!(&error, ExecError::UpstreamMissing { upstream } if upstream == "prep"));
    assert_eq!(
        error.to_string(),
        "internal error: upstream `prep` has no output"
    );
    let unreadable = CacheError::io("hash", Path::new("data/x.txt"), denied());
    let error = key_material(Err(unreadable)).unwrap_err();
    assert!(matches!(error, ExecError::Hashing(CacheError::Io { .. })));
    assert_eq!(
        error.to_string(),
        "hashing inputs: cache: hash `data/x.txt`: permission denied"
    );
}

fn denied() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied")
}

/// `a`, and `b` reading it.
const CHAIN: &str = "name: chain
stages:
  a:
    kind: step
  b:
    kind: step
    needs: a
";

/// Runs [`CHAIN`] in a fresh cache with only the stages in `selected`.
async fn run_chain(selected: Vec<bool>, cancel: CancelFlag) -> RunRecord {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.yaml");
    let options = LoadOptions::new(crate::stages::test_kinds::registry());
    let pipeline = load_str(CHAIN, &file, dir.path(), &options).expect("valid");
    let store = Store::open(&dir.path().join("cache")).expect("store");
    let n = selected.len();
    let options = ExecOptions {
        jobs: 1,
        devices: Vec::new(),
        selected,
        forced: vec![false; n],
        locked: None,
        verify: false,
        slurm: None,
    };
    let (events, _received) = tokio::sync::mpsc::unbounded_channel();
    let memo = Arc::new(HashMemo::in_memory());
    let plan = Arc::new(Plan::new(pipeline));
    execute(plan, store, memo, options, events, cancel).await
}

#[tokio::test]
async fn an_unselected_upstream_missing_from_the_cache_fails_and_skips_its_dependents() {
    let record = run_chain(vec![false, true], CancelFlag::default()).await;
    let [a, b] = &record.stages[..] else {
        panic!("{:?}", record.stages)
    };
    assert_eq!(a.status, Outcome::Failed);
    let key = a.key.clone().expect("keyed");
    let expected = format!(
        "not in the cache and not selected by --only/--until (key {}); run it first",
        &key[..12]
    );
    assert_eq!(a.error.as_deref(), Some(expected.as_str()));
    assert_eq!(ExecError::NotSelected { key }.to_string(), expected);
    assert_eq!(b.status, Outcome::Skipped);
    let skip = SkipReason::UpstreamFailed { id: "a".into() };
    assert_eq!(b.error.as_deref(), Some("upstream `a` did not finish"));
    assert_eq!(b.error, Some(skip.to_string()));
    assert!(!record.success);
}

#[tokio::test]
async fn a_cancelled_run_fails_its_next_stage_as_cancelled() {
    let cancel = CancelFlag::default();
    cancel.cancel();
    let record = run_chain(vec![true, true], cancel).await;
    assert!(record.cancelled && !record.success);
    assert_eq!(record.stages[0].status, Outcome::Failed);
    assert_eq!(record.stages[0].error.as_deref(), Some("cancelled"));
    assert_eq!(ExecError::Cancelled.to_string(), "cancelled");
    assert_eq!(record.stages[1].status, Outcome::Skipped);
}
