//! The base VLM's training on generated scenes: examples, loss, exact match, the CLI run.

use burn::tensor::Device;
use mmke::data::fgvedit;
use mmke::data::image::ImagePreprocessor;
use mmke::data::lm::{LmBatcher, LmExample, pre_edit_examples};
use mmke::data::scenes::{self, ScenesConfig};
use mmke::data::text::TextTokenizer;
use mmke::model::answer::answer_loss;
use mmke::model::vlm::{Vlm, VlmConfig};

const IMAGE: usize = 32;

#[test]
fn pre_edit_examples_train_the_vlm_and_exact_match_is_a_share() {
    let dir = tempfile::tempdir().unwrap();
    scenes::write(
        dir.path(),
        &ScenesConfig {
            train: 4,
            test: 2,
            seed: 3,
            image_size: IMAGE as u32,
        },
    )
    .unwrap();
    let records = fgvedit::read(&dir.path().join("train.json"), dir.path())
        .unwrap()
        .records;
    let examples: Vec<LmExample> = records.iter().flat_map(pre_edit_examples).collect();
    // Scope questions answered under S, the edit question with its original answer, the
    // other image's question and the text-only fact.
    assert!(examples.iter().any(|e| e.image.is_none()));
    let first = &records[0];
    assert!(examples.contains(&LmExample {
        image: Some(first.image.clone()),
        prompt: first.prompt.clone(),
        answer: first.original.clone().unwrap(),
        grounding: None,
    }));
    assert!(
        !examples
            .iter()
            .any(|e| e.answer == first.target && e.prompt == first.prompt)
    );

    let tokenizer = TextTokenizer::from_file(&dir.path().join("tokenizer.json"), 64, 0).unwrap();
    let vocab = tokenizer.inner().get_vocab_size(true);
    let mut config = VlmConfig::preset("vlm-tiny", vocab, IMAGE).unwrap();
    config.lm.hidden_size = 32;
    config.lm.ffn_dim = 64;
    config.lm.num_hidden_layers = 2;
    config.lm.word_embed_proj_dim = Some(32);
    let device = Device::flex().autodiff();
    device.seed(0);
    let model = Vlm::new(&config, &device);
    let mut batcher = LmBatcher::new(tokenizer, ImagePreprocessor::clip(IMAGE as u32), 2, 3);
    let visual: Vec<&LmExample> = examples
        .iter()
        .filter(|e| e.image.is_some())
        .take(8)
        .collect();
    let batch = batcher.batch(&visual, &device).unwrap();
    let train = mmke::train::vlm::VlmTrainConfig {
        steps: 25,
        batch_size: 8,
        lr: 3e-3,
        text_every: 1000,
        checkpoint_every: 25,
        seed: 0,
        freeze_vision: false,
        optim: Default::default(),
        referent_weight: 0.0,
        edited_repeat: 0,
        rewrite_objects: false,
    };
    let before = answer_loss(&model, &batch).0.into_scalar::<f32>();
    let out = dir.path().join("run");
    let visual_owned: Vec<LmExample> = visual.iter().map(|e| (*e).clone()).collect();
    let trained = mmke::train::vlm::train(
        model,
        &visual_owned,
        &mut batcher,
        &train,
        &out,
        false,
        &device,
    )
    .unwrap();
    let after = answer_loss(&trained, &batch).0.into_scalar::<f32>();
    assert!(after < 0.5 * before, "loss {before} -> {after}");

    let plain = Device::flex();
    let exact = mmke::model::answer::exact_match(
        &burn::module::Module::valid(&trained),
        &examples,
        &mut batcher,
        16,
        &plain,
    )
    .unwrap();
    assert!((0.0..=1.0).contains(&exact));
}

#[test]
fn counterfactual_examples_read_the_edit_and_answer_as_after_it() {
    let dir = tempfile::tempdir().unwrap();
    scenes::write(
        dir.path(),
        &ScenesConfig {
            train: 3,
            test: 0,
            seed: 8,
            image_size: IMAGE as u32,
        },
    )
    .unwrap();
    let records = fgvedit::read(&dir.path().join("train.json"), dir.path())
        .unwrap()
        .records;
    for record in &records {
        let context = mmke::data::lm::edit_context(record);
        assert_eq!(
            context,
            format!("{} >> {} || ", record.prompt, record.target)
        );
        let examples = mmke::data::lm::counterfactual_examples(record);
        // Every example reads an edit: this one, or the captioning edit of the same change.
        let caption = record.caption_edit().expect("scenes records have captions");
        let caption_context = mmke::data::lm::edit_context(&caption);
        assert!(examples.iter().all(|e| e.prompt.starts_with(&context)
            || (e.prompt.starts_with(&caption_context) && e.answer == caption.target)));
        assert!(
            examples
                .iter()
                .any(|e| e.prompt.starts_with(&caption_context))
        );
        assert_eq!(examples[0].answer, record.target);
        // Every same-image question is answered as under S'.
        for q in &record.scope {
            assert!(examples.iter().any(
                |e| e.prompt == format!("{context}{}", q.prompt) && e.answer == q.answer_after
            ));
        }
    }
}
