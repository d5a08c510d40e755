//! The HTML report: content, escaping, inline vs copied images, and a real load in headless
//! Chromium (required: install it with `apt-get install -y chromium`; this test fails without it).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dreampipe_core::report::browser::{check_page, screenshot};
use dreampipe_core::report::html::{ImageRef, ReportInput, StageReport, StageStatus, write_report};
use dreampipe_core::report::metrics::read_metrics_jsonl;
use image::{Rgb, RgbImage};

/// Raw text that would inject markup if it were not escaped.
const INJECTION: &str = "\"><script>document.title='pwned'</script><img src=x onerror=alert(1)>";
const METRIC_POINTS: u64 = 200;

fn save_gradient(path: &Path, size: u32, tint: u8) -> PathBuf {
    RgbImage::from_fn(size, size, |x, y| {
        Rgb([(x * 255 / size) as u8, (y * 255 / size) as u8, tint])
    })
    .save(path)
    .unwrap();
    path.to_path_buf()
}

/// Pseudo-random pixels: PNG cannot compress them, so the file exceeds the inline limit.
fn save_noise(path: &Path, size: u32) -> PathBuf {
    let mut state: u32 = 0x1234_5678;
    RgbImage::from_fn(size, size, |_, _| {
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        };
        Rgb([next(), next(), next()])
    })
    .save(path)
    .unwrap();
    path.to_path_buf()
}

/// 200 points of a decaying loss (one NaN logged as null) plus a line cut off by a kill.
fn write_metrics(path: &Path) {
    let mut text = String::new();
    for step in 1..=METRIC_POINTS {
        let loss = if step == 120 {
            "null".to_string()
        } else {
            format!("{}", 0.5 / (1.0 + step as f64 / 20.0))
        };
        let lr = 2e-6 * (step.min(20) as f64 / 20.0);
        text.push_str(&format!(
            "{{\"step\":{step},\"loss\":{loss},\"lr\":{lr:e}}}\n"
        ));
    }
    text.push_str("{\"step\":201,\"lo");
    std::fs::write(path, text).unwrap();
}

fn image(path: PathBuf, caption: &str, step: Option<u64>) -> ImageRef {
    ImageRef {
        path,
        caption: caption.to_string(),
        step,
    }
}

fn stage(id: &str, kind: &str, status: StageStatus) -> StageReport {
    StageReport {
        id: id.to_string(),
        kind: kind.to_string(),
        status,
        duration_s: 0.0,
        params: serde_json::Value::Null,
        defaulted: vec![],
        output_dir: None,
        error: None,
        metrics: vec![],
        images: vec![],
        sweep_group: None,
        sweep_values: BTreeMap::new(),
        scores: None,
    }
}

fn db_variant(dir: &Path, learning_rate: &str, tint: u8) -> StageReport {
    let mut db = stage(
        &format!("db[learning_rate={learning_rate}]"),
        "dreambooth",
        StageStatus::Ran,
    );
    db.duration_s = 754.0;
    db.params = serde_json::json!({"learning_rate": learning_rate, "max_train_steps": 400});
    db.sweep_group = Some("db".to_string());
    db.sweep_values
        .insert("learning_rate".to_string(), learning_rate.to_string());
    for seed in [1, 2] {
        let path = save_gradient(
            &dir.join(format!("db-{learning_rate}-seed{seed}.png")),
            64,
            tint + seed,
        );
        db.images.push(image(
            path,
            &format!("a photo of sks dog, seed {seed}"),
            None,
        ));
    }
    db
}

/// A run with cached/ran/failed stages, a 200-point training curve with validation samples,
/// two sweep variants, a large grid (copied) and a missing image.
fn fake_report(dir: &Path) -> ReportInput {
    let mut images = stage("images", "images", StageStatus::Cached);
    images.duration_s = 0.02;
    let mut ti = stage("ti", "textual_inversion", StageStatus::Ran);
    ti.duration_s = 3725.0;
    ti.params = serde_json::json!({"token": "<sks>", "note": INJECTION});
    let metrics_path = dir.join("metrics.jsonl");
    write_metrics(&metrics_path);
    ti.metrics = read_metrics_jsonl(&metrics_path).unwrap().points;
    for step in [50, 100, 150, 200] {
        let path = save_gradient(&dir.join(format!("ti-val-{step}.png")), 48, step as u8);
        ti.images.push(image(path, "a <sks> toy", Some(step)));
    }
    let mut grid = stage("grid", "sample_grid", StageStatus::Ran);
    grid.images.push(image(
        save_noise(&dir.join("big grid #1.png"), 320),
        INJECTION,
        None,
    ));
    grid.images
        .push(image(dir.join("never-written.png"), "lost sample", None));
    let mut failed = stage("db_extra", "dreambooth", StageStatus::Failed);
    failed.error = Some("CUDA out of memory <at step 3>".to_string());
    ReportInput {
        pipeline: format!("demo {INJECTION}"),
        pipeline_file: "pipelines/demo.yaml".to_string(),
        generated_at: "2026-11-26T10:20:00Z".to_string(),
        stages: vec![
            images,
            ti,
            db_variant(dir, "2e-6", 10),
            db_variant(dir, "5e-6", 90),
            grid,
            failed,
            stage("upscale", "upscale", StageStatus::Skipped),
        ],
    }
}

