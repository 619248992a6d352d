//! The `mmke` binary as a user runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn mmke(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mmke"))
        .args(args)
        .output()
        .expect("the mmke binary runs")
}

#[test]
fn clip_embed_prints_the_reference_embeddings_as_json() {
    let model = fixtures().join("clip-tiny");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("expected.json")).unwrap())
            .unwrap();
    let image = fixtures().join("images/exact32.png");
    let out = mmke(&[
        "clip",
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--text",
        "a photo of a cat",
        "--text",
        "zebra",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let close = |got: &serde_json::Value, want: &serde_json::Value, tol: f64| {
        let (g, w) = (got.as_array().unwrap(), want.as_array().unwrap());
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            let diff = (a.as_f64().unwrap() - b.as_f64().unwrap()).abs();
            assert!(diff <= tol, "{a} vs {b}");
        }
    };
    // Image 0 of the fixture is exact32.png; texts 0 and 4 are the two given here.
    close(&got["image_embeds"][0], &expected["image_embeds"][0], 1e-4);
    close(&got["text_embeds"][0], &expected["text_embeds"][0], 1e-4);
    close(&got["text_embeds"][1], &expected["text_embeds"][4], 1e-4);
    let logits = &got["logits_per_image"][0];
    assert_eq!(logits.as_array().unwrap().len(), 2);
    let want = serde_json::json!([
        expected["logits_per_image"][0][0],
        expected["logits_per_image"][0][4]
    ]);
    close(logits, &want, 1e-3);
}

