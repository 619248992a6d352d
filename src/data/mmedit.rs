//! MMEdit (E-VQA and E-IC, the UniKE paper's benchmark): keys `src, pred, alt, rephrase,
//! image, image_rephrase, loc, loc_ans, m_loc, m_loc_q, m_loc_a`; `image` and `m_loc` relative
//! to the COCO root, `image_rephrase` to the rephrased-image root. Records with an empty `alt`
//! are skipped and counted.

use std::path::Path;

use super::reader::{self, Dataset, Format, ImageCheck, ImageRoots};
use super::record::Task;
use crate::error::Result;

pub fn read(
    path: &Path,
    task: Task,
    image_root: &Path,
    rephrase_root: Option<&Path>,
) -> Result<Dataset> {
    let roots = ImageRoots {
        images: image_root.to_path_buf(),
        rephrase: rephrase_root.map(Path::to_path_buf),
    };
    reader::read(path, Format::MmEdit(task), &roots, ImageCheck::Header)
}

/// The task of a released MMEdit file, from its name (`caption_*` files are E-IC).
pub fn task_of(path: &Path) -> Task {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.contains("caption") {
        Task::Caption
    } else {
        Task::Vqa
    }
}
