//! Where the hub's database is: an SQLite file (one clinic) or a PostgreSQL server (a health
//! system's regional hub), chosen by the `--db` value. A connection URL may hold a password: it
//! is shown, logged and put in errors only with the password replaced.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

/// The URL schemes that select PostgreSQL.
pub const POSTGRES_SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

/// What stands in for a password when a URL is shown.
const HIDDEN: &str = "***";

#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite database file (created if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL, `postgres://user:password@host:port/database?…`.
    Postgres(PostgresUrl),
}

/// A PostgreSQL connection URL; its `Display` and `Debug` hide the password.
///
/// `sslrootcert=<PEM file>` (libpq's name) is the hub's own parameter: the server's certificate
/// or its CA. With it the connection is TLS, `sslmode=require` and the server's certificate
/// verified against that file (libpq's `verify-full`); without it the hub connects as the URL
/// says, without TLS.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    url: String,
    root_cert: Option<PathBuf>,
}

impl PostgresUrl {
    pub(crate) fn new(url: &str) -> Self {
        // The query starts after the user part (a password may hold a `?`), as the driver reads
        // it.
        let after_user = url.find('@').map_or(0, |at| at + 1);
        let Some(mark) = url[after_user..].find('?').map(|i| i + after_user) else {
            return Self {
                url: url.into(),
                root_cert: None,
            };
        };
        let (head, query) = (&url[..mark], &url[mark + 1..]);
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.strip_prefix("sslrootcert=") {
                Some(value) => {
                    let path = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
                    root_cert = Some(PathBuf::from(path.into_owned()));
                }
                None => kept.push(pair),
            }
        }
        if root_cert.is_some() {
            // libpq's verifying modes are what the hub does with a root certificate; the driver
            // knows them only as `require`.
            for p in kept.iter_mut() {
                if matches!(*p, "sslmode=verify-full" | "sslmode=verify-ca") {
                    *p = "sslmode=require";
                }
            }
            if !kept.iter().any(|p| p.starts_with("sslmode=")) {
                kept.push("sslmode=require");
            }
        }
        let url = if kept.is_empty() {
            head.to_string()
        } else {
            format!("{head}?{}", kept.join("&"))
        };
        Self { url, root_cert }
    }

    /// The URL for the driver, password included and `sslrootcert` taken out: for the database
    /// driver only.
    pub(crate) fn secret(&self) -> &str {
        &self.url
    }

    /// The PEM file the server's certificate is checked against (`sslrootcert=`).
    pub fn root_cert(&self) -> Option<&Path> {
        self.root_cert.as_deref()
    }

    /// The URL with its password (in the user part or a `password=` parameter) hidden.
    pub fn redacted(&self) -> String {
        redact(&self.url)
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresUrl({})", self.redacted())
    }
}

impl Location {
    /// A `--db` value: a `postgres://` or `postgresql://` URL selects PostgreSQL; anything else
    /// is an SQLite file.
    pub fn parse(arg: &OsStr) -> Self {
        match arg.to_str() {
            Some(url) if is_postgres_url(url) => Location::Postgres(PostgresUrl::new(url)),
            _ => Location::Sqlite(arg.into()),
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Location::Sqlite(_) => "sqlite",
            Location::Postgres(_) => "postgres",
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "{}", path.display()),
            Location::Postgres(url) => url.fmt(f),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Location::Postgres(url) => f.debug_tuple("Postgres").field(url).finish(),
        }
    }
}

/// A path is always an SQLite file; [`Location::parse`] reads a `--db` value.
impl From<&Path> for Location {
    fn from(path: &Path) -> Self {
        Location::Sqlite(path.into())
    }
}

impl From<&PathBuf> for Location {
    fn from(path: &PathBuf) -> Self {
        Location::Sqlite(path.clone())
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Self {
        Location::Sqlite(path)
    }
}

impl From<&Location> for Location {
    fn from(location: &Location) -> Self {
        location.clone()
    }
}

pub fn is_postgres_url(text: &str) -> bool {
    POSTGRES_SCHEMES.iter().any(|scheme| {
        text.get(..scheme.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(scheme))
    })
}

/// `url` with the password of its user part and of any `password=` parameter hidden. The user
/// part ends at the first `@`, as the driver reads it.
fn redact(url: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (scheme, rest) = url.split_at(scheme_end);
    let rest = match rest.find('@') {
        Some(at) => {
            let (credentials, tail) = rest.split_at(at);
            match credentials.split_once(':') {
                Some((user, _)) => format!("{user}:{HIDDEN}{tail}"),
                None => rest.to_string(),
            }
        }
        None => rest.to_string(),
    };
    let Some((head, query)) = rest.split_once('?') else {
        return format!("{scheme}{rest}");
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}={HIDDEN}"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{scheme}{head}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(arg: &str) -> Location {
        Location::parse(OsStr::new(arg))
    }

    #[test]
    fn urls_select_postgres_and_anything_else_is_a_file() {
        assert_eq!(location("hub.sqlite").kind(), "sqlite");
        assert_eq!(location("/var/lib/postgres/hub.db").kind(), "sqlite");
        assert_eq!(location("postgres://h/db").kind(), "postgres");
        assert_eq!(location("PostgreSQL://h/db").kind(), "postgres");
        assert_eq!(location("mysql://h/db").kind(), "sqlite");
    }

    #[test]
    fn a_root_certificate_is_the_hubs_own_parameter_and_requires_tls() {
        let Location::Postgres(url) = location(
            "postgres://u:p@h/d?sslrootcert=%2Fetc%2Fdermedge%2Fpg%20ca.crt&application_name=x",
        ) else {
            panic!("not postgres")
        };
        assert_eq!(url.root_cert(), Some(Path::new("/etc/dermedge/pg ca.crt")));
        assert_eq!(
            url.secret(),
            "postgres://u:p@h/d?application_name=x&sslmode=require"
        );
        let Location::Postgres(url) = location("postgres://h/d?sslmode=require&sslrootcert=ca.pem")
        else {
            panic!("not postgres")
        };
        assert_eq!(
            (url.secret(), url.root_cert()),
            ("postgres://h/d?sslmode=require", Some(Path::new("ca.pem")))
        );
        let Location::Postgres(url) =
            location("postgres://u:p?w@h/d?sslmode=verify-full&sslrootcert=ca.pem")
        else {
            panic!("not postgres")
        };
        assert_eq!(url.secret(), "postgres://u:p?w@h/d?sslmode=require");
        let Location::Postgres(url) = location("postgres://h/d?sslmode=disable") else {
            panic!("not postgres")
        };
        assert_eq!(
            (url.secret(), url.root_cert()),
            ("postgres://h/d?sslmode=disable", None)
        );
    }

    #[test]
    fn passwords_are_never_shown() {
        let cases = [
            (
                "postgres://hub:s3cr%40t@db.example:5432/dermedge",
                "postgres://hub:***@db.example:5432/dermedge",
            ),
            (
                "postgresql://hub@db/dermedge?password=s3cret&sslmode=disable",
                "postgresql://hub@db/dermedge?password=***&sslmode=disable",
            ),
            ("postgres://db/dermedge", "postgres://db/dermedge"),
            (
                "postgres://u:p@h/d?application_name=x&PASSWORD=q",
                "postgres://u:***@h/d?application_name=x&PASSWORD=***",
            ),
        ];
        for (url, shown) in cases {
            let location = location(url);
            assert_eq!(location.to_string(), shown);
            let debug = format!("{location:?}");
            assert!(debug.contains(shown), "{debug}");
            assert!(!debug.contains("s3c") && !debug.contains(":p@"), "{debug}");
        }
    }
}
