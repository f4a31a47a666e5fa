//! The little the store needs from a SQL database, the same for SQLite and PostgreSQL: run a
//! statement with arguments, read rows of plain values, and say why a statement failed. The
//! store's statements are written once, with SQLite's `?1` placeholders; the PostgreSQL side
//! turns them into `$1`.

use std::fmt;

/// A statement's argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Blob(v)
    }
}

impl<'a> From<&'a Vec<u8>> for Arg<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Arg::Blob(v)
    }
}

impl<'a, T: Into<Arg<'a>>> From<Option<T>> for Arg<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Arg::Null, Into::into)
    }
}

/// `[Arg; N]` from values of mixed types.
macro_rules! args {
    ($($value:expr),* $(,)?) => {
        [$($crate::store::sql::Arg::from($value)),*]
    };
}
pub(crate) use args;

/// A value read back. Booleans read as 0 and 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// One row of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value, SqlError> {
        self.0
            .get(i)
            .ok_or_else(|| SqlError::other(format!("column {i}: the row has {}", self.0.len())))
    }

    fn mismatch(&self, i: usize, expected: &str) -> SqlError {
        SqlError::other(format!(
            "column {i}: expected {expected}, found {:?}",
            self.0.get(i)
        ))
    }

    pub fn int(&self, i: usize) -> Result<i64, SqlError> {
        match self.at(i)? {
            Value::Int(v) => Ok(*v),
            _ => Err(self.mismatch(i, "an integer")),
        }
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, SqlError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, SqlError> {
        match self.at(i)? {
            Value::Text(v) => Ok(v.clone()),
            _ => Err(self.mismatch(i, "text")),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, SqlError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    pub fn blob(&self, i: usize) -> Result<Vec<u8>, SqlError> {
        match self.at(i)? {
            Value::Blob(v) => Ok(v.clone()),
            _ => Err(self.mismatch(i, "bytes")),
        }
    }

    pub fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, SqlError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.blob(i).map(Some),
        }
    }

    pub fn bool(&self, i: usize) -> Result<bool, SqlError> {
        self.int(i).map(|v| v != 0)
    }
}

/// Why a statement failed, as far as the store acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A unique or foreign key constraint refused the change.
    Constraint,
    /// Another transaction won a race (a serialization failure, a deadlock): run it again.
    Retry,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    pub failure: Failure,
    pub message: String,
}

impl SqlError {
    pub fn other(message: impl Into<String>) -> Self {
        Self {
            failure: Failure::Other,
            message: message.into(),
        }
    }

    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            failure: Failure::Retry,
            message: message.into(),
        }
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Which SQL a backend speaks, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// `sqlite` or `postgres`, whichever this dialect speaks.
    pub fn pick(self, sqlite: &'static str, postgres: &'static str) -> &'static str {
        match self {
            Dialect::Sqlite => sqlite,
            Dialect::Postgres => postgres,
        }
    }
}

/// A connection or a transaction on one.
pub trait Sql {
    fn dialect(&self) -> Dialect;
    /// Run `sql`; the number of rows it changed.
    fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, SqlError>;
    fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, SqlError>;
    /// Run statements separated by `;`, without arguments (a migration step).
    fn execute_batch(&mut self, sql: &str) -> Result<(), SqlError>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Row>, SqlError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The one row a statement such as `SELECT COUNT(*)` returns.
    fn query_one(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Row, SqlError> {
        self.query_opt(sql, args)?
            .ok_or_else(|| SqlError::other("the statement returned no row"))
    }
}

/// `sql` with SQLite's numbered placeholders (`?1`) written as PostgreSQL's (`$1`).
pub fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// What a transaction's work ends with when it does not succeed: a statement's failure (which
/// may be retried) or the hub's answer.
#[derive(Debug)]
pub enum Fail {
    Sql(SqlError),
    Hub(crate::HubError),
}

impl From<SqlError> for Fail {
    fn from(e: SqlError) -> Self {
        Fail::Sql(e)
    }
}

impl From<crate::HubError> for Fail {
    fn from(e: crate::HubError) -> Self {
        Fail::Hub(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(
            numbered_placeholders("SELECT a FROM t WHERE b = ?1 AND (?2 IS NULL OR c = ?2) -- ?"),
            "SELECT a FROM t WHERE b = $1 AND ($2 IS NULL OR c = $2) -- ?"
        );
    }

    #[test]
    fn rows_read_typed_values() {
        let row = Row(vec![
            Value::Int(3),
            Value::Null,
            Value::Text("x".into()),
            Value::Blob(vec![1]),
        ]);
        assert_eq!(row.int(0).unwrap(), 3);
        assert!(row.bool(0).unwrap());
        assert_eq!(row.opt_int(1).unwrap(), None);
        assert_eq!(row.text(2).unwrap(), "x");
        assert_eq!(row.opt_blob(3).unwrap(), Some(vec![1]));
        assert!(row.text(0).is_err());
        assert!(row.int(4).is_err());
    }
}
