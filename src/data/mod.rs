pub mod batch;
pub mod check;
pub mod fgvedit;
pub mod image;
pub mod lm;
pub mod mmedit;
pub mod pairs;
pub mod reader;
pub mod record;
pub mod scenes;
pub mod text;

pub use reader::{Dataset, Format, ImageCheck, ImageRoots};
pub use record::{EditRecord, Task};
