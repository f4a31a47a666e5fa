//! The hub's SQLite database (WAL): enrolled devices, records (unique by record id, in each
//! device's sequence order), and a log of rejected requests.

use std::path::{Path, PathBuf};

use dermedge_queue::{hex, now_ms, DeviceKey, Record};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::HubError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    device_id      TEXT PRIMARY KEY,
    sync_key       BLOB NOT NULL,
    last_counter   INTEGER NOT NULL DEFAULT 0,
    highest_seq    INTEGER NOT NULL DEFAULT 0,
    enrolled_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    row             INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id       TEXT NOT NULL UNIQUE,
    device_id       TEXT NOT NULL REFERENCES devices(device_id),
    seq             INTEGER NOT NULL,
    captured_at_ms  INTEGER NOT NULL,
    model_id        TEXT NOT NULL,
    precision       TEXT NOT NULL,
    embedding_dtype TEXT NOT NULL,
    embedding_dim   INTEGER NOT NULL,
    embedding       BLOB NOT NULL,
    heads_json      TEXT NOT NULL,
    quality_json    TEXT,
    source          TEXT,
    thumbnail_jpeg  BLOB,
    record_cbor     BLOB NOT NULL,
    received_at_ms  INTEGER NOT NULL,
    UNIQUE (device_id, seq)
);
CREATE TABLE IF NOT EXISTS rejections (
    at_ms     INTEGER NOT NULL,
    remote    TEXT,
    device_id TEXT,
    status    INTEGER NOT NULL,
    reason    TEXT NOT NULL
);
";

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// A device as the hub knows it.
#[derive(Debug, Clone)]
pub struct Device {
    pub sync_key: [u8; 32],
    pub last_counter: u64,
    pub highest_seq: u64,
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Ok {
        stored: u32,
        duplicates: u32,
        highest_seq: u64,
    },
    /// The request counter is not above the last one seen: a replay.
    Replayed { last_counter: u64 },
    /// The batch starts after records the hub does not have.
    Gap { highest_seq: u64 },
}

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> HubError + '_ {
    move |e| HubError::Database {
        path: path.into(),
        message: e.to_string(),
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, HubError> {
        let err = db_err(path);
        let conn = Connection::open(path).map_err(&err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(&err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| HubError::Database {
                path: path.into(),
                message: format!("not an SQLite database, or unreadable: {e}"),
            })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(HubError::Database {
                path: path.into(),
                message: format!("journal mode {mode}, WAL expected"),
            });
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(&err)?;
        conn.execute_batch(SCHEMA).map_err(&err)?;
        Ok(Self {
            conn,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Register a device with its key (the hub keeps only the derived sync key).
    pub fn enroll(&self, device_id: &str, key: &DeviceKey) -> Result<(), HubError> {
        if device_id.is_empty() || device_id.len() > 128 || device_id.chars().any(char::is_control)
        {
            return Err(HubError::BadRequest(format!(
                "device id {device_id:?}: expected 1 to 128 printable characters"
            )));
        }
        let changed = self
            .conn
            .execute(
                "INSERT INTO devices (device_id, sync_key, enrolled_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(device_id) DO UPDATE SET sync_key = excluded.sync_key",
                params![device_id, key.sync_key().to_vec(), now_ms()],
            )
            .map_err(db_err(&self.path))?;
        log::info!("enrolled device {device_id} ({changed} row)");
        Ok(())
    }

    pub fn device(&self, device_id: &str) -> Result<Option<Device>, HubError> {
        self.conn
            .query_row(
                "SELECT sync_key, last_counter, highest_seq FROM devices WHERE device_id = ?1",
                [device_id],
                |r| {
                    let key: Vec<u8> = r.get(0)?;
                    Ok((key, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                },
            )
            .optional()
            .map_err(db_err(&self.path))?
            .map(|(key, counter, seq)| {
                Ok(Device {
                    sync_key: key.try_into().map_err(|_| HubError::Database {
                        path: self.path.clone(),
                        message: format!("device {device_id}: stored key is not 32 bytes"),
                    })?,
                    last_counter: counter as u64,
                    highest_seq: seq as u64,
                })
            })
            .transpose()
    }

    pub fn log_rejection(
        &self,
        remote: Option<&str>,
        device: Option<&str>,
        status: u16,
        reason: &str,
    ) {
        if let Err(e) = self.conn.execute(
            "INSERT INTO rejections (at_ms, remote, device_id, status, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![now_ms(), remote, device, status, reason],
        ) {
            log::error!("{}: cannot log a rejection: {e}", self.path.display());
        }
    }

    /// Store a batch atomically: the counter check, every record and the new counter commit
    /// together, so a hub killed mid-batch has stored all of it or none.
    pub fn store_batch(
        &mut self,
        device_id: &str,
        counter: u64,
        after_seq: u64,
        records: &[(u64, Record, Vec<u8>)],
    ) -> Result<Stored, HubError> {
        let path = self.path.clone();
        let err = db_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let (last_counter, highest): (i64, i64) = tx
            .query_row(
                "SELECT last_counter, highest_seq FROM devices WHERE device_id = ?1",
                [device_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(&err)?;
        let (last_counter, mut highest) = (last_counter as u64, highest as u64);
        if counter <= last_counter {
            return Ok(Stored::Replayed { last_counter });
        }
        if after_seq > highest {
            return Ok(Stored::Gap {
                highest_seq: highest,
            });
        }
        let (mut stored, mut duplicates) = (0u32, 0u32);
        let received = now_ms();
        for (seq, record, cbor) in records {
            if record.device_id != device_id {
                return Err(HubError::BadRequest(format!(
                    "record {seq} names device {}, the request is from {device_id}",
                    record.device_id
                )));
            }
            let existing: Option<String> = tx
                .query_row(
                    "SELECT record_id FROM records WHERE device_id = ?1 AND seq = ?2",
                    params![device_id, *seq as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&err)?;
            match existing {
                Some(id) if id == record.id => {
                    duplicates += 1;
                    continue;
                }
                Some(id) => {
                    return Err(HubError::BadRequest(format!(
                        "record {seq} of {device_id} is {}, but the hub holds {id} there",
                        record.id
                    )))
                }
                None if *seq <= highest => {
                    return Err(HubError::BadRequest(format!(
                        "record {seq} of {device_id} arrives after {highest}: out of order"
                    )))
                }
                None => {}
            }
            let heads = serde_json::to_string(&record.heads).expect("serialisable");
            let quality = record
                .quality
                .as_ref()
                .map(|q| serde_json::to_string(q).expect("serialisable"));
            let dtype = serde_json::to_value(record.embedding.dtype)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            tx.execute(
                "INSERT INTO records (record_id, device_id, seq, captured_at_ms, model_id, precision,
                     embedding_dtype, embedding_dim, embedding, heads_json, quality_json, source,
                     thumbnail_jpeg, record_cbor, received_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![
                    record.id,
                    device_id,
                    *seq as i64,
                    record.captured_at_ms,
                    record.model_id,
                    record.precision,
                    dtype,
                    record.embedding.dim,
                    record.embedding.data,
                    heads,
                    quality,
                    record.source,
                    record.thumbnail_jpeg,
                    cbor,
                    received
                ],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    HubError::BadRequest(format!(
                        "record id {} is already stored for another device or position",
                        record.id
                    ))
                }
                e => err(e),
            })?;
            highest = *seq;
            stored += 1;
        }
        tx.execute(
            "UPDATE devices SET last_counter = ?2, highest_seq = ?3 WHERE device_id = ?1",
            params![device_id, counter as i64, highest as i64],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(Stored::Ok {
            stored,
            duplicates,
            highest_seq: highest,
        })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn record_count(&self) -> Result<u64, HubError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM records", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(db_err(&self.path))
    }
}

/// Hex of a key's first bytes, for logs that must not show the key.
pub fn key_hint(key: &[u8; 32]) -> String {
    hex(&key[..4])
}
