//! The hub's SQLite database (WAL): enrolled devices (public keys only), records (unique by record
//! id, in each device's sequence order per enrollment epoch), the losses devices reported, and a
//! bounded log of rejected requests.
//!
//! The database holds no secret: a copy of it cannot sign an acknowledgement a device accepts
//! (that takes the hub key, kept in its own file) nor a request the hub accepts (that takes a
//! device key, which never leaves the device). The file and its `-wal`/`-shm` companions are
//! readable by their owner only: the records are medical.

use std::path::{Path, PathBuf};

use dermedge_queue::{now_ms, DevicePublic, Gap, Record};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::HubError;

/// `PRAGMA user_version` of the current schema. 0 is a new, empty database or one written before
/// versioning (schema 1: devices with a shared `sync_key`).
pub const SCHEMA_VERSION: i64 = 2;

/// The newest rejections kept; older ones are deleted as new ones are logged.
pub const MAX_REJECTIONS: i64 = 10_000;

const DEVICES: &str = "
CREATE TABLE devices (
    device_id      TEXT PRIMARY KEY,
    -- Ed25519 public key; NULL for a device enrolled under the shared-key scheme (re-enroll).
    public_key     BLOB,
    last_counter   INTEGER NOT NULL DEFAULT 0,
    highest_seq    INTEGER NOT NULL DEFAULT 0,
    -- Rises each time another key (a replacement device) is enrolled under this id.
    epoch          INTEGER NOT NULL DEFAULT 1,
    enrolled_at_ms INTEGER NOT NULL,
    revoked_at_ms  INTEGER
);";

const RECORDS: &str = "
CREATE TABLE records (
    row             INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id       TEXT NOT NULL UNIQUE,
    device_id       TEXT NOT NULL REFERENCES devices(device_id),
    epoch           INTEGER NOT NULL,
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
    UNIQUE (device_id, epoch, seq)
);";

const GAPS: &str = "
CREATE TABLE gaps (
    device_id      TEXT NOT NULL REFERENCES devices(device_id),
    epoch          INTEGER NOT NULL,
    from_seq       INTEGER NOT NULL,
    to_seq         INTEGER NOT NULL,
    reason         TEXT NOT NULL,
    at_ms          INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    UNIQUE (device_id, epoch, from_seq, to_seq, reason)
);";

const REJECTIONS: &str = "
CREATE TABLE IF NOT EXISTS rejections (
    at_ms     INTEGER NOT NULL,
    remote    TEXT,
    device_id TEXT,
    status    INTEGER NOT NULL,
    reason    TEXT NOT NULL
);";

const RECORD_COLUMNS: &str =
    "row, record_id, device_id, seq, captured_at_ms, model_id, precision, \
     embedding_dtype, embedding_dim, embedding, heads_json, quality_json, source, thumbnail_jpeg, \
     record_cbor, received_at_ms";

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
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
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

pub(crate) fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> HubError + '_ {
    move |e| HubError::Database {
        path: path.into(),
        message: e.to_string(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.into(),
        source,
    }
}

/// `<db>-wal` and `<db>-shm`.
fn companions(path: &Path) -> [PathBuf; 2] {
    ["-wal", "-shm"].map(|suffix| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    })
}

/// Restrict `path` to its owner if anyone else may read or write it.
fn make_private(path: &Path) -> Result<(), HubError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700 | 0o600))
            .map_err(io_err(path))?;
    }
    Ok(())
}

