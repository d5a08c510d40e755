//! The repository root for the torch-free crates' test binaries (`crates/<crate>/tests/<binary>/`,
//! two folders below the root), and a working directory there for tests that name the
//! repository's files by relative paths.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository root (two folders above the package's).
pub fn repo_root() -> &'static Path {
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
pub fn at_repo_root() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| std::env::set_current_dir(repo_root()).expect("cd to the repository root"));
}
