//! `--set STAGE.FIELD=VALUE` and `--set params.NAME=VALUE`: applied to the raw stages and the
//! `params:` section before any field is checked.
use super::{Checker, RawStage};
use crate::pipeline::spec::yaml_to_json;
use crate::pipeline::suggest::{did_you_mean, suggest};
use serde_json::Value;

impl Checker<'_> {
    /// Applies each `--set` in order; a malformed one, or one naming no param or stage, is
    /// reported and skipped.
    pub(super) fn apply_overrides(
        &mut self,
        overrides: &[String],
        stages: &mut [RawStage],
        params: &mut serde_json::Map<String, Value>,
    ) {
        for text in overrides {
            let Some((stage, field, value_text)) = parse_override(text) else {
                let message =
                    format!("--set `{text}`: expected STAGE.FIELD=VALUE (or params.NAME=VALUE)");
                self.report(&[], None, None, message);
                continue;
            };
            let value = serde_yaml::from_str::<serde_yaml::Value>(value_text)
                .unwrap_or_else(|_| serde_yaml::Value::String(value_text.to_string()));
            if stage == "params" {
                self.override_param(text, field, &value, params);
            } else {
                self.override_field(text, stage, field, value, stages);
            }
        }
    }

    /// `--set params.NAME=VALUE`: the param must be declared under `params:`.
    fn override_param(
        &mut self,
        text: &str,
        field: &str,
        value: &serde_yaml::Value,
        params: &mut serde_json::Map<String, Value>,
    ) {
        if !params.contains_key(field) {
            let declared: Vec<&str> = params.keys().map(String::as_str).collect();
            let hint = match suggest(field, declared.iter().copied()) {
                Some(near) => format!("; did you mean `{near}`?"),
                None if declared.is_empty() => "; it declares none".to_string(),
                None => format!(" (it declares: {})", declared.join(", ")),
            };
            let message = format!(
                "--set `{text}`: the pipeline has no param `{field}` under `params:`{hint}"
            );
            self.report(&[], None, None, message);
            return;
        }
        match yaml_to_json(value) {
            Ok(json) => {
                params.insert(field.to_string(), json);
            }
            Err(message) => self.report(&[], None, None, format!("--set `{text}`: {message}")),
        }
    }

    /// `--set STAGE.FIELD=VALUE`: replaces the field (checked later like any field).
    fn override_field(
        &mut self,
        text: &str,
        stage: &str,
        field: &str,
        value: serde_yaml::Value,
        stages: &mut [RawStage],
    ) {
        let Some(target) = stages.iter_mut().find(|s| s.name == stage) else {
            let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
            let hint = did_you_mean(stage, &names);
            let message = format!("--set `{text}`: no stage named `{stage}`{hint}");
            self.report(&[], None, None, message);
            return;
        };
        target.fields.retain(|(k, _)| k != field);
        target.fields.push((field.to_string(), value));
    }
}

/// `STAGE.FIELD=VALUE` split into its parts (neither STAGE nor FIELD empty).
fn parse_override(text: &str) -> Option<(&str, &str, &str)> {
    let (target, value) = text.split_once('=')?;
    let (stage, field) = target.split_once('.')?;
    (!stage.is_empty() && !field.is_empty()).then_some((stage, field, value))
}
