//! Training loops, one per objective, sharing checkpointing.

pub mod checkpoint;
pub mod clip;
pub mod scope;
