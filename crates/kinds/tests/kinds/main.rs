//! The stage kinds and the runner through the library (no binary): pinned cache keys, the
//! reference pages, property tests of loading, the executor with fake kinds, grids and PNG
//! text. One test binary, without libtorch (checked below). The tests read the repository's
//! files (stages/, pipelines/, docs) from the repository root.
#[path = "../../../../tests/support/linkage.rs"]
mod linkage;
#[path = "../../../../tests/support/repository.rs"]
mod repository;

mod pinned_keys;
mod report_grid;
mod runner_docs;
mod runner_fuzz;
mod runner_gather;
mod runner_library;

use repository::at_repo_root;

#[test]
fn this_test_binary_links_no_libtorch() {
    linkage::assert_this_test_binary_links_no_libtorch();
}
