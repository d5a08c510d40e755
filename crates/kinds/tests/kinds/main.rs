//! The stage kinds and the runner through the library (no binary): pinned cache keys, the
//! reference pages, property tests of loading, the executor with fake kinds, grids and PNG
//! text. One test binary, without libtorch (checked below). The tests read the repository's
//! files (stages/, pipelines/, docs) from the repository root.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[path = "../../../../tests/support/linkage.rs"]
mod linkage;

mod pinned_keys;
mod report_grid;
mod runner_docs;
mod runner_fuzz;
mod runner_gather;
mod runner_library;

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

#[test]
fn this_test_binary_links_no_libtorch() {
    linkage::assert_this_test_binary_links_no_libtorch();
}
