//! Train a scope classifier from nothing: generate a small scenes split, pre-train a scenes
//! CLIP for a few steps, train MSCKE's dot-product classifier on it (BCE, eq. 11) and evaluate
//! it per kind of question. The numbers of so short a run are near chance on the hard
//! questions; `mmke experiment mscke-table1` trains the real thing.
//!
//! Run: `cargo run --release --example train_scope` (about half a minute on 2 cores).

use mmke::data::scenes::{self, ScenesConfig};
use mmke::train::clip::ClipTrainConfig;
use mmke::train::scope::{ScopeRunConfig, evaluate_run};

fn main() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let (data, clip, run) = (
        work.path().join("s"),
        work.path().join("clip"),
        work.path().join("scope"),
    );
    let device = burn::tensor::Device::flex();
    let train_device = device.clone().autodiff();

    let split = ScenesConfig {
        train: 40,
        test: 10,
        seed: 1,
        image_size: 96,
    };
    scenes::write(&data, &split)?;

    // One token per cell of the 3x3 layout at 96 px, with the dense attribute loss.
    let clip_config: ClipTrainConfig = toml::from_str(
        "steps = 30\nbatch_size = 16\nlr = 5e-3\nseed = 0\nscene_size = 96\ncheckpoint_every = 30\n\
         grounding_weight = 1.0\nattribute_weight = 10.0",
    )?;
    mmke::train::clip::pretrain("clip-tiny", 96, &clip_config, &clip, false, &train_device)?;

    let mut config = ScopeRunConfig::from_file(std::path::Path::new("configs/scope-dot.toml"))?;
    config.train.steps = 60;
    config.train.validate_every = 60;
    mmke::train::scope::run(&config, &clip, &data, &run, false, &train_device)?;

    let report = evaluate_run(&run, &data.join("test.json"), &data, &device)?;
    print!("{}", report.markdown());
    Ok(())
}
