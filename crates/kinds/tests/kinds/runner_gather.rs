//! Runner extensions: gathering fields (every variant of a swept upstream reaches one stage,
//! named by its variant id), list parameter types (`IntegerList`, `NumberList`,
//! `PathOrStageRefList`), allowed values (`one_of`), and the content digests the runner hands
//! to stages on `ResolvedInput`.
use dreampipe_core::cache::hash::{HashMemo, tree_digest};
use dreampipe_core::cache::store::Store;
use dreampipe_core::exec::events::CancelFlag;
use dreampipe_core::exec::executor::{ExecOptions, RunRecord, execute};
use dreampipe_core::pipeline::{LoadOptions, Pipeline, load_str};
use dreampipe_core::plan::fingerprint::KeyMaterial;
use dreampipe_core::plan::graph::Plan;
use dreampipe_core::stages::params::{Input, List};
use dreampipe_core::stages::{ParamSpec, ParamType, Registry, Stage, StageContext, StageError};
use dreampipe_kinds::registry;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;

/// Writes what it received: each input (upstream, stage id, digest) and its list fields.
struct Collect;

/// The test kind's fields, typed as a real kind's are.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectParams {
    models: Input,
    base: Input,
    seeds: List<i64>,
    guidance: List<f64>,
    sampler: String,
    samplers: Vec<String>,
}

impl Stage for Collect {
    fn kind(&self) -> &'static str {
        "collect"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "test stage"
    }
    fn schema(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required("models", ParamType::PathOrStageRefList, "gathered").gathers(),
            ParamSpec::optional("base", ParamType::PathOrStageRefList, json!([]), "fans out"),
            ParamSpec::optional("seeds", ParamType::IntegerList, json!([0]), "seeds")
                .range(0.0, 100.0),
            ParamSpec::optional("guidance", ParamType::NumberList, json!(7.5), "cfg")
                .range(0.0, 30.0),
            ParamSpec::optional("sampler", ParamType::String, json!("ddim"), "sampler")
                .one_of(&["ddim", "euler-a"]),
            ParamSpec::optional("samplers", ParamType::StringList, json!([]), "samplers")
                .one_of(&["ddim", "euler-a"]),
        ]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let params: CollectParams = ctx.typed()?;
        let inputs: Vec<Value> = ctx
            .inputs
            .iter()
            .flat_map(|(field, list)| {
                list.iter().map(move |input| {
                    json!({
                        "field": field,
                        "upstream": input.upstream,
                        "stage_id": input.stage_id,
                        "label": input.label(),
                        "digest": input.digest,
                    })
                })
            })
            .collect();
        let report = json!({
            "inputs": inputs,
            "seeds": params.seeds.0,
            "guidance": params.guidance.0,
        });
        let path = ctx.out_dir.join("received.json");
        std::fs::write(&path, report.to_string()).map_err(|e| StageError::io("write", &path, e))
    }
}

fn options() -> LoadOptions {
    LoadOptions {
        overrides: vec![],
        registry: registry().with(Arc::new(Collect)),
    }
}

/// `db` sweeps two variants; `eval` (a plain reference) fans out, `collect` gathers.
const GATHER: &str = r#"
stages:
  db:
    kind: command
    matrix:
      run: ['echo one > $OUT/w', 'echo two > $OUT/w']
  eval:
    kind: command
    needs: db
    run: cp $IN_DB/w $OUT/
  collect:
    kind: collect
    models: [db, data]
    seeds: [1, 7, 42]
    guidance: 5
"#;

fn load(dir: &Path, text: &str) -> Result<Pipeline, String> {
    std::fs::create_dir_all(dir.join("data")).expect("mkdir");
    std::fs::write(dir.join("data/weights.bin"), b"folder weights").expect("write");
    load_str(text, &dir.join("p.yaml"), dir, &options()).map_err(|e| e.to_string())
}

fn run(plan: Plan, store: &Store) -> RunRecord {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (sender, _receiver) = tokio::sync::mpsc::unbounded_channel();
        let n = plan.len();
        let options = ExecOptions {
            verify: false,
            jobs: 2,
            devices: vec![dreampipe_core::device::Device::Cpu],
            selected: vec![true; n],
            forced: vec![false; n],
            locked: None,
            slurm: None,
        };
        execute(
            Arc::new(plan),
            store.clone(),
            Arc::new(HashMemo::in_memory()),
            options,
            sender,
            CancelFlag::default(),
        )
        .await
    })
}

const ONE: &str = "db[run=echo one > $OUT/w]";
const TWO: &str = "db[run=echo two > $OUT/w]";

#[test]
fn a_gathering_field_reads_every_variant_while_plain_references_fan_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = load(dir.path(), GATHER).expect("valid");
    let ids: Vec<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            ONE,
            TWO,
            "eval[run=echo one > $OUT/w]",
            "eval[run=echo two > $OUT/w]",
            "collect"
        ]
    );
    let collect = &pipeline.stages[4];
    assert_eq!(
        collect.refs["models"],
        [(ONE.to_string(), 0), (TWO.to_string(), 1)]
    );
    assert_eq!(collect.paths["models"][0].0, "data");
    let plan = Plan::new(pipeline);
    assert_eq!(plan.upstream(4), [0, 1]);
}

