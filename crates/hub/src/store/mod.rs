//! The hub's database: enrolled devices (public keys only), records (unique by record id, in
//! each device's sequence order per enrollment epoch), the losses devices reported, and a
//! bounded log of rejected requests.
//!
//! Two backends behind one [`Store`], chosen by a [`Location`]: an SQLite file in WAL mode for
//! one clinic (`sqlite.rs`), and PostgreSQL for a health system's regional hub, which several
//! hub processes may share (`postgres.rs`). Every statement and every rule of storing a batch is
//! written once, here, against the `Sql` trait (`sql.rs`); the backends open connections, run
//! transactions and apply their versioned migrations (`migrations.rs`). The few statements
//! whose text differs between the dialects pick it in one place each (`Dialect::pick`).
//!
//! The database holds no secret: a copy of it cannot sign an acknowledgement a device accepts
//! (that takes the hub key, kept in its own file) nor a request the hub accepts (that takes a
//! device key, which never leaves the device).

mod location;
mod migrations;
mod postgres;
pub(crate) mod sql;
mod sqlite;
#[macro_use]
mod web;
mod heads;

use std::cell::RefCell;
use std::path::Path;
use std::time::Duration;

use dermedge_queue::Gap;
use dermedge_record::{now_ms, DevicePublic, EmbeddingType, Record, StoredEmbedding};
use rusqlite::Connection;

pub use heads::{Draft, LabelledEmbedding, NewHead, Publication, StoredHead};
pub use location::{is_postgres_url, Location, PostgresUrl};
use sql::{args, Dialect, Fail, Failure, Row, Sql, SqlError};
pub use web::{
    DeviceHealth, GapTotal, Label, LoginOutcome, RecordFilter, RecordPage, RecordSummary,
    SessionPolicy, User, FAILURES_BEFORE_LOCK, FIRST_LOCK_MS, MAX_LOCK_MS,
};

use crate::HubError;

/// The newest schema migration this dermedge knows (`schema_migrations.version`).
pub const SCHEMA_VERSION: i64 = 3;

/// The newest rejections kept; older ones are deleted as new ones are logged.
pub const MAX_REJECTIONS: i64 = 10_000;

/// Attempts of a transaction that lost a race to another (PostgreSQL: a serialization failure,
/// a deadlock, a device enrolled meanwhile).
const MAX_ATTEMPTS: u32 = 5;

/// A batch whose signature was verified and whose records were opened, ready to store.
#[derive(Clone, Copy)]
pub struct VerifiedBatch<'a> {
    pub device_id: &'a str,
    pub public: &'a DevicePublic,
    pub counter: u64,
    pub after_seq: u64,
    pub records: &'a [(u64, Record)],
    pub gaps: &'a [Gap],
    /// Records that opened but that the hub will not store ([`crate::validate`]), with why:
    /// kept as the device's losses.
    pub refused: &'a [(u64, String)],
    /// Keep `source` as written instead of its file name alone.
    pub keep_source_paths: bool,
    /// What the device reported still queued besides this batch.
    pub queued_after: Option<u64>,
}

/// A device as the hub knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `None`: enrolled under the shared-key scheme; it must be enrolled again.
    pub public: Option<DevicePublic>,
    pub last_counter: u64,
    pub highest_seq: u64,
    pub epoch: u64,
    pub revoked_at_ms: Option<i64>,
}

/// What [`Store::enroll`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolled {
    /// A device id the hub did not know.
    New,
    /// The same key again: nothing changed.
    Unchanged,
    /// Another key under a known id (a replacement device): its counter and sequence start
    /// again in a new `epoch`; earlier records keep theirs.
    Replaced { epoch: u64 },
    /// The first public key of a device enrolled under the shared-key scheme: the same device,
    /// upgraded, whose queue and counter continue (epoch, counter and sequence are kept).
    Migrated,
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Ok {
        stored: u32,
        duplicates: u32,
        /// Gaps new to the hub (a gap sent again is stored once).
        gaps: u32,
        highest_seq: u64,
    },
    /// The request counter is not above the last one seen: a replay.
    Replayed { last_counter: u64 },
    /// The batch follows records the hub does not have.
    Behind { highest_seq: u64 },
    /// The device was revoked or enrolled with another key after the request was verified.
    KeyChanged,
}

