//! The optimizer step both methods run, written once: gradient accumulation over micro-batches
//! (`backward(loss / n)`, fp16: scaled, a non-finite loss zeroes the grads and stops before any
//! update), then unscale, optional global grad-norm clipping, the optimizer step with the lr
//! schedule's rate (skipped when fp16 scaling found an inf/NaN gradient), the scaler update,
//! zeroed grads and the step counter — in the order accelerate runs them in diffusers' scripts.
//!
//! A method supplies what differs through [`StepMethod`]: the loss of a micro-batch (with the
//! rest of its backward when it runs part of it itself, as gradient checkpointing does) and what
//! happens after each update (textual inversion restores the embedding rows that must not
//! learn). Which parameters train is given to [`TrainerCore::new`].
use super::TrainError;
use super::lr_schedule::LrSchedule;
use super::optim::{AdamWConfig, clip_grad_norm};
use super::optimizer::Optimizer;
use super::precision::Precision;
use super::progress::StepReport;
use dreampipe_kinds::sd::training::TrainingParams;
use tch::{Device, Tensor};

/// What differs between methods inside one optimizer step.
///
/// [`StepBatch`]: super::batch::StepBatch
pub(crate) trait StepMethod {
    /// What one micro-batch holds (the diffusion methods': [`StepBatch`]).
    type Batch;

    /// The loss of one micro-batch, its graph attached to what trains; `precision` gives the
    /// autocast region of the trained modules.
    fn micro_batch_loss<'a>(
        &'a self,
        batch: &Self::Batch,
        precision: &'a Precision,
    ) -> Result<MicroBatchLoss<'a>, TrainError>;

    /// Runs after every update (taken or skipped), once the grads are zeroed.
    fn after_update(&self) {}
}

/// A continuation of the backward pass a method runs itself.
pub(crate) type FinishBackward<'a> = Box<dyn FnOnce() -> Result<(), TrainError> + 'a>;

/// The loss of one micro-batch, and what completes its backward after the core's
/// `backward(loss / n)` (None when that backward reaches every trained parameter).
pub(crate) struct MicroBatchLoss<'a> {
    pub loss: Tensor,
    pub finish_backward: Option<FinishBackward<'a>>,
}

impl From<Tensor> for MicroBatchLoss<'_> {
    fn from(loss: Tensor) -> Self {
        Self {
            loss,
            finish_backward: None,
        }
    }
}

/// How the core's optimizer, lr schedule and mixed precision are set up.
pub(crate) struct CoreSettings<'a> {
    /// The optimizer, its hyperparameters (the base lr after `--scale_lr`), the lr schedule
    /// and mixed precision, as every training kind has them.
    pub training: &'a TrainingParams,
    pub total_steps: u64,
    pub device: Device,
    /// Clip the global grad norm to this (None: no clipping, as textual_inversion.py).
    pub max_grad_norm: Option<f64>,
}

/// The trained parameters, optimizer, lr schedule, mixed precision and step count of a run.
pub(crate) struct TrainerCore {
    trainables: Vec<(String, Tensor)>,
    optimizer: Optimizer,
    schedule: LrSchedule,
    precision: Precision,
    step: u64,
    max_grad_norm: Option<f64>,
}

