//! `dermedge hub export`: the stored records as CSV, and their embeddings as `.npy` with a JSON
//! index of record ids, in each device's sequence order (per enrollment epoch); the losses the
//! devices reported as `<csv stem>.gaps.csv` next to the records' CSV. Every file is written
//! readable by its owner only.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use dermedge_record::{HeadResult, StoredEmbedding};

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
    /// Gaps written to [`gaps_csv_path`] (0: no file written).
    pub gaps: usize,
    /// Records left out of the `.npy` because their stored embedding is damaged.
    pub skipped: usize,
}

struct Row {
    record_id: String,
    device_id: String,
    epoch: i64,
    seq: i64,
    captured_at_ms: i64,
    model_id: String,
    precision: String,
    source: Option<String>,
    heads: Vec<HeadResult>,
    quality_ok: Option<bool>,
    embedding: StoredEmbedding,
}

fn rows(store: &Store, filter: &ExportFilter) -> Result<Vec<Row>, HubError> {
    let records = store.records(filter.device_id.as_deref(), filter.model_id.as_deref())?;
    Ok(records
        .into_iter()
        .map(|r| Row {
            embedding: r.stored_embedding(),
            heads: serde_json::from_str(&r.heads_json).unwrap_or_default(),
            quality_ok: r
                .quality_json
                .and_then(|q| serde_json::from_str::<serde_json::Value>(&q).ok())
                .and_then(|v| v["acceptable"].as_bool()),
            record_id: r.record_id,
            device_id: r.device_id,
            epoch: r.epoch,
            seq: r.seq,
            captured_at_ms: r.captured_at_ms,
            model_id: r.model_id,
            precision: r.precision,
            source: r.source,
        })
        .collect())
}

