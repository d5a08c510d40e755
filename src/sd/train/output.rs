//! Writing training results: a complete diffusers folder (model_index.json; new `unet/` and/or
//! `text_encoder/` weights as safetensors, the text encoder with `text_model.` keys; the other
//! components copied from the base model), textual-inversion embedding files in the diffusers
//! (`learned_embeds.safetensors`, SDXL's second encoder `learned_embeds_2.safetensors`) and
//! A1111 / ComfyUI (`<token>.safetensors`, key `emb_params`; SDXL `clip_l` + `clip_g`) formats,
//! and tokenizers extended with added tokens.
use super::TrainError;
use super::io_error;
use crate::sd::folder::ModelFolder;
use crate::sd::weights;
use std::path::Path;
use tch::{Kind, Tensor, nn::VarStore};

const MODEL_INDEX: &str = "model_index.json";
const CONFIG_FILE: &str = "config.json";
/// The weights file of the UNet and the VAE.
const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const TEXT_ENCODER_WEIGHTS: &str = "model.safetensors";
/// diffusers' textual-inversion output file.
pub const LEARNED_EMBEDS_FILE: &str = "learned_embeds.safetensors";
/// The key A1111 (kohya-style safetensors) and ComfyUI read from a single-key embedding file.
pub const A1111_EMBEDDING_KEY: &str = "emb_params";
/// The keys of an SDXL embedding file for A1111 / ComfyUI: first text encoder, second.
pub const A1111_SDXL_KEYS: [&str; 2] = ["clip_l", "clip_g"];
/// diffusers' textual_inversion_sdxl.py's file for the second text encoder.
pub const LEARNED_EMBEDS_2_FILE: &str = "learned_embeds_2.safetensors";

/// What replaces the base model's components in the written folder.
#[derive(Default)]
pub struct NewWeights<'a> {
    pub unet: Option<&'a VarStore>,
    /// A trained VAE.
    pub vae: Option<&'a VarStore>,
    /// The VAE config's new `scaling_factor`.
    pub vae_scaling_factor: Option<f64>,
    pub text_encoder: Option<&'a VarStore>,
    /// SDXL's second text encoder, when it trained.
    pub text_encoder_2: Option<&'a VarStore>,
    /// Tokens appended to the vocabulary, in id order (textual inversion).
    pub added_tokens: &'a [(String, i64)],
    /// Tokens appended to SDXL's second vocabulary, in id order (textual inversion).
    pub added_tokens_2: &'a [(String, i64)],
}

/// Writes a diffusers folder at `out` from `base` with `new` weights (float32). Components
/// without new weights are copied file by file.
pub fn write_model_folder(
    base: &ModelFolder,
    out: &Path,
    new: &NewWeights,
) -> Result<(), TrainError> {
    create_dir(out)?;
    copy_file(&base.root().join(MODEL_INDEX), &out.join(MODEL_INDEX))?;
    write_vae(base, out, new)?;
    copy_dir(&base.scheduler_dir(), &out.join("scheduler"))?;
    match new.unet {
        Some(vs) => write_component(
            &base.unet_dir(),
            &out.join("unet"),
            vs,
            DIFFUSERS_WEIGHTS,
            &[],
        )?,
        None => copy_dir(&base.unet_dir(), &out.join("unet"))?,
    }
    let vocab_size = vocab_edit(new.added_tokens);
    match new.text_encoder {
        Some(vs) => write_component(
            &base.text_encoder_dir(),
            &out.join("text_encoder"),
            vs,
            TEXT_ENCODER_WEIGHTS,
            &vocab_size,
        )?,
        None => copy_dir(&base.text_encoder_dir(), &out.join("text_encoder"))?,
    }
    copy_tokenizer(
        &base.tokenizer_dir(),
        &out.join("tokenizer"),
        new.added_tokens,
    )?;
    if base.is_xl() {
        let (dir, out_dir) = (base.text_encoder_2_dir(), out.join("text_encoder_2"));
        let vocab_size = vocab_edit(new.added_tokens_2);
        match new.text_encoder_2 {
            Some(vs) => write_component(&dir, &out_dir, vs, TEXT_ENCODER_WEIGHTS, &vocab_size)?,
            None => copy_dir(&dir, &out_dir)?,
        }
        let tokenizer_2 = (base.tokenizer_2_dir(), out.join("tokenizer_2"));
        copy_tokenizer(&tokenizer_2.0, &tokenizer_2.1, new.added_tokens_2)?;
    }
    Ok(())
}

/// `vae/`: the base's, or the trained weights with the config's scaling factor as given.
fn write_vae(base: &ModelFolder, out: &Path, new: &NewWeights) -> Result<(), TrainError> {
    let out_dir = out.join("vae");
    let Some(vs) = new.vae else {
        return copy_dir(&base.vae_dir(), &out_dir);
    };
    let edits: Vec<(&str, serde_json::Value)> = (new.vae_scaling_factor.iter())
        .map(|factor| ("scaling_factor", serde_json::Value::from(*factor)))
        .collect();
    write_component(&base.vae_dir(), &out_dir, vs, DIFFUSERS_WEIGHTS, &edits)
}

