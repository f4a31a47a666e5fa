//! The web page's side of the store (migration 2): clinicians' accounts and sessions, labels, and
//! the queries the page makes — records through filters, one page at a time, and each device's
//! health. Written once against [`Sql`], like the rest of the store.

use std::time::Duration;

use dermedge_record::{HeadResult, QualityResult};

use super::sql::{args, Row, SqlError};
use super::Store;
use crate::accounts;
use crate::HubError;

/// Failed logins in a row after which an account is locked for a while.
pub const FAILURES_BEFORE_LOCK: i64 = 5;
/// The first lock; it doubles with each further failure, up to [`MAX_LOCK_MS`].
pub const FIRST_LOCK_MS: i64 = 30_000;
pub const MAX_LOCK_MS: i64 = 15 * 60_000;
/// A session's last use is written at most this often.
const TOUCH_EVERY_MS: i64 = 60_000;

/// How long a session lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Unused for this long, a session ends.
    pub idle: Duration,
    /// However much it is used, a session ends this long after the login.
    pub lifetime: Duration,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(12 * 3600),
            lifetime: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// An account, as `dermedge hub user list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct User {
    pub name: String,
    pub created_at_ms: i64,
    /// Sessions open now (not yet ended or expired).
    pub sessions: u64,
    pub locked_until_ms: Option<i64>,
}

/// What a login attempt came to. The reason a login was refused is logged, never shown: the
/// page says the same for a wrong name, a wrong password and a locked account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    Ok,
    NoSuchUser,
    WrongPassword { failures: i64 },
    Locked { until_ms: i64 },
}

/// A label a clinician gave a record: for one head (`head`), or the whole record (`None`).
/// Every label is kept; the newest per record and head is the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub id: i64,
    pub record_id: String,
    pub head: Option<String>,
    pub label: String,
    pub author: String,
    pub at_ms: i64,
}

/// Which records the page shows. Each `None` (or `false`) leaves that filter out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    pub device: Option<String>,
    /// Captured at or after (ms since the epoch).
    pub from_ms: Option<i64>,
    /// Captured before.
    pub until_ms: Option<i64>,
    /// A current label containing this text (case-insensitive).
    pub label: Option<String>,
    pub labelled_only: bool,
    pub unlabelled_only: bool,
    /// A head of this name, with `top_class` as its top class when given.
    pub head: Option<String>,
    pub top_class: Option<String>,
}

/// A stored record as the page shows it (no embedding, no thumbnail bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct RecordSummary {
    pub record_id: String,
    pub device_id: String,
    pub epoch: i64,
    pub seq: i64,
    pub captured_at_ms: i64,
    pub received_at_ms: i64,
    pub model_id: String,
    pub precision: String,
    pub source: Option<String>,
    pub heads: Vec<HeadResult>,
    pub quality: Option<QualityResult>,
    pub embedding_dim: i64,
    pub has_thumbnail: bool,
    /// The current labels (the newest per head), oldest first.
    pub labels: Vec<Label>,
}

/// One page of records, newest capture first, and how many pass the filter in all.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordPage {
    pub total: u64,
    pub records: Vec<RecordSummary>,
}

/// The losses of one kind a device reported (or the hub refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapTotal {
    /// `evicted`, `damaged`, `missing` (from the device's queue) or `refused` (by the hub).
    pub reason: String,
    pub ranges: u64,
    pub records: u64,
    pub last_received_at_ms: i64,
}

/// What the hub knows of a device's sync, and the queue depth the device reported with its
/// last batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    pub device_id: String,
    pub epoch: i64,
    /// The hub has acknowledged every sequence number through this one (records and losses).
    pub acked_through: i64,
    /// The highest sequence number of a stored record in the current epoch.
    pub highest_record_seq: Option<i64>,
    pub last_counter: i64,
    pub last_batch_at_ms: Option<i64>,
    /// Records the device still held besides its last batch, as it reported them then.
    pub queue_depth: Option<i64>,
    pub last_captured_at_ms: Option<i64>,
    pub records: u64,
    pub revoked: bool,
    pub needs_enrollment: bool,
    pub gaps: Vec<GapTotal>,
    /// Requests naming this device refused since the time asked for.
    pub recent_rejections: u64,
}

