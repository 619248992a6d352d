pub mod image;
pub mod text;
