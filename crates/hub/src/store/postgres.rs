//! The PostgreSQL backend (a health system's regional hub): connections with the synchronous
//! `postgres` client, its migrations under an advisory lock, and [`Sql`] with prepared
//! statements kept per connection.
//!
//! The client runs a small tokio runtime of its own and blocks on it: it is used (and dropped)
//! on plain or blocking threads only, never on a thread that drives asynchronous tasks. The
//! server's store work runs on `spawn_blocking` threads for that reason.
//!
//! Several hub processes may share one database. Every transaction that changes a device's
//! counters or records locks that device's row first (`SELECT … FOR UPDATE`), so that batches
//! of one device are stored one after another whichever hub receives them; unique constraints
//! on record ids and positions stand behind that; a serialization failure or a deadlock runs
//! the transaction again.

use std::collections::HashMap;
use std::error::Error;
use std::time::Duration;

use bytes::BytesMut;
use postgres::error::SqlState;
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::{Client, Config, GenericClient, NoTls, Statement};

use super::location::PostgresUrl;
use super::migrations;
use super::sql::{Arg, Dialect, Fail, Failure, Row, Sql, SqlError, Value};
use crate::HubError;

/// How long connecting may take when the URL does not say (`connect_timeout=`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Key of the advisory lock that serialises migrations across hub processes ("dermedge").
const MIGRATION_LOCK: i64 = 0x6465_726d_6564_6765;

/// One connection and the statements prepared on it.
pub struct Postgres {
    client: Client,
    statements: HashMap<String, Statement>,
}

fn connect_err(url: &PostgresUrl) -> impl Fn(postgres::Error) -> HubError + '_ {
    move |e| HubError::Database {
        db: url.redacted(),
        message: format!("cannot connect to PostgreSQL: {}", describe(&e)),
    }
}

/// The driver's error with the server's message and detail, if it sent one.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        },
        None => match e.source() {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

pub fn sql_error(e: postgres::Error) -> SqlError {
    let failure = match e.code() {
        Some(code)
            if *code == SqlState::UNIQUE_VIOLATION || *code == SqlState::FOREIGN_KEY_VIOLATION =>
        {
            Failure::Constraint
        }
        Some(code)
            if *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            Failure::Retry
        }
        _ => Failure::Other,
    };
    SqlError {
        failure,
        message: describe(&e),
    }
}

impl Postgres {
    /// Connect to `url` and bring the schema up to date. `create`: make the schema in a
    /// database that has none; otherwise such a database is refused.
    pub fn connect(url: &PostgresUrl, create: bool) -> Result<Self, HubError> {
        let mut config: Config =
            url.secret()
                .parse()
                .map_err(|e: postgres::Error| HubError::Database {
                    db: url.redacted(),
                    message: format!("not a PostgreSQL connection URL: {}", describe(&e)),
                })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("dermedge-hub");
        }
        config.notice_callback(|notice| {
            log::debug!("postgres: {}: {}", notice.severity(), notice.message())
        });
        let client = match url.root_cert() {
            None => config.connect(NoTls),
            Some(root) => {
                if config.get_ssl_mode() != postgres::config::SslMode::Require {
                    return Err(HubError::Database {
                        db: url.redacted(),
                        message: "sslrootcert= needs sslmode=require (or no sslmode): a \
                                  connection that may fall back to plain TCP checks nothing"
                            .into(),
                    });
                }
                let tls = dermedge_sync::pinned_tls(root).map_err(|e| HubError::Database {
                    db: url.redacted(),
                    message: format!("sslrootcert: {e}"),
                })?;
                config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(
                    (*tls).clone(),
                ))
            }
        }
        .map_err(connect_err(url))?;
        let mut pg = Self {
            client,
            statements: HashMap::new(),
        };
        pg.migrate(url, create)?;
        Ok(pg)
    }

    /// Whether the connection is gone (the server restarted, the network dropped): a pool
    /// drops it instead of handing it out again.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The newest applied migration, or `None` when the database has no `schema_migrations`.
    fn applied_version(&mut self, db: &str) -> Result<Option<i64>, HubError> {
        let mut sql = self.sql();
        let exists = sql
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .and_then(|r| r.bool(0))
            .map_err(|e| database(db, e))?;
        if !exists {
            return Ok(None);
        }
        migrations::current(&mut sql, db).map(Some)
    }

    /// Apply the migrations the database lacks, in one transaction, under an advisory lock so
    /// that hubs starting together migrate it once.
    fn migrate(&mut self, url: &PostgresUrl, create: bool) -> Result<(), HubError> {
        let db = url.redacted();
        let steps = migrations::postgres();
        let latest = migrations::latest(&steps);
        match self.applied_version(&db)? {
            Some(v) if v == latest => return Ok(()),
            Some(v) if v > latest => return Err(migrations::newer(&db, v, latest)),
            None if !create => {
                return Err(HubError::Database {
                    db,
                    message: "no hub database here (no schema_migrations table): start \
                              `dermedge hub serve` or enroll a device on it first"
                        .into(),
                })
            }
            _ => {}
        }
        // A session lock taken before the transaction, not in it: the transaction that starts
        // once it is held sees the tables another hub created meanwhile (a lookup made before
        // the wait could otherwise answer from this session's stale catalog cache).
        let lock = |pg: &mut Self, function: &str| {
            pg.sql()
                .execute(
                    &format!("SELECT {function}(?1)"),
                    &[Arg::Int(MIGRATION_LOCK)],
                )
                .map_err(|e| database(&db, e))
        };
        lock(self, "pg_advisory_lock")?;
        let migrated = self.transaction(&mut |sql| {
            if unversioned(sql)? {
                return Err(HubError::Database {
                    db: db.clone(),
                    message: "a devices table without schema_migrations: not a dermedge hub \
                              database (or one of another schema on the search path)"
                        .into(),
                }
                .into());
            }
            Ok(migrations::apply(sql, &steps, &db)?)
        });
        let unlocked = lock(self, "pg_advisory_unlock");
        migrated.map_err(|e| match e {
            Fail::Hub(e) => e,
            Fail::Sql(e) => database(&db, e),
        })?;
        unlocked.map(drop)
    }

    fn sql(&mut self) -> PgSql<'_, Client> {
        PgSql {
            client: &mut self.client,
            statements: &mut self.statements,
        }
    }

    /// Run `work` in a transaction: committed when it succeeds, rolled back when it fails.
    pub fn transaction<R>(
        &mut self,
        work: &mut dyn FnMut(&mut dyn Sql) -> Result<R, Fail>,
    ) -> Result<R, Fail> {
        let mut tx = self.client.transaction().map_err(sql_error)?;
        let result = work(&mut PgSql {
            client: &mut tx,
            statements: &mut self.statements,
        })?;
        tx.commit().map_err(sql_error)?;
        Ok(result)
    }

    /// Run one statement outside a transaction.
    pub fn autocommit<R>(&mut self, work: impl FnOnce(&mut dyn Sql) -> R) -> R {
        work(&mut self.sql())
    }
}

