//! The static HTML report of one pipeline run, built from [`ReportInput`] (which the runner fills
//! from its run record). The page is self-contained: no server, network, external CSS/JS/fonts
//! (a Content-Security-Policy forbids them). Images up to [`INLINE_IMAGE_MAX_BYTES`] are inlined
//! as base64 data URIs; larger ones (big grids) are copied to `images/` next to `index.html` and
//! referenced by relative path, so the report folder can be moved or zipped as a whole.
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::metrics::MetricPoint;
use super::svg::{ChartSpec, line_chart};
use super::{ReportError, escape_html};

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

/// Renders the whole page, resolving images through `store`.
pub fn render_report(input: &ReportInput, store: &mut ImageStore) -> Result<String, ReportError> {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"{CONTENT_SECURITY_POLICY}\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>dreampipe: {}</title><style>{STYLE}</style></head>\
         <body><script>{VERIFY_SCRIPT}</script>",
        escape_html(&input.pipeline)
    );
    page.push_str(&render_header(input));
    page.push_str(&render_stage_table(&input.stages));
    page.push_str(&super::scores::render_scores(&input.stages));
    page.push_str(&render_sweeps(&input.stages, store)?);
    page.push_str(&render_curves(&input.stages));
    page.push_str(&render_validation(&input.stages, store)?);
    page.push_str(&render_outputs(&input.stages, store)?);
    page.push_str("</body></html>\n");
    Ok(page)
}

fn render_header(input: &ReportInput) -> String {
    let count = |status: StageStatus| input.stages.iter().filter(|s| s.status == status).count();
    let total_s: f64 = input
        .stages
        .iter()
        .map(|s| s.duration_s)
        .filter(|d| d.is_finite())
        .sum();
    format!(
        "<header><h1>{}</h1><p>Pipeline file <code>{}</code> · generated {}</p>\
         <p class=\"totals\">{} stages: {} ran, {} cached, {} failed, {} skipped · total stage time {}</p></header>",
        escape_html(&input.pipeline),
        escape_html(&input.pipeline_file),
        escape_html(&input.generated_at),
        input.stages.len(),
        count(StageStatus::Ran),
        count(StageStatus::Cached),
        count(StageStatus::Failed),
        count(StageStatus::Skipped),
        format_duration(total_s)
    )
}

fn render_stage_table(stages: &[StageReport]) -> String {
    let mut html = String::from(
        "<h2>Stages</h2><table class=\"stages\"><tr><th>stage</th><th>kind</th><th>status</th>\
         <th>duration</th><th>parameters</th><th>output</th></tr>",
    );
    for stage in stages {
        let status = stage.status.as_str();
        let error = stage
            .error
            .as_deref()
            .map(|e| format!("<br>{}", escape_html(e)))
            .unwrap_or_default();
        let output = stage
            .output_dir
            .as_ref()
            .map(|p| escape_html(&p.display().to_string()))
            .unwrap_or_default();
        let _ = write!(
            html,
            "<tr id=\"stage-{}\"><td>{}</td><td>{}</td><td class=\"status-{status}\">{status}{error}</td><td class=\"duration\">{}</td>\
             <td>{}</td><td><code>{output}</code></td></tr>",
            escape_html(&stage.id),
            escape_html(&stage.id),
            escape_html(&stage.kind),
            format_duration(stage.duration_s),
            render_params(&stage.params, &stage.defaulted)
        );
    }
    html.push_str("</table>");
    html
}

