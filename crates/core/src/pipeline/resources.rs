//! What a stage holds while it runs (`resources:` on a stage) and where it runs (the
//! pipeline's `executor:` section): device slots locally, sbatch flags on Slurm. Placement
//! only, so none of it enters a stage's key.
use serde_json::Value;
use std::collections::BTreeMap;

/// The most device slots one stage may ask for.
pub const MAX_GPUS_PER_STAGE: usize = 64;

/// The fields `resources:` accepts.
pub const RESOURCE_FIELDS: [&str; 8] = [
    "gpus",
    "partition",
    "account",
    "qos",
    "time",
    "mem",
    "cpus",
    "sbatch_args",
];

/// A stage's `resources:`. `gpus` is also the local run's device slots; the rest only
/// matter on Slurm (sbatch flags). Unset fields fall back to the executor's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources {
    /// Device slots (GPUs) to hold; None: the kind's default (one for GPU kinds, none else).
    pub gpus: Option<usize>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Wall-time limit as sbatch reads it (`30`, `2:00:00`, `1-00:00:00`).
    pub time: Option<String>,
    /// Memory per node as sbatch reads it (`16G`, `32000M`).
    pub mem: Option<String>,
    /// CPUs per task.
    pub cpus: Option<usize>,
    /// Extra sbatch arguments, each one `#SBATCH` line (`--constraint=a100`).
    pub sbatch_args: Vec<String>,
}

impl Resources {
    /// How many device slots a stage of `class` holds.
    pub fn device_slots(&self, class: crate::stages::DeviceClass) -> usize {
        self.gpus.unwrap_or(match class {
            crate::stages::DeviceClass::Gpu => 1,
            crate::stages::DeviceClass::Cpu => 0,
        })
    }

    /// These resources with every unset field taken from `fallback`; extra sbatch arguments
    /// add up (the fallback's first).
    pub fn or(&self, fallback: &Resources) -> Resources {
        let pick = |mine: &Option<String>, theirs: &Option<String>| mine.clone().or(theirs.clone());
        Resources {
            gpus: self.gpus.or(fallback.gpus),
            partition: pick(&self.partition, &fallback.partition),
            account: pick(&self.account, &fallback.account),
            qos: pick(&self.qos, &fallback.qos),
            time: pick(&self.time, &fallback.time),
            mem: pick(&self.mem, &fallback.mem),
            cpus: self.cpus.or(fallback.cpus),
            sbatch_args: (fallback.sbatch_args.iter())
                .chain(&self.sbatch_args)
                .cloned()
                .collect(),
        }
    }
}

/// Which executor runs the dirty stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ExecutorKind {
    /// This machine: device slots and `--jobs`.
    #[default]
    Local,
    /// One Slurm job per dirty stage (docs/cluster.md).
    Slurm,
}

/// The pipeline's `executor:` section (command-line flags override it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecutorSpec {
    pub kind: Option<ExecutorKind>,
    /// Jobs in flight at once (Slurm) or concurrent CPU stages (local).
    pub jobs: Option<usize>,
    /// Resubmissions of a failed Slurm job.
    pub retries: Option<usize>,
    /// Resources of every stage unless its kind or itself says otherwise.
    pub resources: Resources,
    /// Resources per stage kind (`kinds: {dreambooth: {gpus: 1, time: "2:00:00"}}`).
    pub kinds: BTreeMap<String, Resources>,
}

impl ExecutorSpec {
    /// A stage's resources with the executor's defaults for its kind filled in.
    pub fn resources_for(&self, kind: &str, stage: &Resources) -> Resources {
        let by_kind = self.kinds.get(kind).cloned().unwrap_or_default();
        stage.or(&by_kind.or(&self.resources))
    }
}

/// The fields `executor:` accepts.
pub const EXECUTOR_FIELDS: [&str; 5] = ["kind", "jobs", "retries", "resources", "kinds"];

/// One problem in a `resources:` or `executor:` mapping: the dotted field and the message.
pub type FieldProblem = (String, String);

