//! Reading pipeline YAML: parse errors with line/column, YAML → JSON values, and a locator
//! that finds the line/column of a key path (serde_yaml's `Value` keeps no positions).
use serde_json::Value;
use std::collections::HashMap;

/// Top-level sections of a pipeline file.
pub const TOP_LEVEL_KEYS: [&str; 5] = ["name", "defaults", "params", "stages", "executor"];
/// Keys every stage accepts besides its kind's schema.
pub const STAGE_KEYS: [&str; 4] = ["kind", "use", "matrix", "resources"];

/// Converts YAML to JSON; mapping keys must be strings, numbers finite, no tags.
pub fn yaml_to_json(value: &serde_yaml::Value) -> Result<Value, String> {
    Ok(match value {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(*b),
        serde_yaml::Value::Number(n) => number_to_json(n)?,
        serde_yaml::Value::String(s) => Value::String(s.clone()),
        serde_yaml::Value::Sequence(items) => {
            Value::Array(items.iter().map(yaml_to_json).collect::<Result<_, _>>()?)
        }
        serde_yaml::Value::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (key, item) in map {
                let key =
                    key_text(key).ok_or_else(|| "mapping keys must be strings".to_string())?;
                out.insert(key, yaml_to_json(item)?);
            }
            Value::Object(out)
        }
        serde_yaml::Value::Tagged(tagged) => {
            return Err(format!(
                "YAML tags are not supported (found `{}`)",
                tagged.tag
            ));
        }
    })
}

fn number_to_json(n: &serde_yaml::Number) -> Result<Value, String> {
    if let Some(i) = n.as_i64() {
        return Ok(Value::from(i));
    }
    if let Some(u) = n.as_u64() {
        return Ok(Value::from(u));
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| format!("`{n}` is not a finite number"))
}

/// A mapping key as text (strings, numbers and booleans are accepted as names).
pub fn key_text(key: &serde_yaml::Value) -> Option<String> {
    match key {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Describes a value for "expected …, found …" messages.
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".to_string(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string \"{s}\""),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
    }
}

/// Line/column of block-style keys, by key path (`["stages", "db", "steps"]`).
pub struct KeyLocator {
    positions: HashMap<Vec<String>, (usize, usize)>,
}

impl KeyLocator {
    pub fn new(text: &str) -> Self {
        let mut positions = HashMap::new();
        let mut stack: Vec<(usize, String)> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let trimmed = raw.trim_start_matches(' ');
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
                continue;
            }
            let mut indent = raw.len() - trimmed.len();
            let mut content = trimmed;
            while let Some(rest) = content.strip_prefix("- ") {
                pop_to(&mut stack, indent);
                stack.push((indent, "-".to_string()));
                indent += 2;
                content = rest.trim_start_matches(' ');
            }
            let Some(key) = leading_key(content) else {
                continue;
            };
            pop_to(&mut stack, indent);
            stack.push((indent, key));
            let path: Vec<String> = stack.iter().map(|(_, k)| k.clone()).collect();
            positions.entry(path).or_insert((index + 1, indent + 1));
        }
        Self { positions }
    }

    /// How many keys the text places directly under `path` (block style only).
    pub fn count_children(&self, path: &[&str]) -> usize {
        self.positions
            .keys()
            .filter(|key| key.len() == path.len() + 1 && key.iter().zip(path).all(|(a, b)| a == b))
            .count()
    }

    /// The position of `path`, or of its nearest located ancestor.
    pub fn find(&self, path: &[&str]) -> Option<(usize, usize)> {
        (1..=path.len()).rev().find_map(|len| {
            let key: Vec<String> = path[..len].iter().map(|s| s.to_string()).collect();
            self.positions.get(&key).copied()
        })
    }
}

fn pop_to(stack: &mut Vec<(usize, String)>, indent: usize) {
    while stack.last().is_some_and(|(i, _)| *i >= indent) {
        stack.pop();
    }
}

/// `key` in `key: value` / `key:` (plain or quoted), if the line starts with one.
fn leading_key(content: &str) -> Option<String> {
    if let Some(quote) = content.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let end = content[1..].find(quote)? + 1;
        let rest = &content[end + 1..];
        return rest.starts_with(':').then(|| content[1..end].to_string());
    }
    let colon = content.find(':')?;
    let after = &content[colon + 1..];
    let key = &content[..colon];
    let plain = !key.is_empty() && !key.contains(['{', '[', '#', '"', '\'']);
    (plain && (after.is_empty() || after.starts_with(' '))).then(|| key.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_finds_nested_keys_and_list_items() {
        let text = "name: x\nstages:\n  a:\n    kind: command\n    needs:\n      - b\n  \"b c\":\n    run: x\n";
        let locator = KeyLocator::new(text);
        assert_eq!(locator.find(&["stages", "a", "kind"]), Some((4, 5)));
        assert_eq!(locator.find(&["stages", "b c", "run"]), Some((8, 5)));
        assert_eq!(locator.find(&["stages", "a", "missing"]), Some((3, 3)));
    }
}
