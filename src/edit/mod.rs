//! Editors and what they share.

pub mod memory;
