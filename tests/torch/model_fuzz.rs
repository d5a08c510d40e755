//! Property tests (split from the kinds' runner_fuzz.rs, which keeps the torch-free ones):
//! safetensors headers and model configs with arbitrary sizes never panic or abort, and are
//! refused exactly when they pass a limit.
use proptest::prelude::*;
use std::path::Path;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

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
