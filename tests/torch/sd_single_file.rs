//! Single-file checkpoints (`sd::single_file`) against files made by diffusers' own conversion
//! (tests/fixtures/single-file/make_single_files.py; diffusers' `from_single_file` loads each
//! to its folder's tensors, checked by the generator): reading gives the folder's tensors
//! exactly, writing gives the converter's file, and a written file reads back with no config.
use dreampipe::sd::single_file::{self, ImportOptions};
use dreampipe::sd::weights::read_tensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/single-file")
        .join(name)
}

/// Every tensor of a diffusers folder's three components, by `component/name` (transformers 5
/// writes the text encoder without its `text_model.` prefix; both spellings compare equal).
fn folder_tensors(folder: &Path) -> BTreeMap<String, Tensor> {
    let files = [
        ("unet", "unet/diffusion_pytorch_model.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder", "text_encoder/model.safetensors"),
        ("text_encoder_2", "text_encoder_2/model.safetensors"),
    ];
    let mut all = BTreeMap::new();
    for (component, file) in files {
        if !folder.join(file).is_file() {
            continue; // text_encoder_2: SDXL only
        }
        for (name, tensor) in read_tensors(&folder.join(file)).expect("weights") {
            let name = name
                .strip_prefix("text_model.")
                .unwrap_or(&name)
                .to_string();
            if !name.ends_with("position_ids") {
                all.insert(format!("{component}/{name}"), tensor);
            }
        }
    }
    all
}

fn assert_same_tensors(ours: &Path, theirs: &Path) {
    let (a, b) = (folder_tensors(ours), folder_tensors(theirs));
    let missing: Vec<&String> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    let extra: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (name, tensor) in &a {
        let other = &b[name];
        assert!(
            tensor
                .to_kind(Kind::Float)
                .equal(&other.to_kind(Kind::Float)),
            "{name} differs"
        );
    }
}

fn import_with_config(stem: &str) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let options = ImportOptions {
        config: Some(fixture(stem)),
        prediction_type: None,
    };
    let file = fixture(&format!("{stem}.safetensors"));
    single_file::import(&file, &options, &out.path().join("model")).expect("import");
    out
}

#[test]
fn an_sd1_single_file_reads_to_its_folders_tensors() {
    let out = import_with_config("sd15-shaped");
    assert_same_tensors(&out.path().join("model"), &fixture("sd15-shaped"));
}

#[test]
fn an_sd2_open_clip_single_file_reads_to_its_folders_tensors() {
    let out = import_with_config("sd2-shaped");
    assert_same_tensors(&out.path().join("model"), &fixture("sd2-shaped"));
}

/// Writing a folder gives the converter's file: the same names and the same values (the
/// VAE's attention as 1×1 convolutions, SD 2.x's q/k/v fused).
/// SDXL: both text encoders under `conditioner.embedders` (the second's `text_projection`
/// transposed), the UNet's `label_emb`; the file is diffusers' SDXL script's output.
#[test]
fn an_sdxl_single_file_reads_to_its_folders_tensors() {
    let out = import_with_config("sdxl-shaped");
    let model = out.path().join("model");
    assert_same_tensors(&model, &fixture("sdxl-shaped"));
    assert!(model.join("tokenizer_2/merges.txt").is_file());
}

#[test]
fn writing_a_folder_gives_the_converters_single_file() {
    for stem in ["sd15-shaped", "sd2-shaped", "sdxl-shaped"] {
        let out = tempfile::tempdir().unwrap();
        let written = out.path().join("model.safetensors");
        single_file::export(&fixture(stem), &written, Kind::Float).expect("export");
        let ours: BTreeMap<String, Tensor> = read_tensors(&written).unwrap().into_iter().collect();
        let theirs: BTreeMap<String, Tensor> =
            read_tensors(&fixture(&format!("{stem}.safetensors")))
                .unwrap()
                .into_iter()
                .collect();
        let missing: Vec<&String> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<&String> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{stem}: missing {missing:?}, extra {extra:?}"
        );
        for (name, tensor) in &ours {
            assert!(tensor.equal(&theirs[name]), "{stem}: {name} differs");
        }
    }
}

