//! Textual inversion as diffusers' examples/textual_inversion/textual_inversion.py: new
//! placeholder tokens (`<tok>`, `<tok>_1`, ...) initialised from a one-token initializer word;
//! the whole token-embedding matrix goes to AdamW and every other row is restored after each
//! step, so only the placeholder rows learn. Prompts come from the imagenet templates of the
//! script. [`TextualInversionTrainer::train_step`] runs one step on explicit latents / noise /
//! timesteps (the golden tests); [`train`] is the whole run.
//!
//! SDXL as textual_inversion_sdxl.py: the placeholders join both tokenizers and both embedding
//! matrices learn; the UNet takes both encoders' penultimate states, the second's pooled
//! embedding and each image's time ids (its original size, crop (0, 0), the resolution).
//!
//! Outputs in `output_dir`: `learned_embeds.safetensors` (diffusers; SDXL adds
//! `learned_embeds_2.safetensors`), `<token>.safetensors` (A1111 / ComfyUI: key `emb_params`;
//! SDXL `clip_l` + `clip_g`), `metrics.jsonl`, and `model/`, a complete diffusers folder with the
//! extended tokenizers and text encoders (usable as a DreamBooth base).
//!
//! Deviations as in DreamBooth: random draws derived from `(seed, step)`, seed default 0,
//! mixed precision on CPU only as bf16, gradient checkpointing rejected. The default
//! learning rate is 5e-4 (the README's recipe; the script's argparse default is 1e-4).
use super::TrainError;
use super::base_model::{BaseModel, ModuleKinds};
use super::batch::{self, StepBatch, XlBatch};
use super::config::{self, MixedPrecisionExt};
use super::data::{self, Transform};
use super::driver::{self, DriverSettings, TrainingMethod};
use super::objective::{self, DiffusionModel, LossSpec};
use super::output::{self, NewWeights};
use super::precision::Precision;
use super::progress::{Callbacks, StepReport, TrainOutcome};
use super::streams::{self, SampleRng};
use super::trainer_core::{CoreSettings, MicroBatchLoss, StepMethod, TrainerCore};
use crate::sd::clip::{ClipTextModel, ClipTextOutput};
use crate::sd::folder::ModelFolder;
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::unet::AddedConditions;
use dreampipe_core::field;
use dreampipe_kinds::sd::textual_inversion::{
    InversionFields, TextualInversionKind, TextualInversionParams,
};
use dreampipe_kinds::sd::training::TrainingParams;
use image::RgbImage;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Name recorded in checkpoints.
pub const METHOD: &str = "textual_inversion";
/// Subfolder of `output_dir` holding the full diffusers model.
pub const MODEL_SUBDIR: &str = "model";
/// Checkpoint name of the embedding matrix.
const EMBEDDING_KEY: &str = "text_encoder.text_model.embeddings.token_embedding.weight";
/// Checkpoint name of SDXL's second embedding matrix.
const EMBEDDING_KEY_2: &str = "text_encoder_2.text_model.embeddings.token_embedding.weight";

/// `imagenet_templates_small` of textual_inversion.py (learnable_property = object).
pub const OBJECT_TEMPLATES: [&str; 27] = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// `imagenet_style_templates_small` of textual_inversion.py (learnable_property = style).
pub const STYLE_TEMPLATES: [&str; 19] = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
];

/// `--learnable_property` (the stage schema's closed set) and its prompt templates.
pub use dreampipe_kinds::sd::textual_inversion::LearnableProperty;

/// The prompt templates of `property` (textual_inversion.py's).
pub fn templates(property: LearnableProperty) -> &'static [&'static str] {
    match property {
        LearnableProperty::Object => &OBJECT_TEMPLATES,
        LearnableProperty::Style => &STYLE_TEMPLATES,
    }
}

/// textual_inversion.py's arguments: the `textual_inversion` stage's typed fields (names and
/// defaults as the script's) plus the resolved paths.
#[derive(Debug, Clone, PartialEq)]
pub struct TextualInversionConfig {
    /// The hyperparameters every training kind shares (the input fields in it are not read:
    /// the paths below are). `gradient_checkpointing` is not supported (rejected).
    pub training: TrainingParams,
    /// The tokens, vectors, templates and repeats.
    pub inversion: InversionFields,
    pub pretrained_model_name_or_path: PathBuf,
    pub train_data_dir: PathBuf,
    pub output_dir: PathBuf,
    pub work_dir: PathBuf,
    /// Write a checkpoint at the last step even when it is not a multiple of
    /// `checkpointing_steps` (the stage keeps it so a longer run can continue from it).
    pub keep_final_checkpoint: bool,
    pub resume_from_checkpoint: bool,
    pub device: Device,
}

