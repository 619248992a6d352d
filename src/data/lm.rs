//! What a VLM learns from and is scored on: examples (a prompt, the answer, the cells it is
//! about) built from edit records, and their batches (`[BOS] prompt answer [EOS]`, the
//! answer positions marked).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::data::image::ImagePreprocessor;
use crate::data::pairs::PairKind;
use crate::data::record::EditRecord;
use crate::data::template::PromptTemplate;
use crate::data::text::TextTokenizer;
use crate::error::Result;

/// A prompt and the answer the model should give, on an image or on text alone.
#[derive(Clone, Debug, PartialEq)]
pub struct LmExample {
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub answer: String,
    /// Which cells the prompt is about, when the data says (scenes scope questions): the
    /// target of the [`referent_loss`] while pre-training.
    pub grounding: Option<Grounding>,
}

/// The cells a question is about (cells in reading order, 0-8).
#[derive(Clone, Debug, PartialEq)]
pub enum Grounding {
    /// The one object an attribute question's expression refers to.
    Referent(u8),
    /// The objects a count or existence question picks out (possibly none).
    Matches(Vec<u8>),
}

impl Grounding {
    /// A scope question's grounding on the unedited image.
    pub fn of(query: &crate::data::record::ScopeQuery) -> Option<Self> {
        match (query.cell, &query.matches) {
            (Some(cell), _) => Some(Grounding::Referent(cell)),
            (None, Some(cells)) => Some(Grounding::Matches(cells.clone())),
            (None, None) => None,
        }
    }

    /// A scope question's grounding in the world `record`'s edit describes: a moved object is
    /// where the edit put it; an edit changes one object, so a count or existence answer that
    /// changes means the edited cell joined or left the matches. `None` without the edited
    /// cell (not a scenes record).
    pub fn after_edit(
        query: &crate::data::record::ScopeQuery,
        record: &crate::data::record::EditRecord,
    ) -> Option<Self> {
        let edited = record.edit_cell?;
        let moved = |c: u8| match record.moved_to {
            Some(to) if c == edited => to,
            _ => c,
        };
        match Self::of(query)? {
            Grounding::Referent(c) => Some(Grounding::Referent(moved(c))),
            Grounding::Matches(cells) => {
                let mut cells: Vec<u8> = cells.into_iter().map(moved).collect();
                if record.moved_to.is_none() && query.answer_before != query.answer_after {
                    match cells.iter().position(|&c| c == edited) {
                        Some(i) => {
                            cells.remove(i);
                        }
                        None => cells.push(edited),
                    }
                }
                Some(Grounding::Matches(cells))
            }
        }
    }

    /// Per cell of `cells`, 1 where the question is about it.
    pub(crate) fn targets(&self, cells: usize) -> Vec<f32> {
        let mut out = vec![0.0; cells];
        match self {
            Grounding::Referent(c) => out[*c as usize] = 1.0,
            Grounding::Matches(cs) => cs.iter().for_each(|&c| out[c as usize] = 1.0),
        }
        out
    }
}

/// What the unedited model should answer about `record`: everything true of S.
pub fn pre_edit_examples(record: &EditRecord) -> Vec<LmExample> {
    let on = |image: &Path, prompt: &str, answer: &str| LmExample {
        image: Some(image.to_path_buf()),
        prompt: prompt.to_string(),
        answer: answer.to_string(),
        grounding: None,
    };
    let mut out: Vec<LmExample> = record
        .scope
        .iter()
        .map(|q| LmExample {
            grounding: Grounding::of(q),
            ..on(&record.image, &q.prompt, &q.answer_before)
        })
        .collect();
    if let Some(original) = &record.original {
        out.push(on(&record.image, &record.prompt, original));
        if let Some(rephrase) = &record.rephrase {
            out.push(on(&record.image, rephrase, original));
        }
    }
    if record.scope.is_empty()
        && let Some(q) = &record.fg_loc
    {
        out.push(on(&q.image, &q.prompt, &q.answer));
    }
    if let Some(q) = &record.m_loc {
        out.push(on(&q.image, &q.prompt, &q.answer));
    }
    if let Some(caption) = &record.caption {
        out.push(on(&record.image, &caption.prompt, &caption.before));
    }
    if let Some(q) = &record.loc {
        out.push(LmExample {
            image: None,
            prompt: q.prompt.clone(),
            answer: q.answer.clone(),
            grounding: None,
        });
    }
    out
}

