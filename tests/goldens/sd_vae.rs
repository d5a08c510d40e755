//! AutoencoderKL against the diffusers 0.42.1 goldens in tests/fixtures/sd-tiny/vae.safetensors
//! (tiny model in models/tiny-sd/vae), plus config / weight error cases.

use crate::sd_support::{read_golden, repo_path};
use std::collections::HashMap;
use std::path::Path;

use dreampipe::sd::vae::{AutoencoderKL, VaeConfig};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Tolerances the fixture README suggests for VAE outputs.
const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

fn fixtures() -> HashMap<String, Tensor> {
    read_golden("tests/fixtures/sd-tiny/vae.safetensors")
}

fn tiny_vae() -> (VarStore, AutoencoderKL) {
    let dir = repo_path("models/tiny-sd/vae");
    AutoencoderKL::load(&dir, Device::Cpu, Kind::Float, None).unwrap()
}

fn assert_close(name: &str, actual: &Tensor, expected: &Tensor) {
    crate::sd_support::assert_close(name, actual, expected, ATOL, RTOL);
}

#[test]
fn encode_matches_mean_logvar_std_and_seeded_sample() {
    let golden = fixtures();
    let (_vs, vae) = tiny_vae();
    let _guard = tch::no_grad_guard();
    let posterior = vae.encode(&golden["image"]);
    assert_close("latent_mean", &posterior.mean, &golden["latent_mean"]);
    assert_close("latent_logvar", &posterior.logvar, &golden["latent_logvar"]);
    assert_close("latent_std", &posterior.std, &golden["latent_std"]);
    let seed = golden["latent_sample_seed"].int64_value(&[0]);
    assert_eq!(seed, 3);
    let sample = {
        let _rng = crate::sd_support::global_rng();
        tch::manual_seed(seed);
        posterior.sample()
    };
    assert_close("latent_sample", &sample, &golden["latent_sample"]);
}

#[test]
fn decode_matches() {
    let golden = fixtures();
    let (_vs, vae) = tiny_vae();
    let _guard = tch::no_grad_guard();
    assert_close(
        "decoded",
        &vae.decode(&golden["decode_input"]),
        &golden["decoded"],
    );
}

#[test]
fn config_values_and_parameter_count_match_the_tiny_model() {
    let (vs, vae) = tiny_vae();
    assert_eq!(vae.scaling_factor(), 0.18215);
    assert!(vae.config().force_upcast);
    assert_eq!(vae.config().block_out_channels, vec![32, 64]);
    let parameters: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    assert_eq!(parameters, 658_375);
}

#[test]
fn logvar_is_clamped_like_diffusers() {
    let moments = Tensor::from_slice(&[0.0f32, 0.0, -100.0, 100.0]).reshape([1, 4, 1, 1]);
    let posterior = dreampipe::sd::vae::DiagonalGaussian::from_moments(&moments);
    let logvar: Vec<f32> = posterior.logvar.flatten(0, -1).try_into().unwrap();
    assert_eq!(logvar, vec![-30.0, 20.0]);
}

/// Copies the tiny vae folder to a temp dir with an edited config.
fn copied_vae(edit_config: impl Fn(&str) -> String) -> tempfile::TempDir {
    crate::sd_support::copied_component("models/tiny-sd/vae", edit_config)
}

#[test]
fn unknown_block_type_is_an_error_naming_key_and_file() {
    let dir =
        copied_vae(|text| text.replacen("\"UpDecoderBlock2D\"", "\"AttnUpDecoderBlock2D\"", 1));
    let error = AutoencoderKL::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}: config key 'up_block_types' = [\"AttnUpDecoderBlock2D\",\"UpDecoderBlock2D\"] is not supported; \
             need 2 entries, each UpDecoderBlock2D",
            dir.path().join("config.json").display()
        )
    );
}

#[test]
fn missing_tensor_is_an_error_naming_tensor_and_file() {
    let dir = copied_vae(|text| text.to_string());
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .filter(|(name, _)| name != "quant_conv.bias")
        .collect();
    Tensor::write_safetensors(&tensors, &weights).unwrap();
    let error = AutoencoderKL::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}: tensor 'quant_conv.bias' is missing (the model config expects it)",
            weights.display()
        )
    );
}

#[test]
fn deprecated_attention_names_load_like_current_ones() {
    let dir = copied_vae(|text| text.to_string());
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    let renamed: Vec<(String, Tensor)> = Tensor::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .map(|(name, tensor)| {
            (
                name.replace(".to_q.", ".query.")
                    .replace(".to_out.0.", ".proj_attn."),
                tensor,
            )
        })
        .collect();
    assert!(
        renamed
            .iter()
            .any(|(name, _)| name.ends_with("attentions.0.proj_attn.weight"))
    );
    Tensor::write_safetensors(&renamed, &weights).unwrap();
    let (_vs, vae) = AutoencoderKL::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap();
    let golden = fixtures();
    let _guard = tch::no_grad_guard();
    assert_close(
        "decoded",
        &vae.decode(&golden["decode_input"]),
        &golden["decoded"],
    );
}

/// stabilityai/sd-vae (SD 1.5 / 2.1 `vae/config.json`).
const SD_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

#[test]
fn sd_vae_config_builds_the_real_parameter_count() {
    let config = VaeConfig::from_json_str(SD_VAE_CONFIG, Path::new("vae/config.json")).unwrap();
    assert_eq!(config.scaling_factor, 0.18215);
    let vs = VarStore::new(Device::Cpu);
    let _vae = AutoencoderKL::new(vs.root(), config);
    let parameters: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    // diffusers: sum(p.numel() for p in AutoencoderKL.from_pretrained(sd-1.5, subfolder="vae").parameters())
    assert_eq!(parameters, 83_653_863);
}

#[test]
fn bfloat16_decode_keeps_its_kind_and_stays_near_the_float32_golden() {
    let dir = repo_path("models/tiny-sd/vae");
    let (_vs, vae) = AutoencoderKL::load(&dir, Device::Cpu, Kind::BFloat16, None).unwrap();
    let golden = fixtures();
    let _guard = tch::no_grad_guard();
    let decoded = vae.decode(&golden["decode_input"].to_kind(Kind::BFloat16));
    assert_eq!(decoded.kind(), Kind::BFloat16);
    let expected = &golden["decoded"];
    let max_difference = (decoded.to_kind(Kind::Float) - expected)
        .abs()
        .max()
        .double_value(&[]);
    let scale = expected.abs().max().double_value(&[]);
    assert!(
        max_difference < 0.05 * scale,
        "max |difference| {max_difference:e} (golden max {scale:e})"
    );
}

/// The DreamBooth fixture encodes its batch with `latent_dist.sample(Generator().manual_seed(32))`.
#[test]
fn dreambooth_batch_encodes_like_diffusers() {
    let golden = read_golden("tests/fixtures/sd-tiny/training/dreambooth.safetensors");
    let (_vs, vae) = tiny_vae();
    let _guard = tch::no_grad_guard();
    let posterior = vae.encode(&golden["pixel_values"]);
    assert_close("latent_mean", &posterior.mean, &golden["latent_mean"]);
    assert_close("latent_std", &posterior.std, &golden["latent_std"]);
    let sampled = {
        let _rng = crate::sd_support::global_rng();
        tch::manual_seed(32);
        posterior.sample()
    };
    assert_close(
        "latents_sampled_unscaled",
        &sampled,
        &golden["latents_sampled_unscaled"],
    );
    assert_close(
        "latents",
        &(sampled * vae.scaling_factor()),
        &golden["latents"],
    );
}
