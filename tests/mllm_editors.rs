//! The editors on the real MLLMs (BLIP-2 OPT, BLIP-2 LLaMA, LLaVA; the tiny random fixtures
//! of tests/fixtures/mllm): FT-LLM, FT-Visual, T-Patcher, and MEND and KE at initialisation
//! (their update is then a scaled gradient step) lower the edit's loss and `reset` restores
//! the model; T-Patcher's patch stays silent on its memory; IKE's context goes with
//! `reset`; SERAC/MSCKE and MSCKE-MEND route in-scope queries to their counterfactual model
//! (reading the base model's visual tokens through a new projection) or to MEND's edit, and
//! leave out-of-scope ones to the base model. The editors are the same code that edits the
//! scenes VLM (`EditableModel`).

use std::path::PathBuf;

use burn::tensor::{DType, Device};
use mmke::data::record::{EditRecord, ImageQuery, TextQuery};
use mmke::edit::Editor;
use mmke::edit::finetune::{FineTuneConfig, FineTuneEditor, Part};
use mmke::edit::ike::IkeEditor;
use mmke::edit::ke::{Ke, KeConfig};
use mmke::edit::mend::{HypernetEditor, Hypernetwork, Mend, MendConfig};
use mmke::edit::speaker::{ModelDir, Query, Speaker};
use mmke::edit::tpatcher::{TPatcherConfig, TPatcherEditor};
use mmke::model::mllm::{Mllm, MllmNet};

const MODELS: [&str; 3] = ["blip2-opt", "blip2-llama", "llava"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mllm")
}

fn speaker(model: &str, dtype: DType, device: &Device) -> Speaker<MllmNet> {
    let mllm = Mllm::load_in(&fixtures().join(model).join("hub"), device, dtype).unwrap();
    assert_eq!(mllm.dtype(), dtype, "{model}: held in {dtype:?}");
    Speaker::from_mllm(mllm, 32).unwrap()
}

/// An edit on the shipped 16 x 16 image in the fixtures' word-level vocabulary, with a text
/// and an image locality query.
fn record() -> EditRecord {
    let image = fixtures().join("image16.png");
    let mut record = EditRecord::vqa(image.clone(), "q", "w40 w41");
    record.prompt = "w9 w21 w33".into();
    record.rephrase = Some("w9 w22 w33".into());
    record.loc = Some(TextQuery {
        prompt: "w50 w51".into(),
        answer: "w52".into(),
    });
    record.m_loc = Some(ImageQuery {
        image,
        prompt: "w60 w61".into(),
        answer: "w62".into(),
    });
    record
}

fn edit_loss(speaker: &mut Speaker<MllmNet>, record: &EditRecord, device: &Device) -> f32 {
    speaker
        .loss(Some(&record.image), &record.prompt, &record.target, device)
        .unwrap()
        .into_scalar::<f32>()
}

/// The vision tower's output (before the bridge to the LM) on a fixed image.
fn vision_features(net: &MllmNet, device: &Device) -> Vec<f32> {
    let dtype = net.language_model().dtype();
    let pixels = (burn::tensor::Tensor::<4>::ones([1, 3, 16, 16], device) * 0.5).cast(dtype);
    let vision = match net {
        MllmNet::Blip2(m) => m.image_features(pixels).vision,
        MllmNet::Llava(m) => m.image_features(pixels).vision,
    };
    vision.cast(DType::F32).into_data().try_to_vec().unwrap()
}

fn query(record: &EditRecord) -> Query {
    Query {
        image: Some(record.image.clone()),
        prompt: record.prompt.clone(),
    }
}

