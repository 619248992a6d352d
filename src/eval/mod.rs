pub mod editing;
pub mod metrics;
pub mod protocol;
pub mod scope;