/// The edit as the counterfactual model reads it before the query (`{src} >> {alt} || `, as
/// in the reference implementation).
pub fn edit_context(record: &EditRecord) -> String {
    format!("{} >> {} || ", record.prompt, record.target)
}

/// What the counterfactual model should answer about `record`: every question on the edit
/// image as under S' (in-scope ones with their new answer, the rest unchanged), the edit
/// question, its rephrase and the rephrased image with the target, each after the edit
/// context; and the same for the captioning edit of the change, when the record has one.
pub fn counterfactual_examples(record: &EditRecord) -> Vec<LmExample> {
    counterfactual_examples_by_kind(record)
        .into_iter()
        .map(|(example, _)| example)
        .collect()
}

/// [`counterfactual_examples`], each with the kind of question it is about the edit (the
/// scope classifier's pair kinds; the caption edit's are `edit`, `rephrase` and
/// `image-rephrase`). `kind.in_scope()`: the edit changes the answer.
pub fn counterfactual_examples_by_kind(record: &EditRecord) -> Vec<(LmExample, PairKind)> {
    let context = edit_context(record);
    let on = |image: &Path, prompt: &str, answer: &str| LmExample {
        image: Some(image.to_path_buf()),
        prompt: format!("{context}{prompt}"),
        answer: answer.to_string(),
        grounding: None,
    };
    let mut out = vec![(
        on(&record.image, &record.prompt, &record.target),
        PairKind::Edit,
    )];
    if let Some(rephrase) = &record.rephrase {
        out.push((
            on(&record.image, rephrase, &record.target),
            PairKind::Rephrase,
        ));
    }
    if let Some(image) = &record.image_rephrase {
        out.push((
            on(image, &record.prompt, &record.target),
            PairKind::ImageRephrase,
        ));
    }
    // Only the referent is supervised: with the count and existence questions' matches too,
    // existence questions fell from 96-99% to 51-76% (quick split, 800 steps).
    out.extend(record.scope.iter().map(|q| {
        let example = LmExample {
            grounding: Grounding::after_edit(q, record)
                .filter(|g| matches!(g, Grounding::Referent(_))),
            ..on(&record.image, &q.prompt, &q.answer_after)
        };
        (example, PairKind::of_scope_query(q))
    }));
    if record.scope.is_empty() {
        for (q, kind) in record
            .fg_gen
            .iter()
            .map(|q| (q, PairKind::HardInScope))
            .chain(record.fg_loc.iter().map(|q| (q, PairKind::HardOutOfScope)))
        {
            out.push((on(&q.image, &q.prompt, &q.answer), kind));
        }
    }
    // The captioning edit of the same change, read the same way.
    if let Some(caption) = record.caption_edit() {
        let context = edit_context(&caption);
        let mut queries = vec![(
            caption.image.clone(),
            caption.prompt.clone(),
            PairKind::Edit,
        )];
        queries.extend(
            caption
                .rephrase
                .iter()
                .map(|r| (caption.image.clone(), r.clone(), PairKind::Rephrase)),
        );
        queries.extend(
            caption
                .image_rephrase
                .iter()
                .map(|i| (i.clone(), caption.prompt.clone(), PairKind::ImageRephrase)),
        );
        out.extend(queries.into_iter().map(|(image, prompt, kind)| {
            let example = LmExample {
                image: Some(image),
                prompt: format!("{context}{prompt}"),
                answer: caption.target.clone(),
                grounding: None,
            };
            (example, kind)
        }));
    }
    out
}

/// Examples as tensors: `[BOS] prompt answer [EOS]`, right-padded, and per position the
/// token it should predict (the next one) where that token is part of the answer or the end.
pub struct LmBatch {
    pub pixels: Option<Tensor<4>>,
    pub ids: Tensor<2, Int>,
    pub mask: Tensor<2, Int>,
    /// `[batch, seq]`: the next token at answer positions, 0 elsewhere.
    pub targets: Tensor<2, Int>,
    /// `[batch, seq]`: 1 at answer positions.
    pub weights: Tensor<2>,
    /// Per example, the positions whose predictions are scored (the answer's tokens and the
    /// end token are predicted there).
    pub spans: Vec<std::ops::Range<usize>>,
    /// Per example, [`LmExample::grounding`].
    pub groundings: Vec<Option<Grounding>>,
}

