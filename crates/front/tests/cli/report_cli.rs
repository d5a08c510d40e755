//! The HTML report written after `dreampipe run` and by `dreampipe report`, on a CPU pipeline of
//! `command` stages that follow the stage conventions (`metrics.jsonl`, `report.json`, PNGs).
use crate::runner_support::Project;
use base64::Engine as _;
use dreampipe_core::report::browser::check_page;
use std::path::{Path, PathBuf};

const PIPELINE: &str = r#"
name: study
stages:
  data:
    kind: command
    inputs: assets
    run: cp $PIPELINE_DIR/assets/red.png $OUT/input.png; echo notes > $OUT/notes.txt
  train:
    kind: command
    needs: data
    inputs: assets
    matrix:
      run: ["sh $PIPELINE_DIR/assets/train.sh red", "sh $PIPELINE_DIR/assets/train.sh blue"]
  broken:
    kind: command
    run: |
      echo '{"images": [{"path": "../x.png", "caption": "escape"}]}' > $OUT/report.json
"#;

/// Writes three metric lines, a final sample and a step-2 validation sample (copies of the
/// colour named by `$1`), and the `report.json` listing both.
const TRAIN_SCRIPT: &str = r#"set -e
mkdir -p $OUT/samples
for step in 1 2 3; do
  echo "{\"step\": $step, \"loss\": 0.$((9 - step)), \"lr\": 2e-6}" >> $OUT/metrics.jsonl
done
cp $PIPELINE_DIR/assets/$1.png $OUT/samples/final.png
cp $PIPELINE_DIR/assets/$1.png $OUT/samples/step-2.png
cat > $OUT/report.json <<EOF
{"images": [{"path": "samples/final.png", "caption": "final sample", "step": null},
            {"path": "samples/step-2.png", "caption": "validation", "step": 2}]}
EOF
"#;

const RED_ID: &str = "train[run=sh $PIPELINE_DIR/assets/train.sh red]";
const BLUE_ID: &str = "train[run=sh $PIPELINE_DIR/assets/train.sh blue]";

fn write_png(path: &Path, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(6, 4, image::Rgb(rgb))
        .save(path)
        .expect("write png");
}

fn project() -> Project {
    let project = Project::new();
    project.write("p.yaml", PIPELINE);
    project.write("assets/train.sh", TRAIN_SCRIPT);
    write_png(&project.path("assets/red.png"), [255, 0, 0]);
    write_png(&project.path("assets/blue.png"), [0, 0, 255]);
    project
}

