//! The static HTML report of one pipeline run, built from [`ReportInput`] (which the runner fills
//! from its run record). The page is self-contained: no server, network, external CSS/JS/fonts
//! (a Content-Security-Policy forbids them). Images up to [`INLINE_IMAGE_MAX_BYTES`] are inlined
//! as base64 data URIs; larger ones (big grids) are copied to `images/` next to `index.html` and
//! referenced by relative path, so the report folder can be moved or zipped as a whole.
//!
//! The page is a maud template: every value interpolated into it (stage ids, prompts, captions,
//! parameters, paths) is escaped by the template engine; nothing is concatenated by hand.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::{Deserialize, Serialize};

use super::ReportError;
use super::metrics::MetricPoint;
use super::svg::{ChartSpec, line_chart};

/// Images up to this many bytes are inlined; a 512×512 PNG sample is typically 300–450 KiB and
/// a grid several MiB, so samples of small test models are inlined and real outputs copied.
pub const INLINE_IMAGE_MAX_BYTES: u64 = 256 * 1024;
/// The report page inside the report folder.
pub const REPORT_PAGE: &str = "index.html";
/// Folder (next to the page) that receives copied images.
pub const IMAGES_DIR: &str = "images";
/// Size of each loss / learning-rate chart in CSS pixels.
const CHART_SIZE: (u32, u32) = (520, 260);

/// Forbids every network fetch: only inline styles/scripts, and images from data URIs or files.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; script-src 'unsafe-inline'";

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#111;max-width:1400px}\
table{border-collapse:collapse;margin:8px 0 24px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#f3f3f3}code{font-size:12px;white-space:pre-wrap}.status-failed{color:#b00020;font-weight:bold}\
.status-cached{color:#555}.status-ran{color:#0a6b2c}.status-skipped{color:#888}\
figure{display:inline-block;margin:0 12px 12px 0;vertical-align:top}figure img{max-width:100%;height:auto;image-rendering:auto}\
.samples img{max-width:256px}.compare img{max-width:256px}.missing{color:#b00020}.charts{display:flex;flex-wrap:wrap;gap:16px}\
td.duration{white-space:nowrap}svg.chart{font-size:11px;background:#fff}svg .chart-title{font-size:13px;font-weight:bold}";

/// Runs after load and records, on `<html>`, whether every image decoded
/// (`data-images-ok`, `data-images-checked`, `data-images-broken`) and any script or resource
/// error (`data-page-errors`). The browser check reads these from the dumped DOM.
const VERIFY_SCRIPT: &str = "(function(){var root=document.documentElement,errors=[];\
window.addEventListener('error',function(e){var t=e.target;errors.push(t&&t.tagName?('cannot load '+t.tagName.toLowerCase()+' '+(t.getAttribute('data-name')||'')):String(e.message));\
root.setAttribute('data-page-errors',errors.join(' | '));},true);\
window.addEventListener('load',function(){var bad=[],imgs=document.images;for(var i=0;i<imgs.length;i++){var im=imgs[i];\
if(!(im.complete&&im.naturalWidth>0)){bad.push(im.getAttribute('data-name')||('#'+i));}}\
root.setAttribute('data-images-checked',String(imgs.length));root.setAttribute('data-images-broken',bad.join(' | '));\
root.setAttribute('data-images-ok',bad.length===0?'true':'false');});})();";

/// Everything the report shows about one pipeline run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportInput {
    pub pipeline: String,
    pub pipeline_file: String,
    pub generated_at: String,
    pub stages: Vec<StageReport>,
}

/// How a stage ended in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    Ran,
    Cached,
    Failed,
    Skipped,
}

impl StageStatus {
    fn as_str(self) -> &'static str {
        match self {
            StageStatus::Ran => "ran",
            StageStatus::Cached => "cached",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
        }
    }
}

/// One stage of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub id: String,
    pub kind: String,
    pub status: StageStatus,
    pub duration_s: f64,
    #[serde(default)]
    pub params: serde_json::Value,
    /// Parameters whose value is their kind's default: folded away under the set ones.
    #[serde(default)]
    pub defaulted: Vec<String>,
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    /// Why a failed stage failed.
    #[serde(default)]
    pub error: Option<String>,
    /// From the stage's metrics.jsonl (see [`super::metrics::read_metrics_jsonl`]).
    #[serde(default)]
    pub metrics: Vec<MetricPoint>,
    /// Outputs (`step: None`: grids, final samples) and validation samples (`step: Some`).
    #[serde(default)]
    pub images: Vec<ImageRef>,
    /// Base name shared by the variants of one matrix sweep.
    #[serde(default)]
    pub sweep_group: Option<String>,
    /// This variant's swept parameter values, e.g. `learning_rate = "2e-6"`.
    #[serde(default)]
    pub sweep_values: BTreeMap<String, String>,
    /// An `evaluate` stage's `scores.json` (see [`super::scores`]).
    #[serde(default)]
    pub scores: Option<serde_json::Value>,
}

