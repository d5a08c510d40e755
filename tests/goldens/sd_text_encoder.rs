//! CLIP text encoder against transformers 5.24 goldens (tests/fixtures/sd-tiny/text_encoder.*).
use dreampipe::sd::clip::{ClipError, ClipTextModel};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const MODEL_DIR: &str = "models/tiny-sd/text_encoder";
const GOLDEN: &str = "tests/fixtures/sd-tiny/text_encoder.safetensors";
/// Fixture README: text encoder outputs atol 1e-4, rtol 1e-4.
const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

fn golden() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(GOLDEN)
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.size(), expected.size(), "{what} shape");
    let actual = actual.to_kind(Kind::Float);
    let excess = ((&actual - expected).abs() - expected.abs() * RTOL - ATOL)
        .max()
        .double_value(&[]);
    let max_diff = (&actual - expected).abs().max().double_value(&[]);
    eprintln!("{what}: max diff {max_diff}");
    assert!(
        excess <= 0.0,
        "{what}: max |diff| {max_diff} exceeds atol {ATOL} rtol {RTOL}"
    );
}

fn check_against_golden(model: &ClipTextModel) {
    let golden = golden();
    let output = tch::no_grad(|| model.forward(&golden["input_ids"]).unwrap());
    assert_close(
        &output.last_hidden_state,
        &golden["last_hidden_state"],
        "last_hidden_state",
    );
    assert_close(
        &output.pooler_output,
        &golden["pooler_output"],
        "pooler_output",
    );
    assert_eq!(output.hidden_states.len(), 6);
    assert_close(
        &Tensor::stack(&output.hidden_states, 0),
        &golden["hidden_states"],
        "hidden_states",
    );
}

#[test]
fn tiny_text_encoder_matches_transformers() {
    let (_vs, model) =
        ClipTextModel::load(Path::new(MODEL_DIR), Device::Cpu, Kind::Float, None).unwrap();
    assert_eq!(model.config().num_hidden_layers, 5);
    check_against_golden(&model);
}

/// Copies config.json and writes the weights with keys rewritten by `rename` (None drops a key).
fn write_variant(
    dir: &Path,
    file_name: &str,
    rename: impl Fn(&str, Tensor) -> Option<(String, Tensor)>,
) {
    std::fs::copy(
        Path::new(MODEL_DIR).join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let tensors = Tensor::read_safetensors(Path::new(MODEL_DIR).join("model.safetensors")).unwrap();
    let rewritten: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter_map(|(key, tensor)| rename(&key, tensor))
        .collect();
    Tensor::write_safetensors(&rewritten, dir.join(file_name)).unwrap();
}

#[test]
fn weights_without_text_model_prefix_and_with_position_ids_load() {
    let dir = tempfile::tempdir().unwrap();
    write_variant(dir.path(), "model.safetensors", |key, tensor| {
        Some((key.strip_prefix("text_model.").unwrap().to_string(), tensor))
    });
    // Add the int64 position_ids buffer real SD1.x checkpoints carry.
    let mut tensors = Tensor::read_safetensors(dir.path().join("model.safetensors")).unwrap();
    tensors.push((
        "embeddings.position_ids".to_string(),
        Tensor::arange(77, (Kind::Int64, Device::Cpu)).unsqueeze(0),
    ));
    Tensor::write_safetensors(&tensors, dir.path().join("model.safetensors")).unwrap();
    let (_vs, model) = ClipTextModel::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap();
    check_against_golden(&model);
}

#[test]
fn fp16_variant_file_loads_into_float_model() {
    let dir = tempfile::tempdir().unwrap();
    write_variant(dir.path(), "model.fp16.safetensors", |key, tensor| {
        Some((key.to_string(), tensor.to_kind(Kind::Half)))
    });
    let (vs, model) =
        ClipTextModel::load(dir.path(), Device::Cpu, Kind::Float, Some("fp16")).unwrap();
    assert!(vs.variables().values().all(|t| t.kind() == Kind::Float));
    let golden = golden();
    let output = tch::no_grad(|| model.forward(&golden["input_ids"]).unwrap());
    // Half-precision weights: compare at fp16 resolution.
    let diff = (&output.last_hidden_state - &golden["last_hidden_state"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 2e-2, "fp16 weights diverge by {diff}");
    assert!(
        diff > 0.0,
        "fp16 rounding should be visible; was the fp32 file loaded?"
    );
}

#[test]
fn missing_tensor_error_names_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    write_variant(dir.path(), "model.safetensors", |key, tensor| {
        (key != "text_model.final_layer_norm.bias").then(|| (key.to_string(), tensor))
    });
    let error = ClipTextModel::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}: tensor 'text_model.final_layer_norm.bias' is missing (the model config expects it)",
            dir.path().join("model.safetensors").display()
        )
    );
}

