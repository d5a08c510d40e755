//! Filling [`ReportInput`] from what the runner left behind: the latest run record of a
//! pipeline, the cache's latest result of stages that record did not cover (`--only`,
//! `--until`), and per stage `<output>/metrics.jsonl` and `<output>/report.json` (the image
//! convention stages follow, see `docs/pipelines.md`). Also where reports live by default:
//! `<cache>/reports/<pipeline>/index.html`, with `<cache>/runs/<pipeline>/report.html`
//! redirecting to it.
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use maud::{DOCTYPE, html};
use serde::Deserialize;

use super::ReportError;
use super::html::write_report;
use super::html::{ImageRef, REPORT_PAGE, ReportInput, ReportSummary, StageReport, StageStatus};
use super::metrics::read_metrics_jsonl;
use crate::cache::store::{Store, file_name_for, read_json};
use crate::exec::record::{Outcome, RunRecord, StageRecord};
use crate::pipeline::{Pipeline, StageInstance};

/// The training log a stage may write at the top of its output.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The image list a stage may write at the top of its output.
pub const IMAGES_FILE: &str = "report.json";
/// Without `report.json`, at most this many top-level `*.png` files are shown per stage
/// (enough for a grid or a handful of samples; a folder of 200 class images is not a result
/// worth a page).
pub const FALLBACK_IMAGE_LIMIT: usize = 12;
/// Cache sub-folder holding one report folder per pipeline.
pub const REPORTS_DIR: &str = "reports";
/// Name of the redirect page inside `runs/<pipeline>/` (stage names cannot contain a dot, so it
/// never collides with a stage link).
pub const REPORT_LINK: &str = "report.html";

/// `report.json`: the images a stage wants shown, paths relative to its output folder.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImagesFile {
    images: Vec<ImageEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageEntry {
    path: PathBuf,
    caption: String,
    #[serde(default)]
    step: Option<u64>,
}

/// The report's input plus problems found on the way (bad `report.json`, bad metrics); each
/// names its file. They are warnings: the report is still written without that part.
#[derive(Debug, Clone)]
pub struct BuiltInput {
    pub input: ReportInput,
    pub warnings: Vec<String>,
    /// Each stage's result key (None: no result), in stage order; with the input it decides
    /// whether an existing report is still current (see [`report_fingerprint`]).
    pub keys: Vec<Option<String>>,
}

/// The newest run record of `pipeline` in the cache, if any.
pub fn latest_record(store: &Store, pipeline: &str) -> Option<RunRecord> {
    let dir = store.root().join("records").join(file_name_for(pipeline));
    let mut newest: Option<((u64, u64), PathBuf)> = None;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Some(order) = record_order(&path) else {
            continue;
        };
        if newest.as_ref().is_none_or(|(best, _)| order > *best) {
            newest = Some((order, path));
        }
    }
    read_json(&newest?.1).ok()
}

/// `<started_unix>-<pid>.json` → (started, pid) for ordering.
fn record_order(path: &Path) -> Option<(u64, u64)> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".json")?;
    let (started, pid) = stem.split_once('-')?;
    Some((started.parse().ok()?, pid.parse().ok()?))
}

/// Builds the input for `pipeline`'s current stages from `record` (the latest run, if any) and
/// the cache. Fails only when nothing at all is known about the pipeline.
pub fn build_input(
    pipeline: &Pipeline,
    record: Option<&RunRecord>,
    store: &Store,
    generated_unix: u64,
) -> Result<BuiltInput, ReportError> {
    let mut warnings = Vec::new();
    let mut stages = Vec::with_capacity(pipeline.stages.len());
    let mut keys = Vec::with_capacity(pipeline.stages.len());
    for instance in &pipeline.stages {
        let recorded = record.and_then(|r| r.stages.iter().find(|s| s.id == instance.id));
        let (mut stage, key) = match recorded.filter(|s| s.status != Outcome::NotSelected) {
            Some(recorded) => (
                from_record(pipeline, instance, recorded, store),
                recorded.key.clone(),
            ),
            None => from_cache(pipeline, instance, store),
        };
        keys.push(key);
        if let Some(output) = stage.output_dir.clone() {
            attach_outputs(&mut stage, &output, &mut warnings);
        }
        stages.push(stage);
    }
    let nothing_known = record.is_none()
        && stages
            .iter()
            .all(|s| s.status == StageStatus::Skipped && s.output_dir.is_none());
    if nothing_known {
        return Err(ReportError::NeverRun {
            pipeline: pipeline.name.clone(),
            file: pipeline.file.clone(),
            cache: store.root().to_path_buf(),
        });
    }
    Ok(BuiltInput {
        input: ReportInput {
            pipeline: pipeline.name.clone(),
            pipeline_file: pipeline.file.display().to_string(),
            generated_at: format_utc(generated_unix),
            stages,
        },
        warnings,
        keys,
    })
}

