//! Loading `.safetensors` weight files into a `tch::nn::VarStore` whose variable names are the
//! diffusers/transformers key names (`down_blocks.0.resnets.1.conv1.weight`), with errors that
//! name the tensor and the file for anything missing, unexpected or mis-shaped.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor, nn::VarStore};

/// Why weights could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{file}: cannot read safetensors: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error(
        "{dir}: no weights file: expected {expected} (convert .bin checkpoints to .safetensors)"
    )]
    NoFile { dir: PathBuf, expected: String },
    #[error("{file}: tensor '{tensor}' is missing (the model config expects it)")]
    Missing { tensor: String, file: PathBuf },
    #[error("{file}: unexpected tensor '{tensor}' (not part of the model the config describes)")]
    Unexpected { tensor: String, file: PathBuf },
    #[error("{file}: tensor '{tensor}' has shape {found:?}, the config implies {expected:?}")]
    Shape {
        tensor: String,
        file: PathBuf,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
}

/// Finds a component's weights file: `<stem>.<variant>.safetensors` when a variant (e.g.
/// "fp16") is asked for and present, else `<stem>.safetensors`.
pub fn find_weights_file(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
) -> Result<PathBuf, WeightsError> {
    if let Some(variant) = variant {
        let with_variant = dir.join(format!("{stem}.{variant}.safetensors"));
        if with_variant.is_file() {
            return Ok(with_variant);
        }
    }
    let plain = dir.join(format!("{stem}.safetensors"));
    if plain.is_file() {
        return Ok(plain);
    }
    Err(WeightsError::NoFile {
        dir: dir.to_path_buf(),
        expected: format!("{stem}.safetensors"),
    })
}

/// Reads every tensor of a safetensors file (any float dtype; converted later).
pub fn read_tensors(file: &Path) -> Result<Vec<(String, Tensor)>, WeightsError> {
    Tensor::read_safetensors(file).map_err(|error| WeightsError::Read {
        file: file.to_path_buf(),
        reason: error.to_string(),
    })
}