/// An image file a stage produced. Sweep comparisons match variants' images by `caption`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRef {
    pub path: PathBuf,
    pub caption: String,
    #[serde(default)]
    pub step: Option<u64>,
}

/// What [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReportSummary {
    pub page: PathBuf,
    pub inlined_images: usize,
    pub copied_images: usize,
    /// Image files that did not exist; the page shows a visible "missing" note for each.
    pub missing_images: Vec<PathBuf>,
}

/// Writes `<out_dir>/index.html` (and `<out_dir>/images/` for large images).
pub fn write_report(input: &ReportInput, out_dir: &Path) -> Result<ReportSummary, ReportError> {
    create_dir(out_dir)?;
    let mut store = ImageStore::new(out_dir, INLINE_IMAGE_MAX_BYTES);
    let page = render_report(input, &mut store)?;
    let page_path = out_dir.join(REPORT_PAGE);
    std::fs::write(&page_path, page)
        .map_err(|e| io_error(&page_path, "write the report page", e))?;
    Ok(ReportSummary {
        page: page_path,
        inlined_images: store.inlined,
        copied_images: store.copied,
        missing_images: store.missing,
    })
}

/// Renders the whole page, resolving images through `store`. Every interpolated value goes
/// through maud, which escapes it; only the page's own constant style and script are inserted
/// as they are.
pub fn render_report(input: &ReportInput, store: &mut ImageStore) -> Result<String, ReportError> {
    // Images resolve in page order: copies are numbered in that order.
    let sweeps = render_sweeps(&input.stages, store)?;
    let validation = render_validation(&input.stages, store)?;
    let outputs = render_outputs(&input.stages, store)?;
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="Content-Security-Policy" content=(CONTENT_SECURITY_POLICY);
                meta name="viewport" content="width=device-width";
                title { "dreampipe: " (input.pipeline) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                script { (PreEscaped(VERIFY_SCRIPT)) }
                (render_header(input))
                (render_stage_table(&input.stages))
                (super::scores::render_scores(&scored_stages(&input.stages)))
                (sweeps)
                (render_curves(&input.stages))
                (validation)
                (outputs)
            }
        }
    };
    Ok(page.into_string() + "\n")
}

fn render_header(input: &ReportInput) -> Markup {
    let count = |status: StageStatus| input.stages.iter().filter(|s| s.status == status).count();
    let total_s: f64 = input
        .stages
        .iter()
        .map(|s| s.duration_s)
        .filter(|d| d.is_finite())
        .sum();
    let totals = format!(
        "{} stages: {} ran, {} cached, {} failed, {} skipped · total stage time {}",
        input.stages.len(),
        count(StageStatus::Ran),
        count(StageStatus::Cached),
        count(StageStatus::Failed),
        count(StageStatus::Skipped),
        format_duration(total_s)
    );
    html! {
        header {
            h1 { (input.pipeline) }
            p {
                "Pipeline file " code { (input.pipeline_file) } " · generated " (input.generated_at)
            }
            p class="totals" { (totals) }
        }
    }
}

/// Each stage with scores, as (id, scores).
fn scored_stages(stages: &[StageReport]) -> Vec<(&str, &serde_json::Value)> {
    (stages.iter())
        .filter_map(|s| s.scores.as_ref().map(|v| (s.id.as_str(), v)))
        .collect()
}

fn render_stage_table(stages: &[StageReport]) -> Markup {
    html! {
        h2 { "Stages" }
        table class="stages" {
            tr {
                th { "stage" } th { "kind" } th { "status" }
                th { "duration" } th { "parameters" } th { "output" }
            }
            @for stage in stages {
                @let status = stage.status.as_str();
                tr id={ "stage-" (stage.id) } {
                    td { (stage.id) }
                    td { (stage.kind) }
                    td class={ "status-" (status) } {
                        (status)
                        @if let Some(error) = &stage.error { br; (error) }
                    }
                    td class="duration" { (format_duration(stage.duration_s)) }
                    td { (render_params(&stage.params, &stage.defaulted)) }
                    td { code { @if let Some(output) = &stage.output_dir { (output.display()) } } }
                }
            }
        }
    }
}

