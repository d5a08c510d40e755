//! The `dreampipe` binary: parse the command line, load the CUDA backend when it may be
//! needed, run the verb, print the error chain (never a Debug dump) and map it to an exit code.
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = dreampipe::cli::Cli::parse();
    match dreampipe::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
