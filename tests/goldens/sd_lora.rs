//! LoRA files against diffusers (tests/fixtures/lora, made by make_lora_goldens.py): the
//! images `StableDiffusionPipeline` renders with adapters loaded by `load_lora_weights` — the
//! script's diffusers layout, a kohya file with its own alpha, two adapters with weights, a
//! scale — and the files dreampipe writes read back to the same adapters.
use dreampipe::sd::lora::files::{self, DIFFUSERS_FILE, KOHYA_FILE};
use dreampipe::sd::lora::{Component, LoraError, LoraWeights, ScaledLora};
use dreampipe::sd::pipeline::{StableDiffusion, Txt2Img, Txt2ImgError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const MODEL: &str = "models/tiny-sd";
const FIXTURES: &str = "tests/fixtures/lora";
/// The pipeline goldens' image tolerance (tests/fixtures/sd-tiny/README.md).
const IMAGE_ATOL: f64 = 2e-3;

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn golden_images() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture("images.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn request() -> Txt2Img {
    Txt2Img {
        prompt: "a photo of sks dog in a bucket".to_string(),
        negative_prompt: String::new(),
        seed: 1234,
        steps: 4,
        guidance: 7.5,
        scheduler: None,
        width: None,
        height: None,
        batch: 1,
    }
}

fn model() -> StableDiffusion {
    StableDiffusion::load(Path::new(MODEL), Device::Cpu, Kind::Float).unwrap()
}

/// txt2img with `loras`, as diffusers' `output_type="np"`: [1, h, w, 3] in [0, 1].
fn render(model: &mut StableDiffusion, loras: &[(&LoraWeights, f64)]) -> Tensor {
    let scaled: Vec<ScaledLora<'_>> = loras
        .iter()
        .map(|(weights, scale)| ScaledLora {
            weights,
            scale: *scale,
        })
        .collect();
    let output = model
        .with_loras(&scaled, |model| model.txt2img(&request(), &mut |_| {}))
        .unwrap_or_else(|e: Txt2ImgError| panic!("txt2img: {e}"));
    (output.images / 2.0 + 0.5)
        .clamp(0.0, 1.0)
        .permute([0, 2, 3, 1])
}

fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn assert_image(name: &str, found: &Tensor, goldens: &HashMap<String, Tensor>) {
    let difference = max_difference(found, &goldens[name]);
    eprintln!("{name}: {difference:e} from diffusers");
    assert!(
        difference <= IMAGE_ATOL,
        "{name}: {difference} from diffusers' image"
    );
    if name != "base" {
        let effect = max_difference(&goldens[name], &goldens["base"]);
        assert!(
            effect > 5.0 * IMAGE_ATOL,
            "{name}: the LoRA changes the image by {effect} only, too little for this test to mean anything"
        );
    }
}

fn read(name: &str) -> LoraWeights {
    LoraWeights::read(&fixture(name)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn images_with_loras_match_diffusers_load_lora_weights() {
    let goldens = golden_images();
    let mut model = model();
    let a = read("strong_a.safetensors");
    let b = read("strong_b_kohya.safetensors");
    assert_image("base", &render(&mut model, &[]), &goldens);
    assert_image("a_scale_1", &render(&mut model, &[(&a, 1.0)]), &goldens);
    assert_image("a_scale_0.5", &render(&mut model, &[(&a, 0.5)]), &goldens);
    assert_image("b_scale_1", &render(&mut model, &[(&b, 1.0)]), &goldens);
    assert_image(
        "a_0.5_b_1",
        &render(&mut model, &[(&a, 0.5), (&b, 1.0)]),
        &goldens,
    );
    let trained = read("trained_unet_te/pytorch_lora_weights.safetensors");
    assert_image(
        "trained_unet_te",
        &render(&mut model, &[(&trained, 1.0)]),
        &goldens,
    );
    // The adapters are gone again: the pooled model is the base model.
    assert_image("base", &render(&mut model, &[]), &goldens);
}

#[test]
fn every_layout_reads_to_the_same_adapters() {
    let diffusers = read("trained_unet_te/pytorch_lora_weights.safetensors");
    let kohya = read("trained_unet_te/lora_kohya.safetensors");
    assert_eq!(diffusers.modules.len(), kohya.modules.len());
    assert_eq!(diffusers.of(Component::Unet).count(), 48);
    assert_eq!(diffusers.of(Component::TextEncoder).count(), 20);
    let by_path: HashMap<String, _> = kohya.modules.iter().map(|m| (m.path.clone(), m)).collect();
    for module in &diffusers.modules {
        let twin = by_path[&module.path.replace('.', "_")];
        assert_eq!(twin.component, module.component);
        assert!(module.down.equal(&twin.down), "{}", module.path);
        assert!(module.up.equal(&twin.up), "{}", module.path);
        // diffusers' kohya conversion writes alpha = rank; its own layout has no alpha.
        assert_eq!(module.alpha, None);
        assert_eq!(twin.alpha, Some(2.0));
    }
    let b = read("strong_b_kohya.safetensors");
    assert!(
        b.modules
            .iter()
            .all(|m| m.alpha == Some(1.0) && m.rank() == 2)
    );
}

#[test]
fn written_files_read_back_and_render_like_the_original() {
    let goldens = golden_images();
    let b = read("strong_b_kohya.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let mut model = model();
    // Paths in the model's dotted form, as a trained LoRA has them.
    let mut dotted = b;
    dotted.resolve_paths(&mut model.lora_targets());
    files::write_diffusers(&dotted, &dir.path().join(DIFFUSERS_FILE), Kind::Float).unwrap();
    files::write_kohya(&dotted, &dir.path().join(KOHYA_FILE), Kind::Float).unwrap();
    for name in [DIFFUSERS_FILE, KOHYA_FILE] {
        let back = LoraWeights::read(&dir.path().join(name)).unwrap();
        assert_image("b_scale_1", &render(&mut model, &[(&back, 1.0)]), &goldens);
    }
}

#[test]
fn files_that_are_not_sd_loras_are_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.safetensors");
    let write = |tensors: &[(&str, Tensor)]| Tensor::write_safetensors(tensors, &file).unwrap();
    write(&[(
        "lora_unet_x.hada_w1_a",
        Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
    )]);
    let error = LoraWeights::read(&file).unwrap_err().to_string();
    assert!(
        error.starts_with(&format!(
            "{}: tensor 'lora_unet_x.hada_w1_a' is not a LoRA weight dreampipe reads",
            file.display()
        )),
        "{error}"
    );
    write(&[(
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        Tensor::zeros([2, 64], (Kind::Float, Device::Cpu)),
    )]);
    let error = LoraWeights::read(&file).unwrap_err();
    assert!(matches!(error, LoraError::Incomplete { .. }), "{error}");
    write(&[
        (
            "unet.nowhere.to_q.lora_A.weight",
            Tensor::zeros([2, 64], (Kind::Float, Device::Cpu)),
        ),
        (
            "unet.nowhere.to_q.lora_B.weight",
            Tensor::zeros([64, 2], (Kind::Float, Device::Cpu)),
        ),
    ]);
    let lora = LoraWeights::read(&file).unwrap();
    let mut model = model();
    let scaled = [ScaledLora {
        weights: &lora,
        scale: 1.0,
    }];
    let error = model
        .with_loras(&scaled, |_| Ok::<(), LoraError>(()))
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}: layer 'nowhere.to_q' is not a layer of this model (is the LoRA for another architecture, e.g. SDXL or SD 2.x vs SD 1.x?)",
            file.display()
        )
    );
}

