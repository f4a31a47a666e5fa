//! The manifest's `[output.correction]`: a per-dimension affine map applied to every output of a
//! model, on every backend, so a quantised export's embeddings land where its fp32 reference's
//! would. The exporter fits it on calibration images (`docs/QUANTISATION.md`).

use std::path::PathBuf;

use dermedge_core::{npy, Companion, EmbedError, Embedder, Embedding, ModelManifest, RgbImage};

use crate::{Accelerator, EngineError, LoadedModel, TensorDetails};

/// `y = x * scale + offset`, one pair per embedding dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputCorrection {
    scale: Vec<f32>,
    offset: Vec<f32>,
}

/// Largest `|scale|` or `|offset|` accepted: a fitted map stays near the identity; values far
/// beyond it are a damaged or hostile file, not a correction.
const MAX_MAGNITUDE: f32 = 1.0e6;

impl OutputCorrection {
    /// The correction `manifest` names, checked against its sha256 and the embedding size, or
    /// `None` when it names none.
    pub fn for_manifest(manifest: &ModelManifest) -> Result<Option<Self>, EngineError> {
        let dim = manifest.model.embedding_dim;
        let Some((path, bytes)) =
            manifest.read_companion(Companion::OutputCorrection, npy_limit(dim))?
        else {
            return Ok(None);
        };
        let invalid = |message: String| EngineError::Correction {
            manifest: manifest.path.clone(),
            file: path.clone(),
            message,
        };
        let (shape, values) = npy::read_f32(&bytes).map_err(|e| invalid(e.to_string()))?;
        if shape != [2, dim] {
            return Err(invalid(format!(
                "shape {shape:?}, expected [2, {dim}] (scale row, offset row) for model.embedding_dim {dim}"
            )));
        }
        if let Some(i) = values
            .iter()
            .position(|v| !v.is_finite() || v.abs() > MAX_MAGNITUDE)
        {
            let (row, column) = (i / dim, i % dim);
            let what = if row == 0 { "scale" } else { "offset" };
            return Err(invalid(format!(
                "{what}[{column}] is {}, expected a finite value of magnitude at most {MAX_MAGNITUDE}",
                values[i]
            )));
        }
        let (scale, offset) = values.split_at(dim);
        log::info!(
            "{}: output corrected per dimension (mean scale {:.4})",
            path.display(),
            scale.iter().map(|&s| s as f64).sum::<f64>() / dim as f64
        );
        Ok(Some(Self {
            scale: scale.to_vec(),
            offset: offset.to_vec(),
        }))
    }

    pub fn dim(&self) -> usize {
        self.scale.len()
    }

    /// Apply the map in place; `values` must be one embedding.
    pub fn apply(&self, values: &mut [f32]) -> Result<(), String> {
        if values.len() != self.dim() {
            return Err(format!(
                "the model gave {} values, the output correction has {}",
                values.len(),
                self.dim()
            ));
        }
        for ((v, s), o) in values.iter_mut().zip(&self.scale).zip(&self.offset) {
            *v = *v * s + o;
        }
        Ok(())
    }
}

/// A `[2, dim]` float32 `.npy`: its data plus a generous header allowance.
fn npy_limit(dim: usize) -> u64 {
    (2 * dim * 4 + 4096) as u64
}

/// A loaded model whose every output goes through an [`OutputCorrection`].
pub(crate) struct Corrected {
    pub inner: Box<dyn LoadedModel>,
    pub correction: OutputCorrection,
    pub file: PathBuf,
}

impl Corrected {
    fn corrected(&self, mut values: Vec<f32>) -> Result<Vec<f32>, EmbedError> {
        self.correction
            .apply(&mut values)
            .map_err(|message| EmbedError::Backend {
                backend: self.inner.backend(),
                message: format!("{}: {message}", self.file.display()),
            })?;
        Ok(values)
    }
}

impl Embedder for Corrected {
    fn manifest(&self) -> &ModelManifest {
        self.inner.manifest()
    }
    fn backend(&self) -> String {
        self.inner.backend()
    }
    fn runtime_description(&self) -> String {
        format!("{}, output corrected", self.inner.runtime_description())
    }
    fn embed(&mut self, image: &RgbImage) -> Result<Embedding, EmbedError> {
        let embedding = self.inner.embed(image)?;
        let values = self.corrected(embedding.values)?;
        Ok(Embedding {
            values,
            ..embedding
        })
    }
}

