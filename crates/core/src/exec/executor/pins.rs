//! Keeping results alive while the run uses them: shared locks (pins) on every result the run
//! reuses or commits, reusing a cached result under a pin, and taking a key's exclusive lock
//! to compute it.
use super::records::adopt;
use super::{Done, Shared, StageRecord, blocking};
use crate::cache::CacheError;
use crate::cache::lock::{Acquired, KeyLock};
use crate::cache::store::ResultRecord;
use crate::cache::verify;
use crate::exec::error::ExecError;
use crate::exec::events::Event;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Shared {
    /// Keeps `pin` on `key`'s result until the run ends (a second pin on a key is dropped).
    pub(super) fn keep_pin(&self, key: &str, pin: KeyLock) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        pins.entry(key.to_string()).or_insert(pin);
    }

    pub(super) fn is_pinned(&self, key: &str) -> bool {
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        pins.contains_key(key)
    }
}

/// Takes `key`'s lock to compute it, saying so when another holder makes the stage wait.
pub(super) async fn lock_key(
    shared: &Arc<Shared>,
    id: &str,
    key: &str,
    forced: bool,
) -> Result<Acquired, ExecError> {
    let waiting = {
        let (events, id, key) = (shared.events.clone(), id.to_string(), key.to_string());
        move || {
            let _ = events.send(Event::Waiting { id, key });
        }
    };
    // While waiting: reuse the result once another holder committed it (unless forced), or
    // when this run pinned it for another stage with the same key (replacing it would pull it
    // from under that stage's readers, and waiting for our own pin would never end).
    let reusable = {
        let (shared, key) = (shared.clone(), key.to_string());
        move || (!forced && shared.store.lookup(&key).is_some()) || shared.is_pinned(&key)
    };
    let (store, cancel, key) = (shared.store.clone(), shared.cancel.clone(), key.to_string());
    let acquired = blocking(move || store.lock_key(&key, cancel.as_atomic(), waiting, reusable));
    Ok(acquired.await??)
}

/// The cached result for `key`, pinned for this run and recorded as this stage's latest;
/// `None` when there is none, or when another process holds its lock exclusively (it is
/// being removed or replaced: the caller then waits for the key's lock).
pub(super) async fn reuse(
    shared: &Arc<Shared>,
    index: usize,
    key: &str,
    record: &mut StageRecord,
    served: Option<String>,
) -> Result<Option<Done>, ExecError> {
    let Some((lock, found)) = pin(shared, key, PIN_PATIENCE).await? else {
        return Ok(None);
    };
    let (store, memo, checked) = (shared.store.clone(), shared.memo.clone(), found.clone());
    let memo = (!shared.verify).then_some(memo);
    let check = move || verify::damage(&store, memo.as_deref(), &checked);
    if let Some(damage) = blocking(check).await? {
        let id = &shared.plan.pipeline.stages[index].id;
        let _ = shared.events.send(Event::Warning {
            id: id.clone(),
            message: format!("{}; quarantined, recomputing it", damage.problem),
        });
        verify::quarantine_damaged(&shared.store, key, &damage)?;
        drop(lock);
        return Ok(None);
    }
    Ok(Some(adopt(shared, index, key, lock, found, record, served)))
}

/// How long [`pin`] retries a busy key lock while the result still exists: other runs and
/// `cache gc` hold it only for a moment (a lookup, or removing the folder); a forced recompute
/// holds it longer, and then the caller waits for the lock with a message instead.
pub(super) const PIN_PATIENCE: Duration = Duration::from_secs(2);
pub(super) const PIN_RETRY: Duration = Duration::from_millis(20);

/// A shared lock on `key`'s result, for the caller to keep until the run ends. `None` when
/// there is no result, or when the key stayed locked exclusively by another process for
/// `patience`.
pub(super) async fn pin(
    shared: &Arc<Shared>,
    key: &str,
    patience: Duration,
) -> Result<Option<(KeyLock, ResultRecord)>, ExecError> {
    let (store, owned_key) = (shared.store.clone(), key.to_string());
    let cancel = shared.cancel.clone();
    blocking(
        move || -> Result<Option<(KeyLock, ResultRecord)>, CacheError> {
            let started = Instant::now();
            loop {
                if store.lookup(&owned_key).is_none() {
                    return Ok(None);
                }
                if let Some(lock) = store.try_lock_key_shared(&owned_key)? {
                    return Ok(store.lookup(&owned_key).map(|found| (lock, found)));
                }
                if started.elapsed() >= patience || cancel.is_cancelled() {
                    return Ok(None);
                }
                std::thread::sleep(PIN_RETRY);
            }
        },
    )
    .await?
    .map_err(ExecError::from)
}
