//! `dermedge hub export`: the stored records as CSV, and their embeddings as `.npy` with a JSON
//! index of record ids, in each device's sequence order.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use dermedge_queue::{Embedding, EmbeddingType, HeadResult};

use crate::store::Store;
use crate::HubError;

#[derive(Debug, Default, Clone)]
pub struct ExportFilter {
    pub device_id: Option<String>,
    pub model_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub rows: usize,
    pub dim: Option<usize>,
}

struct Row {
    record_id: String,
    device_id: String,
    seq: i64,
    captured_at_ms: i64,
    model_id: String,
    precision: String,
    source: Option<String>,
    heads: Vec<HeadResult>,
    quality_ok: Option<bool>,
    embedding: Embedding,
}

fn rows(store: &Store, filter: &ExportFilter) -> Result<Vec<Row>, HubError> {
    let err = |e: rusqlite::Error| HubError::Database {
        path: store.path().into(),
        message: e.to_string(),
    };
    let mut stmt = store
        .connection()
        .prepare(
            "SELECT record_id, device_id, seq, captured_at_ms, model_id, precision, source,
                    heads_json, quality_json, embedding_dtype, embedding_dim, embedding
             FROM records
             WHERE (?1 IS NULL OR device_id = ?1) AND (?2 IS NULL OR model_id = ?2)
             ORDER BY device_id, seq",
        )
        .map_err(err)?;
    let rows = stmt
        .query_map(rusqlite::params![filter.device_id, filter.model_id], |r| {
            let heads: String = r.get(7)?;
            let quality: Option<String> = r.get(8)?;
            let dtype: String = r.get(9)?;
            Ok(Row {
                record_id: r.get(0)?,
                device_id: r.get(1)?,
                seq: r.get(2)?,
                captured_at_ms: r.get(3)?,
                model_id: r.get(4)?,
                precision: r.get(5)?,
                source: r.get(6)?,
                heads: serde_json::from_str(&heads).unwrap_or_default(),
                quality_ok: quality
                    .and_then(|q| serde_json::from_str::<serde_json::Value>(&q).ok())
                    .and_then(|v| v["acceptable"].as_bool()),
                embedding: Embedding {
                    dtype: if dtype == "f16" {
                        EmbeddingType::F16
                    } else {
                        EmbeddingType::F32
                    },
                    dim: r.get(10)?,
                    data: r.get(11)?,
                },
            })
        })
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    Ok(rows)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn top(head: &HeadResult) -> String {
    head.probabilities
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, p)| {
            format!(
                "{}={}:{p:.3}",
                head.head,
                head.classes.get(i).map_or("?", |c| c)
            )
        })
        .unwrap_or_default()
}

fn create(path: &Path) -> Result<BufWriter<File>, HubError> {
    File::create(path)
        .map(BufWriter::new)
        .map_err(|source| HubError::Io {
            path: path.into(),
            source,
        })
}

/// Write the CSV and/or the `.npy` (+ `.npy.json`) of the records that pass `filter`.
pub fn export(
    store: &Store,
    filter: &ExportFilter,
    csv: Option<&Path>,
    npy: Option<&Path>,
) -> Result<Exported, HubError> {
    let rows = rows(store, filter)?;
    if let Some(path) = csv {
        let io = |source| HubError::Io {
            path: path.into(),
            source,
        };
        let mut out = create(path)?;
        writeln!(
            out,
            "record_id,device_id,seq,captured_at_ms,model_id,precision,embedding_dim,source,quality_ok,heads"
        )
        .map_err(io)?;
        for r in &rows {
            let heads: Vec<String> = r.heads.iter().map(top).collect();
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{}",
                r.record_id,
                csv_field(&r.device_id),
                r.seq,
                r.captured_at_ms,
                csv_field(&r.model_id),
                r.precision,
                r.embedding.dim,
                csv_field(r.source.as_deref().unwrap_or("")),
                r.quality_ok.map_or(String::new(), |q| q.to_string()),
                csv_field(&heads.join(";"))
            )
            .map_err(io)?;
        }
        out.flush().map_err(io)?;
    }
    let dim = rows.first().map(|r| r.embedding.dim as usize);
    if let Some(path) = npy {
        let models: std::collections::BTreeSet<(&str, u32)> = rows
            .iter()
            .map(|r| (r.model_id.as_str(), r.embedding.dim))
            .collect();
        if models.len() > 1 {
            return Err(HubError::BadRequest(format!(
                "{}: the records come from several models ({}); choose one with --model",
                path.display(),
                models
                    .iter()
                    .map(|(m, d)| format!("{m} {d}-d"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let dim = dim.unwrap_or(0);
        let io = |source| HubError::Io {
            path: path.into(),
            source,
        };
        let mut out = create(path)?;
        let mut header = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {dim}), }}",
            rows.len()
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        out.write_all(b"\x93NUMPY\x01\x00").map_err(io)?;
        out.write_all(&(header.len() as u16).to_le_bytes())
            .map_err(io)?;
        out.write_all(header.as_bytes()).map_err(io)?;
        for r in &rows {
            let values = r.embedding.to_f32().ok_or_else(|| HubError::Database {
                path: store.path().into(),
                message: format!(
                    "record {}: embedding bytes do not match its dim",
                    r.record_id
                ),
            })?;
            for v in values {
                out.write_all(&v.to_le_bytes()).map_err(io)?;
            }
        }
        out.flush().map_err(io)?;
        let index_path = PathBuf::from(format!("{}.json", path.display()));
        let index = serde_json::json!({
            "format": "dermedge-hub-export/1",
            "model": rows.first().map(|r| r.model_id.clone()),
            "rows": rows.iter().map(|r| serde_json::json!({
                "record_id": r.record_id, "device_id": r.device_id, "seq": r.seq,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(
            &index_path,
            serde_json::to_vec_pretty(&index).expect("serialisable"),
        )
        .map_err(|source| HubError::Io {
            path: index_path,
            source,
        })?;
    }
    Ok(Exported {
        rows: rows.len(),
        dim,
    })
}
