//! Helpers shared by the end-to-end tests: the fixtures, golden files, `.npy` rows. Tests that
//! run the `dermedge` binary itself are targets of `dermedge-cli` and use `tests/binary.rs`.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// golden.df-mini.npy: the TensorFlow graph's fp32 embeddings of the fixture images, in
/// reference/index.json order.
pub fn golden() -> Vec<Vec<f32>> {
    let npy = std::fs::read(fixtures().join("reference/golden.df-mini.npy")).expect("golden file");
    let header_len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    npy[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect::<Vec<_>>()
        .chunks(6144)
        .map(<[f32]>::to_vec)
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A float32 C-order `.npy` file as rows of `dim` values.
pub fn read_npy_rows(path: &Path) -> Vec<Vec<f32>> {
    let npy = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (shape, values) =
        dermedge_core::npy::read_f32(&npy).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dim = *shape.last().expect("shape");
    values.chunks(dim.max(1)).map(<[f32]>::to_vec).collect()
}