fn fine_tuning_edits_and_resets_on_every_architecture(dtype: DType) {
    let device = Device::flex().autodiff();
    let record = record();
    for model in MODELS {
        for part in [Part::LastLmLayer, Part::Visual] {
            let config = FineTuneConfig {
                part,
                steps: 10,
                lr: 1e-2,
            };
            let mut editor = FineTuneEditor::new(speaker(model, dtype, &device), config, &device);
            let before = edit_loss(&mut editor.speaker, &record, &device);
            let prediction = editor.predict(&query(&record), &record.target, 3).unwrap();
            let vision = vision_features(&editor.speaker.model, &device);
            editor.edit(&record).unwrap();
            let after = edit_loss(&mut editor.speaker, &record, &device);
            assert!(
                after < 0.8 * before,
                "{model} {part:?}: the edit's loss went {before} -> {after}"
            );
            // FT-Visual changes a vision layer the features read; FT-LLM leaves them alone.
            let moved = vision_features(&editor.speaker.model, &device) != vision;
            assert_eq!(
                moved,
                part == Part::Visual,
                "{model} {part:?}: vision features"
            );
            editor.reset();
            let reset = edit_loss(&mut editor.speaker, &record, &device);
            assert_eq!(
                reset, before,
                "{model} {part:?}: reset did not restore the model"
            );
            let again = editor.predict(&query(&record), &record.target, 3).unwrap();
            assert_eq!(again, prediction, "{model} {part:?}");
        }
    }
}

/// Two patch neurons trained 30 steps, kept silent on 4 memory queries.
fn t_patcher_config() -> TPatcherConfig {
    TPatcherConfig {
        neurons: 2,
        steps: 30,
        lr: 5e-2,
        activation_weight: 1.0,
        memory_weight: 1.0,
        margin: 0.5,
        memory_queries: 4,
    }
}

fn t_patcher_edits_stays_silent_on_its_memory_and_resets(dtype: DType) {
    let device = Device::flex().autodiff();
    let record = record();
    let config = t_patcher_config();
    for model in MODELS {
        let pool = [record.clone()];
        let mut editor = TPatcherEditor::new(
            speaker(model, dtype, &device),
            &pool,
            config.clone(),
            &device,
        )
        .unwrap();
        let before = edit_loss(&mut editor.speaker, &record, &device);
        editor.edit(&record).unwrap();
        let after = edit_loss(&mut editor.speaker, &record, &device);
        assert!(
            after < before,
            "{model}: the edit's loss went {before} -> {after}"
        );
        // The patch fires on the edit, not on the locality query it was kept silent on.
        let loc = record.loc.clone().unwrap();
        let silent = editor
            .patch_activations(
                &Query {
                    image: None,
                    prompt: loc.prompt,
                },
                &loc.answer,
            )
            .unwrap();
        let fired = editor
            .patch_activations(&query(&record), &record.target)
            .unwrap();
        let max = |t: burn::tensor::Tensor<2>| t.max().into_scalar::<f32>();
        assert!(
            max(fired) > max(silent),
            "{model}: the patch fires as much on the locality query"
        );
        editor.reset();
        assert_eq!(
            edit_loss(&mut editor.speaker, &record, &device),
            before,
            "{model}"
        );
    }
}

fn ike_answers_from_its_context_and_forgets_it_on_reset(dtype: DType) {
    let device = Device::flex();
    let record = record();
    for model in MODELS {
        let mut other = record.clone();
        other.prompt = "w11 w12".into();
        let mut editor = IkeEditor::new(speaker(model, dtype, &device), &[other], 1, &device);
        let q = query(&record);
        let before = editor.predict(&q, &record.target, 3).unwrap();
        editor.edit(&record).unwrap();
        let with_context = editor.predict(&q, &record.target, 3).unwrap();
        assert_ne!(
            with_context.top_k, before.top_k,
            "{model}: the context changed nothing"
        );
        // Generation runs with the context in the prompt too.
        editor.answer(&q, 3).unwrap();
        editor.reset();
        assert_eq!(
            editor.predict(&q, &record.target, 3).unwrap(),
            before,
            "{model}"
        );
    }
}

