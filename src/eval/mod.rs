pub mod editing;
pub mod knowledge;
pub mod metrics;
pub mod protocol;
pub mod scope;
