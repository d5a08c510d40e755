//! The CLIP byte-level BPE tokenizer, matching transformers 5's `CLIPTokenizer` (tokenizers
//! backend): special/added tokens are split out first, then each piece is normalised (NFC,
//! whitespace runs -> one space, lowercase), split by CLIP's regex, mapped to GPT-2's byte
//! alphabet and BPE-merged with `</w>` on the last symbol; ids get bos/eos, are truncated to
//! `model_max_length` and padded with the configured pad token.
use regex::Regex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use unicode_normalization::UnicodeNormalization;

/// CLIP's pre-tokeniser pattern (transformers' CLIP converter; contractions, letter runs, single
/// digits, runs of other non-space characters).
const SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Appended to the last symbol of every word (CLIP BPE's `end_of_word_suffix`).
const END_OF_WORD: &str = "</w>";
/// Default special tokens of the CLIP vocabulary (openai/clip-vit-large-patch14).
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// `model_max_length` of every SD1.x/SD2.x tokenizer_config.json (CLIP's context length).
const DEFAULT_MAX_LENGTH: usize = 77;
/// transformers' `VERY_LARGE_INTEGER` (int(1e30)) marks "no model_max_length"; anything this big
/// is treated as unset.
const UNSET_MAX_LENGTH_SENTINEL: f64 = 1e18;
/// Upper bound accepted for model_max_length (far above any CLIP context length).
const MAX_SUPPORTED_LENGTH: u64 = 1 << 20;
/// Header line of a merges.txt written by tokenizers/transformers.
const MERGES_HEADER: &str = "#version";

/// Why a tokenizer could not be loaded or extended.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: invalid JSON: {reason}")]
    Json { file: PathBuf, reason: String },
    #[error("{file}: line {line}: expected a merge 'left right', found '{text}'")]
    MergeLine {
        file: PathBuf,
        line: usize,
        text: String,
    },
    #[error(
        "{file}: line {line}: merge result '{token}' is not in vocab.json (vocab and merges do not belong together)"
    )]
    MergeNotInVocab {
        file: PathBuf,
        line: usize,
        token: String,
    },
    #[error("{file}: {field} token '{token}' is not in vocab.json")]
    SpecialNotInVocab {
        file: PathBuf,
        field: String,
        token: String,
    },
    #[error("{file}: field '{field}' must be {expected}")]
    Field {
        file: PathBuf,
        field: String,
        expected: String,
    },
    #[error(
        "token '{token}' already exists in the vocabulary (id {id}); choose a placeholder that is not a word, e.g. '<my-token>'"
    )]
    TokenExists { token: String, id: i64 },
}

/// Token ids of one prompt, as `tokenizer(p, padding='max_length', truncation=True)` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// bos + tokens + eos, truncated and padded to `max_length` with the pad token.
    pub ids: Vec<i64>,
    /// The same without padding.
    pub ids_unpadded: Vec<i64>,
    /// Whether tokens were dropped to fit `max_length`.
    pub truncated: bool,
    /// Length including bos/eos before truncation.
    pub num_tokens_untruncated: usize,
}

/// The special tokens and limits read from tokenizer_config.json / special_tokens_map.json.
#[derive(Debug, Clone)]
struct SpecialTokens {
    bos: String,
    eos: String,
    pad: String,
    unk: String,
    /// Further tokens declared in `added_tokens_decoder` (matched in text like bos/eos).
    declared: Vec<String>,
    max_length: usize,
}

/// A CLIP BPE tokenizer.
#[derive(Debug)]
pub struct ClipTokenizer {
    vocab: HashMap<String, i64>,
    id_to_token: HashMap<i64, String>,
    merge_ranks: HashMap<(String, String), usize>,
    split: Regex,
    byte_chars: [char; 256],
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    unk_id: i64,
    max_length: usize,
    /// Tokens recognised verbatim in raw text before normalisation (bos, eos, pad, unk, ...).
    special_tokens: Vec<String>,
    /// Tokens added with `add_token` (textual inversion), matched in normalised text.
    user_tokens: Vec<String>,
    bpe_cache: Mutex<HashMap<String, Vec<i64>>>,
}

