pub mod answer;
pub mod clip;
pub mod fusion;
pub mod knowledge;
pub mod lm;
pub mod objects;
pub mod scope;
pub mod vlm;
