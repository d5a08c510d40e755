//! Every stage kind has a reference page `stages/<kind>.md` whose parameter table matches its
//! schema, and every preset in `stages/` whose kind is registered validates.
use dreampipe_core::pipeline::{LoadOptions, load_str};
use dreampipe_core::stages::reference_table;
use dreampipe_kinds::registry;
use std::path::Path;

const TABLE_START: &str = "| field | type |";

#[test]
fn reference_pages_match_the_schemas() {
    crate::at_repo_root();
    let update = std::env::var_os("UPDATE_EXPECTED").is_some();
    for stage in registry().all() {
        let path = format!("stages/{}.md", stage.kind());
        let page = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("missing reference page {path}"));
        let start = page
            .find(TABLE_START)
            .unwrap_or_else(|| panic!("{path} has no parameter table"));
        let end = page[start..]
            .find("\n\n")
            .map(|e| start + e + 1)
            .unwrap_or(page.len());
        let expected = reference_table(stage.as_ref());
        if update {
            std::fs::write(
                &path,
                format!("{}{expected}{}", &page[..start], &page[end..]),
            )
            .expect("write page");
            continue;
        }
        assert_eq!(
            &page[start..end],
            expected,
            "{path} is out of date; rerun with UPDATE_EXPECTED=1"
        );
    }
}

#[test]
fn presets_of_registered_kinds_validate() {
    crate::at_repo_root();
    let mut checked = 0;
    for entry in std::fs::read_dir("stages").expect("stages/").flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let name = path.file_stem().and_then(|s| s.to_str()).expect("name");
        let text = std::fs::read_to_string(&path).expect("read");
        let kind = text
            .lines()
            .find_map(|l| l.strip_prefix("kind: "))
            .unwrap_or_default()
            .trim();
        if registry().get(kind).is_none() {
            continue;
        }
        let pipeline = format!("stages:\n  x:\n    use: {name}\n");
        let loaded = load_str(
            &pipeline,
            Path::new("p.yaml"),
            Path::new("."),
            &LoadOptions::new(registry()),
        );
        // A preset holds settings; the inputs and prompts are the using stage's to give.
        let problems: Vec<String> = loaded
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|line| !line.contains("missing required field"))
            .map(str::to_string)
            .collect();
        assert!(
            problems.is_empty(),
            "preset {name}: {}",
            problems.join("\n")
        );
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn the_runner_tour_example_validates_and_expands() {
    crate::at_repo_root();
    let pipeline = dreampipe_core::pipeline::load(
        Path::new("pipelines/examples/runner-tour.yaml"),
        &LoadOptions::new(registry()),
    )
    .expect("valid");
    let ids: Vec<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), 5);
    assert_eq!(ids[0], "model_files");
    assert_eq!(
        ids[3],
        "count[run=head -n 2 $IN_MODEL_FILES/listing.txt > $OUT/head.txt]"
    );
}
