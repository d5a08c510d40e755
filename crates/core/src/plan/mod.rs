//! Planning: the stage DAG (`graph`), each stage's key material and key (`fingerprint`), and
//! whether each stage is fresh or why it will run (`dirty`).
pub mod dirty;
pub mod fingerprint;
pub mod graph;
