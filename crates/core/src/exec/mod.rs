//! Execution: the concurrent executor (`executor`), where stages run (`slots`), the events it
//! emits (`events`), the run record (`record`) and the recipe lock file (`lockfile`).
pub mod events;
pub mod executor;
pub mod lockfile;
pub mod record;
mod slots;