/// Tokenizes examples and keeps preprocessed images in memory.
#[derive(Clone)]
pub struct LmBatcher {
    tokenizer: TextTokenizer,
    preprocessor: ImagePreprocessor,
    images: HashMap<PathBuf, Vec<f32>>,
    bos: i64,
    eos: i64,
    /// Mark the BOS and prompt tokens as the bidirectional prefix (mask value 2) for a
    /// prefix-LM VLM.
    prefix_lm: bool,
    /// The model's chat format around each prompt (LLaVA's), if it has one.
    template: Option<Templated>,
}

/// A prompt template with what its tokenization needs.
#[derive(Clone)]
struct Templated {
    template: PromptTemplate,
    /// The tokenizer's image marker (`<image>`) and its id, when it has one: the templated
    /// text is then tokenized in one piece, as the model's processor does.
    marker: Option<(String, i64)>,
    /// How many text tokens (BOS first) come before the image.
    image_at: usize,
}

impl LmBatcher {
    pub fn new(
        tokenizer: TextTokenizer,
        preprocessor: ImagePreprocessor,
        bos: u32,
        eos: u32,
    ) -> Self {
        Self {
            tokenizer,
            preprocessor,
            images: HashMap::new(),
            bos: bos as i64,
            eos: eos as i64,
            prefix_lm: false,
            template: None,
        }
    }

    /// Batches whose prompts are wrapped in `template`, the image where its `{image}` is.
    /// `marker` is the tokenizer's image token (`<image>`, with its id) if it has one: the
    /// text around the image is then tokenized in one piece, as the model's processor does
    /// (a SentencePiece vocabulary tokenizes a piece differently at the start of a text);
    /// else the two sides are tokenized apart.
    pub fn with_template(
        mut self,
        template: PromptTemplate,
        marker: Option<(String, u32)>,
    ) -> Result<Self> {
        template.check().map_err(crate::Error::Input)?;
        let marker = marker.map(|(text, id)| (text, id as i64));
        let (before, _) = template.around_image("");
        let image_at = match &marker {
            Some((text, id)) => {
                let ids = self.tokenizer.encode(&format!("{before}{text}"), false)?;
                1 + ids.iter().position(|t| t == id).ok_or_else(|| {
                    crate::Error::Input(format!(
                        "the tokenizer does not keep the image marker {text:?} as one token"
                    ))
                })?
            }
            None => 1 + self.tokenizer.encode(&before, false)?.len(),
        };
        self.template = Some(Templated {
            template,
            marker,
            image_at,
        });
        Ok(self)
    }

    /// The prompt template, if the model has one.
    pub fn template(&self) -> Option<&PromptTemplate> {
        self.template.as_ref().map(|t| &t.template)
    }

    /// How many text tokens (BOS first) come before the image: `None` without a template
    /// (the model's own placement).
    pub fn image_at(&self) -> Option<usize> {
        self.template.as_ref().map(|t| t.image_at)
    }

    /// The ids of BOS and `prompt` in the model's template (the image left out: the model
    /// places it after [`Self::image_at`] of them).
    pub fn prompt_ids(&self, prompt: &str, with_image: bool) -> Result<Vec<i64>> {
        let mut ids = vec![self.bos];
        let Some(t) = &self.template else {
            ids.extend(self.tokenizer.encode(prompt, false)?);
            return Ok(ids);
        };
        if !with_image {
            ids.extend(self.tokenizer.encode(&t.template.text(prompt), false)?);
            return Ok(ids);
        }
        let (before, after) = t.template.around_image(prompt);
        match &t.marker {
            Some((text, id)) => {
                let whole = self
                    .tokenizer
                    .encode(&format!("{before}{text}{after}"), false)?;
                if whole.iter().filter(|&t| t == id).count() != 1 {
                    return Err(crate::Error::Input(format!(
                        "the prompt must not hold the image marker {text:?} itself: {prompt:?}"
                    )));
                }
                let at = whole.iter().position(|t| t == id).map(|p| p + 1);
                if at != Some(t.image_at) {
                    return Err(crate::Error::Input(format!(
                        "the text before the image tokenizes to {at:?} tokens with {prompt:?}, \
                         {} without: the model places the image after a fixed count",
                        t.image_at
                    )));
                }
                ids.extend(whole.into_iter().filter(|t| t != id));
            }
            None => {
                ids.extend(self.tokenizer.encode(&before, false)?);
                ids.extend(self.tokenizer.encode(&after, false)?);
            }
        }
        Ok(ids)
    }

