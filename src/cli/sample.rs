//! `dreampipe sample`: txt2img from a diffusers folder to PNG files carrying their parameters.
use super::TorchContext;
use crate::sd::lora::{LoraWeights, ScaledLora};
use crate::sd::pipeline::{
    DEFAULT_GUIDANCE, DEFAULT_STEPS, Event, StableDiffusion, Txt2Img, Txt2ImgError, Txt2ImgOutput,
    XlOptions,
};
use crate::sd::png::{
    GenerationParameters, a1111_sampler_name, short_weights_hash, tensor_to_rgb_bytes,
    write_rgb_png,
};
use crate::sd::schedulers::SchedulerKind;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `dreampipe sample` (the exact CLI other tools call).
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
    /// or a single-file SD 1.x/2.x `.safetensors` checkpoint.
    #[arg(long, default_value = "models/tiny-sd")]
    pub model: PathBuf,
    /// With a single file: a diffusers folder whose configs and tokenizer describe it (shapes
    /// other than the standard SD 1.x/2.x ones).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// With a single file: `epsilon` or `v_prediction` (SD 2.x 768 models).
    #[arg(long, value_parser = ["epsilon", "v_prediction", "sample"])]
    pub prediction_type: Option<String>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    pub steps: usize,
    #[arg(long, default_value_t = DEFAULT_GUIDANCE)]
    pub guidance: f64,
    /// diffusers' `guidance_rescale` (0: off): the guided prediction's spread rescaled toward
    /// the conditional one's.
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// ddim|pndm|lms|euler|euler-a|dpm++|ddpm; default: the model's own scheduler.
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Default: unet.sample_size × VAE factor (512 for SD 1.5).
    #[arg(long)]
    pub width: Option<i64>,
    #[arg(long)]
    pub height: Option<i64>,
    /// With N > 1, images are written as FILE-0.png … FILE-(N-1).png.
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// A LoRA to apply: a LoRA `.safetensors` file (diffusers, PEFT or kohya layout) or a
    /// `dreambooth_lora` output folder, optionally `=SCALE` (default 1). Repeat for several.
    #[arg(long = "lora", value_name = "FILE[=SCALE]", value_parser = parse_lora)]
    pub loras: Vec<(PathBuf, f64)>,
    #[arg(long)]
    pub out: PathBuf,
}

/// `FILE` or `FILE=SCALE`.
fn parse_lora(text: &str) -> Result<(PathBuf, f64), String> {
    if let Some((file, scale)) = text.rsplit_once('=')
        && let Ok(scale) = scale.parse::<f64>()
    {
        return Ok((PathBuf::from(file), scale));
    }
    Ok((PathBuf::from(text), 1.0))
}

/// Reads every `--lora`, naming the argument that is not a LoRA.
fn read_loras(args: &SampleArgs) -> anyhow::Result<Vec<(LoraWeights, f64)>> {
    let mut loras = Vec::new();
    for (path, scale) in &args.loras {
        let file = crate::sd::lora::files::lora_file_of(path).ok_or_else(|| {
            anyhow::anyhow!(
                "--lora {}: not a LoRA file (a .safetensors of LoRA weights, or a `dreambooth_lora` output folder)",
                path.display()
            )
        })?;
        loras.push((LoraWeights::read(&file)?, *scale));
    }
    Ok(loras)
}

/// Weight precision for inference.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn kind(self) -> tch::Kind {
        match self {
            DType::F32 => tch::Kind::Float,
            DType::F16 => tch::Kind::Half,
            DType::Bf16 => tch::Kind::BFloat16,
        }
    }
}

