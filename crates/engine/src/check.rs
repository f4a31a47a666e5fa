//! Checks every backend makes before trusting a model: a sound flatbuffer, and tensors that are
//! what the manifest says.

use std::fs;
use std::path::Path;

use dermedge_core::manifest::{Layout as InputLayout, ModelManifest, TensorDtype};

use crate::{ElementType, EngineError, Quantization, TensorDetails};

pub(crate) fn manifest_dtype(dtype: TensorDtype) -> ElementType {
    match dtype {
        TensorDtype::Float32 => ElementType::Float32,
        TensorDtype::Uint8 => ElementType::Uint8,
        TensorDtype::Int8 => ElementType::Int8,
    }
}

/// Map a model file read-only.
pub(crate) fn map_model(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let file = fs::File::open(path)?;
    // SAFETY: read-only mapping of a file the caller checks before use; a concurrent truncation
    // could fault, which is why models live in dermedge's own, not shared, directories.
    unsafe { memmap2::Mmap::map(&file) }
}

/// Refuse bytes that are not a sound TFLite flatbuffer before the runtime (which trusts them)
/// sees them.
pub(crate) fn check_tflite(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    crate::flatbuffer::check_tflite(bytes).map_err(|m| EngineError::NotTflite {
        path: path.to_path_buf(),
        reason: m.what,
    })
}

/// [`map_model`] and [`check_tflite`].
#[cfg(feature = "classic")]
pub(crate) fn check_tflite_file(path: &Path) -> Result<memmap2::Mmap, EngineError> {
    let map = map_model(path).map_err(|e| EngineError::NotTflite {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    check_tflite(path, &map)?;
    Ok(map)
}

/// The model's tensors must be what the manifest says: shape, dtype and quantisation.
pub(crate) fn check_against_manifest(
    manifest: &ModelManifest,
    model: &Path,
    input: &TensorDetails,
    output: &TensorDetails,
) -> Result<(), EngineError> {
    let mismatch = |message: String| EngineError::TensorMismatch {
        manifest: manifest.path.clone(),
        model: model.to_path_buf(),
        message,
    };
    let i = &manifest.input;
    let (h, w, c) = (i.height as i32, i.width as i32, i.channels as i32);
    let expected_shape = match i.layout {
        InputLayout::Nhwc => vec![1, h, w, c],
        InputLayout::Nchw => vec![1, c, h, w],
    };
    if input.shape != expected_shape {
        return Err(mismatch(format!(
            "input `{}` has shape {:?}; the manifest's [input] describes {:?}",
            input.name, input.shape, expected_shape
        )));
    }
    if input.dtype != manifest_dtype(i.dtype) {
        return Err(mismatch(format!(
            "input `{}` is {}; input.dtype says {}",
            input.name,
            input.dtype,
            i.dtype.as_str()
        )));
    }
    match (&input.quantization, &i.quantization) {
        (Quantization::None, None) => {}
        (Quantization::PerTensor { scale, zero_point }, Some(q)) => {
            if (scale - q.scale).abs() > 1e-6 * scale.abs().max(1e-12)
                || *zero_point != q.zero_point
            {
                return Err(mismatch(format!(
                    "input `{}` is quantised with scale={scale} zero_point={zero_point}; \
                     input.quantization says scale={} zero_point={}",
                    input.name, q.scale, q.zero_point
                )));
            }
        }
        (found, declared) => {
            return Err(mismatch(format!(
                "input `{}` quantisation is {found:?}; input.quantization says {declared:?}",
                input.name
            )))
        }
    }
    if output.num_elements() != Some(manifest.model.embedding_dim)
        || output
            .shape
            .first()
            .is_some_and(|&b| b != 1 && output.shape.len() > 1)
    {
        return Err(mismatch(format!(
            "output `{}` has shape {:?}; model.embedding_dim says {} values for one image",
            output.name, output.shape, manifest.model.embedding_dim
        )));
    }
    if output.dtype != manifest_dtype(manifest.output.dtype) {
        return Err(mismatch(format!(
            "output `{}` is {}; output.dtype says {}",
            output.name,
            output.dtype,
            manifest.output.dtype.as_str()
        )));
    }
    if output.dtype != ElementType::Float32
        && !matches!(output.quantization, Quantization::PerTensor { .. })
    {
        return Err(mismatch(format!(
            "output `{}` is {} without per-tensor quantisation",
            output.name, output.dtype
        )));
    }
    Ok(())
}
