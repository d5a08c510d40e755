//! Every malformed pipeline under `tests/bad-pipelines/` is rejected with exactly the message in
//! its `.expected` file, without panicking. `UPDATE_EXPECTED=1` rewrites the files (review the
//! diff before committing).
use dreampipe_core::pipeline::{LoadOptions, load};
use std::path::{Path, PathBuf};

/// The issue asks for at least this many malformed pipelines.
const MINIMUM_CASES: usize = 40;

fn cases() -> Vec<PathBuf> {
    crate::at_repo_root();
    let mut list: Vec<PathBuf> = std::fs::read_dir("tests/bad-pipelines")
        .expect("tests/bad-pipelines")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    list.sort();
    list
}

fn message_for(path: &Path) -> String {
    let options = LoadOptions::new(dreampipe_kinds::registry());
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        load(path, &options).map(|_| ())
    })) {
        Ok(Ok(())) => "VALID".to_string(),
        Ok(Err(error)) => error.to_string(),
        Err(_) => "PANICKED".to_string(),
    }
}

#[test]
fn each_bad_pipeline_reports_its_expected_message() {
    let cases = cases();
    assert!(cases.len() >= MINIMUM_CASES, "only {} cases", cases.len());
    let update = std::env::var_os("UPDATE_EXPECTED").is_some();
    let mut mismatches = Vec::new();
    for case in &cases {
        let actual = message_for(case);
        assert_ne!(actual, "PANICKED", "{} panicked", case.display());
        assert_ne!(actual, "VALID", "{} was accepted", case.display());
        assert!(
            !actual.contains("Error {") && !actual.contains("Some("),
            "Debug dump in {}: {actual}",
            case.display()
        );
        let expected_path = case.with_extension("expected");
        if update {
            std::fs::write(&expected_path, format!("{actual}\n")).expect("write expected");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| format!("missing {}", expected_path.display()));
        if expected.trim_end_matches('\n') != actual {
            mismatches.push(format!(
                "{}:\n--- expected\n{expected}--- actual\n{actual}\n",
                case.display()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn set_overrides_with_bad_targets_are_reported() {
    crate::at_repo_root();
    let options = LoadOptions {
        overrides: vec![
            "nostage".to_string(),
            "b.run=x".to_string(),
            "a.rn=x".to_string(),
        ],
        ..LoadOptions::new(dreampipe_kinds::registry())
    };
    let error = dreampipe_core::pipeline::load_str(
        "stages:\n  a:\n    kind: command\n    run: echo\n",
        Path::new("p.yaml"),
        Path::new("."),
        &options,
    )
    .err()
    .expect("invalid")
    .to_string();
    assert_eq!(
        error,
        "pipeline `p.yaml` is invalid (3 errors):\n  p.yaml: --set `nostage`: expected STAGE.FIELD=VALUE (or params.NAME=VALUE)\n  p.yaml: --set `b.run=x`: no stage named `b` (expected one of: a)\n  p.yaml:2:3: stage `a`, field `rn`: unknown field for kind `command`; did you mean `run`?"
    );
}

#[test]
fn the_binary_prints_the_message_and_exits_non_zero() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_dreampipe"))
        .current_dir(crate::repo_root())
        .args([
            "--device",
            "cpu",
            "validate",
            "tests/bad-pipelines/13-unknown-kind-typo.yaml",
        ])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr,
        "error: pipeline `tests/bad-pipelines/13-unknown-kind-typo.yaml` is invalid (1 error):\n  tests/bad-pipelines/13-unknown-kind-typo.yaml:3:5: stage `a`, field `kind`: unknown stage kind `comand`; did you mean `command`?\n"
    );
}

fn load_error(text: &str, overrides: &[&str]) -> String {
    crate::at_repo_root();
    let options = LoadOptions {
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        ..LoadOptions::new(dreampipe_kinds::registry())
    };
    dreampipe_core::pipeline::load_str(text, Path::new("p.yaml"), Path::new("."), &options)
        .err()
        .expect("invalid")
        .to_string()
}

#[test]
fn set_of_an_undeclared_param_is_an_error_with_a_suggestion() {
    let text = "params:\n  greeting: hi\n  name: x\nstages:\n  a:\n    kind: command\n    run: echo ${params.greeting}\n";
    assert_eq!(
        load_error(text, &["params.gretting=bye"]),
        "pipeline `p.yaml` is invalid (1 error):\n  p.yaml: --set `params.gretting=bye`: the pipeline has no param `gretting` under `params:`; did you mean `greeting`?"
    );
    assert_eq!(
        load_error(text, &["params.zzz=1"]),
        "pipeline `p.yaml` is invalid (1 error):\n  p.yaml: --set `params.zzz=1`: the pipeline has no param `zzz` under `params:` (it declares: greeting, name)"
    );
    let bare = "stages:\n  a:\n    kind: command\n    run: echo\n";
    assert_eq!(
        load_error(bare, &["params.lr=1"]),
        "pipeline `p.yaml` is invalid (1 error):\n  p.yaml: --set `params.lr=1`: the pipeline has no param `lr` under `params:`; it declares none"
    );
}

#[test]
fn too_many_stages_are_refused_before_parsing_without_mentioning_matrix() {
    let mut text = String::from("stages:\n");
    for index in 0..20_001 {
        text.push_str(&format!("  s{index}:\n    kind: command\n    run: echo\n"));
    }
    let expected = "pipeline `p.yaml` is invalid (1 error):\n  p.yaml:1:1: `stages`: the pipeline has 20001 stages, over the limit of 20000; split it into several pipelines";
    assert_eq!(load_error(&text, &[]), expected);
    // In flow style the count comes after parsing; the message is the same.
    let flow = format!(
        "stages: {{{}}}\n",
        (0..20_001)
            .map(|i| format!("s{i}: {{kind: command, run: echo}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(load_error(&flow, &[]), expected);
}

#[test]
fn set_of_a_model_to_a_folder_that_is_no_model_names_the_field() {
    let text = "stages:\n  db:\n    kind: dreambooth\n    model: models/tiny-sd\n    instance_images: tests/fixtures\n    instance_prompt: a photo of sks dog\n";
    assert_eq!(
        load_error(text, &["db.model=/etc"]),
        "pipeline `p.yaml` is invalid (1 error):\n  p.yaml:4:5: stage `db`, field `model`: `/etc` is not a model folder (no model_index.json in it or in its `model/`); give a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), a single-file `.safetensors` checkpoint or a stage that writes one"
    );
}
