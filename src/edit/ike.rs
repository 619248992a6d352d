//! IKE (in-context knowledge editing): nothing is trained; the frozen base model reads the
//! new fact, preceded by demonstrations retrieved from a pool of other edits, before the query.
//! The stored fact nearest to the query (by word overlap) is the one put in context, so that
//! edits can accumulate; demonstrations are the pool's facts nearest to that fact, each shown
//! with its rephrase as an example of using a fact ("copy" and "update" demonstrations).

use std::collections::BTreeSet;

use burn::tensor::Device;

use super::Editor;
use super::speaker::{Prediction, Query, Speaker};
use crate::data::record::EditRecord;
use crate::error::Result;
use crate::model::editable::EditableModel;

/// One fact as IKE shows it: `{prompt} {target} || `.
fn fact(prompt: &str, target: &str) -> String {
    format!("{prompt} {target} || ")
}

fn words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Jaccard overlap of the word sets.
fn overlap(a: &BTreeSet<String>, b: &BTreeSet<String>) -> f64 {
    let union = a.union(b).count();
    if union == 0 {
        0.0
    } else {
        a.intersection(b).count() as f64 / union as f64
    }
}

struct Demonstration {
    prompt: String,
    rephrase: String,
    target: String,
    words: BTreeSet<String>,
}

/// What IKE puts before a query: the stored facts and a pool of demonstrations.
pub struct IkeContext {
    /// Demonstrations from other edits, with the words of their prompt.
    pool: Vec<Demonstration>,
    demonstrations: usize,
    facts: Vec<EditRecord>,
}

impl IkeContext {
    /// `pool`: edits to draw demonstrations from (records with a rephrase).
    pub fn new(pool: &[EditRecord], demonstrations: usize) -> Self {
        Self {
            pool: pool
                .iter()
                .filter_map(|r| {
                    Some(Demonstration {
                        prompt: r.prompt.clone(),
                        rephrase: r.rephrase.clone()?,
                        target: r.target.clone(),
                        words: words(&r.prompt),
                    })
                })
                .collect(),
            demonstrations,
            facts: Vec::new(),
        }
    }

    pub fn push(&mut self, record: &EditRecord) {
        self.facts.push(record.clone());
    }

    pub fn clear(&mut self) {
        self.facts.clear();
    }

    /// The context before `query`: demonstrations, then the stored fact nearest to it.
    pub fn context(&self, query: &Query) -> String {
        let query_words = words(&query.prompt);
        let Some(nearest) = self.facts.iter().max_by(|a, b| {
            overlap(&words(&a.prompt), &query_words)
                .total_cmp(&overlap(&words(&b.prompt), &query_words))
        }) else {
            return String::new();
        };
        let fact_words = words(&nearest.prompt);
        let mut ranked: Vec<(f64, &Demonstration)> = self
            .pool
            .iter()
            .filter(|d| d.prompt != nearest.prompt)
            .map(|d| (overlap(&d.words, &fact_words), d))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut context = String::new();
        for (_, d) in ranked.into_iter().take(self.demonstrations) {
            context += &fact(&d.prompt, &d.target);
            context += &fact(&d.rephrase, &d.target);
        }
        context + &fact(&nearest.prompt, &nearest.target)
    }
}

pub struct IkeEditor<M = crate::model::vlm::Vlm> {
    pub base: Speaker<M>,
    pub context: IkeContext,
    device: Device,
}

impl<M: EditableModel> IkeEditor<M> {
    /// `pool`: edits to draw demonstrations from (records with a rephrase).
    pub fn new(
        base: Speaker<M>,
        pool: &[EditRecord],
        demonstrations: usize,
        device: &Device,
    ) -> Self {
        Self {
            base,
            context: IkeContext::new(pool, demonstrations),
            device: device.clone(),
        }
    }
}

impl<M: EditableModel> Editor for IkeEditor<M> {
    fn edit(&mut self, record: &EditRecord) -> Result<()> {
        self.context.push(record);
        Ok(())
    }

    fn predict(&mut self, query: &Query, answer: &str, k: usize) -> Result<Prediction> {
        let prompt = self.base.fit_context(
            &self.context.context(query),
            &query.prompt,
            answer,
            query.image.is_some(),
        )?;
        self.base
            .predict(query.image.as_deref(), &prompt, answer, k, &self.device)
    }

    fn answer(&mut self, query: &Query, max_new: usize) -> Result<String> {
        let prompt = self.base.fit_context_reserving(
            &self.context.context(query),
            &query.prompt,
            max_new,
            query.image.is_some(),
        )?;
        self.base
            .answer(query.image.as_deref(), &prompt, max_new, &self.device)
    }

    fn reset(&mut self) {
        self.context.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn record(question: &str, rephrase: &str, target: &str) -> EditRecord {
        let mut r = EditRecord::vqa(PathBuf::from("x.png"), question, target);
        r.rephrase = Some(crate::data::record::vqa_prompt(rephrase));
        r
    }

    #[test]
    fn the_context_holds_the_nearest_fact_after_its_nearest_demonstrations() {
        let (dir, _) = crate::edit::serac::tests::two_scenes(2);
        let device = Device::flex();
        let base = crate::edit::serac::tests::speaker(dir.path(), &device);
        let pool = [
            record(
                "what color is the star?",
                "which color does the star have?",
                "red",
            ),
            record("how many shapes are there?", "count the shapes.", "two"),
        ];
        let mut ike = IkeEditor::new(base, &pool, 1, &device);
        let query = Query {
            image: None,
            prompt: crate::data::record::vqa_prompt("which color does the circle have?"),
        };
        assert_eq!(ike.context.context(&query), "", "no fact, no context");
        ike.edit(&record(
            "what color is the circle?",
            "which color does the circle have?",
            "blue",
        ))
        .unwrap();
        ike.edit(&record(
            "how big is the square?",
            "what size is the square?",
            "small",
        ))
        .unwrap();
        let context = ike.context.context(&query);
        assert_eq!(
            context,
            "Question: what color is the star? Short answer: red || \
             Question: which color does the star have? Short answer: red || \
             Question: what color is the circle? Short answer: blue || "
        );
        let p = ike.predict(&query, "blue", 1).unwrap();
        assert_eq!(p.argmax.len(), p.target.len());
        ike.reset();
        assert_eq!(ike.context.context(&query), "");
    }
}
