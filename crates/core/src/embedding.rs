//! One embedding vector and the model that produced it.

use serde::{Deserialize, Serialize};

use crate::manifest::Precision;

/// An embedding computed by a model (6144 × f32 for Derm Foundation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// `model.id` of the manifest of the model that computed it.
    pub model_id: String,
    /// `model.precision` of that manifest.
    pub precision: Precision,
    /// The values, dequantised to f32.
    pub values: Vec<f32>,
}

impl Embedding {
    pub fn dim(&self) -> usize {
        self.values.len()
    }

    pub fn l2_norm(&self) -> f32 {
        self.values.iter().map(|v| v * v).sum::<f32>().sqrt()
    }

    /// Cosine similarity with another vector of the same length (0 when either is all zeros).
    pub fn cosine(&self, other: &[f32]) -> f64 {
        cosine(&self.values, other)
    }
}

/// Cosine similarity of two equally long vectors, computed in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine of vectors of different lengths");
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += x as f64 * y as f64;
        na += x as f64 * x as f64;
        nb += y as f64 * y as f64;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_parallel_and_orthogonal_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }

    #[test]
    fn norm_and_dim() {
        let e = Embedding {
            model_id: "m".into(),
            precision: Precision::Fp32,
            values: vec![3.0, 4.0],
        };
        assert_eq!(e.dim(), 2);
        assert_eq!(e.l2_norm(), 5.0);
    }
}
