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
    ];
    let mut all = BTreeMap::new();
    for (component, file) in files {
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
#[test]
fn writing_a_folder_gives_the_converters_single_file() {
    for stem in ["sd15-shaped", "sd2-shaped"] {
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
    assert!(!out.path().join("m").exists() && !out.path().join("m.partial").exists());
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
