//! `--set STAGE.FIELD=VALUE` and `--set params.NAME=VALUE`: applied to the raw stages and the
//! `params:` section before any field is checked.
use super::{Checker, RawStage};
use crate::pipeline::spec::yaml_to_json;
use crate::pipeline::suggest::{did_you_mean, suggest};
use serde_json::Value;

impl Checker<'_> {
    pub(super) fn apply_overrides(
        &mut self,
        overrides: &[String],
        stages: &mut [RawStage],
        params: &mut serde_json::Map<String, Value>,
    ) {
        for text in overrides {
            let parsed = text.split_once('=').and_then(|(target, value)| {
                target
                    .split_once('.')
                    .map(|(stage, field)| (stage, field, value))
            });
            let Some((stage, field, value_text)) =
                parsed.filter(|(s, f, _)| !s.is_empty() && !f.is_empty())
            else {
                self.report(
                    &[],
                    None,
                    None,
                    format!("--set `{text}`: expected STAGE.FIELD=VALUE (or params.NAME=VALUE)"),
                );
                continue;
            };
            let value = serde_yaml::from_str::<serde_yaml::Value>(value_text)
                .unwrap_or_else(|_| serde_yaml::Value::String(value_text.to_string()));
            if stage == "params" && !params.contains_key(field) {
                let declared: Vec<&str> = params.keys().map(String::as_str).collect();
                let hint = match suggest(field, declared.iter().copied()) {
                    Some(near) => format!("; did you mean `{near}`?"),
                    None if declared.is_empty() => "; it declares none".to_string(),
                    None => format!(" (it declares: {})", declared.join(", ")),
                };
                self.report(
                    &[],
                    None,
                    None,
                    format!(
                        "--set `{text}`: the pipeline has no param `{field}` under `params:`{hint}"
                    ),
                );
                continue;
            }
            if stage == "params" {
                match yaml_to_json(&value) {
                    Ok(json) => {
                        params.insert(field.to_string(), json);
                    }
                    Err(message) => {
                        self.report(&[], None, None, format!("--set `{text}`: {message}"))
                    }
                }
                continue;
            }
            let Some(target) = stages.iter_mut().find(|s| s.name == stage) else {
                let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
                let hint =
                    did_you_mean(stage, &names.iter().map(String::as_str).collect::<Vec<_>>());
                self.report(
                    &[],
                    None,
                    None,
                    format!("--set `{text}`: no stage named `{stage}`{hint}"),
                );
                continue;
            };
            target.fields.retain(|(k, _)| k != field);
            target.fields.push((field.to_string(), value));
        }
    }
}
