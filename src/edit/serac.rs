//! Memory-based editing (SERAC, and MSCKE with a multimodal classifier): an edit is stored,
//! never written into the base model. Each query is routed by the scope classifier against
//! every stored edit (eq. 1-3): in scope (rho >= 0.5) -> the counterfactual model answers,
//! reading the routed edit as context; otherwise the frozen base model answers. MSCKE-MEND
//! puts MEND behind the same router: in scope, the base model edited by MEND with the routed
//! edit answers.

use std::path::PathBuf;

use burn::tensor::Device;

use super::memory::{EditMemory, Route};
use super::speaker::{Prediction, Query, Speaker};
use crate::data::batch::ScopeBatcher;
use crate::data::lm::edit_context;
use crate::data::record::EditRecord;
use crate::error::Result;
use crate::model::editable::EditableModel;
use crate::model::scope::ScopeClassifier;
use crate::model::vlm::Vlm;

/// How a query was answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// The nearest stored edit and its rho (`None` with an empty memory).
    pub route: Option<Route>,
    /// Whether the counterfactual model answered.
    pub edited: bool,
    pub text: String,
}

/// What answers an in-scope query (`B`: the base model, `C`: the counterfactual model).
pub enum InScope<B = Vlm, C = Vlm> {
    /// A counterfactual model reading the routed edit as context (SERAC, MSCKE).
    Counterfactual(Box<Speaker<C>>),
    /// The base model edited by MEND with the routed edit alone (MSCKE-MEND); `applied` is
    /// the edit its weights hold now.
    Mend {
        editor: Box<super::mend::HypernetEditor<super::mend::Mend, B>>,
        applied: Option<usize>,
    },
}

/// The router over a base model `B` (the scenes VLM or a real MLLM) with a counterfactual
/// model `C` (on a real MLLM, [`crate::model::mllm::counterfactual::CounterfactualMllm`]).
pub struct MemoryEditor<B = Vlm, C = Vlm> {
    pub classifier: ScopeClassifier,
    pub batcher: ScopeBatcher,
    pub base: Speaker<B>,
    pub in_scope: InScope<B, C>,
    memory: EditMemory,
    edits: Vec<EditRecord>,
    device: Device,
}

impl<B: EditableModel, C: EditableModel> MemoryEditor<B, C> {
    pub fn new(
        classifier: ScopeClassifier,
        batcher: ScopeBatcher,
        base: Speaker<B>,
        counterfactual: Speaker<C>,
        device: &Device,
    ) -> Self {
        Self::with(
            classifier,
            batcher,
            base,
            InScope::Counterfactual(Box::new(counterfactual)),
            device,
        )
    }

