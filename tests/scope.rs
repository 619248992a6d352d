//! The scope classifier and its training loop, on a tiny random CLIP and generated scenes.

use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;
use mmke::data::batch::ScopeBatcher;
use mmke::data::fgvedit;
use mmke::data::image::ImagePreprocessor;
use mmke::data::pairs::{PairKind, ScopePair, pairs};
use mmke::data::scenes::{self, ScenesConfig};
use mmke::data::text::TextTokenizer;
use mmke::model::clip::{ClipConfig, ClipModel};
use mmke::model::fusion::FusionKind;
use mmke::model::scope::{ScopeClassifier, ScopeConfig, Similarity, bce};
use mmke::train::scope::{ScopeTrainConfig, train};

const IMAGE: usize = 32;

struct Fixture {
    _dir: tempfile::TempDir,
    pairs: Vec<ScopePair>,
    batcher: ScopeBatcher,
    clip_config: ClipConfig,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    scenes::write(
        dir.path(),
        &ScenesConfig {
            train: 6,
            test: 0,
            seed: 4,
            image_size: IMAGE as u32,
        },
    )
    .unwrap();
    let records = fgvedit::read(&dir.path().join("train.json"), dir.path())
        .unwrap()
        .records;
    let pairs: Vec<ScopePair> = records.iter().flat_map(pairs).collect();
    let tokenizer = TextTokenizer::from_file(&dir.path().join("tokenizer.json"), 64, 0).unwrap();
    let vocab = tokenizer.inner().get_vocab_size(true);
    let batcher =
        ScopeBatcher::new(tokenizer, ImagePreprocessor::clip(IMAGE as u32), &pairs).unwrap();
    let clip_config = ClipConfig::scenes_preset("clip-tiny", vocab, IMAGE).unwrap();
    Fixture {
        _dir: dir,
        pairs,
        batcher,
        clip_config,
    }
}

fn classifier(f: &Fixture, config: &ScopeConfig, device: &Device) -> ScopeClassifier {
    device.seed(1);
    ScopeClassifier::new(
        config,
        ClipModel::new(&f.clip_config, device),
        &f.clip_config,
        device,
    )
}

/// Two in-scope and two out-of-scope pairs, one of them text-only.
fn small_batch(f: &Fixture) -> Vec<&ScopePair> {
    let find = |k: PairKind| f.pairs.iter().find(|p| p.kind == k).unwrap();
    vec![
        find(PairKind::Rephrase),
        find(PairKind::TextLocality),
        find(PairKind::HardInScope),
        find(PairKind::HardOutOfScope),
    ]
}

#[test]
fn rho_lies_in_the_unit_interval_for_every_variant() {
    let f = fixture();
    let device = Device::flex();
    let batch: Vec<&ScopePair> = f.pairs.iter().take(40).collect();
    let mut configs = vec![ScopeConfig::text_only()];
    configs.extend(FusionKind::ALL.map(ScopeConfig::multimodal));
    configs.push(ScopeConfig {
        similarity: Similarity::Cosine,
        ..ScopeConfig::multimodal(FusionKind::DotProduct)
    });
    configs.push(ScopeConfig {
        learned_metric: true,
        ..ScopeConfig::multimodal(FusionKind::DotProduct)
    });
    for config in configs {
        let model = classifier(&f, &config, &device);
        let z_e = model.encode(&f.batcher.edits(&batch, &device).unwrap());
        let z = model.encode(&f.batcher.queries(&batch, &device).unwrap());
        let width = if config.mode == mmke::model::scope::ScopeMode::TextOnly {
            config.dim
        } else {
            2 * config.dim
        };
        assert_eq!(z.dims(), [40, width], "{config:?}");
        let rho: Vec<f32> = model
            .similarity(z_e.clone(), z.clone())
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!(
            rho.iter().all(|r| (0.0..=1.0).contains(r)),
            "{config:?}: {rho:?}"
        );
        // The matrix form agrees with the row form on its diagonal.
        let matrix: Vec<f32> = model
            .similarity_matrix(z, z_e)
            .into_data()
            .try_to_vec()
            .unwrap();
        for (i, r) in rho.iter().enumerate() {
            assert!((matrix[i * 40 + i] - r).abs() < 1e-4, "{config:?}");
        }
    }
}