/// Per device, for `dermedge hub status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSummary {
    pub device_id: String,
    pub epoch: u64,
    pub highest_seq: u64,
    pub records: u64,
    pub gaps: u64,
    pub revoked: bool,
    /// Enrolled under the shared-key scheme: must be enrolled again.
    pub needs_enrollment: bool,
}

/// A stored record's columns, for [`crate::export`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub record_id: String,
    pub device_id: String,
    pub epoch: i64,
    pub seq: i64,
    pub captured_at_ms: i64,
    pub model_id: String,
    pub precision: String,
    pub source: Option<String>,
    pub heads_json: String,
    pub quality_json: Option<String>,
    pub embedding_dtype: String,
    pub embedding_dim: u32,
    pub embedding: Vec<u8>,
}

impl StoredRecord {
    /// The embedding as the record carried it.
    pub fn stored_embedding(&self) -> StoredEmbedding {
        stored_embedding(
            &self.embedding_dtype,
            self.embedding_dim,
            self.embedding.clone(),
        )
    }
}

/// An embedding from its stored columns (`embedding_dtype` is `f16` or `f32`).
fn stored_embedding(dtype: &str, dim: u32, data: Vec<u8>) -> StoredEmbedding {
    StoredEmbedding {
        dtype: if dtype == "f16" {
            EmbeddingType::F16
        } else {
            EmbeddingType::F32
        },
        dim,
        data,
    }
}

/// A loss a device reported (or a record the hub refused, kept as one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGap {
    pub device_id: String,
    pub epoch: i64,
    pub from: i64,
    pub to: i64,
    pub reason: String,
    pub at_ms: i64,
}

/// One entry of the rejections log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub at_ms: i64,
    pub remote: Option<String>,
    pub device_id: Option<String>,
    pub status: i64,
    pub reason: String,
}

/// An open database: one connection.
pub struct Store {
    location: Location,
    backend: Backend,
}

enum Backend {
    Sqlite(Connection),
    /// The client's calls take `&mut`; the store's take `&self`, one at a time (a `Store` is
    /// used by one thread at a time).
    Postgres(Box<RefCell<postgres::Postgres>>),
}

macro_rules! select_device {
    () => {
        "SELECT public_key, last_counter, highest_seq, epoch, revoked_at_ms
         FROM devices WHERE device_id = ?1"
    };
}

/// A device's row.
const DEVICE: &str = select_device!();
/// A device's row, locked until the transaction ends: every transaction that changes a device
/// takes this lock first (PostgreSQL; an SQLite transaction that writes is the only writer).
const DEVICE_LOCKED: &str = concat!(select_device!(), " FOR UPDATE");

const INSERT_GAP: &str = "INSERT INTO gaps
         (device_id, epoch, from_seq, to_seq, reason, at_ms, received_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
     ON CONFLICT DO NOTHING";

const INSERT_RECORD: &str = "INSERT INTO records (record_id, device_id, epoch, seq,
         captured_at_ms, model_id, precision, embedding_dtype, embedding_dim, embedding,
         heads_json, quality_json, source, thumbnail_jpeg, record_cbor, received_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)";

impl Store {
    /// Open (creating, owner-only) the SQLite database at `path`, migrating an older schema.
    pub fn open(path: &Path) -> Result<Self, HubError> {
        Self::connect(&Location::from(path))
    }

    /// Open the database at `location`, creating it (an SQLite file, or the schema in an empty
    /// PostgreSQL database) if need be, and apply the migrations it lacks.
    pub fn connect(location: &Location) -> Result<Self, HubError> {
        Self::connect_with(location, true)
    }

    /// Open a hub database that exists: a missing SQLite file, or a PostgreSQL database
    /// without the hub's schema, is an error (for `hub status`, `revoke`, `export`).
    pub fn connect_existing(location: &Location) -> Result<Self, HubError> {
        if let Location::Sqlite(path) = location {
            if !path.is_file() {
                return Err(HubError::Database {
                    db: location.to_string(),
                    message: "no hub database here".into(),
                });
            }
        }
        Self::connect_with(location, false)
    }