    /// A router with any in-scope answerer (MSCKE-MEND: [`InScope::Mend`]).
    pub fn with(
        classifier: ScopeClassifier,
        batcher: ScopeBatcher,
        base: Speaker<B>,
        in_scope: InScope<B, C>,
        device: &Device,
    ) -> Self {
        Self {
            memory: EditMemory::for_classifier(&classifier, device),
            classifier,
            batcher,
            base,
            in_scope,
            edits: Vec::new(),
            device: device.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.edits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Stores an edit: its z_e (edit image with "question + target") joins the memory.
    pub fn edit(&mut self, record: &EditRecord) -> Result<()> {
        self.batcher.preload([&record.image])?;
        let input = self.batcher.edit_side(
            &[(&record.prompt, &record.target, &record.image)],
            &self.device,
        )?;
        self.memory.insert(self.classifier.encode(&input));
        self.edits.push(record.clone());
        Ok(())
    }

    /// Forgets every edit.
    pub fn reset(&mut self) {
        self.memory = EditMemory::for_classifier(&self.classifier, &self.device);
        self.edits.clear();
        if let InScope::Mend { applied, .. } = &mut self.in_scope {
            // Edit indices restart: the next routed edit is applied afresh.
            *applied = None;
        }
    }

    /// The nearest stored edit of each query (eq. 1-2).
    pub fn route(&mut self, queries: &[Query]) -> Result<Vec<Option<Route>>> {
        if self.edits.is_empty() {
            return Ok(vec![None; queries.len()]);
        }
        self.batcher
            .preload(queries.iter().filter_map(|q| q.image.as_ref()))?;
        let images: Vec<Option<&PathBuf>> = queries.iter().map(|q| q.image.as_ref()).collect();
        let input = self.batcher.side(
            queries.iter().map(|q| q.prompt.as_str()),
            &images,
            &self.device,
        )?;
        let routes = self
            .memory
            .route(self.classifier.encode(&input))
            .expect("a non-empty memory");
        Ok(routes.into_iter().map(Some).collect())
    }

    /// Which model answers `query`, and the prompt it reads: in scope (eq. 3), the
    /// counterfactual model with the routed edit as context, or the base model edited by MEND
    /// with it; otherwise the base model.
    fn dispatch(&mut self, query: &Query) -> Result<(Option<Route>, bool, String)> {
        let route = self.route(std::slice::from_ref(query))?[0];
        let Some(r) = route.filter(Route::in_scope) else {
            return Ok((route, false, query.prompt.clone()));
        };
        let prompt = match &mut self.in_scope {
            InScope::Counterfactual(_) => {
                format!("{}{}", edit_context(&self.edits[r.edit]), query.prompt)
            }
            InScope::Mend { editor, applied } => {
                if *applied != Some(r.edit) {
                    use super::Editor;
                    editor.reset();
                    editor.edit(&self.edits[r.edit])?;
                    *applied = Some(r.edit);
                }
                query.prompt.clone()
            }
        };
        Ok((route, true, prompt))
    }

    /// What the in-scope model (`edited`) or the base model answers.
    fn answer_by(
        &mut self,
        edited: bool,
        image: Option<&std::path::Path>,
        prompt: &str,
        max_new: usize,
    ) -> Result<String> {
        match (&mut self.in_scope, edited) {
            (_, false) => self.base.answer(image, prompt, max_new, &self.device),
            (InScope::Counterfactual(speaker), true) => {
                speaker.answer(image, prompt, max_new, &self.device)
            }
            (InScope::Mend { editor, .. }, true) => {
                let (speaker, device) = editor.speaker_and_device();
                speaker.answer(image, prompt, max_new, device)
            }
        }
    }

    /// The teacher-forced predictions of the in-scope model (`edited`) or the base model.
    fn predict_by(
        &mut self,
        edited: bool,
        image: Option<&std::path::Path>,
        prompt: &str,
        answer: &str,
        k: usize,
    ) -> Result<Prediction> {
        match (&mut self.in_scope, edited) {
            (_, false) => self.base.predict(image, prompt, answer, k, &self.device),
            (InScope::Counterfactual(speaker), true) => {
                speaker.predict(image, prompt, answer, k, &self.device)
            }
            (InScope::Mend { editor, .. }, true) => {
                let (speaker, device) = editor.speaker_and_device();
                speaker.predict(image, prompt, answer, k, device)
            }
        }
    }

    /// Answers a query: the counterfactual model with the routed edit as context when the
    /// query is in scope (eq. 3), the base model otherwise.
    pub fn answer_with_route(&mut self, query: &Query, max_new: usize) -> Result<Answer> {
        let (route, edited, prompt) = self.dispatch(query)?;
        let text = self.answer_by(edited, query.image.as_deref(), &prompt, max_new)?;
        Ok(Answer {
            route,
            edited,
            text,
        })
    }
}

impl<B: EditableModel, C: EditableModel> super::Editor for MemoryEditor<B, C> {
    fn edit(&mut self, record: &EditRecord) -> Result<()> {
        MemoryEditor::edit(self, record)
    }

    fn predict(&mut self, query: &Query, answer: &str, k: usize) -> Result<Prediction> {
        let (_, edited, prompt) = self.dispatch(query)?;
        self.predict_by(edited, query.image.as_deref(), &prompt, answer, k)
    }

    fn answer(&mut self, query: &Query, max_new: usize) -> Result<String> {
        Ok(self.answer_with_route(query, max_new)?.text)
    }

    fn reset(&mut self) {
        MemoryEditor::reset(self)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::image::ImagePreprocessor;
    use crate::data::pairs::pairs;
    use crate::data::scenes::{self, ScenesConfig};
    use crate::data::text::TextTokenizer;
    use crate::model::clip::{ClipConfig, ClipModel};
    use crate::model::fusion::FusionKind;
    use crate::model::scope::{ScopeConfig, Similarity};
    use crate::model::vlm::{Vlm, VlmConfig};
    use std::path::Path;

    const IMAGE: u32 = 32;

    /// `module` with every weight redrawn from its own generator (seeded by `seed`): normal
    /// around the weight's mean with its spread, so zeros stay zeros and ones ones. Tests that
    /// need one exact random model use it: the device's generator is shared with the tests
    /// running beside them.
    pub(crate) fn reseeded<M: burn::module::Module>(module: M, seed: u64) -> M {
        use burn::module::{ModuleMapper, Param};
        use burn::tensor::{Tensor, TensorData};
        use rand::SeedableRng;
        use rand_distr::Distribution;
        struct Reseed(rand_chacha::ChaCha8Rng);
        impl ModuleMapper for Reseed {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let rng = &mut self.0;
                param.map(|t| {
                    let (shape, device) = (t.shape(), t.device());
                    let values: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().unwrap();
                    let n = values.len().max(1) as f32;
                    let mean = values.iter().sum::<f32>() / n;
                    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
                    let normal = rand_distr::StandardNormal;
                    let redrawn: Vec<f32> = values
                        .iter()
                        .map(|_| {
                            let z: f32 = normal.sample(rng);
                            mean + var.sqrt() * z
                        })
                        .collect();
                    Tensor::from_data(TensorData::new(redrawn, shape), &device)
                })
            }
        }
        module.map(&mut Reseed(rand_chacha::ChaCha8Rng::seed_from_u64(seed)))
    }

    /// An untrained, very small VLM for the scenes in `dir`.
    pub(crate) fn speaker(dir: &Path, device: &Device) -> Speaker {
        let vocab = scenes::word_level_tokenizer().get_vocab_size(true);
        let mut config = VlmConfig::preset("vlm-tiny", vocab, IMAGE as usize).unwrap();
        config.lm.hidden_size = 32;
        config.lm.ffn_dim = 64;
        config.lm.num_hidden_layers = 2;
        config.lm.word_embed_proj_dim = Some(32);
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), 256, 0).unwrap();
        Speaker {
            model: Vlm::new(&config, device),
            batcher: crate::data::lm::LmBatcher::new(
                tokenizer,
                ImagePreprocessor::clip(IMAGE),
                2,
                3,
            )
            .with_prefix_lm(config.prefix_lm),
            hooks: Default::default(),
        }
    }

