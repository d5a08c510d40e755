//! The `dreampipe` front binary: runs every verb that needs no libtorch (so a cached `run`
//! starts in milliseconds, not the ~0.4 s libtorch's static initializers take) and re-executes
//! the rest in the torch worker `dreampipe-torch` beside it, with the same arguments.
use dreampipe_core::cli::{self, Backend, Handoff, Parsed};
use dreampipe_core::device;
use dreampipe_kinds::worker_verbs::WORKER_VERBS;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

fn main() -> ExitCode {
    dreampipe_core::panics::install_hook();
    let matches = cli::command(WORKER_VERBS).get_matches();
    let parsed = match cli::parse(&matches, WORKER_VERBS) {
        Ok(Parsed::Core(parsed)) => parsed,
        Ok(Parsed::External(_)) => return hand_off(),
        Err(error) => error.exit(),
    };
    let backend = Backend::front(&parsed.global.cache, dreampipe_kinds::registry());
    match cli::run(parsed, backend) {
        Ok(code) => code,
        Err(error) if error.is::<Handoff>() => hand_off(),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Replaces this process with the torch worker, same arguments; returns only when that fails.
fn hand_off() -> ExitCode {
    let worker = device::torch_binary();
    let error = std::process::Command::new(&worker)
        .arg0("dreampipe")
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!(
        "error: this command needs the torch worker `{}`, which could not be started ({error}); \
         it is built beside `dreampipe` by `cargo build` (or set DREAMPIPE_TORCH to its path)",
        worker.display()
    );
    ExitCode::FAILURE
}
