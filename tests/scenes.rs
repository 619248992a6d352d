//! Properties of the scenes benchmark, over many seeds.

use std::collections::BTreeMap;
use std::path::Path;

use mmke::data::scenes::edit::is_hard;
use mmke::data::scenes::language::{Family, RefKind};
use mmke::data::scenes::{self, ScenesConfig, generate};
use mmke::data::{Task, fgvedit, mmedit};

fn config(seed: u64) -> ScenesConfig {
    ScenesConfig {
        train: 0,
        test: 0,
        seed,
        image_size: 32,
    }
}

#[test]
fn scope_labels_are_exact_and_every_question_is_well_posed() {
    for seed in 0..40 {
        for index in 0..25 {
            let g = generate("train", index, &config(seed));
            let (before, after) = (&g.record.scene, &g.case.after);
            assert_eq!(before.apply(&g.case.edit), *after);
            assert!(!g.record.scope.is_empty());
            for q in &g.record.scope {
                let (a, b) = (q.query.answer(before), q.query.answer(after));
                assert_eq!(a.as_deref(), Some(q.a_before.as_str()), "{}", q.q);
                assert_eq!(b.as_deref(), Some(q.a_after.as_str()), "{}", q.q);
                assert_eq!(q.in_scope, q.a_before != q.a_after, "{}", q.q);
                if let Some(r) = q.query.reference() {
                    assert!(r.resolve(before).is_some(), "ill-posed on S: {}", q.q);
                    assert_eq!(
                        r.resolve(before),
                        r.resolve(after),
                        "another object on S': {}",
                        q.q
                    );
                }
                assert_ne!(
                    q.q, g.record.src,
                    "the edit question is not a scope question"
                );
            }
            // The edit question itself is well-posed and its answer changes to the target.
            assert_eq!(g.case.query.answer(before).unwrap(), g.record.pred);
            assert_eq!(g.case.query.answer(after).unwrap(), g.record.alt);
            assert_ne!(g.record.pred, g.record.alt);
        }
    }
}

#[test]
fn hard_and_near_labels_follow_their_definitions() {
    for seed in 0..40 {
        for index in 0..25 {
            let g = generate("test", index, &config(seed));
            let edit = &g.case.edit;
            let phrase = g.case.reference.phrase();
            for q in &g.record.scope {
                assert_eq!(q.hard, is_hard(q.query, edit, g.case.reference), "{}", q.q);
                if q.hard {
                    assert!(
                        !q.q.contains(&phrase),
                        "hard question {:?} names the edit's {phrase:?}",
                        q.q
                    );
                    let object = q
                        .query
                        .reference()
                        .unwrap()
                        .resolve(&g.record.scene)
                        .unwrap();
                    // Only the image tells: in scope exactly when both expressions denote the
                    // edited object.
                    assert_eq!(q.in_scope, object == edit.object, "{}", q.q);
                }
                if q.near {
                    assert!(!q.in_scope && !q.hard, "{}", q.q);
                    let r = q.query.reference().unwrap();
                    assert_eq!(r.kind(), g.case.reference.kind());
                    // One expression changed, the rest of the edit question's wording kept.
                    assert_eq!(q.q.replace(&r.phrase(), &phrase), g.record.src);
                }
            }
            // Hard questions come in matched pairs per query-expression kind.
            let mut per_kind: BTreeMap<RefKind, (usize, usize)> = BTreeMap::new();
            for q in g.record.scope.iter().filter(|q| q.hard) {
                let slot = per_kind
                    .entry(q.query.reference().unwrap().kind())
                    .or_default();
                if q.in_scope { slot.0 += 1 } else { slot.1 += 1 }
            }
            assert!(
                per_kind.values().all(|&(i, o)| i == 1 && o == 1),
                "{per_kind:?}"
            );
        }
    }
}

