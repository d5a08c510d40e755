//! `dreampipe report PIPELINE [--out DIR] [--check] [--screenshot PNG]`: the HTML report of the
//! pipeline's latest run (see `report::build`); `run` writes the same report after every run.
use super::Context;
use super::common::PipelineArgs;
use crate::cache::store::{Store, now_unix};
use crate::exec::record::RunRecord;
use crate::pipeline::Pipeline;
use crate::report::browser::{check_page, screenshot};
use crate::report::build::{
    build_input, current_report, default_report_dir, latest_record, publish_replacing,
    report_fingerprint, write_report_link,
};
use crate::report::html::write_report;
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Write the report here (index.html + images/) instead of `<cache>/reports/<pipeline>/`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Open the written page in headless Chromium and fail unless every image loads and no
    /// script error or console message appears.
    #[arg(long)]
    pub check: bool,
    /// Also render the page in headless Chromium into this PNG (docs, issues).
    #[arg(long, value_name = "PNG")]
    pub screenshot: Option<PathBuf>,
    /// Size of the screenshot in CSS pixels, WIDTHxHEIGHT (the page is cut at HEIGHT).
    #[arg(long, value_name = "WxH", default_value = "1280x1600", value_parser = parse_size)]
    pub screenshot_size: (u32, u32),
}

/// "1280x1600" → (1280, 1600).
fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let parse = |part: &str| part.trim().parse::<u32>().ok().filter(|v| *v > 0);
    text.split_once('x')
        .and_then(|(w, h)| Some((parse(w)?, parse(h)?)))
        .ok_or_else(|| format!("`{text}` is not WIDTHxHEIGHT in pixels, e.g. 1280x1600"))
}

pub fn run(context: &Context, args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let pipeline = args.pipeline.load(context)?;
    let store = Store::open(&context.cache_root)?;
    let record = latest_record(&store, &pipeline.name);
    let page = write(&pipeline, record.as_ref(), &store, args.out.as_deref())?;
    println!("report: {}", page.display());
    if args.check {
        let check = check_page(&page)?;
        if !check.is_clean() {
            anyhow::bail!(
                "{}: the browser check found problems: broken images [{}], page errors [{}], console [{}]",
                page.display(),
                check.broken_images.join(", "),
                check.page_errors.join(", "),
                check.console_messages.join(", ")
            );
        }
        println!(
            "browser check: clean ({} images loaded)",
            check.images_checked
        );
    }
    if let Some(png) = &args.screenshot {
        let (width, height) = args.screenshot_size;
        screenshot(&page, png, width, height)?;
        println!("screenshot: {}", png.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds and writes the report (to `out`, or the default folder plus its `runs/` link, kept
/// as it is when still current) and returns the page; warnings about single stages go to
/// stderr.
pub fn write(
    pipeline: &Pipeline,
    record: Option<&RunRecord>,
    store: &Store,
    out: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let built = build_input(pipeline, record, store, now_unix())?;
    for warning in &built.warnings {
        eprintln!("warning: report: {warning}");
    }
    let summary = match out {
        Some(dir) => write_report(&built.input, dir)?,
        None => {
            let dir = default_report_dir(store, &pipeline.name);
            let fingerprint = report_fingerprint(&built);
            if let Some(page) = current_report(&dir, &fingerprint) {
                return Ok(page);
            }
            let summary = publish_replacing(&built.input, &fingerprint, &dir)?;
            write_report_link(store, &pipeline.name)?;
            summary
        }
    };
    for missing in &summary.missing_images {
        eprintln!(
            "warning: report: image {} does not exist (shown as missing)",
            missing.display()
        );
    }
    Ok(summary.page)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn screenshot_sizes_are_width_x_height() {
        assert_eq!(parse_size("1280x1600"), Ok((1280, 1600)));
        assert_eq!(
            parse_size("1280"),
            Err("`1280` is not WIDTHxHEIGHT in pixels, e.g. 1280x1600".to_string())
        );
        assert!(parse_size("0x10").is_err());
    }
}
