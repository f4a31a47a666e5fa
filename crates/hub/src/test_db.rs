//! A scratch hub database for one test, on either backend: an SQLite file in a temporary
//! directory, or a schema of its own in the PostgreSQL database named by
//! `DERMEDGE_TEST_POSTGRES_URL` (dropped at the end). [`on_both_backends!`] runs a test on
//! SQLite always and on PostgreSQL when that variable is set (`scripts/test-postgres.sh` sets
//! it), and says so when it is not.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{Location, Store};

/// The PostgreSQL database the tests may use: `postgres://user:password@host:port/database`.
pub const POSTGRES_URL_VAR: &str = "DERMEDGE_TEST_POSTGRES_URL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL URL to test on, or `None` (with a note on stderr) when none is set.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var(POSTGRES_URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            note_skipped(test);
            None
        }
    }
}

/// Say once per run, past the test harness's capture, that the PostgreSQL tests were skipped.
fn note_skipped(test: &str) {
    static NOTED: std::sync::Once = std::sync::Once::new();
    NOTED.call_once(|| {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "note: the hub's PostgreSQL store tests ({test} and the others under on_postgres::) \
             pass without running: {POSTGRES_URL_VAR} is not set (scripts/test-postgres.sh sets it)"
        );
    });
}

/// One test's database; its temporary directory is there for the test's other files too.
pub struct TestDb {
    pub location: Location,
    pub dir: tempfile::TempDir,
    /// Dropped with the test: the schema goes with it.
    _scratch: Option<Scratch>,
}

/// A PostgreSQL schema of one test's own, and the connection that drops it.
struct Scratch {
    admin: postgres::Client,
    schema: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        if let Err(e) = self.admin.batch_execute(&drop) {
            eprintln!("cannot drop the test schema {}: {e}", self.schema);
        }
    }
}

impl TestDb {
    pub fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => Self {
                location: Location::Sqlite(dir.path().join("hub.sqlite")),
                dir,
                _scratch: None,
            },
            Backend::Postgres => {
                let url = std::env::var(POSTGRES_URL_VAR)
                    .unwrap_or_else(|_| panic!("{POSTGRES_URL_VAR} is not set"));
                let (location, scratch) = scratch_schema(&url);
                Self {
                    location,
                    dir,
                    _scratch: Some(scratch),
                }
            }
        }
    }

    /// A new connection to the database.
    pub fn open(&self) -> Store {
        Store::connect(&self.location).unwrap()
    }

    /// The SQLite file (for the tests of the file itself).
    pub fn path(&self) -> &Path {
        match &self.location {
            Location::Sqlite(path) => path,
            Location::Postgres(_) => panic!("an SQLite test on {}", self.location),
        }
    }
}

/// A new, empty schema in the database at `url`, and a location whose connections use it.
fn scratch_schema(url: &str) -> (Location, Scratch) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let schema = format!(
        "dermedge_test_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = postgres::Client::connect(url, postgres::NoTls)
        .unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR}: cannot connect: {e}"));
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{separator}options=-c%20search_path%3D{schema}");
    let location = Location::parse(OsStr::new(&scoped));
    assert!(matches!(location, Location::Postgres(_)), "{location}");
    (location, Scratch { admin, schema })
}

/// `fn name(backend: Backend)` tests, each run as `on_sqlite::name` and `on_postgres::name`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::test_db::Backend::Sqlite);
                }
            )*
        }

        mod on_postgres {
            $(
                #[test]
                fn $name() {
                    if $crate::test_db::postgres_url(stringify!($name)).is_some() {
                        super::$name($crate::test_db::Backend::Postgres);
                    }
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;
