//! A stage's `matrix:`: each swept field must be a known, non-input field with a non-empty
//! list of values of its type.
use super::Checker;
use crate::pipeline::spec::describe;
use crate::pipeline::suggest::did_you_mean;
use crate::stages::ParamSpec;
use serde_json::Value;

impl Checker<'_> {
    pub(super) fn check_matrix(
        &mut self,
        stage: &str,
        value: &Value,
        schema: &[ParamSpec],
    ) -> Option<Vec<(String, Vec<Value>)>> {
        let Value::Object(map) = value else {
            self.stage_error(
                stage,
                "matrix",
                format!(
                    "expected a mapping from field to a list of values, found {}",
                    describe(value)
                ),
            );
            return None;
        };
        let mut axes = Vec::new();
        let mut ok = true;
        for (field, values) in map {
            match self.check_axis(stage, field, values, schema) {
                Some(list) => axes.push((field.clone(), list.clone())),
                None => ok = false,
            }
        }
        ok.then_some(axes)
    }

    /// One swept field: a known field that is not an input, with a non-empty list of values of
    /// its type (each value checked, so all are reported).
    fn check_axis<'v>(
        &mut self,
        stage: &str,
        field: &str,
        values: &'v Value,
        schema: &[ParamSpec],
    ) -> Option<&'v Vec<Value>> {
        let path = format!("matrix.{field}");
        let Some(spec) = schema.iter().find(|p| p.name == field) else {
            let names: Vec<&str> = schema.iter().map(|p| p.name).collect();
            let hint = did_you_mean(field, &names);
            let message = format!("cannot sweep unknown field `{field}`{hint}");
            self.stage_error(stage, &path, message);
            return None;
        };
        if spec.ty.is_input() {
            let message = "input fields (paths, stage references) cannot be swept".to_string();
            self.stage_error(stage, &path, message);
            return None;
        }
        let Value::Array(list) = values else {
            let found = describe(values);
            let message = format!("expected a list of values to sweep, found {found}");
            self.stage_error(stage, &path, message);
            return None;
        };
        if list.is_empty() {
            let message = "the list of values to sweep is empty".to_string();
            self.stage_error(stage, &path, message);
            return None;
        }
        let mut ok = true;
        for item in list {
            ok &= self.check_value(stage, &path, spec, item);
        }
        ok.then_some(list)
    }
}
