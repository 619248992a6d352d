//! CLIP image preprocessing, as `transformers`' `CLIPImageProcessor` does it: convert to RGB,
//! resize the shortest side (bicubic), center-crop, rescale by 1/255, normalize with the CLIP
//! mean and std. Settings come from `preprocessor_config.json` when a model directory has one.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use serde::Deserialize;

use crate::error::{Error, Result};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// How the image is resized before cropping.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resize {
    /// Scale so the shorter side has this length, keeping the aspect ratio.
    ShortestEdge(u32),
    /// Scale to exactly this `(height, width)`.
    Exact(u32, u32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ImagePreprocessor {
    pub resize: Option<Resize>,
    pub filter: FilterType,
    /// `(height, width)` of the center crop.
    pub crop: Option<(u32, u32)>,
    pub rescale_factor: Option<f32>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub normalize: bool,
    /// LLaVA-1.5's `expand2square` (`do_pad`): pad the short side, centred, with the mean
    /// colour before resizing.
    pub pad_to_square: bool,
}

impl ImagePreprocessor {
    /// CLIP's defaults for a model of the given input size.
    pub fn clip(image_size: u32) -> Self {
        Self {
            resize: Some(Resize::ShortestEdge(image_size)),
            filter: FilterType::CatmullRom,
            crop: Some((image_size, image_size)),
            rescale_factor: Some(1.0 / 255.0),
            mean: CLIP_MEAN,
            std: CLIP_STD,
            normalize: true,
            pad_to_square: false,
        }
    }

    /// Reads a `preprocessor_config.json`; keys it lacks keep CLIP's defaults.
    pub fn from_file(path: &Path, image_size: u32) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: RawPreprocessorConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            error: e,
        })?;
        let invalid = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let mut p = Self::clip(image_size);
        if let Some(size) = raw.size {
            p.resize = Some(size.resize().map_err(&invalid)?);
        }
        if raw.do_resize == Some(false) {
            p.resize = None;
        }
        if let Some(crop) = raw.crop_size {
            p.crop = Some(crop.height_width().map_err(&invalid)?);
        }
        if raw.do_center_crop == Some(false) {
            p.crop = None;
        }
        if let Some(resample) = raw.resample {
            p.filter = match resample {
                0 => FilterType::Nearest,
                1 => FilterType::Lanczos3,
                2 => FilterType::Triangle,
                3 => FilterType::CatmullRom,
                other => return Err(invalid(format!("unsupported resample mode {other}"))),
            };
        }
        if let Some(factor) = raw.rescale_factor {
            p.rescale_factor = Some(factor);
        }
        if raw.do_rescale == Some(false) {
            p.rescale_factor = None;
        }
        p.mean = raw.image_mean.unwrap_or(p.mean);
        p.std = raw.image_std.unwrap_or(p.std);
        p.normalize = raw.do_normalize.unwrap_or(true);
        p.pad_to_square = raw.do_pad.unwrap_or(false);
        Ok(p)
    }

    /// A `preprocessor_config.json` that `transformers` and [`Self::from_file`] read back
    /// (resize by shortest edge, bicubic, center crop, CLIP normalization).
    pub fn clip_json(image_size: u32) -> String {
        let json = serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": true, "size": {"shortest_edge": image_size}, "resample": 3,
            "do_center_crop": true, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": true, "rescale_factor": 1.0 / 255.0,
            "do_normalize": true, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "do_convert_rgb": true,
        });
        serde_json::to_string_pretty(&json).expect("JSON serializes")
    }

    /// The `(height, width)` of a preprocessed image.
    pub fn output_size(&self, height: u32, width: u32) -> (u32, u32) {
        let (height, width) = match self.pad_to_square {
            true => (height.max(width), height.max(width)),
            false => (height, width),
        };
        self.crop
            .unwrap_or_else(|| self.resized_size(height, width))
    }

    /// `get_resize_output_image_size` with `default_to_square=False`: the shorter side
    /// becomes `size`, the longer `int(size * long / short)`.
    fn resized_size(&self, height: u32, width: u32) -> (u32, u32) {
        match self.resize {
            None => (height, width),
            Some(Resize::Exact(h, w)) => (h, w),
            Some(Resize::ShortestEdge(size)) => {
                let (short, long) = (height.min(width), height.max(width));
                let new_long = (size as f64 * long as f64 / short as f64) as u32;
                if width <= height {
                    (new_long, size)
                } else {
                    (size, new_long)
                }
            }
        }
    }

    /// Opens, decodes and preprocesses one image file into CHW floats.
    pub fn load(&self, path: &Path) -> Result<Vec<f32>> {
        Ok(self.apply(&self.load_image(path)?))
    }

    /// Preprocesses a decoded image into CHW floats.
    pub fn apply(&self, image: &DynamicImage) -> Vec<f32> {
        let mut rgb = to_rgb_on_white(image);
        if self.pad_to_square {
            rgb = pad_to_square(&rgb, self.mean);
        }
        let (h, w) = self.resized_size(rgb.height(), rgb.width());
        let resized = if (h, w) == (rgb.height(), rgb.width()) {
            rgb
        } else {
            image::imageops::resize(&rgb, w, h, self.filter)
        };
        let cropped = match self.crop {
            Some((ch, cw)) => center_crop(&resized, ch, cw),
            None => resized,
        };
        self.to_chw(&cropped)
    }

    fn to_chw(&self, image: &RgbImage) -> Vec<f32> {
        let (w, h) = image.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0.0; 3 * plane];
        let scale = self.rescale_factor.unwrap_or(1.0);
        for (i, pixel) in image.pixels().enumerate() {
            for c in 0..3 {
                let mut v = pixel[c] as f32 * scale;
                if self.normalize {
                    v = (v - self.mean[c]) / self.std[c];
                }
                out[c * plane + i] = v;
            }
        }
        out
    }

    /// Loads and stacks images into a `[batch, 3, height, width]` tensor. All images must
    /// come out the same size (they do whenever a crop is configured).
    pub fn batch(&self, paths: &[impl AsRef<Path>], device: &Device) -> Result<Tensor<4>> {
        let mut data = Vec::new();
        let mut size = None;
        for path in paths {
            let path = path.as_ref();
            let image = self.load_image(path)?;
            let (h, w) = (image.height(), image.width());
            let out = self.output_size(h, w);
            if *size.get_or_insert(out) != out {
                return Err(Error::Image {
                    path: path.to_path_buf(),
                    reason: format!(
                        "preprocesses to {out:?}, the batch's other images to {:?}",
                        size.unwrap()
                    ),
                });
            }
            data.extend(self.apply(&image));
        }
        let (h, w) = size.unwrap_or(self.crop.unwrap_or((0, 0)));
        let shape = [paths.len(), 3, h as usize, w as usize];
        Ok(Tensor::from_data(TensorData::new(data, shape), device))
    }

    pub fn load_image(&self, path: &Path) -> Result<DynamicImage> {
        image::ImageReader::open(path)
            .map_err(|e| Error::io(path, e))?
            .with_guessed_format()
            .map_err(|e| Error::io(path, e))?
            .decode()
            .map_err(|e| Error::Image {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
    }
}

/// `transformers`' `convert_to_rgb`: transparency is composited onto a white background.
fn to_rgb_on_white(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let over_white = |c: u8| {
            let a = a as u32;
            ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8
        };
        image::Rgb([over_white(r), over_white(g), over_white(b)])
    })
}