impl ClipTokenizer {
    /// Loads `vocab.json`, `merges.txt` and (when present) `tokenizer_config.json` /
    /// `special_tokens_map.json` from a diffusers `tokenizer/` folder.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let special = read_special_tokens(dir)?;
        Self::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"), special)
    }

    /// Loads a vocabulary and merges with CLIP's defaults (bos/eos/unk/pad as in SD1.x:
    /// pad = `<|endoftext|>`, max length 77).
    pub fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Self, TokenizerError> {
        Self::from_files(vocab, merges, SpecialTokens::clip_defaults())
    }

    fn from_files(
        vocab_file: &Path,
        merges_file: &Path,
        special: SpecialTokens,
    ) -> Result<Self, TokenizerError> {
        let vocab = read_vocab(vocab_file)?;
        let merge_ranks = read_merges(merges_file, &vocab)?;
        let id_of = |field: &str, token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| TokenizerError::SpecialNotInVocab {
                    file: vocab_file.to_path_buf(),
                    field: field.to_string(),
                    token: token.to_string(),
                })
        };
        let (bos_id, eos_id) = (id_of("bos", &special.bos)?, id_of("eos", &special.eos)?);
        let (pad_id, unk_id) = (id_of("pad", &special.pad)?, id_of("unk", &special.unk)?);
        let mut special_tokens = vec![special.bos, special.eos, special.pad, special.unk];
        special_tokens.extend(special.declared);
        special_tokens.retain(|token| !token.is_empty());
        special_tokens.sort();
        special_tokens.dedup();
        let id_to_token = vocab.iter().map(|(t, &id)| (id, t.clone())).collect();
        Ok(Self {
            vocab,
            id_to_token,
            merge_ranks,
            split: Regex::new(SPLIT_PATTERN).expect("SPLIT_PATTERN is a valid regex"),
            byte_chars: bytes_to_unicode(),
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            max_length: special.max_length,
            special_tokens,
            user_tokens: Vec::new(),
            bpe_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Tokenises `text` like `tokenizer(text, padding='max_length', truncation=True)`.
    pub fn encode(&self, text: &str) -> Encoding {
        let content = self.encode_without_specials(text);
        let num_tokens_untruncated = content.len() + 2;
        let keep = content.len().min(self.max_length.saturating_sub(2));
        let mut ids_unpadded = Vec::with_capacity(keep + 2);
        ids_unpadded.push(self.bos_id);
        ids_unpadded.extend_from_slice(&content[..keep]);
        ids_unpadded.push(self.eos_id);
        let mut ids = ids_unpadded.clone();
        ids.resize(self.max_length.max(ids.len()), self.pad_id);
        Encoding {
            ids,
            ids_unpadded,
            truncated: keep < content.len(),
            num_tokens_untruncated,
        }
    }

    /// Token ids of `text` without bos/eos, truncation or padding (e.g. to check that an
    /// initializer word is a single token).
    pub fn encode_without_specials(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        for piece in split_on_tokens(text, &self.special_tokens) {
            match piece {
                Piece::Token(token) => ids.push(self.token_or_unk(token)),
                Piece::Text(raw) => self.encode_normalized(&normalize(raw), &mut ids),
            }
        }
        ids
    }

    fn encode_normalized(&self, text: &str, ids: &mut Vec<i64>) {
        for piece in split_on_tokens(text, &self.user_tokens) {
            match piece {
                Piece::Token(token) => ids.push(self.token_or_unk(token)),
                Piece::Text(chunk) => {
                    for word in self.split.find_iter(chunk) {
                        ids.extend(self.bpe_word(word.as_str()));
                    }
                }
            }
        }
    }

    /// BPE ids of one pre-tokenised word (cached).
    fn bpe_word(&self, word: &str) -> Vec<i64> {
        if let Some(ids) = self.lock_cache().get(word) {
            return ids.clone();
        }
        let symbols = self.merge_symbols(self.initial_symbols(word));
        let ids: Vec<i64> = symbols.iter().map(|s| self.token_or_unk(s)).collect();
        self.lock_cache().insert(word.to_string(), ids.clone());
        ids
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<i64>>> {
        // A poisoned cache only means another thread panicked mid-insert; the map is still usable.
        self.bpe_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One symbol per byte (GPT-2 byte alphabet), `</w>` appended to the last one.
    fn initial_symbols(&self, word: &str) -> Vec<String> {
        let mut symbols: Vec<String> = word
            .bytes()
            .map(|b| self.byte_chars[usize::from(b)].to_string())
            .collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str(END_OF_WORD);
        }
        symbols
    }

    /// Repeatedly merges the adjacent pair with the lowest merge rank (leftmost on ties).
    fn merge_symbols(&self, mut symbols: Vec<String>) -> Vec<String> {
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(position, pair)| {
                    let key = (pair[0].clone(), pair[1].clone());
                    self.merge_ranks.get(&key).map(|&rank| (rank, position))
                })
                .min();
            let Some((_, position)) = best else { break };
            let right = symbols.remove(position + 1);
            symbols[position].push_str(&right);
        }
        symbols
    }

    fn token_or_unk(&self, token: &str) -> i64 {
        self.vocab.get(token).copied().unwrap_or(self.unk_id)
    }

    /// Adds a new token (textual inversion placeholder) with the next free id, matched as a
    /// whole in (lowercased) prompts. Fails if the token already exists.
    pub fn add_token(&mut self, token: &str) -> Result<i64, TokenizerError> {
        if let Some(&id) = self.vocab.get(token) {
            return Err(TokenizerError::TokenExists {
                token: token.to_string(),
                id,
            });
        }
        let id = self.len() as i64;
        self.vocab.insert(token.to_string(), id);
        self.id_to_token.insert(id, token.to_string());
        self.user_tokens.push(token.to_string());
        // Longest first so a token containing another one wins.
        self.user_tokens.sort_by_key(|t| std::cmp::Reverse(t.len()));
        self.lock_cache().clear();
        Ok(id)
    }

    /// The id of a vocabulary entry (e.g. `"dog</w>"`, `"<|endoftext|>"`, an added token).
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.vocab.get(token).copied()
    }

    /// The vocabulary entries of `ids` (unknown ids give `None`).
    pub fn tokens(&self, ids: &[i64]) -> Vec<Option<&str>> {
        ids.iter()
            .map(|id| self.id_to_token.get(id).map(String::as_str))
            .collect()
    }

    /// Vocabulary size including added tokens (`len(tokenizer)`).
    pub fn len(&self) -> usize {
        self.vocab.len()
    }

    /// Whether the vocabulary is empty (never for a loaded tokenizer).
    pub fn is_empty(&self) -> bool {
        self.vocab.is_empty()
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Padded sequence length (`model_max_length`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

impl SpecialTokens {
    fn clip_defaults() -> Self {
        Self {
            bos: DEFAULT_BOS.to_string(),
            eos: DEFAULT_EOS.to_string(),
            pad: DEFAULT_EOS.to_string(),
            unk: DEFAULT_EOS.to_string(),
            declared: Vec::new(),
            max_length: DEFAULT_MAX_LENGTH,
        }
    }
}

/// A piece of text: either verbatim text to tokenise or a whole added/special token.
enum Piece<'a> {
    Text(&'a str),
    Token(&'a str),
}

/// Splits `text` at every occurrence of one of `tokens` (earliest match, longest on ties).
fn split_on_tokens<'a>(text: &'a str, tokens: &'a [String]) -> Vec<Piece<'a>> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some((start, token)) = earliest_token(rest, tokens) {
        if start > 0 {
            pieces.push(Piece::Text(&rest[..start]));
        }
        pieces.push(Piece::Token(token));
        rest = &rest[start + token.len()..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    pieces
}

fn earliest_token<'a>(text: &str, tokens: &'a [String]) -> Option<(usize, &'a str)> {
    tokens
        .iter()
        .filter_map(|token| text.find(token.as_str()).map(|at| (at, token.as_str())))
        .min_by_key(|&(at, token)| (at, std::cmp::Reverse(token.len())))
}

/// The reference normaliser: NFC, every whitespace run -> one space, per-character lowercase.
fn normalize(text: &str) -> String {
    let composed: String = text.nfc().collect();
    let mut out = String::with_capacity(composed.len());
    let mut in_space = false;
    for c in composed.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.extend(c.to_lowercase());
            in_space = false;
        }
    }
    out
}

/// GPT-2's reversible byte -> printable character table (`bytes_to_unicode`): printable Latin-1
/// bytes map to themselves, the rest to U+0100 onwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut table = ['\0'; 256];
    let mut next_extra = 0x100;
    for (byte, slot) in table.iter_mut().enumerate() {
        let byte = byte as u32;
        let code = if printable(byte) {
            byte
        } else {
            next_extra += 1;
            next_extra - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

fn read_text(file: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(file).map_err(|error| TokenizerError::Read {
        file: file.to_path_buf(),
        reason: error.to_string(),
    })
}

fn read_json(file: &Path) -> Result<serde_json::Value, TokenizerError> {
    serde_json::from_str(&read_text(file)?).map_err(|error| TokenizerError::Json {
        file: file.to_path_buf(),
        reason: error.to_string(),
    })
}

fn read_vocab(file: &Path) -> Result<HashMap<String, i64>, TokenizerError> {
    serde_json::from_str(&read_text(file)?).map_err(|error| TokenizerError::Json {
        file: file.to_path_buf(),
        reason: format!("expected an object of token -> id: {error}"),
    })
}

fn read_merges(
    file: &Path,
    vocab: &HashMap<String, i64>,
) -> Result<HashMap<(String, String), usize>, TokenizerError> {
    let text = read_text(file)?;
    let mut ranks = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        if line.is_empty() || (index == 0 && line.starts_with(MERGES_HEADER)) {
            continue;
        }
        let mut parts = line.split(' ');
        let (Some(left), Some(right), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenizerError::MergeLine {
                file: file.to_path_buf(),
                line: index + 1,
                text: line.to_string(),
            });
        };
        let merged = format!("{left}{right}");
        if !vocab.contains_key(&merged) {
            return Err(TokenizerError::MergeNotInVocab {
                file: file.to_path_buf(),
                line: index + 1,
                token: merged,
            });
        }
        let rank = ranks.len();
        ranks
            .entry((left.to_string(), right.to_string()))
            .or_insert(rank);
    }
    Ok(ranks)
}

/// Reads bos/eos/pad/unk, `added_tokens_decoder` and `model_max_length`; tokenizer_config.json
/// wins over special_tokens_map.json; missing files/fields keep CLIP's defaults.
fn read_special_tokens(dir: &Path) -> Result<SpecialTokens, TokenizerError> {
    let mut special = SpecialTokens::clip_defaults();
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let file = dir.join(name);
        if file.is_file() {
            apply_special_tokens(&mut special, &read_json(&file)?, &file)?;
        }
    }
    Ok(special)
}

