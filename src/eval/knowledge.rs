//! What a VLM knows: teacher-forced exact match and token accuracy over a file's pre-edit
//! (or counterfactual) examples, overall and per question family.

use std::collections::BTreeMap;

use burn::tensor::Device;
use serde::Serialize;

use crate::data::lm::{LmBatcher, LmExample};
use crate::data::pairs::PairKind;
use crate::data::record::CAPTION_REPHRASE;
use crate::data::scenes::{self, CAPTION_PROMPT};
use crate::error::Result;
use crate::model::answer::{AnswerScore, answer_scores};
use crate::model::vlm::Vlm;

/// Exact match and token accuracy of a set of answers, in % (0-100).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct KnowledgeScore {
    pub n: usize,
    pub exact_match: f64,
    pub token_accuracy: f64,
}

impl KnowledgeScore {
    pub fn new(scores: &[AnswerScore]) -> Self {
        let exact = scores.iter().filter(|s| s.exact()).count();
        let right: usize = scores.iter().map(|s| s.right).sum();
        let positions: usize = scores.iter().map(|s| s.positions).sum();
        let pct = |a: usize, b: usize| {
            if b > 0 {
                100.0 * a as f64 / b as f64
            } else {
                0.0
            }
        };
        Self {
            n: scores.len(),
            exact_match: pct(exact, scores.len()),
            token_accuracy: pct(right, positions),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KnowledgeReport {
    pub all: KnowledgeScore,
    pub families: BTreeMap<String, KnowledgeScore>,
    /// Counterfactual knowledge only: per kind of question about the edit (`edit`,
    /// `hard-in-scope`, `near`, ...; [`crate::data::lm::counterfactual_examples_by_kind`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub kinds: BTreeMap<String, KnowledgeScore>,
}

/// The family of an example: `text-only` facts, `caption` (either captioning prompt), or the
/// family of its answer (`color`, `shape`, `size`, `position`, `count`, `yes/no`; `other`
/// for answers outside the scenes vocabulary).
pub fn family(example: &LmExample) -> &'static str {
    if example.image.is_none() {
        "text-only"
    } else if [CAPTION_PROMPT, CAPTION_REPHRASE]
        .iter()
        .any(|p| example.prompt.ends_with(p))
    {
        "caption"
    } else {
        scenes::answer_family(&example.answer).unwrap_or("other")
    }
}

impl KnowledgeReport {
    pub fn new(examples: &[LmExample], scores: &[AnswerScore]) -> Self {
        let mut by_family: BTreeMap<String, Vec<AnswerScore>> = BTreeMap::new();
        for (example, score) in examples.iter().zip(scores) {
            by_family
                .entry(family(example).to_string())
                .or_default()
                .push(*score);
        }
        Self {
            all: KnowledgeScore::new(scores),
            families: by_family
                .into_iter()
                .map(|(f, s)| (f, KnowledgeScore::new(&s)))
                .collect(),
            kinds: BTreeMap::new(),
        }
    }

    /// The report with a score per kind of question (`kinds[i]` is `scores[i]`'s).
    pub fn with_kinds(mut self, kinds: &[String], scores: &[AnswerScore]) -> Self {
        let mut by_kind: BTreeMap<String, Vec<AnswerScore>> = BTreeMap::new();
        for (kind, score) in kinds.iter().zip(scores) {
            by_kind.entry(kind.clone()).or_default().push(*score);
        }
        self.kinds = by_kind
            .into_iter()
            .map(|(kind, s)| (kind, KnowledgeScore::new(&s)))
            .collect();
        self
    }

    /// A Markdown table: one row per family, then all.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| family | examples | exact match % | token accuracy % |\n| --- | --- | --- | --- |\n",
        );
        let rows = self.families.iter().map(|(f, s)| (f.as_str(), s));
        for (name, s) in rows.chain([("all", &self.all)]) {
            out += &format!(
                "| {name} | {} | {:.2} | {:.2} |\n",
                s.n, s.exact_match, s.token_accuracy
            );
        }
        if !self.kinds.is_empty() {
            out += "\n| question kind | examples | exact match % | token accuracy % |\n| --- | --- | --- | --- |\n";
            for (name, s) in &self.kinds {
                out += &format!(
                    "| {name} | {} | {:.2} | {:.2} |\n",
                    s.n, s.exact_match, s.token_accuracy
                );
            }
        }
        out
    }
}

