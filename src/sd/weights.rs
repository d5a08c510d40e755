//! Loading `.safetensors` weight files into a `tch::nn::VarStore` whose variable names are the
//! diffusers/transformers key names (`down_blocks.0.resnets.1.conv1.weight`), with errors that
//! name the tensor and the file for anything missing, unexpected or mis-shaped. Files are read
//! one tensor at a time, so loading needs little memory beyond the model itself.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn, nn::VarStore};

/// Why weights could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{file}: cannot read safetensors: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error(
        "{problem} for {component} (the sizes in its config.json; try a smaller model, dtype f16/bf16, or fix the config)"
    )]
    Allocation { problem: String, component: String },
    /// A failed write, as [`write_error`] words it.
    #[error("{0}")]
    Write(String),
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
pub fn load_into(
    vs: &VarStore,
    file: &Path,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<(), WeightsError> {
    let variables = vs.variables();
    let mut pending: BTreeMap<String, ()> = variables.keys().map(|k| (k.clone(), ())).collect();
    let _guard = tch::no_grad_guard();
    for_each_tensor(file, |stored| {
        let key = stored.entry.name.clone();
        let Some(name) = rename(&key) else {
            return Ok(());
        };
        let Some(variable) = variables.get(&name) else {
            return Err(WeightsError::Unexpected {
                tensor: key,
                file: file.to_path_buf(),
            });
        };
        check_shape(variable, &stored.entry.shape, &key, file)?;
        check_dtype_class(variable.kind(), stored.entry.kind, &key, file)?;
        if reads_in_place(variable, stored.entry.kind) {
            stored.read_into_variable(variable)?;
        } else {
            let tensor = stored.read()?;
            let mut target = variable.shallow_clone();
            target.copy_(&tensor.to_kind(variable.kind()).to_device(variable.device()));
        }
        pending.remove(&name);
        Ok(())
    })?;
    match pending.into_keys().next() {
        Some(tensor) => Err(WeightsError::Missing {
            tensor,
            file: file.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Builds a model with `build` on a fresh `VarStore` on `device`, converts its parameters to
/// `kind`, then fills them from `file` (see `load_into` for `rename`).
pub fn build_and_load<M>(
    file: &Path,
    device: Device,
    kind: Kind,
    build: impl FnOnce(nn::Path) -> M,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<(VarStore, M), WeightsError> {
    let mut vs = VarStore::new(device);
    let model = allocating(file, || {
        let model = build(vs.root());
        vs.set_kind(kind);
        model
    })?;
    load_into(&vs, file, rename)?;
    Ok((vs, model))
}

/// Runs `build` (which allocates a model's parameters from its config's sizes), turning an
/// allocation failure (a libtorch panic) into [`WeightsError::Allocation`] naming the component.
pub fn allocating<T>(file: &Path, build: impl FnOnce() -> T) -> Result<T, WeightsError> {
    dreampipe_core::panics::catch(build).map_err(|problem| WeightsError::Allocation {
        problem,
        component: component_name(file),
    })
}

/// `unet` for `…/unet/diffusion_pytorch_model.safetensors`.
fn component_name(file: &Path) -> String {
    file.parent().and_then(|dir| dir.file_name()).map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().to_string(),
    )
}

/// Largest safetensors JSON header accepted (the format's own reference reader refuses more).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Key of the optional string-to-string metadata entry of a safetensors header.
const METADATA_KEY: &str = "__metadata__";

/// One tensor entry of a safetensors header.
struct TensorEntry {
    name: String,
    kind: Kind,
    shape: Vec<i64>,
    begin: u64,
    end: u64,
}

/// One tensor of a safetensors file, located but not read yet.
struct StoredTensor<'a> {
    entry: TensorEntry,
    file: &'a Path,
    handle: &'a std::fs::File,
    data_start: u64,
    /// Scratch space reused across tensors (grown only).
    buffer: &'a mut Vec<u8>,
}

impl StoredTensor<'_> {
    fn read_error(&self, reason: impl std::fmt::Display) -> WeightsError {
        WeightsError::Read {
            file: self.file.to_path_buf(),
            reason: format!("tensor '{}': {reason}", self.entry.name),
        }
    }

    fn read_bytes(&self, bytes: &mut [u8]) -> Result<(), WeightsError> {
        use std::os::unix::fs::FileExt;
        self.handle
            .read_exact_at(bytes, self.data_start + self.entry.begin)
            .map_err(|e| self.read_error(e))
    }

    /// The tensor as stored (its dtype, on the CPU).
    fn read(self) -> Result<Tensor, WeightsError> {
        let length = (self.entry.end - self.entry.begin) as usize;
        let mut buffer = std::mem::take(self.buffer);
        // Grow only: zero-filling every tensor's bytes again would cost a pass over the file.
        if buffer.len() < length {
            buffer.resize(length, 0);
        }
        self.read_bytes(&mut buffer[..length])?;
        let tensor =
            Tensor::f_from_data_size(&buffer[..length], &self.entry.shape, self.entry.kind)
                .map_err(|e| self.read_error(e));
        *self.buffer = buffer;
        tensor
    }

    /// Reads the bytes straight into `variable`'s memory (see [`reads_in_place`]): one pass
    /// over the data instead of read, wrap and copy.
    fn read_into_variable(self, variable: &Tensor) -> Result<(), WeightsError> {
        let length = (self.entry.end - self.entry.begin) as usize;
        let capacity = variable.numel() * variable.kind().elt_size_in_bytes();
        if length != capacity {
            return Err(self.read_error(format!(
                "{length} bytes in the file for a {capacity}-byte variable"
            )));
        }
        // SAFETY: `reads_in_place` checked that the variable is a contiguous CPU tensor of the
        // file's dtype and `check_shape` its shape, so its storage holds exactly `length`
        // bytes from `data_ptr`; nothing else reads or writes it while the model is loading.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(variable.data_ptr() as *mut u8, length) };
        self.read_bytes(bytes)
    }
}

/// Whether a stored tensor of `kind` can be read straight into `variable`.
fn reads_in_place(variable: &Tensor, kind: Kind) -> bool {
    variable.device() == tch::Device::Cpu
        && variable.kind() == kind
        && variable.is_contiguous()
        && variable.numel() > 0
}

/// Calls `visit` with every tensor of a safetensors file, reading the header first; the
/// visitor reads each tensor's bytes (in file order), so loading a checkpoint needs memory for
/// at most one tensor beyond its destination instead of two copies of the whole file.
fn for_each_tensor(
    file: &Path,
    mut visit: impl FnMut(StoredTensor<'_>) -> Result<(), WeightsError>,
) -> Result<(), WeightsError> {
    let read_error = |reason: String| WeightsError::Read {
        file: file.to_path_buf(),
        reason,
    };
    let handle = std::fs::File::open(file).map_err(|e| read_error(e.to_string()))?;
    let file_len = handle
        .metadata()
        .map_err(|e| read_error(e.to_string()))?
        .len();
    let (entries, data_start) = read_header(&handle, file_len).map_err(read_error)?;
    let mut buffer = Vec::new();
    for entry in entries {
        visit(StoredTensor {
            entry,
            file,
            handle: &handle,
            data_start,
            buffer: &mut buffer,
        })?;
    }
    Ok(())
}

/// Parses the header: `u64` little-endian length, then that many bytes of JSON mapping each
/// tensor name to `{dtype, shape, data_offsets: [begin, end]}` relative to the data section.
/// Returns the entries sorted by offset and where the data section starts.
fn read_header(handle: &std::fs::File, file_len: u64) -> Result<(Vec<TensorEntry>, u64), String> {
    use std::os::unix::fs::FileExt;
    let mut length_bytes = [0u8; 8];
    handle
        .read_exact_at(&mut length_bytes, 0)
        .map_err(|e| format!("header length: {e}"))?;
    let header_len = u64::from_le_bytes(length_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(format!(
            "header length {header_len} is invalid for a {file_len}-byte file"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    handle
        .read_exact_at(&mut header, 8)
        .map_err(|e| format!("header: {e}"))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("header is not a JSON object: {e}"))?;
    let data_start = 8 + header_len;
    let mut entries = json
        .iter()
        .filter(|(name, _)| name.as_str() != METADATA_KEY)
        .map(|(name, info)| parse_entry(name, info, file_len - data_start))
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|entry| entry.begin);
    Ok((entries, data_start))
}

fn parse_entry(name: &str, info: &serde_json::Value, data_len: u64) -> Result<TensorEntry, String> {
    let invalid = |what: &str| format!("tensor '{name}': invalid header entry ({what})");
    let dtype = info["dtype"].as_str().ok_or_else(|| invalid("dtype"))?;
    let kind = safetensors_kind(dtype)
        .ok_or_else(|| format!("tensor '{name}': unsupported dtype {dtype}"))?;
    let shape = info["shape"]
        .as_array()
        .and_then(|dims| dims.iter().map(|d| d.as_i64()).collect::<Option<Vec<_>>>())
        .ok_or_else(|| invalid("shape"))?;
    let offsets = info["data_offsets"]
        .as_array()
        .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
        .ok_or_else(|| invalid("data_offsets"))?;
    let (begin, end) = offsets;
    let expected = shape
        .iter()
        .try_fold(kind.elt_size_in_bytes() as u64, |bytes, &dim| {
            u64::try_from(dim).ok().and_then(|dim| bytes.checked_mul(dim))
        })
        .ok_or_else(|| format!("tensor '{name}': shape {shape:?} of {dtype} has a negative dimension or a byte size that overflows"))?;
    if end > data_len {
        return Err(format!(
            "tensor '{name}': data_offsets [{begin}, {end}] run past the {data_len}-byte data section (truncated file?)"
        ));
    }
    if begin > end || end - begin != expected {
        return Err(format!(
            "tensor '{name}': data_offsets [{begin}, {end}] do not span the {expected} bytes of {dtype} {shape:?}"
        ));
    }
    Ok(TensorEntry {
        name: name.to_string(),
        kind,
        shape,
        begin,
        end,
    })
}

/// safetensors dtype names (the format's `Dtype` enum) to libtorch kinds.
fn safetensors_kind(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "BOOL" => Kind::Bool,
        "U8" => Kind::Uint8,
        "I8" => Kind::Int8,
        "I16" => Kind::Int16,
        "I32" => Kind::Int,
        "I64" => Kind::Int64,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F32" => Kind::Float,
        "F64" => Kind::Double,
        _ => return None,
    })
}

/// A float weight must be stored as a float dtype (and an integer buffer as an integer one):
/// converting integers to floats would silently load a different model.
fn check_dtype_class(
    variable: Kind,
    stored: Kind,
    key: &str,
    file: &Path,
) -> Result<(), WeightsError> {
    let is_float = |kind: Kind| {
        matches!(
            kind,
            Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
        )
    };
    if is_float(variable) == is_float(stored) {
        return Ok(());
    }
    let class = |kind: Kind| {
        if is_float(kind) {
            "a float"
        } else {
            "an integer"
        }
    };
    Err(WeightsError::Read {
        file: file.to_path_buf(),
        reason: format!(
            "tensor '{key}' is stored as {} dtype ({}) but the model needs {} tensor; the file does not hold this model's weights",
            class(stored),
            safetensors_dtype(stored).unwrap_or("?"),
            class(variable)
        ),
    })
}

/// A stored tensor of `shape` fits `variable` only with the same shape.
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

/// Writes `tensors` as a safetensors file (any device; copied to the CPU one at a time). A
/// failure is one line naming the file, e.g. "no space left on device while writing <path>".
pub fn write_safetensors(tensors: &[(String, Tensor)], file: &Path) -> Result<(), String> {
    write_safetensors_with_metadata(tensors, file, &std::collections::BTreeMap::new())
}

/// [`write_safetensors`] with string `metadata` in the header's `__metadata__`.
pub fn write_safetensors_with_metadata(
    tensors: &[(String, Tensor)],
    file: &Path,
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".to_string(), serde_json::json!(metadata));
    }
    let mut offset = 0u64;
    for (name, tensor) in tensors {
        let dtype = safetensors_dtype(tensor.kind()).ok_or_else(|| {
            format!(
                "cannot write {}: tensor '{name}' has dtype {:?}, which safetensors cannot store",
                file.display(),
                tensor.kind()
            )
        })?;
        let bytes = (tensor.numel() * tensor.kind().elt_size_in_bytes()) as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": tensor.size(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let written = write_parts(file, &json, tensors);
    written.map_err(|error| write_error(file, &error))
}

fn write_parts(file: &Path, header: &[u8], tensors: &[(String, Tensor)]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header)?;
    for (_, tensor) in tensors {
        let cpu = tensor.to_device(Device::Cpu).contiguous();
        let length = cpu.numel() * cpu.kind().elt_size_in_bytes();
        let mut bytes = vec![0u8; length];
        cpu.f_copy_data_u8(&mut bytes, cpu.numel())
            .map_err(std::io::Error::other)?;
        out.write_all(&bytes)?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_data()
}

/// One line for a failed write: full disk and quota are named as such.
pub fn write_error(file: &Path, error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::ENOSPC) => format!("no space left on device while writing {}", file.display()),
        Some(libc::EDQUOT) => format!("disk quota exceeded while writing {}", file.display()),
        _ => format!("cannot write {}: {error}", file.display()),
    }
}

/// libtorch kinds to safetensors dtype names (the inverse of [`safetensors_kind`]).
fn safetensors_dtype(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Bool => "BOOL",
        Kind::Uint8 => "U8",
        Kind::Int8 => "I8",
        Kind::Int16 => "I16",
        Kind::Int => "I32",
        Kind::Int64 => "I64",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Float => "F32",
        Kind::Double => "F64",
        _ => return None,
    })
}

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
    write_safetensors(&converted, file).map_err(WeightsError::Write)
}