/// Identifies what a report shows: the input without its time stamp, the result keys (image
/// paths under `runs/` stay the same when a result changes) and this dreampipe's version (the
/// page layout). Equal fingerprints mean an existing report can be kept as it is.
pub fn report_fingerprint(built: &BuiltInput) -> String {
    let input = ReportInput {
        generated_at: String::new(),
        ..built.input.clone()
    };
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "input": input,
        "keys": built.keys,
    })
    .to_string()
}

fn base_report(instance: &StageInstance, status: StageStatus) -> StageReport {
    let (sweep_group, sweep_values) = sweep_of(instance);
    StageReport {
        id: instance.id.clone(),
        kind: instance.kind.kind().to_string(),
        status,
        duration_s: 0.0,
        params: serde_json::Value::Object(instance.params.clone()),
        defaulted: defaulted_params(instance, &instance.params),
        output_dir: None,
        metrics: Vec::new(),
        images: Vec::new(),
        sweep_group,
        sweep_values,
        error: None,
        scores: None,
    }
}

/// The parameters whose value equals their schema default (numbers compared as numbers).
fn defaulted_params(
    instance: &StageInstance,
    params: &serde_json::Map<String, serde_json::Value>,
) -> Vec<String> {
    instance
        .kind
        .schema()
        .into_iter()
        .filter(|spec| match (&spec.default, params.get(spec.name)) {
            (Some(default), Some(value)) => same_value(default, value),
            _ => false,
        })
        .map(|spec| spec.name.to_string())
        .collect()
}

fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn from_record(
    pipeline: &Pipeline,
    instance: &StageInstance,
    recorded: &StageRecord,
    store: &Store,
) -> StageReport {
    let status = match recorded.status {
        Outcome::Ran => StageStatus::Ran,
        Outcome::Cached => StageStatus::Cached,
        Outcome::Failed => StageStatus::Failed,
        Outcome::Skipped | Outcome::NotSelected => StageStatus::Skipped,
    };
    let mut stage = base_report(instance, status);
    stage.duration_s = recorded.duration_s;
    if let (StageStatus::Cached, Some(key)) = (status, &recorded.key) {
        // What the result took to compute, not the (varying) look-up time of this run.
        if let Some(result) = store.lookup(key) {
            stage.duration_s = result.duration_s;
        }
    }
    stage.params = recorded.params.clone();
    stage.defaulted = recorded
        .params
        .as_object()
        .map(|params| defaulted_params(instance, params))
        .unwrap_or_default();
    stage.error = recorded.error.clone();
    if let (Some(key), Some(output)) = (&recorded.key, &recorded.output) {
        stage.output_dir = Some(readable_output(pipeline, instance, store, key, output));
    }
    stage
}

/// A stage the record did not cover: its latest committed result (and key), if the cache has
/// one.
fn from_cache(
    pipeline: &Pipeline,
    instance: &StageInstance,
    store: &Store,
) -> (StageReport, Option<String>) {
    let latest = store
        .last_key(&pipeline.name, &instance.id)
        .and_then(|key| store.lookup(&key).map(|result| (key, result)));
    let Some((key, result)) = latest else {
        let mut stage = base_report(instance, StageStatus::Skipped);
        stage.error = Some("not run yet".to_string());
        return (stage, None);
    };
    let mut stage = base_report(instance, StageStatus::Cached);
    stage.duration_s = result.duration_s;
    let output = store.output_dir(&key);
    stage.output_dir = Some(readable_output(pipeline, instance, store, &key, &output));
    (stage, Some(key))
}

/// `runs/<pipeline>/<stage>` when that link shows this result, else the result folder itself.
fn readable_output(
    pipeline: &Pipeline,
    instance: &StageInstance,
    store: &Store,
    key: &str,
    output: &Path,
) -> PathBuf {
    if store.last_key(&pipeline.name, &instance.id).as_deref() == Some(key) {
        store.human_path(&pipeline.name, &instance.id)
    } else {
        output.to_path_buf()
    }
}