pub fn run(context: &TorchContext, args: &SampleArgs) -> anyhow::Result<ExitCode> {
    let folder = model_folder(context, args)?;
    let mut model = StableDiffusion::load(&folder, context.device, args.dtype.kind())?;
    let loras = read_loras(args)?;
    let scaled: Vec<ScaledLora<'_>> = loras
        .iter()
        .map(|(weights, scale)| ScaledLora {
            weights,
            scale: *scale,
        })
        .collect();
    let request = request_of(args);
    let extras = XlOptions {
        guidance_rescale: args.guidance_rescale,
        ..XlOptions::default()
    };
    let output = model.with_loras(&scaled, |model| {
        sample_with_progress_bar(model, &request, &extras)
    })?;
    let hash = short_weights_hash(&folder);
    for index in 0..args.batch {
        let path = output_path(&args.out, index, args.batch);
        let parameters = parameters_of(args, &output, &hash, index);
        let rgb = tensor_to_rgb_bytes(&output.images.get(index));
        let (width, height) = (output.width as u32, output.height as u32);
        write_rgb_png(&path, &rgb, width, height, Some(&parameters))?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn request_of(args: &SampleArgs) -> Txt2Img {
    Txt2Img {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        seed: args.seed,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler,
        width: args.width,
        height: args.height,
        batch: args.batch,
    }
}

/// Runs txt2img with a progress bar on stderr (hidden when stderr is not a terminal).
fn sample_with_progress_bar(
    model: &StableDiffusion,
    request: &Txt2Img,
    extras: &XlOptions,
) -> Result<Txt2ImgOutput, Txt2ImgError> {
    let bar = ProgressBar::new(request.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("sampling {bar:30} {pos}/{len} steps {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let output = model.txt2img_xl(request, extras, &mut |event| {
        if let Event::Step { done, total, .. } = event {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    });
    bar.finish_and_clear();
    output
}

/// The A1111 parameters of image `index`. Batch images share one seed (their noise is one draw
/// of shape [batch, ...]), so a batch adds A1111's "Batch size" and "Batch pos" fields.
fn parameters_of(
    args: &SampleArgs,
    output: &Txt2ImgOutput,
    model_hash: &str,
    index: i64,
) -> GenerationParameters {
    let extra = if args.batch > 1 {
        vec![
            ("Batch size".to_string(), args.batch.to_string()),
            ("Batch pos".to_string(), index.to_string()),
        ]
    } else {
        vec![]
    };
    let mut extra = extra;
    if !args.loras.is_empty() {
        let loras: Vec<String> = (args.loras.iter())
            .map(|(path, scale)| format!("{}={scale}", model_name(path)))
            .collect();
        extra.push(("Loras".to_string(), loras.join(" ")));
    }
    GenerationParameters {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        sampler: a1111_sampler_name(output.scheduler).to_string(),
        guidance: args.guidance,
        seed: args.seed,
        width: output.width,
        height: output.height,
        model_hash: model_hash.to_string(),
        model_name: model_name(&args.model),
        extra,
    }
}

/// FILE.png for one image; FILE-i.png for a batch.
pub fn output_path(out: &Path, index: i64, batch: i64) -> PathBuf {
    if batch == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let extension = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{index}.{extension}"))
}

fn model_name(dir: &Path) -> String {
    std::path::absolute(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

/// The diffusers folder of `--model`: itself, or for a single file the folder it is read into
/// once (`<cache>/shared/single-file/<blake3 of file, config, prediction type>`).
fn model_folder(context: &TorchContext, args: &SampleArgs) -> anyhow::Result<PathBuf> {
    if !args.model.is_file() {
        return Ok(args.model.clone());
    }
    let size = std::fs::metadata(&args.model)?.len();
    let digest = dreampipe_core::cache::hash::hash_file_uncached(&args.model, size)?;
    let options = crate::sd::single_file::ImportOptions {
        config: args.config.clone(),
        prediction_type: args.prediction_type.clone(),
    };
    let variant = blake3::hash(
        format!("{digest}{:?}{:?}", options.config, options.prediction_type).as_bytes(),
    );
    let folder = context
        .cache_root
        .join("shared/single-file")
        .join(variant.to_hex().as_str());
    if !folder.join("model_index.json").is_file() {
        crate::sd::single_file::import(&args.model, &options, &folder)?;
    }
    Ok(folder)
}
