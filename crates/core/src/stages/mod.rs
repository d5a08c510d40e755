//! Stage kinds as the runner sees them: the `Stage` trait every kind implements (its parameter
//! schema, implementation version, device class and `run`), the context a running stage sees,
//! and the registry. No kind lives here: the binaries fill the registry
//! (`dreampipe_kinds::registry()`, and the torch worker's implementations through
//! [`Registry::implement`]).
//!
//! A stage never touches the cache layout, the graph or the terminal: it reads its params and
//! input paths, writes into `ctx.out_dir`, may keep checkpoints in `ctx.work_dir` (kept across
//! crashes and handed back on the next run of the same key), reports progress, and checks
//! `ctx.cancel`.
pub mod handle;
pub mod params;
pub mod templates;
#[cfg(test)]
pub(crate) mod test_kinds;

pub use handle::{CancelFlag, ProgressReporter};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The type of a parameter, which decides validation and how it enters the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    String,
    Integer,
    Number,
    Bool,
    StringList,
    /// An integer or a list of integers (a single value reads as a one-element list); a range
    /// applies to each element.
    IntegerList,
    /// A number or a list of numbers (a single value reads as a one-element list).
    NumberList,
    /// A file or folder; its content digest enters the key, not the path text.
    Path,
    /// One or more files/folders.
    PathList,
    /// The name of an upstream stage; its output digest enters the key.
    StageRef,
    /// Names of upstream stages.
    StageRefList,
    /// An upstream stage name when one exists by that name, else a path (e.g. `model:`).
    PathOrStageRef,
    /// A list mixing stage names and paths (each item as [`Self::PathOrStageRef`]).
    PathOrStageRefList,
}

impl ParamType {
    /// How the type is named in messages and reference pages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::String => "a string",
            Self::Integer => "an integer",
            Self::Number => "a number",
            Self::Bool => "true or false",
            Self::StringList => "a list of strings",
            Self::IntegerList => "an integer or a list of integers",
            Self::NumberList => "a number or a list of numbers",
            Self::Path => "a path",
            Self::PathList => "a path or a list of paths",
            Self::StageRef => "a stage name",
            Self::StageRefList => "a stage name or a list of stage names",
            Self::PathOrStageRef => "a stage name or a path",
            Self::PathOrStageRefList => "a list of stage names and/or paths",
        }
    }

    /// Whether values of this type are inputs (resolved to paths for the stage).
    pub fn is_input(self) -> bool {
        matches!(
            self,
            Self::Path
                | Self::PathList
                | Self::StageRef
                | Self::StageRefList
                | Self::PathOrStageRef
                | Self::PathOrStageRefList
        )
    }

    /// Whether a value may be a list of numbers (ranges apply per element).
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            Self::Integer | Self::Number | Self::IntegerList | Self::NumberList
        )
    }
}

/// One parameter of a stage kind.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    /// `None`: required. `Some(Value::Null)`: optional without a value.
    pub default: Option<Value>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// False for fields that cannot change the result (progress style, log level).
    pub in_key: bool,
    /// False for fields added after their kind shipped: at the default value they stay out of
    /// the key, so results made before the field existed keep their keys. Set with
    /// [`Self::keyed_when_set`].
    pub key_default: bool,
    /// For string fields (and each item of string lists): the accepted values, checked by
    /// `validate` with a "did you mean" hint. Set with [`Self::one_of`].
    pub allowed: Option<&'static [&'static str]>,
    /// For stage-reference fields: take every variant of a swept upstream (one stage reads
    /// them all) instead of fanning this stage out per variant. Set with [`Self::gathers`].
    pub gather: bool,
    /// For path fields: each path must be a diffusers model folder (`model_index.json`, or a
    /// `model/` holding one). Set with [`Self::model_folder`].
    pub model: bool,
    /// For integer fields: values must be a multiple of this. Set with [`Self::multiple_of`].
    pub step: Option<i64>,
    pub doc: &'static str,
}