/// Reads a `resources:` mapping; `min_gpus` is 1 for kinds that run on a device. Problems
/// name the field under `prefix` (`resources.gpus`).
pub fn parse_resources(
    value: &Value,
    prefix: &str,
    min_gpus: usize,
) -> Result<Resources, Vec<FieldProblem>> {
    let Some(map) = value.as_object() else {
        let message = "must be a mapping such as `{gpus: 1}`".to_string();
        return Err(vec![(prefix.to_string(), message)]);
    };
    let mut resources = Resources::default();
    let mut problems = Vec::new();
    for (name, value) in map {
        let field = format!("{prefix}.{name}");
        if let Err(message) = set_resource(&mut resources, name, value, min_gpus) {
            problems.push((field, message));
        }
    }
    if problems.is_empty() {
        Ok(resources)
    } else {
        Err(problems)
    }
}

fn set_resource(
    resources: &mut Resources,
    name: &str,
    value: &Value,
    min_gpus: usize,
) -> Result<(), String> {
    match name {
        "gpus" => resources.gpus = Some(gpu_count(value, min_gpus)?),
        "cpus" => resources.cpus = Some(whole_number(value, 1, 4096)?),
        "partition" => resources.partition = Some(sbatch_word(value)?),
        "account" => resources.account = Some(sbatch_word(value)?),
        "qos" => resources.qos = Some(sbatch_word(value)?),
        "time" => resources.time = Some(sbatch_word(value)?),
        "mem" => resources.mem = Some(sbatch_word(value)?),
        "sbatch_args" => resources.sbatch_args = sbatch_args(value)?,
        other => {
            let hint = super::suggest::did_you_mean(other, &RESOURCE_FIELDS);
            return Err(format!("unknown resource{hint}"));
        }
    }
    Ok(())
}

fn gpu_count(value: &Value, minimum: usize) -> Result<usize, String> {
    whole_number(value, minimum, MAX_GPUS_PER_STAGE).map_err(|message| {
        let why = if minimum == 1 {
            " (this kind runs on a device)"
        } else {
            ""
        };
        format!("{message}{why}")
    })
}

fn whole_number(value: &Value, minimum: usize, maximum: usize) -> Result<usize, String> {
    match value.as_u64().map(|n| n as usize) {
        Some(n) if (minimum..=maximum).contains(&n) => Ok(n),
        _ => Err(format!(
            "must be a whole number from {minimum} to {maximum}, got {value}"
        )),
    }
}

/// A value for one sbatch flag: a string or number without spaces, quotes or newlines (it is
/// written on a `#SBATCH` line).
fn sbatch_word(value: &Value) -> Result<String, String> {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        other => return Err(format!("must be a string such as `2:00:00`, got {other}")),
    };
    if text.is_empty()
        || text
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\'')
    {
        return Err(format!(
            "`{text}` is not one sbatch value (no spaces or quotes)"
        ));
    }
    Ok(text)
}

fn sbatch_args(value: &Value) -> Result<Vec<String>, String> {
    let items = match value {
        Value::Array(items) => items.clone(),
        single => vec![single.clone()],
    };
    let mut args = Vec::new();
    for item in &items {
        match item.as_str() {
            Some(text) if text.starts_with('-') && !text.contains('\n') => {
                args.push(text.to_string())
            }
            _ => {
                return Err(format!(
                    "each item must be an sbatch option such as `--constraint=a100`, got {item}"
                ));
            }
        }
    }
    Ok(args)
}

