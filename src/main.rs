//! The `dreampipe-torch` binary, the torch worker: the whole CLI in one process with libtorch
//! loaded (the CUDA backend first, when it may be needed). The front `dreampipe` re-executes
//! here the commands that need tensors; it can also be run directly. Prints the error chain
//! (never a Debug dump) and maps it to an exit code.
use std::process::ExitCode;

fn main() -> ExitCode {
    match dreampipe::cli::run_from_env() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