/// Copies the tensors of `file` into the variables of `vs`. `rename` maps a file key to a
/// variable name, or `None` to skip it (known buffers such as `position_ids`). Every variable
/// must be filled exactly once; shapes must match; dtypes are converted to the variable's kind.
/// The file is streamed one tensor at a time (see [`StreamedSafetensors`]), so loading needs
/// the variables' memory plus one tensor, not a second copy of the whole file.
pub fn load_into(
    vs: &VarStore,
    file: &Path,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<(), WeightsError> {
    let variables = vs.variables();
    let mut pending: BTreeMap<String, ()> = variables.keys().map(|k| (k.clone(), ())).collect();
    let mut reader = StreamedSafetensors::open(file)?;
    let _guard = tch::no_grad_guard();
    for entry in reader.entries() {
        let Some(name) = rename(&entry.key) else {
            continue;
        };
        let Some(variable) = variables.get(&name) else {
            return Err(WeightsError::Unexpected {
                tensor: entry.key,
                file: file.to_path_buf(),
            });
        };
        check_shape(variable, &entry.shape, &entry.key, file)?;
        reader.copy_into(&entry, variable)?;
        pending.remove(&name);
    }
    match pending.into_keys().next() {
        Some(tensor) => Err(WeightsError::Missing {
            tensor,
            file: file.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Length of the little-endian u64 that starts a safetensors file (the header's byte count).
const HEADER_LENGTH_BYTES: usize = 8;
/// Largest header accepted (the safetensors format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// The header key that holds string metadata instead of a tensor.
const METADATA_KEY: &str = "__metadata__";

/// One tensor of a safetensors file: where its bytes are and what they hold.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub key: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// Byte range in the file.
    pub start: u64,
    pub end: u64,
}

/// A safetensors file read one tensor at a time with positioned reads into a reused buffer
/// (`Tensor::read_safetensors` materialises every tensor at once).
pub struct StreamedSafetensors {
    file: std::fs::File,
    path: PathBuf,
    entries: Vec<TensorEntry>,
    /// 8-byte words so any element type is aligned.
    buffer: Vec<u64>,
}

impl StreamedSafetensors {
    /// Opens `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let read_error = |reason: String| WeightsError::Read {
            file: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| read_error(e.to_string()))?;
        let file_len = file
            .metadata()
            .map_err(|e| read_error(e.to_string()))?
            .len();
        let mut length_bytes = [0u8; HEADER_LENGTH_BYTES];
        read_exact_at(&file, &mut length_bytes, 0).map_err(|e| read_error(e.to_string()))?;
        let header_len = u64::from_le_bytes(length_bytes);
        if header_len > MAX_HEADER_BYTES || HEADER_LENGTH_BYTES as u64 + header_len > file_len {
            return Err(read_error(format!(
                "header length {header_len} does not fit a {file_len}-byte file"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        read_exact_at(&file, &mut header, HEADER_LENGTH_BYTES as u64)
            .map_err(|e| read_error(e.to_string()))?;
        let data_start = HEADER_LENGTH_BYTES as u64 + header_len;
        let mut entries = parse_header(&header, data_start, file_len).map_err(read_error)?;
        entries.sort_by_key(|entry| entry.start);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            entries,
            buffer: Vec::new(),
        })
    }

    /// The tensors in file order.
    pub fn entries(&self) -> Vec<TensorEntry> {
        self.entries.clone()
    }

    /// Reads `entry` and copies it into `target` (converting kind and device).
    pub fn copy_into(&mut self, entry: &TensorEntry, target: &Tensor) -> Result<(), WeightsError> {
        let bytes = (entry.end - entry.start) as usize;
        let words = bytes.div_ceil(std::mem::size_of::<u64>());
        if self.buffer.len() < words {
            self.buffer.resize(words, 0);
        }
        // SAFETY: the u64 buffer has at least `bytes` initialised bytes; viewing them as u8 is valid.
        let view =
            unsafe { std::slice::from_raw_parts_mut(self.buffer.as_mut_ptr().cast::<u8>(), bytes) };
        read_exact_at(&self.file, view, entry.start).map_err(|e| WeightsError::Read {
            file: self.path.clone(),
            reason: format!("tensor '{}': {e}", entry.key),
        })?;
        let strides = contiguous_strides(&entry.shape);
        // SAFETY: the blob covers exactly `numel * element size` bytes of the 8-byte-aligned
        // buffer (checked when the header was parsed) and lives until `copy_` has returned;
        // the tensor view is dropped before the buffer is reused.
        let source = unsafe {
            Tensor::from_blob(
                view.as_ptr(),
                &entry.shape,
                &strides,
                entry.kind,
                tch::Device::Cpu,
            )
        };
        let mut target = target.shallow_clone();
        target.copy_(&source);
        Ok(())
    }
}

fn read_exact_at(file: &std::fs::File, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buffer, offset)
}

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for index in (0..shape.len().saturating_sub(1)).rev() {
        strides[index] = strides[index + 1] * shape[index + 1].max(1);
    }
    strides
}

/// The safetensors dtype names and their element kinds.
fn kind_of_dtype(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F64" => Kind::Double,
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        _ => return None,
    })
}

/// Parses the JSON header into entries with absolute byte ranges, checking each range lies in
/// the file and matches the dtype and shape.
fn parse_header(header: &[u8], data_start: u64, file_len: u64) -> Result<Vec<TensorEntry>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("header is not JSON: {e}"))?;
    let map = value.as_object().ok_or("header is not a JSON object")?;
    let mut entries = Vec::with_capacity(map.len());
    for (key, info) in map {
        if key == METADATA_KEY {
            continue;
        }
        entries.push(parse_entry(key, info, data_start, file_len)?);
    }
    Ok(entries)
}

