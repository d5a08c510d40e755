//! Faults: kill -9 mid-stage (resume, no partial result, stale lock), two concurrent runs,
//! a flipped byte in a stored object.
use crate::runner_support::{Project, RunResult, to_result};
use std::time::{Duration, Instant};

/// How long a test waits for a background run to reach a state before failing.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

fn find_file_named(root: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .find(|e| e.file_name() == name)
        .map(|e| e.path().to_path_buf())
}

#[test]
fn kill_9_mid_stage_leaves_no_partial_result_and_the_rerun_resumes() {
    let project = Project::new();
    project.write(
        "p.yaml",
        r#"
stages:
  quick:
    kind: command
    run: echo quick > $OUT/q.txt
  slow:
    kind: command
    needs: quick
    run: |
      if [ -f "$WORK/checkpoint" ]; then
        echo "resumed from $(cat $WORK/checkpoint)" > $OUT/status.txt
      else
        echo partial > $OUT/partial.txt
        echo step-1 > $WORK/checkpoint
        exec sleep 60  # exec: the kernel's parent-death signal then reaches the sleep itself
      fi
"#,
    );
    let mut child = project
        .command(&["run", "p.yaml", "--plain"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while find_file_named(&project.cache().join("work"), "checkpoint").is_none() {
        assert!(
            started.elapsed() < WAIT_LIMIT,
            "the slow stage never wrote its checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    assert_eq!(project.result_count(), 1, "only `quick` was committed");
    assert!(find_file_named(&project.cache().join("results"), "partial.txt").is_none());
    let rerun = project.run("p.yaml", &[]);
    assert!(rerun.success(), "{}{}", rerun.stdout, rerun.stderr);
    assert_eq!(rerun.status("quick"), "cached");
    assert_eq!(rerun.status("slow"), "ran");
    assert_eq!(
        project.read("cache/runs/p/slow/status.txt").trim(),
        "resumed from step-1"
    );
    assert!(!project.path("cache/runs/p/slow/partial.txt").exists());
    let key = rerun.stage_field("slow", "key");
    assert!(
        project
            .cache()
            .join("locks")
            .join(format!("{}.lock", key.as_str().expect("key")))
            .exists(),
        "the killed run's lock file was left behind and did not block"
    );
    let (ok, stdout, _) = project.dreampipe(&["cache", "verify"]);
    assert!(ok, "{stdout}");
    assert!(
        stdout.ends_with("3 object(s) and 2 result(s): 0 problem(s)\n")
            || stdout.contains(": 0 problem(s)"),
        "{stdout}"
    );
    let (ok, stdout, _) = project.dreampipe(&["cache", "gc", "--keep-last", "1"]);
    assert!(ok);
    assert_eq!(
        stdout.trim(),
        "removed 0 result(s), 0 object(s) (0 bytes), 1 stale staging folder(s)"
    );
}

#[test]
fn two_concurrent_runs_compute_each_stage_once_and_both_succeed() {
    let project = Project::new();
    let stage = |name: &str, needs: &str| {
        format!(
            "  {name}:\n    kind: command\n{needs}    run: echo $$ >> $PIPELINE_DIR/ran-{name}.txt; sleep 0.4; echo {name} > $OUT/x.txt\n"
        )
    };
    let text = format!(
        "stages:\n{}{}{}",
        stage("a", ""),
        stage("b", "    needs: a\n"),
        stage("c", "")
    );
    project.write("p.yaml", &text);
    let spawn = || {
        project
            .command(&["run", "p.yaml", "--plain"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (first, second) = (spawn(), spawn());
    let first = to_result(first.wait_with_output().expect("wait"));
    let second = to_result(second.wait_with_output().expect("wait"));
    assert!(
        first.success() && second.success(),
        "{}\n{}",
        first.stdout,
        second.stdout
    );
    for name in ["a", "b", "c"] {
        assert_eq!(
            project.read(&format!("ran-{name}.txt")).lines().count(),
            1,
            "stage {name} ran more than once"
        );
        let statuses = [first.status(name), second.status(name)];
        assert!(
            statuses.contains(&"ran".to_string()) && statuses.contains(&"cached".to_string()),
            "{name}: {statuses:?}"
        );
    }
    assert_eq!(project.result_count(), 3);
}

/// `cache verify` of a one-object, one-result cache finds nothing wrong.
fn assert_verify_clean(project: &Project) {
    let (ok, stdout, _) = project.dreampipe(&["cache", "verify"]);
    assert!(ok, "{stdout}");
    assert_eq!(
        stdout.trim(),
        "checked 1 object(s) and 1 result(s): 0 problem(s)"
    );
}

/// The stored object holding `content` (digest, path), made writable so a test can damage it.
fn writable_object(project: &Project, content: &[u8]) -> (String, std::path::PathBuf) {
    let digest = blake3::hash(content).to_hex().to_string();
    let object = project
        .cache()
        .join("objects")
        .join(&digest[..2])
        .join(&digest);
    let mut perms = std::fs::metadata(&object).expect("object").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&object, perms).expect("chmod");
    (digest, object)
}

#[test]
fn flipped_byte_is_reported_quarantined_and_recomputed() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  a:\n    kind: command\n    run: printf 'precious bytes' > $OUT/data.bin\n",
    );
    assert!(project.run("p.yaml", &[]).success());
    let (digest, object) = writable_object(&project, b"precious bytes");
    let mut bytes = std::fs::read(&object).expect("read");
    bytes[3] ^= 0x01;
    std::fs::write(&object, &bytes).expect("flip");
    let (ok, stdout, _) = project.dreampipe(&["cache", "verify"]);
    assert!(!ok);
    assert!(
        stdout.starts_with(&format!("object {digest} is corrupt")),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("checked 1 object(s) and 1 result(s): 2 problem(s)\n"),
        "{stdout}"
    );
    let rerun = project.run("p.yaml", &[]);
    assert_eq!(rerun.status("a"), "ran");
    assert_eq!(project.read("cache/runs/p/a/data.bin"), "precious bytes");
    assert_verify_clean(&project);
}

#[test]
fn stale_lock_file_from_a_dead_process_does_not_block() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  a:\n    kind: command\n    run: echo a > $OUT/a.txt\n",
    );
    let first = project.run("p.yaml", &[]);
    let key = first
        .stage_field("a", "key")
        .as_str()
        .expect("key")
        .to_string();
    std::fs::remove_dir_all(project.cache().join("results").join(&key)).expect("forget result");
    std::fs::write(
        project.cache().join("locks").join(format!("{key}.lock")),
        "4194303\n",
    )
    .expect("stale lock");
    let started = Instant::now();
    let rerun = project.run("p.yaml", &[]);
    assert_eq!(rerun.status("a"), "ran");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn gc_keeps_what_pipelines_reference_and_removes_old_results() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  a:\n    kind: command\n    run: echo one > $OUT/a.txt\n",
    );
    assert!(project.run("p.yaml", &[]).success());
    assert!(
        project
            .run("p.yaml", &["--set", "a.run=echo two > $OUT/a.txt"])
            .success()
    );
    assert_eq!(project.result_count(), 2);
    let (_, listing, _) = project.dreampipe(&["cache", "ls"]);
    let stages: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(stages, ["a", "a"], "{listing}");
    let (ok, stdout, _) = project.dreampipe(&["cache", "gc", "p.yaml", "--keep-last", "0"]);
    assert!(ok);
    assert_eq!(
        stdout.trim(),
        "removed 1 result(s), 1 object(s) (4 bytes), 0 stale staging folder(s)"
    );
    assert_eq!(project.result_count(), 1);
    let rerun = project.run("p.yaml", &[]);
    assert_eq!(
        rerun.status("a"),
        "cached",
        "the referenced result survived"
    );
}

#[test]
fn ctrl_c_cancels_running_stages_promptly_and_commits_nothing_partial() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  slow:\n    kind: command\n    run: echo partial > $OUT/partial.txt; echo started > $WORK/started; sleep 60\n  after:\n    kind: command\n    needs: slow\n    run: echo no > $OUT/x\n",
    );
    let child = project
        .command(&["run", "p.yaml", "--plain"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while find_file_named(&project.cache().join("work"), "started").is_none() {
        assert!(started.elapsed() < WAIT_LIMIT, "the stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let interrupted = Instant::now();
    // SAFETY: sends SIGINT to the child this test spawned.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let run = to_result(child.wait_with_output().expect("wait"));
    assert!(
        interrupted.elapsed() < Duration::from_secs(5),
        "took {:?}",
        interrupted.elapsed()
    );
    assert_eq!(
        run.output.status.code(),
        Some(130),
        "{}{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(run.status("slow"), "failed");
    assert_eq!(run.stage_field("slow", "error"), "cancelled");
    assert_eq!(run.status("after"), "skipped");
    assert_eq!(project.result_count(), 0);
    let staging: Vec<_> = std::fs::read_dir(project.cache().join("staging"))
        .expect("staging")
        .collect();
    assert!(
        staging.is_empty(),
        "the cancelled stage's staging folder is removed"
    );
}

/// Starts `run p.yaml` in the background, waits until a stage touched `$WORK/started`, runs
/// `cache gc --keep-last 0` and checks that it kept exactly one result in use; returns the
/// run's outcome.
fn gc_during_run_keeps_one_result(project: &Project) -> RunResult {
    let child = project
        .command(&["run", "p.yaml", "--plain"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    while find_file_named(&project.cache().join("work"), "started").is_none() {
        assert!(
            started.elapsed() < WAIT_LIMIT,
            "the slow stage never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, stdout, _) = project.dreampipe(&["cache", "gc", "--keep-last", "0"]);
    assert!(ok);
    assert_eq!(
        stdout,
        "removed 0 result(s), 0 object(s) (0 bytes), 0 stale staging folder(s)\nkept 1 result(s) in use by a running stage\n"
    );
    let run = to_result(child.wait_with_output().expect("wait"));
    assert!(run.success(), "{}", run.stdout);
    run
}

#[test]
fn gc_keeps_results_a_running_stage_is_reading() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  a:\n    kind: command\n    run: echo a > $OUT/a.txt\n  b:\n    kind: command\n    needs: a\n    run: touch $WORK/started; sleep 1; cat $IN_A/a.txt > $OUT/b.txt\n",
    );
    gc_during_run_keeps_one_result(&project);
    assert_eq!(project.read("cache/runs/p/b/b.txt"), "a\n");
}

/// A result found cached at the start of a run stays pinned until the run ends, even while
/// its downstream waits for another branch: `cache gc` keeps it, the downstream reads it.
#[test]
fn gc_keeps_cached_results_a_run_will_read_later() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  a:\n    kind: command\n    run: echo a > $OUT/a.txt\n  slow:\n    kind: command\n    run: touch $WORK/started; sleep 1; echo s > $OUT/s.txt\n  b:\n    kind: command\n    needs: [a, slow]\n    run: cat $IN_A/a.txt $IN_SLOW/s.txt > $OUT/b.txt\n",
    );
    let (ok, _, stderr) = project.dreampipe(&["run", "p.yaml", "--plain", "--until", "a"]);
    assert!(ok, "{stderr}");
    let run = gc_during_run_keeps_one_result(&project);
    assert!(
        run.stdout.contains("2 ran, 1 cached, 0 failed"),
        "{}",
        run.stdout
    );
    assert_eq!(project.read("cache/runs/p/b/b.txt"), "a\ns\n");
}

/// Two stages with the same key in one run: one computes, the other reuses its result (it
/// must not wait for the pin its own run holds), also when one of them is forced.
#[test]
fn stages_sharing_a_key_in_one_run_compute_it_once() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  a:\n    kind: command\n    run: sleep 0.3; echo same > $OUT/x.txt\n  b:\n    kind: command\n    run: sleep 0.3; echo same > $OUT/x.txt\n",
    );
    let (ok, stdout, stderr) = project.dreampipe(&["run", "p.yaml", "--plain"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("1 ran, 1 cached, 0 failed"), "{stdout}");
    let (ok, stdout, stderr) = project.dreampipe(&["run", "p.yaml", "--plain", "--force", "a"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("0 failed"), "{stdout}");
    assert_eq!(project.read("cache/runs/p/a/x.txt"), "same\n");
    assert_eq!(project.read("cache/runs/p/b/x.txt"), "same\n");
}

/// Two stages; `b` copies `a`'s file. Returns the key of `a`'s result.
fn two_stage_project() -> (Project, String) {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  a:\n    kind: command\n    run: printf 'precious bytes' > $OUT/data.bin\n  b:\n    kind: command\n    needs: a\n    run: cp $IN_A/data.bin $OUT/copy.bin\n",
    );
    let first = project.run("p.yaml", &[]);
    assert!(first.success(), "{}{}", first.stdout, first.stderr);
    let key = first
        .stage_field("a", "key")
        .as_str()
        .expect("key")
        .to_string();
    (project, key)
}

fn truncate_record(project: &Project, key: &str) -> std::path::PathBuf {
    let record = project
        .cache()
        .join("results")
        .join(key)
        .join("result.json");
    let text = std::fs::read(&record).expect("record");
    std::fs::write(&record, &text[..text.len() / 2]).expect("truncate");
    record
}

#[test]
fn a_truncated_record_is_treated_as_absent_recomputed_with_a_warning() {
    let (project, key) = two_stage_project();
    let record = truncate_record(&project, &key);
    let rerun = project.run("p.yaml", &[]);
    assert!(rerun.success(), "{}{}", rerun.stdout, rerun.stderr);
    assert_eq!(rerun.status("a"), "ran");
    assert_eq!(rerun.status("b"), "cached", "same bytes: early cutoff");
    let warning = format!(
        "warning: a: its cached result is unusable (`{}` does not read: EOF while parsing",
        record.display()
    );
    assert!(rerun.stderr.contains(&warning), "{}", rerun.stderr);
    assert_eq!(project.read("cache/runs/p/a/data.bin"), "precious bytes");
    let again = project.run("p.yaml", &[]);
    assert_eq!(again.status("a"), "cached");
    assert_eq!(again.stderr, "");
}

#[test]
fn verify_quarantines_and_gc_removes_a_result_whose_record_does_not_read() {
    let (project, key) = two_stage_project();
    let record = truncate_record(&project, &key);
    let (ok, stdout, _) = project.dreampipe(&["cache", "verify"]);
    assert!(!ok);
    assert!(
        stdout.starts_with(&format!(
            "result {key}: `{}` does not read: EOF while parsing",
            record.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("checked 1 object(s) and 2 result(s): 1 problem(s)\n"),
        "{stdout}"
    );
    assert_eq!(project.result_count(), 1);
    assert_eq!(project.run("p.yaml", &[]).status("a"), "ran");
    truncate_record(&project, &key);
    let (ok, stdout, _) = project.dreampipe(&["cache", "gc", "--keep-last", "5"]);
    assert!(ok, "{stdout}");
    assert_eq!(
        stdout.trim(),
        "removed 1 result(s), 0 object(s) (0 bytes), 0 stale staging folder(s)"
    );
    assert_eq!(project.result_count(), 1);
}

#[test]
fn a_run_does_not_reuse_a_result_whose_file_changed_since_commit() {
    let (project, key) = two_stage_project();
    let (digest, object) = writable_object(&project, b"precious bytes");
    std::fs::write(&object, b"precious bytez").expect("flip");
    let rerun = project.run("p.yaml", &[]);
    assert!(rerun.success(), "{}{}", rerun.stdout, rerun.stderr);
    assert_eq!(rerun.status("a"), "ran");
    assert_eq!(rerun.status("b"), "ran", "b's copy was damaged too");
    let flipped = blake3::hash(b"precious bytez").to_hex();
    assert!(
        rerun.stderr.contains(&format!(
            "warning: a: result {} (a): file data.bin hashes to {flipped}, not its recorded {digest}; quarantined, recomputing it",
            &key[..12]
        )),
        "{}",
        rerun.stderr
    );
    assert_eq!(project.read("cache/runs/p/a/data.bin"), "precious bytes");
    assert_eq!(project.read("cache/runs/p/b/copy.bin"), "precious bytes");
    let (ok, stdout, _) = project.dreampipe(&["cache", "verify"]);
    assert!(ok, "{stdout}");
}

#[test]
fn links_leaving_the_output_and_non_utf8_names_are_refused_at_commit() {
    let project = Project::new();
    project.write("outside.txt", "outside\n");
    let cases = [
        (
            "ln -s $PIPELINE_DIR/outside.txt $OUT/link.txt",
            format!(
                "[FAILED]  a: the output `link.txt` is a symbolic link to `{}`, outside the stage's output (or not a file); copy the file into $OUT instead (cp -L)",
                project.path("outside.txt").display()
            ),
        ),
        (
            "mkdir $OUT/sub && ln -s ../../.. $OUT/sub/up",
            "[FAILED]  a: the output `sub/up` is a symbolic link to `../../..`, outside the stage's output (or not a file); copy the file into $OUT instead (cp -L)".to_string(),
        ),
        (
            "touch $OUT/$(printf 'bad\\377.txt')",
            "[FAILED]  a: the output `bad\u{FFFD}.txt` has a name that is not valid UTF-8; rename it (result manifests name files in UTF-8)".to_string(),
        ),
        (
            "mkfifo $OUT/pipe",
            "[FAILED]  a: the output `pipe` is not a regular file or folder (a FIFO, socket or device); remove it".to_string(),
        ),
    ];
    for (script, expected) in cases {
        project.write(
            "p.yaml",
            &format!("stages:\n  a:\n    kind: command\n    run: {script}\n"),
        );
        let result = project.run("p.yaml", &[]);
        assert!(!result.success(), "{script}: committed");
        assert!(
            result.stdout.contains(&expected),
            "{script}: expected {expected:?} in\n{}",
            result.stdout
        );
        assert_eq!(project.result_count(), 0, "{script}");
        let staging = std::fs::read_dir(project.cache().join("staging")).expect("staging");
        assert_eq!(staging.count(), 0, "{script}: staging left behind");
    }
    assert_eq!(project.read("outside.txt"), "outside\n");
}

#[test]
fn a_link_to_a_file_inside_the_output_is_stored_as_a_copy() {
    let project = Project::new();
    project.write(
        "p.yaml",
        "stages:\n  a:\n    kind: command\n    run: echo hi > $OUT/a.txt && ln -s a.txt $OUT/b.txt\n",
    );
    let result = project.run("p.yaml", &[]);
    assert!(result.success(), "{}", result.stdout);
    let b = project.cache().join("runs/p/a/b.txt");
    assert!(std::fs::symlink_metadata(&b).expect("b").is_file());
    assert_eq!(project.read("cache/runs/p/a/b.txt"), "hi\n");
    assert_verify_clean(&project);
}

#[test]
fn bit_rot_that_keeps_the_mtime_is_caught_by_run_verify() {
    let (project, _) = two_stage_project();
    let digest = blake3::hash(b"precious bytes").to_hex().to_string();
    let object = project
        .cache()
        .join("objects")
        .join(&digest[..2])
        .join(&digest);
    let mtime = std::fs::metadata(&object)
        .expect("object")
        .modified()
        .expect("mtime");
    let mut perms = std::fs::metadata(&object).expect("object").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&object, perms).expect("chmod");
    std::fs::write(&object, b"precious bytez").expect("flip");
    let file = std::fs::File::options()
        .write(true)
        .open(&object)
        .expect("open");
    file.set_modified(mtime).expect("restore mtime");
    drop(file);
    // Same (device, inode, size, mtime): the cheap check trusts the memo, as documented.
    assert_eq!(project.run("p.yaml", &[]).status("a"), "cached");
    let verified = project.run("p.yaml", &["--verify"]);
    assert!(verified.success(), "{}{}", verified.stdout, verified.stderr);
    assert_eq!(verified.status("a"), "ran");
    assert!(
        verified.stderr.contains("file data.bin hashes to"),
        "{}",
        verified.stderr
    );
    assert_eq!(project.read("cache/runs/p/a/data.bin"), "precious bytes");
}
