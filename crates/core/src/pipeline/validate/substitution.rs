//! `${params.NAME}` in stage fields: a field that is exactly a reference takes the parameter's
//! value with its type; inside longer text it is substituted as text; other `${…}` are left.
use crate::pipeline::suggest::suggest;
use serde_json::Value;

/// Replaces `${params.NAME}`: a whole-string reference keeps the value's type.
pub(super) fn substitute_params(
    value: Value,
    params: &serde_json::Map<String, Value>,
) -> Result<Value, String> {
    match value {
        Value::String(text) => substitute_text(&text, params),
        Value::Array(items) => Ok(Value::Array(
            items
                .into_iter()
                .map(|v| substitute_params(v, params))
                .collect::<Result<_, _>>()?,
        )),
        Value::Object(map) => Ok(Value::Object(
            map.into_iter()
                .map(|(k, v)| substitute_params(v, params).map(|v| (k, v)))
                .collect::<Result<_, _>>()?,
        )),
        other => Ok(other),
    }
}

const PARAM_PREFIX: &str = "${params.";

fn substitute_text(text: &str, params: &serde_json::Map<String, Value>) -> Result<Value, String> {
    if !text.contains(PARAM_PREFIX) {
        return Ok(Value::String(text.to_string()));
    }
    let lookup = |name: &str| {
        params.get(name).cloned().ok_or_else(|| {
            let hint = match suggest(name, params.keys().map(String::as_str)) {
                Some(best) => format!("; did you mean `{best}`?"),
                None => " (declare it under `params:`)".to_string(),
            };
            format!("unknown parameter `${{params.{name}}}`{hint}")
        })
    };
    if let Some(name) = text
        .strip_prefix(PARAM_PREFIX)
        .and_then(|rest| rest.strip_suffix('}'))
        .filter(|n| !n.contains('}'))
    {
        return lookup(name);
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(PARAM_PREFIX) {
        out.push_str(&rest[..start]);
        let after = &rest[start + PARAM_PREFIX.len()..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed `${{params.` in \"{text}\""));
        };
        out.push_str(&crate::pipeline::display_value(&lookup(&after[..end])?));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_substitute_typed_when_whole_and_as_text_inside() {
        let params = json!({"lr": 2e-6, "steps": 400, "name": "dog"});
        let params = params.as_object().expect("object");
        assert_eq!(substitute_text("${params.steps}", params), Ok(json!(400)));
        assert_eq!(
            substitute_text("train --lr ${params.lr} ${params.name}", params),
            Ok(json!("train --lr 2e-6 dog"))
        );
        assert_eq!(
            substitute_text("echo ${HOME}", params),
            Ok(json!("echo ${HOME}"))
        );
        assert_eq!(
            substitute_text("${params.lrr}", params),
            Err("unknown parameter `${params.lrr}`; did you mean `lr`?".to_string())
        );
    }
}