#[test]
fn bce_decreases_on_a_small_batch_within_a_few_steps() {
    use burn::optim::{AdamConfig, GradientsParams};
    let f = fixture();
    let device = Device::flex().autodiff();
    let mut model = classifier(
        &f,
        &ScopeConfig::multimodal(FusionKind::DotProduct),
        &device,
    );
    let batch = small_batch(&f);
    let (edits, queries) = (
        f.batcher.edits(&batch, &device).unwrap(),
        f.batcher.queries(&batch, &device).unwrap(),
    );
    let labels = ScopeBatcher::labels(&batch, &device);
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let loss = bce(
            model.log_similarity(model.encode(&edits), model.encode(&queries)),
            labels.clone(),
        );
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
    }
    assert!(losses[7] < 0.7 * losses[0], "{losses:?}");
}

#[test]
fn save_then_load_gives_identical_outputs() {
    let f = fixture();
    let device = Device::flex();
    let config = ScopeConfig::multimodal(FusionKind::CrossAttention);
    let model = classifier(&f, &config, &device);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scope.bpk");
    model.clone().save_file(&path).unwrap();
    device.seed(99); // a differently initialised model, then overwritten by the file
    let fresh = ScopeClassifier::new(
        &config,
        ClipModel::new(&f.clip_config, &device),
        &f.clip_config,
        &device,
    );
    let loaded = fresh.load_file(&path);
    let batch: Vec<&ScopePair> = f.pairs.iter().take(10).collect();
    let input = f.batcher.queries(&batch, &device).unwrap();
    let a: Vec<f32> = model.encode(&input).into_data().try_to_vec().unwrap();
    let b: Vec<f32> = loaded.encode(&input).into_data().try_to_vec().unwrap();
    assert_eq!(a, b);
}

fn train_config(steps: usize) -> ScopeTrainConfig {
    ScopeTrainConfig {
        steps,
        batch_size: 8,
        lr: 1e-3,
        freeze_clip: false,
        freeze_vision: false,
        // CLIP on its own learning rate: the resume test covers the two-group update.
        clip_lr: Some(5e-4),
        validate_every: 2,
        checkpoint_every: 2,
        seed: 5,
        attention_weight: 0.0,
        held_out: 0.1,
    }
}

fn state_step(dir: &Path) -> usize {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint/state.json")).unwrap())
            .unwrap();
    state["step"].as_u64().unwrap() as usize
}

#[test]
fn resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run_bit_for_bit() {
    let f = fixture();
    let device = Device::flex().autodiff();
    let config = ScopeConfig::multimodal(FusionKind::DotProduct);
    let valid: Vec<ScopePair> = f.pairs.iter().take(12).cloned().collect();
    // Parameters initialise lazily from a device-wide generator that parallel tests share:
    // clones of one model are the way to start two runs from the same weights.
    let init = classifier(&f, &config, &device);

    let straight = tempfile::tempdir().unwrap();
    let full = train(
        init.clone(),
        &f.pairs,
        &valid,
        &f.batcher,
        &train_config(4),
        straight.path(),
        false,
        &device,
    )
    .unwrap()
    .0;

    let split = tempfile::tempdir().unwrap();
    let half = train(
        init.clone(),
        &f.pairs,
        &valid,
        &f.batcher,
        &train_config(2),
        split.path(),
        false,
        &device,
    )
    .unwrap()
    .0;
    assert_eq!(state_step(split.path()), 2);
    let resumed = train(
        init,
        &f.pairs,
        &valid,
        &f.batcher,
        &train_config(4),
        split.path(),
        true,
        &device,
    )
    .unwrap()
    .0;
    assert_eq!(state_step(split.path()), 4);

    let plain = Device::flex();
    let batch: Vec<&ScopePair> = f.pairs.iter().take(10).collect();
    let input = f.batcher.queries(&batch, &plain).unwrap();
    let encode = |m: &ScopeClassifier| -> Vec<f32> {
        m.valid().encode(&input).into_data().try_to_vec().unwrap()
    };
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let (full, half, resumed) = (encode(&full), encode(&half), encode(&resumed));
    assert!(
        diff(&full, &half) > 1e-3,
        "the last two steps change the model"
    );
    // Bit for bit on the CPU backend: the optimizer state and the step's data are restored.
    assert_eq!(
        full, resumed,
        "the resumed run differs from the uninterrupted one"
    );
}