/// A file dreampipe wrote carries its configs and tokenizer: it reads back with no config
/// folder, in half precision too.
#[test]
fn a_written_file_reads_back_without_a_config() {
    let out = tempfile::tempdir().unwrap();
    let written = out.path().join("model.safetensors");
    single_file::export(&fixture("sd2-shaped"), &written, Kind::Float).unwrap();
    let back = out.path().join("back");
    single_file::import(&written, &ImportOptions::default(), &back).expect("import");
    assert_same_tensors(&back, &fixture("sd2-shaped"));
    let config = std::fs::read_to_string(back.join("unet/config.json")).unwrap();
    assert!(
        config.contains("\"use_linear_projection\": true"),
        "{config}"
    );

    let half = out.path().join("half.safetensors");
    single_file::export(&fixture("sd15-shaped"), &half, Kind::Half).unwrap();
    let kinds: Vec<Kind> = read_tensors(&half)
        .unwrap()
        .iter()
        .map(|(_, t)| t.kind())
        .collect();
    assert!(kinds.iter().all(|k| *k == Kind::Half));
    single_file::import(
        &half,
        &ImportOptions::default(),
        &out.path().join("back-half"),
    )
    .unwrap();

    // SDXL: the second text encoder's config and tokenizer travel in the metadata too.
    let xl = out.path().join("xl.safetensors");
    single_file::export(&fixture("sdxl-shaped"), &xl, Kind::Float).unwrap();
    let back_xl = out.path().join("back-xl");
    single_file::import(&xl, &ImportOptions::default(), &back_xl).expect("import SDXL");
    assert_same_tensors(&back_xl, &fixture("sdxl-shaped"));
    let index = std::fs::read_to_string(back_xl.join("model_index.json")).unwrap();
    assert!(index.contains("StableDiffusionXLPipeline"), "{index}");
}

/// Shapes other than SD 1.x/2.x's need a config folder; the error names the tensor, both
/// shapes and what to pass. Pickles are refused with how to convert.
#[test]
fn bad_single_files_say_what_to_do() {
    let out = tempfile::tempdir().unwrap();
    let file = fixture("sd15-shaped.safetensors");
    let error = single_file::import(&file, &ImportOptions::default(), &out.path().join("m"))
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with(&format!("{}: tensor `model.diffusion_model.", file.display()))
            && error.contains("not a standard SD 1.x/2.x shape: pass a diffusers folder with its configs (`--config FOLDER` / `config:`)"),
        "{error}"
    );
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let pickle = out.path().join("model.ckpt");
    std::fs::write(&pickle, b"not read").unwrap();
    let error = single_file::import(&pickle, &ImportOptions::default(), &out.path().join("p"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("a pickled checkpoint (.ckpt/.pt/.bin) is not read (it can run code)"),
        "{error}"
    );
}

/// `dreampipe sample --model FILE.safetensors --config FOLDER` (the file read into a folder in
/// the cache once) renders the folder's image, pixel for pixel.
#[test]
fn sample_reads_a_single_file_and_renders_the_folders_image() {
    let out = tempfile::tempdir().unwrap();
    let render = |model: &Path, config: Option<&Path>, png: &str| {
        let mut command = std::process::Command::new(crate::dreampipe());
        command
            .args(["--device", "cpu", "--cache"])
            .arg(out.path().join("cache"))
            .args(["sample", "--model"])
            .arg(model)
            .args([
                "--prompt",
                "a photo of a dog",
                "--seed",
                "3",
                "--steps",
                "2",
            ])
            .args(["--width", "64", "--height", "64", "--out"])
            .arg(out.path().join(png));
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        image::open(out.path().join(png)).unwrap().to_rgb8()
    };
    let folder = fixture("sd15-shaped");
    let from_file = render(
        &fixture("sd15-shaped.safetensors"),
        Some(&folder),
        "file.png",
    );
    let from_folder = render(&folder, None, "folder.png");
    assert_eq!(from_file.as_raw(), from_folder.as_raw());
    let imported = std::fs::read_dir(out.path().join("cache/shared/single-file"))
        .unwrap()
        .count();
    assert_eq!(imported, 1);
}