/// The parameters set in the pipeline, then the defaulted ones folded in a `<details>`.
fn render_params(params: &serde_json::Value, defaulted: &[String]) -> String {
    let Some(map) = params.as_object() else {
        return format!("<code>{}</code>", escape_html(&format_params(params)));
    };
    let (defaults, set): (serde_json::Map<_, _>, serde_json::Map<_, _>) = map
        .clone()
        .into_iter()
        .partition(|(name, _)| defaulted.contains(name));
    let mut html = format!(
        "<code>{}</code>",
        escape_html(&format_params(&serde_json::Value::Object(set)))
    );
    if !defaults.is_empty() {
        let _ = write!(
            html,
            "<details><summary>{} default{}</summary><code>{}</code></details>",
            defaults.len(),
            if defaults.len() == 1 { "" } else { "s" },
            escape_html(&format_params(&serde_json::Value::Object(defaults)))
        );
    }
    html
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
fn render_sweeps(stages: &[StageReport], store: &mut ImageStore) -> Result<String, ReportError> {
    let mut groups: BTreeMap<&str, Vec<&StageReport>> = BTreeMap::new();
    for stage in stages {
        if let Some(group) = &stage.sweep_group {
            groups.entry(group).or_default().push(stage);
        }
    }
    if groups.is_empty() {
        return Ok(String::new());
    }
    let mut html = String::from("<h2>Sweeps</h2>");
    for (group, variants) in groups {
        html.push_str(&render_sweep_table(group, &variants, store)?);
    }
    Ok(html)
}

fn render_sweep_table(
    group: &str,
    variants: &[&StageReport],
    store: &mut ImageStore,
) -> Result<String, ReportError> {
    let mut columns: Vec<&str> = Vec::new();
    for image in variants.iter().flat_map(|v| final_images(v)) {
        if !columns.contains(&image.caption.as_str()) {
            columns.push(&image.caption);
        }
    }
    let mut html = format!(
        "<h3>{}</h3><table class=\"compare\"><tr><th>variant</th>",
        escape_html(group)
    );
    for column in &columns {
        let _ = write!(html, "<th>{}</th>", escape_html(column));
    }
    html.push_str("</tr>");
    for variant in variants {
        let _ = write!(
            html,
            "<tr><th>{}</th>",
            escape_html(&variant_label(variant))
        );
        for column in &columns {
            let cell = match final_images(variant).find(|image| image.caption == *column) {
                Some(image) => store.img_tag(image)?,
                None => "—".to_string(),
            };
            let _ = write!(html, "<td>{cell}</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    Ok(html)
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
fn render_curves(stages: &[StageReport]) -> String {
    let trained: Vec<&StageReport> = stages.iter().filter(|s| !s.metrics.is_empty()).collect();
    if trained.is_empty() {
        return String::new();
    }
    let mut html = String::from("<h2>Training curves</h2>");
    for stage in trained {
        let _ = write!(
            html,
            "<h3>{}</h3><div class=\"charts\">",
            escape_html(&stage.id)
        );
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
        for (name, values) in series {
            if values.iter().all(Option::is_none) {
                continue;
            }
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
            html.push_str(&line_chart(&points, &spec));
        }
        html.push_str("</div>");
    }
    html
}

/// Validation samples of each stage, in step order.
fn render_validation(
    stages: &[StageReport],
    store: &mut ImageStore,
) -> Result<String, ReportError> {
    let mut html = String::new();
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
        let _ = write!(
            html,
            "<h3>{}</h3><div class=\"samples\">",
            escape_html(&stage.id)
        );
        for sample in samples {
            let step = sample.step.unwrap_or_default();
            let caption = format!("step {step} · {}", sample.caption);
            html.push_str(&store.figure(sample, &caption)?);
        }
        html.push_str("</div>");
    }
    if html.is_empty() {
        return Ok(html);
    }
    Ok(format!("<h2>Validation samples</h2>{html}"))
}

/// Final images (grids, samples) of each stage.
fn render_outputs(stages: &[StageReport], store: &mut ImageStore) -> Result<String, ReportError> {
    let mut html = String::new();
    for stage in stages {
        let images: Vec<&ImageRef> = final_images(stage).collect();
        if images.is_empty() {
            continue;
        }
        let _ = write!(
            html,
            "<h3>{}</h3><div class=\"outputs\">",
            escape_html(&stage.id)
        );
        for image in images {
            html.push_str(&store.figure(image, &image.caption)?);
        }
        html.push_str("</div>");
    }
    if html.is_empty() {
        return Ok(html);
    }
    Ok(format!("<h2>Images</h2>{html}"))
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

    fn figure(&mut self, image: &ImageRef, caption: &str) -> Result<String, ReportError> {
        let img = self.img_tag(image)?;
        Ok(format!(
            "<figure>{img}<figcaption>{}</figcaption></figure>",
            escape_html(caption)
        ))
    }

    /// An `<img>` for `image`, or a visible note when the file does not exist.
    fn img_tag(&mut self, image: &ImageRef) -> Result<String, ReportError> {
        let name = escape_html(&image.path.display().to_string());
        match self.source(&image.path)? {
            Some(src) => Ok(format!(
                "<img src=\"{}\" alt=\"{}\" data-name=\"{name}\" loading=\"eager\">",
                escape_html(&src),
                escape_html(&image.caption)
            )),
            None => Ok(format!(
                "<span class=\"missing\">image missing: {name}</span>"
            )),
        }
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
            {"id":"db","kind":"dreambooth","status":"cached","duration_s":1.5}]}"#;
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
            render_params(&params, &defaulted),
            "<code>steps: 4</code><details><summary>2 defaults</summary>\
             <code>dtype: f32\nseed: 0</code></details>"
        );
        assert_eq!(
            render_params(&params, &[]),
            "<code>dtype: f32\nseed: 0\nsteps: 4</code>"
        );
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