/// Whether the schema the hub creates its tables in holds a `devices` table but no
/// `schema_migrations` (read from the catalog tables, as of this statement).
fn unversioned(sql: &mut dyn Sql) -> Result<bool, SqlError> {
    sql.query_one(
        "SELECT COUNT(*) FILTER (WHERE c.relname = 'devices') > 0
                AND COUNT(*) FILTER (WHERE c.relname = 'schema_migrations') = 0
         FROM pg_catalog.pg_class c
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relname IN ('devices', 'schema_migrations')",
        &[],
    )?
    .bool(0)
}

fn database(db: &str, e: SqlError) -> HubError {
    HubError::Database {
        db: db.into(),
        message: e.message,
    }
}

/// [`Sql`] on a client or a transaction, with the connection's prepared statements.
struct PgSql<'a, C: GenericClient> {
    client: &'a mut C,
    statements: &'a mut HashMap<String, Statement>,
}

impl<C: GenericClient> PgSql<'_, C> {
    /// `sql` (with `?1` placeholders) prepared once per connection.
    fn prepared(&mut self, sql: &str) -> Result<Statement, SqlError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self
            .client
            .prepare(&super::sql::numbered_placeholders(sql))
            .map_err(sql_error)?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

fn params<'a>(args: &'a [Arg<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

impl<C: GenericClient> Sql for PgSql<'_, C> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, SqlError> {
        let statement = self.prepared(sql)?;
        self.client
            .execute(&statement, &params(args))
            .map_err(sql_error)
    }

    fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, SqlError> {
        let statement = self.prepared(sql)?;
        let rows = self
            .client
            .query(&statement, &params(args))
            .map_err(sql_error)?;
        rows.iter().map(row).collect()
    }

    fn execute_batch(&mut self, sql: &str) -> Result<(), SqlError> {
        self.client.batch_execute(sql).map_err(sql_error)
    }
}

fn row(row: &postgres::Row) -> Result<Row, SqlError> {
    (0..row.len())
        .map(|i| value(row, i))
        .collect::<Result<_, _>>()
        .map(Row)
}

fn value(row: &postgres::Row, i: usize) -> Result<Value, SqlError> {
    fn get<'a, T: postgres::types::FromSql<'a>>(
        row: &'a postgres::Row,
        i: usize,
    ) -> Result<Option<T>, SqlError> {
        row.try_get::<_, Option<T>>(i)
            .map_err(|e| SqlError::other(format!("column {i}: {e}")))
    }
    let ty = row.columns()[i].type_();
    let v = if *ty == Type::INT8 {
        get::<i64>(row, i)?.map(Value::Int)
    } else if *ty == Type::INT4 {
        get::<i32>(row, i)?.map(|v| Value::Int(v.into()))
    } else if *ty == Type::INT2 {
        get::<i16>(row, i)?.map(|v| Value::Int(v.into()))
    } else if *ty == Type::BOOL {
        get::<bool>(row, i)?.map(|v| Value::Int(v.into()))
    } else if *ty == Type::BYTEA {
        get::<Vec<u8>>(row, i)?.map(Value::Blob)
    } else if [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR].contains(ty) {
        get::<String>(row, i)?.map(Value::Text)
    } else {
        return Err(SqlError::other(format!(
            "column {i}: type {ty} is not read by the hub"
        )));
    };
    Ok(v.unwrap_or(Value::Null))
}

/// An argument as the type the statement expects; a mismatch is an error, never bytes of the
/// wrong width.
impl ToSql for Arg<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        fn checked<T: ToSql>(
            v: T,
            what: &str,
            ty: &Type,
            out: &mut BytesMut,
        ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
            if !T::accepts(ty) {
                return Err(format!("{what} given where the statement expects {ty}").into());
            }
            v.to_sql(ty, out)
        }
        match *self {
            Arg::Null => Ok(IsNull::Yes),
            Arg::Int(v) => checked(v, "an integer", ty, out),
            Arg::Text(v) => checked(v, "text", ty, out),
            Arg::Blob(v) => checked(v, "bytes", ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}
