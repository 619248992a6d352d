pub mod editing;
pub mod metrics;
pub mod scope;
