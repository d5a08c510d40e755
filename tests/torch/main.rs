//! The root package's other tests (libtorch linked): model folders and weights, the CLI's torch
//! verbs and stage kinds run by the torch worker `dreampipe-torch`, the recipes, and the
//! hand-off from the front binary `dreampipe` (crates/front), found beside the worker. Modules
//! that seed or draw from libtorch's global generator hold `sd_support::global_rng()` meanwhile.
use std::path::{Path, PathBuf};

#[path = "../support/linkage.rs"]
mod linkage;
#[path = "../support/runner.rs"]
mod runner_support;
#[path = "../support/sd.rs"]
mod sd_support;
#[path = "../support/stage.rs"]
mod stage_support;

mod bench_cli;
mod eval_model_init;
mod front_handoff;
mod model_fuzz;
mod modelinit_folder;
mod modelinit_weights;
mod recipes;
mod runner_slurm;
mod sd_folder;
mod sd_single_file;
mod sd_tokenizer;
mod stage_generate;
mod stage_sample_grid;
mod stage_training;

/// The repository root (the root package's folder).
fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The binary the CLI tests run: the torch worker, the whole CLI in one process.
fn dreampipe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dreampipe-torch"))
}

/// The front binary `dreampipe`, for the tests of the hand-off: beside the worker, where
/// `cargo build` and `cargo test` at the workspace root put it (package crates/front).
fn front() -> PathBuf {
    let front = dreampipe().with_file_name("dreampipe");
    assert!(
        front.is_file(),
        "no front binary {}: build it with `cargo build -p dreampipe-front` (`cargo test` at the \
         workspace root builds it)",
        front.display()
    );
    front
}