/// The image centred on a square of the mean colour (`int(mean * 255)` per channel), the
/// offset `(side - size) // 2`, as LLaVA's `expand2square`.
fn pad_to_square(image: &RgbImage, mean: [f32; 3]) -> RgbImage {
    let (w, h) = image.dimensions();
    if w == h {
        return image.clone();
    }
    let side = w.max(h);
    let colour = image::Rgb(mean.map(|m| (m * 255.0) as u8));
    let mut square = RgbImage::from_pixel(side, side, colour);
    image::imageops::replace(
        &mut square,
        image,
        ((side - w) / 2) as i64,
        ((side - h) / 2) as i64,
    );
    square
}

/// `transformers`' `center_crop`: top-left at `(size - crop) // 2`; an image smaller than the
/// crop is padded with zeros around it.
fn center_crop(image: &RgbImage, height: u32, width: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if w >= width && h >= height {
        let top = (h - height) / 2;
        let left = (w - width) / 2;
        return image::imageops::crop_imm(image, left, top, width, height).to_image();
    }
    let mut canvas = RgbImage::new(width.max(w), height.max(h));
    let top = (canvas.height() - h) / 2;
    let left = (canvas.width() - w) / 2;
    image::imageops::replace(&mut canvas, image, left as i64, top as i64);
    center_crop(&canvas, height, width)
}

