//! Cache behaviour of `dreampipe run` with `command` stages: what reruns and what does not.
use crate::runner_support::Project;

/// a → b → c, plus an independent d; a reads data/.
const CHAIN: &str = r#"
name: chain
params:
  greeting: hello
stages:
  a:
    kind: command
    inputs: data
    run: cat $PIPELINE_DIR/data/x.txt > $OUT/a.txt; echo ${params.greeting} >> $OUT/a.txt
  b:
    kind: command
    needs: a
    run: cat $IN_A/a.txt > $OUT/b.txt; echo b >> $OUT/b.txt
  c:
    kind: command
    needs: [b]
    run: wc -l < $IN_B/b.txt > $OUT/c.txt
  d:
    kind: command
    run: echo independent > $OUT/d.txt
"#;

fn chain_project() -> Project {
    let project = Project::new();
    project.write("p.yaml", CHAIN);
    project.write("data/x.txt", "x1\n");
    project
}

#[test]
fn first_run_runs_all_and_second_run_runs_nothing() {
    let project = chain_project();
    let first = project.run("p.yaml", &[]);
    assert!(first.success(), "{}", first.stdout);
    assert_eq!(first.with_status("ran"), ["a", "b", "c", "d"]);
    assert_eq!(project.read("cache/runs/chain/c/c.txt").trim(), "3");
    let second = project.run("p.yaml", &[]);
    assert_eq!(second.with_status("cached"), ["a", "b", "c", "d"]);
    assert!(second.with_status("ran").is_empty());
}

#[test]
fn changed_param_reruns_exactly_that_stage_and_its_dependents() {
    let project = chain_project();
    assert!(project.run("p.yaml", &[]).success());
    let rerun = project.run("p.yaml", &["--set", "b.run=cat $IN_A/a.txt > $OUT/b.txt; echo changed >> $OUT/b.txt; echo more >> $OUT/b.txt"]);
    assert_eq!(rerun.with_status("ran"), ["b", "c"]);
    assert_eq!(rerun.with_status("cached"), ["a", "d"]);
    assert_eq!(project.read("cache/runs/chain/c/c.txt").trim(), "4");
}

#[test]
fn pipeline_param_change_reruns_its_users() {
    let project = chain_project();
    assert!(project.run("p.yaml", &[]).success());
    let rerun = project.run("p.yaml", &["--set", "params.greeting=bye"]);
    assert_eq!(rerun.with_status("ran"), ["a", "b", "c"]);
    assert_eq!(rerun.with_status("cached"), ["d"]);
}

#[test]
fn touching_or_rewriting_an_input_with_same_content_reruns_nothing() {
    let project = chain_project();
    assert!(project.run("p.yaml", &[]).success());
    std::thread::sleep(std::time::Duration::from_millis(20));
    project.write("data/x.txt", "x1\n");
    let rerun = project.run("p.yaml", &[]);
    assert!(rerun.with_status("ran").is_empty(), "{}", rerun.stdout);
    project.write("data/x.txt", "x2\n");
    let changed = project.run("p.yaml", &[]);
    assert_eq!(changed.with_status("ran"), ["a", "b", "c"]);
    assert_eq!(changed.with_status("cached"), ["d"]);
}

#[test]
fn early_cutoff_keeps_dependents_when_upstream_bytes_are_identical() {
    let project = chain_project();
    assert!(project.run("p.yaml", &[]).success());
    let rerun = project.run(
        "p.yaml",
        &["--set", "d.run=printf 'independent\\n' > $OUT/d.txt"],
    );
    assert_eq!(rerun.with_status("ran"), ["d"]);
    let rerun = project.run(
        "p.yaml",
        &[
            "--set",
            "a.run=cat $PIPELINE_DIR/data/x.txt > $OUT/a.txt; printf 'hello\\n' >> $OUT/a.txt",
        ],
    );
    assert_eq!(
        rerun.with_status("ran"),
        ["a"],
        "a's bytes did not change, so b and c are reused"
    );
    assert_eq!(rerun.with_status("cached"), ["b", "c", "d"]);
}

