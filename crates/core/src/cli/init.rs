//! `dreampipe init [DIR] [--images PATH] [--class NOUN] [--model PATH]`: writes a starter
//! DreamBooth pipeline, `DIR/dreampipe.yaml`, for a folder of instance images, asking nothing.
//! Its comments carry the seed study's findings as defaults. Never overwrites a file.
use super::Context;
use clap::Args;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The file `init` writes inside DIR.
pub const STARTER_FILE: &str = "dreampipe.yaml";
/// Instance images folder when `--images` is not given (relative to DIR).
const DEFAULT_IMAGES: &str = "images";
/// Base model folder when `--model` is not given (relative to DIR).
const DEFAULT_MODEL: &str = "models/stable-diffusion-v1-5";
/// Pipeline name when DIR's name has no usable characters.
const FALLBACK_NAME: &str = "dreambooth";

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Folder to write `dreampipe.yaml` into (created if missing).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Folder of instance images (default: DIR/images).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// The subject's class noun, as in "a photo of sks dog".
    #[arg(long = "class", default_value = "dog")]
    pub class_noun: String,
    /// Base diffusers model folder (default: DIR/models/stable-diffusion-v1-5).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// What goes into the template.
pub struct StarterSettings {
    pub name: String,
    pub images: String,
    pub model: String,
    pub class_noun: String,
}

pub fn run(_context: &Context, args: &InitArgs) -> anyhow::Result<ExitCode> {
    let settings = StarterSettings {
        name: pipeline_name(&args.dir),
        images: path_from(&args.dir, args.images.as_deref(), DEFAULT_IMAGES),
        model: path_from(&args.dir, args.model.as_deref(), DEFAULT_MODEL),
        class_noun: args.class_noun.clone(),
    };
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| anyhow::anyhow!("cannot create `{}`: {e}", args.dir.display()))?;
    let path = args.dir.join(STARTER_FILE);
    write_new(&path, &starter_pipeline(&settings))?;
    println!("wrote {}", path.display());
    let images = args.dir.join(&settings.images);
    if !images.is_dir() {
        println!(
            "next: put 3–20 photos of your subject in {} (the pipeline reads that folder)",
            images.display()
        );
    }
    println!(
        "then: dreampipe validate {0}, dreampipe run {0}",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Creates `path` only if it does not exist (no check-then-write race).
fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = match std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "`{}` already exists; init never overwrites a file: edit it, delete it, or init another folder",
            path.display()
        ),
        Err(e) => anyhow::bail!("cannot create `{}`: {e}", path.display()),
    };
    file.write_all(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write `{}`: {e}", path.display()))
}

/// `given` relative to `dir` when it lies inside it, else as given; `default` when not given.
fn path_from(dir: &Path, given: Option<&Path>, default: &str) -> String {
    let Some(given) = given else {
        return default.to_string();
    };
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match absolute(given).strip_prefix(absolute(dir)) {
        Ok(inside) if !inside.as_os_str().is_empty() => inside.display().to_string(),
        _ => absolute(given).display().to_string(),
    }
}

/// DIR's name with every character a pipeline name cannot hold replaced by `-`.
pub fn pipeline_name(dir: &Path) -> String {
    let folder = std::path::absolute(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let cleaned: String = folder
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() {
        FALLBACK_NAME.to_string()
    } else {
        trimmed.to_string()
    }
}

/// Quotes text for a YAML double-quoted scalar.
fn yaml_quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

/// The starter pipeline text.
pub fn starter_pipeline(settings: &StarterSettings) -> String {
    STARTER_TEMPLATE
        .replace("{name}", &settings.name)
        .replace("{images}", &yaml_quoted(&settings.images))
        .replace("{model}", &yaml_quoted(&settings.model))
        .replace("{class}", &yaml_quoted(&settings.class_noun))
}

/// Defaults and comments follow the seed study (DreamBooth on SD 1.x, diffusers' training
/// script and the Hugging Face DreamBooth experiments): see each comment.
const STARTER_TEMPLATE: &str = r#"# dreampipe starter: DreamBooth fine-tuning on your own subject.
#   dreampipe validate dreampipe.yaml    # check the file
#   dreampipe run dreampipe.yaml         # run what changed; prints the HTML report's path
# Change a value here or per run: --set db.max_train_steps=800, --set params.class=cat
name: {name}
params:
  model: {model}          # base model: a diffusers folder (Stable Diffusion 1.x)
  class: {class}          # your subject's class noun
  token: sks              # rare token that names your subject in prompts
stages:
  instance:
    kind: images
    path: {images}        # 3–20 photos of the subject: varied poses, backgrounds, lighting
    resolution: 512
    center_crop: true

  # Class images for prior preservation: the base model's idea of the class, so that training
  # on your subject does not make every member of the class look like it.
  class_images:
    kind: generate
    model: ${params.model}
    prompt: a photo of ${params.class}
    count: 200            # the study's default
    scheduler: ddim
    steps: 50
    guidance: 7.5
    seed: 0

  db:
    kind: dreambooth
    model: ${params.model}
    instance_images: instance
    instance_prompt: a photo of ${params.token} ${params.class}
    class_images: class_images
    class_prompt: a photo of ${params.class}
    with_prior_preservation: true
    prior_loss_weight: 1.0
    # Text encoder trained too: the best results in the study (faces especially).
    train_text_encoder: true
    # Objects and pets: 400 steps at 2e-6.
    # Faces: about 1200 steps at 1e-6–2e-6, always with prior preservation.
    # Too many steps or too high a rate overfits: samples copy the training photos.
    learning_rate: 2e-6
    max_train_steps: 400
    lr_scheduler: constant
    lr_warmup_steps: 0
    train_batch_size: 1
    gradient_accumulation_steps: 1
    # Fits a 16 GB GPU: fp16 mixed precision, 8-bit Adam and gradient checkpointing.
    # With 24 GB or more: mixed_precision: no, optimizer: adamw, gradient_checkpointing: false.
    mixed_precision: fp16
    optimizer: adamw8bit
    gradient_checkpointing: true
    seed: 0
    resolution: 512
    # Sweep to find your settings (one run per combination, compared side by side in the report):
    # matrix:
    #   learning_rate: [1e-6, 2e-6]
    #   max_train_steps: [400, 800, 1200]

  grid:
    kind: sample_grid
    models: db
    prompts:
      - a photo of ${params.token} ${params.class}
      - a photo of ${params.token} ${params.class} on the beach
      - an oil painting of ${params.token} ${params.class}
    seeds: [0, 1, 2, 3]
    # DDIM with 100 steps: on fine-tuned (slightly overfit) models DDIM gave cleaner samples
    # than PNDM or LMS in the study.
    schedulers: [ddim]
    steps: 100
    guidance: 7.5
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_folder() {
        assert_eq!(pipeline_name(Path::new("/data/my dog.v2")), "my-dog-v2");
        assert_eq!(pipeline_name(Path::new("/data/ü")), FALLBACK_NAME);
    }

    #[test]
    fn given_paths_inside_dir_become_relative() {
        let dir = Path::new("/p/study");
        assert_eq!(
            path_from(dir, Some(Path::new("/p/study/photos")), "images"),
            "photos"
        );
        assert_eq!(path_from(dir, Some(Path::new("/x/y")), "images"), "/x/y");
        assert_eq!(path_from(dir, None, "images"), "images");
    }
}
