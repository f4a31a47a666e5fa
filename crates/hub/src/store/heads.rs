//! The head loop's side of the store (migration 3): heads the hub trained from clinicians'
//! labels, with their held-out evaluation, and the signed publications devices fetch.
//!
//! A trained head is kept as a draft, with the hub's signature over it
//! ([`dermedge_sync::wire::sign_draft`]), until someone publishes it; publication checks that
//! signature, numbers the head (one above the newest published version of its name for its
//! model) and stores the signed blob devices receive ([`dermedge_sync::wire::seal_head`]).
//! Drafts are never sent.
//!
//! The same migration adds `devices.queue_depth`: the records a device said it still held
//! besides its last batch.

use super::sql::{args, Row, SqlError};
use super::Store;
use crate::HubError;

/// The SQLite schema of migration 3.
pub(crate) const SQLITE: &str = "
CREATE TABLE heads (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT NOT NULL,
    model_id        TEXT NOT NULL,
    embedding_dim   INTEGER NOT NULL,
    label_set       TEXT,
    trained_at_ms   INTEGER NOT NULL,
    trained_by      TEXT NOT NULL,
    train_records   INTEGER NOT NULL,
    heldout_records INTEGER NOT NULL,
    evaluation_json TEXT NOT NULL,
    head_json       TEXT NOT NULL,
    draft_signature BLOB NOT NULL,
    version         INTEGER,
    signed          BLOB,
    published_at_ms INTEGER,
    published_by    TEXT,
    UNIQUE (name, model_id, version)
);
CREATE INDEX heads_published ON heads (model_id, name, version);
ALTER TABLE devices ADD COLUMN queue_depth INTEGER;";

/// The PostgreSQL schema of migration 3.
pub(crate) const POSTGRES: &str = "
CREATE TABLE heads (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            TEXT NOT NULL,
    model_id        TEXT NOT NULL,
    embedding_dim   BIGINT NOT NULL,
    label_set       TEXT,
    trained_at_ms   BIGINT NOT NULL,
    trained_by      TEXT NOT NULL,
    train_records   BIGINT NOT NULL,
    heldout_records BIGINT NOT NULL,
    evaluation_json TEXT NOT NULL,
    head_json       TEXT NOT NULL,
    draft_signature BYTEA NOT NULL,
    version         BIGINT,
    signed          BYTEA,
    published_at_ms BIGINT,
    published_by    TEXT,
    UNIQUE (name, model_id, version)
);
CREATE INDEX heads_published ON heads (model_id, name, version);
ALTER TABLE devices ADD COLUMN queue_depth BIGINT;";

pub const NAME_3: &str =
    "heads: trained, evaluated and published heads; devices.queue_depth as devices report it";

/// A labelled record's embedding, for training.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledEmbedding {
    pub record_id: String,
    pub label: String,
    pub values: Vec<f32>,
}

/// A head the hub trained, as the page lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredHead {
    pub id: i64,
    pub name: String,
    pub model_id: String,
    pub embedding_dim: i64,
    /// The labels' head the classes came from; `None` for labels of whole records.
    pub label_set: Option<String>,
    pub trained_at_ms: i64,
    pub trained_by: String,
    pub train_records: i64,
    pub heldout_records: i64,
    /// [`crate::heads::Evaluation`] as JSON.
    pub evaluation_json: String,
    pub version: Option<i64>,
    pub published_at_ms: Option<i64>,
    pub published_by: Option<String>,
}

/// What a new trained head is stored with.
#[derive(Debug, Clone, PartialEq)]
pub struct NewHead<'a> {
    pub name: &'a str,
    pub model_id: &'a str,
    pub embedding_dim: i64,
    pub label_set: Option<&'a str>,
    pub trained_at_ms: i64,
    pub trained_by: &'a str,
    pub train_records: i64,
    pub heldout_records: i64,
    pub evaluation_json: &'a str,
    pub head_json: &'a str,
    /// [`dermedge_sync::wire::sign_draft`] over `head_json`.
    pub draft_signature: &'a [u8],
}

/// A draft as publication needs it: the head as trained and the hub's signature over it.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub head: StoredHead,
    pub head_json: String,
    pub draft_signature: Vec<u8>,
}

/// A published head, as devices receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub name: String,
    pub version: u64,
    pub signed: Vec<u8>,
}

