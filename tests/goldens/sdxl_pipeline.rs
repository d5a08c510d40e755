//! SDXL against diffusers (tests/fixtures/sdxl-tiny, made by make_sdxl_goldens.py): a tiny
//! random SDXL folder loads; `encode_prompt` (both encoders, pooled), the UNet with added
//! conditions, every UNet call of a run and the image equal what `StableDiffusionXLPipeline`
//! computes — Euler (the folder's scheduler), DDIM with `prompt_2` and a negative prompt, and
//! micro-conditioning sizes.
use dreampipe::sd::pipeline::{Event, StableDiffusion, Txt2Img, XlOptions};
use dreampipe::sd::schedulers::SchedulerKind;
use dreampipe::sd::unet::AddedConditions;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const FIXTURES: &str = "tests/fixtures/sdxl-tiny";
/// The bundled tiny random SDXL (made by tests/fixtures/sdxl-tiny/make_sdxl_goldens.py).
const MODEL: &str = "models/tiny-sdxl";
/// The SD pipeline goldens' tolerances (tests/fixtures/sd-tiny/README.md): tensors 1e-4,
/// images atol 2e-3.
const TENSOR_TOL: f64 = 1e-4;
const IMAGE_ATOL: f64 = 2e-3;

fn goldens(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(Path::new(FIXTURES).join(format!("{name}.safetensors")))
        .unwrap()
        .into_iter()
        .collect()
}

fn model() -> StableDiffusion {
    StableDiffusion::load(Path::new(MODEL), Device::Cpu, Kind::Float).unwrap()
}

fn assert_close(name: &str, found: &Tensor, expected: &Tensor, tolerance: f64) {
    assert_eq!(found.size(), expected.size(), "{name}: shape");
    let difference = (found - expected).abs().max().double_value(&[]);
    let scale = expected.abs().max().double_value(&[]).max(1.0);
    eprintln!("{name}: {difference:e} (scale {scale:.3})");
    assert!(
        difference <= tolerance * scale,
        "{name}: {difference} from diffusers (tolerance {tolerance} × {scale})"
    );
}

/// (request, SDXL options) of each golden, as make_sdxl_goldens.py calls the pipeline.
fn request(name: &str) -> (Txt2Img, XlOptions) {
    let mut request = Txt2Img {
        prompt: String::new(),
        negative_prompt: String::new(),
        seed: 0,
        steps: 0,
        guidance: 0.0,
        scheduler: None,
        width: None,
        height: None,
        batch: 1,
    };
    let mut xl = XlOptions::default();
    match name {
        "euler" => {
            request.prompt = "a photo of sks dog in a bucket".into();
            (request.steps, request.guidance, request.seed) = (4, 5.0, 1234);
        }
        "ddim_prompt2_negative" => {
            request.prompt = "a photo of sks dog".into();
            request.negative_prompt = "blurry".into();
            xl.prompt_2 = Some("an oil painting".into());
            (request.steps, request.guidance, request.seed) = (3, 7.0, 7);
            request.scheduler = Some(SchedulerKind::Ddim);
        }
        "micro_conditioning" => {
            request.prompt = "a red car".into();
            (request.steps, request.guidance, request.seed) = (3, 5.0, 3);
            xl.original_size = Some((128, 96));
            xl.crops_coords_top_left = (8, 4);
            xl.target_size = Some((64, 64));
        }
        "guidance_rescale" => {
            request.prompt = "a photo of sks dog".into();
            (request.steps, request.guidance, request.seed) = (3, 5.0, 5);
            xl.guidance_rescale = 0.7;
        }
        other => panic!("unknown golden {other}"),
    }
    (request, xl)
}

fn check_run(name: &str) {
    let golden = goldens(name);
    let model = model();
    let (request, xl) = request(name);
    let parts = model.xl.as_ref().expect("an SDXL folder");
    let prompt_2 = xl.prompt_2.clone().unwrap_or(request.prompt.clone());
    let (embeds, pooled) = model
        .encode_prompt_xl(parts, &request.prompt, &prompt_2)
        .unwrap();
    assert_close(
        &format!("{name} prompt_embeds"),
        &embeds,
        &golden["prompt_embeds"],
        TENSOR_TOL,
    );
    assert_close(
        &format!("{name} pooled"),
        &pooled,
        &golden["pooled_prompt_embeds"],
        TENSOR_TOL,
    );
    let mut calls = Vec::new();
    let output = model
        .txt2img_xl(&request, &xl, &mut |event| {
            if let Event::UNet { input, output, .. } = event {
                calls.push((input.copy(), output.copy()));
            }
        })
        .unwrap();
    for (index, (input, unet_output)) in calls.iter().enumerate() {
        let key = |field: &str| format!("unet.{index}.{field}");
        assert_close(&key("sample"), input, &golden[&key("sample")], TENSOR_TOL);
        assert_close(
            &key("output"),
            unet_output,
            &golden[&key("output")],
            TENSOR_TOL,
        );
    }
    assert!(!calls.is_empty() && golden.contains_key(&format!("unet.{}.output", calls.len() - 1)));
    assert_close(
        &format!("{name} latents"),
        &output.latents,
        &golden["latents"],
        TENSOR_TOL,
    );
    let image = (output.images / 2.0 + 0.5)
        .clamp(0.0, 1.0)
        .permute([0, 2, 3, 1]);
    assert_close(
        &format!("{name} image"),
        &image,
        &golden["image"],
        IMAGE_ATOL,
    );
}