/// Scores `model` on `examples` (teacher-forced, in batches of 64).
pub fn evaluate(
    model: &Vlm,
    examples: &[LmExample],
    batcher: &mut LmBatcher,
    device: &Device,
) -> Result<KnowledgeReport> {
    let scores = answer_scores(model, examples, batcher, 64, device)?;
    Ok(KnowledgeReport::new(examples, &scores))
}

/// Scores `model` on the counterfactual examples of `records`, per family and per kind of
/// question about the edit.
pub fn evaluate_counterfactual(
    model: &Vlm,
    records: &[crate::data::record::EditRecord],
    batcher: &mut LmBatcher,
    device: &Device,
) -> Result<KnowledgeReport> {
    let (examples, kinds): (Vec<LmExample>, Vec<PairKind>) = records
        .iter()
        .flat_map(crate::data::lm::counterfactual_examples_by_kind)
        .unzip();
    // The caption edit's questions apart from the VQA edit's.
    let names: Vec<String> = examples
        .iter()
        .zip(&kinds)
        .map(|(example, kind)| {
            let name = serde_json::to_value(kind).expect("kinds serialize");
            let name = name.as_str().unwrap_or("?");
            match family(example) {
                "caption" => format!("caption {name}"),
                _ => name.to_string(),
            }
        })
        .collect();
    let scores = answer_scores(model, &examples, batcher, 64, device)?;
    Ok(KnowledgeReport::new(&examples, &scores).with_kinds(&names, &scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_percentages_come_from_the_answers() {
        let example = |image: bool, prompt: &str, answer: &str| LmExample {
            image: image.then(|| "x.png".into()),
            prompt: prompt.into(),
            answer: answer.into(),
            grounding: None,
        };
        let examples = [
            example(
                true,
                "Question: what color is the circle? Short answer:",
                "red",
            ),
            example(
                true,
                "Question: what color is the star? Short answer:",
                "blue",
            ),
            example(true, "a photo of", "a small red circle in the center"),
            example(false, "what is the capital of france?", "paris"),
        ];
        let score = |right, positions| AnswerScore { right, positions };
        let scores = [score(2, 2), score(1, 2), score(7, 8), score(0, 2)];
        let report = KnowledgeReport::new(&examples, &scores);
        assert_eq!(
            report.families.keys().collect::<Vec<_>>(),
            ["caption", "color", "text-only"]
        );
        assert_eq!(report.families["color"].n, 2);
        assert_eq!(report.families["color"].exact_match, 50.0);
        assert_eq!(report.families["color"].token_accuracy, 75.0);
        assert_eq!(report.families["caption"].exact_match, 0.0);
        assert_eq!(report.families["caption"].token_accuracy, 87.5);
        assert_eq!(report.all.exact_match, 25.0);
        assert_eq!(report.all.token_accuracy, 10.0 / 14.0 * 100.0);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["all"]["n"], 4);
        assert_eq!(json["families"]["text-only"]["exact_match"], 0.0);
        assert!(
            json.get("kinds").is_none(),
            "pre-edit reports have no kinds"
        );
        // Per kind of question about the edit, where given.
        let kinds = [
            "hard-in-scope",
            "hard-out-of-scope",
            "edit",
            "hard-in-scope",
        ]
        .map(String::from);
        let report = report.with_kinds(&kinds, &scores);
        assert_eq!(report.kinds["hard-in-scope"].n, 2);
        assert_eq!(report.kinds["hard-in-scope"].exact_match, 50.0);
        assert_eq!(report.kinds["hard-out-of-scope"].exact_match, 0.0);
        assert!(
            report
                .markdown()
                .contains("| hard-in-scope | 2 | 50.00 | 50.00 |")
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["kinds"]["edit"]["token_accuracy"], 87.5);
    }
}
