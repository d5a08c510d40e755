//! Property tests: arbitrary text and arbitrary YAML-shaped documents never panic
//! load+validate, and every rejection carries at least one diagnostic naming the file; image
//! headers with arbitrary sizes never panic or abort, and are refused exactly when they pass a
//! limit (safetensors headers and model configs: the root package's tests/torch/model_fuzz.rs).
use dreampipe_core::pipeline::{LoadOptions, load_str};
use proptest::prelude::*;
use std::path::Path;

fn check(text: &str) {
    crate::at_repo_root();
    let result = load_str(
        text,
        Path::new("fuzz.yaml"),
        Path::new("."),
        &LoadOptions::new(dreampipe_kinds::registry()),
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
        use dreampipe_core::imagefile::{MAX_PIXELS, MAX_SIDE, check, decode_rgb, png_header};
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