impl ParamSpec {
    pub fn required(name: &'static str, ty: ParamType, doc: &'static str) -> Self {
        Self {
            name,
            ty,
            default: None,
            min: None,
            max: None,
            in_key: true,
            key_default: true,
            allowed: None,
            gather: false,
            step: None,
            model: false,
            doc,
        }
    }
    pub fn optional(name: &'static str, ty: ParamType, default: Value, doc: &'static str) -> Self {
        Self {
            default: Some(default),
            ..Self::required(name, ty, doc)
        }
    }
    pub fn range(mut self, min: f64, max: f64) -> Self {
        self.min = Some(min);
        self.max = Some(max);
        self
    }
    /// Requires each path of this field to be a diffusers model folder (checked by `validate`
    /// before any file is hashed).
    pub fn model_folder(mut self) -> Self {
        self.model = true;
        self
    }
    /// Restricts an integer field to multiples of `step` (image sides: the VAE's factor 8).
    pub fn multiple_of(mut self, step: i64) -> Self {
        self.step = Some(step);
        self
    }
    pub fn not_in_key(mut self) -> Self {
        self.in_key = false;
        self
    }
    /// For a field added to a kind that already has cached results: the key takes it only when
    /// it is set to something other than its default (an empty input list counts as unset).
    pub fn keyed_when_set(mut self) -> Self {
        self.key_default = false;
        self
    }
    /// Whether `value` of this field enters the key.
    pub fn keys(&self, value: &Value) -> bool {
        self.in_key && (self.key_default || Some(value) != self.default.as_ref())
    }
    /// Restricts a string (or string list) field to `values`.
    pub fn one_of(mut self, values: &'static [&'static str]) -> Self {
        self.allowed = Some(values);
        self
    }
    /// Makes a stage-reference field gather all variants of a swept upstream (see
    /// [`ParamSpec::gather`]); each variant arrives as its own [`ResolvedInput`].
    pub fn gathers(mut self) -> Self {
        self.gather = true;
        self
    }
}

/// Whether a stage needs a GPU slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceClass {
    /// Bounded by `--jobs`.
    Cpu,
    /// Takes one device slot (`--device` / `--devices`); the device type enters the key.
    Gpu,
}

/// Why a stage failed. The `Display` is the one line the run record, the events and a Slurm
/// job's exit record show (`cancelled` for [`Self::Cancelled`]).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A field's value, or the input it names, does not work for the stage.
    #[error("stage `{stage}`: field `{field}`: {problem}")]
    BadField {
        stage: String,
        field: String,
        problem: String,
    },
    /// The model an input field names could not be read (a single-file checkpoint's import).
    #[error("stage `{stage}`, field `{field}`: {source}")]
    UnreadableInput {
        stage: String,
        field: &'static str,
        source: BoxError,
    },
    /// The stage's parameters do not parse into its kind's typed parameters.
    #[error("stage `{stage}`: parameters: {source}")]
    Parameters {
        stage: String,
        source: serde_json::Error,
    },
    /// An output document (`scores`, `manifest`, `report`) did not serialize.
    #[error("stage `{stage}`: {document}: {source}")]
    Serialize {
        stage: String,
        document: &'static str,
        source: serde_json::Error,
    },
    /// Library work the stage called failed: sampling, training, hashing, PNG text chunks.
    #[error("stage `{stage}`: {source}")]
    Library { stage: String, source: BoxError },
    /// Drawing the stage's grid number `grid` failed.
    #[error("stage `{stage}`: grid {grid}: {source}")]
    Grid {
        stage: String,
        grid: usize,
        source: BoxError,
    },
    /// A command the stage ran exited with a status other than 0.
    #[error("command exited with status {code}")]
    CommandExited { code: i32 },
    /// A command the stage ran was killed by a signal.
    #[error("command was killed by a signal")]
    CommandKilled,
    /// A kind found no folder in its input field.
    #[error("{kind}: no input folder")]
    NoInputFolder { kind: &'static str },
    /// A kind could not encode or write the image `path`.
    #[error("{kind}: writing `{path}`: {source}", path = .path.display())]
    WriteImage {
        kind: &'static str,
        path: PathBuf,
        source: image::ImageError,
    },
    /// A kind's `manifest.json` did not serialize.
    #[error("{kind}: manifest: {source}")]
    Manifest {
        kind: &'static str,
        source: serde_json::Error,
    },
    /// An input image could not be read.
    #[error("{path}: {source}", path = .path.display())]
    ReadImage {
        path: PathBuf,
        source: image::ImageError,
    },
    /// A torch kind run where this process has only the kind's schema.
    #[error(
        "stage kind `{kind}` runs in the torch worker (dreampipe-torch); this process has only its schema"
    )]
    NeedsTorchWorker { kind: String },
    /// A message from a helper that reports nothing more structured (writing safetensors,
    /// applying a training stage's exports).
    #[error("{0}")]
    Message(String),
    /// The run was cancelled (Ctrl-C, `scancel`) and the stage stopped.
    #[error("cancelled")]
    Cancelled,
    /// The stage's code panicked; `problem` is the panic message.
    #[error("{problem} (the stage panicked; RUST_BACKTRACE=1 shows where)")]
    Panicked { problem: String },
    #[error("{action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cause a [`StageError`] carries from library code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl StageError {
    /// A library error while running stage `stage`.
    pub fn library(stage: &str, source: impl Into<BoxError>) -> Self {
        Self::Library {
            stage: stage.to_string(),
            source: source.into(),
        }
    }
    /// An output document of stage `stage` that did not serialize.
    pub fn serialize(stage: &str, document: &'static str, source: serde_json::Error) -> Self {
        Self::Serialize {
            stage: stage.to_string(),
            document,
            source,
        }
    }
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One resolved input of a stage.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResolvedInput {
    /// The upstream stage's name as written in the field, when the input came from a stage.
    pub upstream: Option<String>,
    /// The upstream's full id: its name plus `[field=value,…]` for a sweep variant
    /// (`db[learning_rate=2e-6]`); the label to show for it.
    pub stage_id: Option<String>,
    pub path: PathBuf,
    /// The content digest (`cache::hash::tree_digest` of the files): the upstream's output
    /// digest, or the path's digest as hashed for the key. `None` when not known.
    pub digest: Option<String>,
}