/// Sweep variants: the stage name as group, each coordinate's field (prefixed with the stage
/// that swept it when two stages swept the same field) and value.
fn sweep_of(instance: &StageInstance) -> (Option<String>, BTreeMap<String, String>) {
    if instance.coords.is_empty() {
        return (None, BTreeMap::new());
    }
    let mut values = BTreeMap::new();
    for coord in &instance.coords {
        let shared_field = instance
            .coords
            .iter()
            .filter(|c| c.field == coord.field)
            .count()
            > 1;
        let name = if shared_field {
            format!("{}.{}", coord.origin, coord.field)
        } else {
            coord.field.clone()
        };
        values.insert(name, coord.value.clone());
    }
    (Some(instance.name.clone()), values)
}

/// Reads metrics and images from the stage's output folder.
fn attach_outputs(stage: &mut StageReport, output: &Path, warnings: &mut Vec<String>) {
    let metrics_path = output.join(METRICS_FILE);
    if metrics_path.is_file() {
        match read_metrics_jsonl(&metrics_path) {
            Ok(log) => stage.metrics = log.points,
            Err(error) => warnings.push(error.to_string()),
        }
    }
    let scores_path = output.join(super::scores::SCORES_FILE);
    if scores_path.is_file() {
        match super::scores::read_scores(&scores_path) {
            Ok(scores) => stage.scores = Some(scores),
            Err(warning) => warnings.push(warning),
        }
    }
    let images_path = output.join(IMAGES_FILE);
    stage.images = if images_path.is_file() {
        match listed_images(&images_path, output) {
            Ok(images) => images,
            Err(warning) => {
                warnings.push(warning);
                Vec::new()
            }
        }
    } else {
        top_level_pngs(output)
    };
}

/// The images `report.json` lists, resolved against the output folder.
fn listed_images(path: &Path, output: &Path) -> Result<Vec<ImageRef>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the image list: {e}", path.display()))?;
    let file: ImagesFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: {e}; expected {{\"images\": [{{\"path\": \"grid.png\", \"caption\": \"…\", \"step\": null}}]}}",
            path.display()
        )
    })?;
    let mut images = Vec::with_capacity(file.images.len());
    for entry in file.images {
        if !stays_inside(&entry.path) {
            return Err(format!(
                "{}: image path `{}` must be relative to the stage's output folder, without `..`",
                path.display(),
                entry.path.display()
            ));
        }
        if leaves(output, &entry.path) {
            return Err(format!(
                "{}: image path `{}` leads outside the stage's output folder (a symbolic link)",
                path.display(),
                entry.path.display()
            ));
        }
        images.push(ImageRef {
            path: output.join(&entry.path),
            caption: entry.caption,
            step: entry.step,
        });
    }
    Ok(images)
}

/// Whether `relative` inside `output` resolves (through links) to a place outside it.
fn leaves(output: &Path, relative: &Path) -> bool {
    match (output.canonicalize(), output.join(relative).canonicalize()) {
        (Ok(root), Ok(real)) => !real.starts_with(root),
        _ => false,
    }
}

fn stays_inside(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_)))
        && path.components().next().is_some()
}

/// Up to [`FALLBACK_IMAGE_LIMIT`] `*.png` files at the top of the output, by name; the file
/// name is the caption (so sweep variants' `grid.png` line up in the comparison).
fn top_level_pngs(output: &Path) -> Vec<ImageRef> {
    let mut names: Vec<String> = std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.to_ascii_lowercase().ends_with(".png"))
        .collect();
    names.sort();
    names
        .into_iter()
        .take(FALLBACK_IMAGE_LIMIT)
        .map(|name| ImageRef {
            path: output.join(&name),
            caption: name,
            step: None,
        })
        .collect()
}