/// The columns of [`StoredHead`] (not the weights: the page lists heads without them).
const HEAD_COLUMNS: &str = "SELECT id, name, model_id, embedding_dim, label_set, trained_at_ms,
    trained_by, train_records, heldout_records, evaluation_json, version,
    published_at_ms, published_by, head_json, draft_signature FROM heads";
const LIST_COLUMNS: &str = "SELECT id, name, model_id, embedding_dim, label_set, trained_at_ms,
    trained_by, train_records, heldout_records, evaluation_json, version,
    published_at_ms, published_by FROM heads";

fn stored_head(r: &Row) -> Result<StoredHead, SqlError> {
    Ok(StoredHead {
        id: r.int(0)?,
        name: r.text(1)?,
        model_id: r.text(2)?,
        embedding_dim: r.int(3)?,
        label_set: r.opt_text(4)?,
        trained_at_ms: r.int(5)?,
        trained_by: r.text(6)?,
        train_records: r.int(7)?,
        heldout_records: r.int(8)?,
        evaluation_json: r.text(9)?,
        version: r.opt_int(10)?,
        published_at_ms: r.opt_int(11)?,
        published_by: r.opt_text(12)?,
    })
}

fn draft(r: &Row) -> Result<Draft, SqlError> {
    Ok(Draft {
        head: stored_head(r)?,
        head_json: r.text(13)?,
        draft_signature: r.blob(14)?,
    })
}

