//! dermedge-queue: where captures wait, safely, for a link to the hub.
//!
//! An append-only log of CBOR [`Record`]s in segment files, each record framed with its length,
//! sequence number and CRC, and sealed with XChaCha20-Poly1305 under a key derived from the
//! device key: whoever finds a lost device reads nothing. A record counts as **accepted** once it
//! is durable ([`Receipt::durable`], [`Queue::durable_seq`]): at once under
//! [`Durability::PerRecord`], at the next group commit under [`Durability::Group`].
//!
//! Opening a queue recovers it: a torn tail (an append cut short by power loss) is truncated and
//! reported; a damaged record in the middle is skipped, copied to `quarantine/` and reported.
//! Segments are deleted only once the hub has acknowledged every record in them
//! ([`Queue::acknowledge`]). Capacity is bounded in bytes and records, with an explicit
//! [`FullPolicy`].
//!
//! Depends on nothing else in dermedge.

mod key;
mod record;
mod segment;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use key::{hex, DeviceKey, KEY_BYTES};
pub use record::{
    new_record_id, now_ms, Embedding, EmbeddingType, HeadResult, QualityResult, Record,
    RECORD_FORMAT,
};
pub use segment::FRAME_OVERHEAD;
use segment::{Cipher, FrameRef, HeaderState, HEADER_LEN};

pub const QUEUE_FORMAT: &str = "dermedge-queue/1";
const META: &str = "queue.json";
const LOCK: &str = "LOCK";
const CURSOR: &str = "acked";
const CURSOR_TMP: &str = "acked.tmp";
const EVICTED: &str = "evicted.log";
const QUARANTINE: &str = "quarantine";
/// The sync client's request counter lives next to the queue it drains.
pub const SYNC_STATE: &str = "sync.json";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a device key: expected {expected}")]
    BadKeyFile {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{dir}: the queue is open in another process ({LOCK} is locked)")]
    Locked { dir: PathBuf },
    #[error(
        "{dir}: `{file}` is not part of a dermedge queue; the directory may only hold {META}, \
         {LOCK}, {CURSOR}, {EVICTED}, {SYNC_STATE}, {QUARANTINE}/ and seg-<20 digits>.dlog files"
    )]
    ForeignFile { dir: PathBuf, file: String },
    #[error("{path}: not a dermedge queue file: {message}")]
    NotAQueue { path: PathBuf, message: String },
    #[error(
        "{dir}: the queue was written with another device key (key check {stored}, this key's {given}); \
         nothing can be read with this key"
    )]
    WrongKey {
        dir: PathBuf,
        stored: String,
        given: String,
    },
    #[error("{dir}: the queue belongs to device `{stored}`, not `{given}`")]
    DeviceMismatch {
        dir: PathBuf,
        stored: String,
        given: String,
    },
    #[error("record {id} is {bytes} bytes of CBOR; the limit (max_record_bytes) is {limit}")]
    RecordTooLarge {
        id: String,
        bytes: usize,
        limit: usize,
    },
    #[error(
        "queue full ({records} unacknowledged records, {bytes} bytes; limits {max_records} records, \
         {max_bytes} bytes): record {id} refused, nothing already queued was touched"
    )]
    Full {
        id: String,
        records: u64,
        bytes: u64,
        max_records: u64,
        max_bytes: u64,
    },
    #[error("cannot acknowledge through {seq}: the queue's last record is {last}")]
    AckBeyondEnd { seq: u64, last: u64 },
    #[error("{field}: {message}")]
    BadOption {
        field: &'static str,
        message: String,
    },
    #[error("{path}: record {seq}: {message}")]
    Unreadable {
        path: PathBuf,
        seq: u64,
        message: String,
    },
}

type Result<T> = std::result::Result<T, QueueError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> QueueError + '_ {
    move |source| QueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// When an append becomes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Durability {
    /// fsync before `append` returns: every returned append is accepted.
    PerRecord,
    /// fsync once `max_records` appends are pending or the oldest pending one is `max_delay_ms`
    /// old (checked on append and on [`Queue::tick`]), and on [`Queue::commit`].
    Group { max_records: u32, max_delay_ms: u64 },
}