/// A `generate` stage takes a single file dreampipe wrote as its `model:` (configs from the
/// file's metadata) and makes the images the folder makes.
#[test]
fn a_stage_takes_a_single_file_as_its_model() {
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("model.safetensors");
    single_file::export(&fixture("sd15-shaped"), &file, Kind::Float).unwrap();
    let pipeline = |model: &Path| {
        format!(
            "name: gen\nstages:\n  class:\n    kind: generate\n    model: {}\n    prompt: a photo of a dog\n    count: 1\n    steps: 2\n    width: 64\n    height: 64\n",
            model.display()
        )
    };
    let run = |name: &str, model: &Path| {
        let dir = out.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("gen.yaml"), pipeline(model)).unwrap();
        let output = std::process::Command::new(crate::dreampipe())
            .current_dir(&dir)
            .args([
                "--device", "cpu", "--cache", "cache", "run", "gen.yaml", "--plain",
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let images = dir.join("cache/runs/gen/class/images");
        let first = std::fs::read_dir(&images)
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        image::open(first).unwrap().to_rgb8()
    };
    let from_file = run("file", &file);
    let from_folder = run("folder", &fixture("sd15-shaped"));
    assert_eq!(from_file.as_raw(), from_folder.as_raw());
}

/// A DreamBooth stage with `export: [diffusers, single_file]` writes `model.safetensors` next
/// to its folder (what `model export` writes, in `save_dtype`); with `export: [single_file]`
/// the folder goes and a downstream `generate` still takes the stage as its model.
#[test]
fn training_stages_export_a_single_file() {
    let out = tempfile::tempdir().unwrap();
    let photos = out.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for index in 0..2u32 {
        let image = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4 + index * 60) as u8, (y * 4) as u8, 90])
        });
        image.save(photos.join(format!("p{index}.png"))).unwrap();
    }
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-sd");
    let pipeline = |export: &str| {
        format!(
            "name: exp\nstages:\n  db:\n    kind: dreambooth\n    model: {}\n    instance_images: photos\n    instance_prompt: a photo of sks dog\n    resolution: 64\n    train_batch_size: 1\n    max_train_steps: 2\n    export: {export}\n    save_dtype: f32\n  gen:\n    kind: generate\n    model: db\n    prompt: a photo of sks dog\n    count: 1\n    steps: 2\n    width: 64\n    height: 64\n",
            model.display()
        )
    };
    let run = |export: &str| {
        std::fs::write(out.path().join("exp.yaml"), pipeline(export)).unwrap();
        let output = std::process::Command::new(crate::dreampipe())
            .current_dir(out.path())
            .env("OMP_NUM_THREADS", "1")
            .args([
                "--device", "cpu", "--cache", "cache", "run", "exp.yaml", "--plain",
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let db = std::fs::canonicalize(out.path().join("cache/runs/exp/db")).unwrap();
        let images = std::fs::canonicalize(out.path().join("cache/runs/exp/gen/images")).unwrap();
        let first = std::fs::read_dir(images)
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        (db, image::open(first).unwrap().to_rgb8())
    };
    let (both, image_from_folder) = run("[diffusers, single_file]");
    assert!(both.join("model_index.json").is_file());
    let exported = out.path().join("exported.safetensors");
    single_file::export(&both, &exported, Kind::Float).unwrap();
    let written: BTreeMap<String, Tensor> = read_tensors(&both.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    for (name, tensor) in read_tensors(&exported).unwrap() {
        assert!(tensor.equal(&written[&name]), "{name}");
    }

    let (only, image_from_file) = run("[single_file]");
    assert!(only.join("model.safetensors").is_file());
    assert!(!only.join("model_index.json").exists() && !only.join("unet").exists());
    assert_eq!(image_from_file.as_raw(), image_from_folder.as_raw());
}
