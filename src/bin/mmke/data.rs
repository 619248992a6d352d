//! `mmke data`: generate the scenes benchmark, validate FGVEdit / MMEdit files.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use mmke::data::check::CheckSummary;
use mmke::data::scenes::{self, ScenesConfig};
use mmke::data::{Format, ImageCheck, ImageRoots, Task, mmedit, reader};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Generate the synthetic fine-grained benchmark (FGVEdit schema + MMEdit keys + exact scope).
    Scenes {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 2000)]
        train: usize,
        #[arg(long, default_value_t = 500)]
        test: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Side of the square images in pixels (64 for the small models, 224 for real CLIP).
        #[arg(long, default_value_t = 64)]
        image_size: u32,
    },
    /// Validate a FGVEdit or MMEdit file (every image decoded) and print a summary.
    Check {
        file: PathBuf,
        /// Root of the relative image paths (COCO root for MMEdit).
        #[arg(long)]
        images: PathBuf,
        #[arg(long, value_enum, default_value = "fgvedit")]
        format: FormatArg,
        /// MMEdit's rephrased-image root (default: --images).
        #[arg(long)]
        rephrase_images: Option<PathBuf>,
        /// MMEdit task (default: caption when the file name says so, else vqa).
        #[arg(long, value_enum)]
        task: Option<TaskArg>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FormatArg {
    Fgvedit,
    Mmedit,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TaskArg {
    Vqa,
    Caption,
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Scenes {
            out,
            train,
            test,
            seed,
            image_size,
        } => {
            anyhow::ensure!(image_size >= 16, "--image-size must be at least 16");
            let config = ScenesConfig {
                train,
                test,
                seed,
                image_size,
            };
            let counts = scenes::write(&out, &config)?;
            println!("{}", serde_json::to_string_pretty(&counts)?);
        }
        DataCommand::Check {
            file,
            images,
            format,
            rephrase_images,
            task,
        } => {
            let format = match format {
                FormatArg::Fgvedit => Format::FgvEdit,
                FormatArg::Mmedit => Format::MmEdit(match task {
                    Some(TaskArg::Vqa) => Task::Vqa,
                    Some(TaskArg::Caption) => Task::Caption,
                    None => mmedit::task_of(&file),
                }),
            };
            let roots = ImageRoots {
                images,
                rephrase: rephrase_images,
            };
            let report = reader::read_report(&file, format, &roots, ImageCheck::Decode)?;
            let summary = CheckSummary::new(&report);
            print!("{summary}");
            anyhow::ensure!(
                summary.is_valid(),
                "{}: {} invalid records",
                file.display(),
                summary.invalid
            );
        }
    }
    Ok(())
}
