//! Editors and what they share.

pub mod finetune;
pub mod ike;
pub mod index;
pub mod ke;
pub mod memory;
pub mod mend;
pub mod method;
pub mod serac;
pub mod speaker;
pub mod tpatcher;
pub mod unike;

use crate::data::record::EditRecord;
use crate::error::Result;
use speaker::{Prediction, Query};

/// An editing method: edits accumulate until `reset`; `predict` scores an answer and `answer`
/// asks the model as edited so far. The evaluation protocols (`eval::protocol`) drive every
/// method through this.
pub trait Editor {
    /// Applies one edit on top of the earlier ones.
    fn edit(&mut self, record: &EditRecord) -> Result<()>;
    /// Teacher-forced predictions for `answer` after `query` (top-`k` at each position).
    fn predict(&mut self, query: &Query, answer: &str, k: usize) -> Result<Prediction>;
    /// What the model as edited so far says to `query`: greedy decoding, at most `max_new`
    /// tokens.
    fn answer(&mut self, query: &Query, max_new: usize) -> Result<String>;
    /// Back to the unedited model.
    fn reset(&mut self);
}
