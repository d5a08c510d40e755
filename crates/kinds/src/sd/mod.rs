//! The Stable Diffusion stage kinds as the front binary knows them: each kind's schema,
//! version, device class and summary (plain data), so `validate`, `plan`, `explain` and cached
//! runs need no libtorch. Running one takes the torch worker (`dreampipe-torch`), which pairs
//! each kind with its implementation through [`dreampipe_core::stages::Registry::implement`]. Also the field
//! specs the kinds share.
pub mod dreambooth;
pub mod dreambooth_lora;
pub mod embed;
pub mod evaluate;
pub mod finetune;
pub mod generate;
pub mod sample_grid;
pub mod textual_inversion;
pub mod training;
pub mod vae;
pub mod world_score;

pub use dreampipe_core::stages::field_error;

/// The [`Stage`](dreampipe_core::stages::Stage) methods every Stable Diffusion kind writes
/// alike, for its `impl Stage` block: its schema is the table derived from its parameter
/// struct `$params`, it takes a device slot (`DeviceClass::Gpu`), needs libtorch, and runs in
/// the torch worker only (here its `run` says so; the worker attaches the real one with
/// `Registry::implement`).
macro_rules! torch_kind_methods {
    ($params:ty) => {
        fn schema(&self) -> Vec<dreampipe_core::stages::ParamSpec> {
            <$params as dreampipe_core::stages::params::ParamTable>::param_specs()
        }
        fn device_class(&self) -> dreampipe_core::stages::DeviceClass {
            dreampipe_core::stages::DeviceClass::Gpu
        }
        fn run(
            &self,
            _ctx: &dreampipe_core::stages::StageContext<'_>,
        ) -> Result<(), dreampipe_core::stages::StageError> {
            Err(dreampipe_core::stages::needs_torch_worker(self.kind()))
        }
        fn needs_torch(&self) -> bool {
            true
        }
    };
}
pub(crate) use torch_kind_methods;

/// [`torch_kind_methods!`] plus what every training kind shares: `max_train_steps` sets the
/// optimizer steps, and a run is the prefix of a longer one unless
/// [`training::TrainingParams::prefix_problem`] of its fields (parsed as `$params`, whose
/// flattened `training` field holds them) says otherwise.
macro_rules! training_kind_methods {
    ($params:ty) => {
        $crate::sd::torch_kind_methods!($params);
        fn steps_field(&self) -> Option<&'static str> {
            Some($crate::sd::training::STEPS_FIELD)
        }
        fn prefix_problem(
            &self,
            params: &serde_json::Map<String, serde_json::Value>,
        ) -> Option<String> {
            $crate::sd::training::prefix_problem(params, |p: &$params| &p.training)
        }
    };
}
pub(crate) use training_kind_methods;

/// diffusers' `StableDiffusionPipeline.__call__` defaults (`num_inference_steps`,
/// `guidance_scale`); `sd::pipeline` uses the same values.
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// Largest seed: JSON integers are exact up to 2^53 − 1.
pub const MAX_SEED: f64 = 9_007_199_254_740_991.0;

dreampipe_core::closed_set! {
    /// A precision of weights or of written files: `dtype`, `save_dtype` (those of
    /// `dreampipe sample --dtype`).
    pub enum Dtype { F32 = "f32", F16 = "f16", Bf16 = "bf16" }
}

dreampipe_core::closed_set! {
    /// A sampler: every `SchedulerKind::name()` of the torch side (a test keeps them in sync).
    pub enum SchedulerName {
        Ddim = "ddim",
        Pndm = "pndm",
        Lms = "lms",
        Euler = "euler",
        EulerAncestral = "euler-a",
        DpmSolver = "dpm++",
        Ddpm = "ddpm",
    }
}

/// The accepted `dtype` values.
pub const DTYPE_CHOICES: &[&str] = Dtype::NAMES;
/// The accepted scheduler names.
pub const SCHEDULER_CHOICES: &[&str] = SchedulerName::NAMES;
pub use crate::png::{KEY_FIELD, PIPELINE_FIELD, STAGE_FIELD};

/// Largest denoising steps (diffusers schedulers use ≤ 1000 training timesteps).
pub const MAX_INFERENCE_STEPS: f64 = 1000.0;
/// Largest guidance scale accepted (A1111's slider ends at 30; 100 leaves room).
pub const MAX_GUIDANCE: f64 = 100.0;
/// Image side limits (`width`, `height`): the VAE downsamples by 8; 4096 as for `images`.
pub const MIN_SIZE: f64 = 8.0;
pub const MAX_SIZE: f64 = 4096.0;

#[cfg(test)]
mod tests {
    use dreampipe_core::stages::DeviceClass;

    /// What [`torch_kind_methods!`] and [`training_kind_methods!`] give each kind.
    #[test]
    fn every_sd_kind_is_a_gpu_torch_kind_and_the_training_kinds_share_runs_by_steps() {
        let registry = crate::registry();
        let training = [
            "dreambooth",
            "dreambooth_lora",
            "finetune",
            "textual_inversion",
        ];
        let others = ["generate", "evaluate", "embed", "sample_grid"];
        for name in training.iter().chain(&others) {
            let kind = registry.get(name).expect("registered");
            assert!(kind.needs_torch(), "{name}");
            assert_eq!(kind.device_class(), DeviceClass::Gpu, "{name}");
            let expected = training.contains(name).then_some("max_train_steps");
            assert_eq!(kind.steps_field(), expected, "{name}");
        }
        for name in ["command", "images", "toy_world"] {
            assert!(!registry.get(name).expect("registered").needs_torch());
        }
        let mut params = serde_json::Map::new();
        for spec in registry.get("finetune").expect("finetune").schema() {
            let value = spec.default.clone().unwrap_or(serde_json::json!("x"));
            params.insert(spec.name.to_string(), value);
        }
        let finetune = registry.get("finetune").expect("finetune");
        assert_eq!(
            finetune.prefix_problem(&params).as_deref(),
            Some("`max_train_steps` is unset (the run counts epochs)")
        );
        params.insert("max_train_steps".into(), serde_json::json!(10));
        params.insert("lr_scheduler".into(), serde_json::json!("constant"));
        assert_eq!(finetune.prefix_problem(&params), None);
    }
}
