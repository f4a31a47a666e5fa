//! The SQLite backend (one clinic): a WAL database file readable by its owner only, its
//! migrations, and [`Sql`] over a `rusqlite` connection.
//!
//! The file and its `-wal`/`-shm` companions are readable by their owner only: the records are
//! medical.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::migrations::{self, Migration};
use super::sql::{Arg, Dialect, Failure, Row, Sql, SqlError, Value};
use crate::HubError;

/// The schema of migration 1, as dermedge wrote it before `schema_migrations` (then
/// `PRAGMA user_version` 2).
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

/// Migration 2, the web page: clinicians' accounts (Argon2id PHC strings) and sessions (the
/// SHA-256 of each token), labels (every one kept; the newest per record and head is the
/// current one), each record's heads with their top class (for the page's filter), and the time
/// of each device's last accepted batch.
const WEB: &str = "
ALTER TABLE devices ADD COLUMN last_batch_at_ms INTEGER;
CREATE INDEX records_by_capture ON records (captured_at_ms);
CREATE TABLE record_heads (
    record_id TEXT NOT NULL REFERENCES records(record_id),
    head      TEXT NOT NULL,
    top_class TEXT NOT NULL,
    PRIMARY KEY (record_id, head)
);
CREATE INDEX record_heads_by_class ON record_heads (head, top_class);
CREATE TABLE users (
    name            TEXT PRIMARY KEY,
    password_hash   TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    failed_logins   INTEGER NOT NULL DEFAULT 0,
    locked_until_ms INTEGER
);
CREATE TABLE sessions (
    token_hash    BLOB PRIMARY KEY,
    user_name     TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    created_at_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL
);
CREATE TABLE labels (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL REFERENCES records(record_id),
    head      TEXT,
    label     TEXT NOT NULL,
    author    TEXT NOT NULL,
    at_ms     INTEGER NOT NULL
);
CREATE INDEX labels_by_record ON labels (record_id, head, id);";

/// The SQLite schema's steps; [`super::migrations::postgres`] has the same versions.
pub fn migrations() -> Vec<Migration> {
    vec![
        Migration {
            version: 1,
            name: "devices, records, gaps, rejections",
            sql: format!("{DEVICES}{RECORDS}{GAPS}{REJECTIONS}"),
            backfill: None,
        },
        Migration {
            version: 2,
            name: migrations::NAME_2,
            sql: WEB.to_string(),
            backfill: Some(migrations::backfill_record_heads),
        },
        Migration {
            version: 3,
            name: super::heads::NAME_3,
            sql: super::heads::SQLITE.to_string(),
            backfill: None,
        },
    ]
}

/// `PRAGMA user_version` is kept at the schema version plus this, so that a dermedge from
/// before `schema_migrations` (which knew `user_version` 2 as its newest) opens a database of
/// migration 1 and refuses a newer one.
const USER_VERSION_OFFSET: i64 = 1;

/// The schema before public keys, with a shared sync key per device: `user_version` 0 with a
/// `devices` table.
const SHARED_KEY_SCHEMA: i64 = 0;

