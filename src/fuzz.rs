//! Mutation fuzzing of everything mmke reads from users' files: the FGVEdit and MMEdit
//! readers, CLIP's and OPT's `config.json`, `tokenizer.json`, safetensors weights and images.
//! Each input is a committed fixture with random byte mutations (flips, interesting bytes,
//! insertions, deletions, duplicated ranges, truncation), written to a file and read through
//! the same entry point a user's file takes. A reader may accept or reject an input; it must
//! never panic. `mmke fuzz` runs it; the tests run a short round of every target.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::image::ImagePreprocessor;
use crate::data::text::TextTokenizer;
use crate::data::{Task, fgvedit, mmedit};
use crate::error::{Error, Result};
use crate::model::clip::{ClipConfig, ClipModel};
use crate::model::lm::OptConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Fgvedit,
    Mmedit,
    ClipConfig,
    OptConfig,
    Tokenizer,
    Safetensors,
    Image,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Fgvedit,
        Target::Mmedit,
        Target::ClipConfig,
        Target::OptConfig,
        Target::Tokenizer,
        Target::Safetensors,
        Target::Image,
    ];

    /// The seed inputs, relative to the fixtures directory (`tests/fixtures`).
    fn seeds(self) -> &'static [&'static str] {
        match self {
            Target::Fgvedit => &["data/fgvedit_test_data.json"],
            Target::Mmedit => &["data/vqa_eval.json"],
            Target::ClipConfig => &["clip-tiny/config.json"],
            Target::OptConfig => &["opt-tiny/config.json"],
            Target::Tokenizer => &["clip-tiny/tokenizer.json"],
            Target::Safetensors => &["clip-tiny/model.safetensors"],
            Target::Image => &["images/exact32.png", "images/tall20x45_rgba.png"],
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FuzzReport {
    pub target: Target,
    pub inputs: usize,
    /// Inputs the reader accepted (the rest were rejected with an error value).
    pub accepted: usize,
    pub rejected: usize,
    /// Inputs that panicked: the input's number and the panic message.
    pub panics: Vec<(usize, String)>,
}

/// The reader of `target` on `file`; `Ok(true)` when it accepted the input.
fn read(target: Target, file: &Path, fixtures: &Path, device: &Device) -> Result<()> {
    let coco = fixtures.join("data/coco");
    match target {
        Target::Fgvedit => fgvedit::read(file, &coco).map(drop),
        Target::Mmedit => mmedit::read(
            file,
            Task::Vqa,
            &coco,
            Some(&fixtures.join("data/rephrase")),
        )
        .map(drop),
        Target::ClipConfig => ClipConfig::from_file(file).map(drop),
        Target::OptConfig => OptConfig::from_file(file).map(drop),
        Target::Tokenizer => {
            let tokenizer = TextTokenizer::from_file(file, 16, 0)?;
            tokenizer.encode("a photo of a red circle", true).map(drop)
        }
        Target::Safetensors => {
            let config = ClipConfig::from_file(&fixtures.join("clip-tiny/config.json"))?;
            ClipModel::new(&config, device)
                .load_safetensors(file)
                .map(drop)
        }
        Target::Image => ImagePreprocessor::clip(32).load(file).map(drop),
    }
}

/// Applies 1-8 random mutations to `bytes`.
fn mutate(bytes: &mut Vec<u8>, rng: &mut ChaCha8Rng) {
    const INTERESTING: &[u8] = b"\0\xff\x7f\x80\"{}[]:,-0123456789.eE\\ntruefalsenull";
    for _ in 0..rng.random_range(1..=8) {
        let len = bytes.len();
        match rng.random_range(0..6) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                bytes[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let insert: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                bytes.splice(i..i, insert);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                bytes.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                let copy = bytes[i..i + n].to_vec();
                let at = rng.random_range(0..=len);
                bytes.splice(at..at, copy);
            }
            5 if len > 0 => bytes.truncate(rng.random_range(0..len)),
            _ => {}
        }
    }
}

/// Reads `inputs` mutated inputs of `target` (seeded by `seed`), files written under `work`.
pub fn run(
    target: Target,
    inputs: usize,
    seed: u64,
    fixtures: &Path,
    work: &Path,
) -> Result<FuzzReport> {
    let seeds: Vec<Vec<u8>> = target
        .seeds()
        .iter()
        .map(|s| {
            let path = fixtures.join(s);
            std::fs::read(&path).map_err(|e| Error::io(&path, e))
        })
        .collect::<Result<_>>()?;
    let name = target.seeds()[0].rsplit('/').next().unwrap_or("input");
    let file: PathBuf = work.join(name);
    let device = Device::flex();
    let mut report = FuzzReport {
        target,
        inputs,
        accepted: 0,
        rejected: 0,
        panics: Vec::new(),
    };
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..inputs {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(i as u64);
        let mut bytes = seeds[rng.random_range(0..seeds.len())].clone();
        mutate(&mut bytes, &mut rng);
        std::fs::write(&file, &bytes).map_err(|e| Error::io(&file, e))?;
        match catch_unwind(AssertUnwindSafe(|| read(target, &file, fixtures, &device))) {
            Ok(Ok(())) => report.accepted += 1,
            Ok(Err(_)) => report.rejected += 1,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                report.panics.push((i, message));
            }
        }
    }
    std::panic::set_hook(previous);
    Ok(report)
}