#[test]
fn gathered_inputs_carry_variant_ids_and_digests_and_key_every_variant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("cache")).expect("store");
    let record = run(Plan::new(load(dir.path(), GATHER).expect("valid")), &store);
    assert!(
        record.success,
        "{:?}",
        record.stages.iter().map(|s| &s.error).collect::<Vec<_>>()
    );
    let key = record.stages[4].key.clone().expect("key");
    let received: Value = serde_json::from_slice(
        &std::fs::read(store.output_dir(&key).join("received.json")).expect("received"),
    )
    .expect("json");
    let digest_of = |index: usize| record.stages[index].output_digest.clone().expect("digest");
    let folder = HashMemo::in_memory()
        .hash_tree(&dir.path().join("data"))
        .expect("hash");
    assert_eq!(
        received,
        json!({
            "inputs": [
                {"field": "models", "upstream": "db", "stage_id": ONE, "label": ONE, "digest": digest_of(0)},
                {"field": "models", "upstream": "db", "stage_id": TWO, "label": TWO, "digest": digest_of(1)},
                {"field": "models", "upstream": null, "stage_id": null, "label": "data", "digest": tree_digest(&folder)},
            ],
            "seeds": [1, 7, 42],
            "guidance": [5.0],
        })
    );
    assert_ne!(digest_of(0), digest_of(1));
    let material: KeyMaterial = store.load_key_material(&key).expect("key.json");
    let upstream: Vec<&String> = material.upstream["models"].keys().collect();
    assert_eq!(upstream, [ONE, TWO], "each variant's digest enters the key");
}

#[test]
fn gathering_keeps_only_variants_compatible_with_the_stage_own_fan_out() {
    let text = r#"
stages:
  a:
    kind: command
    matrix:
      run: ['echo a1', 'echo a2']
  b:
    kind: command
    needs: a
    matrix:
      run: ['echo b1', 'echo b2']
  collect:
    kind: collect
    base: [a]
    models: [b]
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = load(dir.path(), text);
    let pipeline = match pipeline {
        Ok(pipeline) => pipeline,
        Err(message) => panic!("{message}"),
    };
    let collects: Vec<_> = pipeline
        .stages
        .iter()
        .filter(|s| s.name == "collect")
        .collect();
    assert_eq!(collects.len(), 2, "`base` fans out over `a`");
    assert_eq!(collects[0].id, "collect[run=echo a1]");
    let gathered: Vec<&str> = collects[0].refs["models"]
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(gathered.len(), 2, "{gathered:?}");
    assert_eq!(
        gathered,
        ["b[run=echo a1,run=echo b1]", "b[run=echo a1,run=echo b2]"]
    );
}

fn first_error(text: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let message = load(dir.path(), text).err().expect("invalid");
    message
        .lines()
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn collect_with(field: &str) -> String {
    format!("stages:\n  collect:\n    kind: collect\n    models: [data]\n    {field}\n")
}

#[test]
fn list_types_and_allowed_values_are_checked_per_item() {
    let cases = [
        (
            "seeds: [1, 2.5]",
            "field `seeds`: expected an integer or a list of integers, found the number 2.5 in the list",
        ),
        (
            "seeds: [1, 200]",
            "field `seeds`: 200 is out of range: must be between 0 and 100",
        ),
        (
            "guidance: [3, 40]",
            "field `guidance`: 40 is out of range: must be between 0 and 30",
        ),
        (
            "guidance: high",
            "field `guidance`: expected a number or a list of numbers, found the string \"high\"",
        ),
        (
            "sampler: eulr-a",
            "field `sampler`: unknown value \"eulr-a\"; did you mean `euler-a`?",
        ),
        (
            "samplers: [ddim, plms]",
            "field `samplers`: unknown value \"plms\" (expected one of: ddim, euler-a)",
        ),
    ];
    for (field, expected) in cases {
        let message = first_error(&collect_with(field));
        assert!(message.ends_with(expected), "{field}: {message}");
    }
    let missing =
        first_error("stages:\n  collect:\n    kind: collect\n    models: [data, nowhere]\n");
    assert!(
        missing.ends_with("field `models`: input `nowhere` does not exist and is not a stage name (paths are relative to the pipeline's folder)"),
        "{missing}"
    );
}

#[test]
fn sweeping_a_list_field_takes_each_list_as_one_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = "stages:\n  collect:\n    kind: collect\n    models: [data]\n    matrix:\n      seeds: [[1, 2], 3]\n";
    let pipeline = load(dir.path(), text).expect("valid");
    let ids: Vec<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["collect[seeds=[1,2]]", "collect[seeds=3]"]);
}

#[test]
fn reference_tables_show_allowed_values_and_gathering() {
    let table = dreampipe_core::stages::reference_table(&Collect);
    assert!(
        table.contains("| `models` | a list of stage names and/or paths | required |  | content digest (all variants) | gathered |"),
        "{table}"
    );
    assert!(
        table.contains(
            "| `sampler` | a string | `\"ddim\"` | one of: ddim, euler-a | yes | sampler |"
        ),
        "{table}"
    );
    let _ = Registry::empty();
}
