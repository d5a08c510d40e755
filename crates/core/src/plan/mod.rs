//! Planning: the stage DAG (`graph`), each stage's key material and key (`fingerprint`), and
//! whether each stage is fresh or why it will run (`dirty`), and which runs of a steps sweep
//! serve the shorter ones (`prefix`).
pub mod dirty;
pub mod fingerprint;
pub mod graph;
pub mod prefix;