/// Reads the pipeline's `executor:` section: what reads, and the problems (naming the field
/// under `executor`) of what does not.
pub fn parse_executor(value: &Value) -> (ExecutorSpec, Vec<FieldProblem>) {
    let Some(map) = value.as_object() else {
        let message = "must be a mapping such as `{kind: slurm}`".to_string();
        return (
            ExecutorSpec::default(),
            vec![("executor".to_string(), message)],
        );
    };
    let mut spec = ExecutorSpec::default();
    let mut problems = Vec::new();
    for (name, value) in map {
        let field = format!("executor.{name}");
        let outcome = match name.as_str() {
            "kind" => executor_kind(value).map(|kind| spec.kind = Some(kind)),
            "jobs" => whole_number(value, 1, 100_000).map(|n| spec.jobs = Some(n)),
            "retries" => whole_number(value, 0, 100).map(|n| spec.retries = Some(n)),
            "resources" => {
                match parse_resources(value, &field, 0) {
                    Ok(resources) => spec.resources = resources,
                    Err(found) => problems.extend(found),
                }
                Ok(())
            }
            "kinds" => {
                match parse_kinds(value, &field) {
                    Ok(kinds) => spec.kinds = kinds,
                    Err(found) => problems.extend(found),
                }
                Ok(())
            }
            other => {
                let hint = super::suggest::did_you_mean(other, &EXECUTOR_FIELDS);
                Err(format!("unknown executor field{hint}"))
            }
        };
        if let Err(message) = outcome {
            problems.push((field, message));
        }
    }
    (spec, problems)
}

fn executor_kind(value: &Value) -> Result<ExecutorKind, String> {
    match value.as_str() {
        Some("local") => Ok(ExecutorKind::Local),
        Some("slurm") => Ok(ExecutorKind::Slurm),
        _ => Err(format!("must be `local` or `slurm`, got {value}")),
    }
}

/// `kinds: {KIND: {resources…}}` (a kind whose resources do not read maps to none); which
/// kind names exist is checked by the caller.
fn parse_kinds(
    value: &Value,
    prefix: &str,
) -> Result<BTreeMap<String, Resources>, Vec<FieldProblem>> {
    let Some(map) = value.as_object() else {
        let message = "must map stage kinds to resources, e.g. `{dreambooth: {gpus: 1}}`";
        return Err(vec![(prefix.to_string(), message.to_string())]);
    };
    let mut kinds = BTreeMap::new();
    let mut problems = Vec::new();
    for (kind, value) in map {
        match parse_resources(value, &format!("{prefix}.{kind}"), 0) {
            Ok(resources) => {
                kinds.insert(kind.clone(), resources);
            }
            Err(found) => {
                kinds.insert(kind.clone(), Resources::default());
                problems.extend(found);
            }
        }
    }
    if problems.is_empty() {
        Ok(kinds)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stage_resources_fall_back_to_the_kind_then_the_executor() {
        let (spec, problems) = parse_executor(&json!({
            "kind": "slurm",
            "resources": {"partition": "gpu", "time": "1:00:00", "sbatch_args": ["--exclusive"]},
            "kinds": {"train": {"gpus": 1, "time": "4:00:00"}}
        }));
        assert_eq!(problems, []);
        let stage = parse_resources(
            &json!({"mem": "16G", "sbatch_args": "--constraint=a100"}),
            "resources",
            1,
        )
        .unwrap();
        let merged = spec.resources_for("train", &stage);
        assert_eq!(merged.gpus, Some(1));
        assert_eq!(merged.time.as_deref(), Some("4:00:00"));
        assert_eq!(merged.partition.as_deref(), Some("gpu"));
        assert_eq!(merged.mem.as_deref(), Some("16G"));
        assert_eq!(merged.sbatch_args, ["--exclusive", "--constraint=a100"]);
        assert_eq!(
            spec.resources_for("command", &Resources::default()).gpus,
            None
        );
    }

    #[test]
    fn bad_resources_name_each_field() {
        let problems = parse_resources(
            &json!({"gpu": 1, "time": "2 hours", "cpus": 0, "sbatch_args": ["exclusive"]}),
            "resources",
            1,
        )
        .unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "resources.cpus",
                "resources.gpu",
                "resources.sbatch_args",
                "resources.time"
            ]
        );
        assert_eq!(problems[1].1, "unknown resource; did you mean `gpus`?");
        assert_eq!(
            problems[3].1,
            "`2 hours` is not one sbatch value (no spaces or quotes)"
        );
    }
}