#[derive(Deserialize)]
struct RawPreprocessorConfig {
    size: Option<SizeSpec>,
    crop_size: Option<SizeSpec>,
    do_resize: Option<bool>,
    do_center_crop: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    rescale_factor: Option<f32>,
    resample: Option<u32>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    do_pad: Option<bool>,
}

/// `224`, `{"shortest_edge": 224}` or `{"height": 224, "width": 224}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Square(u32),
    Map {
        shortest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
    },
}

impl SizeSpec {
    fn resize(&self) -> std::result::Result<Resize, String> {
        match *self {
            SizeSpec::Square(s) => Ok(Resize::ShortestEdge(s)),
            SizeSpec::Map {
                shortest_edge: Some(s),
                ..
            } => Ok(Resize::ShortestEdge(s)),
            SizeSpec::Map {
                height: Some(h),
                width: Some(w),
                ..
            } => Ok(Resize::Exact(h, w)),
            _ => Err("size needs shortest_edge, or height and width".into()),
        }
    }

    fn height_width(&self) -> std::result::Result<(u32, u32), String> {
        match *self {
            SizeSpec::Square(s) => Ok((s, s)),
            SizeSpec::Map {
                height: Some(h),
                width: Some(w),
                ..
            } => Ok((h, w)),
            _ => Err("crop_size needs height and width".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_resize_truncates_like_transformers() {
        let p = ImagePreprocessor::clip(32);
        // 60x100 (h x w): short 60 -> 32, long int(32 * 100 / 60) = 53.
        assert_eq!(p.resized_size(60, 100), (32, 53));
        assert_eq!(p.resized_size(100, 60), (53, 32));
        assert_eq!(p.output_size(60, 100), (32, 32));
    }

    #[test]
    fn center_crop_takes_the_floor_offset() {
        let mut image = RgbImage::new(5, 4);
        image.put_pixel(1, 1, image::Rgb([255, 0, 0]));
        // 5x4 -> 3x2: left (5-3)//2 = 1, top (4-2)//2 = 1, so (1,1) lands at (0,0).
        let cropped = center_crop(&image, 2, 3);
        assert_eq!(cropped.dimensions(), (3, 2));
        assert_eq!(cropped.get_pixel(0, 0)[0], 255);
    }

    #[test]
    fn normalizes_with_clip_mean_and_std() {
        let p = ImagePreprocessor::clip(2);
        let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 128])));
        let chw = p.apply(&image);
        assert_eq!(chw.len(), 12);
        assert!((chw[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
        assert!((chw[4] - (0.0 - CLIP_MEAN[1]) / CLIP_STD[1]).abs() < 1e-6);
    }

    #[test]
    fn reads_both_size_spellings() {
        let dir = std::env::temp_dir().join(format!("mmke-pre-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("preprocessor_config.json");
        std::fs::write(
            &path,
            r#"{"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "resample": 3}"#,
        )
        .unwrap();
        let p = ImagePreprocessor::from_file(&path, 99).unwrap();
        assert_eq!(p.resize, Some(Resize::ShortestEdge(40)));
        assert_eq!(p.crop, Some((32, 32)));
        std::fs::write(&path, r#"{"size": 24, "crop_size": 24, "resample": 9}"#).unwrap();
        let err = ImagePreprocessor::from_file(&path, 99)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("resample mode 9") && err.contains("preprocessor_config.json"),
            "{err}"
        );
    }
}
