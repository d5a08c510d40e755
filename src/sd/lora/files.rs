//! LoRA file layouts: parsing every supported key scheme into [`LoraWeights`], writing the
//! diffusers layout (`pytorch_lora_weights.safetensors`, what `load_lora_weights` reads) and
//! the kohya layout (`lora_kohya.safetensors`, what A1111 and ComfyUI read).
use super::{Component, LoraError, LoraModule, LoraWeights};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The file name diffusers' `save_lora_weights` / `load_lora_weights` use.
pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";
/// The kohya-layout copy dreampipe writes beside it.
pub const KOHYA_FILE: &str = "lora_kohya.safetensors";

/// The LoRA file an input names: a folder holding [`DIFFUSERS_FILE`] (a `dreambooth_lora`
/// output), or a `.safetensors` file whose tensor names are LoRA names (read from the header
/// only); `None` for anything else (a model folder, a single-file checkpoint).
pub fn lora_file_of(input: &Path) -> Option<PathBuf> {
    if input.is_dir() {
        let file = input.join(DIFFUSERS_FILE);
        return file.is_file().then_some(file);
    }
    let names = header_names(input)?;
    let is_lora = names.iter().any(|name| classify(name).is_some())
        && names
            .iter()
            .all(|name| classify(name).is_some() || name == "__metadata__");
    is_lora.then(|| input.to_path_buf())
}

/// The keys of a safetensors header (tensor names and `__metadata__`).
fn header_names(file: &Path) -> Option<Vec<String>> {
    use std::io::Read;
    /// Headers beyond this are not LoRA files worth parsing here.
    const MAX_HEADER: u64 = 64 << 20;
    let mut handle = std::fs::File::open(file).ok()?;
    let mut length = [0u8; 8];
    handle.read_exact(&mut length).ok()?;
    let length = u64::from_le_bytes(length);
    if length > MAX_HEADER {
        return None;
    }
    let mut header = vec![0u8; length as usize];
    handle.read_exact(&mut header).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(value.as_object()?.keys().cloned().collect())
}

/// Which half of a pair (or the alpha) a key holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Suffixes of the diffusers / PEFT layouts, longest first.
const DIFFUSERS_SUFFIXES: [(&str, Part); 7] = [
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".alpha", Part::Alpha),
];

