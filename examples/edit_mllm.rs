//! Edit a real multimodal LLM in Hugging Face layout: load a BLIP-2 or LLaVA directory, ask
//! it about an image, fine-tune its last LM layer on an edit (FT-LLM), ask again, reset. With
//! no argument it edits the tiny random LLaVA the tests ship (its vocabulary is words
//! `w0 ... w71`, so its answers mean nothing; the mechanics are the same on a real
//! checkpoint).
//!
//! Run: `cargo run --release --example edit_mllm [MODEL_DIR IMAGE PROMPT TARGET]`, e.g.
//! `... -- ~/llava-1.5-7b-hf photo.jpg "USER: <image>\nWhat animal is this? ASSISTANT:" cat`
//! (the prompt holds `<image>` for LLaVA; BLIP-2 takes plain text).

use std::path::PathBuf;

use mmke::data::record::EditRecord;
use mmke::edit::Editor;
use mmke::edit::finetune::{FineTuneConfig, FineTuneEditor, Part};
use mmke::edit::speaker::{Query, Speaker};
use mmke::model::mllm::Mllm;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mllm");
    let (dir, image, prompt, target) = match args.as_slice() {
        [dir, image, prompt, target] => (dir.into(), image.into(), prompt.clone(), target.clone()),
        [] => (
            fixtures.join("llava/v5"),
            fixtures.join("image16.png"),
            "w9 w21 w33".to_string(),
            "w40 w41".to_string(),
        ),
        _ => anyhow::bail!("usage: edit_mllm [MODEL_DIR IMAGE PROMPT TARGET]"),
    };
    let device = burn::tensor::Device::flex().autodiff(); // fine-tuning needs gradients

    let mllm = Mllm::load(&dir, &device)?;
    println!("{} from {}", mllm.config.architecture(), dir.display());
    let mut speaker = Speaker::from_mllm(mllm, 512)?;
    // Editors take the text prompt; the model places the image as its processor does.
    let text = prompt.replace("<image>", "");
    let record = EditRecord::vqa(image.clone(), "", &target);
    let record = EditRecord {
        prompt: text.clone(),
        ..record
    };
    let query = Query {
        image: Some(image),
        prompt: text,
    };
    let loss = |s: &mut Speaker<_>| -> anyhow::Result<f32> {
        Ok(
            s.loss(query.image.as_deref(), &query.prompt, &target, &device)?
                .into_scalar::<f32>(),
        )
    };
    println!("loss of {target:?} before: {:.3}", loss(&mut speaker)?);

    let config = FineTuneConfig {
        part: Part::LastLmLayer,
        steps: 10,
        lr: 1e-2,
    };
    let mut editor = FineTuneEditor::new(speaker, config, &device);
    println!("before: {:?}", editor.answer(&query, 4)?);
    editor.edit(&record)?;
    println!("after:  {:?}", editor.answer(&query, 4)?);
    println!(
        "loss of {target:?} after:  {:.3}",
        loss(&mut editor.speaker)?
    );
    editor.reset();
    println!("reset:  {:?}", editor.answer(&query, 4)?);
    Ok(())
}
