//! Input fields: stage references (which must name another stage) and paths (which must
//! exist, and be a model where the field takes one).
use super::Checker;
use super::typecheck::string_items;
use crate::pipeline::suggest::suggest;
use crate::stages::{ParamSpec, ParamType};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A diffusers folder, a folder whose `model/` is one (a `textual_inversion` output), or a
/// single-file `.safetensors` checkpoint (read into a folder when the stage runs).
fn is_model_folder(path: &Path) -> bool {
    path.join("model_index.json").is_file()
        || path.join("model/model_index.json").is_file()
        || (path.is_file() && path.extension().is_some_and(|e| e == "safetensors"))
}

impl Checker<'_> {
    #[allow(clippy::type_complexity)]
    pub(super) fn resolve_inputs(
        &mut self,
        stage: &str,
        schema: &[ParamSpec],
        values: &serde_json::Map<String, Value>,
        names: &BTreeSet<String>,
    ) -> Option<(
        BTreeMap<String, Vec<String>>,
        BTreeMap<String, Vec<(String, PathBuf)>>,
    )> {
        let mut refs = BTreeMap::new();
        let mut paths = BTreeMap::new();
        let mut ok = true;
        for spec in schema.iter().filter(|s| s.ty.is_input()) {
            let items = string_items(values.get(spec.name));
            let mut field_refs = Vec::new();
            let mut field_paths = Vec::new();
            for item in items {
                let either = matches!(
                    spec.ty,
                    ParamType::PathOrStageRef | ParamType::PathOrStageRefList
                );
                let as_ref = matches!(spec.ty, ParamType::StageRef | ParamType::StageRefList)
                    || (either && names.contains(&item));
                if as_ref {
                    ok &= self.check_reference(stage, spec.name, &item, names);
                    field_refs.push(item);
                } else {
                    let resolved = self.dir.join(&item);
                    if !resolved.exists() {
                        let also = if either {
                            " and is not a stage name"
                        } else {
                            ""
                        };
                        self.stage_error(stage, spec.name, format!("input `{item}` does not exist{also} (paths are relative to the pipeline's folder)"));
                        ok = false;
                    } else if spec.model && !is_model_folder(&resolved) {
                        self.stage_error(stage, spec.name, format!("`{item}` is not a model folder (no model_index.json in it or in its `model/`); give a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), a single-file `.safetensors` checkpoint or a stage that writes one"));
                        ok = false;
                    }
                    field_paths.push((item, resolved));
                }
            }
            if !field_refs.is_empty() {
                refs.insert(spec.name.to_string(), field_refs);
            }
            if !field_paths.is_empty() {
                paths.insert(spec.name.to_string(), field_paths);
            }
        }
        ok.then_some((refs, paths))
    }

    pub(super) fn check_reference(
        &mut self,
        stage: &str,
        field: &str,
        target: &str,
        names: &BTreeSet<String>,
    ) -> bool {
        if target == stage {
            self.stage_error(stage, field, "a stage cannot depend on itself".to_string());
            return false;
        }
        if names.contains(target) {
            return true;
        }
        let all: Vec<&str> = names.iter().map(String::as_str).collect();
        let hint = match suggest(target, all.iter().copied()) {
            Some(best) => format!("; did you mean `{best}`?"),
            None => String::new(),
        };
        self.stage_error(
            stage,
            field,
            format!("refers to stage `{target}`, which does not exist{hint}"),
        );
        false
    }
}
