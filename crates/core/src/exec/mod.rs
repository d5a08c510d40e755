//! Execution: the concurrent executor (`executor`), where stages run (its `slots` on this machine,
//! `slurm` on a cluster, each run described by a `job`), the events it
//! emits (`events`), why a stage failed or was skipped (`error`), the run record (`record`) and
//! the recipe lock file (`lockfile`).
pub mod error;
pub mod events;
pub mod executor;
pub mod job;
pub mod lockfile;
pub mod record;
pub mod slurm;