/// The parameters set in the pipeline, then the defaulted ones folded in a `<details>`.
fn render_params(params: &serde_json::Value, defaulted: &[String]) -> Markup {
    let Some(map) = params.as_object() else {
        return html! { code { (format_params(params)) } };
    };
    let (defaults, set): (serde_json::Map<_, _>, serde_json::Map<_, _>) = map
        .clone()
        .into_iter()
        .partition(|(name, _)| defaulted.contains(name));
    let plural = if defaults.len() == 1 { "" } else { "s" };
    html! {
        code { (format_params(&serde_json::Value::Object(set))) }
        @if !defaults.is_empty() {
            details {
                summary { (defaults.len()) " default" (plural) }
                code { (format_params(&serde_json::Value::Object(defaults))) }
            }
        }
    }
}

/// One `key: value` line per top-level parameter; strings without JSON quotes.
fn format_params(params: &serde_json::Value) -> String {
    let show = |value: &serde_json::Value| match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    match params {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}: {}", show(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        serde_json::Value::Null => String::new(),
        other => show(other),
    }
}

/// "12.3 s", "4 min 05 s", "1 h 02 min"; "—" for a missing (non-finite) time.
pub fn format_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "—".to_string();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let whole = seconds.round() as u64;
    if whole < 3600 {
        return format!("{} min {:02} s", whole / 60, whole % 60);
    }
    format!("{} h {:02} min", whole / 3600, (whole % 3600) / 60)
}

/// Per sweep group: rows = variants, columns = final images matched by caption.
fn render_sweeps(stages: &[StageReport], store: &mut ImageStore) -> Result<Markup, ReportError> {
    let mut groups: BTreeMap<&str, Vec<&StageReport>> = BTreeMap::new();
    for stage in stages {
        if let Some(group) = &stage.sweep_group {
            groups.entry(group).or_default().push(stage);
        }
    }
    let mut tables = Vec::with_capacity(groups.len());
    for (group, variants) in groups {
        tables.push(render_sweep_table(group, &variants, store)?);
    }
    Ok(html! {
        @if !tables.is_empty() {
            h2 { "Sweeps" }
            @for table in &tables { (table) }
        }
    })
}

fn render_sweep_table(
    group: &str,
    variants: &[&StageReport],
    store: &mut ImageStore,
) -> Result<Markup, ReportError> {
    let mut columns: Vec<&str> = Vec::new();
    for image in variants.iter().flat_map(|v| final_images(v)) {
        if !columns.contains(&image.caption.as_str()) {
            columns.push(&image.caption);
        }
    }
    // Per variant: its label and one cell per column (`None`: no image with that caption).
    let mut rows: Vec<(String, Vec<Option<Markup>>)> = Vec::with_capacity(variants.len());
    for variant in variants {
        let mut cells = Vec::with_capacity(columns.len());
        for column in &columns {
            let image = final_images(variant).find(|image| image.caption == *column);
            cells.push(image.map(|image| store.img_tag(image)).transpose()?);
        }
        rows.push((variant_label(variant), cells));
    }
    Ok(html! {
        h3 { (group) }
        table class="compare" {
            tr { th { "variant" } @for column in &columns { th { (column) } } }
            @for (label, cells) in &rows {
                tr {
                    th { (label) }
                    @for cell in cells {
                        td { @match cell { Some(img) => (img), None => "—" } }
                    }
                }
            }
        }
    })
}

fn final_images(stage: &StageReport) -> impl Iterator<Item = &ImageRef> {
    stage.images.iter().filter(|image| image.step.is_none())
}