#[test]
fn misshaped_tensor_error_names_tensor_file_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    write_variant(dir.path(), "model.safetensors", |key, tensor| {
        let tensor = if key == "text_model.encoder.layers.3.mlp.fc1.weight" {
            tensor.narrow(0, 0, 36)
        } else {
            tensor
        };
        Some((key.to_string(), tensor))
    });
    let error = ClipTextModel::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}: tensor 'text_model.encoder.layers.3.mlp.fc1.weight' has shape [36, 32], the config implies [37, 32]",
            dir.path().join("model.safetensors").display()
        )
    );
}

#[test]
fn unsupported_activation_names_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(Path::new(MODEL_DIR).join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"quick_gelu\"", "\"relu\""),
    )
    .unwrap();
    let error = ClipTextModel::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap_err();
    assert!(matches!(error, ClipError::UnsupportedActivation { .. }));
    assert_eq!(
        error.to_string(),
        format!(
            "{}: key 'hidden_act' is 'relu'; supported activations are 'quick_gelu' (SD1.x) and 'gelu' (SD2.x)",
            dir.path().join("config.json").display()
        )
    );
}

#[test]
fn appended_embedding_rows_resize_the_var_store_variable() {
    let (vs, mut model) =
        ClipTextModel::load(Path::new(MODEL_DIR), Device::Cpu, Kind::Float, None).unwrap();
    let dog_row = model
        .token_embedding()
        .get(1929)
        .unsqueeze(0)
        .detach()
        .copy();
    assert_eq!(model.append_token_embeddings(&dog_row).unwrap(), 2015);
    let variable = &vs.variables()["text_model.embeddings.token_embedding.weight"];
    assert_eq!(variable.size(), vec![2015, 32]);
    assert!(variable.requires_grad());
    assert!(variable.get(2014).equal(&dog_row.squeeze_dim(0)));
    // The placeholder id now encodes like 'dog'; out-of-range ids are an error.
    let ids = Tensor::from_slice(&[2012i64, 2014, 2013]).unsqueeze(0);
    let dog_ids = Tensor::from_slice(&[2012i64, 1929, 2013]).unsqueeze(0);
    let with_placeholder = tch::no_grad(|| model.forward(&ids).unwrap());
    let with_dog = tch::no_grad(|| model.forward(&dog_ids).unwrap());
    assert!(with_placeholder.last_hidden_state.allclose(
        &with_dog.last_hidden_state,
        0.0,
        0.0,
        false
    ));
    let too_big = Tensor::from_slice(&[2012i64, 2015]).unsqueeze(0);
    assert!(matches!(
        model.forward(&too_big),
        Err(ClipError::InputId {
            found: 2015,
            vocab_size: 2015
        })
    ));
    let bad_rows = Tensor::zeros([1, 31], (Kind::Float, Device::Cpu));
    assert!(matches!(
        model.append_token_embeddings(&bad_rows),
        Err(ClipError::EmbeddingRows { .. })
    ));
}

