//! Seeing results: a self-contained static HTML report of a pipeline run (stage table, loss /
//! learning-rate curves as inline SVG, validation samples, grids, sweep comparisons), the
//! `metrics.jsonl` reader, and a headless-Chromium check / screenshot of the
//! report. Independent of the runner and the SD code: the runner fills [`html::ReportInput`].
//! Also the live reporters: `progress` (indicatif bars on a terminal, plain lines otherwise) and
//! the end-of-run `summary` table; they only consume executor events/records. `build` fills the
//! report's input from run records and the cache, and knows the default report location.
//!
//! Every page (the report, its SVG charts, the redirect page) is a `maud` template: values are
//! escaped by the template engine, so no interpolation can forget it.
pub mod browser;
pub mod build;
pub mod html;
pub mod metrics;
pub mod progress;
pub mod scores;
pub mod summary;
pub mod svg;

use std::path::PathBuf;

/// Why a report or a browser check could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: cannot read image: {reason}; give a PNG, JPEG or WebP file")]
    ImageRead { path: PathBuf, reason: String },
    #[error("{path}: cannot {action}: {reason}")]
    Io {
        path: PathBuf,
        action: &'static str,
        reason: String,
    },
    #[error("{path}:{line}: bad metrics line: {reason}")]
    Metrics {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "headless Chromium not found (tried {tried}); install it (Debian/Ubuntu: `apt-get install -y chromium`) \
         or set DREAMPIPE_CHROMIUM to the browser binary"
    )]
    BrowserMissing { tried: String },
    #[error(
        "pipeline `{pipeline}` ({file}) has no run in cache `{cache}`; run `dreampipe run {file}` first \
         (or pass the --cache the run used)"
    )]
    NeverRun {
        pipeline: String,
        file: PathBuf,
        cache: PathBuf,
    },
    #[error("headless Chromium on {page}: {reason}")]
    Browser { page: PathBuf, reason: String },
}