/// "learning_rate=2e-6, max_steps=400", or the stage id when no values are recorded.
fn variant_label(stage: &StageReport) -> String {
    if stage.sweep_values.is_empty() {
        return stage.id.clone();
    }
    stage
        .sweep_values
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Loss and learning-rate charts for every stage with metrics.
fn render_curves(stages: &[StageReport]) -> Markup {
    let trained: Vec<&StageReport> = stages.iter().filter(|s| !s.metrics.is_empty()).collect();
    html! {
        @if !trained.is_empty() {
            h2 { "Training curves" }
            @for stage in trained {
                h3 { (stage.id) }
                div class="charts" { (stage_charts(stage)) }
            }
        }
    }
}

/// The loss and learning-rate charts of one stage (a series never logged is left out).
fn stage_charts(stage: &StageReport) -> Markup {
    let series = [
        (
            "loss",
            stage.metrics.iter().map(|m| m.loss).collect::<Vec<_>>(),
        ),
        (
            "learning rate",
            stage.metrics.iter().map(|m| m.lr).collect(),
        ),
    ];
    let charts = series
        .into_iter()
        .filter(|(_, values)| !values.iter().all(Option::is_none))
        .map(|(name, values)| {
            let points: Vec<(f64, f64)> = stage
                .metrics
                .iter()
                .zip(values)
                .map(|(m, v)| (m.step as f64, v.unwrap_or(f64::NAN)))
                .collect();
            let spec = ChartSpec {
                title: format!("{} — {name}", stage.id),
                x_label: "step".to_string(),
                y_label: name.to_string(),
                width: CHART_SIZE.0,
                height: CHART_SIZE.1,
            };
            line_chart(&points, &spec)
        });
    html! { @for chart in charts { (chart) } }
}

/// Validation samples of each stage, in step order.
fn render_validation(
    stages: &[StageReport],
    store: &mut ImageStore,
) -> Result<Markup, ReportError> {
    let mut sections: Vec<(&str, Vec<Markup>)> = Vec::new();
    for stage in stages {
        let mut samples: Vec<&ImageRef> = stage
            .images
            .iter()
            .filter(|image| image.step.is_some())
            .collect();
        if samples.is_empty() {
            continue;
        }
        samples.sort_by_key(|image| image.step);
        let mut figures = Vec::with_capacity(samples.len());
        for sample in samples {
            let step = sample.step.unwrap_or_default();
            let caption = format!("step {step} · {}", sample.caption);
            figures.push(store.figure(sample, &caption)?);
        }
        sections.push((&stage.id, figures));
    }
    Ok(image_sections("Validation samples", "samples", &sections))
}

/// Final images (grids, samples) of each stage.
fn render_outputs(stages: &[StageReport], store: &mut ImageStore) -> Result<Markup, ReportError> {
    let mut sections: Vec<(&str, Vec<Markup>)> = Vec::new();
    for stage in stages {
        let images: Vec<&ImageRef> = final_images(stage).collect();
        if images.is_empty() {
            continue;
        }
        let mut figures = Vec::with_capacity(images.len());
        for image in images {
            figures.push(store.figure(image, &image.caption)?);
        }
        sections.push((&stage.id, figures));
    }
    Ok(image_sections("Images", "outputs", &sections))
}

/// A titled section with one `<div class="{class}">` of figures per stage (nothing without any).
fn image_sections(title: &str, class: &str, sections: &[(&str, Vec<Markup>)]) -> Markup {
    html! {
        @if !sections.is_empty() {
            h2 { (title) }
            @for (id, figures) in sections {
                h3 { (id) }
                div class=(class) { @for figure in figures { (figure) } }
            }
        }
    }
}

/// Turns image files into `src` values: inline data URIs or copies under `images/`.
pub struct ImageStore {
    out_dir: PathBuf,
    inline_max_bytes: u64,
    sources: HashMap<PathBuf, Option<String>>,
    inlined: usize,
    copied: usize,
    missing: Vec<PathBuf>,
}

impl ImageStore {
    /// A store writing copies under `out_dir/images/`, inlining files up to `inline_max_bytes`.
    pub fn new(out_dir: &Path, inline_max_bytes: u64) -> Self {
        Self {
            out_dir: out_dir.to_path_buf(),
            inline_max_bytes,
            sources: HashMap::new(),
            inlined: 0,
            copied: 0,
            missing: Vec::new(),
        }
    }

    fn figure(&mut self, image: &ImageRef, caption: &str) -> Result<Markup, ReportError> {
        let img = self.img_tag(image)?;
        Ok(html! { figure { (img) figcaption { (caption) } } })
    }

    /// An `<img>` for `image`, or a visible note when the file does not exist.
    fn img_tag(&mut self, image: &ImageRef) -> Result<Markup, ReportError> {
        let name = image.path.display().to_string();
        Ok(match self.source(&image.path)? {
            Some(src) => html! {
                img src=(src) alt=(image.caption) data-name=(name) loading="eager";
            },
            None => html! { span class="missing" { "image missing: " (name) } },
        })
    }

    fn source(&mut self, path: &Path) -> Result<Option<String>, ReportError> {
        if let Some(known) = self.sources.get(path) {
            return Ok(known.clone());
        }
        let resolved = self.resolve(path)?;
        self.sources.insert(path.to_path_buf(), resolved.clone());
        Ok(resolved)
    }

    fn resolve(&mut self, path: &Path) -> Result<Option<String>, ReportError> {
        // Only a regular file (not a link to anywhere) whose header reads as an image within
        // the image limit is embedded; anything else shows as missing.
        let metadata = std::fs::symlink_metadata(path);
        let Ok(metadata) = metadata.and_then(|m| {
            let usable = m.is_file() && crate::imagefile::check(path).is_ok();
            usable
                .then_some(m)
                .ok_or(std::io::ErrorKind::InvalidData.into())
        }) else {
            self.missing.push(path.to_path_buf());
            return Ok(None);
        };
        let mime = image_mime(path)?;
        if metadata.len() <= self.inline_max_bytes {
            let bytes = std::fs::read(path).map_err(|e| io_error(path, "read the image", e))?;
            self.inlined += 1;
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            return Ok(Some(format!("data:{mime};base64,{encoded}")));
        }
        self.copy_next_to_report(path).map(Some)
    }

    /// Copies to `images/<n>-<sanitized name>` and returns that relative URL.
    fn copy_next_to_report(&mut self, path: &Path) -> Result<String, ReportError> {
        let images_dir = self.out_dir.join(IMAGES_DIR);
        create_dir(&images_dir)?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let safe: String = file_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let relative = format!("{IMAGES_DIR}/{:03}-{safe}", self.copied);
        std::fs::copy(path, self.out_dir.join(&relative))
            .map_err(|e| io_error(path, "copy the image next to the report", e))?;
        self.copied += 1;
        Ok(relative)
    }
}

fn image_mime(path: &Path) -> Result<&'static str, ReportError> {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "png" => Ok("image/png"),
        "jpg" | "jpeg" => Ok("image/jpeg"),
        "webp" => Ok("image/webp"),
        _ => Err(ReportError::ImageRead {
            path: path.to_path_buf(),
            reason: format!("unsupported file extension {extension:?} for the report"),
        }),
    }
}