fn data_uri(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read png");
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The page path printed on a `report: PATH` line.
fn printed_report(stdout: &str) -> PathBuf {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .unwrap_or_else(|| panic!("no report line in:\n{stdout}"));
    PathBuf::from(line)
}

#[test]
fn run_writes_a_report_with_stages_sweep_chart_and_images_that_chromium_loads() {
    let project = project();
    let run = project.run("p.yaml", &[]);
    assert!(run.success(), "{}{}", run.stdout, run.stderr);
    let page_path = printed_report(&run.stdout);
    assert_eq!(
        page_path,
        std::path::absolute(project.cache().join("reports/study/index.html")).unwrap()
    );
    let page = std::fs::read_to_string(&page_path).expect("report page");

    for id in ["data", RED_ID, BLUE_ID, "broken"] {
        assert!(page.contains(&format!("<tr id=\"stage-{id}\">")), "{id}");
    }
    assert!(page.contains("<p class=\"totals\">4 stages: 4 ran, 0 cached, 0 failed, 0 skipped"));
    // The sweep table: one row per variant, the final sample matched by caption.
    let sweep = "<h2>Sweeps</h2><h3>train</h3><table class=\"compare\"><tr><th>variant</th><th>final sample</th></tr>\
                 <tr><th>run=sh $PIPELINE_DIR/assets/train.sh red</th><td><img src=\"";
    assert!(page.contains(sweep), "{page}");
    // Loss and learning-rate charts for both variants, with the 3 logged steps.
    assert!(page.contains("<h2>Training curves</h2>"));
    assert_eq!(page.matches("<svg class=\"chart\"").count(), 4);
    assert!(page.contains(&format!("<title>{RED_ID} — loss</title>")));
    // Images: the listed ones (sweep table, validation, outputs), the top-level PNG of `data`.
    let red = data_uri(&project.path("assets/red.png"));
    let blue = data_uri(&project.path("assets/blue.png"));
    assert_eq!(
        page.matches(&red).count(),
        4,
        "sweep cell, validation, output, input.png"
    );
    assert_eq!(page.matches(&blue).count(), 3);
    assert!(page.contains("<figcaption>step 2 · validation</figcaption>"));
    assert!(page.contains("<figcaption>input.png</figcaption>"));
    // The broken image list is a warning naming the file, not a failed run.
    assert!(
        run.stderr.contains(
            "report.json: image path `../x.png` must be relative to the stage's output folder, without `..`"
        ),
        "{}",
        run.stderr
    );
    // The stable link redirects to the page.
    let link = project.read("cache/runs/study/report.html");
    assert!(
        link.contains("url=../../reports/study/index.html"),
        "{link}"
    );

    let check = check_page(&page_path).expect("headless chromium");
    assert!(check.is_clean(), "{check:?}");
    assert_eq!(check.images_checked, 7);
}

#[test]
fn report_after_only_shows_the_other_stages_from_the_cache() {
    let project = project();
    assert!(project.run("p.yaml", &[]).success());
    let only = project.run("p.yaml", &["--only", "data", "--force", "data"]);
    assert!(only.success(), "{}{}", only.stdout, only.stderr);
    let (ok, stdout, stderr) = project.dreampipe(&["report", "p.yaml", "--out", "out", "--check"]);
    assert!(ok, "{stderr}");
    assert_eq!(printed_report(&stdout), PathBuf::from("out/index.html"));
    assert!(
        stdout.ends_with("browser check: clean (7 images loaded)\n"),
        "{stdout}"
    );
    let page = project.read("out/index.html");
    assert!(
        page.contains("4 stages: 1 ran, 3 cached, 0 failed, 0 skipped"),
        "{page}"
    );
    assert!(page.contains(&format!(
        "<tr id=\"stage-{RED_ID}\"><td>{RED_ID}</td><td>command</td><td class=\"status-cached\">cached</td>"
    )));
    assert_eq!(page.matches("<svg class=\"chart\"").count(), 4);

    let (ok, stdout, stderr) = project.dreampipe(&[
        "report",
        "p.yaml",
        "--out",
        "out",
        "--screenshot",
        "shot.png",
        "--screenshot-size",
        "640x480",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.ends_with("screenshot: shot.png\n"), "{stdout}");
    assert_eq!(
        image::image_dimensions(project.path("shot.png")).unwrap(),
        (640, 480)
    );
}

#[test]
fn report_of_a_pipeline_never_run_says_so() {
    let project = project();
    let (ok, _, stderr) = project.dreampipe(&["report", "p.yaml"]);
    assert!(!ok);
    let cache = std::path::absolute(project.cache()).unwrap();
    assert!(
        stderr.contains(&format!(
            "pipeline `study` (p.yaml) has no run in cache `{}`; run `dreampipe run p.yaml` first (or pass the --cache the run used)",
            cache.display()
        )),
        "{stderr}"
    );
}

#[test]
fn a_no_op_rerun_keeps_the_report_and_a_changed_result_replaces_it() {
    let project = project();
    assert!(project.run("p.yaml", &[]).success());
    let second = project.run("p.yaml", &[]);
    assert!(second.success(), "{}", second.stderr);
    let page_path = printed_report(&second.stdout);
    let after_second = std::fs::read_to_string(&page_path).unwrap();
    assert!(
        after_second.contains("4 stages: 0 ran, 4 cached"),
        "{after_second}"
    );
    std::fs::write(&page_path, "marker").unwrap();
    let third = project.run("p.yaml", &[]);
    assert!(third.success(), "{}", third.stderr);
    assert_eq!(std::fs::read_to_string(&page_path).unwrap(), "marker");
    // A new result of `data` (other bytes) reruns its dependents: the report is rebuilt.
    write_png(&project.path("assets/red.png"), [250, 0, 0]);
    let fourth = project.run("p.yaml", &[]);
    assert!(fourth.success(), "{}", fourth.stderr);
    let rebuilt = std::fs::read_to_string(&page_path).unwrap();
    assert!(rebuilt.contains("4 stages: 3 ran, 1 cached"), "{rebuilt}");
    assert!(rebuilt.contains(&data_uri(&project.path("assets/red.png"))));
}

#[test]
fn a_failed_run_still_gets_a_report_showing_the_error() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "name: failing\nstages:\n  ok:\n    kind: command\n    run: echo fine > $OUT/a.txt\n  bad:\n    kind: command\n    needs: ok\n    run: exit 3\n  after:\n    kind: command\n    needs: bad\n    run: echo never > $OUT/b.txt\n",
    );
    let run = project.run("p.yaml", &[]);
    assert_eq!(run.output.status.code(), Some(1), "{}", run.stderr);
    let page = std::fs::read_to_string(printed_report(&run.stdout)).expect("report page");
    assert!(
        page.contains("3 stages: 1 ran, 0 cached, 1 failed, 1 skipped"),
        "{page}"
    );
    assert!(
        page.contains("<td class=\"status-failed\">failed<br>command exited with status 3</td>"),
        "{page}"
    );
}