fn apply_special_tokens(
    special: &mut SpecialTokens,
    json: &serde_json::Value,
    file: &Path,
) -> Result<(), TokenizerError> {
    for (field, slot) in [
        ("bos_token", &mut special.bos),
        ("eos_token", &mut special.eos),
        ("pad_token", &mut special.pad),
        ("unk_token", &mut special.unk),
    ] {
        if let Some(value) = json.get(field).filter(|v| !v.is_null()) {
            *slot = token_content(value)
                .ok_or_else(|| field_error(file, field, "a string or {\"content\": ...}"))?;
        }
    }
    if let Some(decoder) = json.get("added_tokens_decoder").and_then(|v| v.as_object()) {
        special
            .declared
            .extend(decoder.values().filter_map(token_content));
    }
    if let Some(value) = json.get("model_max_length") {
        // transformers writes a huge float sentinel when no limit is set; keep CLIP's default.
        if value
            .as_f64()
            .is_some_and(|n| n >= UNSET_MAX_LENGTH_SENTINEL)
        {
            return Ok(());
        }
        let length = value
            .as_u64()
            .filter(|n| (2..=MAX_SUPPORTED_LENGTH).contains(n))
            .ok_or_else(|| field_error(file, "model_max_length", "an integer from 2 to 1048576"))?;
        special.max_length = length as usize;
    }
    Ok(())
}

/// A token written either as a plain string or as an AddedToken object `{"content": ...}`.
fn token_content(value: &serde_json::Value) -> Option<String> {
    value
        .as_str()
        .or_else(|| value.get("content").and_then(|c| c.as_str()))
        .map(str::to_string)
}

fn field_error(file: &Path, field: &str, expected: &str) -> TokenizerError {
    TokenizerError::Field {
        file: file.to_path_buf(),
        field: field.to_string(),
        expected: expected.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let table = bytes_to_unicode();
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[0], '\u{100}');
        assert_eq!(table[b' ' as usize], '\u{120}');
        assert_eq!(table[0xAD], '\u{143}');
        assert_eq!(table[0xC3], '\u{C3}');
    }

    #[test]
    fn normalizer_collapses_whitespace_and_lowercases() {
        assert_eq!(normalize("  A\t\nB\u{a0}C  "), " a b c ");
        assert_eq!(normalize("e\u{301}"), "\u{e9}");
    }
}
