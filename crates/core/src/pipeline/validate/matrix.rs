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
            let path = format!("matrix.{field}");
            let Some(spec) = schema.iter().find(|p| p.name == field) else {
                let names: Vec<&str> = schema.iter().map(|p| p.name).collect();
                self.stage_error(
                    stage,
                    &path,
                    format!(
                        "cannot sweep unknown field `{field}`{}",
                        did_you_mean(field, &names)
                    ),
                );
                ok = false;
                continue;
            };
            if spec.ty.is_input() {
                self.stage_error(
                    stage,
                    &path,
                    "input fields (paths, stage references) cannot be swept".to_string(),
                );
                ok = false;
                continue;
            }
            let Value::Array(list) = values else {
                self.stage_error(
                    stage,
                    &path,
                    format!(
                        "expected a list of values to sweep, found {}",
                        describe(values)
                    ),
                );
                ok = false;
                continue;
            };
            if list.is_empty() {
                self.stage_error(
                    stage,
                    &path,
                    "the list of values to sweep is empty".to_string(),
                );
                ok = false;
                continue;
            }
            for item in list {
                ok &= self.check_value(stage, &path, spec, item);
            }
            axes.push((field.clone(), list.clone()));
        }
        ok.then_some(axes)
    }
}