/// The `vocab_size` edit of a text encoder's config with `added` tokens appended (none when
/// nothing was added).
fn vocab_edit(added: &[(String, i64)]) -> Vec<(&'static str, serde_json::Value)> {
    (added.iter().map(|(_, id)| id + 1).max())
        .map(|size| ("vocab_size", serde_json::Value::from(size)))
        .into_iter()
        .collect()
}

/// A tokenizer folder copied, with `added` tokens appended to it.
fn copy_tokenizer(from: &Path, to: &Path, added: &[(String, i64)]) -> Result<(), TrainError> {
    copy_dir(from, to)?;
    if added.is_empty() {
        return Ok(());
    }
    add_tokens_to_tokenizer_dir(to, added)
}

/// `config.json` (with `edits` applied) plus the weights of `vs`.
fn write_component(
    base_dir: &Path,
    out_dir: &Path,
    vs: &VarStore,
    weights_name: &str,
    edits: &[(&str, serde_json::Value)],
) -> Result<(), TrainError> {
    create_dir(out_dir)?;
    let config_in = base_dir.join(CONFIG_FILE);
    let config_out = out_dir.join(CONFIG_FILE);
    if edits.is_empty() {
        copy_file(&config_in, &config_out)?;
    } else {
        let mut json = read_json(&config_in)?;
        for (key, value) in edits {
            json[*key] = value.clone();
        }
        write_json(&config_out, &json)?;
    }
    let file = out_dir.join(weights_name);
    weights::save_var_store(vs, &file, Some(Kind::Float)).map_err(TrainError::model)
}

/// Appends `tokens` to `vocab.json` and declares them in `tokenizer_config.json`'s
/// `added_tokens_decoder` (what transformers writes; `ClipTokenizer::from_dir` reads both).
pub fn add_tokens_to_tokenizer_dir(dir: &Path, tokens: &[(String, i64)]) -> Result<(), TrainError> {
    let vocab_file = dir.join("vocab.json");
    let mut vocab = read_json(&vocab_file)?;
    let config_file = dir.join("tokenizer_config.json");
    let mut config = if config_file.is_file() {
        read_json(&config_file)?
    } else {
        serde_json::json!({})
    };
    for (token, id) in tokens {
        vocab[token.as_str()] = serde_json::Value::from(*id);
        if !config["added_tokens_decoder"].is_object() {
            config["added_tokens_decoder"] = serde_json::json!({});
        }
        config["added_tokens_decoder"][id.to_string()] = serde_json::json!({
            "content": token,
            "lstrip": false,
            "normalized": true,
            "rstrip": false,
            "single_word": false,
            "special": false,
        });
    }
    write_json(&vocab_file, &vocab)?;
    write_json(&config_file, &config)
}

/// `learned_embeds.safetensors`: `{placeholder_token: [num_vectors, dim]}` (diffusers).
pub fn write_learned_embeds(file: &Path, token: &str, embeds: &Tensor) -> Result<(), TrainError> {
    write_tensors(
        file,
        &[(token.to_string(), embeds.detach().to_kind(Kind::Float))],
    )
}

/// An A1111 / ComfyUI embedding: one tensor `emb_params` [num_vectors, dim]; the prompt word
/// is the file name.
pub fn write_a1111_embedding(file: &Path, embeds: &Tensor) -> Result<(), TrainError> {
    write_tensors(
        file,
        &[(
            A1111_EMBEDDING_KEY.to_string(),
            embeds.detach().to_kind(Kind::Float),
        )],
    )
}

/// An SDXL embedding as A1111 and ComfyUI read it: `clip_l` [num_vectors, 768] for the first
/// text encoder and `clip_g` [num_vectors, 1280] for the second (widths of SDXL base).
pub fn write_a1111_sdxl_embedding(
    file: &Path,
    first: &Tensor,
    second: &Tensor,
) -> Result<(), TrainError> {
    let float = |t: &Tensor| t.detach().to_kind(Kind::Float);
    write_tensors(
        file,
        &[
            (A1111_SDXL_KEYS[0].to_string(), float(first)),
            (A1111_SDXL_KEYS[1].to_string(), float(second)),
        ],
    )
}

fn write_tensors(file: &Path, tensors: &[(String, Tensor)]) -> Result<(), TrainError> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    crate::sd::weights::write_safetensors(&cpu, file).map_err(TrainError::Write)
}

fn read_json(file: &Path) -> Result<serde_json::Value, TrainError> {
    let text = std::fs::read_to_string(file).map_err(|e| io_error(file, "read", e))?;
    serde_json::from_str(&text).map_err(|e| io_error(file, "parse as JSON", e))
}

fn write_json(file: &Path, value: &serde_json::Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| io_error(file, "encode", e))?;
    std::fs::write(file, text).map_err(|e| io_error(file, "write", e))
}

fn create_dir(dir: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "create the directory", e))
}

fn copy_file(from: &Path, to: &Path) -> Result<(), TrainError> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| io_error(from, "copy", e))
}

/// Copies a folder (files and subfolders).
pub fn copy_dir(from: &Path, to: &Path) -> Result<(), TrainError> {
    create_dir(to)?;
    let entries = std::fs::read_dir(from).map_err(|e| io_error(from, "list", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(from, "list", e))?;
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            copy_file(&path, &target)?;
        }
    }
    Ok(())
}