#[test]
fn force_until_and_only_select_stages() {
    let project = chain_project();
    let until = project.run("p.yaml", &["--until", "b"]);
    assert_eq!(until.with_status("ran"), ["a", "b"]);
    assert_eq!(until.with_status("not_selected"), ["c", "d"]);
    let only = project.run("p.yaml", &["--only", "c"]);
    assert_eq!(only.with_status("ran"), ["c"]);
    assert_eq!(
        only.with_status("cached"),
        ["a", "b"],
        "upstreams are looked up, not run"
    );
    let forced = project.run("p.yaml", &["--force", "b"]);
    assert_eq!(forced.with_status("ran"), ["b", "d"]);
    assert_eq!(forced.with_status("cached"), ["a", "c"]);
}

#[test]
fn only_fails_when_an_upstream_is_not_cached() {
    let project = chain_project();
    let only = project.run("p.yaml", &["--only", "b"]);
    assert!(!only.success());
    assert_eq!(only.status("a"), "failed");
    let error = only.stage_field("a", "error");
    assert!(
        error
            .as_str()
            .unwrap_or_default()
            .starts_with("not in the cache and not selected by --only/--until"),
        "{error}"
    );
    assert_eq!(only.status("b"), "skipped");
}

#[test]
fn sweep_expands_fans_out_and_runs_upstream_once() {
    let project = Project::new();
    project.write(
        "p.yaml",
        r#"
stages:
  prep:
    kind: command
    run: echo prep > $OUT/p.txt
  train:
    kind: command
    needs: prep
    run: echo x > $OUT/t.txt
    matrix:
      run: ["echo lr=2e-6 > $OUT/t.txt", "echo lr=5e-6 > $OUT/t.txt"]
  eval:
    kind: command
    needs: train
    run: cp $IN_TRAIN/t.txt $OUT/e.txt
"#,
    );
    // `run` is both set and swept: a validation error naming it.
    let (ok, _, stderr) = project.dreampipe(&["validate", "p.yaml"]);
    assert!(!ok);
    assert!(
        stderr.contains("stage `train`, field `run`: is both set and swept in `matrix`; keep one"),
        "{stderr}"
    );
    project.write(
        "p.yaml",
        &project
            .read("p.yaml")
            .replace("    run: echo x > $OUT/t.txt\n", ""),
    );
    let run = project.run("p.yaml", &[]);
    assert!(run.success(), "{}{}", run.stdout, run.stderr);
    let a = "train[run=echo lr=2e-6 > $OUT/t.txt]";
    let b = "train[run=echo lr=5e-6 > $OUT/t.txt]";
    let ea = "eval[run=echo lr=2e-6 > $OUT/t.txt]";
    let eb = "eval[run=echo lr=5e-6 > $OUT/t.txt]";
    let mut expected = vec![
        ea.to_string(),
        eb.to_string(),
        "prep".to_string(),
        a.to_string(),
        b.to_string(),
    ];
    expected.sort();
    assert_eq!(run.with_status("ran"), expected);
    let output = run.stage_field(eb, "output");
    let text = std::fs::read_to_string(
        std::path::Path::new(output.as_str().expect("output")).join("e.txt"),
    )
    .expect("e.txt");
    assert_eq!(text.trim(), "lr=5e-6");
}

#[test]
fn presets_are_merged_and_overridden() {
    let project = Project::new();
    project.write(
        "stages/greeter.yaml",
        "kind: command\nrun: echo preset > $OUT/g.txt\n",
    );
    project.write("pipelines/p.yaml", "stages:\n  plain:\n    use: greeter\n  custom:\n    use: greeter\n    run: echo own > $OUT/g.txt\n");
    let run = project.run("pipelines/p.yaml", &[]);
    assert!(run.success(), "{}{}", run.stdout, run.stderr);
    assert_eq!(project.read("cache/runs/p/plain/g.txt").trim(), "preset");
    assert_eq!(project.read("cache/runs/p/custom/g.txt").trim(), "own");
}