/// What to do when an append would exceed the capacity limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Refuse the new record ([`QueueError::Full`]); queued records are kept.
    Reject,
    /// Delete the oldest unacknowledged segment to make room, logged and journalled in
    /// `evicted.log`. Loses data by design: only for devices where the newest captures matter most.
    EvictOldest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueOptions {
    pub durability: Durability,
    /// A segment is closed and a new one started beyond this size.
    pub segment_bytes: u64,
    /// Largest record (CBOR, before sealing).
    pub max_record_bytes: usize,
    /// Capacity: bytes of segment files on disk.
    pub max_bytes: u64,
    /// Capacity: unacknowledged records.
    pub max_records: u64,
    pub full_policy: FullPolicy,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            durability: Durability::PerRecord,
            segment_bytes: 4 << 20,
            max_record_bytes: 1 << 20,
            max_bytes: 1 << 30,
            max_records: 1_000_000,
            full_policy: FullPolicy::Reject,
        }
    }
}

impl QueueOptions {
    pub fn validate(&self) -> Result<()> {
        let bad = |field, message: String| Err(QueueError::BadOption { field, message });
        if self.segment_bytes < 4096 {
            return bad(
                "segment_bytes",
                format!("{} is below 4096", self.segment_bytes),
            );
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > (64 << 20) {
            return bad(
                "max_record_bytes",
                format!("{} is outside 1..=67108864", self.max_record_bytes),
            );
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return bad(
                "max_bytes",
                format!(
                    "{} must be at least twice segment_bytes ({})",
                    self.max_bytes, self.segment_bytes
                ),
            );
        }
        if self.max_records == 0 {
            return bad("max_records", "must be at least 1".into());
        }
        if let Durability::Group { max_records: 0, .. } = self.durability {
            return bad("durability.max_records", "must be at least 1".into());
        }
        Ok(())
    }
}

/// Returned by [`Queue::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    /// The record is on stable storage: accepted.
    pub durable: bool,
}

/// A queued record with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: u64,
    pub record: Record,
    /// The record's CBOR exactly as appended.
    pub cbor: Vec<u8>,
}

/// What opening the queue found and repaired.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryReport {
    /// Appends cut short, truncated: (segment, offset, bytes).
    pub torn_tails: Vec<(PathBuf, u64, u64)>,
    /// Damaged bytes skipped in the middle of a segment: (segment, offset, bytes, reason).
    pub skipped: Vec<(PathBuf, u64, u64, String)>,
    /// Where each damaged or truncated byte range was copied before it was dropped.
    pub quarantined: Vec<PathBuf>,
    /// A segment header cut short while the segment was created, rewritten.
    pub headers_repaired: Vec<PathBuf>,
}

impl RecoveryReport {
    pub fn is_clean(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Records not yet acknowledged by the hub.
    pub pending_records: u64,
    /// Bytes of segment files.
    pub bytes: u64,
    pub segments: usize,
    pub last_seq: u64,
    pub durable_seq: u64,
    pub acked_seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: String,
    device_id: String,
    key_check: String,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
    frames: Vec<FrameRef>,
    bytes: u64,
}

impl Segment {
    fn last_seq(&self) -> Option<u64> {
        self.frames.last().map(|f| f.seq)
    }
}

pub struct Queue {
    dir: PathBuf,
    device_id: String,
    options: QueueOptions,
    cipher: Cipher,
    key_check: [u8; 16],
    segments: Vec<Segment>,
    active: File,
    last_seq: u64,
    durable_seq: u64,
    acked_seq: u64,
    pending_since: Option<Instant>,
    recovery: RecoveryReport,
    /// Unacknowledged records and bytes on disk, kept current so that `stats` (read on every
    /// preview frame and append) costs nothing; recounted on open, acknowledge and eviction.
    pending: u64,
    bytes: u64,
    _lock: File,
}

impl Queue {
    /// Open (creating if needed) the queue in `dir` for `device_id`, recovering it after a crash.
    pub fn open(
        dir: &Path,
        key: &DeviceKey,
        device_id: &str,
        options: QueueOptions,
    ) -> Result<Self> {
        options.validate()?;
        fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(QueueError::Locked { dir: dir.into() })
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }

