pub mod metrics;
pub mod scope;
