//! The tensor files of `mmke mllm forward`: inputs as the model's processor makes them
//! (`pixel_values` f32 `[B,3,H,W]`, `input_ids` i64 `[B,T]`, `attention_mask` i64 `[B,T]`,
//! optional: all ones) and the `logits` (f32 `[B,T,V]`) written back.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// The processor's inputs.
pub struct ForwardInputs {
    pub pixel_values: Tensor<4>,
    pub input_ids: Tensor<2, Int>,
    pub attention_mask: Tensor<2, Int>,
}

/// Reads a safetensors file of inputs; a missing tensor, a wrong dtype or rank, or shapes
/// that disagree are errors naming the file and the tensor.
pub fn read_inputs(path: &Path, device: &Device) -> Result<ForwardInputs> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let invalid = |reason: String| Error::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
    let get = |name: &str, rank: usize| -> Result<Option<(Vec<usize>, Dtype, &[u8])>> {
        match file.tensor(name) {
            Ok(view) if view.shape().len() == rank => {
                Ok(Some((view.shape().to_vec(), view.dtype(), view.data())))
            }
            Ok(view) => Err(invalid(format!(
                "'{name}' has shape {:?}, expected rank {rank}",
                view.shape()
            ))),
            Err(_) => Ok(None),
        }
    };
    let (pixel_shape, dtype, data) =
        get("pixel_values", 4)?.ok_or_else(|| invalid("no 'pixel_values' tensor".into()))?;
    if dtype != Dtype::F32 {
        return Err(invalid(format!(
            "'pixel_values' is {dtype:?}, expected F32"
        )));
    }
    let pixels: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let ints = |name: &str| -> Result<Option<(Vec<usize>, Vec<i64>)>> {
        let Some((shape, dtype, data)) = get(name, 2)? else {
            return Ok(None);
        };
        let values = match dtype {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            other => {
                return Err(invalid(format!("'{name}' is {other:?}, expected I64")));
            }
        };
        Ok(Some((shape, values)))
    };
    let (id_shape, ids) =
        ints("input_ids")?.ok_or_else(|| invalid("no 'input_ids' tensor".into()))?;
    let [batch, seq] = [id_shape[0], id_shape[1]];
    let mask = match ints("attention_mask")? {
        Some((shape, mask)) if shape == id_shape => mask,
        Some((shape, _)) => {
            return Err(invalid(format!(
                "'attention_mask' has shape {shape:?}, 'input_ids' {id_shape:?}"
            )));
        }
        None => vec![1; batch * seq],
    };
    if pixel_shape[0] != batch {
        return Err(invalid(format!(
            "{} images in 'pixel_values' for {batch} prompts in 'input_ids'",
            pixel_shape[0]
        )));
    }
    let p = pixel_shape;
    Ok(ForwardInputs {
        pixel_values: Tensor::from_data(TensorData::new(pixels, [p[0], p[1], p[2], p[3]]), device),
        input_ids: Tensor::from_data(TensorData::new(ids, [batch, seq]), device),
        attention_mask: Tensor::from_data(TensorData::new(mask, [batch, seq]), device),
    })
}

/// Writes `tensors` (f32) to `path` as safetensors, atomically.
pub fn write_f32(path: &Path, tensors: Vec<(&str, Tensor<3>)>) -> Result<()> {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let shape = t.dims().to_vec();
            let values: Vec<f32> = t
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .expect("converted to f32");
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.to_string(), shape, bytes)
        })
        .collect();
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            reason: format!("cannot build the tensors: {e}"),
        })?;
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: format!("cannot serialize: {e}"),
    })?;
    crate::error::write_atomic(path, &bytes)
}
