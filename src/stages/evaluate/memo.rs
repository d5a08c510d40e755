//! The real images' embeddings, computed once per (embedding models, images) and reused by every
//! `evaluate` stage and rerun that scores against the same subject: an entry of the cache's
//! shared area (`<cache>/shared/evaluate/<key>.safetensors`, as `generate` keeps its images),
//! keyed by the content digests of both model folders and the bytes of each real image,
//! written atomically, its mtime refreshed on reuse so `cache gc` keeps it while in use.
use super::super::{StageContext, StageError};
use super::embedders::{Embedders, Embeddings, rows};
use dreampipe_core::field;
use dreampipe_kinds::sd::evaluate::EvaluateParams;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Bumped when what an entry holds changes (its embeddings or their layout).
const MEMO_VERSION: u32 = 1;

/// The memo key, or `None` when a model folder's digest is unknown (then nothing is reused).
fn memo_key(ctx: &StageContext<'_>, real: &[PathBuf]) -> Result<Option<String>, StageError> {
    let digest = |field: &str| {
        ctx.inputs
            .get(field)
            .and_then(|i| i.first())
            .and_then(|i| i.digest.clone())
    };
    let (Some(clip), Some(dino)) = (
        digest(field!(EvaluateParams, clip_model)),
        digest(field!(EvaluateParams, dino_model)),
    ) else {
        return Ok(None);
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update(format!("evaluate real embeddings v{MEMO_VERSION}\0{clip}\0{dino}\0").as_bytes());
    for path in real {
        let bytes = std::fs::read(path).map_err(|e| StageError::io("read", path, e))?;
        hasher.update(blake3::hash(&bytes).as_bytes());
    }
    Ok(Some(hasher.finalize().to_hex().to_string()))
}

/// The real images' embeddings: from the memo when present, else computed and stored.
pub fn real_embeddings(
    ctx: &StageContext<'_>,
    embedders: &Embedders,
    real: &[PathBuf],
) -> Result<Embeddings, StageError> {
    let Some(key) = memo_key(ctx, real)? else {
        return embedders.embed(ctx, field!(EvaluateParams, real), real);
    };
    let file = ctx
        .shared_dir("evaluate")?
        .join(format!("{key}.safetensors"));
    if let Some(found) = read_entry(&file, real.len()) {
        ctx.log
            .line(&format!("real embeddings: reused {}", file.display()));
        return Ok(found);
    }
    let computed = embedders.embed(ctx, field!(EvaluateParams, real), real)?;
    write_entry(&file, &computed)?;
    ctx.log.line(&format!(
        "real embeddings: computed, stored {}",
        file.display()
    ));
    Ok(computed)
}

/// A readable entry with `count` rows, its mtime refreshed; `None` for anything else (a
/// damaged entry is recomputed).
pub(super) fn read_entry(file: &Path, count: usize) -> Option<Embeddings> {
    let tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(file).ok()?.into_iter().collect();
    let (clip, dino) = (rows(tensors.get("clip")?), rows(tensors.get("dino")?));
    if clip.len() != count || dino.len() != count {
        return None;
    }
    let _ = std::fs::File::options()
        .append(true)
        .open(file)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    Some(Embeddings { clip, dino })
}

fn stacked(rows: &[Vec<f32>]) -> Tensor {
    let flat: Vec<f32> = rows.concat();
    Tensor::from_slice(&flat).view([rows.len() as i64, -1])
}

pub(super) fn write_entry(file: &Path, embeddings: &Embeddings) -> Result<(), StageError> {
    // Unique per process and write: two stages of one run may store the same entry at once.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = file.with_extension(format!("partial-{}-{write}", std::process::id()));
    let tensors = [
        ("clip".to_string(), stacked(&embeddings.clip)),
        ("dino".to_string(), stacked(&embeddings.dino)),
    ];
    crate::sd::weights::write_safetensors(&tensors, &partial).map_err(StageError::Message)?;
    std::fs::rename(&partial, file).map_err(|e| StageError::io("rename", &partial, e))
}
