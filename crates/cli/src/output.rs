//! Writing embeddings: CBOR (default), `.npy` (+ a JSON index of rows) or JSON lines.
//! Files are written to a temporary name and renamed, so a crash never leaves half a file.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dermedge_core::manifest::Precision;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Cbor,
    Npy,
    Jsonl,
}

impl Format {
    /// The format named by `--format`, else by the output file's extension, else CBOR.
    pub fn resolve(explicit: Option<Format>, out: &Path) -> Format {
        explicit.unwrap_or_else(|| match out.extension().and_then(|e| e.to_str()) {
            Some("npy") => Format::Npy,
            Some("jsonl") | Some("ndjson") => Format::Jsonl,
            _ => Format::Cbor,
        })
    }
}

/// Which model produced the embeddings.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRef {
    pub id: String,
    pub version: String,
    pub precision: Precision,
    pub sha256: String,
    pub embedding_dim: usize,
    pub runtime: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub file: String,
    pub embedding: Vec<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub file: String,
    pub error: String,
}

/// The whole CBOR document (and the `.npy` index, without the vectors).
#[derive(Debug, Serialize)]
struct Document<'a> {
    format: &'static str,
    model: &'a ModelRef,
    records: &'a [Record],
    failures: &'a [Failure],
}

#[derive(Debug, Serialize)]
struct NpyIndex<'a> {
    format: &'static str,
    model: &'a ModelRef,
    rows: Vec<&'a str>,
    failures: &'a [Failure],
}

#[derive(Debug, Serialize)]
struct JsonLine<'a> {
    file: &'a str,
    model_id: &'a str,
    precision: Precision,
    embedding: &'a [f32],
}

pub const FORMAT_TAG: &str = "dermedge-embeddings/1";

fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<fs::File>) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let tmp: PathBuf = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let file =
        fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let mut out = BufWriter::new(file);
    write(&mut out).with_context(|| format!("{}: cannot write", tmp.display()))?;
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("{}: cannot sync", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

pub fn write(
    path: &Path,
    format: Format,
    model: &ModelRef,
    records: &[Record],
    failures: &[Failure],
) -> Result<()> {
    match format {
        Format::Cbor => write_atomically(path, |out| {
            let doc = Document {
                format: FORMAT_TAG,
                model,
                records,
                failures,
            };
            ciborium::into_writer(&doc, out).map_err(|e| anyhow::anyhow!("{e}"))
        }),
        Format::Jsonl => write_atomically(path, |out| {
            for r in records {
                let line = JsonLine {
                    file: &r.file,
                    model_id: &model.id,
                    precision: model.precision,
                    embedding: &r.embedding,
                };
                serde_json::to_writer(&mut *out, &line)?;
                out.write_all(b"\n")?;
            }
            Ok(())
        }),
        Format::Npy => {
            if records.is_empty() {
                bail!("{}: no embeddings to write", path.display());
            }
            write_atomically(path, |out| write_npy(out, model.embedding_dim, records))?;
            let index_path = PathBuf::from(format!("{}.json", path.display()));
            write_atomically(&index_path, |out| {
                let index = NpyIndex {
                    format: FORMAT_TAG,
                    model,
                    rows: records.iter().map(|r| r.file.as_str()).collect(),
                    failures,
                };
                serde_json::to_writer_pretty(&mut *out, &index)?;
                Ok(())
            })
        }
    }
}

/// Little-endian float32, shape (rows, dim), C order.
fn write_npy(out: &mut impl Write, dim: usize, records: &[Record]) -> Result<()> {
    dermedge_core::npy::write_f32_rows(out, dim, records.iter().map(|r| r.embedding.as_slice()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_data_follows() {
        let records = vec![Record {
            file: "a".into(),
            embedding: vec![1.0, 2.0, 3.0],
        }];
        let mut buf = Vec::new();
        write_npy(&mut buf, 3, &records).unwrap();
        let header_len = u16::from_le_bytes([buf[8], buf[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let (shape, _) = dermedge_core::npy::read_f32(&buf).unwrap();
        assert_eq!(shape, [1, 3]);
        assert_eq!(
            &buf[10 + header_len..],
            [1f32, 2.0, 3.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn format_follows_extension_unless_named() {
        assert_eq!(Format::resolve(None, Path::new("x.npy")), Format::Npy);
        assert_eq!(Format::resolve(None, Path::new("x.jsonl")), Format::Jsonl);
        assert_eq!(Format::resolve(None, Path::new("x.cbor")), Format::Cbor);
        assert_eq!(Format::resolve(None, Path::new("x")), Format::Cbor);
        assert_eq!(
            Format::resolve(Some(Format::Jsonl), Path::new("x.npy")),
            Format::Jsonl
        );
    }
}