#[test]
fn gradients_reach_the_token_embedding() {
    let (_vs, model) =
        ClipTextModel::load(Path::new(MODEL_DIR), Device::Cpu, Kind::Float, None).unwrap();
    let ids = Tensor::from_slice(&[2012i64, 1929, 2013]).unsqueeze(0);
    let output = model.forward(&ids).unwrap();
    output.last_hidden_state.sum(Kind::Float).backward();
    let grad = model.token_embedding().grad();
    assert!(grad.get(1929).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert_eq!(grad.get(5).abs().sum(Kind::Float).double_value(&[]), 0.0);
}

/// Pooling position for ids [bos, placeholder(2014), eos, eos] under a config's eos_token_id.
fn pooled_position(eos_token_id: i64) -> i64 {
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(Path::new(MODEL_DIR).join("config.json")).unwrap();
    let config = config.replace(
        "\"eos_token_id\": 2013",
        &format!("\"eos_token_id\": {eos_token_id}"),
    );
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    std::fs::copy(
        Path::new(MODEL_DIR).join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let (_vs, mut model) = ClipTextModel::load(dir.path(), Device::Cpu, Kind::Float, None).unwrap();
    assert_eq!(model.config().eos_token_id, eos_token_id);
    let row = model.token_embedding().get(5).unsqueeze(0).detach().copy();
    model.append_token_embeddings(&row).unwrap();
    let ids = Tensor::from_slice(&[2012i64, 2014, 2013, 2013]).unsqueeze(0);
    let output = tch::no_grad(|| model.forward(&ids).unwrap());
    let pooled = output.pooler_output.get(0);
    let matches: Vec<i64> = (0..4)
        .filter(|&i| output.last_hidden_state.get(0).get(i).equal(&pooled))
        .collect();
    assert_eq!(matches.len(), 1);
    matches[0]
}

#[test]
fn pooling_uses_first_eos_or_legacy_argmax() {
    assert_eq!(pooled_position(2013), 2);
    // transformers' legacy rule for eos_token_id == 2: the largest id (here the placeholder).
    assert_eq!(pooled_position(2), 1);
}

fn json(path: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Tokenizer + text encoder end to end: the pipeline's `encode_prompt` goldens.
#[test]
fn tiny_folder_reproduces_pipeline_prompt_embeds() {
    use dreampipe::sd::tokenizer::ClipTokenizer;
    // pipeline.json holds Python's -Infinity elsewhere, which serde_json rejects; patch it out.
    let text = std::fs::read_to_string("tests/fixtures/sd-tiny/pipeline/pipeline.json").unwrap();
    let pipeline: serde_json::Value =
        serde_json::from_str(&text.replace("-Infinity", "null")).unwrap();
    let golden: HashMap<String, Tensor> =
        Tensor::read_safetensors("tests/fixtures/sd-tiny/pipeline/prompt_embeds.safetensors")
            .unwrap()
            .into_iter()
            .collect();
    let tokenizer = ClipTokenizer::from_dir(Path::new("models/tiny-sd/tokenizer")).unwrap();
    let (_vs, model) =
        ClipTextModel::load(Path::new(MODEL_DIR), Device::Cpu, Kind::Float, None).unwrap();
    for (prompt_key, prefix) in [("prompt", "prompt"), ("negative_prompt", "negative_prompt")] {
        let prompt = pipeline[prompt_key].as_str().unwrap();
        let ids = Tensor::from_slice(&tokenizer.encode(prompt).ids).unsqueeze(0);
        assert!(
            ids.equal(&golden[&format!("{prefix}_ids")]),
            "ids of {prompt:?}"
        );
        let output = tch::no_grad(|| model.forward(&ids).unwrap());
        assert_close(
            &output.last_hidden_state,
            &golden[&format!("{prefix}_embeds")],
            prefix,
        );
    }
}

/// The DreamBooth batch's ids come from the same tokenizer.
#[test]
fn dreambooth_prompts_tokenize_to_the_training_ids() {
    use dreampipe::sd::tokenizer::ClipTokenizer;
    let dreambooth = json("tests/fixtures/sd-tiny/training/dreambooth.json");
    let golden: HashMap<String, Tensor> =
        Tensor::read_safetensors("tests/fixtures/sd-tiny/training/dreambooth.safetensors")
            .unwrap()
            .into_iter()
            .collect();
    let tokenizer = ClipTokenizer::from_dir(Path::new("models/tiny-sd/tokenizer")).unwrap();
    let rows: Vec<Tensor> = dreambooth["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Tensor::from_slice(&tokenizer.encode(p.as_str().unwrap()).ids))
        .collect();
    assert!(Tensor::stack(&rows, 0).equal(&golden["input_ids"]));
}