/// A hypernetwork editor at initialisation on every architecture: the edit lowers its loss,
/// only the edited layers' FFN weights move, `reset` restores them.
fn check_hypernetwork<N: Hypernetwork>(
    make: impl Fn(&MllmNet, &Device) -> N,
    name: &str,
    dtype: DType,
) {
    let device = Device::flex().autodiff();
    let record = record();
    for model in MODELS {
        let base = speaker(model, dtype, &device);
        let net = make(&base.model, &device);
        let layers = net.layers().to_vec();
        let mut editor = HypernetEditor::new(base, net, &device);
        let before = edit_loss(&mut editor.speaker, &record, &device);
        let weights = |e: &HypernetEditor<N, MllmNet>, l: usize| -> Vec<Vec<f32>> {
            use mmke::model::editable::EditableModel;
            e.speaker
                .model
                .ffn_weights(l)
                .into_iter()
                .map(|w| w.into_data().try_to_vec().unwrap())
                .collect()
        };
        let first = weights(&editor, 0);
        let edited = weights(&editor, layers[0]);
        editor.edit(&record).unwrap();
        let after = edit_loss(&mut editor.speaker, &record, &device);
        assert!(
            after < before,
            "{name} on {model}: the edit's loss went {before} -> {after}"
        );
        assert_ne!(
            weights(&editor, layers[0]),
            edited,
            "{name} on {model}: nothing moved"
        );
        if !layers.contains(&0) {
            assert_eq!(
                weights(&editor, 0),
                first,
                "{name} on {model}: an unedited layer moved"
            );
        }
        editor.reset();
        assert_eq!(
            edit_loss(&mut editor.speaker, &record, &device),
            before,
            "{name} {model}"
        );
    }
}

fn mend_and_ke_edit_and_reset_on_every_architecture(dtype: DType) {
    let mend = MendConfig {
        layers: 1,
        rank: 4,
        blocks: 1,
        edit_lr: 0.5,
    };
    check_hypernetwork(
        |model, device| Mend::new(&mend, model, device),
        "MEND",
        dtype,
    );
    let ke = KeConfig {
        layers: 1,
        hidden: 8,
        edit_lr: 1.0,
    };
    check_hypernetwork(|model, device| Ke::new(&ke, model, device), "KE", dtype);
}

/// A scope classifier (untrained tiny CLIP) that calls every query in scope (scale 0: rho =
/// 1) or none (a huge scale: rho = 0), with its batcher.
fn router(
    record: &EditRecord,
    scale: f64,
    device: &Device,
) -> (
    mmke::model::scope::ScopeClassifier,
    mmke::data::batch::ScopeBatcher,
) {
    use mmke::data::image::ImagePreprocessor;
    use mmke::model::clip::{ClipConfig, ClipModel};
    use mmke::model::fusion::FusionKind;
    use mmke::model::scope::{ScopeClassifier, ScopeConfig, Similarity};
    let path = fixtures().join("blip2-opt/hub/tokenizer.json");
    let tokenizer = mmke::data::text::TextTokenizer::from_file(&path, 16, 0).unwrap();
    let vocab = tokenizer.inner().get_vocab_size(true);
    let pairs = mmke::data::pairs::pairs(record);
    let batcher =
        mmke::data::batch::ScopeBatcher::new(tokenizer, ImagePreprocessor::clip(16), &pairs)
            .unwrap();
    let mut clip = ClipConfig::scenes_preset("clip-tiny", vocab, 16).unwrap();
    // The fixtures' tokenizer ends no text with an end token: pool at the largest id (CLIP's
    // legacy rule for eos_token_id 2), which tells the edit side from the query.
    clip.text_config.eos_token_id = 2;
    let config = ScopeConfig {
        similarity: Similarity::SquaredL2 { scale },
        ..ScopeConfig::multimodal(FusionKind::DotProduct)
    };
    let classifier = ScopeClassifier::new(&config, ClipModel::new(&clip, device), &clip, device);
    (classifier, batcher)
}