impl LoadedModel for Corrected {
    fn signature_key(&self) -> &str {
        self.inner.signature_key()
    }
    fn input_details(&self) -> &TensorDetails {
        self.inner.input_details()
    }
    fn output_details(&self) -> &TensorDetails {
        self.inner.output_details()
    }
    fn accelerator(&self) -> Accelerator {
        self.inner.accelerator()
    }
    fn threads(&self) -> u32 {
        self.inner.threads()
    }
    fn cpu_arithmetic(&self) -> crate::CpuArithmetic {
        self.inner.cpu_arithmetic()
    }
    fn fill_input(&mut self, image: &RgbImage) -> Result<(), EmbedError> {
        self.inner.fill_input(image)
    }
    fn invoke(&mut self) -> Result<(), EmbedError> {
        self.inner.invoke()
    }
    fn read_output(&mut self) -> Result<Vec<f32>, EmbedError> {
        let values = self.inner.read_output()?;
        self.corrected(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dermedge_core::sha256_hex;
    use std::path::Path;

    fn manifest_with(dir: &Path, array: &[f32], shape: [usize; 2], dim: usize) -> ModelManifest {
        let file = dir.join("c.npy");
        let mut bytes = Vec::new();
        let rows: Vec<&[f32]> = array.chunks(shape[1]).collect();
        npy::write_f32_rows(&mut bytes, shape[1], rows.into_iter()).unwrap();
        std::fs::write(&file, &bytes).unwrap();
        manifest_naming(dir, dim, &sha256_hex(&bytes))
    }

    fn manifest_naming(dir: &Path, dim: usize, sha256: &str) -> ModelManifest {
        let text = format!(
            r#"
[model]
id = "m"
version = "1"
file = "m.tflite"
sha256 = "{zeros}"
precision = "int8"
embedding_dim = {dim}
[input]
width = 4
height = 4
channels = 3
layout = "nhwc"
color_order = "rgb"
dtype = "float32"
resize_filter = "bilinear"
scale = 1.0
offset = 0.0
[output]
name = "embedding"
dtype = "float32"
[output.correction]
file = "c.npy"
sha256 = "{sha256}"
"#,
            zeros = "0".repeat(64)
        );
        ModelManifest::parse(&text, &dir.join("m.toml")).unwrap()
    }

    #[test]
    fn a_fitted_map_is_applied_per_dimension() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest_with(dir.path(), &[2.0, 0.5, 1.0, -1.0], [2, 2], 2);
        let c = OutputCorrection::for_manifest(&m).unwrap().unwrap();
        let mut v = [3.0, 4.0];
        c.apply(&mut v).unwrap();
        assert_eq!(v, [7.0, 1.0]);
        let mut wrong = [1.0; 3];
        assert!(c.apply(&mut wrong).unwrap_err().contains("3 values"));
    }

    #[test]
    fn a_manifest_without_a_correction_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = manifest_naming(dir.path(), 2, &"a".repeat(64));
        m.output.correction = None;
        assert_eq!(OutputCorrection::for_manifest(&m).unwrap(), None);
    }

    #[test]
    fn a_damaged_or_mismatched_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(Vec<f32>, [usize; 2], usize, &str); 4] = [
            (vec![1.0; 6], [2, 3], 2, "expected [2, 2]"),
            (vec![1.0; 4], [1, 4], 4, "expected [2, 4]"),
            (vec![1.0, f32::NAN, 0.0, 0.0], [2, 2], 2, "scale[1] is NaN"),
            (vec![1.0, 1.0, 0.0, 1e9], [2, 2], 2, "offset[1]"),
        ];
        for (values, shape, dim, expected) in cases {
            let m = manifest_with(dir.path(), &values, shape, dim);
            let message = OutputCorrection::for_manifest(&m).unwrap_err().to_string();
            assert!(message.contains(expected), "{message}");
            assert!(message.contains("c.npy"), "{message}");
        }

        // A checksum that does not match, a missing file, and a file far too large.
        let m = manifest_naming(dir.path(), 2, &"a".repeat(64));
        let message = OutputCorrection::for_manifest(&m).unwrap_err().to_string();
        assert!(message.contains("sha256"), "{message}");
        std::fs::write(dir.path().join("c.npy"), vec![0u8; 1 << 20]).unwrap();
        let message = OutputCorrection::for_manifest(&m).unwrap_err().to_string();
        assert!(message.contains("larger than"), "{message}");
        std::fs::remove_file(dir.path().join("c.npy")).unwrap();
        let message = OutputCorrection::for_manifest(&m).unwrap_err().to_string();
        assert!(message.contains("cannot open"), "{message}");
    }

    #[test]
    fn a_bad_correction_checksum_in_the_manifest_is_refused_at_parse() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest_naming(dir.path(), 2, &"a".repeat(64));
        let mut toml_text = toml::to_string(&m).unwrap();
        toml_text = toml_text.replace(&"a".repeat(64), "xyz");
        let err = ModelManifest::parse(&toml_text, &dir.path().join("m.toml")).unwrap_err();
        assert!(
            err.to_string().contains("output.correction.sha256"),
            "{err}"
        );
    }
}
