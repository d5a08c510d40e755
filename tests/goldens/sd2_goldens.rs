//! SD 2.x-style tiny model (tests/fixtures/sd2-tiny, made by make_sd2_goldens.py with diffusers
//! 0.42.1 / transformers 5.24.0, see its README): pad token "!", gelu CLIP with legacy eos id,
//! linear projections, per-block head counts, upcast attention, DDIM with v-prediction.
use dreampipe::sd::clip::ClipTextModel;
use dreampipe::sd::pipeline::{Event, StableDiffusion, Txt2Img};
use dreampipe::sd::png::{tensor_to_rgb_bytes, write_rgb_png};
use dreampipe::sd::schedulers::SchedulerKind;
use dreampipe::sd::tokenizer::ClipTokenizer;
use dreampipe::sd::unet::UNet2DConditionModel;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// sd-tiny README tolerances: text encoder / UNet outputs and final latents atol 1e-4,
/// rtol 1e-4; full pipeline images atol 2e-3.
const TENSOR_TOL: f64 = 1e-4;
const IMAGE_ATOL: f64 = 2e-3;
/// PNG pixels within one 8-bit level (rounding of values within IMAGE_ATOL).
const PNG_LEVELS: i32 = 1;
/// The id of "!" in the CLIP vocabulary (first byte token), SD 2.x's pad token.
const BANG_ID: i64 = 0;

fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sd2-tiny")
        .join(relative)
}

fn tensors(file: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(file))
        .unwrap()
        .into_iter()
        .collect()
}

fn json(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

use crate::sd_support::assert_close;

#[test]
fn tokenizer_with_bang_pad_matches_transformers() {
    let tokenizer = ClipTokenizer::from_dir(&fixture("model/tokenizer")).unwrap();
    let golden = json("tokenizer_cases.json");
    assert_eq!(golden["pad_token_id"].as_i64(), Some(BANG_ID));
    assert_eq!(tokenizer.pad_id(), BANG_ID);
    let cases = golden["cases"].as_array().unwrap();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let encoding = tokenizer.encode(prompt);
        assert_eq!(encoding.ids, ids(&case["input_ids"]), "ids of {prompt:?}");
        assert_eq!(
            encoding.ids_unpadded,
            ids(&case["input_ids_unpadded"]),
            "unpadded ids of {prompt:?}"
        );
    }
    assert_eq!(cases.len(), 7);
}

#[test]
fn literal_bang_is_the_pad_token_like_transformers_encodes_it() {
    let tokenizer = ClipTokenizer::from_dir(&fixture("model/tokenizer")).unwrap();
    let (bos, eos) = (tokenizer.bos_id(), tokenizer.eos_id());
    // transformers registers pad "!" as a special token: every "!" in the text is id 0 and
    // splits words ("hello!" -> h, ell, o</w>, "!"), never the BPE token "!</w>".
    let hello = tokenizer.encode("hello!").ids_unpadded;
    assert_eq!(hello.first(), Some(&bos));
    assert_eq!(&hello[hello.len() - 2..], &[BANG_ID, eos]);
    assert_eq!(tokenizer.encode("!").ids_unpadded, vec![bos, BANG_ID, eos]);
    assert!(!hello.contains(&tokenizer.token_id("!</w>").unwrap()));
}

#[test]
fn gelu_text_encoder_with_legacy_eos_matches_transformers() {
    let golden = tensors("text_encoder.safetensors");
    let (_vs, model) = ClipTextModel::load(
        &fixture("model/text_encoder"),
        Device::Cpu,
        Kind::Float,
        None,
    )
    .unwrap();
    assert_eq!(model.config().eos_token_id, 2);
    let output = tch::no_grad(|| model.forward(&golden["input_ids"]).unwrap());
    let tol = TENSOR_TOL;
    let (state, pooled) = (&output.last_hidden_state, &output.pooler_output);
    assert_close(
        "last_hidden_state",
        state,
        &golden["last_hidden_state"],
        tol,
        tol,
    );
    assert_close("pooler_output", pooled, &golden["pooler_output"], tol, tol);
}

#[test]
fn linear_projection_unet_with_head_list_and_upcast_matches_diffusers() {
    let golden = tensors("unet.safetensors");
    let (_vs, unet) =
        UNet2DConditionModel::load(&fixture("model/unet"), Device::Cpu, Kind::Float, None).unwrap();
    let config = unet.config();
    assert!(config.use_linear_projection && config.upcast_attention);
    let prediction = tch::no_grad(|| {
        unet.forward(
            &golden["sample"],
            &golden["timesteps"],
            &golden["encoder_hidden_states"],
        )
    });
    let tol = TENSOR_TOL;
    assert_close("noise_pred", &prediction, &golden["noise_pred"], tol, tol);
}

