//! The pipeline example in README.md must stay valid: it is extracted, pointed at the bundled
//! tiny model and toy images, and checked with `dreampipe validate`.
use std::process::Command;

fn readme_yaml() -> String {
    let readme = std::fs::read_to_string(crate::repo_root().join("README.md")).unwrap();
    let start = readme
        .find("```yaml\n")
        .expect("README has a ```yaml block")
        + "```yaml\n".len();
    let end = start
        + readme[start..]
            .find("```")
            .expect("the yaml block is closed");
    readme[start..end].to_string()
}

#[test]
fn readme_pipeline_example_validates() {
    let root = crate::repo_root();
    let yaml = readme_yaml()
        .replace(
            "/models/stable-diffusion-v1-5",
            &root.join("models/tiny-sd").display().to_string(),
        )
        .replace(
            "photos/dog",
            &root.join("pipelines/data/toy").display().to_string(),
        );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my-dog.yaml");
    std::fs::write(&file, yaml).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_dreampipe"))
        .args(["--device", "cpu", "--cache"])
        .arg(dir.path().join("cache"))
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "README example does not validate:\n{stdout}{stderr}"
    );
    assert!(
        stdout.contains("db[learning_rate=1e-6]") || stdout.contains("valid"),
        "{stdout}"
    );
}
