//! `dreampipe init [DIR] [--images PATH] [--class NOUN] [--model PATH]`: writes a starter
//! DreamBooth pipeline, `DIR/dreampipe.yaml`, for a folder of instance images, asking nothing.
//! The template comes with the kinds it names (the registry's
//! [`PipelineTemplates`](crate::stages::templates::PipelineTemplates)). Never overwrites a file.
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

pub fn run(context: &Context, args: &InitArgs) -> anyhow::Result<ExitCode> {
    let templates = (context.registry.templates())
        .ok_or_else(|| anyhow::anyhow!("no starter pipeline is registered"))?;
    let settings = StarterSettings {
        name: pipeline_name(&args.dir, templates.starter_fallback_name),
        images: path_from(&args.dir, args.images.as_deref(), DEFAULT_IMAGES),
        model: path_from(&args.dir, args.model.as_deref(), DEFAULT_MODEL),
        class_noun: args.class_noun.clone(),
    };
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| anyhow::anyhow!("cannot create `{}`: {e}", args.dir.display()))?;
    let path = args.dir.join(STARTER_FILE);
    write_new(&path, &starter_pipeline(templates.starter, &settings))?;
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

/// DIR's name with every character a pipeline name cannot hold replaced by `-` (`fallback`
/// when none is left).
pub fn pipeline_name(dir: &Path, fallback: &str) -> String {
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
        fallback.to_string()
    } else {
        trimmed.to_string()
    }
}

/// Quotes text for a YAML double-quoted scalar.
fn yaml_quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

/// The starter pipeline text: `template` with the settings filled in.
pub fn starter_pipeline(template: &str, settings: &StarterSettings) -> String {
    template
        .replace("{name}", &settings.name)
        .replace("{images}", &yaml_quoted(&settings.images))
        .replace("{model}", &yaml_quoted(&settings.model))
        .replace("{class}", &yaml_quoted(&settings.class_noun))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_folder() {
        assert_eq!(
            pipeline_name(Path::new("/data/my dog.v2"), "p"),
            "my-dog-v2"
        );
        assert_eq!(pipeline_name(Path::new("/data/ü"), "p"), "p");
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