const KOHYA_SUFFIXES: [(&str, Part); 3] = [
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

const KNOWN_LAYOUTS: &str = "known: diffusers/PEFT `unet.…lora_A.weight`, `unet.…lora.down.weight`, kohya `lora_unet_…lora_down.weight`; SD 1.x/2.x/XL LoRA, no LyCORIS/LoCon/DoRA";

/// The three parts of one layer as they are found.
#[derive(Default)]
struct Found {
    path: String,
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// Sorts every tensor of a file into layers; fails on a key of no known layout.
pub(super) fn parse(file: &Path, tensors: Vec<(String, Tensor)>) -> Result<LoraWeights, LoraError> {
    let mut layers: BTreeMap<(Component, String), Found> = BTreeMap::new();
    for (key, tensor) in tensors {
        let (component, path, part) = classify(&key).ok_or_else(|| LoraError::UnknownKey {
            file: file.to_path_buf(),
            key: key.clone(),
            hint: KNOWN_LAYOUTS,
        })?;
        let found = layers
            .entry((component, super::underscored(&path)))
            .or_default();
        if found.path.is_empty() || path.contains('.') {
            found.path = path;
        }
        match part {
            Part::Down => found.down = Some(tensor.to_kind(Kind::Float)),
            Part::Up => found.up = Some(tensor.to_kind(Kind::Float)),
            Part::Alpha => found.alpha = Some(tensor.to_kind(Kind::Double).double_value(&[])),
        }
    }
    let modules = layers
        .into_iter()
        .map(|((component, _), found)| complete(file, component, found))
        .collect::<Result<Vec<_>, _>>()?;
    if modules.is_empty() {
        return Err(LoraError::Empty {
            file: file.to_path_buf(),
        });
    }
    Ok(LoraWeights {
        modules,
        source: file.to_path_buf(),
    })
}

fn complete(file: &Path, component: Component, found: Found) -> Result<LoraModule, LoraError> {
    let incomplete = |problem: &str| LoraError::Incomplete {
        file: file.to_path_buf(),
        path: found.path.clone(),
        problem: problem.to_string(),
    };
    let (Some(down), Some(up)) = (&found.down, &found.up) else {
        return Err(incomplete("only one of its two matrices (down/A and up/B)"));
    };
    if down.dim() != 2 || up.dim() != 2 || up.size()[1] != down.size()[0] {
        return Err(incomplete(&format!(
            "matrices of shapes {:?} (down) and {:?} (up), which are not a rank-r pair",
            down.size(),
            up.size()
        )));
    }
    Ok(LoraModule {
        component,
        path: found.path,
        down: down.shallow_clone(),
        up: up.shallow_clone(),
        alpha: found.alpha,
    })
}

/// (component, layer path, part) of a key, or None when no layout knows it.
fn classify(key: &str) -> Option<(Component, String, Part)> {
    classify_kohya(key).or_else(|| classify_diffusers(key))
}

fn classify_kohya(key: &str) -> Option<(Component, String, Part)> {
    let (name, part) = split_suffix(key, &KOHYA_SUFFIXES)?;
    let prefixes = [
        ("lora_unet_", Component::Unet),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te_", Component::TextEncoder),
    ];
    prefixes.iter().find_map(|(prefix, component)| {
        let path = name.strip_prefix(prefix)?;
        Some((*component, path.to_string(), part))
    })
}

fn classify_diffusers(key: &str) -> Option<(Component, String, Part)> {
    let (name, part) = split_suffix(key, &DIFFUSERS_SUFFIXES)?;
    if let Some(path) = name.strip_prefix("unet.") {
        return Some((Component::Unet, path.to_string(), part));
    }
    let (component, path) = match name.strip_prefix("text_encoder_2.") {
        Some(path) => (Component::TextEncoder2, path),
        None => (Component::TextEncoder, name.strip_prefix("text_encoder.")?),
    };
    // transformers 5 names CLIPTextModel's modules without the `text_model.` level.
    let path = if path.starts_with("text_model.") {
        path.to_string()
    } else {
        format!("text_model.{path}")
    };
    Some((component, path, part))
}

fn split_suffix<'a>(key: &'a str, suffixes: &[(&str, Part)]) -> Option<(&'a str, Part)> {
    suffixes
        .iter()
        .find_map(|(suffix, part)| Some((key.strip_suffix(suffix)?, *part)))
}

/// The up matrix with `alpha / rank` folded in, for layouts that carry no alpha.
fn up_with_scaling(module: &LoraModule) -> Tensor {
    if module.alpha.is_none() || module.scaling() == 1.0 {
        module.up.shallow_clone()
    } else {
        &module.up * module.scaling()
    }
}

/// The diffusers layout, as train_dreambooth_lora.py saves it: `unet.<path>.lora.down/up.weight`
/// and `text_encoder.<path>.lora_linear_layer.down/up.weight` (module paths without
/// `text_model.`, as transformers 5 names them). It has no alphas, so `alpha / rank` is folded
/// into the up matrices (the same update for every loader).
pub fn write_diffusers(weights: &LoraWeights, file: &Path, kind: Kind) -> Result<(), LoraError> {
    let mut tensors = Vec::new();
    for module in &weights.modules {
        let (path, infix) = match module.component {
            Component::Unet => (module.path.as_str(), "lora"),
            Component::TextEncoder | Component::TextEncoder2 => (
                module
                    .path
                    .strip_prefix("text_model.")
                    .unwrap_or(&module.path),
                "lora_linear_layer",
            ),
        };
        let prefix = module.component.diffusers_prefix();
        let base = format!("{prefix}.{path}.{infix}");
        tensors.push((format!("{base}.down.weight"), module.down.to_kind(kind)));
        tensors.push((
            format!("{base}.up.weight"),
            up_with_scaling(module).to_kind(kind),
        ));
    }
    write(file, &tensors, &BTreeMap::new())
}

/// The kohya layout A1111 / ComfyUI load: `lora_unet_<path with _>` and
/// `lora_te_<path with _>` with `lora_down.weight`, `lora_up.weight` and `alpha`.
pub fn write_kohya(weights: &LoraWeights, file: &Path, kind: Kind) -> Result<(), LoraError> {
    let mut tensors = Vec::new();
    for module in &weights.modules {
        let name = format!(
            "{}_{}",
            module.component.kohya_prefix(),
            super::underscored(&module.path)
        );
        let alpha = module.alpha.unwrap_or(module.rank() as f64);
        tensors.push((
            format!("{name}.lora_down.weight"),
            module.down.to_kind(kind),
        ));
        tensors.push((format!("{name}.lora_up.weight"), module.up.to_kind(kind)));
        tensors.push((
            format!("{name}.alpha"),
            Tensor::from(alpha as f32).to_kind(kind),
        ));
    }
    let metadata = kohya_metadata(weights);
    write(file, &tensors, &metadata)
}

/// The few `ss_` header fields kohya's tools and A1111 show for a LoRA.
fn kohya_metadata(weights: &LoraWeights) -> BTreeMap<String, String> {
    let alphas: HashMap<String, ()> = weights
        .modules
        .iter()
        .map(|m| (format!("{}", m.alpha.unwrap_or(m.rank() as f64)), ()))
        .collect();
    let mut metadata = BTreeMap::new();
    metadata.insert("ss_network_module".into(), "networks.lora".into());
    metadata.insert("ss_network_dim".into(), weights.rank().to_string());
    if alphas.len() == 1 {
        let alpha = alphas.into_keys().next().unwrap_or_default();
        metadata.insert("ss_network_alpha".into(), alpha);
    }
    metadata.insert("ss_training_comment".into(), "trained by dreampipe".into());
    metadata
}

fn write(
    file: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), LoraError> {
    crate::sd::weights::write_safetensors_with_metadata(tensors, file, metadata).map_err(|reason| {
        LoraError::Write {
            file: PathBuf::from(file),
            reason,
        }
    })
}
