//! `dreampipe init`: the starter DreamBooth pipeline it writes, its refusal to overwrite, and
//! that `validate` accepts it.
use std::path::Path;
use std::process::Command;

fn dreampipe(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_dreampipe"))
        .current_dir(cwd)
        .args(["--device", "cpu", "--cache", "cache"])
        .args(args)
        .output()
        .expect("run dreampipe");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `dir/images` with one small photo.
fn study_folder(root: &Path) -> std::path::PathBuf {
    let dir = root.join("my study");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 120, 40]))
        .save(dir.join("images/dog.png"))
        .unwrap();
    dir
}

#[test]
fn init_writes_the_starter_and_never_overwrites() {
    let root = tempfile::tempdir().unwrap();
    let dir = study_folder(root.path());
    let (ok, stdout, stderr) = dreampipe(root.path(), &["init", "my study", "--class", "cat"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("wrote my study/dreampipe.yaml\n"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(dir.join("dreampipe.yaml")).unwrap();
    for line in [
        "name: my-study\n",
        "  class: \"cat\"",
        "  model: \"models/stable-diffusion-v1-5\"",
        "    path: \"images\"",
        "    kind: generate\n",
        "    count: 200",
        "    prompt: a photo of ${params.class}\n",
        "    instance_prompt: a photo of ${params.token} ${params.class}\n",
        "    train_text_encoder: true\n",
        "    learning_rate: 2e-6\n",
        "    max_train_steps: 400\n",
        "    mixed_precision: fp16\n",
        "    optimizer: adamw8bit\n",
        "    gradient_checkpointing: true\n",
        "    schedulers: [ddim]\n",
        "    steps: 100\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    std::fs::write(dir.join("dreampipe.yaml"), "mine").unwrap();
    let (ok, _, stderr) = dreampipe(root.path(), &["init", "my study"]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "`my study/dreampipe.yaml` already exists; init never overwrites a file: edit it, delete it, or init another folder"
        ),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("dreampipe.yaml")).unwrap(),
        "mine"
    );
}

#[test]
fn images_outside_the_folder_are_written_as_absolute_paths() {
    let root = tempfile::tempdir().unwrap();
    let photos = root.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let (ok, stdout, stderr) = dreampipe(
        root.path(),
        &["init", "new", "--images", photos.to_str().unwrap()],
    );
    assert!(ok, "{stderr}");
    let text = std::fs::read_to_string(root.path().join("new/dreampipe.yaml")).unwrap();
    assert!(
        text.contains(&format!("    path: \"{}\"", photos.display())),
        "{text}"
    );
    assert!(!stdout.contains("next: put"), "{stdout}");
}

#[test]
fn validate_accepts_the_starter() {
    let root = tempfile::tempdir().unwrap();
    let dir = study_folder(root.path());
    assert!(dreampipe(root.path(), &["init", "my study"]).0);
    let tiny_sd = crate::repo_root().join("models/tiny-sd");
    let model = format!("params.model={}", tiny_sd.display());
    let pipeline = dir.join("dreampipe.yaml");
    let (ok, stdout, stderr) = dreampipe(
        root.path(),
        &["validate", pipeline.to_str().unwrap(), "--set", &model],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        "pipeline `my-study` is valid: 4 stage(s), 4 after sweep expansion\n"
    );
}