impl TextualInversionConfig {
    /// A config with the `textual_inversion` stage's defaults for everything but the required
    /// fields.
    pub fn new(
        pretrained_model_name_or_path: PathBuf,
        train_data_dir: PathBuf,
        placeholder_token: &str,
        initializer_token: &str,
        output_dir: PathBuf,
        work_dir: PathBuf,
    ) -> Self {
        let given = serde_json::json!({
            (field!(TrainingParams, model)): pretrained_model_name_or_path.to_string_lossy(),
            (field!(InversionFields, instance_images)): train_data_dir.to_string_lossy(),
            (field!(InversionFields, placeholder_token)): placeholder_token,
            (field!(InversionFields, initializer_token)): initializer_token,
        });
        let schema = dreampipe_core::stages::Stage::schema(&TextualInversionKind);
        let params: TextualInversionParams = config::schema_defaults(&schema, given);
        Self {
            training: params.training,
            inversion: params.inversion,
            pretrained_model_name_or_path,
            train_data_dir,
            output_dir,
            work_dir,
            keep_final_checkpoint: false,
            resume_from_checkpoint: false,
            device: Device::Cpu,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if self.training.gradient_checkpointing {
            return Err(TrainError::Config {
                field: field!(TrainingParams, gradient_checkpointing),
                problem: "not yet supported for the UNet; train without it (lower train_batch_size or resolution to save memory)".to_string(),
            });
        }
        if self.inversion.num_vectors == 0 {
            return Err(TrainError::Config {
                field: field!(InversionFields, num_vectors),
                problem: "must be at least 1".to_string(),
            });
        }
        config::validate_training(&self.training, self.device)
    }

    /// The optimizer, lr schedule and mixed precision of the step core; no clipping, as the
    /// script.
    fn core_settings(&self, total_steps: u64) -> CoreSettings<'_> {
        CoreSettings {
            training: &self.training,
            total_steps,
            device: self.device,
            max_grad_norm: None,
        }
    }

    /// `<tok>`, `<tok>_1`, ... `<tok>_{n-1}`.
    pub fn placeholder_tokens(&self) -> Vec<String> {
        let token = &self.inversion.placeholder_token;
        std::iter::once(token.clone())
            .chain((1..self.inversion.num_vectors).map(|i| format!("{token}_{i}")))
            .collect()
    }
}

/// The models and optimizer of a textual-inversion run: the shared `TrainerCore` runs the
/// step over the embedding matrix, `TextualInversionModel` supplies the loss and restores
/// the rows that must not learn.
pub struct TextualInversionTrainer {
    model: TextualInversionModel,
    core: TrainerCore,
}

/// What textual inversion supplies to the shared step: the loss of a micro-batch (text
/// encoders in float32 under autocast, frozen UNet in the weight dtype) and, after each update,
/// every non-placeholder embedding row restored bit for bit.
struct TextualInversionModel {
    base: BaseModel,
    placeholder_tokens: Vec<String>,
    rows: PlaceholderRows,
    /// SDXL: the second text encoder's placeholder rows.
    rows_2: Option<PlaceholderRows>,
}

/// One text encoder's learned rows: the embedding matrix (trainable), where the placeholders
/// start (they are its last rows) and the matrix before training.
struct PlaceholderRows {
    embedding: Tensor,
    first_id: i64,
    original: Tensor,
}

impl PlaceholderRows {
    /// Makes `encoder`'s embedding matrix trainable and remembers it.
    fn track(encoder: &ClipTextModel, first_id: i64) -> Self {
        let embedding = encoder.token_embedding().set_requires_grad(true);
        Self {
            original: embedding.detach().copy(),
            embedding: embedding.shallow_clone(),
            first_id,
        }
    }

    /// The `count` placeholder rows, detached.
    fn learned(&self, count: usize) -> Tensor {
        self.embedding
            .narrow(0, self.first_id, count as i64)
            .detach()
            .copy()
    }

    /// Every row before the placeholders back to its value before training.
    fn restore_others(&self) {
        let _guard = tch::no_grad_guard();
        let keep = self.first_id;
        let mut rows = self.embedding.narrow(0, 0, keep);
        rows.copy_(&self.original.narrow(0, 0, keep));
    }