fn sample_cli(extra: &[&str], out: &Path) -> std::process::Output {
    let mut args = vec![
        "sample",
        "--model",
        MODEL,
        "--prompt",
        "a photo of sks dog in a bucket",
        "--seed",
        "1234",
        "--steps",
        "4",
        "--guidance",
        "7.5",
        "--out",
    ];
    let out = out.to_str().unwrap();
    args.push(out);
    args.extend_from_slice(extra);
    std::process::Command::new(env!("CARGO_BIN_EXE_dreampipe-torch"))
        .args(&args)
        .env("DREAMPIPE_DEVICE", "cpu")
        .output()
        .unwrap()
}

#[test]
fn sample_lora_flag_renders_diffusers_image_and_names_a_bad_file() {
    let goldens = golden_images();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.png");
    let lora = format!("{}=0.5", fixture("strong_a.safetensors").display());
    let output = sample_cli(&["--lora", &lora], &out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let png = image::open(&out).unwrap().to_rgb8();
    let golden = (&goldens["a_scale_0.5"] * 255.0).round().to_kind(Kind::Int);
    let golden: Vec<i64> = Vec::<i64>::try_from(golden.flatten(0, -1)).unwrap();
    let worst = png
        .as_raw()
        .iter()
        .zip(&golden)
        .map(|(a, b)| (i64::from(*a) - b).abs())
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "PNG differs from diffusers' image by {worst} levels"
    );
    let bad = sample_cli(&["--lora", MODEL], &dir.path().join("b.png"));
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains(&format!(
            "--lora {MODEL}: not a LoRA file (a .safetensors of LoRA weights, or a `dreambooth_lora` output folder)"
        )),
        "{stderr}"
    );
}
