//! Property tests: arbitrary text and arbitrary YAML-shaped documents never panic
//! load+validate, and every rejection carries at least one diagnostic naming the file; image
//! headers, safetensors headers and model configs with arbitrary sizes never panic or abort,
//! and are refused exactly when they pass a limit.
use dreampipe::pipeline::{LoadOptions, load_str};
use proptest::prelude::*;
use std::path::Path;

fn check(text: &str) {
    let result = load_str(
        text,
        Path::new("fuzz.yaml"),
        Path::new("."),
        &LoadOptions::new(dreampipe::stages::registry()),
    );
    if let Err(error) = result {
        assert!(!error.diagnostics.is_empty());
        assert!(
            error
                .diagnostics
                .iter()
                .all(|d| d.file == Path::new("fuzz.yaml"))
        );
    }
}

/// YAML-ish documents built from pipeline vocabulary, so validation (not just parsing) runs.
fn pipeline_like() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "kind",
        "run",
        "needs",
        "inputs",
        "matrix",
        "use",
        "path",
        "resolution",
        "center_crop",
        "stages",
        "params",
        "x",
    ]);
    let scalar = prop::sample::select(vec![
        "command",
        "images",
        "a",
        "b",
        "echo hi",
        "1",
        "2e-6",
        "-3",
        "true",
        "null",
        "[a, b]",
        "[1, 2]",
        "{}",
        "${params.p}",
        ".",
        "~",
        "'${params.'",
    ]);
    let field = (key, scalar).prop_map(|(k, v)| format!("    {k}: {v}\n"));
    let stage = (
        prop::sample::select(vec!["a", "b", "c", "bad name"]),
        prop::collection::vec(field, 0..5),
    )
        .prop_map(|(name, fields)| format!("  {name}:\n{}", fields.concat()));
    (prop::collection::vec(stage, 0..4), any::<bool>()).prop_map(|(stages, with_params)| {
        let params = if with_params { "params:\n  p: 3\n" } else { "" };
        format!("{params}stages:\n{}", stages.concat())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        check(&text);
    }

    #[test]
    fn pipeline_shaped_yaml_never_panics(text in pipeline_like()) {
        check(&text);
    }

    #[test]
    fn image_headers_are_refused_exactly_over_the_limit(width in sizes(), height in sizes()) {
        use dreampipe::imagefile::{MAX_PIXELS, MAX_SIDE, check, decode_rgb, png_header};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        std::fs::write(&path, png_header(width, height)).unwrap();
        let over = width > MAX_SIDE || height > MAX_SIDE
            || u64::from(width) * u64::from(height) > MAX_PIXELS;
        let checked = check(&path);
        prop_assert_eq!(checked.is_err(), over || width == 0 || height == 0, "{:?}", checked);
        let png_valid = width.min(height) > 0 && width.max(height) < 1 << 31;
        if over && png_valid {
            prop_assert!(checked.unwrap_err().contains("over the image limit"));
        }
        if over || u64::from(width) * u64::from(height) <= 1 << 16 {
            prop_assert!(decode_rgb(&path).is_err()); // no pixel data: an error, never an abort
        }
    }

    #[test]
    fn safetensors_headers_with_any_sizes_never_panic(
        dtype in prop::sample::select(vec!["F32", "F16", "I32", "U8", "BOOL", "X9"]),
        shape in prop::collection::vec(prop_oneof![Just(-1i64), 0..5i64, Just(i64::MAX), Just(1i64 << 32)], 0..4),
        begin in prop_oneof![0..16u64, Just(u64::MAX)],
        end in prop_oneof![0..16u64, Just(u64::MAX)],
    ) {
        let header = serde_json::json!({"w": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}}).to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 16]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        std::fs::write(&file, bytes).unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = vs.root().zeros("w", &[2, 2]);
        let loaded = dreampipe::sd::weights::load_into(&vs, &file, |k| Some(k.to_string()));
        let fits = dtype == "F32" && shape == [2, 2] && begin == 0 && end == 16;
        prop_assert_eq!(loaded.is_ok(), fits, "{:?}", loaded.err().map(|e| e.to_string()));
    }

    #[test]
    fn model_configs_with_any_sizes_parse_or_fail_without_panicking(
        key in prop::sample::select(vec!["block_out_channels", "layers_per_block", "sample_size", "norm_num_groups", "cross_attention_dim", "attention_head_dim", "in_channels", "latent_channels"]),
        value in prop_oneof![Just(-1i64), 0..70i64, Just(1_000_000i64), Just(i64::MAX)],
        as_list in any::<bool>(),
    ) {
        use dreampipe::sd::unet::UNetConfig;
        use dreampipe::sd::vae::VaeConfig;
        let value = if as_list { serde_json::json!([value]) } else { serde_json::json!(value) };
        let text = serde_json::json!({ key: value }).to_string();
        let file = Path::new("m/config.json");
        let errors = [
            UNetConfig::from_json_str(&text, file).err().map(|e| e.to_string()),
            VaeConfig::from_json_str(&text, file).err().map(|e| e.to_string()),
        ];
        for message in errors.into_iter().flatten() {
            prop_assert!(message.starts_with("m/config.json: "), "{}", message);
            prop_assert!(!message.contains('\n'), "{}", message);
        }
    }
}

/// Image sides around every limit and the extremes.
fn sizes() -> impl Strategy<Value = u32> {
    prop_oneof![
        0..300u32,
        8000..8300u32,
        16_300..16_500u32,
        Just(100_000u32),
        Just(u32::MAX)
    ]
}