/// One pipeline run with every UNet call and step recorded.
struct Run {
    noise: Tensor,
    timesteps: Vec<f64>,
    unet_inputs: Vec<Tensor>,
    unet_outputs: Vec<Tensor>,
    step_latents: Vec<Tensor>,
    latents: Tensor,
    images: Tensor,
}

fn run_pipeline(request: &Txt2Img) -> Run {
    let model = StableDiffusion::load(&fixture("model"), Device::Cpu, Kind::Float).unwrap();
    let (mut noise, mut timesteps) = (None, Vec::new());
    let (mut unet_inputs, mut unet_outputs, mut step_latents) = (vec![], vec![], vec![]);
    let output = model
        .txt2img(request, &mut |event| match event {
            Event::Start { noise: n, .. } => noise = Some(n.copy()),
            Event::UNet {
                timestep,
                input,
                output,
                ..
            } => {
                timesteps.push(timestep.double_value(&[]));
                unet_inputs.push(input.copy());
                unet_outputs.push(output.copy());
            }
            Event::Step { latents, .. } => step_latents.push(latents.copy()),
        })
        .unwrap();
    assert_eq!(
        output.scheduler,
        SchedulerKind::Ddim,
        "the folder's scheduler"
    );
    Run {
        noise: noise.unwrap(),
        timesteps,
        unet_inputs,
        unet_outputs,
        step_latents,
        latents: output.latents,
        images: output.images,
    }
}

/// The request of pipeline.json (the model's own scheduler, default size).
fn fixture_request(args: &Value) -> Txt2Img {
    Txt2Img {
        prompt: args["prompt"].as_str().unwrap().to_string(),
        negative_prompt: args["negative_prompt"].as_str().unwrap().to_string(),
        seed: args["seed"].as_u64().unwrap(),
        steps: args["num_inference_steps"].as_u64().unwrap() as usize,
        guidance: args["guidance_scale"].as_f64().unwrap(),
        scheduler: None,
        width: None,
        height: None,
        batch: 1,
    }
}

/// Our PNG of `image` ([3, h, w] in [-1, 1]) is within one 8-bit level of diffusers' PNG.
fn assert_png_matches(image: &Tensor) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.png");
    let (height, width) = (image.size()[1] as u32, image.size()[2] as u32);
    write_rgb_png(&path, &tensor_to_rgb_bytes(image), width, height, None).unwrap();
    assert_png_file_matches(&path);
}

fn assert_png_file_matches(path: &Path) {
    let ours = image::open(path).unwrap().to_rgb8();
    let golden = image::open(fixture("pipeline.png")).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), golden.dimensions(), "PNG size");
    let worst = ours
        .as_raw()
        .iter()
        .zip(golden.as_raw())
        .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
        .max()
        .unwrap_or(0);
    assert!(worst <= PNG_LEVELS, "PNG pixel differs by {worst} levels");
}

#[test]
fn v_prediction_ddim_pipeline_matches_diffusers() {
    let golden = tensors("pipeline.safetensors");
    let args = json("pipeline.json");
    let run = run_pipeline(&fixture_request(&args));
    crate::sd_support::assert_noise_close(
        "initial noise",
        &run.noise,
        &golden["initial_noise"],
        1.0,
    );
    let expected_timesteps: Vec<f64> = args["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(run.timesteps, expected_timesteps);
    let checks = [
        (
            "unet inputs",
            Tensor::stack(&run.unet_inputs, 0),
            "step_unet_input",
        ),
        (
            "unet outputs",
            Tensor::stack(&run.unet_outputs, 0),
            "step_unet_output",
        ),
        (
            "step latents",
            Tensor::stack(&run.step_latents, 0),
            "step_latents",
        ),
        ("latents", run.latents, "latents"),
    ];
    for (name, ours, key) in &checks {
        assert_close(name, ours, &golden[*key], TENSOR_TOL, TENSOR_TOL);
    }
    let image = (&run.images / 2.0 + 0.5)
        .clamp(0.0, 1.0)
        .permute([0, 2, 3, 1]);
    assert_close("image", &image, &golden["image"], IMAGE_ATOL, 0.0);
    assert_png_matches(&run.images.get(0));
}

#[test]
fn sample_cli_writes_the_diffusers_image_for_an_sd2_folder() {
    let args = json("pipeline.json");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sample.png");
    let steps = args["num_inference_steps"].to_string();
    let seed = args["seed"].to_string();
    let output = std::process::Command::new(crate::dreampipe())
        .args(["--device", "cpu", "sample", "--model"])
        .arg(fixture("model"))
        .args(["--prompt", args["prompt"].as_str().unwrap()])
        .args(["--seed", &seed, "--steps", &steps, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "dreampipe sample failed: {stderr}");
    assert_png_file_matches(&out);
}
