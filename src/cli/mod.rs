//! User-facing tools on top of the library (the `worker` itself is in [`crate::app`]).

pub mod backlog;
pub mod batch;
pub mod correlation;
pub mod enqueue;
pub mod status;
