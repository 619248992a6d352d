//! Editors and what they share.

pub mod index;
pub mod memory;
pub mod serac;