/// In scope, `editor` answers through its in-scope model (its predictions differ from the
/// base model's); out of scope, exactly as the base model; `reset` empties the memory.
fn check_routing<C: mmke::model::editable::EditableModel>(
    name: &str,
    make: impl Fn(f64) -> mmke::edit::serac::MemoryEditor<MllmNet, C>,
    record: &EditRecord,
) {
    let q = query(record);
    for (scale, in_scope) in [(0.0, true), (1e9, false)] {
        let mut editor = make(scale);
        let base = editor.predict(&q, &record.target, 3).unwrap();
        let base_answer = editor.answer(&q, 3).unwrap();
        editor.edit(record).unwrap();
        let routed = editor.answer_with_route(&q, 3).unwrap();
        assert_eq!(routed.edited, in_scope, "{name}, scale {scale}");
        let prediction = editor.predict(&q, &record.target, 3).unwrap();
        if in_scope {
            assert_ne!(
                prediction.top_k, base.top_k,
                "{name}: the edit changed nothing"
            );
        } else {
            assert_eq!(prediction, base, "{name}: out of scope, not the base model");
            assert_eq!(routed.text, base_answer, "{name}");
        }
        editor.reset();
        assert!(editor.is_empty());
        assert_eq!(
            editor.predict(&q, &record.target, 3).unwrap(),
            base,
            "{name}"
        );
    }
}

fn serac_and_mscke_route_to_the_counterfactual_model_on_every_architecture(dtype: DType) {
    use mmke::edit::serac::MemoryEditor;
    let device = Device::flex();
    let record = record();
    for model in MODELS {
        // The counterfactual LM: a copy of the base model's, or (beside BLIP-2 OPT) a smaller
        // OPT of its own width, as MSCKE's release pairs OPT-125m with OPT-2.7B.
        let mut lms = vec![None];
        if model == "blip2-opt" {
            lms.push(Some(fixtures().join("opt-lm")));
        }
        for lm in lms {
            let name = format!("{model} with {lm:?}");
            check_routing(
                &name,
                |scale| {
                    let (classifier, batcher) = router(&record, scale, &device);
                    let base = speaker(model, dtype, &device);
                    let counterfactual =
                        Speaker::counterfactual(&base, lm.as_deref(), &device).unwrap();
                    MemoryEditor::new(classifier, batcher, base, counterfactual, &device)
                },
                &record,
            );
        }
    }
}

fn the_counterfactual_model_reads_the_image_through_a_projection_that_trains(dtype: DType) {
    let device = Device::flex().autodiff();
    let record = record();
    for model in MODELS {
        let base = speaker(model, dtype, &device);
        let vision = vision_features(&base.model, &device);
        let counterfactual = Speaker::counterfactual(&base, None, &device).unwrap();
        // FT-Visual on the counterfactual model trains the projection alone.
        let config = FineTuneConfig {
            part: Part::Visual,
            steps: 10,
            lr: 1e-2,
        };
        let mut editor = FineTuneEditor::new(counterfactual, config, &device);
        let loss = |e: &mut FineTuneEditor<_>| {
            e.speaker
                .loss(Some(&record.image), &record.prompt, &record.target, &device)
                .unwrap()
                .into_scalar::<f32>()
        };
        let before = loss(&mut editor);
        editor.edit(&record).unwrap();
        let after = loss(&mut editor);
        assert!(after < 0.9 * before, "{model}: {before} -> {after}");
        assert_eq!(
            vision_features(&editor.speaker.model.base, &device),
            vision,
            "{model}: the base model's image path moved"
        );
    }
}

fn mscke_mend_routes_to_the_base_model_edited_by_mend(dtype: DType) {
    use mmke::edit::serac::{InScope, MemoryEditor};
    let device = Device::flex().autodiff();
    let record = record();
    let config = MendConfig {
        layers: 1,
        rank: 4,
        blocks: 1,
        edit_lr: 0.5,
    };
    for model in MODELS {
        check_routing(
            model,
            |scale| {
                let (classifier, batcher) = router(&record, scale, &device);
                let edited = speaker(model, dtype, &device);
                let net = Mend::new(&config, &edited.model, &device);
                let in_scope = InScope::<MllmNet, MllmNet>::Mend {
                    editor: Box::new(HypernetEditor::new(edited, net, &device)),
                    applied: None,
                };
                MemoryEditor::with(
                    classifier,
                    batcher,
                    speaker(model, dtype, &device),
                    in_scope,
                    &device,
                )
            },
            &record,
        );
    }
}

