//! mmke: multimodal knowledge editing on Burn.
//!
//! The backend is chosen at run time through a Burn `Device` ([`backend`]); every model and
//! loop works on whichever device it is given.

pub mod backend;
pub mod bench;
pub mod data;
pub mod edit;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod frame;
pub mod fuzz;
pub mod model;
pub mod report;
pub mod train;

pub use error::{Error, Result};
