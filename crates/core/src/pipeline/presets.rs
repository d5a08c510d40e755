//! Stage presets: `use: NAME` merges `stages/NAME.yaml` (searched in the pipeline's folder and
//! then each parent folder) under the stage's own fields, which override it.
use std::path::{Path, PathBuf};

/// Where `stages/<name>.yaml` is, searching from `dir` upwards.
pub fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.contains("..");
    if !valid {
        return None;
    }
    dir.ancestors()
        .map(|d| d.join("stages").join(format!("{name}.yaml")))
        .find(|candidate| candidate.is_file())
}

/// Reads a preset; the error names the file.
pub fn read(path: &Path) -> Result<serde_yaml::Mapping, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read preset `{}`: {e}", path.display()))?;
    match serde_yaml::from_str::<serde_yaml::Value>(&text) {
        Ok(serde_yaml::Value::Mapping(map)) => Ok(map),
        Ok(_) => Err(format!(
            "preset `{}` must be a mapping of stage fields",
            path.display()
        )),
        Err(e) => Err(format!(
            "preset `{}` is not valid YAML: {e}",
            path.display()
        )),
    }
}
