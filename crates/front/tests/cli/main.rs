//! The front binary `dreampipe` end to end on the torch-free kinds (`command`, `images`,
//! `toy_world`): caching, faults, bad pipelines, reports, `init`, the README's example. One
//! test binary, without libtorch (checked below). The tests read the repository's files
//! (tests/bad-pipelines, models/, pipelines/, README.md) from the repository root.
use std::path::PathBuf;

#[path = "../../../../tests/support/linkage.rs"]
mod linkage;
#[path = "../../../../tests/support/repository.rs"]
mod repository;
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

use repository::{at_repo_root, repo_root};

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
