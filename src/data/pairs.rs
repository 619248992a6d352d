//! (edit, query, label) pairs for training and evaluating scope classifiers (MSCKE eq. 9-11).
//!
//! Positives: the edit question itself, its rephrase, the edit question on the re-rendered
//! image, and in-scope questions on the edit image. Negatives: out-of-scope questions on the
//! edit image (hard and near ones included), the text-only locality question, and the
//! question on another image.

use std::path::PathBuf;

use serde::Serialize;

use super::record::EditRecord;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairKind {
    Edit,
    Rephrase,
    ImageRephrase,
    InScope,
    HardInScope,
    OutOfScope,
    HardOutOfScope,
    Near,
    TextLocality,
    OtherImage,
}

impl PairKind {
    pub fn in_scope(self) -> bool {
        matches!(
            self,
            PairKind::Edit
                | PairKind::Rephrase
                | PairKind::ImageRephrase
                | PairKind::InScope
                | PairKind::HardInScope
        )
    }

    /// The kind of a same-image scope question.
    pub fn of_scope_query(q: &super::record::ScopeQuery) -> Self {
        match (q.in_scope, q.hard, q.near) {
            (true, true, _) => PairKind::HardInScope,
            (true, false, _) => PairKind::InScope,
            (false, true, _) => PairKind::HardOutOfScope,
            (false, false, true) => PairKind::Near,
            (false, false, false) => PairKind::OutOfScope,
        }
    }

    /// Figure 4's split: queries that differ from the edit in their text only ("text
    /// samples") versus queries about the image ("image samples").
    pub fn task(self) -> Task {
        match self {
            PairKind::Edit | PairKind::Rephrase | PairKind::TextLocality => Task::Text,
            _ => Task::Image,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Text,
    Image,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScopePair {
    /// Index of the edit record.
    pub record: usize,
    pub edit_image: PathBuf,
    /// The edit's question and target (the edit side reads "question target").
    pub edit_question: String,
    pub edit_target: String,
    pub query_image: Option<PathBuf>,
    pub query_text: String,
    pub kind: PairKind,
    /// The cells of the objects the edit and the query refer to, where the data says
    /// (scenes): supervision for the fusion's attention while training, never at test time.
    pub edit_cell: Option<u8>,
    pub query_cell: Option<u8>,
}

impl ScopePair {
    pub fn label(&self) -> bool {
        self.kind.in_scope()
    }
}

/// Every labelled pair one record provides.
pub fn pairs(record: &EditRecord) -> Vec<ScopePair> {
    let pair = |image: Option<&PathBuf>, text: &str, kind| ScopePair {
        record: record.index,
        edit_image: record.image.clone(),
        edit_question: record.prompt.clone(),
        edit_target: record.target.clone(),
        query_image: image.cloned(),
        query_text: text.to_string(),
        kind,
        edit_cell: record.edit_cell,
        query_cell: None,
    };
    // The edit question asks about the edited object, on the re-rendered image too.
    let about_the_edit = |image, text: &str, kind| ScopePair {
        query_cell: record.edit_cell,
        ..pair(image, text, kind)
    };
    let image = Some(&record.image);
    let mut out = vec![about_the_edit(image, &record.prompt, PairKind::Edit)];
    if let Some(rephrase) = &record.rephrase {
        out.push(about_the_edit(image, rephrase, PairKind::Rephrase));
    }
    if let Some(other) = &record.image_rephrase {
        out.push(about_the_edit(
            Some(other),
            &record.prompt,
            PairKind::ImageRephrase,
        ));
    }
    if record.scope.is_empty() {
        // FGVEdit: one in-visual-scope and one out-of-visual-scope question.
        if let Some(q) = &record.fg_gen {
            out.push(pair(image, &q.prompt, PairKind::HardInScope));
        }
        if let Some(q) = &record.fg_loc {
            out.push(pair(image, &q.prompt, PairKind::HardOutOfScope));
        }
    }
    for q in &record.scope {
        let kind = PairKind::of_scope_query(q);
        out.push(ScopePair {
            query_cell: q.cell,
            ..pair(image, &q.prompt, kind)
        });
    }
    if let Some(loc) = &record.loc {
        out.push(pair(None, &loc.prompt, PairKind::TextLocality));
    }
    if let Some(m_loc) = &record.m_loc {
        out.push(pair(
            Some(&m_loc.image),
            &m_loc.prompt,
            PairKind::OtherImage,
        ));
    }
    out
}
/// Every pair of the records in an FGVEdit-schema file (images relative to `image_root`).
pub fn read_pairs(
    file: &std::path::Path,
    image_root: &std::path::Path,
) -> crate::Result<Vec<ScopePair>> {
    Ok(crate::data::fgvedit::read(file, image_root)?
        .records
        .iter()
        .flat_map(pairs)
        .collect())
}
