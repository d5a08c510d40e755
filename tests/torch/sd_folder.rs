//! Opening diffusers model folders: the tiny model and broken copies of it.
use dreampipe::sd::folder::{ComponentClass, FolderError, ModelFolder};
use std::path::Path;

const TINY_MODEL: &str = "models/tiny-sd";

/// Copies the tiny model into a fresh temporary directory.
fn tiny_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(Path::new(TINY_MODEL), dir.path());
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn tiny_model_opens_with_its_component_classes() {
    let folder = ModelFolder::open(Path::new(TINY_MODEL)).unwrap();
    assert_eq!(folder.pipeline_class(), Some("StableDiffusionPipeline"));
    assert_eq!(
        folder.component_class("unet"),
        Some(&ComponentClass {
            library: "diffusers".to_string(),
            class_name: "UNet2DConditionModel".to_string()
        })
    );
    assert_eq!(
        folder.component_class("text_encoder").unwrap().class_name,
        "CLIPTextModel"
    );
    assert_eq!(
        folder.component_class("scheduler").unwrap().class_name,
        "PNDMScheduler"
    );
    assert_eq!(folder.component_class("safety_checker"), None);
    assert_eq!(folder.unet_dir(), Path::new(TINY_MODEL).join("unet"));
    assert_eq!(
        folder.tokenizer_dir(),
        Path::new(TINY_MODEL).join("tokenizer")
    );
    assert!(folder.variants().is_empty());
    assert!(folder.has_plain_weights());
}

#[test]
fn fp16_variant_is_detected_only_when_every_weighted_component_has_it() {
    let dir = tiny_copy();
    let root = dir.path();
    let fp16 = [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
    ];
    for file in &fp16[..2] {
        std::fs::write(root.join(file), b"").unwrap();
    }
    assert!(ModelFolder::open(root).unwrap().variants().is_empty());
    std::fs::write(root.join(fp16[2]), b"").unwrap();
    let folder = ModelFolder::open(root).unwrap();
    assert_eq!(folder.variants(), ["fp16".to_string()]);
    assert!(folder.has_variant("fp16"));
    // A folder with only fp16 weights still opens, but has no plain weights.
    std::fs::remove_file(root.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let folder = ModelFolder::open(root).unwrap();
    assert!(folder.has_variant("fp16"));
    assert!(!folder.has_plain_weights());
}

#[test]
fn missing_model_index_is_reported_with_its_path() {
    let dir = tiny_copy();
    std::fs::remove_file(dir.path().join("model_index.json")).unwrap();
    let error = ModelFolder::open(dir.path()).unwrap_err();
    assert!(matches!(error, FolderError::Read { .. }));
    let message = error.to_string();
    let expected_start = format!(
        "{}: cannot read: ",
        dir.path().join("model_index.json").display()
    );
    assert!(message.starts_with(&expected_start), "{message}");
    assert!(
        message.ends_with("(is this a diffusers model folder?)"),
        "{message}"
    );
}

#[test]
fn invalid_model_index_json_is_reported() {
    let dir = tiny_copy();
    std::fs::write(dir.path().join("model_index.json"), "[1, 2]").unwrap();
    assert_eq!(
        ModelFolder::open(dir.path()).unwrap_err().to_string(),
        format!(
            "{}: invalid model index: expected a JSON object",
            dir.path().join("model_index.json").display()
        )
    );
}

#[test]
fn unlisted_component_is_reported() {
    let dir = tiny_copy();
    let index = std::fs::read_to_string(dir.path().join("model_index.json")).unwrap();
    let index = index.replace(
        "\"vae\": [\n    \"diffusers\",\n    \"AutoencoderKL\"\n  ]",
        "\"vae\": [null, null]",
    );
    std::fs::write(dir.path().join("model_index.json"), index).unwrap();
    assert_eq!(
        ModelFolder::open(dir.path()).unwrap_err().to_string(),
        format!(
            "{}: component 'vae' is not listed (a Stable Diffusion folder needs unet, vae, text_encoder, tokenizer and scheduler)",
            dir.path().join("model_index.json").display()
        )
    );
}

#[test]
fn missing_component_folder_is_reported() {
    let dir = tiny_copy();
    std::fs::remove_dir_all(dir.path().join("scheduler")).unwrap();
    assert_eq!(
        ModelFolder::open(dir.path()).unwrap_err().to_string(),
        format!(
            "{}: folder of component 'scheduler' is missing (model_index.json lists it)",
            dir.path().join("scheduler").display()
        )
    );
}

#[test]
fn missing_component_file_is_reported() {
    let dir = tiny_copy();
    std::fs::remove_file(dir.path().join("tokenizer/merges.txt")).unwrap();
    assert_eq!(
        ModelFolder::open(dir.path()).unwrap_err().to_string(),
        format!(
            "{}: missing (component 'tokenizer' needs it)",
            dir.path().join("tokenizer/merges.txt").display()
        )
    );
}

#[test]
fn missing_weights_file_is_reported() {
    let dir = tiny_copy();
    let weights = dir.path().join("text_encoder/model.safetensors");
    std::fs::rename(&weights, dir.path().join("text_encoder/pytorch_model.bin")).unwrap();
    assert_eq!(
        ModelFolder::open(dir.path()).unwrap_err().to_string(),
        format!(
            "{}: no weights file model.safetensors or model.<variant>.safetensors for component 'text_encoder' (convert .bin checkpoints to .safetensors)",
            dir.path().join("text_encoder").display()
        )
    );
}
