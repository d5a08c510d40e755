//! The top-level sections besides `stages:`: unknown sections, `name:`, `params:` and
//! `defaults:` mappings (a default no kind has is reported), and `executor:`.
use super::Checker;
use crate::pipeline::spec::{TOP_LEVEL_KEYS, describe, key_text, yaml_to_json};
use crate::pipeline::suggest::{did_you_mean, suggest};
use crate::pipeline::{ExecutorSpec, limits, resources};
use serde_json::Value;
use std::collections::BTreeSet;

impl Checker<'_> {
    pub(super) fn check_top_keys(&mut self, top: &serde_yaml::Mapping) {
        for key in top.keys() {
            let key = key_text(key).unwrap_or_default();
            if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
                let hint = did_you_mean(&key, &TOP_LEVEL_KEYS);
                self.report(
                    &[&key],
                    None,
                    None,
                    format!("unknown top-level section `{key}`{hint}"),
                );
            }
        }
    }

    pub(super) fn pipeline_name(&mut self, top: &serde_yaml::Mapping) -> String {
        let stem = self
            .file
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "pipeline".to_string());
        match top.get("name") {
            None => stem,
            Some(serde_yaml::Value::String(name)) if limits::name_problem(name).is_none() => {
                name.clone()
            }
            Some(value) => {
                let problem = value.as_str().and_then(limits::name_problem);
                let message = match problem {
                    Some(problem) if problem.contains("characters long") => {
                        format!("the pipeline name {problem}")
                    }
                    _ => "the pipeline name must be a string of letters, digits, `_` and `-`"
                        .to_string(),
                };
                self.report(&["name"], None, Some("name"), message);
                stem
            }
        }
    }

    /// A default that no registered stage kind has as a field is most likely a typo.
    pub(super) fn check_defaults_used(&mut self, defaults: &serde_json::Map<String, Value>) {
        let fields: BTreeSet<&'static str> = self
            .registry
            .all()
            .flat_map(|kind| kind.schema().into_iter().map(|spec| spec.name))
            .collect();
        for key in defaults.keys().filter(|k| !fields.contains(k.as_str())) {
            let hint = match suggest(key, fields.iter().copied()) {
                Some(best) => format!("; did you mean `{best}`?"),
                None => String::new(),
            };
            let message =
                format!("no stage kind has a field `{key}`, so this default applies nowhere{hint}");
            self.report(
                &["defaults", key],
                None,
                Some(&format!("defaults.{key}")),
                message,
            );
        }
    }

    pub(super) fn section_map(
        &mut self,
        top: &serde_yaml::Mapping,
        section: &str,
    ) -> serde_json::Map<String, Value> {
        match top.get(section).map(yaml_to_json) {
            None | Some(Ok(Value::Null)) => serde_json::Map::new(),
            Some(Ok(Value::Object(map))) => map,
            Some(Ok(other)) => {
                self.report(
                    &[section],
                    None,
                    Some(section),
                    format!(
                        "expected a mapping of names to values, found {}",
                        describe(&other)
                    ),
                );
                serde_json::Map::new()
            }
            Some(Err(message)) => {
                self.report(&[section], None, Some(section), message);
                serde_json::Map::new()
            }
        }
    }

    /// The `executor:` section; its `kinds:` must name known stage kinds.
    pub(super) fn executor_section(&mut self, top: &serde_yaml::Mapping) -> ExecutorSpec {
        let value = match top.get("executor").map(yaml_to_json) {
            None | Some(Ok(Value::Null)) => return ExecutorSpec::default(),
            Some(Ok(value)) => value,
            Some(Err(message)) => {
                self.report(&["executor"], None, Some("executor"), message);
                return ExecutorSpec::default();
            }
        };
        let (spec, problems) = resources::parse_executor(&value);
        for (field, message) in problems {
            let path: Vec<&str> = field.split('.').collect();
            self.report(&path, None, Some(&field), message);
        }
        for kind in spec.kinds.keys() {
            if self.registry.get(kind).is_none() {
                let names = self.registry.names();
                let hint = did_you_mean(kind, &names);
                let field = format!("executor.kinds.{kind}");
                self.report(
                    &["executor", "kinds", kind],
                    None,
                    Some(&field),
                    format!("unknown stage kind{hint}"),
                );
            }
        }
        spec
    }
}
