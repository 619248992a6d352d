//! `EditRecord`: the one shape every dataset is read into, whatever its file format.
//! Prompts are stored with the task's template already applied (REFERENCE.md): VQA questions
//! as `Question: {q} Short answer:`, captions and text-only locality questions raw.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the edited model is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Visual question answering (FGVEdit, MMEdit E-VQA, the scenes benchmark).
    Vqa,
    /// Image captioning (MMEdit E-IC): the prompt and target are concatenated, no template.
    Caption,
}

impl Task {
    /// The prompt the model reads for question or caption prompt `q`.
    pub fn prompt(self, q: &str) -> String {
        match self {
            Task::Vqa => vqa_prompt(q),
            Task::Caption => q.to_string(),
        }
    }
}

/// The VQA template of BLIP-2 / MiniGPT-4 editing.
pub fn vqa_prompt(question: &str) -> String {
    format!("Question: {question} Short answer:")
}

/// A text-only query (T-Locality).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TextQuery {
    pub prompt: String,
    pub answer: String,
}

/// A query on an image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageQuery {
    pub image: PathBuf,
    pub prompt: String,
    pub answer: String,
}

/// A labelled question on the edit image (the scenes benchmark's exact scope).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScopeQuery {
    pub prompt: String,
    pub answer_before: String,
    pub answer_after: String,
    pub in_scope: bool,
    pub hard: bool,
    pub near: bool,
    /// The referred object's cell on the edit image (scenes only; for pre-training).
    pub cell: Option<u8>,
    /// The cells of the objects a count or existence question picks out (scenes only; for
    /// pre-training).
    pub matches: Option<Vec<u8>>,
}

/// The edit image's caption before and after the edit (the scenes benchmark's captioning
/// task, E-IC style: the prompt is followed by the caption).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaptionPair {
    pub prompt: String,
    pub before: String,
    pub after: String,
}

/// The rephrased caption prompt of caption edits made from scenes records (T-Generality).
pub const CAPTION_REPHRASE: &str = "a picture of";

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EditRecord {
    /// Position of the record in its source file.
    pub index: usize,
    pub task: Task,
    /// The edit prompt t_e (templated) on the edit image i_e.
    pub prompt: String,
    pub image: PathBuf,
    /// The edit target y_e (`alt`).
    pub target: String,
    /// The base model's original answer (`pred`), when the format has it.
    pub original: Option<String>,
    /// Rephrased edit prompt (T-Generality).
    pub rephrase: Option<String>,
    /// Rephrased edit image (M-Generality), same prompt and target.
    pub image_rephrase: Option<PathBuf>,
    /// Text-only out-of-scope query (T-Locality).
    pub loc: Option<TextQuery>,
    /// Out-of-scope query on another image (M-Locality).
    pub m_loc: Option<ImageQuery>,
    /// In-visual-scope query on the edit image, answered with its post-edit answer (M_in^v).
    pub fg_gen: Option<ImageQuery>,
    /// Out-of-visual-scope query on the edit image (M_out^v).
    pub fg_loc: Option<ImageQuery>,
    /// Every labelled same-image question (the scenes benchmark only).
    pub scope: Vec<ScopeQuery>,
    /// The edit image's caption before and after the edit (the scenes benchmark only).
    pub caption: Option<CaptionPair>,
    /// The cell of the edited object on the edit image (scenes records, from their scene
    /// graph): pre-training supervision only, never read by an editor.
    pub edit_cell: Option<u8>,
    /// The cell a position edit moves the edited object to (scenes records), likewise
    /// supervision only.
    pub moved_to: Option<u8>,
}

impl EditRecord {
    /// A VQA edit and nothing else: `question` (untemplated) on `image` now answers `target`.
    pub fn vqa(image: PathBuf, question: &str, target: &str) -> Self {
        Self {
            index: 0,
            task: Task::Vqa,
            prompt: vqa_prompt(question),
            image,
            target: target.to_string(),
            original: None,
            rephrase: None,
            image_rephrase: None,
            loc: None,
            m_loc: None,
            fg_gen: None,
            fg_loc: None,
            scope: Vec::new(),
            caption: None,
            edit_cell: None,
            moved_to: None,
        }
    }

    /// The captioning edit of the same change (scenes records): the caption prompt on the
    /// edit image now continues with the caption under S'; T-Generality through a rephrased
    /// prompt, M-Generality on the re-rendered image, the same locality queries.
    pub fn caption_edit(&self) -> Option<EditRecord> {
        let caption = self.caption.as_ref()?;
        Some(EditRecord {
            index: self.index,
            task: Task::Caption,
            prompt: caption.prompt.clone(),
            image: self.image.clone(),
            target: caption.after.clone(),
            original: Some(caption.before.clone()),
            rephrase: Some(CAPTION_REPHRASE.to_string()),
            image_rephrase: self.image_rephrase.clone(),
            loc: self.loc.clone(),
            m_loc: self.m_loc.clone(),
            fg_gen: None,
            fg_loc: None,
            scope: Vec::new(),
            caption: None,
            edit_cell: self.edit_cell,
            moved_to: self.moved_to,
        })
    }
}