        let mut segment_files = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match name.as_str() {
                META | LOCK | CURSOR | EVICTED | SYNC_STATE => {}
                CURSOR_TMP => fs::remove_file(entry.path()).map_err(io(&entry.path()))?,
                QUARANTINE if entry.path().is_dir() => {}
                _ => match segment::parse_segment_name(&name) {
                    Some(first) if entry.path().is_file() => {
                        segment_files.push((first, entry.path()))
                    }
                    _ => {
                        return Err(QueueError::ForeignFile {
                            dir: dir.into(),
                            file: name,
                        })
                    }
                },
            }
        }
        segment_files.sort();

        let key_check = key.check();
        let meta_path = dir.join(META);
        if meta_path.exists() {
            let meta: Meta =
                serde_json::from_str(&fs::read_to_string(&meta_path).map_err(io(&meta_path))?)
                    .map_err(|e| QueueError::NotAQueue {
                        path: meta_path.clone(),
                        message: e.to_string(),
                    })?;
            if meta.format != QUEUE_FORMAT {
                return Err(QueueError::NotAQueue {
                    path: meta_path,
                    message: format!("format {:?}, expected {QUEUE_FORMAT:?}", meta.format),
                });
            }
            if meta.key_check != hex(&key_check) {
                return Err(QueueError::WrongKey {
                    dir: dir.into(),
                    stored: meta.key_check,
                    given: hex(&key_check),
                });
            }
            if meta.device_id != device_id {
                return Err(QueueError::DeviceMismatch {
                    dir: dir.into(),
                    stored: meta.device_id,
                    given: device_id.into(),
                });
            }
        } else {
            if !segment_files.is_empty() {
                return Err(QueueError::NotAQueue {
                    path: meta_path,
                    message: "missing, but segment files are present".into(),
                });
            }
            let meta = Meta {
                format: QUEUE_FORMAT.into(),
                device_id: device_id.into(),
                key_check: hex(&key_check),
            };
            write_atomically(
                dir,
                &meta_path,
                &dir.join(".queue.json.tmp"),
                serde_json::to_string_pretty(&meta)
                    .expect("serialisable")
                    .as_bytes(),
            )?;
        }