#[test]
fn failed_stage_stops_dependents_but_not_independent_branches() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  bad:\n    kind: command\n    run: echo oops >&2; exit 3\n  after:\n    kind: command\n    needs: bad\n    run: echo no > $OUT/x\n  other:\n    kind: command\n    run: sleep 0.3; echo yes > $OUT/x\n",
    );
    let run = project.run("p.yaml", &[]);
    assert_eq!(run.output.status.code(), Some(1));
    assert_eq!(run.status("bad"), "failed");
    assert_eq!(run.status("after"), "skipped");
    assert_eq!(run.status("other"), "ran");
    assert_eq!(
        run.stage_field("bad", "error"),
        "command exited with status 3"
    );
    let log = run.stage_field("bad", "log");
    let log_text = std::fs::read_to_string(log.as_str().expect("log path")).expect("log");
    assert!(log_text.contains("oops"), "{log_text}");
    assert!(
        run.stdout
            .contains("stage `bad` failed: command exited with status 3 (log: "),
        "{}",
        run.stdout
    );
    assert_eq!(project.result_count(), 1, "only `other` is committed");
}

#[test]
fn explain_names_changed_fields_files_and_upstreams() {
    let project = chain_project();
    assert!(project.run("p.yaml", &[]).success());
    project.write("data/x.txt", "x2\n");
    let (ok, stdout, _) =
        project.dreampipe(&["explain", "p.yaml", "a", "--set", "params.greeting=bye"]);
    assert!(ok);
    let lines: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            "  - `run` changed cat $PIPELINE_DIR/data/x.txt > $OUT/a.txt; echo hello >> $OUT/a.txt → cat $PIPELINE_DIR/data/x.txt > $OUT/a.txt; echo bye >> $OUT/a.txt",
            "  - file `data/x.txt` changed"
        ]
    );
    let (_, stdout, _) = project.dreampipe(&[
        "explain",
        "p.yaml",
        "b",
        "--set",
        "b.run=echo new > $OUT/b.txt",
    ]);
    assert_eq!(
        stdout.lines().skip(1).collect::<Vec<_>>(),
        [
            "  - upstream `a` will run first",
            "  - `run` changed cat $IN_A/a.txt > $OUT/b.txt; echo b >> $OUT/b.txt → echo new > $OUT/b.txt"
        ]
    );
    assert!(project.run("p.yaml", &[]).success());
    project.write("data/x.txt", "x3\n");
    let (_, stdout, _) = project.dreampipe(&["plan", "p.yaml"]);
    assert!(stdout.contains("  fresh  d  "), "{stdout}");
    assert!(
        stdout.contains("  run    a  file `data/x.txt` changed"),
        "{stdout}"
    );
}

#[test]
fn locked_run_fails_naming_the_stage_whose_key_differs() {
    let project = chain_project();
    assert!(project.run("p.yaml", &[]).success());
    let lock: serde_json::Value = serde_json::from_str(&project.read("p.lock")).expect("lock json");
    assert_eq!(lock["stages"].as_object().map(|m| m.len()), Some(4));
    assert!(project.run("p.yaml", &["--locked"]).success());
    project.write("data/x.txt", "x2\n");
    let locked = project.run("p.yaml", &["--locked"]);
    assert!(!locked.success());
    let error = locked.stage_field("a", "error");
    assert!(
        error
            .as_str()
            .unwrap_or_default()
            .starts_with("--locked: stage `a` has key "),
        "{error}"
    );
    assert_eq!(locked.status("d"), "cached");
}

#[test]
fn show_prints_the_current_output_folder() {
    let project = chain_project();
    let (ok, _, stderr) = project.dreampipe(&["show", "p.yaml", "d"]);
    assert!(!ok);
    assert!(
        stderr.contains("no result for the current inputs of d; run `dreampipe run p.yaml` first"),
        "{stderr}"
    );
    let run = project.run("p.yaml", &[]);
    let (ok, stdout, _) = project.dreampipe(&["show", "p.yaml", "d"]);
    assert!(ok);
    assert_eq!(
        stdout.trim(),
        run.stage_field("d", "output").as_str().expect("output")
    );
}