impl Store {
    /// Open (creating, owner-only) the database at `path`, migrating an older schema.
    pub fn open(path: &Path) -> Result<Self, HubError> {
        let err = db_err(path);
        // Created here, owner-only, before SQLite sees it: SQLite gives the -wal and -shm files
        // the database file's mode.
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(_) => log::info!("{}: new hub database", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(path)(e)),
        }
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
        // Whatever mode an earlier release or an operator left, the records are medical.
        make_private(path)?;
        for companion in companions(path) {
            make_private(&companion)?;
        }
        // Foreign keys stay off while the schema is migrated (tables are rebuilt under them).
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;")
            .map_err(&err)?;
        let mut store = Self {
            conn,
            path: path.into(),
        };
        store.migrate()?;
        store
            .conn
            .execute_batch("PRAGMA foreign_keys=ON;")
            .map_err(&err)?;
        Ok(store)
    }

    /// Bring the schema to [`SCHEMA_VERSION`] in one transaction (foreign keys are off until
    /// it is done, then checked).
    fn migrate(&mut self) -> Result<(), HubError> {
        let path = self.path.clone();
        let err = db_err(&path);
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(&err)?;
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        if version > SCHEMA_VERSION {
            return Err(HubError::Database {
                path: path.clone(),
                message: format!(
                    "schema version {version} is newer than this dermedge's ({SCHEMA_VERSION}): \
                     use a newer dermedge"
                ),
            });
        }
        // Deleted content (the shared keys of schema 1) is overwritten, not left in free pages.
        self.conn
            .execute_batch("PRAGMA secure_delete=ON;")
            .map_err(&err)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .map_err(&err)?;
        // Another connection may have migrated it meanwhile.
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(&err)?;
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        let has_devices: bool = tx
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'devices'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(&err)?
            > 0;
        if has_devices {
            // Schema 1: devices knew a shared sync key. It is dropped; the devices stay, with
            // their counters and records, but must be enrolled again with a public key.
            let devices = tx
                .query_row("SELECT COUNT(*) FROM devices", [], |r| r.get::<_, i64>(0))
                .map_err(&err)?;
            tx.execute_batch(&format!(
                "ALTER TABLE devices RENAME TO devices_v1;
                 {DEVICES}
                 INSERT INTO devices (device_id, public_key, last_counter, highest_seq, epoch,
                                      enrolled_at_ms, revoked_at_ms)
                     SELECT device_id, NULL, last_counter, highest_seq, 1, enrolled_at_ms, NULL
                     FROM devices_v1;
                 DROP TABLE devices_v1;
                 ALTER TABLE records RENAME TO records_v1;
                 {RECORDS}
                 INSERT INTO records ({RECORD_COLUMNS}, epoch)
                     SELECT {RECORD_COLUMNS}, 1 FROM records_v1;
                 DROP TABLE records_v1;
                 {GAPS}
                 {REJECTIONS}"
            ))
            .map_err(&err)?;
            log::warn!(
                "{}: migrated from schema 1; its {devices} devices were enrolled with the old \
                 shared-key scheme and must be enrolled again with their public keys",
                path.display()
            );
        } else {
            tx.execute_batch(&format!("{DEVICES}{RECORDS}{GAPS}{REJECTIONS}"))
                .map_err(&err)?;
        }
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))
            .map_err(&err)?;
        let broken: Option<String> = tx
            .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
            .optional()
            .map_err(&err)?;
        if let Some(table) = broken {
            return Err(HubError::Database {
                path: path.clone(),
                message: format!("cannot migrate: table {table} refers to missing devices"),
            });
        }
        tx.commit().map_err(&err)?;
        if has_devices {
            // Move the rewritten pages into the database file and empty the log.
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(&err)?;
        }
        self.conn
            .execute_batch("PRAGMA secure_delete=OFF;")
            .map_err(&err)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        let err = db_err(&self.path);
        let tx = self.conn.unchecked_transaction().map_err(&err)?;
        let known = device(&tx, &self.path, device_id)?;
        let outcome = match known {
            None => {
                tx.execute(
                    "INSERT INTO devices (device_id, public_key, enrolled_at_ms) VALUES (?1, ?2, ?3)",
                    params![device_id, public.0.to_vec(), now_ms()],
                )
                .map_err(&err)?;
                Enrolled::New
            }
            Some(d) if d.public == Some(*public) => {
                if let Some(at) = d.revoked_at_ms {
                    return Err(HubError::BadRequest(format!(
                        "device {device_id}: this key was revoked (at {at} ms); enroll the \
                         device's new key"
                    )));
                }
                Enrolled::Unchanged
            }
            Some(d) if d.public.is_none() => {
                tx.execute(
                    "UPDATE devices SET public_key = ?2, enrolled_at_ms = ?3 WHERE device_id = ?1",
                    params![device_id, public.0.to_vec(), now_ms()],
                )
                .map_err(&err)?;
                Enrolled::Migrated
            }
            Some(d) => {
                let epoch = d.epoch + 1;
                tx.execute(
                    "UPDATE devices SET public_key = ?2, last_counter = 0, highest_seq = 0,
                         epoch = ?3, enrolled_at_ms = ?4, revoked_at_ms = NULL
                     WHERE device_id = ?1",
                    params![device_id, public.0.to_vec(), epoch as i64, now_ms()],
                )
                .map_err(&err)?;
                Enrolled::Replaced { epoch }
            }
        };
        tx.commit().map_err(&err)?;
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
        let changed = self
            .conn
            .execute(
                "UPDATE devices SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE device_id = ?1",
                params![device_id, now_ms()],
            )
            .map_err(db_err(&self.path))?;
        if changed == 0 {
            return Err(HubError::BadRequest(format!(
                "no device {device_id:?} is enrolled in {}",
                self.path.display()
            )));
        }
        log::warn!("device {device_id} revoked");
        Ok(())
    }

    pub fn device(&self, device_id: &str) -> Result<Option<Device>, HubError> {
        device(&self.conn, &self.path, device_id)
    }

    pub fn log_rejection(
        &self,
        remote: Option<&str>,
        device: Option<&str>,
        status: u16,
        reason: &str,
    ) {
        let logged = self
            .conn
            .execute(
                "INSERT INTO rejections (at_ms, remote, device_id, status, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![now_ms(), remote, device, status, reason],
            )
            .and_then(|_| {
                self.conn.execute(
                    "DELETE FROM rejections WHERE rowid <= (SELECT MAX(rowid) FROM rejections) - ?1",
                    [MAX_REJECTIONS],
                )
            });
        if let Err(e) = logged {
            log::error!("{}: cannot log a rejection: {e}", self.path.display());
        }
    }

    /// Store a batch atomically: the key and counter checks, every record and gap, and the new
    /// counter commit together, so a hub killed mid-batch has stored all of it or none. Records
    /// and gaps are taken in sequence order; the hub's highest sequence advances over a gap as
    /// over a record, so a record inside a reported gap is out of order.
    pub fn store_batch(&mut self, batch: &VerifiedBatch<'_>) -> Result<Stored, HubError> {
        let VerifiedBatch {
            device_id,
            public,
            counter,
            after_seq,
            records,
            gaps,
            refused,
            keep_source_paths,
        } = *batch;
        let path = self.path.clone();
        let err = db_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let Some(known) = device(&tx, &path, device_id)? else {
            return Ok(Stored::KeyChanged);
        };
        if known.public != Some(*public) || known.revoked_at_ms.is_some() {
            return Ok(Stored::KeyChanged);
        }
        let (last_counter, mut highest, epoch) =
            (known.last_counter, known.highest_seq, known.epoch);
        if counter <= last_counter {
            return Ok(Stored::Replayed { last_counter });
        }
        if after_seq > highest {
            return Ok(Stored::Behind {
                highest_seq: highest,
            });
        }
        enum Item<'a> {
            Record(u64, &'a Record),
            Gap(&'a Gap),
            Refused(u64, &'a str),
        }
        let mut items: Vec<(u64, Item)> = records
            .iter()
            .map(|(seq, r)| (*seq, Item::Record(*seq, r)))
            .chain(gaps.iter().map(|g| (g.from, Item::Gap(g))))
            .chain(
                refused
                    .iter()
                    .map(|(seq, why)| (*seq, Item::Refused(*seq, why))),
            )
            .collect();
        // Stable: a gap and a record starting at the same number keep the batch's order.
        items.sort_by_key(|(at, _)| *at);
        let (mut stored, mut duplicates, mut new_gaps) = (0u32, 0u32, 0u32);
        let received = now_ms();
        for (_, item) in items {
            let (seq, record) = match item {
                Item::Gap(gap) => {
                    new_gaps += tx
                        .execute(
                            "INSERT OR IGNORE INTO gaps
                                 (device_id, epoch, from_seq, to_seq, reason, at_ms, received_at_ms)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            params![
                                device_id,
                                epoch as i64,
                                gap.from as i64,
                                gap.to as i64,
                                gap.reason.to_string(),
                                gap.at_ms,
                                received
                            ],
                        )
                        .map_err(&err)? as u32;
                    highest = highest.max(gap.to);
                    continue;
                }
                // A record the hub will not store: kept as this device's loss, with the reason,
                // so that the device's queue moves on and the loss is visible.
                Item::Refused(seq, why) => {
                    if seq <= highest {
                        // Sent again after a lost ack: refused then, or stored by a hub that
                        // checked less when it first came.
                        if refused_at(&tx, device_id, epoch, seq).map_err(&err)?
                            || record_at(&tx, device_id, epoch, seq)
                                .map_err(&err)?
                                .is_some()
                        {
                            duplicates += 1;
                            continue;
                        }
                        return Err(HubError::BadRequest(format!(
                            "record {seq} of {device_id} arrives after {highest}: out of order"
                        )));
                    }
                    new_gaps += tx
                        .execute(
                            "INSERT OR IGNORE INTO gaps
                                 (device_id, epoch, from_seq, to_seq, reason, at_ms, received_at_ms)
                             VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?5)",
                            params![
                                device_id,
                                epoch as i64,
                                seq as i64,
                                format!("refused: {why}"),
                                received
                            ],
                        )
                        .map_err(&err)? as u32;
                    highest = seq;
                    continue;
                }
                Item::Record(seq, record) => (seq, record),
            };
            if record.device_id != device_id {
                return Err(HubError::BadRequest(format!(
                    "record {seq} names device {}, the request is from {device_id}",
                    record.device_id
                )));
            }
            match record_at(&tx, device_id, epoch, seq).map_err(&err)? {
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
                // Refused when it first came (the hub checks more than the one that stored
                // nothing there): the same loss, sent again.
                None if seq <= highest
                    && refused_at(&tx, device_id, epoch, seq).map_err(&err)? =>
                {
                    duplicates += 1;
                    continue;
                }
                None if seq <= highest => {
                    return Err(HubError::BadRequest(format!(
                        "record {seq} of {device_id} arrives after {highest} (a record or a \
                         reported gap): out of order"
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
                "INSERT INTO records (record_id, device_id, epoch, seq, captured_at_ms, model_id,
                     precision, embedding_dtype, embedding_dim, embedding, heads_json, quality_json,
                     source, thumbnail_jpeg, record_cbor, received_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    record.id,
                    device_id,
                    epoch as i64,
                    seq as i64,
                    record.captured_at_ms,
                    record.model_id,
                    record.precision,
                    dtype,
                    record.embedding.dim,
                    record.embedding.data,
                    heads,
                    quality,
                    crate::validate::stored_source(record.source.as_deref(), keep_source_paths),
                    record.thumbnail_jpeg,
                    record.to_cbor(),
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
            highest = seq;
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
            gaps: new_gaps,
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

    /// Every device with its record and gap counts (all epochs), by device id.
    pub fn summaries(&self) -> Result<Vec<DeviceSummary>, HubError> {
        let err = db_err(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT d.device_id, d.epoch, d.highest_seq, d.revoked_at_ms IS NOT NULL,
                        d.public_key IS NULL,
                        (SELECT COUNT(*) FROM records r WHERE r.device_id = d.device_id),
                        (SELECT COUNT(*) FROM gaps g WHERE g.device_id = d.device_id)
                 FROM devices d ORDER BY d.device_id",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(DeviceSummary {
                    device_id: r.get(0)?,
                    epoch: r.get::<_, i64>(1)? as u64,
                    highest_seq: r.get::<_, i64>(2)? as u64,
                    revoked: r.get(3)?,
                    needs_enrollment: r.get(4)?,
                    records: r.get::<_, i64>(5)? as u64,
                    gaps: r.get::<_, i64>(6)? as u64,
                })
            })
            .map_err(&err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(&err)?;
        Ok(rows)
    }
}

fn device(conn: &Connection, path: &Path, device_id: &str) -> Result<Option<Device>, HubError> {
    let row = conn
        .query_row(
            "SELECT public_key, last_counter, highest_seq, epoch, revoked_at_ms
             FROM devices WHERE device_id = ?1",
            [device_id],
            |r| {
                Ok((
                    r.get::<_, Option<Vec<u8>>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            },
        )
        .optional()
        .map_err(db_err(path))?;
    let Some((key, counter, seq, epoch, revoked)) = row else {
        return Ok(None);
    };
    let public = key
        .map(|k| {
            <[u8; 32]>::try_from(k.as_slice())
                .map(DevicePublic)
                .map_err(|_| HubError::Database {
                    path: path.into(),
                    message: format!("device {device_id}: stored public key is not 32 bytes"),
                })
        })
        .transpose()?;
    Ok(Some(Device {
        public,
        last_counter: counter as u64,
        highest_seq: seq as u64,
        epoch: epoch as u64,
        revoked_at_ms: revoked,
    }))
}

/// The id of the record stored at `seq` of this device and epoch, if any.
fn record_at(
    conn: &Connection,
    device_id: &str,
    epoch: u64,
    seq: u64,
) -> Result<Option<String>, rusqlite::Error> {
    conn.query_row(
        "SELECT record_id FROM records WHERE device_id = ?1 AND epoch = ?2 AND seq = ?3",
        params![device_id, epoch as i64, seq as i64],
        |r| r.get(0),
    )
    .optional()
}

/// Whether the hub kept `seq` of this device and epoch as a refused record.
fn refused_at(
    conn: &Connection,
    device_id: &str,
    epoch: u64,
    seq: u64,
) -> Result<bool, rusqlite::Error> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM gaps WHERE device_id = ?1 AND epoch = ?2
             AND from_seq = ?3 AND to_seq = ?3 AND reason LIKE 'refused: %')",
        params![device_id, epoch as i64, seq as i64],
        |r| r.get(0),
    )
}