fn parse_entry(
    key: &str,
    info: &serde_json::Value,
    data_start: u64,
    file_len: u64,
) -> Result<TensorEntry, String> {
    let bad = |what: &str| format!("tensor '{key}': {what}");
    let dtype = info["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
    let kind = kind_of_dtype(dtype).ok_or_else(|| bad(&format!("unsupported dtype {dtype}")))?;
    let shape: Vec<i64> = info["shape"]
        .as_array()
        .ok_or_else(|| bad("no shape"))?
        .iter()
        .map(|d| d.as_i64().filter(|d| *d >= 0))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("shape is not a list of sizes"))?;
    let offsets: Vec<u64> = info["data_offsets"]
        .as_array()
        .ok_or_else(|| bad("no data_offsets"))?
        .iter()
        .map(serde_json::Value::as_u64)
        .collect::<Option<_>>()
        .ok_or_else(|| bad("data_offsets are not byte offsets"))?;
    let [begin, end] = offsets[..] else {
        return Err(bad("data_offsets must hold two offsets"));
    };
    let numel: i64 = shape.iter().product();
    let expected = numel as u64 * kind.elt_size_in_bytes() as u64;
    if end < begin || end - begin != expected || data_start + end > file_len {
        return Err(bad(&format!(
            "data_offsets [{begin}, {end}] do not hold {numel} {dtype} values inside the file"
        )));
    }
    Ok(TensorEntry {
        key: key.to_string(),
        kind,
        shape,
        start: data_start + begin,
        end: data_start + end,
    })
}

fn check_shape(
    variable: &Tensor,
    shape: &[i64],
    key: &str,
    file: &Path,
) -> Result<(), WeightsError> {
    if variable.size() != shape {
        return Err(WeightsError::Shape {
            tensor: key.to_string(),
            file: file.to_path_buf(),
            expected: variable.size(),
            found: shape.to_vec(),
        });
    }
    Ok(())
}

/// Saves the variables of `vs` as safetensors (keys sorted), converting to `kind` if given.
pub fn save_var_store(vs: &VarStore, file: &Path, kind: Option<Kind>) -> Result<(), WeightsError> {
    let variables: HashMap<String, Tensor> = vs.variables();
    let mut sorted: Vec<(String, Tensor)> = variables.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let converted: Vec<(String, Tensor)> = sorted
        .into_iter()
        .map(|(name, tensor)| {
            let tensor = tensor.detach().to_device(tch::Device::Cpu);
            (
                name,
                kind.map_or(tensor.shallow_clone(), |k| tensor.to_kind(k)),
            )
        })
        .collect();
    Tensor::write_safetensors(&converted, file).map_err(|error| WeightsError::Read {
        file: file.to_path_buf(),
        reason: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Writes a safetensors file by hand: `header` JSON then `data`.
    fn handmade(dir: &Path, header: &str, data: &[u8]) -> PathBuf {
        let path = dir.join("handmade.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn streamed_load_converts_kinds_and_skips_renamed_away_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        let half = Tensor::from_slice(&[1.5f32, -2.0, 0.25, 4.0, 8.0, -0.5])
            .view([2, 3])
            .to_kind(Kind::Half);
        let ids = Tensor::from_slice(&[0i64, 1, 2]);
        Tensor::write_safetensors(&[("w", &half), ("position_ids", &ids)], &file).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().zeros("w", &[2, 3]);
        load_into(&vs, &file, |key| {
            (key != "position_ids").then(|| key.to_string())
        })
        .unwrap();
        assert_eq!(w.kind(), Kind::Float);
        let values: Vec<f32> = Vec::try_from(w.flatten(0, -1)).unwrap();
        assert_eq!(values, vec![1.5, -2.0, 0.25, 4.0, 8.0, -0.5]);
    }

    #[test]
    fn offsets_that_do_not_match_the_shape_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let header = r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,4]}}"#;
        let file = handmade(dir.path(), header, &[0u8; 24]);
        let error = StreamedSafetensors::open(&file).err().expect("rejected");
        assert_eq!(
            error.to_string(),
            format!(
                "{}: cannot read safetensors: tensor 'w': data_offsets [0, 4] do not hold 6 F32 values inside the file",
                file.display()
            )
        );
    }

    #[test]
    fn a_header_longer_than_the_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.safetensors");
        let mut bytes = 1000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, bytes).unwrap();
        let error = StreamedSafetensors::open(&path).err().expect("rejected");
        assert_eq!(
            error.to_string(),
            format!(
                "{}: cannot read safetensors: header length 1000 does not fit a 10-byte file",
                path.display()
            )
        );
    }
}
