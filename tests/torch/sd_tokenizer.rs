//! CLIP tokenizer against transformers 5.24 goldens (tests/fixtures/sd-tiny/*tokenizer_cases.json).
use dreampipe::sd::tokenizer::{ClipTokenizer, TokenizerError};
use serde_json::Value;
use std::path::Path;

const FIXTURES: &str = "tests/fixtures/sd-tiny";
const TINY_TOKENIZER: &str = "models/tiny-sd/tokenizer";

fn load_cases(name: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

/// Checks every case of a cases file; returns the number of cases checked.
fn check_cases(tokenizer: &ClipTokenizer, cases_file: &str) -> usize {
    let cases = load_cases(cases_file);
    assert_eq!(tokenizer.pad_id(), cases["pad_id"].as_i64().unwrap());
    assert_eq!(tokenizer.bos_id(), cases["bos_id"].as_i64().unwrap());
    assert_eq!(tokenizer.eos_id(), cases["eos_id"].as_i64().unwrap());
    assert_eq!(
        tokenizer.len() as u64,
        cases["vocab_size"].as_u64().unwrap()
    );
    let cases = cases["cases"].as_array().unwrap();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let encoding = tokenizer.encode(prompt);
        assert_eq!(
            encoding.ids,
            ids(&case["input_ids"]),
            "input_ids of {prompt:?}"
        );
        assert_eq!(
            encoding.ids_unpadded,
            ids(&case["input_ids_unpadded"]),
            "unpadded ids of {prompt:?}"
        );
        assert_eq!(
            encoding.truncated,
            case["truncated"].as_bool().unwrap(),
            "{prompt:?}"
        );
        assert_eq!(
            encoding.num_tokens_untruncated as u64,
            case["num_tokens_untruncated"].as_u64().unwrap(),
            "{prompt:?}"
        );
        let expected_tokens: Vec<Option<&str>> = case["tokens_unpadded"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str())
            .collect();
        assert_eq!(
            tokenizer.tokens(&encoding.ids_unpadded),
            expected_tokens,
            "{prompt:?}"
        );
    }
    cases.len()
}

#[test]
fn full_clip_vocab_matches_transformers_on_every_case() {
    let dir = Path::new(FIXTURES).join("tokenizer-full");
    let tokenizer =
        ClipTokenizer::from_vocab_and_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))
            .unwrap();
    assert_eq!(check_cases(&tokenizer, "tokenizer_cases.json"), 59);
}

#[test]
fn tiny_tokenizer_folder_matches_transformers_on_every_case() {
    let tokenizer = ClipTokenizer::from_dir(Path::new(TINY_TOKENIZER)).unwrap();
    assert_eq!(tokenizer.max_length(), 77);
    assert_eq!(check_cases(&tokenizer, "tiny_tokenizer_cases.json"), 10);
}

#[test]
fn added_placeholder_token_matches_textual_inversion_ids() {
    let golden = load_cases("training/textual_inversion.json");
    let mut tokenizer = ClipTokenizer::from_dir(Path::new(TINY_TOKENIZER)).unwrap();
    let id = tokenizer.add_token("<sks>").unwrap();
    assert_eq!(id, golden["placeholder_id"].as_i64().unwrap());
    assert_eq!(
        tokenizer.len() as u64,
        golden["vocab_size_after_add"].as_u64().unwrap()
    );
    assert_eq!(tokenizer.token_id("<sks>"), Some(id));
    let encoding = tokenizer.encode(golden["prompt"].as_str().unwrap());
    assert_eq!(encoding.ids, ids(&golden["input_ids"]));
    assert_eq!(
        tokenizer.encode_without_specials("dog"),
        vec![golden["initializer_id"].as_i64().unwrap()]
    );
}

#[test]
fn adding_an_existing_token_is_an_error() {
    let mut tokenizer = ClipTokenizer::from_dir(Path::new(TINY_TOKENIZER)).unwrap();
    let error = tokenizer.add_token("dog</w>").unwrap_err();
    assert!(matches!(
        error,
        TokenizerError::TokenExists { id: 1929, .. }
    ));
    assert_eq!(
        error.to_string(),
        "token 'dog</w>' already exists in the vocabulary (id 1929); choose a placeholder that is not a word, e.g. '<my-token>'"
    );
    tokenizer.add_token("<sks>").unwrap();
    assert!(tokenizer.add_token("<sks>").is_err());
}

#[test]
fn sd2_style_pad_token_pads_with_its_id() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(Path::new(TINY_TOKENIZER).join(name), dir.path().join(name)).unwrap();
    }
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"pad_token": "!", "model_max_length": 8}"#,
    )
    .unwrap();
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    let encoding = tokenizer.encode("dog");
    assert_eq!(encoding.ids, vec![2012, 1929, 2013, 0, 0, 0, 0, 0]);
    let long = tokenizer.encode("dog dog dog dog dog dog dog");
    assert_eq!(
        long.ids,
        vec![2012, 1929, 1929, 1929, 1929, 1929, 1929, 2013]
    );
    assert!(long.truncated);
    assert_eq!(long.num_tokens_untruncated, 9);
}

#[test]
fn loading_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        missing.starts_with(&format!(
            "{}: cannot read",
            dir.path().join("vocab.json").display()
        )),
        "{missing}"
    );

    std::fs::copy(
        Path::new(TINY_TOKENIZER).join("vocab.json"),
        dir.path().join("vocab.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\ni n\nnot-a-merge\n",
    )
    .unwrap();
    let bad_line = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert_eq!(
        bad_line,
        format!(
            "{}: line 3: expected a merge 'left right', found 'not-a-merge'",
            dir.path().join("merges.txt").display()
        )
    );

    std::fs::write(dir.path().join("merges.txt"), "i n\n").unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"pad_token": "<pad>"}"#,
    )
    .unwrap();
    let bad_pad = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert_eq!(
        bad_pad,
        format!(
            "{}: pad token '<pad>' is not in vocab.json",
            dir.path().join("vocab.json").display()
        )
    );
}
