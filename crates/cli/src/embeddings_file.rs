//! Reading back what `dermedge embed` wrote: the CBOR document, or `.npy` with its `.npy.json`
//! index (model and row file names), or JSON lines. Every error names the file and what was expected.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dermedge_core::manifest::Precision;
use serde::Deserialize;

/// Embeddings of one model, one row per image file.
#[derive(Debug, Clone)]
pub struct EmbeddingSet {
    pub model_id: String,
    pub precision: Precision,
    pub dim: usize,
    pub files: Vec<String>,
    pub rows: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct ModelRef {
    id: String,
    precision: Precision,
    embedding_dim: usize,
}

#[derive(Deserialize)]
struct CborRecord {
    file: String,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct CborDocument {
    format: String,
    model: ModelRef,
    records: Vec<CborRecord>,
}

#[derive(Deserialize)]
struct NpyIndex {
    format: String,
    model: ModelRef,
    rows: Vec<String>,
}

#[derive(Deserialize)]
struct JsonLine {
    file: String,
    model_id: String,
    precision: Precision,
    embedding: Vec<f32>,
}

pub fn read(path: &Path) -> Result<EmbeddingSet> {
    let set = match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => read_npy(path)?,
        Some("jsonl") | Some("ndjson") => read_jsonl(path)?,
        _ => read_cbor(path)?,
    };
    if let Some(i) = set.rows.iter().position(|r| r.len() != set.dim) {
        bail!(
            "{}: row {i} ({}) has {} values, the model's embedding_dim is {}",
            path.display(),
            set.files[i],
            set.rows[i].len(),
            set.dim
        );
    }
    if set.rows.is_empty() {
        bail!("{}: holds no embeddings", path.display());
    }
    Ok(set)
}

fn check_format(path: &Path, format: &str) -> Result<()> {
    if format != crate::output::FORMAT_TAG {
        bail!(
            "{}: format {format:?}, expected {:?}",
            path.display(),
            crate::output::FORMAT_TAG
        );
    }
    Ok(())
}

fn read_cbor(path: &Path) -> Result<EmbeddingSet> {
    let file = fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let doc: CborDocument = ciborium::from_reader(std::io::BufReader::new(file)).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a dermedge embeddings CBOR document ({e}); expected the output of `dermedge embed`",
            path.display()
        )
    })?;
    check_format(path, &doc.format)?;
    Ok(EmbeddingSet {
        model_id: doc.model.id,
        precision: doc.model.precision,
        dim: doc.model.embedding_dim,
        files: doc.records.iter().map(|r| r.file.clone()).collect(),
        rows: doc.records.into_iter().map(|r| r.embedding).collect(),
    })
}

fn read_npy(path: &Path) -> Result<EmbeddingSet> {
    let index_path = PathBuf::from(format!("{}.json", path.display()));
    let index: NpyIndex =
        serde_json::from_str(&fs::read_to_string(&index_path).with_context(|| {
            format!("{}: cannot read the .npy's row index", index_path.display())
        })?)
        .with_context(|| format!("{}: not a dermedge .npy index", index_path.display()))?;
    check_format(&index_path, &index.format)?;
    let bytes = fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (shape, data) = parse_npy(&bytes).with_context(|| format!("{}", path.display()))?;
    if shape != [index.rows.len(), index.model.embedding_dim] {
        bail!(
            "{}: shape {shape:?}, but {} lists {} rows of {} values",
            path.display(),
            index_path.display(),
            index.rows.len(),
            index.model.embedding_dim
        );
    }
    Ok(EmbeddingSet {
        model_id: index.model.id,
        precision: index.model.precision,
        dim: index.model.embedding_dim,
        rows: data
            .chunks(index.model.embedding_dim.max(1))
            .map(<[f32]>::to_vec)
            .collect(),
        files: index.rows,
    })
}

/// A little-endian float32 (or float16) C-order `.npy`: (shape, values).
pub fn parse_npy(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    Ok(dermedge_core::npy::read_f32(bytes)?)
}

fn read_jsonl(path: &Path) -> Result<EmbeddingSet> {
    let text =
        fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut set: Option<EmbeddingSet> = None;
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: JsonLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{}: not a dermedge embedding line",
                path.display(),
                n + 1
            )
        })?;
        let set = set.get_or_insert_with(|| EmbeddingSet {
            model_id: row.model_id.clone(),
            precision: row.precision,
            dim: row.embedding.len(),
            files: Vec::new(),
            rows: Vec::new(),
        });
        if row.model_id != set.model_id || row.precision != set.precision {
            bail!(
                "{}:{}: model {} {}, earlier lines are {} {}",
                path.display(),
                n + 1,
                row.model_id,
                row.precision,
                set.model_id,
                set.precision
            );
        }
        set.files.push(row.file);
        set.rows.push(row.embedding);
    }
    set.with_context(|| format!("{}: holds no embeddings", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_parser_refuses_what_it_cannot_read() {
        assert!(parse_npy(b"hello world").is_err());
        let mut good = b"\x93NUMPY\x01\x00".to_vec();
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }\n";
        good.extend((header.len() as u16).to_le_bytes());
        good.extend(header.as_bytes());
        good.extend(1f32.to_le_bytes());
        good.extend(2f32.to_le_bytes());
        assert_eq!(parse_npy(&good).unwrap(), (vec![1, 2], vec![1.0, 2.0]));
        let err = parse_npy(&good[..good.len() - 1]).unwrap_err().to_string();
        assert!(err.contains("not a readable .npy"), "{err}");
        let f8 = String::from_utf8(good.clone())
            .unwrap_or_default()
            .replace("<f4", "<f8");
        if !f8.is_empty() {
            assert!(parse_npy(f8.as_bytes()).is_err());
        }
    }
}
