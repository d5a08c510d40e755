//! The front binary `dreampipe` end to end on the torch-free kinds (`command`, `images`,
//! `toy_world`): caching, faults, bad pipelines, reports, `init`, the README's example. One
//! test binary, without libtorch (checked below). The tests read the repository's files
//! (tests/bad-pipelines, models/, pipelines/, README.md) from the repository root.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[path = "../../../../tests/support/linkage.rs"]
mod linkage;
#[path = "../../../../tests/support/runner.rs"]
mod runner_support;
#[path = "../../../../tests/support/stage.rs"]
mod stage_support;

mod init_cli;
mod readme_example;
mod report_cli;
mod runner_bad_pipelines;
mod runner_cache;
mod runner_faults;
mod stage_toy_world;

/// The repository root (two folders above this package's).
fn repo_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .canonicalize()
            .expect("the repository root")
    })
}

/// Makes the repository root this test process's working directory, for the tests that name
/// the repository's files by relative paths (as error messages then show them). Every test here
/// works in absolute temporary folders otherwise, so the process-wide change is safe.
fn at_repo_root() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| std::env::set_current_dir(repo_root()).expect("cd to the repository root"));
}

/// The binary the tests run: the front `dreampipe`.
fn dreampipe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dreampipe"))
}

#[test]
fn this_test_binary_links_no_libtorch() {
    linkage::assert_this_test_binary_links_no_libtorch();
}

#[test]
fn the_front_binary_links_no_libtorch() {
    linkage::assert_no_libtorch(&dreampipe());
}