#[test]
fn hard_in_and_out_of_scope_share_one_distribution_of_text_features() {
    type Key = (RefKind, RefKind, Family);
    let mut inside: BTreeMap<Key, usize> = BTreeMap::new();
    let mut outside: BTreeMap<Key, usize> = BTreeMap::new();
    for index in 0..3000 {
        let g = generate("train", index, &config(7));
        for q in g.record.scope.iter().filter(|q| q.hard) {
            let key = (
                g.case.reference.kind(),
                q.query.reference().unwrap().kind(),
                q.query.family(),
            );
            *if q.in_scope {
                &mut inside
            } else {
                &mut outside
            }
            .entry(key)
            .or_default() += 1;
        }
    }
    let (n_in, n_out) = (
        inside.values().sum::<usize>(),
        outside.values().sum::<usize>(),
    );
    assert!(n_in > 1000 && n_out > 1000, "{n_in} {n_out}");
    for key in inside.keys().chain(outside.keys()) {
        let p_in = *inside.get(key).unwrap_or(&0) as f64 / n_in as f64;
        let p_out = *outside.get(key).unwrap_or(&0) as f64 / n_out as f64;
        assert!(
            (p_in - p_out).abs() < 0.02,
            "{key:?}: {p_in:.3} in scope vs {p_out:.3} out"
        );
    }
    // And more than one kind pairing occurs, so the balance is not trivial.
    assert!(inside.len() >= 10, "{inside:?}");
}

#[test]
fn most_test_edits_have_hard_questions_of_both_labels() {
    let mut with_in = 0;
    let mut with_out = 0;
    let n = 500;
    for index in 0..n {
        let g = generate("test", index, &config(1));
        with_in += g.case.hard_in_scope().is_some() as usize;
        with_out += g.case.hard_out_of_scope().is_some() as usize;
        if let Some(q) = g.case.hard_in_scope() {
            assert_eq!(
                (g.record.fg_gen_q.as_str(), g.record.fg_gen_a.as_str()),
                (q.q.as_str(), q.a_after.as_str())
            );
        }
    }
    assert!(
        with_in * 10 >= n * 3 && with_out * 10 >= n * 3,
        "{with_in} {with_out} of {n}"
    );
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in walk(dir) {
        let name = entry.strip_prefix(dir).unwrap().display().to_string();
        out.insert(name, std::fs::read(&entry).unwrap());
    }
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path))
        } else {
            out.push(path)
        }
    }
    out
}