#[test]
fn dag_prints_mermaid_and_dot() {
    let project = chain_project();
    let (_, mermaid, _) = project.dreampipe(&["dag", "p.yaml"]);
    assert!(mermaid.starts_with("flowchart LR\n"));
    assert!(
        mermaid.contains("  s0 --> s1\n") && mermaid.contains("  s1 --> s2\n"),
        "{mermaid}"
    );
    let (_, dot, _) = project.dreampipe(&["dag", "p.yaml", "--format", "dot"]);
    assert!(
        dot.contains("  \"a\" -> \"b\";\n") && dot.contains("  \"b\" -> \"c\";\n"),
        "{dot}"
    );
}

#[test]
fn a_file_kept_from_an_input_is_stored_once_and_the_users_file_is_untouched() {
    let project = Project::new();
    project.write("models/base/vae.bin", "base vae weights");
    project.write(
        "p.yaml",
        "stages:\n  ft1:\n    kind: command\n    inputs: models/base\n    run: ln $PIPELINE_DIR/models/base/vae.bin $OUT/vae.bin; echo 1 > $OUT/unet.bin\n  ft2:\n    kind: command\n    inputs: models/base\n    run: ln $PIPELINE_DIR/models/base/vae.bin $OUT/vae.bin; echo 2 > $OUT/unet.bin\n",
    );
    let run = project.run("p.yaml", &[]);
    assert!(run.success(), "{}{}", run.stdout, run.stderr);
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(project.path("cache/runs/p/ft1/vae.bin")).expect("ft1 vae");
    let b = std::fs::metadata(project.path("cache/runs/p/ft2/vae.bin")).expect("ft2 vae");
    assert_eq!(a.ino(), b.ino(), "one object for both results");
    assert_eq!(a.nlink(), 3, "the object and two results");
    let user = std::fs::metadata(project.path("models/base/vae.bin")).expect("user vae");
    assert_ne!(
        user.ino(),
        a.ino(),
        "the store does not share the user's inode"
    );
    assert_eq!(user.nlink(), 1);
    assert!(!user.permissions().readonly());
}

/// `run --message-format json`: stdout is one JSON object per line with the schema version —
/// the plan, every event in order, and a final `run_finished` with the counts — while the human
/// summary goes to stderr; a rerun reports the reused result as `cached`.
#[test]
fn message_format_json_writes_one_event_per_line() {
    let project = Project::new();
    project.write(
        "j.yaml",
        "name: j\nstages:\n  a:\n    kind: command\n    run: echo hi > $OUT/x.txt\n  b:\n    kind: command\n    needs: a\n    run: exit 3\n",
    );
    let events = |stdout: &str| -> Vec<serde_json::Value> {
        stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    };
    let (ok, stdout, stderr) = project.dreampipe(&["run", "j.yaml", "--message-format", "json"]);
    assert!(!ok, "b fails");
    assert!(
        stderr.contains("FAILED"),
        "the summary is on stderr: {stderr}"
    );
    let first = events(&stdout);
    let names: Vec<&str> = first.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "planned",
            "run_started",
            "started",
            "finished",
            "started",
            "failed",
            "run_finished"
        ]
    );
    assert!(first.iter().all(|e| e["schema"] == 1));
    assert_eq!(
        first[0]["stages"][1],
        serde_json::json!({"id": "b", "kind": "command", "selected": true})
    );
    assert_eq!(first[5]["error"], "command exited with status 3");
    let last = &first[6];
    assert_eq!(
        (
            &last["success"],
            &last["ran"],
            &last["failed"],
            &last["cached"]
        ),
        (
            &serde_json::json!(false),
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(0)
        )
    );
    let record = last["record"].as_str().expect("record path");
    assert!(std::path::Path::new(record).is_file());
    let (_, again, _) = project.dreampipe(&["run", "j.yaml", "--message-format", "json"]);
    let second = events(&again);
    let cached = second
        .iter()
        .find(|e| e["event"] == "cached")
        .expect("cached event");
    assert_eq!(
        (&cached["id"], &cached["key"]),
        (&first[2]["id"], &first[2]["key"])
    );
}
