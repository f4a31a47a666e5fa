//! Versioned schema migrations: numbered steps, the same versions for SQLite and PostgreSQL,
//! each recorded in `schema_migrations (version, applied_at_ms)` in the transaction that
//! applies it. Opening a database applies the steps it lacks; opening it again applies none; a
//! database whose version is newer than this dermedge's is refused.
//!
//! A new step is added at the end of both lists ([`super::sqlite::migrations`] and
//! [`postgres`]) with the next version; a step is never edited once released.

use dermedge_record::now_ms;

use super::sql::{args, Sql, SqlError};
use crate::HubError;

/// Rows a migration derives from existing ones, in its transaction.
pub type Backfill = fn(&mut dyn Sql) -> Result<(), SqlError>;

/// One step of the schema.
#[derive(Debug, Clone)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    /// Statements, run as one batch.
    pub sql: String,
    /// Run after `sql` in the same transaction: rows derived from existing ones, written once
    /// for both dialects.
    pub backfill: Option<Backfill>,
}

/// The same table in both dialects.
const SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version       BIGINT PRIMARY KEY,
    applied_at_ms BIGINT NOT NULL
)";

/// The schema of migration 1 on PostgreSQL: the SQLite schema with PostgreSQL's types (64-bit
/// integers, `BYTEA`, identity columns for the insertion order).
const POSTGRES_1: &str = "
CREATE TABLE devices (
    device_id      TEXT PRIMARY KEY,
    -- Ed25519 public key; NULL for a device enrolled under the shared-key scheme (re-enroll).
    public_key     BYTEA,
    last_counter   BIGINT NOT NULL DEFAULT 0,
    highest_seq    BIGINT NOT NULL DEFAULT 0,
    -- Rises each time another key (a replacement device) is enrolled under this id.
    epoch          BIGINT NOT NULL DEFAULT 1,
    enrolled_at_ms BIGINT NOT NULL,
    revoked_at_ms  BIGINT
);
CREATE TABLE records (
    row             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    record_id       TEXT NOT NULL UNIQUE,
    device_id       TEXT NOT NULL REFERENCES devices(device_id),
    epoch           BIGINT NOT NULL,
    seq             BIGINT NOT NULL,
    captured_at_ms  BIGINT NOT NULL,
    model_id        TEXT NOT NULL,
    precision       TEXT NOT NULL,
    embedding_dtype TEXT NOT NULL,
    embedding_dim   BIGINT NOT NULL,
    embedding       BYTEA NOT NULL,
    heads_json      TEXT NOT NULL,
    quality_json    TEXT,
    source          TEXT,
    thumbnail_jpeg  BYTEA,
    record_cbor     BYTEA NOT NULL,
    received_at_ms  BIGINT NOT NULL,
    UNIQUE (device_id, epoch, seq)
);
CREATE TABLE gaps (
    device_id      TEXT NOT NULL REFERENCES devices(device_id),
    epoch          BIGINT NOT NULL,
    from_seq       BIGINT NOT NULL,
    to_seq         BIGINT NOT NULL,
    reason         TEXT NOT NULL,
    at_ms          BIGINT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    UNIQUE (device_id, epoch, from_seq, to_seq, reason)
);
CREATE TABLE rejections (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    remote    TEXT,
    device_id TEXT,
    status    BIGINT NOT NULL,
    reason    TEXT NOT NULL
);";

/// Migration 2 on PostgreSQL: see [`super::sqlite::migrations`].
const POSTGRES_2: &str = "
ALTER TABLE devices ADD COLUMN last_batch_at_ms BIGINT;
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
    created_at_ms   BIGINT NOT NULL,
    failed_logins   BIGINT NOT NULL DEFAULT 0,
    locked_until_ms BIGINT
);
CREATE TABLE sessions (
    token_hash    BYTEA PRIMARY KEY,
    user_name     TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    created_at_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL
);
CREATE TABLE labels (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    record_id TEXT NOT NULL REFERENCES records(record_id),
    head      TEXT,
    label     TEXT NOT NULL,
    author    TEXT NOT NULL,
    at_ms     BIGINT NOT NULL
);
CREATE INDEX labels_by_record ON labels (record_id, head, id);";