#[test]
fn euler_run_matches_diffusers() {
    check_run("euler");
}

#[test]
fn ddim_with_prompt_2_and_negative_prompt_matches_diffusers() {
    check_run("ddim_prompt2_negative");
}

#[test]
fn micro_conditioning_sizes_match_diffusers() {
    check_run("micro_conditioning");
}

/// `guidance_rescale` 0.7 (diffusers' `rescale_noise_cfg`); the rescale moves the image, so
/// the comparison can fail.
#[test]
fn guidance_rescale_matches_diffusers() {
    check_run("guidance_rescale");
    let model = model();
    let (request, mut xl) = request("guidance_rescale");
    xl.guidance_rescale = 0.0;
    let plain = model.txt2img_xl(&request, &xl, &mut |_| {}).unwrap();
    let image = (plain.images / 2.0 + 0.5)
        .clamp(0.0, 1.0)
        .permute([0, 2, 3, 1]);
    let moved = (&image - &goldens("guidance_rescale")["image"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        moved > 10.0 * IMAGE_ATOL,
        "the rescale moved the image {moved} only"
    );
}

#[test]
fn unet_with_added_conditions_matches_diffusers() {
    let golden = goldens("micro_conditioning");
    let model = model();
    let added = AddedConditions {
        text_embeds: golden["unet.0.text_embeds"].shallow_clone(),
        time_ids: golden["unet.0.time_ids"].shallow_clone(),
    };
    let output = tch::no_grad(|| {
        model.unet.forward_added(
            &golden["unet.0.sample"],
            &golden["unet.0.timestep"],
            &golden["unet.0.encoder_hidden_states"],
            Some(&added),
        )
    });
    assert_close(
        "unet.0.output",
        &output,
        &golden["unet.0.output"],
        TENSOR_TOL,
    );
    // The time ids matter: the same call with other sizes gives another prediction.
    let other = AddedConditions {
        text_embeds: added.text_embeds.shallow_clone(),
        time_ids: added.time_ids.zeros_like(),
    };
    let moved = tch::no_grad(|| {
        model.unet.forward_added(
            &golden["unet.0.sample"],
            &golden["unet.0.timestep"],
            &golden["unet.0.encoder_hidden_states"],
            Some(&other),
        )
    });
    let difference = (&moved - &output).abs().max().double_value(&[]);
    assert!(
        difference > 1e-3,
        "time ids changed the output by {difference} only"
    );
}

#[test]
fn sample_renders_an_sdxl_folder_as_diffusers() {
    let golden = goldens("euler");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_dreampipe-torch"))
        .args(["sample", "--model", MODEL, "--prompt"])
        .args([
            "a photo of sks dog in a bucket",
            "--seed",
            "1234",
            "--steps",
            "4",
        ])
        .args(["--guidance", "5", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let png = image::open(&out).unwrap().to_rgb8();
    assert_eq!(
        png.dimensions(),
        (64, 64),
        "SDXL's default size: sample_size × VAE factor"
    );
    let expected = (&golden["image"] * 255.0).round().to_kind(Kind::Int);
    let expected: Vec<i64> = Vec::<i64>::try_from(expected.flatten(0, -1)).unwrap();
    let worst = (png.as_raw().iter().zip(&expected))
        .map(|(a, b)| (i64::from(*a) - b).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "PNG {worst} levels from diffusers' image");
}

/// An SDXL LoRA on the UNet and both text encoders (`text_encoder_2.` / `lora_te2_`), in the
/// layout diffusers saves and in kohya's: the image equals diffusers' `load_lora_weights` at
/// scale 0.7.
#[test]
fn sdxl_loras_in_both_layouts_render_as_diffusers() {
    use dreampipe::sd::lora::{Component, LoraWeights, ScaledLora};
    let golden = goldens("lora_images");
    let mut model = model();
    let (request, xl) = request("euler");
    for file in ["lora_xl.safetensors", "lora_xl_kohya.safetensors"] {
        let weights = LoraWeights::read(&Path::new(FIXTURES).join(file)).unwrap();
        assert_eq!(weights.of(Component::TextEncoder2).count(), 20, "{file}");
        let loras = [ScaledLora {
            weights: &weights,
            scale: 0.7,
        }];
        let output = model
            .with_loras(&loras, |model| model.txt2img_xl(&request, &xl, &mut |_| {}))
            .unwrap();
        let image = (output.images / 2.0 + 0.5)
            .clamp(0.0, 1.0)
            .permute([0, 2, 3, 1]);
        assert_close(file, &image, &golden["lora_scale_0.7"], IMAGE_ATOL);
    }
    let effect = (&golden["lora_scale_0.7"] - &golden["base"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        effect > 5.0 * IMAGE_ATOL,
        "the LoRA moves the image {effect} only"
    );
}