/// `2026-11-26 10:45:03 UTC` (no time-zone database needed).
pub fn format_utc(unix: u64) -> String {
    const SECONDS_PER_DAY: u64 = 86_400;
    let (days, rest) = (unix / SECONDS_PER_DAY, unix % SECONDS_PER_DAY);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days` algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `<cache>/reports/<pipeline>/`: the default report folder.
pub fn default_report_dir(store: &Store, pipeline: &str) -> PathBuf {
    store.root().join(REPORTS_DIR).join(file_name_for(pipeline))
}

/// Beside the default report: the fingerprint it was built from.
pub const FINGERPRINT_FILE: &str = "fingerprint.json";

/// The default report's page when `dir` holds one built from `fingerprint` (a no-op rerun then
/// rewrites nothing, however many images the report holds).
pub fn current_report(dir: &Path, fingerprint: &str) -> Option<PathBuf> {
    let page = dir.join(REPORT_PAGE);
    let stored = std::fs::read_to_string(dir.join(FINGERPRINT_FILE)).ok()?;
    (stored == fingerprint && page.is_file()).then_some(page)
}

/// Writes the report into the default folder `dir`, replacing an earlier report there as a
/// whole (built beside it, then swapped in), so no stale copied image survives and a reader never
/// sees half a page. (`report --out DIR` writes into DIR with [`write_report`] instead, leaving
/// the folder's other files alone.)
pub fn publish_replacing(
    input: &ReportInput,
    fingerprint: &str,
    dir: &Path,
) -> Result<ReportSummary, ReportError> {
    let io = |path: &Path, action: &'static str, e: std::io::Error| ReportError::Io {
        path: path.to_path_buf(),
        action,
        reason: e.to_string(),
    };
    let suffix = format!("tmp-{}", std::process::id());
    let fresh = dir.with_extension(format!("new-{suffix}"));
    let old = dir.with_extension(format!("old-{suffix}"));
    let _ = std::fs::remove_dir_all(&fresh);
    let written = write_report(input, &fresh)?;
    let stamp = fresh.join(FINGERPRINT_FILE);
    std::fs::write(&stamp, fingerprint).map_err(|e| io(&stamp, "write", e))?;
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| io(dir, "move the earlier report aside", e))?;
    }
    std::fs::rename(&fresh, dir).map_err(|e| io(dir, "put the new report in place", e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(ReportSummary {
        page: dir.join(REPORT_PAGE),
        ..written
    })
}

/// Writes `<cache>/runs/<pipeline>/report.html`, a page that redirects to the default report
/// (a relative redirect, not a symlink: a browser resolves the report's copied images relative
/// to the URL it opened, which for a symlink would be the link's folder).
pub fn write_report_link(store: &Store, pipeline: &str) -> Result<PathBuf, ReportError> {
    let dir = store.root().join("runs").join(file_name_for(pipeline));
    std::fs::create_dir_all(&dir).map_err(|e| ReportError::Io {
        path: dir.clone(),
        action: "create the runs folder",
        reason: e.to_string(),
    })?;
    let target = format!(
        "../../{REPORTS_DIR}/{}/{REPORT_PAGE}",
        file_name_for(pipeline)
    );
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content={ "0; url=" (target) };
                title { "dreampipe report" }
            }
            body { a href=(target) { "report" } }
        }
    };
    let page = page.into_string() + "\n";
    let link = dir.join(REPORT_LINK);
    std::fs::write(&link, page).map_err(|e| ReportError::Io {
        path: link.clone(),
        action: "write the report link",
        reason: e.to_string(),
    })?;
    Ok(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_match_known_days() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_795_689_903), "2026-11-26 10:45:03 UTC");
    }

    #[test]
    fn image_paths_must_stay_in_the_output() {
        assert!(stays_inside(Path::new("samples/step-100.png")));
        assert!(!stays_inside(Path::new("../other/x.png")));
        assert!(!stays_inside(Path::new("/etc/x.png")));
        assert!(!stays_inside(Path::new("a/../../x.png")));
        assert!(!stays_inside(Path::new("")));
    }

    #[test]
    fn a_listed_image_reached_through_a_link_out_of_the_output_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("out");
        std::fs::create_dir_all(output.join("samples")).expect("mkdir");
        std::os::unix::fs::symlink(dir.path(), output.join("up")).expect("link");
        std::fs::write(dir.path().join("x.png"), "outside").expect("write");
        let list = output.join("report.json");
        let text = r#"{"images": [{"path": "samples/a.png", "caption": "a", "step": null}, {"path": "up/x.png", "caption": "x", "step": null}]}"#;
        std::fs::write(&list, text).expect("write");
        assert_eq!(
            listed_images(&list, &output).err(),
            Some(format!(
                "{}: image path `up/x.png` leads outside the stage's output folder (a symbolic link)",
                list.display()
            ))
        );
    }

    #[test]
    fn record_names_order_by_start_then_pid() {
        assert_eq!(
            record_order(Path::new("r/1700000000-42.json")),
            Some((1_700_000_000, 42))
        );
        assert_eq!(record_order(Path::new("r/notes.txt")), None);
    }
}