        let acked_seq = read_cursor(&dir.join(CURSOR))?;
        let cipher = Cipher::new(&key.at_rest_key());
        let max_ciphertext = options.max_record_bytes + segment::TAG_LEN;
        let mut recovery = RecoveryReport::default();
        let mut segments = Vec::new();
        let count = segment_files.len();
        for (i, (first_seq, path)) in segment_files.into_iter().enumerate() {
            let last = i + 1 == count;
            let buf = fs::read(&path).map_err(io(&path))?;
            match segment::decode_header(&buf) {
                HeaderState::Valid {
                    first_seq: stored,
                    key_check: check,
                } => {
                    if stored != first_seq {
                        return Err(QueueError::NotAQueue {
                            path,
                            message: format!("header says first sequence {stored}"),
                        });
                    }
                    if check != key_check {
                        return Err(QueueError::WrongKey {
                            dir: dir.into(),
                            stored: hex(&check),
                            given: hex(&key_check),
                        });
                    }
                }
                HeaderState::Torn if last => {
                    log::warn!(
                        "{}: segment header cut short ({} bytes); rewriting it",
                        path.display(),
                        buf.len()
                    );
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io(&path))?;
                    file.set_len(0).map_err(io(&path))?;
                    file.write_all_at(&segment::encode_header(first_seq, &key_check), 0)
                        .map_err(io(&path))?;
                    file.sync_all().map_err(io(&path))?;
                    recovery.headers_repaired.push(path.clone());
                    segments.push(Segment {
                        first_seq,
                        path,
                        frames: Vec::new(),
                        bytes: HEADER_LEN as u64,
                    });
                    continue;
                }
                HeaderState::Torn | HeaderState::Foreign => {
                    return Err(QueueError::NotAQueue {
                        path,
                        message: "no valid segment header".into(),
                    })
                }
            }
            let scan = segment::scan(
                &buf,
                &cipher,
                first_seq.saturating_sub(1),
                max_ciphertext,
                last,
            );
            for d in &scan.damage {
                let copy = quarantine(
                    dir,
                    &path,
                    d.offset,
                    &buf[d.offset as usize..(d.offset + d.bytes) as usize],
                )?;
                recovery.quarantined.push(copy.clone());
                if d.torn_tail {
                    log::warn!(
                        "{}: torn tail at byte {} ({} bytes, {}): truncated; copy in {}",
                        path.display(),
                        d.offset,
                        d.bytes,
                        d.reason,
                        copy.display()
                    );
                    recovery.torn_tails.push((path.clone(), d.offset, d.bytes));
                } else {
                    log::error!(
                        "{}: damaged record skipped at byte {} ({} bytes, {}); copy in {}",
                        path.display(),
                        d.offset,
                        d.bytes,
                        d.reason,
                        copy.display()
                    );
                    recovery
                        .skipped
                        .push((path.clone(), d.offset, d.bytes, d.reason.clone()));
                }
            }
            let mut bytes = buf.len() as u64;
            if last && scan.valid_end < bytes && scan.damage.last().is_some_and(|d| d.torn_tail) {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                file.set_len(scan.valid_end).map_err(io(&path))?;
                file.sync_all().map_err(io(&path))?;
                bytes = scan.valid_end;
            }
            segments.push(Segment {
                first_seq,
                path,
                frames: scan.frames,
                bytes,
            });
        }
        let last_seq = segments
            .iter()
            .filter_map(Segment::last_seq)
            .max()
            .unwrap_or(0)
            .max(acked_seq);

        let active = match segments.last() {
            Some(s) => OpenOptions::new()
                .append(true)
                .open(&s.path)
                .map_err(io(&s.path))?,
            None => {
                let (segment, file) = create_segment(dir, last_seq + 1, &key_check)?;
                segments.push(segment);
                file
            }
        };
        let mut queue = Self {
            dir: dir.into(),
            device_id: device_id.into(),
            options,
            cipher,
            key_check,
            segments,
            active,
            last_seq,
            durable_seq: last_seq,
            acked_seq,
            pending_since: None,
            recovery,
            pending: 0,
            bytes: 0,
            _lock: lock,
        };
        queue.remove_acknowledged()?;
        queue.recount();
        let stats = queue.stats();
        log::info!(
            "queue {}: {} pending records in {} segments ({} bytes), acknowledged through {}",
            dir.display(),
            stats.pending_records,
            stats.segments,
            stats.bytes,
            acked_seq
        );
        Ok(queue)
    }

    /// The device a queue directory belongs to, from its `queue.json`, without opening it.
    pub fn stored_device_id(dir: &Path) -> Option<String> {
        let text = fs::read_to_string(dir.join(META)).ok()?;
        serde_json::from_str::<Meta>(&text)
            .ok()
            .map(|m| m.device_id)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    pub fn stats(&self) -> QueueStats {
        QueueStats {
            pending_records: self.pending,
            bytes: self.bytes,
            segments: self.segments.len(),
            last_seq: self.last_seq,
            durable_seq: self.durable_seq,
            acked_seq: self.acked_seq,
        }
    }

    fn recount(&mut self) {
        self.pending = self
            .segments
            .iter()
            .map(|s| s.frames.iter().filter(|f| f.seq > self.acked_seq).count() as u64)
            .sum();
        self.bytes = self.segments.iter().map(|s| s.bytes).sum();
    }

    /// Append `record`. Under [`Durability::PerRecord`] it is accepted when this returns `Ok`;
    /// under group commit, once [`Receipt::durable`] or [`Queue::durable_seq`] says so.
    pub fn append(&mut self, record: &Record) -> Result<Receipt> {
        let cbor = record.to_cbor();
        if cbor.len() > self.options.max_record_bytes {
            return Err(QueueError::RecordTooLarge {
                id: record.id.clone(),
                bytes: cbor.len(),
                limit: self.options.max_record_bytes,
            });
        }
        let frame_len = (cbor.len() + FRAME_OVERHEAD) as u64;
        self.make_room(&record.id, frame_len)?;
        if self.active_segment().bytes + frame_len > self.options.segment_bytes
            && !self.active_segment().frames.is_empty()
        {
            self.rotate()?;
        }
        let seq = self.last_seq + 1;
        let frame = self.cipher.seal(seq, &cbor);
        let segment = self.segments.last_mut().expect("an active segment");
        let offset = segment.bytes;
        if let Err(e) = self.active.write_all(&frame) {
            // Leave no half frame behind: the log stays exactly the accepted records.
            let _ = self.active.set_len(offset);
            return Err(io(&segment.path)(e));
        }
        segment.frames.push(FrameRef {
            seq,
            offset,
            len: frame.len() as u32,
        });
        segment.bytes += frame_len;
        self.pending += 1;
        self.bytes += frame_len;
        self.last_seq = seq;
        self.pending_since.get_or_insert_with(Instant::now);
        let durable = match self.options.durability {
            Durability::PerRecord => true,
            Durability::Group {
                max_records,
                max_delay_ms,
            } => {
                self.last_seq - self.durable_seq >= u64::from(max_records)
                    || self
                        .pending_since
                        .is_some_and(|t| t.elapsed() >= Duration::from_millis(max_delay_ms))
            }
        };
        if durable {
            self.commit()?;
        }
        Ok(Receipt {
            seq,
            durable: self.durable_seq >= seq,
        })
    }

    /// Make every appended record durable (fsync).
    pub fn commit(&mut self) -> Result<()> {
        if self.durable_seq < self.last_seq {
            let path = &self.active_segment().path;
            self.active.sync_data().map_err(io(path))?;
            self.durable_seq = self.last_seq;
        }
        self.pending_since = None;
        Ok(())
    }

    /// Group commit's clock: commit if the oldest pending append is older than the delay.
    pub fn tick(&mut self) -> Result<()> {
        if let Durability::Group { max_delay_ms, .. } = self.options.durability {
            if self
                .pending_since
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(max_delay_ms))
            {
                self.commit()?;
            }
        }
        Ok(())
    }

    fn active_segment(&self) -> &Segment {
        self.segments.last().expect("an active segment")
    }

    fn rotate(&mut self) -> Result<()> {
        self.commit()?;
        let (segment, file) = create_segment(&self.dir, self.last_seq + 1, &self.key_check)?;
        log::debug!("queue: new segment {}", segment.path.display());
        self.bytes += segment.bytes;
        self.segments.push(segment);
        self.active = file;
        Ok(())
    }

    fn make_room(&mut self, id: &str, frame_len: u64) -> Result<()> {
        loop {
            let stats = self.stats();
            let over = stats.pending_records + 1 > self.options.max_records
                || stats.bytes + frame_len > self.options.max_bytes;
            if !over {
                return Ok(());
            }
            let full = QueueError::Full {
                id: id.into(),
                records: stats.pending_records,
                bytes: stats.bytes,
                max_records: self.options.max_records,
                max_bytes: self.options.max_bytes,
            };
            if self.options.full_policy == FullPolicy::Reject || self.segments.len() < 2 {
                if self.options.full_policy == FullPolicy::EvictOldest {
                    // The only segment is the one being written: start another, then evict.
                    if !self.active_segment().frames.is_empty() {
                        self.rotate()?;
                        continue;
                    }
                }
                log::warn!("{full}");
                return Err(full);
            }
            self.evict_oldest()?;
        }
    }

    fn evict_oldest(&mut self) -> Result<()> {
        let oldest = self.segments.remove(0);
        let (first, last) = (
            oldest.frames.first().map_or(oldest.first_seq, |f| f.seq),
            oldest.last_seq().unwrap_or(oldest.first_seq),
        );
        let line = format!(
            "{} evicted records {first}..={last} ({} unacknowledged) from {}: queue full\n",
            now_ms(),
            oldest
                .frames
                .iter()
                .filter(|f| f.seq > self.acked_seq)
                .count(),
            oldest.path.display()
        );
        let journal = self.dir.join(EVICTED);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal)
            .map_err(io(&journal))?;
        f.write_all(line.as_bytes()).map_err(io(&journal))?;
        f.sync_all().map_err(io(&journal))?;
        log::error!("queue full: {}", line.trim_end());
        fs::remove_file(&oldest.path).map_err(io(&oldest.path))?;
        self.recount();
        sync_dir(&self.dir)
    }

    /// Durable records after `after_seq`, in order, at most `max_records` and (beyond the first)
    /// `max_bytes` of CBOR.
    pub fn read_after(
        &self,
        after_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Stored>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for segment in &self.segments {
            if segment.last_seq().is_none_or(|l| l <= after_seq) {
                continue;
            }
            let file = File::open(&segment.path).map_err(io(&segment.path))?;
            for f in segment
                .frames
                .iter()
                .filter(|f| f.seq > after_seq && f.seq <= self.durable_seq)
            {
                if out.len() >= max_records
                    || (!out.is_empty() && bytes + f.len as usize > max_bytes)
                {
                    return Ok(out);
                }
                let mut frame = vec![0u8; f.len as usize];
                file.read_exact_at(&mut frame, f.offset)
                    .map_err(io(&segment.path))?;
                let unreadable = |message: String| QueueError::Unreadable {
                    path: segment.path.clone(),
                    seq: f.seq,
                    message,
                };
                if segment::check_frame(&frame, 0, frame.len()).map(|(s, _)| s) != Some(f.seq) {
                    return Err(unreadable(
                        "changed on disk since the queue was opened".into(),
                    ));
                }
                let cbor = self
                    .cipher
                    .open(&frame)
                    .ok_or_else(|| unreadable("does not authenticate".into()))?;
                let record = Record::from_cbor(&cbor).map_err(unreadable)?;
                bytes += cbor.len();
                out.push(Stored {
                    seq: f.seq,
                    record,
                    cbor,
                });
            }
        }
        Ok(out)
    }

    /// Records not yet acknowledged, as for [`Queue::read_after`].
    pub fn unacknowledged(&self, max_records: usize, max_bytes: usize) -> Result<Vec<Stored>> {
        self.read_after(self.acked_seq, max_records, max_bytes)
    }

    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    /// The hub holds every record through `seq`: persist the cursor, then delete segments it covers.
    pub fn acknowledge(&mut self, seq: u64) -> Result<()> {
        if seq > self.last_seq {
            return Err(QueueError::AckBeyondEnd {
                seq,
                last: self.last_seq,
            });
        }
        if seq <= self.acked_seq {
            return Ok(());
        }
        write_atomically(
            &self.dir,
            &self.dir.join(CURSOR),
            &self.dir.join(CURSOR_TMP),
            format!("{seq}\n").as_bytes(),
        )?;
        self.acked_seq = seq;
        self.remove_acknowledged()?;
        self.recount();
        Ok(())
    }

    fn remove_acknowledged(&mut self) -> Result<()> {
        let acked = self.acked_seq;
        let mut removed = false;
        while self.segments.len() > 1 {
            let first = &self.segments[0];
            if first.last_seq().is_some_and(|l| l > acked) {
                break;
            }
            fs::remove_file(&first.path).map_err(io(&first.path))?;
            log::debug!(
                "queue: removed acknowledged segment {}",
                first.path.display()
            );
            self.segments.remove(0);
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn create_segment(dir: &Path, first_seq: u64, key_check: &[u8; 16]) -> Result<(Segment, File)> {
    let path = dir.join(segment::segment_name(first_seq));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io(&path))?;
    file.write_all(&segment::encode_header(first_seq, key_check))
        .map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    sync_dir(dir)?;
    Ok((
        Segment {
            first_seq,
            path,
            frames: Vec::new(),
            bytes: HEADER_LEN as u64,
        },
        file,
    ))
}

fn read_cursor(path: &Path) -> Result<u64> {
    match fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|_| QueueError::NotAQueue {
            path: path.into(),
            message: format!(
                "expected the acknowledged sequence number, found {:?}",
                text.trim()
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(path)(e)),
    }
}

fn write_atomically(dir: &Path, path: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(tmp).map_err(io(tmp))?;
    f.write_all(bytes).map_err(io(tmp))?;
    f.sync_all().map_err(io(tmp))?;
    fs::rename(tmp, path).map_err(io(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn quarantine(dir: &Path, segment: &Path, offset: u64, bytes: &[u8]) -> Result<PathBuf> {
    let qdir = dir.join(QUARANTINE);
    fs::create_dir_all(&qdir).map_err(io(&qdir))?;
    let name = segment
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = qdir.join(format!("{name}.at-{offset}.bin"));
    if path.exists() {
        return Ok(path);
    }
    let mut f = File::create(&path).map_err(io(&path))?;
    f.write_all(bytes).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests;
