//! Resume checkpoints in a training work directory: `checkpoint-<step>/` holds the trainable
//! weights (`weights.safetensors`), the optimizer state (`optimizer/`) and `state.json` (step,
//! seed, dataset sizes, learning rate). A checkpoint is written into a temporary directory and
//! renamed into place, so a crash never leaves a half-written `checkpoint-<step>`. The lr
//! schedule and every random draw are functions of `(seed, step)`, so the step is their whole
//! position.
use super::TrainError;
use super::grad_scaler::GradScalerState;
use super::io_error;
use super::optimizer::Optimizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Prefix of checkpoint directories (diffusers' `checkpoint-<global_step>`).
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
const WEIGHTS_FILE: &str = "weights.safetensors";
const OPTIMIZER_DIR: &str = "optimizer";
const STATE_FILE: &str = "state.json";
const TMP_SUFFIX: &str = ".tmp";

/// Where a run stands; must match the resuming run's data and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeState {
    /// "dreambooth" or "textual_inversion".
    pub method: String,
    /// Optimizer steps done.
    pub step: u64,
    pub seed: u64,
    /// Sizes of the image sets whose order the seed determines.
    pub dataset_sizes: Vec<usize>,
    /// Learning rate of the last step (informational; None when cancelled before a step).
    pub lr: Option<f64>,
    /// fp16 loss scaling: the scaler's state, so a resumed run scales and skips as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<GradScalerState>,
}

/// A checkpoint found on disk.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: ResumeState,
}

impl Checkpoint {
    /// The saved trainable tensors, by name.
    pub fn weights(&self) -> Result<Vec<(String, Tensor)>, TrainError> {
        let file = self.dir.join(WEIGHTS_FILE);
        Tensor::read_safetensors(&file).map_err(|e| io_error(&file, "read", e))
    }

    /// Restores the optimizer state saved with this checkpoint.
    pub fn load_optimizer(&self, optimizer: &mut Optimizer) -> Result<(), TrainError> {
        optimizer.load(&self.dir.join(OPTIMIZER_DIR))
    }

    /// Checks that the resuming run is the same run (method, seed, data).
    pub fn check_matches(
        &self,
        method: &str,
        seed: u64,
        sizes: &[usize],
    ) -> Result<(), TrainError> {
        let state = &self.state;
        if state.method != method || state.seed != seed || state.dataset_sizes != sizes {
            return Err(TrainError::Data {
                path: self.dir.clone(),
                problem: format!(
                    "this checkpoint belongs to a different run ({} seed {} images {:?}; now {} seed {} images {:?}); use a fresh work_dir or restore the original settings",
                    state.method, state.seed, state.dataset_sizes, method, seed, sizes
                ),
            });
        }
        Ok(())
    }
}

/// The directory of the checkpoint after `step` optimizer steps.
pub fn checkpoint_dir(work_dir: &Path, step: u64) -> PathBuf {
    work_dir.join(format!("{CHECKPOINT_PREFIX}{step}"))
}

/// Checkpoint directories in `work_dir`, oldest first, as (step, dir).
fn list_checkpoints(work_dir: &Path) -> Result<Vec<(u64, PathBuf)>, TrainError> {
    let entries = match std::fs::read_dir(work_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(work_dir, "list", error)),
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let step = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            path.join(STATE_FILE).is_file().then_some((step, path))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint of `work_dir`, if any.
pub fn latest(work_dir: &Path) -> Result<Option<Checkpoint>, TrainError> {
    let Some((_, dir)) = list_checkpoints(work_dir)?.pop() else {
        return Ok(None);
    };
    let file = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| io_error(&file, "read", e))?;
    let state = serde_json::from_str(&text).map_err(|e| TrainError::Data {
        path: file.clone(),
        problem: format!("not a training state file: {e}; delete this checkpoint directory"),
    })?;
    Ok(Some(Checkpoint { dir, state }))
}

/// Writes `checkpoint-<state.step>` atomically and keeps at most `total_limit` checkpoints.
pub fn write(
    work_dir: &Path,
    state: &ResumeState,
    weights: &[(String, Tensor)],
    optimizer: &Optimizer,
    total_limit: Option<usize>,
) -> Result<PathBuf, TrainError> {
    let final_dir = checkpoint_dir(work_dir, state.step);
    let tmp = work_dir.join(format!("{CHECKPOINT_PREFIX}{}{TMP_SUFFIX}", state.step));
    remove_dir_if_present(&tmp)?;
    std::fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, "create the directory", e))?;
    let cpu: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(name, t)| (name.clone(), t.detach().to_device(tch::Device::Cpu)))
        .collect();
    let weights_file = tmp.join(WEIGHTS_FILE);
    crate::sd::weights::write_safetensors(&cpu, &weights_file).map_err(TrainError::Write)?;
    optimizer.save(&tmp.join(OPTIMIZER_DIR))?;
    let state_file = tmp.join(STATE_FILE);
    let json =
        serde_json::to_string_pretty(state).map_err(|e| io_error(&state_file, "encode", e))?;
    std::fs::write(&state_file, json).map_err(|e| io_error(&state_file, "write", e))?;
    remove_dir_if_present(&final_dir)?;
    std::fs::rename(&tmp, &final_dir)
        .map_err(|e| io_error(&final_dir, "move the new checkpoint to", e))?;
    if let Some(limit) = total_limit {
        prune(work_dir, limit.max(1))?;
    }
    Ok(final_dir)
}