    /// Two generated edit records (and their images) in a temporary directory.
    pub(crate) fn two_scenes(seed: u64) -> (tempfile::TempDir, Vec<EditRecord>) {
        let dir = tempfile::tempdir().unwrap();
        let config = ScenesConfig {
            train: 2,
            test: 0,
            seed,
            image_size: IMAGE,
        };
        scenes::write(dir.path(), &config).unwrap();
        let records = crate::data::fgvedit::read(&dir.path().join("train.json"), dir.path())
            .unwrap()
            .records;
        (dir, records)
    }

    /// An editor whose classifier calls everything in scope (scale 0: rho = 1) or nothing
    /// (a huge scale: rho = 0).
    pub(crate) fn editor(
        dir: &Path,
        scale: f64,
        device: &Device,
    ) -> (MemoryEditor, Vec<EditRecord>) {
        let records = crate::data::fgvedit::read(&dir.join("train.json"), dir)
            .unwrap()
            .records;
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), 64, 0).unwrap();
        let vocab = tokenizer.inner().get_vocab_size(true);
        let all: Vec<_> = records.iter().flat_map(pairs).collect();
        let batcher = ScopeBatcher::new(tokenizer, ImagePreprocessor::clip(IMAGE), &all).unwrap();
        let clip_config = ClipConfig::scenes_preset("clip-tiny", vocab, IMAGE as usize).unwrap();
        let config = ScopeConfig {
            similarity: Similarity::SquaredL2 { scale },
            ..ScopeConfig::multimodal(FusionKind::DotProduct)
        };
        let classifier = ScopeClassifier::new(
            &config,
            ClipModel::new(&clip_config, device),
            &clip_config,
            device,
        );
        let base = speaker(dir, device);
        let counterfactual = speaker(dir, device);
        (
            MemoryEditor::new(classifier, batcher, base, counterfactual, device),
            records,
        )
    }

    #[test]
    fn in_scope_queries_go_to_the_counterfactual_model_and_the_rest_to_the_base() {
        let (dir, _) = two_scenes(6);
        let device = Device::flex();
        for (scale, edited) in [(0.0, true), (1e9, false)] {
            let (mut editor, records) = editor(dir.path(), scale, &device);
            let query = Query {
                image: Some(records[0].image.clone()),
                prompt: records[0].prompt.clone(),
            };
            // No edit yet: the base model answers, no route.
            let before = editor.answer_with_route(&query, 3).unwrap();
            assert_eq!((before.route, before.edited), (None, false));
            editor.edit(&records[0]).unwrap();
            editor.edit(&records[1]).unwrap();
            assert_eq!(editor.len(), 2);
            let after = editor.answer_with_route(&query, 3).unwrap();
            let route = after.route.expect("a route once edits are stored");
            assert_eq!(after.edited, edited, "scale {scale}: {route:?}");
            assert_eq!(route.in_scope(), edited);
            // The trait's answer is the routed one.
            assert_eq!(
                super::super::Editor::answer(&mut editor, &query, 3).unwrap(),
                after.text
            );
            if !edited {
                assert_eq!(
                    after.text, before.text,
                    "out of scope: the base model's answer"
                );
            }
            editor.reset();
            assert!(editor.is_empty());
            assert_eq!(editor.route(&[query]).unwrap(), vec![None]);
        }
    }
}