#[test]
fn report_content_is_escaped_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let input = fake_report(dir.path());
    assert_eq!(
        input.stages[1].metrics.len(),
        METRIC_POINTS as usize,
        "the truncated line is dropped"
    );
    let out = dir.path().join("report");
    let summary = write_report(&input, &out).unwrap();
    let page = std::fs::read_to_string(&summary.page).unwrap();

    assert!(!page.contains(INJECTION) && !page.contains("<script>document.title"));
    // maud escapes `&<>"`; it leaves `'` as it is (it writes every attribute in double quotes).
    assert!(page.contains("&quot;&gt;&lt;script&gt;document.title='pwned'&lt;/script&gt;"));
    assert!(!page.contains("onerror=alert") || page.contains("&lt;img src=x onerror=alert(1)&gt;"));
    assert_eq!(
        page.matches("<script>").count(),
        1,
        "only the verify script"
    );
    assert!(
        page.contains(
            "7 stages: 4 ran, 1 cached, 1 failed, 1 skipped · total stage time 1 h 27 min"
        )
    );
    assert!(
        page.contains(">1 h 02 min</td>")
            && page.contains(">12 min 34 s</td>")
            && page.contains(">0.0 s</td>")
    );
    assert!(page.contains("CUDA out of memory &lt;at step 3&gt;"));

    // Curves: loss and learning rate for the one trained stage.
    assert_eq!(page.matches("<svg class=\"chart\"").count(), 2);
    assert!(
        page.contains("<title>ti — loss</title>")
            && page.contains("<title>ti — learning rate</title>")
    );
    assert!(page.contains(">2e-6</text>"));

    // Validation samples in step order, 6 gradient images + 4 samples inlined, grid copied.
    let positions: Vec<usize> = [50, 100, 150, 200]
        .iter()
        .map(|s| page.find(&format!("step {s} · a &lt;sks&gt; toy")).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    assert_eq!((summary.inlined_images, summary.copied_images), (8, 1));
    assert_eq!(
        summary.missing_images,
        vec![dir.path().join("never-written.png")]
    );
    assert!(page.contains("image missing: "));
    assert!(page.contains("src=\"images/000-big_grid__1.png\""));
    assert!(out.join("images/000-big_grid__1.png").is_file());
    assert!(
        !page.contains("src=\"http") && !page.contains("href="),
        "no network references"
    );

    // Sweep comparison: rows = variants, columns = the two seeds.
    let sweep = &page
        [page.find("<h2>Sweeps</h2>").unwrap()..page.find("<h2>Training curves</h2>").unwrap()];
    assert!(
        sweep.contains("<th>learning_rate=2e-6</th>")
            && sweep.contains("<th>learning_rate=5e-6</th>")
    );
    assert_eq!(sweep.matches("<th>a photo of sks dog, seed ").count(), 2);
    assert_eq!(sweep.matches("<img ").count(), 4);
}

#[test]
fn report_loads_in_headless_chromium_with_all_images_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let summary = write_report(&fake_report(dir.path()), &dir.path().join("report")).unwrap();
    let page = std::fs::read_to_string(&summary.page).unwrap();
    let check = check_page(&summary.page).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        check.verified,
        "the page's verify script did not run: {check:?}"
    );
    assert_eq!(check.images_checked, page.matches("<img ").count());
    assert!(check.images_checked >= 13);
    assert!(check.is_clean(), "{check:?}");

    let shot = dir.path().join("report.png");
    screenshot(&summary.page, &shot, 1280, 2000).unwrap_or_else(|e| panic!("{e}"));
    let pixels = image::open(&shot).unwrap().to_rgb8();
    assert_eq!(pixels.dimensions(), (1280, 2000));
    let non_white = pixels.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(
        non_white > 10_000,
        "screenshot looks blank ({non_white} non-white pixels)"
    );
}