fn prune(work_dir: &Path, limit: usize) -> Result<(), TrainError> {
    let found = list_checkpoints(work_dir)?;
    let excess = found.len().saturating_sub(limit);
    for (_, dir) in found.into_iter().take(excess) {
        remove_dir_if_present(&dir)?;
    }
    Ok(())
}

fn remove_dir_if_present(dir: &Path) -> Result<(), TrainError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(io_error(dir, "remove", error)),
    }
}

/// Copies saved tensors into the named variables (names and shapes must match exactly).
pub fn restore_into(
    source: &Path,
    saved: &[(String, Tensor)],
    variables: &[(String, Tensor)],
) -> Result<(), TrainError> {
    if saved.len() != variables.len() {
        return Err(TrainError::Data {
            path: source.to_path_buf(),
            problem: format!(
                "holds {} trainable tensors but this run trains {}; resume with the same options",
                saved.len(),
                variables.len()
            ),
        });
    }
    let _guard = tch::no_grad_guard();
    for (name, variable) in variables {
        let Some((_, tensor)) = saved.iter().find(|(saved_name, _)| saved_name == name) else {
            return Err(TrainError::Data {
                path: source.to_path_buf(),
                problem: format!("has no tensor '{name}'; resume with the same options"),
            });
        };
        if tensor.size() != variable.size() {
            return Err(TrainError::Data {
                path: source.to_path_buf(),
                problem: format!(
                    "tensor '{name}' has shape {:?}, expected {:?}",
                    tensor.size(),
                    variable.size()
                ),
            });
        }
        let mut target = variable.shallow_clone();
        target.copy_(&tensor.to_kind(variable.kind()).to_device(variable.device()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sd::train::config::OptimizerKind;
    use crate::sd::train::optim::AdamWConfig;

    fn state(step: u64) -> ResumeState {
        ResumeState {
            method: "dreambooth".to_string(),
            step,
            seed: 7,
            dataset_sizes: vec![3, 2],
            lr: Some(1e-4),
            grad_scaler: None,
        }
    }

    #[test]
    fn checkpoints_are_pruned_and_the_newest_complete_one_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let weight = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let optimizer = Optimizer::new(
            OptimizerKind::AdamW,
            &[weight.shallow_clone()],
            AdamWConfig::default(),
        );
        let named = vec![("w".to_string(), weight.shallow_clone())];
        for step in [1, 2, 3] {
            write(dir.path(), &state(step), &named, &optimizer, Some(2)).unwrap();
        }
        // A crash mid-write leaves only a .tmp directory, which is ignored.
        std::fs::create_dir_all(dir.path().join("checkpoint-4.tmp")).unwrap();
        assert!(!checkpoint_dir(dir.path(), 1).exists());
        assert!(checkpoint_dir(dir.path(), 2).exists());
        let found = latest(dir.path()).unwrap().unwrap();
        assert_eq!(found.state, state(3));
        assert_eq!(found.dir, checkpoint_dir(dir.path(), 3));
        found.check_matches("dreambooth", 7, &[3, 2]).unwrap();
        let error = found.check_matches("dreambooth", 8, &[3, 2]).unwrap_err();
        assert!(
            error.to_string().contains("belongs to a different run"),
            "{error}"
        );
        let saved = found.weights().unwrap();
        let target = vec![(
            "w".to_string(),
            Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu)),
        )];
        restore_into(&found.dir, &saved, &target).unwrap();
        assert!(target[0].1.equal(&weight.detach()));
    }

    /// fp16 runs keep the loss scaler in `state.json`, so a resumed run scales, skips and
    /// schedules as the uninterrupted one; older checkpoints without it still load.
    #[test]
    fn the_loss_scaler_state_survives_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let weight = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let optimizer = Optimizer::new(
            OptimizerKind::AdamW,
            &[weight.shallow_clone()],
            AdamWConfig::default(),
        );
        let scaler = GradScalerState {
            scale: 16384.0,
            growth_tracker: 17,
            skipped_steps: 2,
        };
        let with_scaler = ResumeState {
            grad_scaler: Some(scaler),
            ..state(5)
        };
        let named = vec![("w".to_string(), weight)];
        write(dir.path(), &with_scaler, &named, &optimizer, None).unwrap();
        let found = latest(dir.path()).unwrap().unwrap();
        assert_eq!(found.state.grad_scaler, Some(scaler));
        let old = r#"{"method":"dreambooth","step":1,"seed":7,"dataset_sizes":[1],"lr":null}"#;
        let parsed: ResumeState = serde_json::from_str(old).unwrap();
        assert_eq!(parsed.grad_scaler, None);
    }
}
