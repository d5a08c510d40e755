//! The streaming safetensors reader behind `weights::load_into` (one tensor in memory at a
//! time): dtype conversion on load, f16 model folders, and header errors naming the file.
use dreampipe::sd::init::{Architecture, InitOptions, WeightDtype, write_model_folder};
use dreampipe::sd::unet::UNet2DConditionModel;
use dreampipe::sd::weights::{WeightsError, load_into};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor, nn::VarStore};

#[test]
fn loads_bf16_f64_and_f16_sources_into_float_variables() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("mixed.safetensors");
    let values = Tensor::from_slice(&[0.5f32, -1.25, 3.0, 1e-3, 7.5, -0.0625]).view([2, 3]);
    let sources = [
        ("b.bf16", values.to_kind(Kind::BFloat16)),
        ("a.f64", values.to_kind(Kind::Double)),
        ("c.f16", values.to_kind(Kind::Half)),
    ];
    Tensor::write_safetensors(&sources, &file).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let targets: Vec<Tensor> = ["a", "b", "c"]
        .iter()
        .map(|name| vs.root().zeros(name, &[2, 3]))
        .collect();
    load_into(&vs, &file, |key| key.split('.').next().map(str::to_string)).unwrap();
    for (target, (key, source)) in targets.iter().zip([&sources[1], &sources[0], &sources[2]]) {
        assert!(target.equal(&source.to_kind(Kind::Float)), "{key}");
    }
}

#[test]
fn f16_folder_loads_into_float_models_as_the_rounded_f32_weights() {
    // Writing a folder seeds and draws from libtorch's global generator.
    let _rng = crate::sd_support::global_rng();
    let tmp = tempfile::tempdir().unwrap();
    let (full, half) = (tmp.path().join("f32"), tmp.path().join("f16"));
    for (dir, dtype) in [(&full, WeightDtype::F32), (&half, WeightDtype::F16)] {
        let options = InitOptions {
            architecture: Architecture::Tiny,
            seed: 4,
            dtype,
        };
        write_model_folder(dir, &options).unwrap();
    }
    let (vs, _unet) =
        UNet2DConditionModel::load(&half.join("unet"), Device::Cpu, Kind::Float, None).unwrap();
    let reference: HashMap<String, Tensor> =
        Tensor::read_safetensors(full.join("unet/diffusion_pytorch_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let variables = vs.variables();
    assert_eq!(variables.len(), reference.len());
    for (name, variable) in variables {
        assert_eq!(variable.kind(), Kind::Float);
        let rounded = reference[&name].to_kind(Kind::Half).to_kind(Kind::Float);
        assert!(variable.equal(&rounded), "{name}");
    }
}

#[test]
fn bad_headers_are_reported_with_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _ = vs.root().zeros("w", &[2]);
    let file_with = |header: &str, data: usize| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        bytes
    };
    let cases: [(&str, Vec<u8>, &str); 7] = [
        (
            "overflow.safetensors",
            file_with(
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,0]}}"#,
                0,
            ),
            "tensor 'w': shape [4294967296, 4294967296, 4] of F32 has a negative dimension or a byte size that overflows",
        ),
        (
            "negative.safetensors",
            file_with(
                r#"{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,0]}}"#,
                0,
            ),
            "tensor 'w': shape [-2] of F32 has a negative dimension or a byte size that overflows",
        ),
        (
            "integers.safetensors",
            file_with(
                r#"{"w":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#,
                8,
            ),
            "tensor 'w' is stored as an integer dtype (I32) but the model needs a float tensor; the file does not hold this model's weights",
        ),
        (
            "huge.safetensors",
            u64::MAX.to_le_bytes().to_vec(),
            "header length 18446744073709551615 is invalid for a 8-byte file",
        ),
        (
            "not-json.safetensors",
            [4u64.to_le_bytes().to_vec(), b"nope".to_vec()].concat(),
            "header is not a JSON object: expected ident at line 1 column 2",
        ),
        (
            "short.safetensors",
            {
                let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
                let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
                bytes.extend_from_slice(header);
                bytes.extend_from_slice(&[0u8; 4]);
                bytes
            },
            "tensor 'w': data_offsets [0, 8] run past the 4-byte data section (truncated file?)",
        ),
        (
            "mis-sized.safetensors",
            {
                let header = br#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}}"#;
                let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
                bytes.extend_from_slice(header);
                bytes.extend_from_slice(&[0u8; 8]);
                bytes
            },
            "tensor 'w': data_offsets [0, 8] do not span the 4 bytes of F16 [2]",
        ),
    ];
    for (name, bytes, reason) in cases {
        let file = tmp.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        let error = load_into(&vs, &file, |key| Some(key.to_string())).unwrap_err();
        assert!(matches!(error, WeightsError::Read { .. }), "{name}");
        assert_eq!(
            error.to_string(),
            format!("{}: cannot read safetensors: {reason}", file.display())
        );
    }
}