    /// (token, id) of every placeholder, in id order.
    fn ids(&self, tokens: &[String]) -> Vec<(String, i64)> {
        (tokens.iter().enumerate())
            .map(|(i, token)| (token.clone(), self.first_id + i as i64))
            .collect()
    }
}

impl TextualInversionTrainer {
    /// Loads the base model, adds the placeholder tokens (initialised from the initializer
    /// token's row) and sets up the optimizer over the whole embedding matrix.
    pub fn new(config: &TextualInversionConfig, total_steps: u64) -> Result<Self, TrainError> {
        config.validate()?;
        let weight_kind = config.training.mixed_precision.weight_kind(config.device)?;
        let kinds = ModuleKinds {
            weight: weight_kind,
            text_encoder: Kind::Float,
            unet: weight_kind,
        };
        let placeholder_tokens = config.placeholder_tokens();
        let add = |tokenizer: &mut ClipTokenizer| {
            add_placeholder_tokens(tokenizer, config, &placeholder_tokens)
        };
        let (mut base, (ids, ids_2)) = BaseModel::load_with(
            &config.pretrained_model_name_or_path,
            config.device,
            kinds,
            |tokenizer, tokenizer_2| Ok((add(tokenizer)?, tokenizer_2.map(add).transpose()?)),
        )?;
        let count = placeholder_tokens.len() as i64;
        base.unet_store.freeze();
        let rows = extend_embedding(
            &mut base.text_encoder,
            &mut base.text_encoder_store,
            ids,
            count,
        )?;
        let rows_2 = match (base.xl.as_mut(), ids_2) {
            (Some(xl), Some(ids_2)) => Some(extend_embedding(
                &mut xl.text_encoder_2,
                &mut xl.text_encoder_2_store,
                ids_2,
                count,
            )?),
            _ => None,
        };
        let mut trainables = vec![(EMBEDDING_KEY.to_string(), rows.embedding.shallow_clone())];
        trainables.extend(
            (rows_2.iter()).map(|r| (EMBEDDING_KEY_2.to_string(), r.embedding.shallow_clone())),
        );
        let core = TrainerCore::new(trainables, &config.core_settings(total_steps))?;
        let model = TextualInversionModel {
            base,
            placeholder_tokens,
            rows,
            rows_2,
        };
        Ok(Self { model, core })
    }

    pub fn step(&self) -> u64 {
        self.core.step()
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.model.base.tokenizer
    }

    pub fn text_encoder(&self) -> &ClipTextModel {
        &self.model.base.text_encoder
    }

    pub fn text_encoder_store(&self) -> &VarStore {
        &self.model.base.text_encoder_store
    }

    pub fn placeholder_tokens(&self) -> &[String] {
        &self.model.placeholder_tokens
    }

    /// (token, id) of every placeholder, in id order.
    pub fn placeholder_ids(&self) -> Vec<(String, i64)> {
        self.model.rows.ids(&self.model.placeholder_tokens)
    }

    /// SDXL: (token, id) of every placeholder in the second tokenizer; empty otherwise.
    pub fn placeholder_ids_2(&self) -> Vec<(String, i64)> {
        (self.model.rows_2.iter())
            .flat_map(|rows| rows.ids(&self.model.placeholder_tokens))
            .collect()
    }

    /// The learned rows `[num_vectors, dim]`.
    pub fn learned_embeddings(&self) -> Tensor {
        self.model.rows.learned(self.model.placeholder_tokens.len())
    }

    /// SDXL: the second text encoder's learned rows `[num_vectors, dim_2]`.
    pub fn learned_embeddings_2(&self) -> Option<Tensor> {
        let count = self.model.placeholder_tokens.len();
        self.model.rows_2.as_ref().map(|rows| rows.learned(count))
    }

    /// SDXL: the second text encoder's store.
    pub fn text_encoder_2_store(&self) -> Option<&VarStore> {
        (self.model.base.xl.as_ref()).map(|xl| &xl.text_encoder_2_store)
    }

    /// One optimizer step over `micro_batches`: loss, `backward(loss / n)` (fp16: scaled),
    /// AdamW over the embedding matrix (no clipping, as the script; skipped when fp16 scaling
    /// found an inf/NaN gradient), zero grads, restore every non-placeholder row bit for bit.
    pub fn train_step(&mut self, micro_batches: &[StepBatch]) -> Result<StepReport, TrainError> {
        self.core.train_step(&self.model, micro_batches)
    }

