//! `SchedulerConfig`: a diffusers `scheduler_config.json` as written (every key optional), plus
//! the parsing of its string-valued options into enums. Each scheduler applies its OWN defaults
//! to absent keys (as diffusers' `X.from_config` does) and ignores keys it does not know.
use super::SchedulerError;
use serde::{Deserialize, Deserializer};
use std::path::Path;

/// A diffusers scheduler config. `None` = key absent (or `null`): the scheduler's default applies.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    /// The scheduler class the model was saved with (e.g. "PNDMScheduler").
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<i64>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub skip_prk_steps: Option<bool>,
    pub thresholding: Option<bool>,
    pub variance_type: Option<String>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    /// diffusers writes `-Infinity` here (Python's json), which we accept.
    #[serde(default, deserialize_with = "lenient_float")]
    pub lambda_min_clipped: Option<f64>,
    /// Where the config came from, for error messages ("<inline>" when not from a file).
    #[serde(skip)]
    pub source: String,
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, SchedulerError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses config JSON; `source` names it in error messages. Python's non-standard
    /// `Infinity` / `-Infinity` / `NaN` literals (written by diffusers' `save_config`) are accepted.
    pub fn from_json(text: &str, source: &str) -> Result<Self, SchedulerError> {
        let quoted = quote_python_float_literals(text);
        let mut config: Self =
            serde_json::from_str(&quoted).map_err(|error| SchedulerError::Parse {
                path: source.to_string(),
                reason: error.to_string(),
            })?;
        config.source = source.to_string();
        Ok(config)
    }

    /// The file name (or "<inline>") for error messages.
    pub(crate) fn source_name(&self) -> &str {
        if self.source.is_empty() {
            "<inline config>"
        } else {
            &self.source
        }
    }

    /// Parses the string option `key` (value `value`, or `default` when absent) against the
    /// allowed spellings; an unknown spelling is an error naming the key, the file and the choices.
    pub(crate) fn choice<T: Copy>(
        &self,
        scheduler: &'static str,
        key: &'static str,
        value: Option<&str>,
        default: &str,
        allowed: &[(&str, T)],
    ) -> Result<T, SchedulerError> {
        let value = value.unwrap_or(default);
        allowed
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, parsed)| *parsed)
            .ok_or_else(|| SchedulerError::InvalidValue {
                file: self.source_name().to_string(),
                key,
                value: value.to_string(),
                scheduler,
                expected: allowed
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Error for an option this port does not implement (set to a non-default value).
    pub(crate) fn unsupported(
        &self,
        scheduler: &'static str,
        key: &'static str,
        value: impl std::fmt::Display,
    ) -> SchedulerError {
        SchedulerError::Unsupported {
            file: self.source_name().to_string(),
            key,
            value: value.to_string(),
            scheduler,
        }
    }

    /// Fails when a boolean option this port does not implement is set to true.
    pub(crate) fn reject_true(
        &self,
        scheduler: &'static str,
        flags: &[(&'static str, Option<bool>)],
    ) -> Result<(), SchedulerError> {
        match flags.iter().find(|(_, value)| *value == Some(true)) {
            Some((key, _)) => Err(self.unsupported(scheduler, key, true)),
            None => Ok(()),
        }
    }
}

/// Turns bare `Infinity`, `-Infinity`, `NaN` (outside strings) into quoted strings so that
/// serde_json accepts the file; `lenient_float` turns them back into numbers.
fn quote_python_float_literals(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = c != '"' || escaped;
            escaped = c == '\\' && !escaped;
        } else if c == '"' {
            in_string = true;
        } else if let Some(literal) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|literal| rest.starts_with(literal))
        {
            out.push('"');
            out.push_str(literal);
            out.push('"');
            rest = &rest[literal.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A float that may also be given as "Infinity" / "-Infinity" / "NaN".
fn lenient_float<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrWord {
        Number(f64),
        Word(String),
    }
    match Option::<NumberOrWord>::deserialize(deserializer)? {
        None => Ok(None),
        Some(NumberOrWord::Number(value)) => Ok(Some(value)),
        Some(NumberOrWord::Word(word)) => match word.as_str() {
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" => Ok(Some(f64::NAN)),
            other => Err(serde::de::Error::custom(format!(
                "expected a number or Infinity/-Infinity/NaN, found \"{other}\""
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_infinity_literals_are_accepted_outside_strings_only() {
        let text = r#"{"lambda_min_clipped": -Infinity, "prediction_type": "NaN-ish Infinity"}"#;
        let config = SchedulerConfig::from_json(text, "x.json").unwrap();
        assert_eq!(config.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(config.prediction_type.as_deref(), Some("NaN-ish Infinity"));
    }

    #[test]
    fn type_errors_name_the_file() {
        let error = SchedulerConfig::from_json(r#"{"steps_offset": "one"}"#, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("cfg.json: invalid scheduler config:"),
            "{error}"
        );
    }
}
