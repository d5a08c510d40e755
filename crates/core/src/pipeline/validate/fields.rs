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

/// A stage's fields as checked so far.
struct CheckedFields<'r> {
    values: serde_json::Map<String, Value>,
    matrix: Vec<(String, Vec<Value>)>,
    resources: Resources,
    /// Fields present (even if invalid) or suggested for a typo are not also "missing".
    accounted: BTreeSet<&'r str>,
    /// Fields the pipeline file does not give, set to their schema default.
    defaulted: BTreeSet<String>,
    /// No error so far.
    ok: bool,
}

impl Default for CheckedFields<'_> {
    fn default() -> Self {
        Self {
            values: serde_json::Map::new(),
            matrix: Vec::new(),
            resources: Resources::default(),
            accounted: BTreeSet::new(),
            defaulted: BTreeSet::new(),
            ok: true,
        }
    }
}

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
        let mut fields = self.check_own_fields(raw, kind.as_ref(), &schema, params);
        self.check_set_and_swept(stage, &mut fields);
        self.fill_missing(stage, &schema, defaults, &mut fields);
        let (refs, paths) = self.resolve_inputs(stage, &schema, &fields.values, names)?;
        if !fields.ok {
            return None;
        }
        Some(StageDraft {
            name: stage.to_string(),
            kind,
            params: fields.values,
            defaulted: fields.defaulted,
            matrix: fields.matrix,
            refs,
            paths,
            resources: fields.resources,
        })
    }

    /// The fields the stage sets: `matrix:`, `resources:` and schema fields, each checked.
    fn check_own_fields<'r>(
        &mut self,
        raw: &'r RawStage,
        kind: &dyn Stage,
        schema: &[ParamSpec],
        params: &serde_json::Map<String, Value>,
    ) -> CheckedFields<'r> {
        let stage = raw.name.as_str();
        let mut fields = CheckedFields::default();
        for (field, raw_value) in &raw.fields {
            if field == "kind" || field == "use" {
                continue;
            }
            fields.accounted.insert(field.as_str());
            let value = match yaml_to_json(raw_value).and_then(|v| substitute_params(v, params)) {
                Ok(value) => value,
                Err(message) => {
                    self.stage_error(stage, field, message);
                    fields.ok = false;
                    continue;
                }
            };
            if field == "matrix" {
                match self.check_matrix(stage, &value, schema) {
                    Some(axes) => fields.matrix = axes,
                    None => fields.ok = false,
                }
            } else if field == "resources" {
                match self.check_resources(stage, &value, kind.device_class()) {
                    Some(checked) => fields.resources = checked,
                    None => fields.ok = false,
                }
            } else if let Some(spec) = schema.iter().find(|p| p.name == field) {
                fields.ok &= self.check_value(stage, field, spec, &value);
                fields.values.insert(field.clone(), value);
            } else {
                self.unknown_field(stage, field, kind, schema, &mut fields);
            }
        }
        fields
    }

    /// Reports a field the kind does not have; the field it most likely means is then not
    /// also reported missing.
    fn unknown_field(
        &mut self,
        stage: &str,
        field: &str,
        kind: &dyn Stage,
        schema: &[ParamSpec],
        fields: &mut CheckedFields<'_>,
    ) {
        let field_names: Vec<&'static str> = STAGE_KEYS
            .iter()
            .copied()
            .chain(schema.iter().map(|p| p.name))
            .collect();
        if let Some(best) = suggest(field, field_names.iter().copied()) {
            fields.accounted.insert(best);
        }
        let hint = did_you_mean(field, &field_names);
        self.stage_error(
            stage,
            field,
            format!("unknown field for kind `{}`{hint}", kind.kind()),
        );
        fields.ok = false;
    }

    /// A field both set and swept is an error.
    fn check_set_and_swept(&mut self, stage: &str, fields: &mut CheckedFields<'_>) {
        for (field, _) in &fields.matrix {
            if fields.values.contains_key(field) {
                self.stage_error(
                    stage,
                    field,
                    "is both set and swept in `matrix`; keep one".to_string(),
                );
                fields.ok = false;
            }
        }
    }

    /// Schema fields the stage does not set: from `defaults:`, the schema's default, or
    /// reported missing when required.
    fn fill_missing(
        &mut self,
        stage: &str,
        schema: &[ParamSpec],
        defaults: &serde_json::Map<String, Value>,
        fields: &mut CheckedFields<'_>,
    ) {
        for spec in schema {
            let swept = fields.matrix.iter().any(|(f, _)| f == spec.name);
            let set = fields.values.contains_key(spec.name);
            if set || swept || fields.accounted.contains(spec.name) {
                continue;
            }
            if let Some(default) = defaults.get(spec.name) {
                fields.ok &= self.check_value(stage, spec.name, spec, default);
                fields.values.insert(spec.name.to_string(), default.clone());
            } else if let Some(default) = &spec.default {
                fields.values.insert(spec.name.to_string(), default.clone());
                fields.defaulted.insert(spec.name.to_string());
            } else {
                self.report(
                    &["stages", stage],
                    Some(stage),
                    Some(spec.name),
                    format!("missing required field ({})", spec.doc),
                );
                fields.ok = false;
            }
        }
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
                defaulted: &draft.defaulted,
                matrix: &draft.matrix,
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