impl Store {
    /// Every record of `model_id` whose current label in `label_set` (the labels of one head,
    /// or of whole records when `None`) is set, with its embedding as f32: at most `limit`. A
    /// record whose embedding bytes do not fit its dimension, or hold a value that is not a
    /// finite number, is left out with a log line.
    pub fn labelled_embeddings(
        &self,
        model_id: &str,
        label_set: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LabelledEmbedding>, HubError> {
        let rows = self.autocommit(|sql| {
            sql.query(
                concat!(
                    "SELECT r.record_id, l.label, r.embedding_dtype, r.embedding_dim, r.embedding
                     FROM labels l JOIN records r ON r.record_id = l.record_id
                     WHERE r.model_id = ?1 AND l.head IS NOT DISTINCT FROM CAST(?2 AS TEXT) AND ",
                    current_label!(),
                    " ORDER BY r.record_id LIMIT ?3"
                ),
                &args![model_id, label_set, limit.min(i64::MAX as usize) as i64],
            )?
            .iter()
            .map(|r| {
                let dim = u32::try_from(r.int(3)?).unwrap_or(0);
                Ok((
                    r.text(0)?,
                    r.text(1)?,
                    super::stored_embedding(&r.text(2)?, dim, r.blob(4)?),
                ))
            })
            .collect::<Result<Vec<_>, SqlError>>()
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for (record_id, label, embedding) in rows {
            match embedding.to_f32() {
                Some(values) if !values.is_empty() && values.iter().all(|v| v.is_finite()) => out
                    .push(LabelledEmbedding {
                        record_id,
                        label,
                        values,
                    }),
                _ => log::warn!(
                    "hub: record {record_id} left out of training: its embedding bytes do not \
                     match its dimension, or are not all finite numbers"
                ),
            }
        }
        Ok(out)
    }

    /// Keep a trained head as a draft; its id.
    pub fn add_head(&self, head: &NewHead<'_>) -> Result<i64, HubError> {
        self.autocommit(|sql| {
            sql.query_one(
                "INSERT INTO heads (name, model_id, embedding_dim, label_set, trained_at_ms,
                     trained_by, train_records, heldout_records, evaluation_json, head_json,
                     draft_signature)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING id",
                &args![
                    head.name,
                    head.model_id,
                    head.embedding_dim,
                    head.label_set,
                    head.trained_at_ms,
                    head.trained_by,
                    head.train_records,
                    head.heldout_records,
                    head.evaluation_json,
                    head.head_json,
                    head.draft_signature
                ],
            )?
            .int(0)
        })
    }

    /// Every head the hub trained, newest first.
    pub fn heads(&self) -> Result<Vec<StoredHead>, HubError> {
        self.autocommit(|sql| {
            sql.query(&format!("{LIST_COLUMNS} ORDER BY id DESC"), &[])?
                .iter()
                .map(stored_head)
                .collect()
        })
    }

    pub fn head(&self, id: i64) -> Result<Option<StoredHead>, HubError> {
        self.autocommit(|sql| {
            sql.query_opt(&format!("{LIST_COLUMNS} WHERE id = ?1"), &args![id])?
                .as_ref()
                .map(stored_head)
                .transpose()
        })
    }

    /// Publish draft `id`: number it one above the newest published version of its name for its
    /// model, and store what `sign` makes of the draft at that version (the signed blob devices
    /// receive). The version, or an error if there is no such draft, it was published already,
    /// or `sign` refuses it. Publications are serialised (on PostgreSQL, a table lock), so two
    /// hubs publishing at once get two versions.
    pub fn publish_head(
        &self,
        id: i64,
        by: &str,
        now_ms: i64,
        sign: impl Fn(&Draft, u64) -> Result<Vec<u8>, String>,
    ) -> Result<u64, HubError> {
        let version = self.transaction(|sql| {
            if sql.dialect() == super::sql::Dialect::Postgres {
                sql.execute("LOCK TABLE heads IN SHARE ROW EXCLUSIVE MODE", &[])?;
            }
            let Some(draft) = sql
                .query_opt(&format!("{HEAD_COLUMNS} WHERE id = ?1"), &args![id])?
                .as_ref()
                .map(draft)
                .transpose()?
            else {
                return Err(HubError::BadRequest(format!("no head {id}")).into());
            };
            let head = &draft.head;
            if let Some(v) = head.version {
                return Err(
                    HubError::BadRequest(format!("head {id} is published already (v{v})")).into(),
                );
            }
            let newest = sql
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM heads WHERE name = ?1 AND model_id = ?2",
                    &args![&head.name, &head.model_id],
                )?
                .int(0)?;
            let version = newest + 1;
            let signed = sign(&draft, version as u64).map_err(HubError::BadRequest)?;
            sql.execute(
                "UPDATE heads SET version = ?2, signed = ?3, published_at_ms = ?4, published_by = ?5
                 WHERE id = ?1 AND version IS NULL",
                &args![id, version, &signed, now_ms, by],
            )?;
            Ok(version as u64)
        })?;
        log::info!("hub: {by} published head {id} as version {version}");
        Ok(version)
    }

    /// The newest published version of each head name for `model_id` at `embedding_dim` that
    /// `wanted(name, version)` asks for, in name order, as long as they fit in `max_bytes` in
    /// all (the first always comes; the rest wait for a later query, once the device holds
    /// these). Only the chosen heads' blobs are read.
    pub fn publications(
        &self,
        model_id: &str,
        embedding_dim: i64,
        wanted: impl Fn(&str, u64) -> bool,
        max_bytes: usize,
    ) -> Result<Vec<Publication>, HubError> {
        self.autocommit(|sql| {
            let newest = sql.query(
                "SELECT h.id, h.name, h.version, CAST(LENGTH(h.signed) AS BIGINT) FROM heads h
                 WHERE h.model_id = ?1 AND h.embedding_dim = ?2 AND h.signed IS NOT NULL
                   AND h.version = (SELECT MAX(g.version) FROM heads g
                                    WHERE g.name = h.name AND g.model_id = h.model_id
                                      AND g.embedding_dim = h.embedding_dim
                                      AND g.signed IS NOT NULL)
                 ORDER BY h.name",
                &args![model_id, embedding_dim],
            )?;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for r in &newest {
                let (name, version) = (r.text(1)?, r.int(2)? as u64);
                if !wanted(&name, version) {
                    continue;
                }
                let size = usize::try_from(r.int(3)?).unwrap_or(usize::MAX);
                if !out.is_empty() && bytes.saturating_add(size) > max_bytes {
                    log::info!("hub: head {name} v{version} waits for a later query ({max_bytes} bytes an answer)");
                    continue;
                }
                bytes = bytes.saturating_add(size);
                let signed = sql
                    .query_one("SELECT signed FROM heads WHERE id = ?1", &args![r.int(0)?])?
                    .blob(0)?;
                out.push(Publication {
                    name,
                    version,
                    signed,
                });
            }
            Ok(out)
        })
    }

    /// The label sets with labels on records of each model: `(model_id, label set, labels)`.
    pub fn label_sets(&self) -> Result<Vec<(String, Option<String>, u64)>, HubError> {
        self.autocommit(|sql| {
            sql.query(
                concat!(
                    "SELECT r.model_id, l.head, COUNT(*) FROM labels l
                     JOIN records r ON r.record_id = l.record_id WHERE ",
                    current_label!(),
                    " GROUP BY r.model_id, l.head ORDER BY r.model_id, l.head"
                ),
                &[],
            )?
            .iter()
            .map(|r| Ok((r.text(0)?, r.opt_text(1)?, r.int(2)? as u64)))
            .collect()
        })
    }
}