#[test]
fn clip_embed_omits_the_absent_modality() {
    let model = fixtures().join("clip-tiny-gelu");
    let out = mmke(&[
        "clip",
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "a red circle",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let object = got.as_object().unwrap();
    assert_eq!(object.keys().collect::<Vec<_>>(), ["text_embeds"]);
    assert_eq!(got["text_embeds"][0].as_array().unwrap().len(), 20);
}

#[test]
fn errors_go_to_stderr_with_a_nonzero_exit() {
    let out = mmke(&["clip", "embed", "--model", "/no/such/dir", "--text", "x"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/no/such/dir"), "{stderr}");

    let model = fixtures().join("clip-tiny");
    let out = mmke(&[
        "clip",
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--image",
        "/no/such/image.png",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/image.png"));
}

#[test]
fn a_backend_not_compiled_in_is_refused() {
    let model = fixtures().join("clip-tiny");
    for backend in ["wgpu", "cuda"] {
        if cfg!(feature = "wgpu") && backend == "wgpu"
            || cfg!(feature = "cuda") && backend == "cuda"
        {
            continue;
        }
        let out = mmke(&[
            "clip",
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--text",
            "x",
            "--backend",
            backend,
        ]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not compiled"), "{stderr}");
    }
    let out = mmke(&[
        "clip",
        "embed",
        "--model",
        "m",
        "--text",
        "x",
        "--backend",
        "tpu",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tpu"));
}

#[test]
fn train_every_model_then_edit_and_query() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = mmke(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let data = path("data");
    run(&[
        "data",
        "scenes",
        "--out",
        &data,
        "--train",
        "3",
        "--test",
        "1",
        "--seed",
        "5",
        "--image-size",
        "32",
    ]);
    for command in ["vlm", "counterfactual"] {
        let out = path(command);
        // The shipped config, made tiny on the command line.
        let config = format!("{}/configs/{command}.toml", env!("CARGO_MANIFEST_DIR"));
        let stdout = run(&[
            "train",
            command,
            "--config",
            &config,
            "--set",
            "preset=\"vlm-tiny\"",
            "--set",
            "image_size=32",
            "--set",
            "train.steps=2",
            "--set",
            "train.batch_size=4",
            "--set",
            "train.freeze_vision=false",
            "--set",
            "train.referent_weight=0.0",
            "--set",
            "train.rewrite_objects=false",
            "--data",
            &data,
            "--out",
            &out,
        ]);
        assert!(
            stdout.contains("test exact match (teacher-forced): "),
            "{stdout}"
        );
        for file in ["vlm.json", "model.bpk", "tokenizer.json"] {
            assert!(
                dir.path().join(command).join(file).is_file(),
                "{command}: {file}"
            );
        }
    }
    let clip = path("clip");
    let config = format!("{}/configs/clip.toml", env!("CARGO_MANIFEST_DIR"));
    run(&[
        "train",
        "clip",
        "--config",
        &config,
        "--set",
        "image_size=32",
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.scene_size=32",
        "--out",
        &clip,
    ]);
    let config = path("scope.toml");
    std::fs::write(
        &config,
        "[model]\nmode = \"multimodal\"\nfusion = \"dot-product\"\n\
         [train]\nsteps = 2\nbatch_size = 4\nlr = 1e-3\nvalidate_every = 2\n\
         checkpoint_every = 2\nseed = 0\n",
    )
    .unwrap();
    let scope = path("scope");
    run(&[
        "train", "scope", "--config", &config, "--clip", &clip, "--data", &data, "--out", &scope,
    ]);

    // Machine-readable evaluation: one JSON object each, percentages 0-100.
    let test = dir.path().join("data/test.json");
    let test = test.to_str().unwrap();
    for counterfactual in [false, true] {
        let model = path(if counterfactual {
            "counterfactual"
        } else {
            "vlm"
        });
        let mut args = vec!["eval", "vlm", "--model", &model, "--data", test, "--json"];
        if counterfactual {
            args.push("--counterfactual");
        }
        let json: serde_json::Value = serde_json::from_str(run(&args).trim()).unwrap();
        let n = json["all"]["n"].as_u64().unwrap();
        assert!(n > 0, "{json}");
        let families = json["families"].as_object().unwrap();
        assert_eq!(
            families
                .values()
                .map(|f| f["n"].as_u64().unwrap())
                .sum::<u64>(),
            n
        );
        for score in families.values().chain([&json["all"]]) {
            let exact = score["exact_match"].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&exact), "{json}");
        }
    }
    let json: serde_json::Value = serde_json::from_str(
        run(&[
            "eval",
            "scope",
            "--checkpoint",
            &scope,
            "--data",
            test,
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    for key in ["n", "accuracy", "precision", "recall", "f1"] {
        assert!(json["all"][key].is_number(), "{json}");
    }
    assert!(json["all"]["accuracy"].as_f64().unwrap() <= 100.0);
    assert!(json["kinds"]["edit"]["n"].as_u64().unwrap() > 0, "{json}");

    let image = dir.path().join("data/images/train_00000.png");
    let stdout = run(&[
        "edit",
        "--scope",
        &scope,
        "--base",
        &path("vlm"),
        "--counterfactual",
        &path("counterfactual"),
        "--image",
        image.to_str().unwrap(),
        "--question",
        "what color is the circle?",
        "--target",
        "purple",
        "--query",
        "how many shapes are there?",
        "--text-query",
        "what is the capital of france?",
    ]);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The edit question itself, the image query, the text-only query.
    assert_eq!(lines.len(), 3, "{stdout}");
    for line in &lines {
        let rho = line["rho"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&rho), "{line}");
        let route = line["route"].as_str().unwrap();
        assert_eq!(route == "counterfactual", rho >= 0.5, "{line}");
        assert!(line["before"].is_string() && line["after"].is_string());
    }
    assert_eq!(lines[2]["image"], false);
}

/// `mmke train counterfactual-mllm`: the counterfactual model beside a Hugging Face BLIP-2
/// (from a small OPT of its own) trains on an FGVEdit file and what it learned loads back.
#[test]
fn train_counterfactual_mllm_writes_a_model_that_loads() {
    let mllm = fixtures().join("mllm");
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(mllm.join("image16.png"), data.path().join("a.png")).unwrap();
    let records = serde_json::json!([{
        "src": "w9 w21 w33", "alt": "w40 w41", "rephrase": "w9 w22 w33", "image": "a.png",
        "loc": "w50 w51", "loc_ans": "w52", "fg_gen_q": "w9 w25 w33", "fg_gen_a": "w40 w41",
        "fg_loc_q": "w9 w26", "fg_loc_a": "w43"
    }]);
    std::fs::write(data.path().join("train.json"), records.to_string()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/counterfactual.toml");
    let (model, lm) = (mllm.join("blip2-opt/hub"), mllm.join("opt-lm"));
    let status = mmke(&[
        "train",
        "counterfactual-mllm",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "train.steps=4",
        "--set",
        "train.batch_size=2",
        "--model",
        model.to_str().unwrap(),
        "--lm",
        lm.to_str().unwrap(),
        "--data",
        data.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let device = burn::tensor::Device::flex();
    let base = mmke::edit::speaker::Speaker::from_mllm(
        mmke::model::mllm::Mllm::load(&model, &device).unwrap(),
        32,
    )
    .unwrap();
    let fresh = mmke::edit::speaker::Speaker::counterfactual(&base, Some(&lm), &device).unwrap();
    // The LM starts from opt-lm's weights (the projection from a random draw): trained, its
    // first FFN matrix differs from opt-lm's.
    let ffn = |m: &mmke::model::mllm::counterfactual::CounterfactualMllm| {
        m.language_model.ffn_weights(0)[0].clone().into_data()
    };
    let untrained = ffn(&fresh.model);
    let trained = mmke::model::mllm::counterfactual::load(fresh.model, out.path()).unwrap();
    assert_ne!(ffn(&trained), untrained, "nothing was trained");
}

/// `mmke bench train`: one JSON line per model the quick preset trains most, each with its
/// preset's batch and a positive steps/s.
#[test]
fn bench_train_times_the_scope_classifier_and_the_vlm() {
    let out = mmke(&["bench", "train", "--iters", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let models: Vec<&str> = lines.iter().map(|l| l["model"].as_str().unwrap()).collect();
    assert_eq!(models, ["scope-multimodal", "vlm"]);
    for line in &lines {
        assert_eq!(line["batch"], 32, "{line}");
        assert!(line["steps_per_second"].as_f64().unwrap() > 0.0, "{line}");
    }
    // The shapes tools/bench_train_torch.py replicates: the scenes vocabulary, and token
    // widths a question (with its target, or the prompt's prefix) can have.
    let width = |line: &serde_json::Value, key: &str| line["shapes"][key].as_u64().unwrap();
    for (line, keys) in lines.iter().zip([
        &["edit_tokens", "query_tokens"][..],
        &["tokens", "prompt_tokens", "text_tokens"][..],
    ]) {
        assert!(width(line, "vocab") > 50, "{line}");
        for key in keys {
            assert!((4..64).contains(&width(line, key)), "{key}: {line}");
        }
    }
    // A VLM batch holds the prompt's prefix, then the answer and the end token.
    assert!(width(&lines[1], "tokens") > width(&lines[1], "prompt_tokens"));
}

#[test]
fn bench_fma_measures_a_positive_limit_in_the_widest_instructions() {
    let out = mmke(&[
        "bench",
        "fma",
        "--threads",
        "1",
        "--iters",
        "1000000",
        "--runs",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["threads"], 1);
    assert_eq!(line["runs"].as_array().unwrap().len(), 2);
    let lanes = line["lanes"].as_u64().unwrap();
    let expected = match line["instructions"].as_str().unwrap() {
        "avx512f" => 16,
        "avx2+fma" => 8,
        "scalar" => 1,
        other => panic!("unknown instructions {other}"),
    };
    assert_eq!(lanes, expected);
    let best = line["gflops"].as_f64().unwrap();
    let runs: Vec<f64> = line["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().unwrap())
        .collect();
    assert!(best > 0.0 && runs.iter().all(|&r| r <= best) && runs.contains(&best));
}