/// `mmke train mend|ke --model HF_DIR`: meta-training on a real MLLM (an FGVEdit file)
/// learns: after training, the update lowers the edit's loss more than the first step's did;
/// the trained network loads back for editing.
fn mend_and_ke_meta_train_on_a_real_mllm(dtype: DType) {
    let data = fgvedit_dir();
    let model = ModelDir::new(fixtures().join("blip2-opt/hub"), dtype);
    let out = tempfile::tempdir().unwrap();
    let mend = MendConfig {
        layers: 1,
        rank: 4,
        blocks: 1,
        edit_lr: 0.5,
    };
    check_meta_training::<Mend>(&model, data.path(), &mend, out.path());
    let ke = KeConfig {
        layers: 1,
        hidden: 8,
        edit_lr: 1.0,
    };
    check_meta_training::<Ke>(&model, data.path(), &ke, out.path());
}

/// A data directory of two FGVEdit records in the fixtures' vocabulary on the shipped image.
fn fgvedit_dir() -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("image16.png"), data.path().join("a.png")).unwrap();
    let records = serde_json::json!([
        {"src": "w9 w21 w33", "alt": "w40 w41", "rephrase": "w9 w22 w33", "image": "a.png",
         "loc": "w50 w51", "loc_ans": "w52", "fg_gen_q": "w9 w25 w33", "fg_gen_a": "w40 w41",
         "fg_loc_q": "w9 w26", "fg_loc_a": "w43"},
        {"src": "w10 w23 w34", "alt": "w42", "rephrase": "w10 w24 w34", "image": "a.png",
         "loc": "w53 w54", "loc_ans": "w55", "fg_gen_q": "w10 w27 w34", "fg_gen_a": "w42",
         "fg_loc_q": "w10 w28", "fg_loc_a": "w44"}
    ]);
    std::fs::write(data.path().join("train.json"), records.to_string()).unwrap();
    data
}

fn meta_config(steps: usize) -> mmke::train::meta::MetaTrainConfig {
    mmke::train::meta::MetaTrainConfig {
        steps,
        lr: 1e-2,
        edit_weight: 1.0,
        locality_weight: 1.0,
        checkpoint_every: steps.min(10),
        seed: 3,
        captions: false,
    }
}

/// Meta-training `N` for 40 steps: the update then lowers the edit's loss more than after one
/// step; the network loads back for the model.
fn check_meta_training<N: Hypernetwork>(
    model: &ModelDir,
    data: &std::path::Path,
    config: &N::Config,
    out: &std::path::Path,
) {
    let device = Device::flex().autodiff();
    let train = |steps: usize| {
        let dir = out.join(format!("{}-{steps}", N::NAME));
        let losses = mmke::train::meta::run::<N>(
            model,
            data,
            config,
            &meta_config(steps),
            &dir,
            false,
            &device,
        )
        .unwrap();
        (losses, dir)
    };
    let (first, _) = train(1);
    let (trained, dir) = train(40);
    let dtype = model.dtype;
    assert!(
        trained.after < first.after,
        "{}: after the update {} (step 1) -> {} (steps 31-40)",
        N::NAME,
        first.after,
        trained.after
    );
    let base = speaker("blip2-opt", dtype, &device);
    mmke::edit::mend::load::<N>(&dir, &base.model, &device).unwrap();
}