    /// Mixed precision: autocast of the text encoder and fp16 loss scaling.
    pub fn precision_mut(&mut self) -> &mut Precision {
        self.core.precision_mut()
    }

    /// The loss of one batch (textual_inversion.py: text encoder with float32 weights, under
    /// autocast with mixed precision; UNet in the weight dtype; loss in float32).
    pub fn batch_loss(&self, batch: &StepBatch) -> Result<Tensor, TrainError> {
        self.model.batch_loss(batch, self.core.precision())
    }
}

impl StepMethod for TextualInversionModel {
    type Batch = StepBatch;

    fn micro_batch_loss<'a>(
        &'a self,
        batch: &StepBatch,
        precision: &'a Precision,
    ) -> Result<MicroBatchLoss<'a>, TrainError> {
        self.batch_loss(batch, precision).map(MicroBatchLoss::from)
    }

    /// Only the placeholder rows learn: every other row goes back to its original value.
    fn after_update(&self) {
        self.rows.restore_others();
        if let Some(rows) = &self.rows_2 {
            rows.restore_others();
        }
    }
}

impl TextualInversionModel {
    fn batch_loss(&self, batch: &StepBatch, precision: &Precision) -> Result<Tensor, TrainError> {
        let (hidden, added) = self.conditioning(batch, precision)?;
        let model = DiffusionModel {
            unet: &self.base.unet,
            unet_kind: self.base.weight_kind,
            autocast: None,
            scheduler: &self.base.scheduler,
            prediction: self.base.prediction,
        };
        let spec = LossSpec {
            prior_loss_weight: None,
            snr_gamma: None,
        };
        objective::diffusion_loss(&model, batch, (&hidden, added.as_ref()), &spec)
    }

    /// The UNet's conditioning with a graph back to the embedding rows: the text encoder's
    /// last hidden state; for SDXL both encoders' penultimate states side by side, the second's
    /// pooled embedding and the batch's time ids (textual_inversion_sdxl.py).
    fn conditioning(
        &self,
        batch: &StepBatch,
        precision: &Precision,
    ) -> Result<(Tensor, Option<AddedConditions>), TrainError> {
        let device = batch.latents.device();
        let ids = batch.input_ids.to_device(device);
        let text_encoder = &self.base.text_encoder;
        let (Some(xl), Some(extra)) = (&self.base.xl, &batch.xl) else {
            let hidden = precision
                .forward(|| (text_encoder.forward(&ids)).map(|output| output.last_hidden_state))?;
            return Ok((hidden, None));
        };
        let sdxl_parts = |encoder: &ClipTextModel, ids: &Tensor| {
            precision.forward_pair(|| encoder.forward(ids).map(ClipTextOutput::into_sdxl_parts))
        };
        let (first, _) = sdxl_parts(text_encoder, &ids)?;
        let (second, pooled) =
            sdxl_parts(&xl.text_encoder_2, &extra.input_ids_2.to_device(device))?;
        let added = AddedConditions {
            text_embeds: pooled,
            time_ids: extra.time_ids.to_device(device),
        };
        Ok((Tensor::cat(&[first, second], -1), Some(added)))
    }
}

/// Checks the initializer token and adds the placeholder tokens to the tokenizer; returns the
/// initializer's id and the first placeholder's.
fn add_placeholder_tokens(
    tokenizer: &mut ClipTokenizer,
    config: &TextualInversionConfig,
    tokens: &[String],
) -> Result<(i64, i64), TrainError> {
    let initializer_id = single_token_id(tokenizer, &config.inversion.initializer_token)?;
    let mut ids = Vec::with_capacity(tokens.len());
    for token in tokens {
        ids.push(tokenizer.add_token(token).map_err(|e| TrainError::Config {
            field: field!(InversionFields, placeholder_token),
            problem: e.to_string(),
        })?);
    }
    Ok((initializer_id, ids[0]))
}

/// Appends `count` embedding rows to `encoder`, copies of the initializer token's (ids:
/// initializer, first placeholder), freezes everything else and tracks the matrix.
fn extend_embedding(
    encoder: &mut ClipTextModel,
    store: &mut VarStore,
    (initializer_id, first_id): (i64, i64),
    count: i64,
) -> Result<PlaceholderRows, TrainError> {
    let initial_rows = (encoder.token_embedding().get(initializer_id).detach())
        .unsqueeze(0)
        .repeat([count, 1]);
    encoder
        .append_token_embeddings(&initial_rows)
        .map_err(TrainError::model)?;
    store.freeze();
    Ok(PlaceholderRows::track(encoder, first_id))
}

