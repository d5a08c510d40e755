//! `--locked`: every stage's key and computed output must match the lock file.
use crate::exec::error::ExecError;
use crate::exec::lockfile::LockFile;

/// With `--locked`: the stage must be in the lock file under the same key.
pub(super) fn check_locked_key(
    locked: Option<&LockFile>,
    id: &str,
    key: &str,
) -> Result<(), ExecError> {
    let Some(lock) = locked else {
        return Ok(());
    };
    match lock.stages.get(id) {
        None => Err(ExecError::NotLocked { id: id.to_string() }),
        Some(entry) if entry.key != key => Err(ExecError::LockedKeyMismatch {
            id: id.to_string(),
            key: key.to_string(),
            locked: entry.key.clone(),
        }),
        Some(_) => Ok(()),
    }
}

/// With `--locked`: a computed output must have the digest the lock file recorded.
pub(super) fn check_locked_output(
    locked: Option<&LockFile>,
    id: &str,
    digest: &str,
) -> Result<(), ExecError> {
    let Some(entry) = locked.and_then(|l| l.stages.get(id)) else {
        return Ok(());
    };
    if entry.output == digest {
        return Ok(());
    }
    Err(ExecError::LockedOutputMismatch {
        id: id.to_string(),
        output: digest.to_string(),
        locked: entry.output.clone(),
    })
}