impl ResolvedInput {
    /// How the input is named in labels: the upstream's full id, or the folder's name.
    pub fn label(&self) -> String {
        if let Some(id) = self.stage_id.as_ref().or(self.upstream.as_ref()) {
            return id.clone();
        }
        std::path::absolute(&self.path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

/// The stage's log file.
pub struct StageLog {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl StageLog {
    pub fn create(path: &Path) -> Self {
        // Append mode: a command stage's output goes to the same file through its own handle,
        // and lines written here must land after it, not over it.
        let file = std::fs::File::create(path)
            .and_then(|_| std::fs::File::options().append(true).open(path))
            .ok();
        Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Appends one line; logging never fails a stage.
    pub fn line(&self, text: &str) {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = guard.as_mut() {
            let _ = writeln!(file, "{text}");
        }
    }
}

/// Everything a running stage sees.
pub struct StageContext<'a> {
    pub stage_id: &'a str,
    /// Every schema parameter, defaults filled in (inputs as written); a kind reads them
    /// typed, through [`Self::typed`].
    pub params: &'a serde_json::Map<String, Value>,
    /// Resolved paths per input parameter.
    pub inputs: &'a BTreeMap<String, Vec<ResolvedInput>>,
    /// Write the output here (a staging folder; committed only on success).
    pub out_dir: &'a Path,
    /// Checkpoints for resuming; survives crashes, removed after a successful commit.
    pub work_dir: &'a Path,
    /// The pipeline file's folder (relative input paths are relative to it).
    pub pipeline_dir: &'a Path,
    pub progress: &'a ProgressReporter,
    pub cancel: &'a CancelFlag,
    pub device: crate::device::Device,
    /// Every device slot the stage holds (`resources: {gpus: N}`; one for a GPU kind by
    /// default, none for a CPU kind), `device` first.
    pub devices: &'a [crate::device::Device],
    pub log: &'a StageLog,
    /// `<cache>/shared`: stage-managed memos that outlive one key (see [`Self::shared_dir`]).
    pub shared_root: &'a Path,
    /// The stage's cache key (hex) and the pipeline's name, for provenance in outputs.
    pub key: &'a str,
    pub pipeline: &'a str,
    /// Shorter variants of a steps sweep this run also produces: at each one's step a training
    /// stage writes the complete output that variant would have had alone into
    /// [`snapshot_folder`] (empty for most runs).
    pub snapshots: &'a [SnapshotTarget],
    /// A cached result of this stage with fewer steps and a kept training state: the run
    /// continues from it instead of starting over.
    pub extend_from: Option<&'a ExtendFrom>,
}

/// A shorter cached run to continue from: its step, stage id (its images name it), training
/// state folder and output folder.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExtendFrom {
    pub step: u64,
    pub stage_id: String,
    pub key: String,
    pub state_dir: PathBuf,
    pub output_dir: PathBuf,
}

/// The work-folder entry where a training stage leaves the state it ended with; the commit
/// moves it to the store's `states/<key>`.
pub const FINAL_STATE_DIR: &str = "final-state";

/// A shorter variant served by a longer run: its step, and the stage id and key its outputs
/// must name (images carry them).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotTarget {
    pub step: u64,
    pub stage_id: String,
    pub key: String,
}

/// Where a stage leaves the snapshot of step `step` (see [`StageContext::snapshot_steps`]).
pub fn snapshot_folder(work_dir: &Path, step: u64) -> PathBuf {
    work_dir.join(SNAPSHOTS_DIR).join(format!("step-{step}"))
}

/// The folder of a work folder that holds snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";

impl StageContext<'_> {
    /// The resolved paths of an input parameter (empty when it has none).
    pub fn input_paths(&self, name: &str) -> Vec<&Path> {
        self.inputs
            .get(name)
            .into_iter()
            .flatten()
            .map(|i| i.path.as_path())
            .collect()
    }
    /// `<cache>/shared/<name>`, created: a folder a stage kind manages itself to reuse work
    /// across keys (e.g. `generate` memoizes each image by its own inputs, so raising `count`
    /// reuses the images already made). Entries must be keyed by everything that decides their
    /// content and written atomically (temporary file + rename). `cache gc` removes files not
    /// modified since before its oldest surviving result: refresh an entry's mtime when reusing
    /// it (see `docs/cache.md`), and never rely on an entry staying.
    pub fn shared_dir(&self, name: &str) -> Result<PathBuf, StageError> {
        let dir = self.shared_root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| StageError::io("create", &dir, e))?;
        Ok(dir)
    }
    /// The kind's typed parameters (its struct beside its schema, e.g.
    /// `dreampipe_kinds::sd::dreambooth::DreamBoothParams`), parsed from [`Self::params`].
    pub fn typed<P>(&self) -> Result<P, StageError>
    where
        P: serde::de::DeserializeOwned,
    {
        params::parse(self.params).map_err(|source| StageError::Parameters {
            stage: self.stage_id.to_string(),
            source,
        })
    }
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// A stage kind.
pub trait Stage: Send + Sync {
    /// The `kind:` value in pipeline files.
    fn kind(&self) -> &'static str;
    /// Bumped whenever the implementation changes its output; enters the key.
    fn version(&self) -> u32;
    fn schema(&self) -> Vec<ParamSpec>;
    fn device_class(&self) -> DeviceClass {
        DeviceClass::Cpu
    }
    /// One paragraph for the reference page: what the stage does and what it outputs.
    fn summary(&self) -> &'static str;
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError>;
    /// Whether running it takes libtorch: the front binary hands such runs to the torch worker.
    fn needs_torch(&self) -> bool {
        false
    }
    /// Rules between fields (and against upstream stages' fields), checked by `validate`
    /// before any stage runs: one (field, message) per problem. Each field alone is already
    /// valid for its schema when this is called.
    fn check_fields(&self, _fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// For training kinds: the integer field that sets how many optimizer steps run, when a
    /// run of N steps is the first N steps of a longer run with otherwise equal fields
    /// (plan/prefix.rs shares that prefix in a steps sweep).
    fn steps_field(&self) -> Option<&'static str> {
        None
    }
    /// Why a run with these fields is not the prefix of a longer one (`None`: it is), e.g. a
    /// learning-rate schedule that depends on the total.
    fn prefix_problem(&self, _params: &serde_json::Map<String, Value>) -> Option<String> {
        Some("this kind does not share runs".to_string())
    }
}

/// What [`Stage::check_fields`] sees of a stage: every field (defaults filled; swept fields
/// absent) and, per reference field, the stages it names.
pub struct FieldView<'a> {
    pub params: &'a serde_json::Map<String, Value>,
    /// The fields of `params` at their schema default (the file does not give them).
    pub defaulted: &'a std::collections::BTreeSet<String>,
    /// The swept fields (`matrix:`) and their values.
    pub matrix: &'a [(String, Vec<Value>)],
    pub upstream: BTreeMap<String, Vec<UpstreamView<'a>>>,
}

