//! Property test: arbitrary text and arbitrary YAML-shaped documents never panic load+validate,
//! and every rejection carries at least one diagnostic naming the file.
use dreampipe::pipeline::{LoadOptions, load_str};
use proptest::prelude::*;
use std::path::Path;

fn check(text: &str) {
    let result = load_str(
        text,
        Path::new("fuzz.yaml"),
        Path::new("."),
        &LoadOptions::default(),
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
}