pub const NAME_2: &str =
    "web page: users, sessions, labels, record_heads, devices.last_batch_at_ms";

/// The PostgreSQL schema's steps; [`super::sqlite::migrations`] has the same versions.
pub fn postgres() -> Vec<Migration> {
    vec![
        Migration {
            version: 1,
            name: "devices, records, gaps, rejections",
            sql: POSTGRES_1.to_string(),
            backfill: None,
        },
        Migration {
            version: 2,
            name: NAME_2,
            sql: POSTGRES_2.to_string(),
            backfill: Some(backfill_record_heads),
        },
        Migration {
            version: 3,
            name: super::heads::NAME_3,
            sql: super::heads::POSTGRES.to_string(),
            backfill: None,
        },
    ]
}

/// Migration 2: each stored record's heads with their top class, for the page's filter.
pub fn backfill_record_heads(sql: &mut dyn Sql) -> Result<(), SqlError> {
    let rows = sql.query("SELECT record_id, heads_json FROM records", &[])?;
    for row in rows {
        let record_id = row.text(0)?;
        let heads: Vec<dermedge_record::HeadResult> =
            serde_json::from_str(&row.text(1)?).unwrap_or_default();
        super::insert_record_heads(sql, &record_id, &heads)?;
    }
    Ok(())
}

/// The newest version `migrations` reach.
pub fn latest(migrations: &[Migration]) -> i64 {
    migrations.iter().map(|m| m.version).max().unwrap_or(0)
}

pub fn newer(db: &str, found: i64, known: i64) -> HubError {
    HubError::Database {
        db: db.into(),
        message: format!(
            "schema version {found} is newer than this dermedge's ({known}): use a newer dermedge"
        ),
    }
}

fn sql_err(db: &str) -> impl Fn(super::sql::SqlError) -> HubError + '_ {
    move |e| HubError::Database {
        db: db.into(),
        message: format!("migration: {e}"),
    }
}

/// Create `schema_migrations` if it is missing.
pub fn create_table(sql: &mut dyn Sql, db: &str) -> Result<(), HubError> {
    sql.execute(SCHEMA_MIGRATIONS, &[]).map_err(sql_err(db))?;
    Ok(())
}

/// Record `version` as applied now.
pub fn mark_applied(sql: &mut dyn Sql, version: i64, db: &str) -> Result<(), HubError> {
    sql.execute(
        "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, ?2)",
        &args![version, now_ms()],
    )
    .map_err(sql_err(db))?;
    Ok(())
}

/// The newest applied version (0: none), `schema_migrations` existing.
pub fn current(sql: &mut dyn Sql, db: &str) -> Result<i64, HubError> {
    sql.query_one(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        &[],
    )
    .and_then(|row| row.int(0))
    .map_err(sql_err(db))
}

/// Inside the caller's transaction: apply the steps after the current version, in order, each
/// recorded as it is applied. The versions applied.
pub fn apply(sql: &mut dyn Sql, migrations: &[Migration], db: &str) -> Result<Vec<i64>, HubError> {
    create_table(sql, db)?;
    let current = current(sql, db)?;
    let latest = latest(migrations);
    if current > latest {
        return Err(newer(db, current, latest));
    }
    let mut applied = Vec::new();
    for step in migrations.iter().filter(|m| m.version > current) {
        sql.execute_batch(&step.sql)
            .map_err(|e| HubError::Database {
                db: db.into(),
                message: format!("migration {} ({}): {e}", step.version, step.name),
            })?;
        if let Some(backfill) = step.backfill {
            backfill(sql).map_err(|e| HubError::Database {
                db: db.into(),
                message: format!("migration {} ({}): {e}", step.version, step.name),
            })?;
        }
        mark_applied(sql, step.version, db)?;
        log::info!(
            "{db}: schema migration {} applied: {}",
            step.version,
            step.name
        );
        applied.push(step.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_know_the_same_versions_in_order() {
        let versions = |m: Vec<Migration>| m.iter().map(|m| m.version).collect::<Vec<_>>();
        let sqlite = versions(super::super::sqlite::migrations());
        assert_eq!(sqlite, versions(postgres()));
        assert!(sqlite.windows(2).all(|w| w[1] == w[0] + 1) && sqlite[0] == 1);
    }
}
