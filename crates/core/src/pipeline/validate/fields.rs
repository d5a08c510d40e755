//! One stage's fields against its kind's schema: the kind itself, unknown fields (with a
//! suggestion), types and ranges, missing required fields, defaults, `resources:`, and each
//! kind's rules between fields.
use super::substitution::substitute_params;
use super::typecheck::type_error;
use super::{Checker, RawStage};
use crate::pipeline::spec::{STAGE_KEYS, yaml_to_json};
use crate::pipeline::suggest::{did_you_mean, suggest};
use crate::pipeline::{Resources, StageDraft};
use crate::stages::{DeviceClass, FieldView, ParamSpec, Stage, UpstreamView};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

impl Checker<'_> {
    pub(super) fn check_stage(
        &mut self,
        raw: &RawStage,
        names: &BTreeSet<String>,
        params: &serde_json::Map<String, Value>,
        defaults: &serde_json::Map<String, Value>,
    ) -> Option<StageDraft> {
        let stage = raw.name.as_str();
        let kind = self.stage_kind(raw)?;
        let schema = kind.schema();
        let field_names: Vec<&str> = STAGE_KEYS
            .iter()
            .copied()
            .chain(schema.iter().map(|p| p.name))
            .collect();
        let mut values = serde_json::Map::new();
        let mut matrix = Vec::new();
        let mut resources = Resources::default();
        let mut ok = true;
        // Fields present (even if invalid) or suggested for a typo are not also "missing".
        let mut accounted: BTreeSet<&str> = BTreeSet::new();
        for (field, raw_value) in &raw.fields {
            if field == "kind" || field == "use" {
                continue;
            }
            accounted.insert(field.as_str());
            let value = match yaml_to_json(raw_value).and_then(|v| substitute_params(v, params)) {
                Ok(value) => value,
                Err(message) => {
                    self.stage_error(stage, field, message);
                    ok = false;
                    continue;
                }
            };
            if field == "matrix" {
                matrix = self
                    .check_matrix(stage, &value, &schema)
                    .unwrap_or_else(|| {
                        ok = false;
                        Vec::new()
                    });
            } else if field == "resources" {
                match self.check_resources(stage, &value, kind.device_class()) {
                    Some(checked) => resources = checked,
                    None => ok = false,
                }
            } else if let Some(spec) = schema.iter().find(|p| p.name == field) {
                ok &= self.check_value(stage, field, spec, &value);
                values.insert(field.clone(), value);
            } else {
                if let Some(best) = suggest(field, field_names.iter().copied()) {
                    accounted.insert(best);
                }
                let hint = did_you_mean(field, &field_names);
                self.stage_error(
                    stage,
                    field,
                    format!("unknown field for kind `{}`{hint}", kind.kind()),
                );
                ok = false;
            }
        }
        for (field, _) in &matrix {
            if values.contains_key(field) {
                self.stage_error(
                    stage,
                    field,
                    "is both set and swept in `matrix`; keep one".to_string(),
                );
                ok = false;
            }
        }
        for spec in &schema {
            let swept = matrix.iter().any(|(f, _)| f == spec.name);
            if values.contains_key(spec.name) || swept || accounted.contains(spec.name) {
                continue;
            }
            if let Some(default) = defaults.get(spec.name) {
                ok &= self.check_value(stage, spec.name, spec, default);
                values.insert(spec.name.to_string(), default.clone());
            } else if let Some(default) = &spec.default {
                values.insert(spec.name.to_string(), default.clone());
            } else {
                self.report(
                    &["stages", stage],
                    Some(stage),
                    Some(spec.name),
                    format!("missing required field ({})", spec.doc),
                );
                ok = false;
            }
        }
        let (refs, paths) = self.resolve_inputs(stage, &schema, &values, names)?;
        if !ok {
            return None;
        }
        Some(StageDraft {
            name: stage.to_string(),
            kind,
            params: values,
            matrix,
            refs,
            paths,
            resources,
        })
    }

    /// Each kind's rules between fields and against the stages its fields name
    /// ([`Stage::check_fields`](crate::stages::Stage::check_fields)), before anything runs.
    pub(super) fn check_cross_fields(&mut self, drafts: &[StageDraft]) {
        let by_name: BTreeMap<&str, &StageDraft> =
            drafts.iter().map(|d| (d.name.as_str(), d)).collect();
        for draft in drafts {
            let upstream = (draft.refs.iter())
                .map(|(field, names)| {
                    let stages = (names.iter())
                        .filter_map(|name| by_name.get(name.as_str()))
                        .map(|up| UpstreamView {
                            name: &up.name,
                            kind: up.kind.kind(),
                            params: &up.params,
                        })
                        .collect();
                    (field.clone(), stages)
                })
                .collect();
            let view = FieldView {
                params: &draft.params,
                upstream,
            };
            for (field, message) in draft.kind.check_fields(&view) {
                self.stage_error(&draft.name, field, message);
            }
        }
    }

    /// `resources:` (docs/pipelines.md "Devices", docs/cluster.md): device slots held while
    /// the stage runs (0 to MAX_GPUS_PER_STAGE; a GPU kind needs at least one) and sbatch flags.
    pub(super) fn check_resources(
        &mut self,
        stage: &str,
        value: &Value,
        class: DeviceClass,
    ) -> Option<Resources> {
        let min_gpus = usize::from(class == DeviceClass::Gpu);
        match crate::pipeline::resources::parse_resources(value, "resources", min_gpus) {
            Ok(resources) => Some(resources),
            Err(problems) => {
                for (field, message) in problems {
                    self.stage_error(stage, &field, message);
                }
                None
            }
        }
    }

    pub(super) fn stage_kind(&mut self, raw: &RawStage) -> Option<Arc<dyn Stage>> {
        let stage = raw.name.as_str();
        let Some((_, kind_value)) = raw.fields.iter().find(|(k, _)| k == "kind") else {
            if raw.fields.iter().any(|(k, _)| k == "use") {
                return None; // the `use:` preset could not be merged; that error names the cause
            }
            let hint = format!("(known kinds: {})", self.registry.names().join(", "));
            self.report(
                &["stages", stage],
                Some(stage),
                None,
                format!("missing `kind:` {hint}"),
            );
            return None;
        };
        let Some(kind) = kind_value.as_str() else {
            self.stage_error(
                stage,
                "kind",
                format!(
                    "expected the name of a stage kind (known kinds: {})",
                    self.registry.names().join(", ")
                ),
            );
            return None;
        };
        if let Some(found) = self.registry.get(kind) {
            return Some(found.clone());
        }
        let hint = did_you_mean(kind, &self.registry.names());
        self.stage_error(stage, "kind", format!("unknown stage kind `{kind}`{hint}"));
        None
    }

    /// Type and range of one value; reports and returns false when wrong.
    pub(super) fn check_value(
        &mut self,
        stage: &str,
        field: &str,
        spec: &ParamSpec,
        value: &Value,
    ) -> bool {
        match type_error(spec, value) {
            Some(message) => {
                self.stage_error(stage, field, message);
                false
            }
            None => true,
        }
    }
}