/// A device-written text as a spreadsheet shows it but does not run it: a cell that starts like
/// a formula (`=`, `+`, `-`, `@`, tab, carriage return) gets a leading `'`. Quoting (RFC 4180) is
/// the CSV writer's.
pub(crate) fn inert(s: &str) -> String {
    // Spreadsheets set to `;` as their list separator split a cell there: each piece is a cell.
    s.split(';')
        .map(|piece| {
            if piece.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                format!("'{piece}")
            } else {
                piece.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The columns of the records' CSV, in order.
const RECORD_COLUMNS: [&str; 11] = [
    "record_id",
    "device_id",
    "seq",
    "captured_at_ms",
    "model_id",
    "precision",
    "embedding_dim",
    "source",
    "quality_ok",
    "heads",
    "epoch",
];

/// One row of the records' CSV (`hub export` and the web page's export).
pub(crate) struct CsvRecord<'a> {
    pub record_id: &'a str,
    pub device_id: &'a str,
    pub epoch: i64,
    pub seq: i64,
    pub captured_at_ms: i64,
    pub model_id: &'a str,
    pub precision: &'a str,
    pub embedding_dim: i64,
    pub source: Option<&'a str>,
    pub quality_ok: Option<bool>,
    pub heads: &'a [HeadResult],
}

/// The records' header, then `extra` columns.
pub(crate) fn write_header<W: Write>(out: &mut csv::Writer<W>, extra: &[&str]) -> csv::Result<()> {
    out.write_record(RECORD_COLUMNS.iter().chain(extra))
}

/// One record's row, then `extra` cells; every device- or person-written cell made inert.
pub(crate) fn write_row<W: Write>(
    out: &mut csv::Writer<W>,
    r: &CsvRecord<'_>,
    extra: &[String],
) -> csv::Result<()> {
    let heads: Vec<String> = r.heads.iter().map(top).collect();
    let cells = [
        inert(r.record_id),
        inert(r.device_id),
        r.seq.to_string(),
        r.captured_at_ms.to_string(),
        inert(r.model_id),
        inert(r.precision),
        r.embedding_dim.to_string(),
        inert(r.source.unwrap_or("")),
        r.quality_ok.map_or(String::new(), |q| q.to_string()),
        inert(&heads.join(";")),
        r.epoch.to_string(),
    ];
    out.write_record(cells.into_iter().chain(extra.iter().map(|c| inert(c))))
}

/// An RFC 4180 CSV writer (CRLF line ends, quotes where needed).
pub(crate) fn csv_writer<W: Write>(out: W) -> csv::Writer<W> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(out)
}

fn csv_error(path: &Path) -> impl Fn(csv::Error) -> HubError + '_ {
    move |e| HubError::Io {
        path: path.into(),
        source: std::io::Error::other(e),
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

/// Create or truncate `path`, readable and writable by its owner only (also when it existed).
fn create(path: &Path) -> Result<BufWriter<File>, HubError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| HubError::Io {
        path: path.into(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    Ok(BufWriter::new(file))
}

/// Where [`export`] writes the gaps next to the records' CSV `csv`: `<stem>.gaps.csv`.
pub fn gaps_csv_path(csv: &Path) -> PathBuf {
    let stem = csv
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    csv.with_file_name(format!("{stem}.gaps.csv"))
}

/// Write the CSV and/or the `.npy` (+ `.npy.json`) of the records that pass `filter`.
pub fn export(
    store: &Store,
    filter: &ExportFilter,
    csv: Option<&Path>,
    npy: Option<&Path>,
) -> Result<Exported, HubError> {
    let rows = rows(store, filter)?;
    let mut gaps = 0;
    if let Some(path) = csv {
        let io = |source| HubError::Io {
            path: path.into(),
            source,
        };
        let mut out = csv_writer(create(path)?);
        let csv_err = csv_error(path);
        write_header(&mut out, &[]).map_err(&csv_err)?;
        for r in &rows {
            let row = CsvRecord {
                record_id: &r.record_id,
                device_id: &r.device_id,
                epoch: r.epoch,
                seq: r.seq,
                captured_at_ms: r.captured_at_ms,
                model_id: &r.model_id,
                precision: &r.precision,
                embedding_dim: i64::from(r.embedding.dim),
                source: r.source.as_deref(),
                quality_ok: r.quality_ok,
                heads: &r.heads,
            };
            write_row(&mut out, &row, &[]).map_err(&csv_err)?;
        }
        out.flush().map_err(io)?;
        let gap_rows = store.gaps(filter.device_id.as_deref())?;
        if !gap_rows.is_empty() {
            let path = gaps_csv_path(path);
            let io = |source| HubError::Io {
                path: path.clone(),
                source,
            };
            let mut out = csv_writer(create(&path)?);
            let csv_err = csv_error(&path);
            out.write_record(["device_id", "epoch", "from", "to", "reason", "at_ms"])
                .map_err(&csv_err)?;
            for g in &gap_rows {
                out.write_record([
                    inert(&g.device_id),
                    g.epoch.to_string(),
                    g.from.to_string(),
                    g.to.to_string(),
                    inert(&g.reason),
                    g.at_ms.to_string(),
                ])
                .map_err(&csv_err)?;
            }
            out.flush().map_err(io)?;
            gaps = gap_rows.len();
        }
    }
    let dim = rows.first().map(|r| r.embedding.dim as usize);
    let mut skipped = 0;
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
        // A stored record whose bytes do not fit its dimension (from before records were checked
        // on arrival) is left out and named, so that it cannot break the export of the others.
        let mut kept = Vec::with_capacity(rows.len());
        for r in &rows {
            match r.embedding.to_f32() {
                Some(values) if values.len() == dim => kept.push((r, values)),
                _ => {
                    log::warn!(
                        "{}: record {} left out: its embedding bytes do not match its dimension",
                        path.display(),
                        r.record_id
                    );
                    skipped += 1;
                }
            }
        }
        dermedge_core::npy::write_f32_rows(&mut out, dim, kept.iter().map(|(_, v)| v.as_slice()))
            .map_err(io)?;
        out.flush().map_err(io)?;
        let index_path = PathBuf::from(format!("{}.json", path.display()));
        let index = serde_json::json!({
            "format": "dermedge-hub-export/1",
            "model": rows.first().map(|r| r.model_id.clone()),
            "rows": kept.iter().map(|(r, _)| serde_json::json!({
                "record_id": r.record_id, "device_id": r.device_id, "epoch": r.epoch, "seq": r.seq,
            })).collect::<Vec<_>>(),
        });
        let mut out = create(&index_path)?;
        out.write_all(&serde_json::to_vec_pretty(&index).expect("serialisable"))
            .and_then(|()| out.flush())
            .map_err(|source| HubError::Io {
                path: index_path,
                source,
            })?;
    }
    Ok(Exported {
        skipped,
        rows: rows.len(),
        dim,
        gaps,
    })
}

#[cfg(test)]
mod inert_tests {
    use super::inert;

    #[test]
    fn formula_cells_and_pieces_are_inert() {
        assert_eq!(inert("=1+1"), "'=1+1");
        assert_eq!(
            inert("scan.png;=WEBSERVICE(A1)"),
            "scan.png;'=WEBSERVICE(A1)"
        );
        assert_eq!(inert("kind=photo:0.9;size=2"), "kind=photo:0.9;size=2");
        assert_eq!(inert("-2;+3;@x"), "'-2;'+3;'@x");
        assert_eq!(inert("plain"), "plain");
    }
}
