//! FGVEdit (the MSCKE paper's benchmark): `train_data.json` / `test_data.json` with keys
//! `src, alt, rephrase, image, loc, loc_ans, fg_gen_q, fg_gen_a, fg_loc_q, fg_loc_a`, images
//! relative to one root. The scenes benchmark's extra keys (`pred`, `image_rephrase`,
//! `m_loc*`, `scope`) are read when present.

use std::path::Path;

use super::reader::{self, Dataset, Format, ImageCheck, ImageRoots};
use crate::error::Result;

pub fn read(path: &Path, image_root: &Path) -> Result<Dataset> {
    reader::read(
        path,
        Format::FgvEdit,
        &ImageRoots::new(image_root),
        ImageCheck::Header,
    )
}
