//! The `command` stage: runs the user's shell text with `sh -c` in the staging folder.
//! Environment: `$OUT` (write the output there), `$WORK` (checkpoints kept across crashes),
//! `$PIPELINE_DIR` (the pipeline file's folder, where relative `inputs` live) and
//! `$IN_<NAME>` for each needed stage (NAME upper-cased, every non-alphanumeric as `_`), and,
//! with `resources: {gpus: N}`, `CUDA_VISIBLE_DEVICES` listing the N GPUs it holds (empty on a
//! run without GPUs); without `resources` the variable is inherited unchanged.
//! The `run` text enters the key; the environment's values do not.
use dreampipe_core::field;
use dreampipe_core::stages::params::{Input, ParamTable, Params};
use dreampipe_core::stages::{ParamSpec, Stage, StageContext, StageError};
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How often the running command is checked for exit and for cancellation.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

pub struct CommandStage;

/// A `command` stage's fields (its table is derived: [`Params`]); the inputs are resolved by
/// the runner (`inputs` enter the key by content; `ctx.inputs` names each of `needs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// shell text, run with `sh -c` in `$OUT`
    pub run: String,
    /// files/folders whose content enters the key
    #[param(ty = PathList, default = [])]
    pub inputs: Input,
    /// upstream stages; each output folder is `$IN_<NAME>`
    #[param(ty = StageRefList, default = [])]
    pub needs: Input,
}

/// `CUDA_VISIBLE_DEVICES` for the held devices: their CUDA indices, comma-separated (a CPU
/// slot, on a run without GPUs, adds none).
pub fn visible_devices(devices: &[dreampipe_core::device::Device]) -> String {
    let indices: Vec<String> = (devices.iter())
        .filter_map(|device| match device {
            dreampipe_core::device::Device::Cuda(index) => Some(index.to_string()),
            dreampipe_core::device::Device::Cpu => None,
        })
        .collect();
    indices.join(",")
}

/// `$IN_<NAME>` for an upstream stage name.
pub fn input_env_name(stage: &str) -> String {
    let upper: String = stage
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("IN_{upper}")
}

impl Stage for CommandStage {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Runs a shell command (`sh -c`) in the stage's output folder. Output: every file the command writes under `$OUT`."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        CommandParams::param_specs()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let params: CommandParams = ctx.typed()?;
        let script = params.run.as_str();
        let mut command = shell_command(ctx, script)?;
        ctx.log.line(&format!("$ {script}"));
        let child = command
            .spawn()
            .map_err(|e| StageError::io("start `sh`", ctx.out_dir, e))?;
        wait_or_cancel(ctx, child)
    }
}

/// `sh -c script` in `$OUT`, with the stage's environment, output into the stage's log, in
/// its own process group and killed when this process dies.
fn shell_command(ctx: &StageContext<'_>, script: &str) -> Result<Command, StageError> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(script)
        .current_dir(ctx.out_dir)
        .env("OUT", ctx.out_dir)
        .env("WORK", ctx.work_dir)
        .env("PIPELINE_DIR", ctx.pipeline_dir)
        .stdin(Stdio::null())
        .process_group(0);
    // The running dreampipe, so a command can call its verbs (`"$DREAMPIPE" model init`).
    if let Ok(exe) = std::env::current_exe() {
        command.env("DREAMPIPE", exe);
    }
    for input in ctx
        .inputs
        .get(field!(CommandParams, needs))
        .into_iter()
        .flatten()
    {
        if let Some(name) = &input.upstream {
            command.env(input_env_name(name), &input.path);
        }
    }
    if !ctx.devices.is_empty() {
        command.env("CUDA_VISIBLE_DEVICES", visible_devices(ctx.devices));
    }
    let log_file = std::fs::File::options()
        .append(true)
        .create(true)
        .open(ctx.log.path())
        .map_err(|e| StageError::io("open log", ctx.log.path(), e))?;
    let err_file = log_file
        .try_clone()
        .map_err(|e| StageError::io("open log", ctx.log.path(), e))?;
    command.stdout(log_file).stderr(err_file);
    // SAFETY: prctl is async-signal-safe; it makes the kernel kill the command if this
    // thread's process dies, so a killed run leaves no orphan writing into staging.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(command)
}

/// Waits for the command's exit (status 0 is success); on cancellation kills its process
/// group.
fn wait_or_cancel(ctx: &StageContext<'_>, mut child: Child) -> Result<(), StageError> {
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| StageError::io("wait for", ctx.out_dir, e))?
        {
            return match status.code() {
                Some(0) => Ok(()),
                Some(code) => Err(StageError::CommandExited { code }),
                None => Err(StageError::CommandKilled),
            };
        }
        if ctx.cancel.is_cancelled() {
            // SAFETY: signals the command's own process group (created by process_group(0)).
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            return Err(StageError::Cancelled);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<CommandParams>(&CommandStage.schema())
            .unwrap();
    }
}