/// UniKE on every architecture (LLaMA's grouped-query attention included): the knowledge
/// memory and encoders build from the model's hidden states; latent in-context editing at
/// alpha = 1 changes nothing and below it does; the full editor (extra key-value pairs with
/// zeta, latent IKE with the dynamic alpha) lowers the edit's loss and `reset` restores it.
fn unike_edits_and_resets_on_every_architecture(dtype: DType) {
    use mmke::edit::unike::{
        Alpha, InContext, Prepared, Triplet, UniKeConfig, UniKeEditor, ZetaKind, edited_layers,
    };
    use mmke::train::knowledge::{KnowledgeConfig, build_memory, train_encoders};
    let device = Device::flex().autodiff();
    let record = record();
    let knowledge = KnowledgeConfig {
        max_triplets: 8,
        truth_dim: 8,
        steps: 5,
        batch_size: 4,
        lr: 1e-3,
        temperature: 0.1,
        seed: 0,
        memory_batch: 4,
    };
    let triplet = |prompt: &str, pos: &str, neg: &str| Triplet {
        image: Some(record.image.clone()),
        prompt: prompt.into(),
        pos: pos.into(),
        neg: neg.into(),
    };
    let triplets = [
        triplet("w11 w12", "w13", "w14"),
        triplet("w15 w16 w17", "w18 w19", "w20"),
        triplet("w29 w30", "w31", "w32"),
    ];
    let config = |neurons, in_context, alpha, zeta| UniKeConfig {
        neurons,
        layers: 1,
        steps: 20,
        lr: 1e-2,
        key_threshold: 0.5,
        in_context,
        top_k: 2,
        alpha,
        zeta,
        beta: 0.1,
        seed: 0,
    };
    for model in MODELS {
        let mut base = speaker(model, dtype, &device);
        let layers = edited_layers(&base.model, 1);
        let memory = build_memory(&mut base, &triplets, &layers, 4, &device).unwrap();
        assert_eq!(memory.len(), triplets.len(), "{model}");
        let (encoders, _) = train_encoders(&memory, &knowledge, &device);
        let prepared = || Prepared {
            memory: memory.clone(),
            encoders: encoders.clone(),
        };
        let plain = edit_loss(&mut base, &record, &device);
        let latent = |alpha| {
            let config = config(0, InContext::Latent, alpha, ZetaKind::None);
            let mut editor = UniKeEditor::new(
                speaker(model, dtype, &device),
                prepared(),
                &[],
                config,
                &device,
            );
            edit_loss(&mut editor.speaker, &record, &device)
        };
        assert_eq!(latent(Alpha::Fixed(1.0)), plain, "{model}: alpha 1");
        assert_ne!(
            latent(Alpha::Fixed(0.5)),
            plain,
            "{model}: the hook is not live"
        );

        let config = config(2, InContext::Latent, Alpha::Dynamic, ZetaKind::Truthfulness);
        let mut editor = UniKeEditor::new(
            speaker(model, dtype, &device),
            prepared(),
            &[],
            config,
            &device,
        );
        let before = edit_loss(&mut editor.speaker, &record, &device);
        editor.edit(&record).unwrap();
        let after = edit_loss(&mut editor.speaker, &record, &device);
        assert!(
            after < 0.8 * before,
            "{model}: the edit's loss went {before} -> {after}"
        );
        editor.answer(&query(&record), 3).unwrap();
        editor.reset();
        assert_eq!(
            edit_loss(&mut editor.speaker, &record, &device),
            before,
            "{model}"
        );
    }
}