#[test]
fn a_full_disk_is_named_as_such_with_the_file() {
    let tensors = [(
        "w".to_string(),
        Tensor::zeros([1024], (Kind::Float, Device::Cpu)),
    )];
    let full = std::path::Path::new("/dev/full");
    assert_eq!(
        dreampipe::sd::weights::write_safetensors(&tensors, full),
        Err("no space left on device while writing /dev/full".to_string())
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("w.safetensors");
    dreampipe::sd::weights::write_safetensors(&tensors, &file).unwrap();
    let read = Tensor::read_safetensors(&file).unwrap();
    assert_eq!(read.len(), 1);
    assert!(read[0].1.equal(&tensors[0].1));
}

/// Issue #12, class 2: absurd config sizes are refused before anything is allocated.
#[test]
fn absurd_config_sizes_are_refused_naming_file_key_and_limit() {
    use dreampipe::sd::clip::ClipTextConfig;
    use dreampipe::sd::unet::UNetConfig;
    use dreampipe::sd::vae::VaeConfig;
    let file = std::path::Path::new("m/unet/config.json");
    let unet = UNetConfig::from_json_str(r#"{"block_out_channels": [1000000]}"#, file);
    assert_eq!(
        unet.unwrap_err().to_string(),
        "m/unet/config.json: config key 'block_out_channels' is 1000000, over the limit of 8192 for any Stable Diffusion model; fix the config (nothing was allocated)"
    );
    let sample = UNetConfig::from_json_str(r#"{"sample_size": 100000}"#, file);
    assert_eq!(
        sample.unwrap_err().to_string(),
        "m/unet/config.json: config key 'sample_size' is 100000, over the limit of 1024 for any Stable Diffusion model; fix the config (nothing was allocated)"
    );
    let vae = VaeConfig::from_json_str(r#"{"layers_per_block": -3}"#, file);
    assert_eq!(
        vae.unwrap_err().to_string(),
        "m/unet/config.json: config key 'layers_per_block' is -3; it must not be negative"
    );
    let tmp = tempfile::tempdir().unwrap();
    let clip = tmp.path().join("config.json");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/tiny-sd/text_encoder/config.json"),
    )
    .unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["max_position_embeddings"] = serde_json::json!(1_000_000_000);
    std::fs::write(&clip, json.to_string()).unwrap();
    assert_eq!(
        ClipTextConfig::from_file(&clip).unwrap_err().to_string(),
        format!(
            "{}: invalid text encoder config: key 'max_position_embeddings' is 1000000000, over the limit of 4096 for any Stable Diffusion model; fix the config (nothing was allocated)",
            clip.display()
        )
    );
}

#[test]
fn an_allocation_libtorch_refuses_is_one_line_naming_the_component() {
    let file = std::path::Path::new("m/unet/diffusion_pytorch_model.safetensors");
    let error = dreampipe::sd::weights::allocating(file, || {
        Tensor::zeros([1i64 << 40, 4096], (Kind::Float, Device::Cpu))
    })
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "out of memory allocating 16.0 PiB for unet (the sizes in its config.json; try a smaller model, dtype f16/bf16, or fix the config)"
    );
}