    /// Batches for a prefix-LM model (`VlmConfig::prefix_lm`).
    pub fn with_prefix_lm(mut self, prefix_lm: bool) -> Self {
        self.prefix_lm = prefix_lm;
        self
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn preprocessor(&self) -> &ImagePreprocessor {
        &self.preprocessor
    }

    pub fn bos(&self) -> u32 {
        self.bos as u32
    }

    pub fn eos(&self) -> u32 {
        self.eos as u32
    }

    /// The preprocessed images, `[n, 3, h, w]` (each loaded once, then kept).
    pub fn pixels(&mut self, paths: &[&Path], device: &Device) -> Result<Tensor<4>> {
        let mut flat = Vec::new();
        for &path in paths {
            if !self.images.contains_key(path) {
                let pixels = self.preprocessor.load(path)?;
                self.images.insert(path.to_path_buf(), pixels);
            }
            flat.extend_from_slice(&self.images[path]);
        }
        let (h, w) = self.preprocessor.crop.ok_or_else(|| crate::Error::Config {
            path: paths.first().map(|p| p.to_path_buf()).unwrap_or_default(),
            reason: "VLM batches need one image size: the preprocessor must center-crop".into(),
        })?;
        let shape = [paths.len(), 3, h as usize, w as usize];
        Ok(Tensor::from_data(TensorData::new(flat, shape), device))
    }

    /// All examples must either have an image or not.
    pub fn batch(&mut self, examples: &[&LmExample], device: &Device) -> Result<LmBatch> {
        let with_image = examples.first().is_some_and(|e| e.image.is_some());
        assert!(
            examples.iter().all(|e| e.image.is_some() == with_image),
            "a batch is all image or all text-only examples"
        );
        let mut sequences = Vec::with_capacity(examples.len());
        let mut answer_spans = Vec::with_capacity(examples.len());
        for e in examples {
            let mut ids = self.prompt_ids(&e.prompt, with_image)?;
            let answer = self.tokenizer.encode(&e.answer, false)?;
            let start = ids.len();
            ids.extend(answer);
            ids.push(self.eos);
            answer_spans.push((start, ids.len()));
            sequences.push(ids);
        }
        let n = examples.len();
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![self.tokenizer.pad_id() as i64; n * seq];
        let mut mask = vec![0i64; n * seq];
        let mut targets = vec![0i64; n * seq];
        let mut weights = vec![0f32; n * seq];
        for (b, (tokens, &(start, end))) in sequences.iter().zip(&answer_spans).enumerate() {
            let prefix_mask = if self.prefix_lm { 2 } else { 1 };
            for (t, &id) in tokens.iter().enumerate() {
                ids[b * seq + t] = id;
                mask[b * seq + t] = if t < start { prefix_mask } else { 1 };
            }
            // Position t predicts token t + 1: the answer and the end token.
            for t in start - 1..end - 1 {
                targets[b * seq + t] = tokens[t + 1];
                weights[b * seq + t] = 1.0;
            }
        }
        let pixels = if with_image {
            let paths: Vec<&Path> = examples
                .iter()
                .map(|e| e.image.as_deref().expect("checked above"))
                .collect();
            Some(self.pixels(&paths, device)?)
        } else {
            None
        };
        let int = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [n, seq]), device);
        Ok(LmBatch {
            pixels,
            ids: int(ids),
            mask: int(mask),
            targets: int(targets),
            weights: Tensor::from_data(TensorData::new(weights, [n, seq]), device),
            spans: answer_spans
                .iter()
                .map(|&(start, end)| start - 1..end - 1)
                .collect(),
            groundings: examples.iter().map(|e| e.grounding.clone()).collect(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The scenes vocabulary's tokenizer, from the file it is read from (kept in the dir).
    pub(crate) fn scenes_tokenizer() -> (tempfile::TempDir, TextTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let json = crate::data::scenes::word_level_tokenizer()
            .to_string(false)
            .unwrap();
        std::fs::write(&path, json).unwrap();
        let tokenizer = TextTokenizer::from_file(&path, 64, 0).unwrap();
        (dir, tokenizer)
    }

    #[test]
    fn counterfactual_examples_say_which_kind_of_question_they_are() {
        let mut record =
            EditRecord::vqa(PathBuf::from("x.png"), "what size is the circle?", "large");
        record.rephrase = Some("how big is the circle?".into());
        let scope = |prompt: &str, before: &str, after: &str| crate::data::record::ScopeQuery {
            prompt: prompt.into(),
            answer_before: before.into(),
            answer_after: after.into(),
            in_scope: before != after,
            hard: false,
            near: false,
            cell: Some(4),
            matches: None,
        };
        record.scope = vec![
            scope("what size is the red shape?", "small", "large"),
            scope("what color is the circle?", "red", "red"),
        ];
        let marked = counterfactual_examples_by_kind(&record);
        let kinds: Vec<PairKind> = marked.iter().map(|(_, kind)| *kind).collect();
        assert_eq!(
            kinds,
            [
                PairKind::Edit,
                PairKind::Rephrase,
                PairKind::InScope,
                PairKind::OutOfScope
            ]
        );
        assert_eq!(marked[2].0.answer, "large");
        assert_eq!(marked[3].0.answer, "red");
        assert!(
            marked
                .iter()
                .all(|(e, _)| e.prompt.starts_with(&edit_context(&record)))
        );
        let plain: Vec<LmExample> = marked.into_iter().map(|(e, _)| e).collect();
        assert_eq!(counterfactual_examples(&record), plain);
    }

    #[test]
    fn groundings_after_an_edit_follow_the_edited_object() {
        use crate::data::record::ScopeQuery;
        let query =
            |cell: Option<u8>, matches: Option<Vec<u8>>, before: &str, after: &str| ScopeQuery {
                prompt: "q".into(),
                answer_before: before.into(),
                answer_after: after.into(),
                in_scope: before != after,
                hard: false,
                near: false,
                cell,
                matches,
            };
        let mut record =
            EditRecord::vqa(PathBuf::from("x.png"), "what color is the circle?", "red");
        // Not a scenes record: nothing is known.
        assert_eq!(
            Grounding::after_edit(&query(Some(4), None, "a", "a"), &record),
            None
        );
        record.edit_cell = Some(4);
        // A recolored object: the referent stays; a count that changes gains or loses it.
        let referent = query(Some(4), None, "blue", "red");
        assert_eq!(
            Grounding::after_edit(&referent, &record),
            Some(Grounding::Referent(4))
        );
        let gains = query(None, Some(vec![1]), "one", "two");
        assert_eq!(
            Grounding::after_edit(&gains, &record),
            Some(Grounding::Matches(vec![1, 4]))
        );
        let loses = query(None, Some(vec![4, 1]), "yes", "no");
        assert_eq!(
            Grounding::after_edit(&loses, &record),
            Some(Grounding::Matches(vec![1]))
        );
        let same = query(None, Some(vec![4]), "one", "one");
        assert_eq!(
            Grounding::after_edit(&same, &record),
            Some(Grounding::Matches(vec![4]))
        );
        // A moved object is found where the edit put it.
        record.moved_to = Some(8);
        assert_eq!(
            Grounding::after_edit(&referent, &record),
            Some(Grounding::Referent(8))
        );
        assert_eq!(
            Grounding::after_edit(&same, &record),
            Some(Grounding::Matches(vec![8]))
        );
    }

    #[test]
    fn targets_are_the_answer_and_end_tokens_shifted_by_one() {
        let (_dir, tokenizer) = scenes_tokenizer();
        let id = |w: &str| tokenizer.encode(w, false).unwrap()[0];
        let (red, what, color) = (id("red"), id("what"), id("color"));
        let mut batcher = LmBatcher::new(tokenizer, ImagePreprocessor::clip(16), 2, 3);
        let example = LmExample {
            image: None,
            prompt: "what color".into(),
            answer: "red".into(),
            grounding: None,
        };
        let batch = batcher.batch(&[&example], &Device::flex()).unwrap();
        let ids: Vec<i64> = batch
            .ids
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .unwrap();
        assert_eq!(ids, [2, what, color, red, 3]);
        let targets: Vec<i64> = batch
            .targets
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .unwrap();
        // Position 2 ("color") predicts "red", position 3 ("red") the end token.
        assert_eq!(targets, [0, 0, red, 3, 0]);
        let weights: Vec<f32> = batch.weights.into_data().try_to_vec().unwrap();
        assert_eq!(weights, [0.0, 0.0, 1.0, 1.0, 0.0]);
    }
}