/// `Method::build` on a Hugging Face MLLM directory: every method that needs no scope
/// classifier run (those are tested above, routed by hand) builds from the directory, edits
/// (the prediction moves) and resets (it comes back).
fn methods_build_from_a_real_mllm_directory(dtype: DType) {
    use mmke::edit::method::{Method, Models};
    use mmke::train::meta::run;
    let record = record();
    let mut other = record.clone();
    other.prompt = "w11 w12".into();
    let pool = [other];
    let base = ModelDir::new(fixtures().join("llava/hub"), dtype);
    let dir = tempfile::tempdir().unwrap();
    let data = fgvedit_dir();
    let train = meta_config(2);
    let autodiff = Device::flex().autodiff();
    let mend = MendConfig {
        layers: 1,
        rank: 4,
        blocks: 1,
        edit_lr: 0.5,
    };
    run::<Mend>(
        &base,
        data.path(),
        &mend,
        &train,
        &dir.path().join("mend"),
        false,
        &autodiff,
    )
    .unwrap();
    let ke = KeConfig {
        layers: 1,
        hidden: 8,
        edit_lr: 1.0,
    };
    run::<Ke>(
        &base,
        data.path(),
        &ke,
        &train,
        &dir.path().join("ke"),
        false,
        &autodiff,
    )
    .unwrap();
    let models = Models::with_base(&base, dir.path(), &pool);
    assert!(models.real_mllm());
    let methods = [
        Method::FtLlm {
            steps: 10,
            lr: 1e-2,
        },
        Method::FtVisual {
            steps: 10,
            lr: 1e-2,
        },
        Method::Ike { demonstrations: 1 },
        Method::Mend {
            network: "mend".into(),
        },
        Method::Ke {
            network: "ke".into(),
        },
        Method::TPatcher(t_patcher_config()),
    ];
    let q = query(&record);
    for method in methods {
        let mut editor = method.build(&models, &Device::flex()).unwrap();
        let before = editor.predict(&q, &record.target, 3).unwrap();
        editor.edit(&record).unwrap();
        let after = editor.predict(&q, &record.target, 3).unwrap();
        assert_ne!(
            after.top_k, before.top_k,
            "{method:?}: the edit changed nothing"
        );
        editor.answer(&q, 3).unwrap();
        editor.reset();
        assert_eq!(
            editor.predict(&q, &record.target, 3).unwrap(),
            before,
            "{method:?}"
        );
    }
}

/// The counterfactual model beside a real MLLM trains on the edits' counterfactual examples
/// (its answer loss falls), and what it learned saves and loads back exactly.
fn the_counterfactual_model_trains_saves_and_loads(dtype: DType) {
    use mmke::data::lm::counterfactual_examples;
    use mmke::model::mllm::counterfactual::{is_trained, load, save};
    use mmke::train::counterfactual::train;
    use mmke::train::vlm::VlmTrainConfig;
    let device = Device::flex().autodiff();
    let data = fgvedit_dir();
    let records = mmke::data::read_edits(&data.path().join("train.json"), data.path())
        .unwrap()
        .records;
    for model in MODELS {
        let base = speaker(model, dtype, &device);
        let mut counterfactual = Speaker::counterfactual(&base, None, &device).unwrap();
        let example = counterfactual_examples(&records[0])
            .into_iter()
            .find(|e| e.image.is_some())
            .unwrap();
        let loss = |s: &mut Speaker<_>| {
            s.loss(
                example.image.as_deref(),
                &example.prompt,
                &example.answer,
                &device,
            )
            .unwrap()
            .into_scalar::<f32>()
        };
        let before = loss(&mut counterfactual);
        let config: VlmTrainConfig = serde_json::from_value(serde_json::json!({
            "steps": 30, "batch_size": 4, "lr": 1e-2, "text_every": 0,
            "checkpoint_every": 30, "seed": 0
        }))
        .unwrap();
        train(&mut counterfactual, &records, &config, &device).unwrap();
        let after = loss(&mut counterfactual);
        assert!(after < 0.9 * before, "{model}: {before} -> {after}");
        let dir = tempfile::tempdir().unwrap();
        save(&counterfactual.model, dir.path()).unwrap();
        assert!(is_trained(dir.path()));
        let mut fresh = Speaker::counterfactual(&base, None, &device).unwrap();
        fresh.model = load(fresh.model, dir.path()).unwrap();
        assert_eq!(loss(&mut fresh), after, "{model}: the loaded model differs");
    }
}