/// The newest label of its record and head.
macro_rules! current_label {
    () => {
        "NOT EXISTS (SELECT 1 FROM labels n WHERE n.record_id = l.record_id
             AND n.head IS NOT DISTINCT FROM l.head AND n.id > l.id)"
    };
}

/// `FROM records r WHERE …` with the filter's arguments `?1` to `?8` (see [`filter_args`]).
/// Casts tell PostgreSQL the type of an argument that is compared with nothing but NULL.
macro_rules! filtered {
    () => {
        concat!(
            "FROM records r
             WHERE r.device_id = COALESCE(?1, r.device_id)
               AND r.captured_at_ms >= COALESCE(?2, r.captured_at_ms)
               AND r.captured_at_ms < COALESCE(?3, r.captured_at_ms + 1)
               AND (CAST(?4 AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM labels l
                    WHERE l.record_id = r.record_id
                      AND LOWER(l.label) LIKE CAST(?4 AS TEXT) ESCAPE '\\' AND ",
            current_label!(),
            "))
               AND (CAST(?5 AS BIGINT) = 0
                    OR EXISTS (SELECT 1 FROM labels l WHERE l.record_id = r.record_id))
               AND (CAST(?6 AS BIGINT) = 0
                    OR NOT EXISTS (SELECT 1 FROM labels l WHERE l.record_id = r.record_id))
               AND ((CAST(?7 AS TEXT) IS NULL AND CAST(?8 AS TEXT) IS NULL)
                    OR EXISTS (SELECT 1 FROM record_heads h WHERE h.record_id = r.record_id
                        AND h.head = COALESCE(?7, h.head)
                        AND h.top_class = COALESCE(?8, h.top_class)))"
        )
    };
}

macro_rules! summary_columns {
    () => {
        "SELECT r.record_id, r.device_id, r.epoch, r.seq, r.captured_at_ms, r.received_at_ms,
                r.model_id, r.precision, r.source, r.heads_json, r.quality_json, r.embedding_dim,
                r.thumbnail_jpeg IS NOT NULL "
    };
}

macro_rules! label_columns {
    () => {
        "SELECT l.id, l.record_id, l.head, l.label, l.author, l.at_ms FROM labels l "
    };
}

const PAGE: &str = concat!(
    summary_columns!(),
    filtered!(),
    " ORDER BY r.captured_at_ms DESC, r.record_id LIMIT ?9 OFFSET ?10"
);
const COUNT: &str = concat!("SELECT COUNT(*) ", filtered!());
const PAGE_LABELS: &str = concat!(
    label_columns!(),
    "WHERE ",
    current_label!(),
    " AND l.record_id IN (SELECT r.record_id ",
    filtered!(),
    " ORDER BY r.captured_at_ms DESC, r.record_id LIMIT ?9 OFFSET ?10) ORDER BY l.id"
);
const ALL: &str = concat!(
    summary_columns!(),
    filtered!(),
    " ORDER BY r.device_id, r.epoch, r.seq"
);
const ALL_LABELS: &str = concat!(
    label_columns!(),
    "WHERE ",
    current_label!(),
    " AND l.record_id IN (SELECT r.record_id ",
    filtered!(),
    ") ORDER BY l.id"
);
const ONE: &str = concat!(summary_columns!(), "FROM records r WHERE r.record_id = ?1");

/// `text` as a LIKE pattern that matches it anywhere, lower-cased, its wildcards escaped.
fn contains_pattern(text: &str) -> String {
    let mut out = String::from("%");
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

fn label(r: &Row) -> Result<Label, SqlError> {
    Ok(Label {
        id: r.int(0)?,
        record_id: r.text(1)?,
        head: r.opt_text(2)?,
        label: r.text(3)?,
        author: r.text(4)?,
        at_ms: r.int(5)?,
    })
}

fn summary(r: &Row) -> Result<RecordSummary, SqlError> {
    let record_id = r.text(0)?;
    let heads = serde_json::from_str(&r.text(9)?).unwrap_or_else(|e| {
        log::warn!("hub: record {record_id}: unreadable heads: {e}");
        Vec::new()
    });
    let quality = r.opt_text(10)?.and_then(|q| serde_json::from_str(&q).ok());
    Ok(RecordSummary {
        device_id: r.text(1)?,
        epoch: r.int(2)?,
        seq: r.int(3)?,
        captured_at_ms: r.int(4)?,
        received_at_ms: r.int(5)?,
        model_id: r.text(6)?,
        precision: r.text(7)?,
        source: r.opt_text(8)?,
        heads,
        quality,
        embedding_dim: r.int(11)?,
        has_thumbnail: r.bool(12)?,
        labels: Vec::new(),
        record_id,
    })
}

/// Each record with its labels from `labels` (in their order).
fn attach(records: &mut [RecordSummary], labels: Vec<Label>) {
    let mut by_id: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, r) in records.iter().enumerate() {
        by_id.insert(r.record_id.as_str(), i);
    }
    let mut placed: Vec<(usize, Label)> = Vec::with_capacity(labels.len());
    for l in labels {
        if let Some(&i) = by_id.get(l.record_id.as_str()) {
            placed.push((i, l));
        }
    }
    for (i, l) in placed {
        records[i].labels.push(l);
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The filter's arguments; `pattern` holds the label pattern they borrow.
fn filter_args<'a>(f: &'a RecordFilter, pattern: &'a Option<String>) -> Vec<super::sql::Arg<'a>> {
    args![
        f.device.as_deref(),
        f.from_ms,
        f.until_ms,
        pattern.as_deref(),
        i64::from(f.labelled_only),
        i64::from(f.unlabelled_only),
        f.head.as_deref(),
        f.top_class.as_deref()
    ]
    .to_vec()
}

impl Store {
    /// Create an account. Its name must be new; the password at least
    /// [`accounts::MIN_PASSWORD_CHARS`] characters (hashed with Argon2id).
    pub fn add_user(&self, name: &str, password: &str) -> Result<(), HubError> {
        accounts::check_user_name(name)?;
        let hash = accounts::hash_password(password)?;
        let inserted = self.autocommit(|sql| {
            sql.execute(
                "INSERT INTO users (name, password_hash, created_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO NOTHING",
                &args![name, &hash, dermedge_record::now_ms()],
            )
        })?;
        if inserted == 0 {
            return Err(HubError::BadRequest(format!(
                "an account named {name:?} already exists in {}",
                self.location
            )));
        }
        log::info!("hub: account {name} created");
        Ok(())
    }

    /// Every account, by name.
    pub fn users(&self) -> Result<Vec<User>, HubError> {
        self.autocommit(|sql| {
            sql.query(
                "SELECT u.name, u.created_at_ms, u.locked_until_ms,
                        (SELECT COUNT(*) FROM sessions s WHERE s.user_name = u.name)
                 FROM users u ORDER BY u.name",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(User {
                    name: r.text(0)?,
                    created_at_ms: r.int(1)?,
                    locked_until_ms: r.opt_int(2)?,
                    sessions: r.int(3)? as u64,
                })
            })
            .collect()
        })
    }

    /// Delete an account and end its sessions (the labels it wrote keep its name).
    pub fn remove_user(&self, name: &str) -> Result<(), HubError> {
        let removed = self.transaction(|sql| {
            sql.execute("DELETE FROM sessions WHERE user_name = ?1", &args![name])?;
            Ok(sql.execute("DELETE FROM users WHERE name = ?1", &args![name])?)
        })?;
        if removed == 0 {
            return Err(HubError::BadRequest(format!(
                "no account named {name:?} in {}",
                self.location
            )));
        }
        log::warn!("hub: account {name} removed; its sessions ended");
        Ok(())
    }

    /// Check a login: the password against the account's hash (the same work for a name with no
    /// account), counting failures in a row; from the [`FAILURES_BEFORE_LOCK`]th on, the account
    /// is locked for [`FIRST_LOCK_MS`], doubling up to [`MAX_LOCK_MS`].
    pub fn login(&self, name: &str, password: &str, now_ms: i64) -> Result<LoginOutcome, HubError> {
        let account = self.autocommit(|sql| {
            sql.query_opt(
                "SELECT password_hash, failed_logins, locked_until_ms FROM users WHERE name = ?1",
                &args![name],
            )?
            .map(|r| Ok((r.text(0)?, r.int(1)?, r.opt_int(2)?)))
            .transpose()
        })?;
        let Some((hash, failures, locked_until)) = account else {
            accounts::verify_nobody(password);
            return Ok(LoginOutcome::NoSuchUser);
        };
        let matches = accounts::verify_password(&hash, password);
        if let Some(until_ms) = locked_until.filter(|&until| until > now_ms) {
            return Ok(LoginOutcome::Locked { until_ms });
        }
        if matches {
            self.autocommit(|sql| {
                sql.execute(
                    "UPDATE users SET failed_logins = 0, locked_until_ms = NULL WHERE name = ?1",
                    &args![name],
                )
            })?;
            return Ok(LoginOutcome::Ok);
        }
        let failures = failures + 1;
        let lock = (failures >= FAILURES_BEFORE_LOCK).then(|| {
            let doublings = (failures - FAILURES_BEFORE_LOCK).min(10) as u32;
            now_ms + (FIRST_LOCK_MS << doublings).min(MAX_LOCK_MS)
        });
        self.autocommit(|sql| {
            sql.execute(
                "UPDATE users SET failed_logins = failed_logins + 1,
                     locked_until_ms = COALESCE(?2, locked_until_ms)
                 WHERE name = ?1",
                &args![name, lock],
            )
        })?;
        Ok(match lock {
            Some(until_ms) => LoginOutcome::Locked { until_ms },
            None => LoginOutcome::WrongPassword { failures },
        })
    }

    /// Start a session for `user` under `token_hash` (see [`accounts::token_hash`]); sessions
    /// that have expired under `policy` are deleted on the way.
    pub fn open_session(
        &self,
        user: &str,
        token_hash: &[u8],
        now_ms: i64,
        policy: SessionPolicy,
    ) -> Result<(), HubError> {
        self.transaction(|sql| {
            sql.execute(
                "DELETE FROM sessions WHERE last_seen_ms < ?1 OR created_at_ms < ?2",
                &args![now_ms - ms(policy.idle), now_ms - ms(policy.lifetime)],
            )?;
            sql.execute(
                "INSERT INTO sessions (token_hash, user_name, created_at_ms, last_seen_ms)
                 VALUES (?1, ?2, ?3, ?3)",
                &args![token_hash, user, now_ms],
            )?;
            Ok(())
        })
    }

    /// The account of the session under `token_hash`, if it is open and has not expired (an
    /// expired one is deleted). Its last use becomes `now_ms` (written at most once a minute).
    pub fn session_user(
        &self,
        token_hash: &[u8],
        now_ms: i64,
        policy: SessionPolicy,
    ) -> Result<Option<String>, HubError> {
        self.autocommit(|sql| {
            let Some(row) = sql.query_opt(
                "SELECT user_name, created_at_ms, last_seen_ms FROM sessions WHERE token_hash = ?1",
                &args![token_hash],
            )?
            else {
                return Ok(None);
            };
            let (user, created, seen) = (row.text(0)?, row.int(1)?, row.int(2)?);
            if now_ms - seen > ms(policy.idle) || now_ms - created > ms(policy.lifetime) {
                sql.execute(
                    "DELETE FROM sessions WHERE token_hash = ?1",
                    &args![token_hash],
                )?;
                return Ok(None);
            }
            if now_ms - seen >= TOUCH_EVERY_MS {
                sql.execute(
                    "UPDATE sessions SET last_seen_ms = ?2 WHERE token_hash = ?1",
                    &args![token_hash, now_ms],
                )?;
            }
            Ok(Some(user))
        })
    }

    /// End the session under `token_hash` (logout).
    pub fn close_session(&self, token_hash: &[u8]) -> Result<(), HubError> {
        self.autocommit(|sql| {
            sql.execute(
                "DELETE FROM sessions WHERE token_hash = ?1",
                &args![token_hash],
            )
        })?;
        Ok(())
    }

    /// Label a record (for `head`, or the whole record), as `author`; it becomes the current
    /// label of that record and head, the earlier ones kept.
    pub fn add_label(
        &self,
        record_id: &str,
        head: Option<&str>,
        label: &str,
        author: &str,
        now_ms: i64,
    ) -> Result<Label, HubError> {
        let id = self.transaction(|sql| {
            let exists = sql
                .query_opt(
                    "SELECT 1 FROM records WHERE record_id = ?1",
                    &args![record_id],
                )?
                .is_some();
            if !exists {
                return Err(HubError::BadRequest(format!("no record {record_id}")).into());
            }
            Ok(sql
                .query_one(
                    "INSERT INTO labels (record_id, head, label, author, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
                    &args![record_id, head, label, author, now_ms],
                )?
                .int(0)?)
        })?;
        log::info!(
            "hub: {author} labelled record {record_id} ({}): {label:?}",
            head.unwrap_or("whole record")
        );
        Ok(Label {
            id,
            record_id: record_id.into(),
            head: head.map(String::from),
            label: label.into(),
            author: author.into(),
            at_ms: now_ms,
        })
    }

    /// Every label of a record, oldest first.
    pub fn labels(&self, record_id: &str) -> Result<Vec<Label>, HubError> {
        self.autocommit(|sql| {
            sql.query(
                concat!(label_columns!(), "WHERE l.record_id = ?1 ORDER BY l.id"),
                &args![record_id],
            )?
            .iter()
            .map(label)
            .collect()
        })
    }

    /// The records that pass `filter`, newest capture first: `limit` of them after `offset`.
    pub fn record_page(
        &self,
        filter: &RecordFilter,
        limit: u32,
        offset: u64,
    ) -> Result<RecordPage, HubError> {
        let pattern = filter.label.as_deref().map(contains_pattern);
        let mut page_args = filter_args(filter, &pattern);
        page_args.extend(args![i64::from(limit), offset as i64]);
        self.autocommit(|sql| {
            let total = sql
                .query_one(COUNT, &filter_args(filter, &pattern))?
                .int(0)? as u64;
            let mut records = sql
                .query(PAGE, &page_args)?
                .iter()
                .map(summary)
                .collect::<Result<Vec<_>, _>>()?;
            let labels = sql
                .query(PAGE_LABELS, &page_args)?
                .iter()
                .map(label)
                .collect::<Result<Vec<_>, _>>()?;
            attach(&mut records, labels);
            Ok(RecordPage { total, records })
        })
    }

    /// Every record that passes `filter`, in each device's sequence order, with its current
    /// labels; `None` when more than `max` do.
    pub fn filtered_records(
        &self,
        filter: &RecordFilter,
        max: u64,
    ) -> Result<Option<Vec<RecordSummary>>, HubError> {
        let pattern = filter.label.as_deref().map(contains_pattern);
        let args = filter_args(filter, &pattern);
        self.autocommit(|sql| {
            if sql.query_one(COUNT, &args)?.int(0)? as u64 > max {
                return Ok(None);
            }
            let mut records = sql
                .query(ALL, &args)?
                .iter()
                .map(summary)
                .collect::<Result<Vec<_>, _>>()?;
            let labels = sql
                .query(ALL_LABELS, &args)?
                .iter()
                .map(label)
                .collect::<Result<Vec<_>, _>>()?;
            attach(&mut records, labels);
            Ok(Some(records))
        })
    }

    /// One record with its current labels.
    pub fn record_summary(&self, record_id: &str) -> Result<Option<RecordSummary>, HubError> {
        let Some(mut record) = self.autocommit(|sql| {
            sql.query_opt(ONE, &args![record_id])?
                .as_ref()
                .map(summary)
                .transpose()
        })?
        else {
            return Ok(None);
        };
        let all = self.labels(record_id)?;
        record.labels = all
            .iter()
            .filter(|l| !all.iter().any(|n| n.head == l.head && n.id > l.id))
            .cloned()
            .collect();
        Ok(Some(record))
    }

    /// A record's thumbnail JPEG, if it has one.
    pub fn thumbnail(&self, record_id: &str) -> Result<Option<Vec<u8>>, HubError> {
        self.autocommit(|sql| {
            sql.query_opt(
                "SELECT thumbnail_jpeg FROM records WHERE record_id = ?1",
                &args![record_id],
            )?
            .map(|r| r.opt_blob(0))
            .transpose()
            .map(Option::flatten)
        })
    }

    /// The enrolled device ids, in order.
    pub fn device_ids(&self) -> Result<Vec<String>, HubError> {
        self.autocommit(|sql| {
            sql.query("SELECT device_id FROM devices ORDER BY device_id", &[])?
                .iter()
                .map(|r| r.text(0))
                .collect()
        })
    }

    /// The (head, top class) pairs the stored records have, in order (at most 1000).
    pub fn head_results(&self) -> Result<Vec<(String, String)>, HubError> {
        self.autocommit(|sql| {
            sql.query(
                "SELECT DISTINCT head, top_class FROM record_heads
                 ORDER BY head, top_class LIMIT 1000",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.text(0)?, r.text(1)?)))
            .collect()
        })
    }

    /// Each device's sync as the hub knows it; refused requests are counted from
    /// `rejections_since_ms`.
    pub fn device_health(&self, rejections_since_ms: i64) -> Result<Vec<DeviceHealth>, HubError> {
        self.autocommit(|sql| {
            let mut devices = sql
                .query(
                    "SELECT d.device_id, d.epoch, d.highest_seq, d.last_counter,
                            d.last_batch_at_ms, d.revoked_at_ms IS NOT NULL, d.public_key IS NULL,
                            (SELECT COUNT(*) FROM records r WHERE r.device_id = d.device_id),
                            (SELECT MAX(r.seq) FROM records r
                             WHERE r.device_id = d.device_id AND r.epoch = d.epoch),
                            (SELECT MAX(r.captured_at_ms) FROM records r
                             WHERE r.device_id = d.device_id),
                            (SELECT COUNT(*) FROM rejections j
                             WHERE j.device_id = d.device_id AND j.at_ms >= ?1),
                            d.queue_depth
                     FROM devices d ORDER BY d.device_id",
                    &args![rejections_since_ms],
                )?
                .iter()
                .map(|r| {
                    Ok(DeviceHealth {
                        device_id: r.text(0)?,
                        epoch: r.int(1)?,
                        acked_through: r.int(2)?,
                        last_counter: r.int(3)?,
                        last_batch_at_ms: r.opt_int(4)?,
                        revoked: r.bool(5)?,
                        needs_enrollment: r.bool(6)?,
                        records: r.int(7)? as u64,
                        highest_record_seq: r.opt_int(8)?,
                        last_captured_at_ms: r.opt_int(9)?,
                        recent_rejections: r.int(10)? as u64,
                        queue_depth: r.opt_int(11)?,
                        gaps: Vec::new(),
                    })
                })
                .collect::<Result<Vec<_>, SqlError>>()?;
            let gaps = sql.query(
                "SELECT device_id,
                        CASE WHEN reason LIKE 'refused: %' THEN 'refused' ELSE reason END,
                        COUNT(*), CAST(SUM(to_seq - from_seq + 1) AS BIGINT), MAX(received_at_ms)
                 FROM gaps GROUP BY 1, 2 ORDER BY 1, 2",
                &[],
            )?;
            for g in &gaps {
                let device = g.text(0)?;
                if let Some(d) = devices.iter_mut().find(|d| d.device_id == device) {
                    d.gaps.push(GapTotal {
                        reason: g.text(1)?,
                        ranges: g.int(2)? as u64,
                        records: g.int(3)? as u64,
                        last_received_at_ms: g.int(4)?,
                    });
                }
            }
            Ok(devices)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::contains_pattern;

    #[test]
    fn label_patterns_match_the_text_anywhere_with_wildcards_escaped() {
        assert_eq!(contains_pattern("Nevus"), "%nevus%");
        assert_eq!(contains_pattern("50%_a\\b"), "%50\\%\\_a\\\\b%");
    }
}
