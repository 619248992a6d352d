//! `mmke export`: a trained scope classifier as model.safetensors + config.json + clip/ (Hugging
//! Face layout).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mmke::model::scope::ScopeRun;

use crate::DeviceArgs;

#[derive(Args)]
pub struct ExportArgs {
    /// A run directory written by `mmke train scope`.
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: ExportArgs) -> Result<()> {
    ScopeRun::load(&args.checkpoint, &args.device.device()?)?
        .export(&args.checkpoint, &args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
