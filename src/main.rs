//! The `dreampipe-torch` binary, the torch worker: the whole CLI in one process with libtorch
//! loaded (the CUDA backend first, when it may be needed). The front `dreampipe` re-executes
//! here the commands that need tensors; it can also be run directly. Prints the error chain
//! (never a Debug dump) and maps it to an exit code; a panic (libtorch out of memory…) is
//! one line too (`dreampipe_core::panics`).
use std::process::ExitCode;

fn main() -> ExitCode {
    dreampipe_core::panics::install_hook();
    match dreampipe_core::panics::catch(dreampipe::cli::run_from_env) {
        Ok(Ok(code)) => code,
        Ok(Err(error)) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
        Err(panic) => {
            eprintln!("error: {panic} (RUST_BACKTRACE=1 shows where)");
            ExitCode::FAILURE
        }
    }
}