fn create_dir(path: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(path).map_err(|e| io_error(path, "create the report folder", e))
}

fn io_error(path: &Path, action: &'static str, error: std::io::Error) -> ReportError {
    ReportError::Io {
        path: path.to_path_buf(),
        action,
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(0.04), "0.0 s");
        assert_eq!(format_duration(59.94), "59.9 s");
        assert_eq!(format_duration(65.0), "1 min 05 s");
        assert_eq!(format_duration(7260.0), "2 h 01 min");
        assert_eq!(format_duration(f64::NAN), "—");
    }

    #[test]
    fn input_deserializes_from_a_minimal_run_record() {
        let json = r#"{"pipeline":"demo","pipeline_file":"p.yaml","generated_at":"now","stages":[
            {"id":"db","kind":"train","status":"cached","duration_s":1.5}]}"#;
        let input: ReportInput = serde_json::from_str(json).unwrap();
        assert_eq!(input.stages[0].status, StageStatus::Cached);
        assert!(input.stages[0].images.is_empty() && input.stages[0].sweep_group.is_none());
        let bad = serde_json::from_str::<ReportInput>(&json.replace("cached", "done")).unwrap_err();
        assert!(bad.to_string().contains("unknown variant `done`"), "{bad}");
    }

    #[test]
    fn params_show_one_key_per_line() {
        let params = serde_json::json!({"learning_rate": "2e-6", "steps": 400, "flags": [1, 2]});
        assert_eq!(
            format_params(&params),
            "flags: [1,2]\nlearning_rate: 2e-6\nsteps: 400"
        );
        assert_eq!(format_params(&serde_json::Value::Null), "");
    }

    #[test]
    fn defaulted_params_fold_under_the_set_ones() {
        let params = serde_json::json!({"steps": 4, "seed": 0, "dtype": "f32"});
        let defaulted = ["seed".to_string(), "dtype".to_string()];
        assert_eq!(
            render_params(&params, &defaulted).into_string(),
            "<code>steps: 4</code><details><summary>2 defaults</summary>\
             <code>dtype: f32\nseed: 0</code></details>"
        );
        assert_eq!(
            render_params(&params, &[]).into_string(),
            "<code>dtype: f32\nseed: 0\nsteps: 4</code>"
        );
    }

    const SCRIPT: &str = "<script>alert(1)</script>";
    const ESCAPED_SCRIPT: &str = "&lt;script&gt;alert(1)&lt;/script&gt;";

    /// A stage whose id, prompt, error, caption, sweep and scores all carry markup or quotes.
    fn hostile_stage(image: PathBuf) -> StageReport {
        let metric = MetricPoint {
            step: 1,
            loss: Some(0.5),
            lr: None,
        };
        let scores = serde_json::json!({"overall": [{"model": SCRIPT, "dino": {"mean": 0.5}}]});
        StageReport {
            id: SCRIPT.to_string(),
            kind: "generate".to_string(),
            status: StageStatus::Failed,
            duration_s: 1.0,
            params: serde_json::json!({ "prompt": SCRIPT }),
            defaulted: Vec::new(),
            output_dir: Some(PathBuf::from(format!("out/{SCRIPT}"))),
            error: Some(SCRIPT.to_string()),
            metrics: vec![metric],
            images: vec![ImageRef {
                path: image,
                caption: "x\" onerror=\"alert(2)".to_string(),
                step: None,
            }],
            sweep_group: Some(SCRIPT.to_string()),
            sweep_values: BTreeMap::from([("prompt".to_string(), SCRIPT.to_string())]),
            scores: Some(scores),
        }
    }

    #[test]
    fn hostile_ids_prompts_and_quotes_are_escaped_in_text_and_attributes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("a\"b.png");
        image::RgbImage::new(2, 2).save(&image).expect("png");
        let input = ReportInput {
            pipeline: SCRIPT.to_string(),
            pipeline_file: format!("{SCRIPT}.yaml"),
            generated_at: "now".to_string(),
            stages: vec![hostile_stage(image)],
        };
        let mut store = ImageStore::new(&dir.path().join("report"), 1 << 20);
        let page = render_report(&input, &mut store).expect("render");
        // The page's own verify script is the only script element.
        assert_eq!(page.matches("<script").count(), 1, "{page}");
        assert!(!page.contains("alert(1)</script>"), "{page}");
        // Text content: title, heading, table cells, parameters, error, sweep, scores, chart.
        for context in [
            format!("<title>dreampipe: {ESCAPED_SCRIPT}</title>"),
            format!("<td>{ESCAPED_SCRIPT}</td>"),
            format!("<code>prompt: {ESCAPED_SCRIPT}</code>"),
            format!("failed<br>{ESCAPED_SCRIPT}</td>"),
            format!("<h3>{ESCAPED_SCRIPT}</h3>"),
            format!("<th>prompt={ESCAPED_SCRIPT}</th>"),
            format!("<title>{ESCAPED_SCRIPT} — loss</title>"),
        ] {
            assert!(page.contains(&context), "{context} in {page}");
        }
        // Attributes: a quote cannot close them.
        assert!(page.contains(&format!("<tr id=\"stage-{ESCAPED_SCRIPT}\">")));
        assert!(
            page.contains("alt=\"x&quot; onerror=&quot;alert(2)\""),
            "{page}"
        );
        assert!(page.contains("a&quot;b.png\" loading=\"eager\">"), "{page}");
        assert!(!page.contains("\" onerror="), "{page}");
    }

    #[test]
    fn only_regular_files_that_read_as_images_are_embedded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret.txt");
        std::fs::write(&secret, "outside").expect("write");
        let real = dir.path().join("real.png");
        image::RgbImage::new(2, 2).save(&real).expect("png");
        let leak = dir.path().join("leak.png");
        std::os::unix::fs::symlink(&secret, &leak).expect("link");
        let linked_image = dir.path().join("linked.png");
        std::os::unix::fs::symlink(&real, &linked_image).expect("link");
        let text = dir.path().join("text.png");
        std::fs::write(&text, "not a png").expect("write");
        let mut store = ImageStore::new(&dir.path().join("report"), 1 << 20);
        let embedded = store.source(&real).expect("source");
        assert!(embedded.is_some_and(|src| src.starts_with("data:image/png;base64,")));
        for refused in [&leak, &linked_image, &text] {
            assert_eq!(
                store.source(refused).expect("source"),
                None,
                "{}",
                refused.display()
            );
        }
        assert_eq!(store.missing, [leak, linked_image, text]);
    }
}