/// LLaVA reads editing prompts inside its chat template (LLaVA-1.5's by default, a model
/// directory's `prompt_template.json` else), the image where the template's `{image}` is:
/// the editors' text ids with the image placed after `image_at` of them give the logits the
/// processor's layout (`<image>` expanded in the templated text) gives.
#[test]
fn llava_edits_in_its_prompt_template_with_the_image_where_the_processor_puts_it() {
    use burn::tensor::{Int, Tensor, TensorData};
    use mmke::data::template::{PromptTemplate, TEMPLATE_FILE};
    use mmke::model::editable::EditableModel;
    let device = Device::flex();
    let hub = fixtures().join("llava/hub");
    let default = speaker("llava", DType::F32, &device);
    assert_eq!(
        default.batcher.template(),
        Some(&PromptTemplate::llava_1_5())
    );

    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&hub).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let template = PromptTemplate {
        with_image: "w4 w5 {image} {prompt} w6".into(),
        text_only: "w4 {prompt} w6".into(),
    };
    std::fs::write(
        dir.path().join(TEMPLATE_FILE),
        serde_json::to_string(&template).unwrap(),
    )
    .unwrap();
    let mllm = Mllm::load(dir.path(), &device).unwrap();
    let speaker = Speaker::from_mllm(Mllm::load(dir.path(), &device).unwrap(), 32).unwrap();
    assert_eq!(
        speaker.batcher.image_at(),
        Some(3),
        "BOS w4 w5, then the image"
    );
    let word = |w: &str| mllm.tokenizer.as_ref().unwrap().token_to_id(w).unwrap() as i64;
    let bos = speaker.batcher.bos() as i64;
    let text = speaker.batcher.prompt_ids("w9 w21", true).unwrap();
    assert_eq!(
        text,
        [
            bos,
            word("w4"),
            word("w5"),
            word("w9"),
            word("w21"),
            word("w6")
        ]
    );
    assert_eq!(
        speaker.batcher.prompt_ids("w9 w21", false).unwrap(),
        [bos, word("w4"), word("w9"), word("w21"), word("w6")]
    );
    assert!(speaker.batcher.prompt_ids("w9 <image>", true).is_err());

    let processor: Vec<i64> = mllm
        .prompt_ids("w4 w5 <image> w9 w21 w6")
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let n = mllm.config.image_tokens();
    assert_eq!(processor.len(), text.len() + n);
    let pixels = Tensor::<4>::from_data(
        TensorData::new(
            (0..3 * 16 * 16)
                .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
                .collect(),
            [1, 3, 16, 16],
        ),
        &device,
    );
    let ids =
        |v: &[i64]| Tensor::<2, Int>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &device);
    let ones = |len: usize| Tensor::<2, Int>::ones([1, len], &device);
    let reference: Vec<f32> = mllm
        .forward(pixels.clone(), ids(&processor), ones(processor.len()))
        .unwrap()
        .into_data()
        .try_to_vec()
        .unwrap();
    let editors: Vec<f32> = speaker
        .model
        .forward(
            Some(pixels),
            ids(&text),
            ones(text.len()),
            &Default::default(),
        )
        .logits
        .into_data()
        .try_to_vec()
        .unwrap();
    let vocab = editors.len() / text.len();
    for t in 0..text.len() {
        let s = speaker.model.sequence_position(t, true);
        assert_eq!(processor[s], text[t]);
        let diff = (0..vocab)
            .map(|v| (editors[t * vocab + v] - reference[s * vocab + v]).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-5, "text position {t}: logits differ by {diff}");
    }
}

/// Every test above on the models held in f32 and in bf16 (half the memory; the editors read
/// f32 outputs and cast what they add to the model's dtype).
macro_rules! in_each_dtype {
    ($($test:ident),* $(,)?) => {
        mod f32 {
            $(#[test]
            fn $test() {
                super::$test(burn::tensor::DType::F32)
            })*
        }
        mod bf16 {
            $(#[test]
            fn $test() {
                super::$test(burn::tensor::DType::BF16)
            })*
        }
    };
}

in_each_dtype!(
    fine_tuning_edits_and_resets_on_every_architecture,
    t_patcher_edits_stays_silent_on_its_memory_and_resets,
    ike_answers_from_its_context_and_forgets_it_on_reset,
    mend_and_ke_edit_and_reset_on_every_architecture,
    serac_and_mscke_route_to_the_counterfactual_model_on_every_architecture,
    the_counterfactual_model_reads_the_image_through_a_projection_that_trains,
    mscke_mend_routes_to_the_base_model_edited_by_mend,
    mend_and_ke_meta_train_on_a_real_mllm,
    unike_edits_and_resets_on_every_architecture,
    methods_build_from_a_real_mllm_directory,
    the_counterfactual_model_trains_saves_and_loads,
);
