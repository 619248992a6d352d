pub mod clip;