    fn connect_with(location: &Location, create: bool) -> Result<Self, HubError> {
        let backend = match location {
            Location::Sqlite(path) => Backend::Sqlite(sqlite::open(path)?),
            Location::Postgres(url) => Backend::Postgres(Box::new(RefCell::new(
                postgres::Postgres::connect(url, create)?,
            ))),
        };
        Ok(Self {
            location: location.clone(),
            backend,
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Whether the connection is lost for good (PostgreSQL: the server went away); a pool
    /// drops such a store.
    pub fn is_broken(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(_) => false,
            Backend::Postgres(pg) => pg.borrow().is_closed(),
        }
    }

    /// The SQLite connection, for tools that read the file's tables directly.
    ///
    /// # Panics
    ///
    /// On a PostgreSQL store.
    pub fn connection(&self) -> &Connection {
        match &self.backend {
            Backend::Sqlite(conn) => conn,
            Backend::Postgres(_) => panic!(
                "{}: Store::connection is for SQLite databases; this one is PostgreSQL",
                self.location
            ),
        }
    }

    fn database(&self, e: SqlError) -> HubError {
        HubError::Database {
            db: self.location.to_string(),
            message: e.message,
        }
    }

    /// Run `work` outside a transaction (each statement commits by itself).
    fn autocommit<R>(
        &self,
        work: impl FnOnce(&mut dyn Sql) -> Result<R, SqlError>,
    ) -> Result<R, HubError> {
        let result = match &self.backend {
            Backend::Sqlite(conn) => work(&mut sqlite::SqliteSql(conn)),
            Backend::Postgres(pg) => pg.borrow_mut().autocommit(work),
        };
        result.map_err(|e| self.database(e))
    }

    /// Run `work` in one transaction, committed when it succeeds and rolled back when it fails;
    /// run again (a few times) when it lost a race to another transaction.
    fn transaction<R>(
        &self,
        mut work: impl FnMut(&mut dyn Sql) -> Result<R, Fail>,
    ) -> Result<R, HubError> {
        let mut attempt = 1;
        loop {
            let result = match &self.backend {
                Backend::Sqlite(conn) => sqlite::transaction(conn, &mut work),
                Backend::Postgres(pg) => pg.borrow_mut().transaction(&mut work),
            };
            match result {
                Ok(r) => return Ok(r),
                Err(Fail::Sql(e)) if e.failure == Failure::Retry && attempt < MAX_ATTEMPTS => {
                    log::debug!("{}: transaction {attempt} lost a race: {e}", self.location);
                    std::thread::sleep(Duration::from_millis(5 << attempt));
                    attempt += 1;
                }
                Err(Fail::Sql(e)) => return Err(self.database(e)),
                Err(Fail::Hub(e)) => return Err(e),
            }
        }
    }

    /// Rows of a statement (SQLite placeholders; see [`sql`]), for tests that look at tables
    /// the store has no method for.
    #[cfg(test)]
    pub(crate) fn query(&self, sql: &str, args: &[sql::Arg<'_>]) -> Result<Vec<Row>, HubError> {
        self.autocommit(|s| s.query(sql, args))
    }

    /// Run one statement by itself (tests that change a database behind the store's back).
    #[cfg(test)]
    pub(crate) fn execute(&self, sql: &str, args: &[sql::Arg<'_>]) -> Result<u64, HubError> {
        self.autocommit(|s| s.execute(sql, args))
    }

    /// Register a device by its public key. The same key again changes nothing; another key
    /// under a known id (a replacement device) replaces it, lifts a revocation, and starts a new
    /// epoch: counter and sequence from 0, earlier records kept under their epoch. A revoked
    /// key cannot be enrolled again.
    pub fn enroll(&self, device_id: &str, public: &DevicePublic) -> Result<Enrolled, HubError> {
        if device_id.is_empty() || device_id.len() > 128 || device_id.chars().any(char::is_control)
        {
            return Err(HubError::BadRequest(format!(
                "device id {device_id:?}: expected 1 to 128 printable characters"
            )));
        }
        let outcome = self.transaction(|sql| enroll_in(sql, device_id, public))?;
        match outcome {
            Enrolled::New => log::info!("enrolled device {device_id}: {public}"),
            Enrolled::Unchanged => log::info!("device {device_id} is already enrolled with {public}"),
            Enrolled::Migrated => log::info!(
                "device {device_id}: enrolled with {public} after the migration; its sequence continues"
            ),
            Enrolled::Replaced { epoch } => log::warn!(
                "device {device_id}: key replaced by {public}; its sequence starts again in epoch {epoch}"
            ),
        }
        Ok(outcome)
    }

    /// Refuse every further request from `device_id` (its records stay). Revoking a revoked
    /// device changes nothing.
    pub fn revoke(&self, device_id: &str) -> Result<(), HubError> {
        let changed = self.autocommit(|sql| {
            sql.execute(
                "UPDATE devices SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE device_id = ?1",
                &args![device_id, now_ms()],
            )
        })?;
        if changed == 0 {
            return Err(HubError::BadRequest(format!(
                "no device {device_id:?} is enrolled in {}",
                self.location
            )));
        }
        log::warn!("device {device_id} revoked");
        Ok(())
    }

    pub fn device(&self, device_id: &str) -> Result<Option<Device>, HubError> {
        self.autocommit(|sql| read_device(sql, device_id, false))
    }

    pub fn log_rejection(
        &self,
        remote: Option<&str>,
        device: Option<&str>,
        status: u16,
        reason: &str,
    ) {
        let prune = |sql: &mut dyn Sql| {
            sql.dialect().pick(
                "DELETE FROM rejections WHERE rowid <= (SELECT MAX(rowid) FROM rejections) - ?1",
                "DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?1",
            )
        };
        let logged = self.autocommit(|sql| {
            sql.execute(
                "INSERT INTO rejections (at_ms, remote, device_id, status, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                &args![now_ms(), remote, device, i64::from(status), reason],
            )?;
            let prune = prune(sql);
            sql.execute(prune, &args![MAX_REJECTIONS])
        });
        if let Err(e) = logged {
            log::error!("cannot log a rejection: {e}");
        }
    }

    /// The rejections log, oldest first.
    pub fn rejections(&self) -> Result<Vec<Rejection>, HubError> {
        self.autocommit(|sql| {
            let statement = sql.dialect().pick(
                "SELECT at_ms, remote, device_id, status, reason FROM rejections ORDER BY rowid",
                "SELECT at_ms, remote, device_id, status, reason FROM rejections ORDER BY id",
            );
            sql.query(statement, &[])?
                .iter()
                .map(|r| {
                    Ok(Rejection {
                        at_ms: r.int(0)?,
                        remote: r.opt_text(1)?,
                        device_id: r.opt_text(2)?,
                        status: r.int(3)?,
                        reason: r.text(4)?,
                    })
                })
                .collect()
        })
    }

    /// Store a batch atomically: the key and counter checks, every record and gap, and the new
    /// counter commit together, so a hub killed mid-batch has stored all of it or none. Records
    /// and gaps are taken in sequence order; the hub's highest sequence advances over a gap as
    /// over a record, so a record inside a reported gap is out of order. The device's row is
    /// locked for the transaction, so that hubs sharing a database store one device's batches
    /// one after another.
    pub fn store_batch(&self, batch: &VerifiedBatch<'_>) -> Result<Stored, HubError> {
        self.transaction(|sql| store_in(sql, batch))
    }

    pub fn record_count(&self) -> Result<u64, HubError> {
        self.autocommit(|sql| {
            sql.query_one("SELECT COUNT(*) FROM records", &[])?
                .int(0)
                .map(|n| n as u64)
        })
    }

    /// The hub's totals for `/v1/health`: records, reported losses and devices, in one query.
    pub fn totals(&self) -> Result<(u64, u64, u64), HubError> {
        self.autocommit(|sql| {
            let row = sql.query_one(
                "SELECT (SELECT COUNT(*) FROM records), (SELECT COUNT(*) FROM gaps),
                        (SELECT COUNT(*) FROM devices)",
                &[],
            )?;
            Ok((row.int(0)? as u64, row.int(1)? as u64, row.int(2)? as u64))
        })
    }

    /// Every device with its record and gap counts (all epochs), by device id.
    pub fn summaries(&self) -> Result<Vec<DeviceSummary>, HubError> {
        self.autocommit(|sql| {
            sql.query(
                "SELECT d.device_id, d.epoch, d.highest_seq, d.revoked_at_ms IS NOT NULL,
                        d.public_key IS NULL,
                        (SELECT COUNT(*) FROM records r WHERE r.device_id = d.device_id),
                        (SELECT COUNT(*) FROM gaps g WHERE g.device_id = d.device_id)
                 FROM devices d ORDER BY d.device_id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(DeviceSummary {
                    device_id: r.text(0)?,
                    epoch: r.int(1)? as u64,
                    highest_seq: r.int(2)? as u64,
                    revoked: r.bool(3)?,
                    needs_enrollment: r.bool(4)?,
                    records: r.int(5)? as u64,
                    gaps: r.int(6)? as u64,
                })
            })
            .collect()
        })
    }

    /// The stored records of `device` (all when `None`) and `model` (all when `None`), in each
    /// device's sequence order per epoch. (`COALESCE` rather than `?1 IS NULL OR …`: PostgreSQL
    /// must be able to tell each parameter's type.)
    pub fn records(
        &self,
        device: Option<&str>,
        model: Option<&str>,
    ) -> Result<Vec<StoredRecord>, HubError> {
        self.autocommit(|sql| {
            sql.query(
                "SELECT record_id, device_id, epoch, seq, captured_at_ms, model_id, precision,
                        source, heads_json, quality_json, embedding_dtype, embedding_dim, embedding
                 FROM records
                 WHERE device_id = COALESCE(?1, device_id) AND model_id = COALESCE(?2, model_id)
                 ORDER BY device_id, epoch, seq",
                &args![device, model],
            )?
            .iter()
            .map(stored_record)
            .collect()
        })
    }

    /// The losses of `device` (all when `None`), in sequence order.
    pub fn gaps(&self, device: Option<&str>) -> Result<Vec<StoredGap>, HubError> {
        self.autocommit(|sql| {
            sql.query(
                "SELECT device_id, epoch, from_seq, to_seq, reason, at_ms FROM gaps
                 WHERE device_id = COALESCE(?1, device_id)
                 ORDER BY device_id, epoch, from_seq, to_seq",
                &args![device],
            )?
            .iter()
            .map(|r| {
                Ok(StoredGap {
                    device_id: r.text(0)?,
                    epoch: r.int(1)?,
                    from: r.int(2)?,
                    to: r.int(3)?,
                    reason: r.text(4)?,
                    at_ms: r.int(5)?,
                })
            })
            .collect()
        })
    }
}

fn stored_record(r: &Row) -> Result<StoredRecord, SqlError> {
    let dim = r.int(11)?;
    Ok(StoredRecord {
        record_id: r.text(0)?,
        device_id: r.text(1)?,
        epoch: r.int(2)?,
        seq: r.int(3)?,
        captured_at_ms: r.int(4)?,
        model_id: r.text(5)?,
        precision: r.text(6)?,
        source: r.opt_text(7)?,
        heads_json: r.text(8)?,
        quality_json: r.opt_text(9)?,
        embedding_dtype: r.text(10)?,
        embedding_dim: u32::try_from(dim)
            .map_err(|_| SqlError::other(format!("embedding dimension {dim} out of range")))?,
        embedding: r.blob(12)?,
    })
}

/// The device's row; `lock`: held until the transaction ends (see [`DEVICE_LOCKED`]).
fn read_device(sql: &mut dyn Sql, device_id: &str, lock: bool) -> Result<Option<Device>, SqlError> {
    let statement = match (sql.dialect(), lock) {
        (Dialect::Postgres, true) => DEVICE_LOCKED,
        _ => DEVICE,
    };
    let Some(row) = sql.query_opt(statement, &args![device_id])? else {
        return Ok(None);
    };
    let public = row
        .opt_blob(0)?
        .map(|k| {
            <[u8; 32]>::try_from(k.as_slice())
                .map(DevicePublic)
                .map_err(|_| {
                    SqlError::other(format!(
                        "device {device_id}: stored public key is not 32 bytes"
                    ))
                })
        })
        .transpose()?;
    Ok(Some(Device {
        public,
        last_counter: row.int(1)? as u64,
        highest_seq: row.int(2)? as u64,
        epoch: row.int(3)? as u64,
        revoked_at_ms: row.opt_int(4)?,
    }))
}

/// [`Store::enroll`] inside its transaction.
fn enroll_in(sql: &mut dyn Sql, device_id: &str, public: &DevicePublic) -> Result<Enrolled, Fail> {
    let key = &public.0[..];
    match read_device(sql, device_id, true)? {
        None => {
            let inserted = sql.execute(
                "INSERT INTO devices (device_id, public_key, enrolled_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device_id) DO NOTHING",
                &args![device_id, key, now_ms()],
            )?;
            if inserted == 0 {
                // Another hub enrolled it since the lookup: look again.
                return Err(
                    SqlError::retry(format!("device {device_id} enrolled meanwhile")).into(),
                );
            }
            Ok(Enrolled::New)
        }
        Some(d) if d.public == Some(*public) => match d.revoked_at_ms {
            Some(at) => Err(HubError::BadRequest(format!(
                "device {device_id}: this key was revoked (at {at} ms); enroll the device's new key"
            ))
            .into()),
            None => Ok(Enrolled::Unchanged),
        },
        Some(d) if d.public.is_none() => {
            sql.execute(
                "UPDATE devices SET public_key = ?2, enrolled_at_ms = ?3 WHERE device_id = ?1",
                &args![device_id, key, now_ms()],
            )?;
            Ok(Enrolled::Migrated)
        }
        Some(d) => {
            let epoch = d.epoch + 1;
            sql.execute(
                "UPDATE devices SET public_key = ?2, last_counter = 0, highest_seq = 0,
                     epoch = ?3, enrolled_at_ms = ?4, revoked_at_ms = NULL
                 WHERE device_id = ?1",
                &args![device_id, key, epoch as i64, now_ms()],
            )?;
            Ok(Enrolled::Replaced { epoch })
        }
    }
}

/// One piece of a batch, in sequence order.
enum Item<'a> {
    Record(u64, &'a Record),
    Gap(&'a Gap),
    Refused(u64, &'a str),
}

/// The batch's records, gaps and refusals by where they start; a gap and a record starting at
/// the same number keep the batch's order (the sort is stable).
fn items<'a>(batch: &VerifiedBatch<'a>) -> Vec<(u64, Item<'a>)> {
    let mut items: Vec<(u64, Item)> = batch
        .records
        .iter()
        .map(|(seq, r)| (*seq, Item::Record(*seq, r)))
        .chain(batch.gaps.iter().map(|g| (g.from, Item::Gap(g))))
        .chain(
            batch
                .refused
                .iter()
                .map(|(seq, why)| (*seq, Item::Refused(*seq, why))),
        )
        .collect();
    items.sort_by_key(|(at, _)| *at);
    items
}

/// What storing the batch's items has done so far.
struct Progress {
    epoch: u64,
    highest: u64,
    stored: u32,
    duplicates: u32,
    new_gaps: u32,
    received: i64,
}

/// [`Store::store_batch`] inside its transaction.
fn store_in(sql: &mut dyn Sql, batch: &VerifiedBatch<'_>) -> Result<Stored, Fail> {
    let Some(known) = read_device(sql, batch.device_id, true)? else {
        return Ok(Stored::KeyChanged);
    };
    if known.public != Some(*batch.public) || known.revoked_at_ms.is_some() {
        return Ok(Stored::KeyChanged);
    }
    if batch.counter <= known.last_counter {
        return Ok(Stored::Replayed {
            last_counter: known.last_counter,
        });
    }
    if batch.after_seq > known.highest_seq {
        return Ok(Stored::Behind {
            highest_seq: known.highest_seq,
        });
    }
    let mut progress = Progress {
        epoch: known.epoch,
        highest: known.highest_seq,
        stored: 0,
        duplicates: 0,
        new_gaps: 0,
        received: now_ms(),
    };
    for (_, item) in items(batch) {
        match item {
            Item::Gap(gap) => store_gap(sql, batch.device_id, gap, &mut progress)?,
            Item::Refused(seq, why) => {
                store_refusal(sql, batch.device_id, seq, why, &mut progress)?
            }
            Item::Record(seq, record) => store_record(sql, batch, seq, record, &mut progress)?,
        }
    }
    sql.execute(
        "UPDATE devices SET last_counter = ?2, highest_seq = ?3, last_batch_at_ms = ?4,
                            queue_depth = COALESCE(?5, queue_depth)
         WHERE device_id = ?1",
        &args![
            batch.device_id,
            batch.counter as i64,
            progress.highest as i64,
            progress.received,
            batch.queued_after.map(|n| n.min(i64::MAX as u64) as i64)
        ],
    )?;
    Ok(Stored::Ok {
        stored: progress.stored,
        duplicates: progress.duplicates,
        gaps: progress.new_gaps,
        highest_seq: progress.highest,
    })
}

/// A reported loss; one sent again is stored once.
fn store_gap(sql: &mut dyn Sql, device_id: &str, gap: &Gap, p: &mut Progress) -> Result<(), Fail> {
    let reason = gap.reason.to_string();
    p.new_gaps += sql.execute(
        INSERT_GAP,
        &args![
            device_id,
            p.epoch as i64,
            gap.from as i64,
            gap.to as i64,
            &reason,
            gap.at_ms,
            p.received
        ],
    )? as u32;
    p.highest = p.highest.max(gap.to);
    Ok(())
}

/// A record the hub will not store: kept as this device's loss, with the reason, so that the
/// device's queue moves on and the loss is visible.
fn store_refusal(
    sql: &mut dyn Sql,
    device_id: &str,
    seq: u64,
    why: &str,
    p: &mut Progress,
) -> Result<(), Fail> {
    if seq <= p.highest {
        // Sent again after a lost ack: refused then, or stored by a hub that checked less when
        // it first came.
        if refused_at(sql, device_id, p.epoch, seq)?
            || record_at(sql, device_id, p.epoch, seq)?.is_some()
        {
            p.duplicates += 1;
            return Ok(());
        }
        return Err(HubError::BadRequest(format!(
            "record {seq} of {device_id} arrives after {}: out of order",
            p.highest
        ))
        .into());
    }
    let reason = format!("refused: {why}");
    p.new_gaps += sql.execute(
        INSERT_GAP,
        &args![
            device_id,
            p.epoch as i64,
            seq as i64,
            seq as i64,
            &reason,
            p.received,
            p.received
        ],
    )? as u32;
    p.highest = seq;
    Ok(())
}

/// A record: stored, or counted as a duplicate when the hub holds it at this position already.
fn store_record(
    sql: &mut dyn Sql,
    batch: &VerifiedBatch<'_>,
    seq: u64,
    record: &Record,
    p: &mut Progress,
) -> Result<(), Fail> {
    let device_id = batch.device_id;
    if record.device_id != device_id {
        return Err(HubError::BadRequest(format!(
            "record {seq} names device {}, the request is from {device_id}",
            record.device_id
        ))
        .into());
    }
    match record_at(sql, device_id, p.epoch, seq)? {
        Some(id) if id == record.id => {
            p.duplicates += 1;
            return Ok(());
        }
        Some(id) => {
            return Err(HubError::BadRequest(format!(
                "record {seq} of {device_id} is {}, but the hub holds {id} there",
                record.id
            ))
            .into())
        }
        // Refused when it first came (the hub checks more than the one that stored nothing
        // there): the same loss, sent again.
        None if seq <= p.highest && refused_at(sql, device_id, p.epoch, seq)? => {
            p.duplicates += 1;
            return Ok(());
        }
        None if seq <= p.highest => {
            return Err(HubError::BadRequest(format!(
                "record {seq} of {device_id} arrives after {} (a record or a reported gap): \
                 out of order",
                p.highest
            ))
            .into())
        }
        None => {}
    }
    insert_record(sql, batch, seq, record, p)?;
    p.highest = seq;
    p.stored += 1;
    Ok(())
}

fn insert_record(
    sql: &mut dyn Sql,
    batch: &VerifiedBatch<'_>,
    seq: u64,
    record: &Record,
    p: &Progress,
) -> Result<(), Fail> {
    let heads = serde_json::to_string(&record.heads).expect("serialisable");
    let quality = record
        .quality
        .as_ref()
        .map(|q| serde_json::to_string(q).expect("serialisable"));
    let dtype = serde_json::to_value(record.embedding.dtype)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let source = crate::validate::stored_source(record.source.as_deref(), batch.keep_source_paths);
    let cbor = record.to_cbor();
    let inserted = sql.execute(
        INSERT_RECORD,
        &args![
            &record.id,
            batch.device_id,
            p.epoch as i64,
            seq as i64,
            record.captured_at_ms,
            &record.model_id,
            record.precision.as_str(),
            &dtype,
            i64::from(record.embedding.dim),
            &record.embedding.data,
            &heads,
            quality.as_ref(),
            source.as_ref(),
            record.thumbnail_jpeg.as_ref(),
            &cbor,
            p.received
        ],
    );
    match inserted {
        Ok(_) => Ok(insert_record_heads(sql, &record.id, &record.heads)?),
        Err(e) if e.failure == Failure::Constraint => Err(HubError::BadRequest(format!(
            "record id {} is already stored for another device or position",
            record.id
        ))
        .into()),
        Err(e) => Err(e.into()),
    }
}

/// The class with the highest probability of `head` (the last of equals, as the export says),
/// if any.
pub(crate) fn top_class(head: &dermedge_record::HeadResult) -> Option<(&str, f32)> {
    let mut best: Option<(usize, f32)> = None;
    for (i, p) in head.probabilities.iter().enumerate() {
        if best.is_none_or(|(_, b)| *p >= b) {
            best = Some((i, *p));
        }
    }
    best.and_then(|(i, p)| head.classes.get(i).map(|c| (c.as_str(), p)))
}

/// A record's heads with their top class, for the page's filter by head result (a head named
/// twice counts once, the first).
fn insert_record_heads(
    sql: &mut dyn Sql,
    record_id: &str,
    heads: &[dermedge_record::HeadResult],
) -> Result<(), SqlError> {
    for head in heads {
        if let Some((class, _)) = top_class(head) {
            sql.execute(
                "INSERT INTO record_heads (record_id, head, top_class) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
                &args![record_id, &head.head, class],
            )?;
        }
    }
    Ok(())
}

/// The id of the record stored at `seq` of this device and epoch, if any.
fn record_at(
    sql: &mut dyn Sql,
    device_id: &str,
    epoch: u64,
    seq: u64,
) -> Result<Option<String>, SqlError> {
    sql.query_opt(
        "SELECT record_id FROM records WHERE device_id = ?1 AND epoch = ?2 AND seq = ?3",
        &args![device_id, epoch as i64, seq as i64],
    )?
    .map(|r| r.text(0))
    .transpose()
}

/// Whether the hub kept `seq` of this device and epoch as a refused record.
fn refused_at(sql: &mut dyn Sql, device_id: &str, epoch: u64, seq: u64) -> Result<bool, SqlError> {
    sql.query_one(
        "SELECT EXISTS (SELECT 1 FROM gaps WHERE device_id = ?1 AND epoch = ?2
             AND from_seq = ?3 AND to_seq = ?3 AND reason LIKE 'refused: %')",
        &args![device_id, epoch as i64, seq as i64],
    )?
    .bool(0)
}
