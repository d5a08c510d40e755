//! Per-key locks: an advisory `flock` on `locks/<key>.lock`. The kernel releases it when the
//! holding process dies (even by `kill -9`), so a lock left by a dead process never blocks;
//! the pid written inside is only informational.
use super::CacheError;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often a waiting process retries the lock and checks for cancellation.
const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A held key lock; dropping it releases the lock.
pub struct KeyLock {
    _file: File,
    pub path: PathBuf,
}

/// Whether the lock was free or another holder had it first; or, while waiting, the result
/// became usable and a shared lock on it was taken instead.
pub enum Acquired {
    Immediately(KeyLock),
    AfterWaiting(KeyLock),
    Shared(KeyLock),
}

/// Takes the lock at `path`, polling until it is free or `cancel` is set. `on_wait` runs once
/// when the lock is busy (to tell the user who they wait for). While it waits, whenever
/// `done_meanwhile()` says the result now exists, a shared lock is tried instead: holders that
/// keep a shared lock for long (runs pinning a result they use) never make a reader wait.
pub fn acquire(
    path: &Path,
    cancel: &AtomicBool,
    on_wait: impl FnOnce(),
    mut done_meanwhile: impl FnMut() -> bool,
) -> Result<Acquired, CacheError> {
    let mut file = open_lock_file(path)?;
    let mut waited = false;
    let mut on_wait = Some(on_wait);
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                if done_meanwhile()
                    && let Some(shared) = try_shared(path)?
                {
                    return Ok(Acquired::Shared(shared));
                }
                if cancel.load(Ordering::Relaxed) {
                    return Err(CacheError::Cancelled {
                        key: path.display().to_string(),
                    });
                }
                if let Some(callback) = on_wait.take() {
                    callback();
                }
                waited = true;
                std::thread::sleep(LOCK_POLL_INTERVAL);
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(CacheError::io("lock", path, e));
            }
        }
    }
    let _ = file.set_len(0);
    let _ = writeln!(file, "{}", std::process::id());
    let lock = KeyLock {
        _file: file,
        path: path.to_path_buf(),
    };
    Ok(if waited {
        Acquired::AfterWaiting(lock)
    } else {
        Acquired::Immediately(lock)
    })
}

fn open_lock_file(path: &Path) -> Result<File, CacheError> {
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| CacheError::io("open lock", path, e))
}

/// The exclusive lock if nobody holds the lock in any mode (for `cache gc`), else `None`.
pub fn try_exclusive(path: &Path) -> Result<Option<KeyLock>, CacheError> {
    let file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(KeyLock {
            _file: file,
            path: path.to_path_buf(),
        })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(CacheError::io("lock", path, e)),
    }
}

/// A shared lock: held by a run on every result it uses, so `cache gc` leaves them alone.
/// `None` while someone holds the lock exclusively (computing or removing the result).
pub fn try_shared(path: &Path) -> Result<Option<KeyLock>, CacheError> {
    let file = open_lock_file(path)?;
    match file.try_lock_shared() {
        Ok(()) => Ok(Some(KeyLock {
            _file: file,
            path: path.to_path_buf(),
        })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(CacheError::io("lock", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_waits_until_first_releases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.lock");
        let cancel = AtomicBool::new(false);
        let first = acquire(&path, &cancel, || {}, || false).expect("first");
        let handle = {
            let path = path.clone();
            std::thread::spawn(move || {
                let cancel = AtomicBool::new(false);
                matches!(
                    acquire(&path, &cancel, || {}, || false).expect("second"),
                    Acquired::AfterWaiting(_)
                )
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        drop(first);
        assert!(
            handle.join().expect("join"),
            "second acquirer must have waited"
        );
    }

    #[test]
    fn a_shared_holder_makes_try_exclusive_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.lock");
        let reader = try_shared(&path).expect("shared").expect("free");
        let second_reader = try_shared(&path).expect("shared").expect("shared by both");
        assert!(try_exclusive(&path).expect("try").is_none());
        drop(reader);
        drop(second_reader);
        let writer = try_exclusive(&path).expect("try").expect("free again");
        assert!(try_shared(&path).expect("shared").is_none());
        drop(writer);
    }

    #[test]
    fn a_waiter_takes_a_shared_lock_once_the_result_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.lock");
        let reader = try_shared(&path).expect("shared").expect("free");
        let cancel = AtomicBool::new(false);
        let mut polls = 0;
        let acquired = acquire(
            &path,
            &cancel,
            || {},
            || {
                polls += 1;
                polls >= 3
            },
        )
        .expect("lock");
        assert!(matches!(acquired, Acquired::Shared(_)));
        assert_eq!(polls, 3);
        drop(reader);
    }

    #[test]
    fn stale_lock_file_with_dead_pid_does_not_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.lock");
        std::fs::write(&path, "999999\n").expect("write");
        let cancel = AtomicBool::new(false);
        assert!(matches!(
            acquire(&path, &cancel, || {}, || false).expect("lock"),
            Acquired::Immediately(_)
        ));
    }
}