#[test]
fn same_arguments_give_byte_identical_files() {
    let config = ScenesConfig {
        train: 12,
        test: 5,
        seed: 3,
        image_size: 48,
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    scenes::write(a.path(), &config).unwrap();
    scenes::write(b.path(), &config).unwrap();
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_eq!(fa.len(), 4 + 3 * 17, "{:?}", fa.keys().collect::<Vec<_>>());
    assert!(fa == fb, "two runs differ");

    let c = tempfile::tempdir().unwrap();
    scenes::write(c.path(), &ScenesConfig { seed: 4, ..config }).unwrap();
    assert_ne!(fa["train.json"], files(c.path())["train.json"]);
}

#[test]
fn generated_files_round_trip_through_both_readers() {
    let dir = tempfile::tempdir().unwrap();
    let config = ScenesConfig {
        train: 6,
        test: 4,
        seed: 9,
        image_size: 32,
    };
    scenes::write(dir.path(), &config).unwrap();
    let path = dir.path().join("train.json");
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();

    let fgv = fgvedit::read(&path, dir.path()).unwrap();
    assert_eq!(fgv.records.len(), 6);
    for (record, raw) in fgv.records.iter().zip(&raw) {
        let s = |k: &str| raw[k].as_str().unwrap().to_string();
        assert_eq!(
            record.prompt,
            format!("Question: {} Short answer:", s("src"))
        );
        assert_eq!(record.target, s("alt"));
        assert_eq!(
            record.rephrase.as_deref(),
            Some(format!("Question: {} Short answer:", s("rephrase")).as_str())
        );
        assert_eq!(record.image, dir.path().join(s("image")));
        assert_eq!(record.loc.as_ref().unwrap().prompt, s("loc"));
        let fg_gen = record.fg_gen.as_ref().unwrap();
        assert_eq!(
            (fg_gen.prompt.clone(), fg_gen.answer.clone()),
            (
                format!("Question: {} Short answer:", s("fg_gen_q")),
                s("fg_gen_a")
            )
        );
        assert_eq!(record.fg_loc.as_ref().unwrap().answer, s("fg_loc_a"));
        assert_eq!(record.scope.len(), raw["scope"].as_array().unwrap().len());
    }

    let mm = mmedit::read(&path, Task::Vqa, dir.path(), None).unwrap();
    assert_eq!(mm.records.len(), 6);
    for (record, raw) in mm.records.iter().zip(&raw) {
        let s = |k: &str| raw[k].as_str().unwrap().to_string();
        assert_eq!(record.original.as_deref(), Some(s("pred").as_str()));
        assert_eq!(
            record.image_rephrase.as_ref().unwrap(),
            &dir.path().join(s("image_rephrase"))
        );
        let m_loc = record.m_loc.as_ref().unwrap();
        assert_eq!(m_loc.image, dir.path().join(s("m_loc")));
        assert_eq!(m_loc.answer, s("m_loc_a"));
    }
}

#[test]
fn the_word_level_tokenizer_covers_every_generated_text() {
    let tokenizer = scenes::word_level_tokenizer();
    let unk = tokenizer.token_to_id("[UNK]").unwrap();
    for index in 0..300 {
        let r = generate("train", index, &config(5)).record;
        let prompt = mmke::data::record::vqa_prompt(&r.src);
        let mut texts = vec![
            prompt, r.src, r.alt, r.rephrase, r.loc, r.loc_ans, r.pred, r.m_loc_q, r.m_loc_a,
        ];
        texts.extend([r.caption_src, r.caption_pred, r.caption_alt]);
        texts.extend(
            r.scope
                .iter()
                .flat_map(|q| [q.q.clone(), q.a_before.clone(), q.a_after.clone()]),
        );
        for text in texts {
            let ids = tokenizer.encode(text.as_str(), false).unwrap();
            assert!(
                !ids.get_ids().contains(&unk),
                "{text:?} has an unknown word"
            );
        }
    }
}

#[test]
fn records_batch_into_image_and_token_tensors() {
    use std::sync::Arc;

    use burn::data::dataloader::batcher::Batcher;
    use burn::data::dataset::Dataset;
    use mmke::data::batch::{VqaBatcher, VqaDataset, VqaItem};
    use mmke::data::image::ImagePreprocessor;
    use mmke::data::text::TextTokenizer;

    let dir = tempfile::tempdir().unwrap();
    scenes::write(
        dir.path(),
        &ScenesConfig {
            train: 3,
            test: 0,
            seed: 1,
            image_size: 40,
        },
    )
    .unwrap();
    let records = fgvedit::read(&dir.path().join("train.json"), dir.path())
        .unwrap()
        .records;
    let tokenizer =
        Arc::new(TextTokenizer::from_file(&dir.path().join("tokenizer.json"), 64, 0).unwrap());
    let preprocessor = ImagePreprocessor::clip(32);
    let items: Vec<VqaItem> = records.iter().map(VqaItem::edit).collect();
    let dataset = VqaDataset::new(items.clone(), preprocessor.clone(), tokenizer.clone());
    assert_eq!(dataset.len(), 3);
    let encoded: Vec<_> = (0..3).map(|i| dataset.get(i).unwrap()).collect();
    assert_eq!(
        encoded[0].pixels,
        preprocessor.load(&records[0].image).unwrap()
    );
    // [BOS] question: ... [EOS]; the answer is one word, without special tokens.
    assert_eq!(encoded[0].prompt.first(), Some(&2));
    assert_eq!(encoded[0].prompt.last(), Some(&3));
    assert_eq!(
        encoded[0].answer.len(),
        records[0].target.split(' ').count()
    );

    let device = burn::tensor::Device::flex();
    let batch = VqaBatcher {
        pad_id: tokenizer.pad_id(),
    }
    .batch(encoded.clone(), &device);
    assert_eq!(batch.pixels.dims(), [3, 3, 32, 32]);
    let longest = encoded.iter().map(|e| e.prompt.len()).max().unwrap();
    assert_eq!(batch.prompt_ids.dims(), [3, longest]);
    let padding: Vec<bool> = batch.prompt_padding.into_data().try_to_vec().unwrap();
    let padded: usize = encoded.iter().map(|e| longest - e.prompt.len()).sum();
    assert_eq!(padding.iter().filter(|&&p| p).count(), padded);
}