/// The id of `word` when it encodes to exactly one token.
fn single_token_id(tokenizer: &ClipTokenizer, word: &str) -> Result<i64, TrainError> {
    let ids = tokenizer.encode_without_specials(word);
    match ids.as_slice() {
        [id] => Ok(*id),
        _ => Err(TrainError::Config {
            field: field!(InversionFields, initializer_token),
            problem: format!(
                "'{word}' encodes to {} tokens; it must be exactly one token (pick a single common word)",
                ids.len()
            ),
        }),
    }
}

/// The run's images and tokenised template prompts.
struct TiData {
    images: Vec<RgbImage>,
    transform: Transform,
    /// Token ids `[1, 77]` of each template with the placeholder string filled in.
    template_ids: Vec<Tensor>,
    /// SDXL: the same templates in the second tokenizer's ids.
    template_ids_2: Option<Vec<Tensor>>,
    repeats: usize,
}

impl TiData {
    fn load(
        config: &TextualInversionConfig,
        trainer: &TextualInversionTrainer,
    ) -> Result<Self, TrainError> {
        let images = data::load_folder(&config.train_data_dir, "train_data_dir")?;
        let placeholder_string = trainer.placeholder_tokens().join(" ");
        let texts: Vec<String> = (templates(config.inversion.learnable_property).iter())
            .map(|template| template.replace("{}", &placeholder_string))
            .collect();
        let base = &trainer.model.base;
        let template_ids = texts.iter().map(|text| base.tokenize(text)).collect();
        let template_ids_2 = (base.xl.is_some()).then(|| {
            texts
                .iter()
                .filter_map(|text| base.tokenize_2(text))
                .collect()
        });
        Ok(Self {
            images,
            transform: Transform::TextualInversion {
                resolution: config.training.resolution,
                center_crop: config.training.center_crop,
            },
            template_ids,
            template_ids_2,
            repeats: config.inversion.repeats.max(1),
        })
    }

    fn len(&self) -> usize {
        self.images.len() * self.repeats
    }

    /// The micro-batch `micro` of optimizer step `step`: each sample's image and template.
    fn batch(
        &self,
        base: &BaseModel,
        config: &TextualInversionConfig,
        step: u64,
        micro: u64,
    ) -> Result<StepBatch, TrainError> {
        let size = config.training.train_batch_size as u64;
        let first = (step * config.training.gradient_accumulation_steps + micro) * size;
        let mut pixels = Vec::new();
        let mut templates = Vec::new();
        let mut sizes = Vec::new();
        for sample in first..first + size {
            let index = streams::dataset_index(config.training.seed, self.len(), sample)
                % self.images.len();
            let mut rng = SampleRng::for_sample(config.training.seed, sample);
            templates.push(rng.below(self.template_ids.len() as u64) as usize);
            let image = &self.images[index];
            // textual_inversion_sdxl.py stretches the whole image: its crop is the corner.
            sizes.push(((image.height(), image.width()), (0, 0)));
            pixels.push(self.transform.apply(image, &mut rng));
        }
        let moments = base.encode_moments(&Tensor::stack(&pixels, 0).to_device(config.device));
        let pick = |ids: &[Tensor]| {
            let rows: Vec<&Tensor> = templates.iter().map(|&t| &ids[t]).collect();
            Tensor::cat(&rows, 0).to_device(config.device)
        };
        let mut batch = base.draw_batch(
            moments,
            pick(&self.template_ids),
            (config.training.seed, step, micro),
            false,
        )?;
        batch.xl = (self.template_ids_2.as_deref()).map(|ids_2| XlBatch {
            input_ids_2: pick(ids_2),
            time_ids: batch::time_ids(&sizes, config.training.resolution),
        });
        Ok(batch)
    }
}

struct TextualInversionRun<'a> {
    trainer: TextualInversionTrainer,
    data: TiData,
    config: &'a TextualInversionConfig,
}