pub(crate) fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> HubError + '_ {
    move |e| HubError::Database {
        db: path.display().to_string(),
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

/// Create `path` owner-only if it is missing: SQLite gives the -wal and -shm files the database
/// file's mode.
fn create_private(path: &Path) -> Result<(), HubError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => log::info!("{}: new hub database", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    Ok(())
}

/// Open (creating, owner-only) the database at `path` in WAL mode and bring its schema up to
/// date.
pub fn open(path: &Path) -> Result<Connection, HubError> {
    let err = db_err(path);
    create_private(path)?;
    let conn = Connection::open(path).map_err(&err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(&err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| HubError::Database {
            db: path.display().to_string(),
            message: format!("not an SQLite database, or unreadable: {e}"),
        })?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(HubError::Database {
            db: path.display().to_string(),
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
    migrate(&conn, path)?;
    conn.execute_batch("PRAGMA foreign_keys=ON;")
        .map_err(&err)?;
    Ok(conn)
}

/// The newest applied migration, or `None` before `schema_migrations` exists.
fn applied_version(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    let exists: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(None);
    }
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )
    .map(Some)
}

/// Apply the migrations this database lacks, in one exclusive transaction (foreign keys are off
/// until it is done, then checked). A database from before `schema_migrations` is recognised by
/// its `user_version`: 2 is migration 1 already; 0 with tables is the shared-key schema,
/// converted into migration 1.
fn migrate(conn: &Connection, path: &Path) -> Result<(), HubError> {
    let err = db_err(path);
    let latest = migrations::latest(&migrations());
    match applied_version(conn).map_err(&err)? {
        Some(v) if v == latest => return Ok(()),
        Some(v) if v > latest => {
            return Err(migrations::newer(&path.display().to_string(), v, latest))
        }
        _ => {}
    }
    // Deleted content (the shared keys) is overwritten, not left in free pages.
    conn.execute_batch("PRAGMA secure_delete=ON;")
        .map_err(&err)?;
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Exclusive).map_err(&err)?;
    let converted = baseline(&tx, path, latest)?;
    let mut sql = SqliteSql(&tx);
    migrations::apply(&mut sql, &migrations(), &path.display().to_string())?;
    tx.execute_batch(&format!(
        "PRAGMA user_version = {};",
        latest + USER_VERSION_OFFSET
    ))
    .map_err(&err)?;
    let broken: Option<String> = tx
        .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
        .optional()
        .map_err(&err)?;
    if let Some(table) = broken {
        return Err(HubError::Database {
            db: path.display().to_string(),
            message: format!("cannot migrate: table {table} refers to missing devices"),
        });
    }
    tx.commit().map_err(&err)?;
    if converted {
        // Move the rewritten pages into the database file and empty the log.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(&err)?;
    }
    conn.execute_batch("PRAGMA secure_delete=OFF;")
        .map_err(&err)?;
    Ok(())
}

/// Inside the migration's transaction: create `schema_migrations` and, for a database from
/// before it, record what it already holds. Whether the shared-key schema was converted.
fn baseline(tx: &Transaction<'_>, path: &Path, latest: i64) -> Result<bool, HubError> {
    let err = db_err(path);
    let name = path.display().to_string();
    // Another connection may have migrated it meanwhile.
    if applied_version(tx).map_err(&err)?.is_some() {
        return Ok(false);
    }
    let user_version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&err)?;
    let has_devices: bool = tx
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'devices'",
            [],
            |r| r.get(0),
        )
        .map_err(&err)?;
    let mut sql = SqliteSql(tx);
    migrations::create_table(&mut sql, &name)?;
    // What dermedge before schema_migrations wrote for the schema of migration 1.
    let version_1 = 1 + USER_VERSION_OFFSET;
    match (user_version, has_devices) {
        (SHARED_KEY_SCHEMA, false) => Ok(false),
        (SHARED_KEY_SCHEMA, true) => {
            convert_shared_key_schema(tx, path)?;
            migrations::mark_applied(&mut sql, 1, &name)?;
            Ok(true)
        }
        (v, true) if v == version_1 => {
            log::info!("{name}: a database of dermedge before schema_migrations: at version 1");
            migrations::mark_applied(&mut sql, 1, &name)?;
            Ok(false)
        }
        (v, _) if v > version_1 => Err(migrations::newer(&name, v - USER_VERSION_OFFSET, latest)),
        (v, _) => Err(HubError::Database {
            db: name,
            message: format!(
                "user_version {v} and {} devices table: not a dermedge hub database",
                if has_devices { "a" } else { "no" }
            ),
        }),
    }
}

/// The shared-key schema: devices knew a shared sync key. It is dropped; the devices stay, with
/// their counters and records, but must be enrolled again with a public key.
fn convert_shared_key_schema(tx: &Transaction<'_>, path: &Path) -> Result<(), HubError> {
    let err = db_err(path);
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
        "{}: converted from the shared-key schema; its {devices} devices were enrolled with the \
         old shared-key scheme and must be enrolled again with their public keys",
        path.display()
    );
    Ok(())
}

/// Run `work` in an immediate transaction (this connection is the database's only writer until
/// it ends): committed when it succeeds, rolled back when it fails.
pub fn transaction<R>(
    conn: &Connection,
    work: &mut dyn FnMut(&mut dyn Sql) -> Result<R, super::sql::Fail>,
) -> Result<R, super::sql::Fail> {
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(sql_error)?;
    let result = work(&mut SqliteSql(&tx))?;
    tx.commit().map_err(sql_error)?;
    Ok(result)
}

/// [`Sql`] on a connection (or a transaction, which derefs to one).
pub struct SqliteSql<'a>(pub &'a Connection);

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Arg::Null => ValueRef::Null,
            Arg::Int(v) => ValueRef::Integer(v),
            Arg::Text(v) => ValueRef::Text(v.as_bytes()),
            Arg::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

pub fn sql_error(e: rusqlite::Error) -> SqlError {
    let failure = match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Failure::Constraint
        }
        _ => Failure::Other,
    };
    SqlError {
        failure,
        message: e.to_string(),
    }
}

fn value(v: rusqlite::types::ValueRef<'_>) -> Result<Value, SqlError> {
    use rusqlite::types::ValueRef;
    Ok(match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Text(t) => Value::Text(
            std::str::from_utf8(t)
                .map_err(|e| SqlError::other(format!("text that is not UTF-8: {e}")))?
                .to_string(),
        ),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        ValueRef::Real(r) => return Err(SqlError::other(format!("a real number {r}"))),
    })
}

impl Sql for SqliteSql<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, SqlError> {
        let mut stmt = self.0.prepare_cached(sql).map_err(sql_error)?;
        stmt.execute(rusqlite::params_from_iter(args))
            .map(|n| n as u64)
            .map_err(sql_error)
    }

    fn execute_batch(&mut self, sql: &str) -> Result<(), SqlError> {
        self.0.execute_batch(sql).map_err(sql_error)
    }

    fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, SqlError> {
        let mut stmt = self.0.prepare_cached(sql).map_err(sql_error)?;
        let columns = stmt.column_count();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(args))
            .map_err(sql_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_error)? {
            let values = (0..columns)
                .map(|i| value(row.get_ref(i).map_err(sql_error)?))
                .collect::<Result<_, _>>()?;
            out.push(Row(values));
        }
        Ok(out)
    }
}