#[test]
fn pretrain_train_export_and_reload_a_classifier() {
    use mmke::data::pairs::read_pairs;
    use mmke::model::scope::ScopeRun;
    use mmke::train::clip::{ClipTrainConfig, pretrain};
    use mmke::train::scope::{ScopeRunConfig, run};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("scenes");
    scenes::write(
        &data,
        &ScenesConfig {
            train: 10,
            test: 3,
            seed: 8,
            image_size: IMAGE as u32,
        },
    )
    .unwrap();
    let device = Device::flex().autodiff();
    let clip_dir = dir.path().join("clip");
    let clip_train = ClipTrainConfig {
        steps: 2,
        batch_size: 4,
        lr: 1e-3,
        seed: 0,
        scene_size: IMAGE as u32,
        checkpoint_every: 2,
        grounding_weight: 1.0,
        cells: Some(3),
        attribute_weight: 1.0,
        optim: Default::default(),
    };
    pretrain("clip-tiny", IMAGE, &clip_train, &clip_dir, false, &device).unwrap();
    // The pre-trained CLIP is a Hugging Face directory.
    mmke::model::clip::Clip::load(&clip_dir, &Device::flex()).unwrap();

    let config = ScopeRunConfig {
        model: ScopeConfig::multimodal(FusionKind::DotProduct),
        train: train_config(2),
    };
    let run_dir = dir.path().join("run");
    let report = run(&config, &clip_dir, &data, &run_dir, false, &device).unwrap();
    assert!(report.overall.n > 0);

    let plain = Device::flex();
    let export_dir = dir.path().join("export");
    ScopeRun::load(&run_dir, &plain)
        .unwrap()
        .export(&run_dir, &export_dir)
        .unwrap();
    for file in [
        "model.safetensors",
        "config.json",
        "clip/model.safetensors",
        "clip/config.json",
        "clip/tokenizer.json",
    ] {
        assert!(export_dir.join(file).is_file(), "{file}");
    }
    let pairs = read_pairs(&data.join("test.json"), &data).unwrap();
    let scores = |dir: &Path| {
        let mut r = ScopeRun::load(dir, &plain).unwrap();
        let batcher = r.batcher(&pairs).unwrap();
        mmke::eval::scope::scores(&r.model, &pairs, &batcher, &plain).unwrap()
    };
    assert_eq!(scores(&run_dir), scores(&export_dir));
}

#[test]
fn scores_encode_each_edit_once_and_match_pairwise_similarity() {
    let f = fixture();
    let device = Device::flex();
    let model = classifier(
        &f,
        &ScopeConfig::multimodal(FusionKind::CrossAttention),
        &device,
    );
    let rho = mmke::eval::scope::scores(&model, &f.pairs, &f.batcher, &device).unwrap();
    let all: Vec<&ScopePair> = f.pairs.iter().collect();
    let z_e = model.encode(&f.batcher.edits(&all, &device).unwrap());
    let z = model.encode(&f.batcher.queries(&all, &device).unwrap());
    let want: Vec<f32> = model.similarity(z_e, z).into_data().try_to_vec().unwrap();
    assert_eq!(rho.len(), want.len());
    for (i, (a, b)) in rho.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-5, "pair {i}: {a} vs {b}");
    }
}

#[test]
fn the_object_readout_attends_the_named_cell_and_ignores_the_edit_target() {
    let f = fixture();
    let device = Device::flex();
    let config = ScopeConfig {
        object_readout: true,
        cells: Some(3),
        ..ScopeConfig::multimodal(FusionKind::DotProduct)
    };
    let words = mmke::model::objects::scenes_object_words(&f.batcher.tokenizer);
    assert!(words.is_some(), "the scenes tokenizer names every class");
    let mut model = classifier(&f, &config, &device).with_object_words(words);
    // A probe that sees nothing yet: every cell's key is the same mixture of class names
    // plus its own name.
    let mut probe = model.attribute_probe.take().unwrap();
    probe.linear.weight = burn::module::Param::from_tensor(probe.linear.weight.val().zeros_like());
    model.attribute_probe = Some(probe);
    let image = &f.pairs[0].edit_image;
    let edit = |question: &str, target: &str| {
        let input = f
            .batcher
            .edit_side(&[(question, target, image)], &device)
            .unwrap();
        let (z, logits) = model.encode_with_attention(&input);
        let cell: Vec<i64> = logits
            .unwrap()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap();
        let image_half: Vec<f32> = z
            .narrow(1, config.dim, config.dim)
            .into_data()
            .try_to_vec()
            .unwrap();
        (cell[0], image_half)
    };
    // Identity projections from the start: the cell name in the question picks its cell.
    let (top_left, purple) = edit("what color is the shape in the top left?", "purple");
    let (bottom_right, _) = edit("what color is the shape in the bottom right?", "purple");
    assert_eq!((top_left, bottom_right), (0, 8));
    // The target is not part of the readout's query: the image half stays.
    let (_, green) = edit("what color is the shape in the top left?", "green");
    assert_eq!(purple, green);
}
