//! The `toy_world` stage end to end through `dreampipe run`: captioned world images beside
//! their captions, the striped subject, the manifest; the same fields draw the same bytes in
//! another cache, and a larger `count` keeps the images already drawn.
use crate::stage_support::*;
use std::path::Path;

fn pipeline(dir: &Path, count: u64) -> std::path::PathBuf {
    let path = dir.join("world.yaml");
    let yaml = format!(
        "name: world\nstages:\n  world:\n    kind: toy_world\n    count: {count}\n    size: 32\n    seed: 7\n    subject_images: 3\n"
    );
    std::fs::write(&path, yaml).expect("write pipeline");
    path
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_world_of_captioned_images_and_its_subject() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    run_ok(&cache, &pipeline(dir.path(), 6));
    let out = stage_output(&cache, "world", "world");
    let manifest = manifest(&out);
    let images = manifest["images"].as_array().expect("images");
    assert_eq!(images.len(), 6);
    for (index, entry) in images.iter().enumerate() {
        let png = out.join(format!("images/{index:04}.png"));
        assert_eq!(pixels(&png).0, 32);
        let caption = std::fs::read_to_string(out.join(format!("images/{index:04}.txt"))).unwrap();
        assert_eq!(caption, entry["caption"].as_str().unwrap());
        let words: Vec<&str> = caption.split(' ').collect();
        assert_eq!(
            caption,
            format!(
                "a {} {} on a {} background",
                entry["colour"].as_str().unwrap(),
                entry["shape"].as_str().unwrap(),
                entry["background"].as_str().unwrap()
            ),
            "{words:?}"
        );
    }
    assert_eq!(manifest["subject"]["class"], "star");
    assert_eq!(
        manifest["subject"]["images"].as_array().map(Vec::len),
        Some(3)
    );
    assert!(out.join("subject/0002.png").is_file());

    // Another cache, same fields: the same bytes. A larger count keeps the first images.
    let other = dir.path().join("other");
    run_ok(&other, &pipeline(dir.path(), 8));
    let more = stage_output(&other, "world", "world");
    for index in 0..6 {
        let name = format!("images/{index:04}.png");
        assert_eq!(bytes(&out.join(&name)), bytes(&more.join(&name)), "{name}");
    }
    assert_eq!(
        bytes(&out.join("subject/0000.png")),
        bytes(&more.join("subject/0000.png"))
    );
    assert!(more.join("images/0007.txt").is_file());
}