/// A stage named by a reference field, as declared (before sweeps expand).
pub struct UpstreamView<'a> {
    pub name: &'a str,
    pub kind: &'static str,
    /// Its fields with defaults; a field it sweeps in `matrix:` is absent (not known statically).
    pub params: &'a serde_json::Map<String, Value>,
}

impl FieldView<'_> {
    /// Whether field `name` is set (not null).
    pub fn is_set(&self, name: &str) -> bool {
        self.params.get(name).is_some_and(|v| !v.is_null())
    }
    /// The values the file gives field `name`: its value, or every value a sweep gives it;
    /// none when the field is left at its schema default.
    pub fn written(&self, name: &str) -> Vec<&Value> {
        if let Some((_, values)) = self.matrix.iter().find(|(field, _)| field == name) {
            return values.iter().collect();
        }
        match self.params.get(name) {
            Some(value) if !self.defaulted.contains(name) => vec![value],
            _ => Vec::new(),
        }
    }
    /// Field `name` as a bool (false when unset).
    pub fn flag(&self, name: &str) -> bool {
        self.params
            .get(name)
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// A failure of the stage named in `ctx`, about `field`.
pub fn field_error(
    ctx: &StageContext<'_>,
    field: &str,
    message: impl std::fmt::Display,
) -> StageError {
    StageError::BadField {
        stage: ctx.stage_id.to_string(),
        field: field.to_string(),
        problem: message.to_string(),
    }
}

/// The failure of a torch kind run where only its schema is known (never reached through the
/// CLI: the front hands such runs to `dreampipe-torch`).
pub fn needs_torch_worker(kind: &str) -> StageError {
    StageError::NeedsTorchWorker {
        kind: kind.to_string(),
    }
}

/// A stage run: what [`Registry::implement`] pairs with a kind's schema.
pub type RunFn = fn(&StageContext<'_>) -> Result<(), StageError>;

/// A kind whose schema comes from one stage and whose `run` is `run`.
struct Implemented {
    spec: Arc<dyn Stage>,
    run: RunFn,
}

impl Stage for Implemented {
    fn kind(&self) -> &'static str {
        self.spec.kind()
    }
    fn version(&self) -> u32 {
        self.spec.version()
    }
    fn schema(&self) -> Vec<ParamSpec> {
        self.spec.schema()
    }
    fn device_class(&self) -> DeviceClass {
        self.spec.device_class()
    }
    fn summary(&self) -> &'static str {
        self.spec.summary()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        (self.run)(ctx)
    }
    fn needs_torch(&self) -> bool {
        self.spec.needs_torch()
    }
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        self.spec.check_fields(fields)
    }
    fn steps_field(&self) -> Option<&'static str> {
        self.spec.steps_field()
    }
    fn prefix_problem(&self, params: &serde_json::Map<String, Value>) -> Option<String> {
        self.spec.prefix_problem(params)
    }
}

