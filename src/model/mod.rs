pub mod clip;
pub mod fusion;
pub mod scope;
