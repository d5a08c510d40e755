//! Reporters: live progress (`progress`: indicatif bars on a terminal, plain lines otherwise)
//! and the end-of-run summary table (`summary`). They only consume executor events/records.
pub mod progress;
pub mod summary;