impl TrainingMethod for TextualInversionRun<'_> {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn core(&self) -> &TrainerCore {
        &self.trainer.core
    }

    fn core_mut(&mut self) -> &mut TrainerCore {
        &mut self.trainer.core
    }

    fn write_model(&self, dir: &Path) -> Result<(), TrainError> {
        write_model_with_placeholders(self.config, &self.trainer, dir)
    }

    fn write_outputs(&self, dir: &Path) -> Result<(), TrainError> {
        write_outputs_into(self.config, &self.trainer, dir)
    }

    fn next_step(&mut self) -> Result<StepReport, TrainError> {
        let step = self.trainer.step();
        let base = &self.trainer.model.base;
        let batches = (0..self.config.training.gradient_accumulation_steps)
            .map(|micro| self.data.batch(base, self.config, step, micro))
            .collect::<Result<Vec<_>, _>>()?;
        self.trainer.train_step(&batches)
    }
}

/// Runs textual inversion and writes the embedding files and the full model folder.
pub fn train(
    config: &TextualInversionConfig,
    callbacks: &mut Callbacks,
) -> Result<TrainOutcome, TrainError> {
    config.validate()?;
    let image_count = data::list_images(&config.train_data_dir, "train_data_dir")?.len();
    let total = config::total_steps(
        config.training.max_train_steps,
        config.training.num_train_epochs,
        image_count * config.inversion.repeats.max(1),
        config.training.train_batch_size,
        config.training.gradient_accumulation_steps,
    );
    let trainer = TextualInversionTrainer::new(config, total)?;
    let data = TiData::load(config, &trainer)?;
    let settings = DriverSettings {
        work_dir: &config.work_dir,
        output_dir: &config.output_dir,
        total_steps: total,
        checkpointing_steps: config.training.checkpointing_steps,
        checkpoints_total_limit: config.training.checkpoints_total_limit,
        resume: config.resume_from_checkpoint,
        save_final: config.keep_final_checkpoint,
        seed: config.training.seed,
        dataset_sizes: vec![data.images.len()],
    };
    let mut run = TextualInversionRun {
        trainer,
        data,
        config,
    };
    driver::run(&mut run, &settings, callbacks)
}

/// The embedding files and the full diffusers folder of a trained placeholder.
pub fn write_outputs(
    config: &TextualInversionConfig,
    trainer: &TextualInversionTrainer,
) -> Result<(), TrainError> {
    write_outputs_into(config, trainer, &config.output_dir)
}

/// [`write_outputs`] into `out` instead of the configured output folder.
fn write_outputs_into(
    config: &TextualInversionConfig,
    trainer: &TextualInversionTrainer,
    out: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(|e| super::io_error(out, "create the directory", e))?;
    let token = &config.inversion.placeholder_token;
    let embeds = trainer.learned_embeddings();
    output::write_learned_embeds(&out.join(output::LEARNED_EMBEDS_FILE), token, &embeds)?;
    let a1111_file = out.join(format!("{}.safetensors", file_stem_for(token)));
    match trainer.learned_embeddings_2() {
        Some(embeds_2) => {
            let file_2 = out.join(output::LEARNED_EMBEDS_2_FILE);
            output::write_learned_embeds(&file_2, token, &embeds_2)?;
            output::write_a1111_sdxl_embedding(&a1111_file, &embeds, &embeds_2)?;
        }
        None => output::write_a1111_embedding(&a1111_file, &embeds)?,
    }
    write_model_with_placeholders(config, trainer, &out.join(MODEL_SUBDIR))
}

/// The base model with the extended tokenizer and text encoder as a diffusers folder at `dir`.
fn write_model_with_placeholders(
    config: &TextualInversionConfig,
    trainer: &TextualInversionTrainer,
    dir: &Path,
) -> Result<(), TrainError> {
    let base =
        ModelFolder::open(&config.pretrained_model_name_or_path).map_err(TrainError::model)?;
    output::write_model_folder(
        &base,
        dir,
        &NewWeights {
            unet: None,
            text_encoder: Some(trainer.text_encoder_store()),
            text_encoder_2: trainer.text_encoder_2_store(),
            added_tokens: &trainer.placeholder_ids(),
            added_tokens_2: &trainer.placeholder_ids_2(),
            ..NewWeights::default()
        },
    )
}

/// The placeholder without characters that are unsafe in file names (`<sks>` -> `sks`).
pub fn file_stem_for(token: &str) -> String {
    let stem: String = token
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if stem.is_empty() {
        "embedding".to_string()
    } else {
        stem
    }
}