impl TrainerCore {
    /// A core training `trainables` (by checkpoint name, in optimizer order) from step 0.
    pub fn new(
        trainables: Vec<(String, Tensor)>,
        settings: &CoreSettings,
    ) -> Result<Self, TrainError> {
        let training = settings.training;
        let params: Vec<Tensor> = trainables.iter().map(|(_, t)| t.shallow_clone()).collect();
        let adam = AdamWConfig {
            lr: training.effective_learning_rate(),
            beta1: training.adam_beta1,
            beta2: training.adam_beta2,
            eps: training.adam_epsilon,
            weight_decay: training.adam_weight_decay,
        };
        let optimizer = Optimizer::new(training.optimizer, &params, adam);
        let schedule = LrSchedule::new(
            training.lr_scheduler,
            adam.lr,
            training.lr_warmup_steps,
            settings.total_steps,
            training.lr_num_cycles,
            training.lr_power,
        )?;
        Ok(Self {
            trainables,
            optimizer,
            schedule,
            precision: Precision::new(training.mixed_precision, settings.device)?,
            step: 0,
            max_grad_norm: settings.max_grad_norm,
        })
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Sets the steps done (resume).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// The trained tensors by checkpoint name.
    pub fn trainables(&self) -> &[(String, Tensor)] {
        &self.trainables
    }

    /// Shallow handles to the trained tensors, by name: what a checkpoint saves and restores.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        self.trainables
            .iter()
            .map(|(name, t)| (name.clone(), t.shallow_clone()))
            .collect()
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    pub fn precision(&self) -> &Precision {
        &self.precision
    }

    pub fn precision_mut(&mut self) -> &mut Precision {
        &mut self.precision
    }

    /// The learning rate of the next step (accelerate does not advance the schedule on a step
    /// fp16 scaling skipped).
    pub fn next_lr(&self) -> f64 {
        self.schedule
            .lr_at(self.precision.schedule_position(self.step))
    }

    /// One optimizer step over `micro_batches` (one per gradient-accumulation step):
    /// [`accumulate_gradients`](Self::accumulate_gradients), then
    /// [`apply_gradients`](Self::apply_gradients) with this step's learning rate.
    pub fn train_step<M: StepMethod + ?Sized>(
        &mut self,
        method: &M,
        micro_batches: &[M::Batch],
    ) -> Result<StepReport, TrainError> {
        let lr = self.next_lr();
        let loss = self.accumulate_gradients(method, micro_batches)?;
        let grad_norm = self.apply_gradients(method, lr)?;
        Ok(StepReport {
            loss,
            grad_norm,
            lr,
            skipped_steps: self.precision.skipped_steps(),
        })
    }

    /// Loss of each micro-batch and `backward(loss / n)`; returns the mean loss. A failed
    /// micro-batch (a NaN/inf loss included) zeroes the grads and fails before any update.
    pub fn accumulate_gradients<M: StepMethod + ?Sized>(
        &mut self,
        method: &M,
        micro_batches: &[M::Batch],
    ) -> Result<f64, TrainError> {
        let count = micro_batches.len().max(1) as f64;
        let mut total = 0.0;
        for batch in micro_batches {
            match self.backward(method, batch, count) {
                Ok(value) => total += value,
                Err(error) => {
                    self.optimizer.zero_grad();
                    return Err(error);
                }
            }
        }
        Ok(total / count)
    }

    /// `backward(loss / count)` of one micro-batch (then the method's own part of it); returns
    /// its loss.
    fn backward<M: StepMethod + ?Sized>(
        &self,
        method: &M,
        batch: &M::Batch,
        count: f64,
    ) -> Result<f64, TrainError> {
        let MicroBatchLoss {
            loss,
            finish_backward,
        } = method.micro_batch_loss(batch, &self.precision)?;
        let value = loss.double_value(&[]);
        check_finite(value, self.step + 1)?;
        self.precision.backward(&loss, count);
        if let Some(finish) = finish_backward {
            finish()?;
        }
        Ok(value)
    }

    /// Unscales fp16 gradients, clips the global grad norm over the trained parameters (when
    /// the method clips), takes the optimizer step with `lr` (skipped when fp16 scaling found
    /// an inf/NaN gradient), updates the scale, zeroes the grads, runs the method's
    /// [`after_update`](StepMethod::after_update) and counts the step. Returns the norm before
    /// clipping (None without clipping).
    pub fn apply_gradients<M: StepMethod + ?Sized>(
        &mut self,
        method: &M,
        lr: f64,
    ) -> Result<Option<f64>, TrainError> {
        let params: Vec<Tensor> = self
            .trainables
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let found_inf = self.precision.unscale(&params);
        let grad_norm = self.max_grad_norm.map(|max| clip_grad_norm(&params, max));
        if !found_inf {
            self.optimizer.set_lr(lr);
            self.optimizer.step()?;
        }
        self.precision.update(found_inf);
        self.optimizer.zero_grad();
        method.after_update();
        self.step += 1;
        Ok(grad_norm)
    }
}

/// Fails with [`TrainError::NonFiniteLoss`] (checkpoint filled in by the loop) when `loss` is
/// NaN or infinite.
fn check_finite(loss: f64, step: u64) -> Result<(), TrainError> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(TrainError::NonFiniteLoss {
            step,
            loss,
            checkpoint: None,
        })
    }
}