/// All stage kinds, by name.
#[derive(Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn Stage>>,
    templates: Option<templates::PipelineTemplates>,
}

impl Registry {
    /// An empty registry (the binaries and tests add their kinds with [`Self::with`]).
    pub fn empty() -> Self {
        Self {
            kinds: BTreeMap::new(),
            templates: None,
        }
    }
    /// Adds the pipelines `init` writes and `bench-cache` runs (they name the kinds).
    pub fn with_templates(mut self, templates: templates::PipelineTemplates) -> Self {
        self.templates = Some(templates);
        self
    }
    /// The registered pipeline templates, if any.
    pub fn templates(&self) -> Option<&templates::PipelineTemplates> {
        self.templates.as_ref()
    }
    pub fn with(mut self, stage: Arc<dyn Stage>) -> Self {
        self.kinds.insert(stage.kind(), stage);
        self
    }
    /// Gives the registered kind `kind` its implementation (the torch worker does this for the
    /// Stable Diffusion kinds); the schema, version and summary stay the registered ones.
    pub fn implement(mut self, kind: &str, run: RunFn) -> Self {
        if let Some((name, spec)) = self.kinds.remove_entry(kind) {
            self.kinds.insert(name, Arc::new(Implemented { spec, run }));
        }
        self
    }
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Stage>> {
        self.kinds.get(kind)
    }
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Stage>> {
        self.kinds.values()
    }
}

/// The parameter table of a kind's reference page (`stages/<kind>.md`), generated from its
/// schema; a test keeps the pages in sync with the code.
pub fn reference_table(stage: &dyn Stage) -> String {
    let mut text = String::from(
        "| field | type | default | range | in key | description |\n|---|---|---|---|---|---|\n",
    );
    for spec in stage.schema() {
        let default = match &spec.default {
            None => "required".to_string(),
            Some(Value::Null) => "unset".to_string(),
            Some(value) => format!("`{value}`"),
        };
        let range = match (spec.min, spec.max) {
            (Some(min), Some(max)) => format!("{min} – {max}"),
            (Some(min), None) => format!("≥ {min}"),
            (None, Some(max)) => format!("≤ {max}"),
            (None, None) => String::new(),
        };
        let range = match spec.allowed {
            Some(values) => format!("one of: {}", values.join(", ")),
            None => range,
        };
        let in_key = if !spec.in_key {
            "no"
        } else if !spec.key_default {
            "when set"
        } else if spec.gather {
            "content digest (all variants)"
        } else if spec.ty.is_input() {
            "content digest"
        } else {
            "yes"
        };
        text.push_str(&format!(
            "| `{}` | {} | {default} | {range} | {in_key} | {} |\n",
            spec.name,
            spec.ty.describe(),
            spec.doc.replace('|', "\\|")
        ));
    }
    text
}