#[test]
fn chromium_check_catches_broken_images_and_script_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut input = fake_report(dir.path());
    input.stages.truncate(1);
    let page = write_report(&input, dir.path()).unwrap().page;
    let html = std::fs::read_to_string(&page).unwrap().replace(
        "</body>",
        "<img src=\"not-there.png\" data-name=\"not-there.png\"><script>undefinedFunction();</script></body>",
    );
    std::fs::write(&page, html).unwrap();
    let check = check_page(&page).unwrap_or_else(|e| panic!("{e}"));
    assert!(check.verified);
    assert!(!check.is_clean());
    assert_eq!(check.broken_images, vec!["not-there.png"]);
    assert!(
        check
            .page_errors
            .iter()
            .any(|e| e == "cannot load img not-there.png"),
        "{check:?}"
    );
    assert!(
        check
            .page_errors
            .iter()
            .any(|e| e.contains("undefinedFunction")),
        "{check:?}"
    );
    assert!(
        check
            .console_messages
            .iter()
            .any(|m| m.contains("undefinedFunction")),
        "{check:?}"
    );
}

/// An `evaluate` stage scoring a learning-rate sweep (values in the order `scores.json` lists
/// them: not ranked).
fn evaluate_stage() -> StageReport {
    let mut eval = stage("eval", "evaluate", StageStatus::Ran);
    let variant = |lr: &str, dino: f64, clip_t: f64| {
        serde_json::json!({
            "model": format!("db[learning_rate={lr}]"), "n": 8,
            "dino": {"mean": dino, "std": 0.01}, "clip_i": {"mean": 0.7, "std": 0.02},
            "clip_t": {"mean": clip_t, "std": 0.03}, "pres": {"mean": 0.5, "std": 0.1, "n": 4},
        })
    };
    eval.scores = Some(serde_json::json!({
        "per_image": [], "groups": [],
        "overall": [variant("1e-6", 0.61, 0.30), variant("5e-6", 0.72, 0.27), variant("2e-6", 0.65, 0.29)],
    }));
    eval
}

#[test]
fn scores_rank_the_variants_and_chart_them_against_the_swept_parameter_with_paper_lines() {
    let dir = tempfile::tempdir().unwrap();
    let input = ReportInput {
        pipeline: "sweep".to_string(),
        pipeline_file: "sweep.yaml".to_string(),
        generated_at: "2026-12-04T23:00:00Z".to_string(),
        stages: vec![evaluate_stage()],
    };
    let summary = write_report(&input, &dir.path().join("report")).unwrap();
    let page = std::fs::read_to_string(&summary.page).unwrap();
    // Ranked by DINO: 5e-6, 2e-6, 1e-6; the swept parameter is a column.
    let rows: Vec<&str> = page
        .match_indices("<tr><td>")
        .map(|(i, _)| &page[i..i + 90])
        .collect();
    assert!(
        rows[0].starts_with(
            "<tr><td>1</td><th>db[learning_rate=5e-6]</th><td>5e-6</td><td>8</td><td>0.720</td>"
        ),
        "{}",
        rows[0]
    );
    assert!(
        rows[1].contains("db[learning_rate=2e-6]") && rows[2].contains("db[learning_rate=1e-6]")
    );
    assert!(page.contains("<th>learning_rate</th>"));
    assert!(page.contains("<th>DreamBooth (Stable Diffusion) (Table 1)</th>"));
    // One chart per metric against learning_rate; Table 1 as labelled reference lines:
    // DINO 3, CLIP-I 3, CLIP-T 2, PRES none.
    assert_eq!(page.matches("<svg class=\"chart\"").count(), 4);
    assert_eq!(page.matches("class=\"axis-label\" x=").count(), 8);
    assert_eq!(page.matches(">learning_rate</text>").count(), 4);
    assert_eq!(page.matches("class=\"reference\"").count(), 8);
    assert!(page.contains(">paper: Real images 0.774</text>"));
    assert!(page.contains(">paper: Textual Inversion (Stable Diffusion) 0.255</text>"));
    let check = check_page(&summary.page).unwrap_or_else(|e| panic!("{e}"));
    assert!(check.verified && check.is_clean(), "{check:?}");
    if let Some(shot) = std::env::var_os("DREAMPIPE_SCORES_SHOT") {
        screenshot(&summary.page, Path::new(&shot), 1280, 900).unwrap_or_else(|e| panic!("{e}"));
    }
}
