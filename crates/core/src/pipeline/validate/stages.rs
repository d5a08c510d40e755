//! The `stages:` mapping read into raw stages: stage names checked, the stage count bounded,
//! and a `use:` preset's fields merged underneath the stage's own.
use super::{Checker, RawStage};
use crate::pipeline::spec::key_text;
use crate::pipeline::sweep::MAX_TOTAL_STAGES;
use crate::pipeline::{limits, presets};

pub(super) fn too_many_stages(count: usize) -> String {
    format!(
        "the pipeline has {count} stages, over the limit of {MAX_TOTAL_STAGES}; split it into several pipelines"
    )
}

/// A name as messages show it: the first 40 characters of a very long one, then `…`.
fn short_name(name: &str) -> String {
    match name.char_indices().nth(40) {
        Some((end, _)) => format!("{}…", &name[..end]),
        None => name.to_string(),
    }
}

impl Checker<'_> {
    pub(super) fn raw_stages(&mut self, top: &serde_yaml::Mapping) -> Option<Vec<RawStage>> {
        let stages = self.stages_mapping(top)?;
        let raw = stages
            .iter()
            .filter_map(|(key, value)| self.raw_stage(key, value))
            .collect();
        Some(raw)
    }

    /// The `stages:` mapping: present, not empty, and within the stage limit.
    fn stages_mapping<'t>(
        &mut self,
        top: &'t serde_yaml::Mapping,
    ) -> Option<&'t serde_yaml::Mapping> {
        let problem = match top.get("stages") {
            Some(serde_yaml::Value::Mapping(map)) if map.len() > MAX_TOTAL_STAGES => {
                too_many_stages(map.len())
            }
            Some(serde_yaml::Value::Mapping(map)) if !map.is_empty() => return Some(map),
            Some(serde_yaml::Value::Mapping(_)) | Some(serde_yaml::Value::Null) | None => {
                "the pipeline has no stages: add a `stages:` mapping from stage name to stage"
                    .to_string()
            }
            Some(_) => "`stages` must be a mapping from stage name to stage".to_string(),
        };
        self.report(&["stages"], None, Some("stages"), problem);
        None
    }

    /// One stage's name and fields (a `use:` preset merged in); `None` when the name is not
    /// allowed or the stage is not a mapping.
    fn raw_stage(
        &mut self,
        key: &serde_yaml::Value,
        value: &serde_yaml::Value,
    ) -> Option<RawStage> {
        let name = key_text(key).unwrap_or_default();
        if let Some(problem) = limits::name_problem(&name) {
            let message = match problem.starts_with("may only") {
                true => format!("stage names {problem}"),
                false => format!("the stage name {problem}"),
            };
            self.report(&["stages", &name], Some(&short_name(&name)), None, message);
            return None;
        }
        let Some(mapping) = value.as_mapping() else {
            let message = "a stage must be a mapping with at least `kind:`".to_string();
            self.report(&["stages", &name], Some(&name), None, message);
            return None;
        };
        let fields = self.merge_preset(&name, mapping);
        Some(RawStage { name, fields })
    }

    /// The stage's fields with a `use:` preset's fields underneath.
    pub(super) fn merge_preset(
        &mut self,
        stage: &str,
        mapping: &serde_yaml::Mapping,
    ) -> Vec<(String, serde_yaml::Value)> {
        let own: Vec<(String, serde_yaml::Value)> = mapping
            .iter()
            .map(|(k, v)| (key_text(k).unwrap_or_default(), v.clone()))
            .collect();
        let Some((_, used)) = own.iter().find(|(k, _)| k == "use") else {
            return own;
        };
        let Some(preset_name) = used.as_str() else {
            self.stage_error(
                stage,
                "use",
                "expected the name of a preset in `stages/`".to_string(),
            );
            return own;
        };
        let Some(path) = presets::find(&self.dir, preset_name) else {
            self.stage_error(stage, "use", format!("no preset `stages/{preset_name}.yaml` next to the pipeline or in a parent folder"));
            return own;
        };
        let preset = match presets::read(&path) {
            Ok(preset) => preset,
            Err(message) => {
                self.stage_error(stage, "use", message);
                return own;
            }
        };
        let mut merged: Vec<(String, serde_yaml::Value)> = Vec::new();
        for (key, value) in preset {
            let key = key_text(&key).unwrap_or_default();
            if key == "use" {
                self.stage_error(
                    stage,
                    "use",
                    format!("preset `{}` may not `use:` another preset", path.display()),
                );
            } else if !own.iter().any(|(k, _)| *k == key) {
                merged.push((key, value));
            }
        }
        merged.extend(own.into_iter().filter(|(k, _)| k != "use"));
        merged
    }
}
