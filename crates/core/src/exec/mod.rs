//! Execution: the concurrent executor (`executor`), the events it emits (`events`) and the
//! recipe lock file (`lockfile`).
pub mod events;
pub mod executor;
pub mod lockfile;
