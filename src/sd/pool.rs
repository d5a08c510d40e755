//! The model pool: each model folder is loaded once per process (per device and dtype) and
//! shared by every stage and verb that uses it.
use crate::sd::pipeline::{StableDiffusion, Txt2ImgError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use tch::{Device, Kind};

/// (canonical folder, device, dtype).
type PoolKey = (PathBuf, Device, Kind);

/// A pooled model. libtorch tensors are `Send` but not `Sync`, so users take the lock while
/// they run it (stages on one device are serialized by the executor's device slot anyway).
pub type SharedModel = Arc<Mutex<StableDiffusion>>;

fn pool() -> &'static Mutex<HashMap<PoolKey, SharedModel>> {
    static POOL: OnceLock<Mutex<HashMap<PoolKey, SharedModel>>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Returns the loaded model for `dir` on `device` in `kind`, loading it on first use.
/// Folders produced by the cache are immutable, so the canonical path identifies the weights.
/// Loads are serialized (the pool stays locked while one runs), so a folder is never loaded twice.
pub fn get(dir: &Path, device: Device, kind: Kind) -> Result<SharedModel, Txt2ImgError> {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let key = (canonical.clone(), device, kind);
    let mut models = pool()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(model) = models.get(&key) {
        return Ok(Arc::clone(model));
    }
    let model = Arc::new(Mutex::new(StableDiffusion::load(&canonical, device, kind)?));
    models.insert(key, Arc::clone(&model));
    Ok(model)
}

/// Drops every pooled model (frees memory between unrelated stages).
pub fn clear() {
    pool()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clear();
}
