//! dermedge-queue: where captures wait, safely, for a link to the hub.
//!
//! An append-only log of CBOR [`Record`]s in segment files, each record framed with its length,
//! sequence number and CRC, and sealed with XChaCha20-Poly1305 under a key derived from the
//! device key: whoever finds a lost device reads nothing. A record counts as **accepted** once it
//! is durable ([`Receipt::durable`], [`Queue::durable_seq`]): at once under
//! [`Durability::PerRecord`], at the next group commit under [`Durability::Group`].
//!
//! Every file operation goes through [`Storage`], whose contract is POSIX's read strictly; the
//! tests run the queue on a model of the page cache that loses unsynced writes and directory
//! entries at a simulated power cut. The recovery point (`state`: the durable high-water mark and
//! the hub's cursor) says what was once durable, so opening a queue can tell an append cut short
//! (after the high-water mark: truncated) from damage to accepted records (before it: copied to
//! `quarantine/`, reported, journalled as a [`Gap`]). A sequence number at or below the
//! high-water mark is never given to another record. A range that is simply gone (a deleted
//! segment) is journalled as missing. Known temporary files are rolled back. A failed sync
//! poisons the handle: the records it covered are reported not saved and never synced.
//!
//! Segments are deleted only once the hub has acknowledged every record in them
//! ([`Queue::acknowledge`]), which needs no free space. Capacity is bounded in bytes and records,
//! with an explicit [`FullPolicy`].
//!
//! Depends on `dermedge-record` alone (the envelopes it stores, the device key).

mod gaps;
mod segment;
mod state;
mod storage;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod sim;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dermedge_record::{hex, DeviceKey, Envelope, HubPublic, Record};
use serde::{Deserialize, Serialize};

pub use gaps::{Gap, GapReason};
pub use segment::FRAME_OVERHEAD;
pub use storage::{Disk, Entry, LockGuard, Open, Storage, StorageFile};

use segment::{Cipher, FrameRef, HeaderState, HEADER_LEN};
use state::RecoveryPoint;

pub const QUEUE_FORMAT: &str = "dermedge-queue/1";
const META: &str = "queue.json";
const META_TMP: &str = ".queue.json.tmp";
const LOCK: &str = "LOCK";
const STATE: &str = "state";
const STATE_TMP: &str = "state.tmp";
const GAPS: &str = "gaps.log";
const QUARANTINE: &str = "quarantine";
/// Written by earlier releases; read once and replaced by `state`.
const LEGACY_CURSOR: &str = "acked";
const LEGACY_CURSOR_TMP: &str = "acked.tmp";
const LEGACY_EVICTED: &str = "evicted.log";
/// The sync client's request counter lives next to the queue it drains.
pub const SYNC_STATE: &str = "sync.json";
/// Where the sync client writes [`SYNC_STATE`] before renaming it into place.
pub const SYNC_STATE_TMP: &str = "sync.json.tmp";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] dermedge_record::KeyError),
    #[error("{dir}: the queue is open in another process ({LOCK} is locked)")]
    Locked { dir: PathBuf },
    #[error(
        "{dir}: `{file}` is not part of a dermedge queue; the directory may only hold {META}, \
         {LOCK}, {STATE}, {GAPS}, {SYNC_STATE}, {QUARANTINE}/ and seg-<20 digits>.dlog files"
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
    #[error("record {id} is {bytes} bytes sealed; the limit (max_record_bytes) is {limit}")]
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
    #[error(
        "{dir}: writing stopped after a failed sync ({cause}); records since the last successful \
         sync were not saved; reopen the queue"
    )]
    Poisoned { dir: PathBuf, cause: String },
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

/// The size a segment file is rolled over at unless [`QueueOptions::segment_bytes`] says otherwise.
pub const DEFAULT_SEGMENT_BYTES: u64 = 4 << 20;

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
    /// Largest record (its sealed envelope's CBOR).
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
            segment_bytes: DEFAULT_SEGMENT_BYTES,
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
    pub envelope: Envelope,
    /// The envelope's CBOR exactly as appended.
    pub cbor: Vec<u8>,
}

/// What opening the queue found and repaired.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryReport {
    /// Known temporary files of an interrupted update, removed (the update is rolled back).
    pub rolled_back: Vec<PathBuf>,
    /// Appends cut short (never durable), truncated: (segment, offset, bytes).
    pub torn_tails: Vec<(PathBuf, u64, u64)>,
    /// Damaged bytes of once-durable records, skipped: (segment, offset, bytes, reason).
    pub skipped: Vec<(PathBuf, u64, u64, String)>,
    /// Where each damaged or truncated byte range was copied before it was dropped.
    pub quarantined: Vec<PathBuf>,
    /// Segments whose records were all acknowledged or evicted, left by an interrupted removal.
    pub reclaimed: Vec<PathBuf>,
    /// Losses found by this recovery (also journalled in `gaps.log`).
    pub gaps: Vec<Gap>,
    /// The recovery point could not be read and was rebuilt from the segments.
    pub state_rebuilt: bool,
}

impl RecoveryReport {
    pub fn is_clean(&self) -> bool {
        *self == Self::default()
    }

    /// Whether once-durable data was found damaged or missing (not merely an interrupted update).
    pub fn found_damage(&self) -> bool {
        !self.skipped.is_empty() || !self.gaps.is_empty() || self.state_rebuilt
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
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    device_id: String,
    options: QueueOptions,
    cipher: Cipher,
    key_check: [u8; 16],
    segments: Vec<Segment>,
    active: Box<dyn StorageFile>,
    state_file: Box<dyn StorageFile>,
    point: RecoveryPoint,
    last_seq: u64,
    durable_seq: u64,
    acked_seq: u64,
    pending_since: Option<Instant>,
    recovery: RecoveryReport,
    /// Every loss journalled in `gaps.log`.
    gaps: Vec<Gap>,
    /// Set by a failed write or sync whose effect on disk is unknown; cleared by reopening.
    poisoned: Option<String>,
    /// Unacknowledged records and bytes on disk, kept current so that `stats` (read on every
    /// preview frame and append) costs nothing; recounted on open, acknowledge and eviction.
    pending: u64,
    bytes: u64,
    /// What records queued before records were sealed to the hub are sealed to when read.
    legacy_seal: Option<HubPublic>,
    /// Held for the queue's life (taken over by [`Queue::reopen`]).
    lock: Option<LockGuard>,
}

/// A segment file found by the directory listing, before its frames are scanned.
struct Found {
    first_seq: u64,
    path: PathBuf,
}

impl Queue {
    /// Open (creating if needed) the queue in `dir` for `device_id`, recovering it after a crash.
    pub fn open(
        dir: &Path,
        key: &DeviceKey,
        device_id: &str,
        options: QueueOptions,
    ) -> Result<Self> {
        Self::open_with(Arc::new(Disk), dir, key, device_id, options)
    }

    /// [`Queue::open`] on the given storage.
    pub fn open_with(
        storage: Arc<dyn Storage>,
        dir: &Path,
        key: &DeviceKey,
        device_id: &str,
        options: QueueOptions,
    ) -> Result<Self> {
        options.validate()?;
        let st = storage.as_ref();
        if !st.exists(dir).map_err(io(dir))? {
            st.create_dir_all(dir).map_err(io(dir))?;
        }
        // Every open makes the directory's own entry, and every entry in it, durable: an
        // earlier failed directory sync must not leave a segment that a power cut can take.
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        st.sync_dir(parent).map_err(io(parent))?;
        st.sync_dir(dir).map_err(io(dir))?;
        let lock_path = dir.join(LOCK);
        let Some(lock) = st.lock(&lock_path).map_err(io(&lock_path))? else {
            return Err(QueueError::Locked { dir: dir.into() });
        };
        let mut queue = Self::recover(storage.clone(), dir, key, device_id, options)?;
        queue.lock = Some(lock);
        Ok(queue)
    }

    /// Recover again, keeping the lock: what a device does after a failed sync poisoned the
    /// handle ([`QueueError::Poisoned`]).
    pub fn reopen(&mut self, key: &DeviceKey) -> Result<()> {
        let mut fresh = Self::recover(
            self.storage.clone(),
            &self.dir,
            key,
            &self.device_id,
            self.options.clone(),
        )?;
        fresh.lock = self.lock.take();
        fresh.legacy_seal = self.legacy_seal;
        *self = fresh;
        Ok(())
    }

    /// Records queued by an earlier release, before records were sealed to the hub, are read
    /// out sealed to `hub` (the hub deduplicates by record id, so a fresh seal per read is
    /// harmless). Without it they are [`QueueError::Unreadable`], naming the fix.
    pub fn seal_earlier_records_to(&mut self, hub: HubPublic) {
        self.legacy_seal = Some(hub);
    }

    /// Whether a failed write or sync stopped appends until [`Queue::reopen`].
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Everything [`Queue::open_with`] does once the lock is held.
    fn recover(
        storage: Arc<dyn Storage>,
        dir: &Path,
        key: &DeviceKey,
        device_id: &str,
        options: QueueOptions,
    ) -> Result<Self> {
        let st = storage.as_ref();
        let mut recovery = RecoveryReport::default();
        let found = list_queue_dir(st, dir, &mut recovery)?;

        let key_check = key.check();
        check_or_create_meta(st, dir, device_id, &key_check, !found.is_empty())?;
        let cipher = Cipher::new(&key.at_rest_key());

        let (mut point, high_water) = read_recovery_point(st, dir, &mut recovery)?;
        let acked_seq = point.acked;
        let gaps_path = dir.join(GAPS);
        let mut gaps = read_gaps_journal(st, &gaps_path)?;
        let (mut segments, damaged) = recover_segments(
            st,
            dir,
            &cipher,
            &key_check,
            &options,
            found,
            high_water,
            &mut recovery,
        )?;

        let found_top = segments
            .iter()
            .filter_map(Segment::last_seq)
            .max()
            .unwrap_or(0);
        let last_seq = found_top.max(high_water.unwrap_or(0)).max(acked_seq);
        let present: Vec<u64> = segments
            .iter()
            .flat_map(|s| s.frames.iter().map(|f| f.seq))
            .filter(|&s| s > acked_seq)
            .collect();
        let new_gaps = find_gaps(
            acked_seq,
            last_seq,
            &present,
            &gaps,
            &damaged,
            dermedge_record::now_ms(),
        );
        for gap in &new_gaps {
            log::error!("queue {}: {gap}; journalled in {GAPS}", dir.display());
        }
        if let Err(e) = gaps::append(st, &gaps_path, &new_gaps) {
            // Found again by the next recovery; the queue must open on a full disk.
            log::error!("{}: cannot journal the losses: {e}", gaps_path.display());
        }
        gaps.extend(new_gaps.iter().cloned());
        recovery.gaps = new_gaps;

        let state_file = open_state_file(st, dir, &mut point, high_water, acked_seq, last_seq)?;
        let active = match segments.last() {
            Some(s) => st.open(&s.path, Open::Existing).map_err(io(&s.path))?,
            None => {
                let (segment, file) = create_segment(st, dir, last_seq + 1, &key_check)?;
                segments.push(segment);
                file
            }
        };
        let mut queue = Self {
            storage,
            dir: dir.into(),
            device_id: device_id.into(),
            options,
            cipher,
            key_check,
            segments,
            active,
            state_file,
            point,
            last_seq,
            durable_seq: last_seq,
            acked_seq,
            pending_since: None,
            recovery,
            gaps,
            poisoned: None,
            pending: 0,
            bytes: 0,
            legacy_seal: None,
            lock: None,
        };
        queue.reclaim()?;
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
        let text = std::fs::read_to_string(dir.join(META)).ok()?;
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

    /// Every loss the queue has journalled.
    pub fn gaps(&self) -> &[Gap] {
        &self.gaps
    }

    /// Losses the hub has not yet been told about: those not entirely at or below the
    /// acknowledged cursor (the hub acknowledges a batch only after storing the gaps sent with it).
    pub fn unreported_gaps(&self) -> Vec<Gap> {
        self.gaps
            .iter()
            .filter(|g| g.to > self.acked_seq)
            .cloned()
            .collect()
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

    fn check_poisoned(&self) -> Result<()> {
        match &self.poisoned {
            Some(cause) => Err(QueueError::Poisoned {
                dir: self.dir.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Append `record`. Under [`Durability::PerRecord`] it is accepted when this returns `Ok`;
    /// under group commit, once [`Receipt::durable`] or [`Queue::durable_seq`] says so.
    pub fn append(&mut self, record: &Envelope) -> Result<Receipt> {
        self.check_poisoned()?;
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
        if let Err(e) = self.active.write_all_at(&frame, offset) {
            // Leave no half frame behind: the log stays exactly the records appended before.
            if let Err(undo) = self.active.set_len(offset) {
                self.poisoned = Some(format!("cutting back a failed append: {undo}"));
            }
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

    /// Make every appended record durable: sync the active segment, then move the recovery
    /// point's high-water mark past them.
    pub fn commit(&mut self) -> Result<()> {
        self.check_poisoned()?;
        if self.durable_seq < self.last_seq {
            let path = self.active_segment().path.clone();
            if let Err(e) = self.active.sync_data() {
                // The kernel may have dropped the unsynced pages and will not say so again
                // (fsyncgate): forget those records here, and leave the high-water mark below
                // them so that recovery truncates whatever of them reached the disk.
                self.forget_unsynced();
                self.poisoned = Some(format!("{}: {e}", path.display()));
                return Err(io(&path)(e));
            }
            let state_path = self.dir.join(STATE);
            if let Err(e) =
                self.point
                    .store(self.state_file.as_mut(), self.acked_seq, self.last_seq)
            {
                // `store` put the old point back: no recovery counts these records.
                self.forget_unsynced();
                self.poisoned = Some(format!("{}: {e}", state_path.display()));
                return Err(io(&state_path)(e));
            }
            self.durable_seq = self.last_seq;
            log::debug!("queue: records through {} are durable", self.durable_seq);
        }
        self.pending_since = None;
        Ok(())
    }

    fn forget_unsynced(&mut self) {
        let durable = self.durable_seq;
        let segment = self.segments.last_mut().expect("an active segment");
        if let Some(cut) = segment.frames.iter().position(|f| f.seq > durable) {
            let end = segment.frames[cut].offset;
            segment.frames.truncate(cut);
            segment.bytes = end;
            let _ = self.active.set_len(end);
        }
        self.last_seq = durable;
        self.pending_since = None;
        self.recount();
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
        // Seal the segment at its last record: bytes of a failed append, cut back but never
        // synced, must not reappear after a power cut as damage in a segment that is not last.
        let sealed = self.active_segment();
        let (path, end) = (sealed.path.clone(), sealed.bytes);
        self.active
            .set_len(end)
            .and_then(|()| self.active.sync_data())
            .map_err(io(&path))?;
        let (segment, file) = create_segment(
            self.storage.as_ref(),
            &self.dir,
            self.last_seq + 1,
            &self.key_check,
        )?;
        log::debug!("queue: new segment {}", segment.path.display());
        self.bytes += segment.bytes;
        self.segments.push(segment);
        self.active = file;
        // The segment just closed may hold only acknowledged records.
        self.remove_acknowledged()?;
        self.recount();
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

    /// Delete the oldest segment to make room: journal the loss first (synced), then remove it.
    fn evict_oldest(&mut self) -> Result<()> {
        let storage = self.storage.clone();
        let st = storage.as_ref();
        let oldest = &self.segments[0];
        let unacked: Vec<u64> = oldest
            .frames
            .iter()
            .map(|f| f.seq)
            .filter(|&s| s > self.acked_seq)
            .collect();
        if let (Some(&from), Some(&to)) = (unacked.first(), unacked.last()) {
            let gap = Gap {
                from,
                to,
                reason: GapReason::Evicted,
                at_ms: dermedge_record::now_ms(),
            };
            let journal = self.dir.join(GAPS);
            gaps::append(st, &journal, std::slice::from_ref(&gap)).map_err(io(&journal))?;
            log::error!(
                "queue full: {gap} ({} records) from {}",
                unacked.len(),
                oldest.path.display()
            );
            self.gaps.push(gap);
        }
        // Journalled as evicted: whether or not the removal works, its records are not sent
        // (a segment left behind is removed by the next open).
        let evicted = self.segments.remove(0);
        self.recount();
        st.remove_file(&evicted.path).map_err(io(&evicted.path))?;
        st.sync_dir(&self.dir).map_err(io(&self.dir))
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
            let file = self
                .storage
                .open(&segment.path, Open::Existing)
                .map_err(io(&segment.path))?;
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
                let (envelope, cbor) = match Envelope::from_cbor(&cbor) {
                    Ok(envelope) => (envelope, cbor),
                    Err(e) => match (Record::from_cbor(&cbor), &self.legacy_seal) {
                        (Ok(record), Some(hub)) => {
                            let envelope = Envelope::seal(&record, hub);
                            let cbor = envelope.to_cbor();
                            (envelope, cbor)
                        }
                        (Ok(_), None) => {
                            return Err(unreadable(
                                "queued before records were sealed to the hub: give the hub's \
                                 public key (--hub-public, device.hub_public) to send it"
                                    .into(),
                            ))
                        }
                        (Err(_), _) => return Err(unreadable(e)),
                    },
                };
                bytes += cbor.len();
                out.push(Stored {
                    seq: f.seq,
                    envelope,
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

    /// The hub holds every record through `seq`: persist the cursor (in place: this works on a
    /// full disk), then delete the segments it covers.
    pub fn acknowledge(&mut self, seq: u64) -> Result<()> {
        if seq > self.durable_seq {
            return Err(QueueError::AckBeyondEnd {
                seq,
                last: self.durable_seq,
            });
        }
        if seq <= self.acked_seq {
            return Ok(());
        }
        let state_path = self.dir.join(STATE);
        self.point
            .store(self.state_file.as_mut(), seq, self.durable_seq)
            .map_err(io(&state_path))?;
        self.acked_seq = seq;
        self.remove_acknowledged()?;
        self.recount();
        Ok(())
    }

    /// On open: remove segments that an interrupted acknowledgement or eviction should have
    /// removed (every record in them acknowledged, or journalled as evicted).
    fn reclaim(&mut self) -> Result<()> {
        let done = |seq: u64| {
            seq <= self.acked_seq
                || self
                    .gaps
                    .iter()
                    .any(|g| g.reason == GapReason::Evicted && g.covers(seq))
        };
        let stale: Vec<usize> = (0..self.segments.len().saturating_sub(1))
            .filter(|&i| self.segments[i].frames.iter().all(|f| done(f.seq)))
            .collect();
        for &i in stale.iter().rev() {
            let segment = self.segments.remove(i);
            log::warn!(
                "{}: every record in it is acknowledged or evicted; removed (an interrupted removal)",
                segment.path.display()
            );
            self.storage
                .remove_file(&segment.path)
                .map_err(io(&segment.path))?;
            self.recovery.reclaimed.push(segment.path);
        }
        if !stale.is_empty() {
            self.storage.sync_dir(&self.dir).map_err(io(&self.dir))?;
        }
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
            self.storage
                .remove_file(&first.path)
                .map_err(io(&first.path))?;
            log::debug!(
                "queue: removed acknowledged segment {}",
                first.path.display()
            );
            self.segments.remove(0);
            removed = true;
        }
        if removed {
            self.storage.sync_dir(&self.dir).map_err(io(&self.dir))?;
        }
        Ok(())
    }
}

/// An inclusive range of sequence numbers.
type SeqRange = (u64, u64);

/// The recovery point and the high-water mark it vouches for. Without one (an earlier release,
/// or both slots damaged) there is no high-water mark: the scan of the segments is trusted.
fn read_recovery_point(
    st: &dyn Storage,
    dir: &Path,
    recovery: &mut RecoveryReport,
) -> Result<(RecoveryPoint, Option<u64>)> {
    let state_path = dir.join(STATE);
    match st.read(&state_path) {
        Ok(bytes) => match RecoveryPoint::newest(&bytes) {
            Some(p) => Ok((p, Some(p.durable))),
            None => {
                log::error!(
                    "{}: neither recovery point is readable; rebuilding it from the segments",
                    state_path.display()
                );
                recovery.state_rebuilt = true;
                Ok((RecoveryPoint::default(), None))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let acked = read_legacy_cursor(st, &dir.join(LEGACY_CURSOR))?;
            let point = RecoveryPoint {
                generation: 0,
                acked,
                durable: acked,
            };
            Ok((point, None))
        }
        Err(e) => Err(io(&state_path)(e)),
    }
}

/// Every loss journalled so far (a damaged journal line is skipped and logged by the parser).
fn read_gaps_journal(st: &dyn Storage, gaps_path: &Path) -> Result<Vec<Gap>> {
    match st.read(gaps_path) {
        Ok(bytes) => Ok(gaps::parse(&bytes, gaps_path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(gaps_path)(e)),
    }
}

/// Each segment found, recovered in order (only the last may have a torn tail); also the
/// sequence ranges where once-durable bytes were found damaged.
#[allow(clippy::too_many_arguments)]
fn recover_segments(
    st: &dyn Storage,
    dir: &Path,
    cipher: &Cipher,
    key_check: &[u8; 16],
    options: &QueueOptions,
    found: Vec<Found>,
    high_water: Option<u64>,
    recovery: &mut RecoveryReport,
) -> Result<(Vec<Segment>, Vec<SeqRange>)> {
    let mut segments = Vec::new();
    let mut damaged: Vec<SeqRange> = Vec::new();
    let count = found.len();
    for (i, found) in found.into_iter().enumerate() {
        let last = i + 1 == count;
        if let Some(segment) = recover_segment(
            st,
            dir,
            cipher,
            key_check,
            options,
            found,
            last,
            high_water,
            &mut damaged,
            recovery,
        )? {
            segments.push(segment);
        }
    }
    Ok((segments, damaged))
}

/// The sequence numbers after `acked_seq` up to `last_seq` that are neither `present` nor
/// already journalled in `known`, as gaps: `Damaged` where they overlap a damaged range, else
/// `Missing`.
fn find_gaps(
    acked_seq: u64,
    last_seq: u64,
    present: &[u64],
    known: &[Gap],
    damaged: &[SeqRange],
    now_ms: i64,
) -> Vec<Gap> {
    gaps::uncovered(acked_seq + 1, last_seq, present, known)
        .into_iter()
        .map(|(from, to)| Gap {
            from,
            to,
            reason: if damaged.iter().any(|&(a, b)| from <= b && a <= to) {
                GapReason::Damaged
            } else {
                GapReason::Missing
            },
            at_ms: now_ms,
        })
        .collect()
}

/// The recovery point's file, open for updates: written afresh when there was none (or it was
/// rebuilt), else advanced to `last_seq` when the scan found frames past its high-water mark.
fn open_state_file(
    st: &dyn Storage,
    dir: &Path,
    point: &mut RecoveryPoint,
    high_water: Option<u64>,
    acked_seq: u64,
    last_seq: u64,
) -> Result<Box<dyn StorageFile>> {
    let state_path = dir.join(STATE);
    if high_water.is_none() || !st.exists(&state_path).map_err(io(&state_path))? {
        *point = RecoveryPoint {
            generation: 1,
            acked: acked_seq,
            durable: last_seq,
        };
        write_atomically(
            st,
            dir,
            &state_path,
            &dir.join(STATE_TMP),
            &point.initial_file(),
        )?;
        let legacy = dir.join(LEGACY_CURSOR);
        // Should the removal not last, a stale `acked` is ignored next to `state`.
        if st.exists(&legacy).map_err(io(&legacy))? {
            st.remove_file(&legacy).map_err(io(&legacy))?;
        }
        return st
            .open(&state_path, Open::Existing)
            .map_err(io(&state_path));
    }
    let mut file = st
        .open(&state_path, Open::Existing)
        .map_err(io(&state_path))?;
    if last_seq > point.durable {
        // Only when the high-water mark ranged past every frame: keep it where it was.
        point
            .store(file.as_mut(), acked_seq, last_seq)
            .map_err(io(&state_path))?;
    }
    Ok(file)
}

/// The segment files in `dir`, sorted; known temporary files are removed (their update rolled
/// back) and anything else is refused by name.
fn list_queue_dir(
    st: &dyn Storage,
    dir: &Path,
    recovery: &mut RecoveryReport,
) -> Result<Vec<Found>> {
    let mut found = Vec::new();
    for entry in st.list(dir).map_err(io(dir))? {
        let path = dir.join(&entry.name);
        match entry.name.as_str() {
            META | LOCK | STATE | GAPS | SYNC_STATE | LEGACY_CURSOR | LEGACY_EVICTED
                if !entry.is_dir => {}
            QUARANTINE if entry.is_dir => {}
            META_TMP | STATE_TMP | LEGACY_CURSOR_TMP | SYNC_STATE_TMP if !entry.is_dir => {
                recovery.rolled_back.push(path)
            }
            name => match (segment::parse_segment_name(name), entry.is_dir) {
                (Some(first_seq), false) => found.push(Found { first_seq, path }),
                _ if !entry.is_dir
                    && name
                        .strip_suffix(".tmp")
                        .and_then(segment::parse_segment_name)
                        .is_some() =>
                {
                    recovery.rolled_back.push(path)
                }
                _ => {
                    return Err(QueueError::ForeignFile {
                        dir: dir.into(),
                        file: entry.name,
                    })
                }
            },
        }
    }
    if !recovery.rolled_back.is_empty() {
        for path in &recovery.rolled_back {
            log::warn!(
                "{}: left by an interrupted update; removed (the update is rolled back)",
                path.display()
            );
            st.remove_file(path).map_err(io(path))?;
        }
        st.sync_dir(dir).map_err(io(dir))?;
    }
    found.sort_by_key(|f| f.first_seq);
    Ok(found)
}

fn check_or_create_meta(
    st: &dyn Storage,
    dir: &Path,
    device_id: &str,
    key_check: &[u8; 16],
    has_segments: bool,
) -> Result<()> {
    let meta_path = dir.join(META);
    match st.read(&meta_path) {
        Ok(bytes) => {
            let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| QueueError::NotAQueue {
                path: meta_path.clone(),
                message: e.to_string(),
            })?;
            if meta.format != QUEUE_FORMAT {
                return Err(QueueError::NotAQueue {
                    path: meta_path,
                    message: format!("format {:?}, expected {QUEUE_FORMAT:?}", meta.format),
                });
            }
            if meta.key_check != hex(key_check) {
                return Err(QueueError::WrongKey {
                    dir: dir.into(),
                    stored: meta.key_check,
                    given: hex(key_check),
                });
            }
            if meta.device_id != device_id {
                return Err(QueueError::DeviceMismatch {
                    dir: dir.into(),
                    stored: meta.device_id,
                    given: device_id.into(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if has_segments {
                return Err(QueueError::NotAQueue {
                    path: meta_path,
                    message: "missing, but segment files are present".into(),
                });
            }
            let meta = Meta {
                format: QUEUE_FORMAT.into(),
                device_id: device_id.into(),
                key_check: hex(key_check),
            };
            write_atomically(
                st,
                dir,
                &meta_path,
                &dir.join(META_TMP),
                serde_json::to_string_pretty(&meta)
                    .expect("serialisable")
                    .as_bytes(),
            )
        }
        Err(e) => Err(io(&meta_path)(e)),
    }
}

/// Scan one segment and repair it: `None` when the whole file was quarantined.
#[allow(clippy::too_many_arguments)]
fn recover_segment(
    st: &dyn Storage,
    dir: &Path,
    cipher: &Cipher,
    key_check: &[u8; 16],
    options: &QueueOptions,
    Found { first_seq, path }: Found,
    last: bool,
    high_water: Option<u64>,
    damaged: &mut Vec<(u64, u64)>,
    recovery: &mut RecoveryReport,
) -> Result<Option<Segment>> {
    // A read that fails three times running (a bad sector, not a passing fault) must not stop
    // every later start: the segment is moved aside whole, and its range reported as a loss.
    let read = st
        .read(&path)
        .or_else(|_| st.read(&path))
        .or_else(|_| st.read(&path));
    let buf = match read {
        Ok(buf) => buf,
        Err(e) => {
            let aside = move_aside(st, dir, &path)?;
            log::error!(
                "{}: unreadable ({e}); moved to {}",
                path.display(),
                aside.display()
            );
            recovery
                .skipped
                .push((path, 0, 0, format!("unreadable: {e}")));
            recovery.quarantined.push(aside);
            return Ok(None);
        }
    };
    let header_problem = match segment::decode_header(&buf) {
        HeaderState::Valid {
            first_seq: stored,
            key_check: check,
        } => {
            if stored != first_seq {
                Some(format!("header says first sequence {stored}"))
            } else if &check != key_check {
                Some("header holds another key check".to_string())
            } else {
                None
            }
        }
        // Segments are renamed into place only with a synced header; a shorter one was
        // cut short by an earlier release, and holds no records.
        HeaderState::Torn => {
            log::warn!(
                "{}: segment header cut short ({} bytes), no records; removed",
                path.display(),
                buf.len()
            );
            st.remove_file(&path).map_err(io(&path))?;
            st.sync_dir(dir).map_err(io(dir))?;
            recovery.torn_tails.push((path, 0, buf.len() as u64));
            return Ok(None);
        }
        HeaderState::Foreign => Some("no valid segment header".to_string()),
    };
    if let Some(reason) = header_problem {
        recovery
            .skipped
            .push((path.clone(), 0, buf.len() as u64, reason.clone()));
        let copy = match quarantine(st, dir, &path, 0, &buf) {
            Ok(copy) => copy,
            Err(e) => {
                log::error!("{}: {reason}; left in place ({e})", path.display());
                return Ok(None);
            }
        };
        log::error!(
            "{}: {reason}; the whole file is moved to {}",
            path.display(),
            copy.display()
        );
        st.remove_file(&path).map_err(io(&path))?;
        st.sync_dir(dir).map_err(io(dir))?;
        recovery.quarantined.push(copy);
        return Ok(None);
    }

    let max_ciphertext = options.max_record_bytes + segment::TAG_LEN;
    let scan = segment::scan(
        &buf,
        cipher,
        first_seq.saturating_sub(1),
        max_ciphertext,
        last,
    );
    let mut frames = scan.frames;
    let mut bytes = buf.len() as u64;
    // Where records past the high-water mark begin: from there on, all is cut below.
    // (Any segment: a failed rotation can leave an empty segment after the one written to.)
    let unsynced_from =
        high_water.and_then(|h| frames.iter().find(|f| f.seq > h).map(|f| f.offset));
    for d in &scan.damage {
        if unsynced_from.is_some_and(|at| d.offset > at) {
            break;
        }
        let before = frames
            .iter()
            .take_while(|f| f.offset < d.offset)
            .last()
            .map_or(first_seq.saturating_sub(1), |f| f.seq);
        let at_tail = d.offset + d.bytes == bytes;
        // Past the high-water mark nothing was ever durable: an interrupted append. Without a
        // recovery point, an earlier release's rule: damage that nothing valid follows.
        let torn = match high_water {
            Some(h) => before >= h,
            None => last && d.torn_tail,
        };
        let end = if torn { bytes } else { d.offset + d.bytes };
        let copy = quarantine(
            st,
            dir,
            &path,
            d.offset,
            &buf[d.offset as usize..end as usize],
        );
        let (copied, copy) = match copy {
            Ok(copy) => {
                let shown = copy.display().to_string();
                recovery.quarantined.push(copy);
                (true, shown)
            }
            // Cut anyway only what was never durable; damage stays in place until it is copied.
            Err(e) => (false, format!("none ({e})")),
        };
        if torn {
            log::warn!(
                "{}: interrupted append at byte {} ({} bytes, {}): truncated; copy: {copy}",
                path.display(),
                d.offset,
                end - d.offset,
                d.reason,
            );
            recovery
                .torn_tails
                .push((path.clone(), d.offset, end - d.offset));
            frames.retain(|f| f.offset < d.offset);
            bytes = d.offset;
            break;
        }
        let through = frames
            .iter()
            .find(|f| f.offset > d.offset)
            .map_or(high_water.unwrap_or(0).max(before.saturating_add(1)), |f| {
                f.seq - 1
            });
        damaged.push((before.saturating_add(1), through));
        log::error!(
            "{}: damaged record(s) after {before} at byte {} ({} bytes, {}); copy: {copy}",
            path.display(),
            d.offset,
            d.bytes,
            d.reason,
        );
        recovery
            .skipped
            .push((path.clone(), d.offset, d.bytes, d.reason.clone()));
        if at_tail && copied {
            // Kept in quarantine; cut here so that appends continue after whole records.
            bytes = d.offset;
        }
    }
    // Valid frames past the high-water mark were never reported durable: they go too, so that
    // a record whose sync failed can never come back.
    if let Some(h) = high_water {
        if let Some(cut) = frames.iter().position(|f| f.seq > h) {
            let at = frames[cut].offset;
            if at < bytes {
                match quarantine(st, dir, &path, at, &buf[at as usize..bytes as usize]) {
                    Ok(copy) => recovery.quarantined.push(copy),
                    Err(e) => log::warn!("{}: no copy of the unsynced tail: {e}", path.display()),
                }
                recovery.torn_tails.push((path.clone(), at, bytes - at));
                log::warn!(
                    "{}: {} record(s) after the high-water mark {h} were never reported durable: truncated",
                    path.display(),
                    frames.len() - cut
                );
                bytes = at;
            }
            frames.truncate(cut);
        }
    }
    if bytes < buf.len() as u64 {
        // Synced now: the next commit may go to another segment (after a failed rotation), and
        // the cut frames' sequence numbers will be given again below a new high-water mark.
        let mut file = st.open(&path, Open::Existing).map_err(io(&path))?;
        file.set_len(bytes).map_err(io(&path))?;
        file.sync_data().map_err(io(&path))?;
    }
    Ok(Some(Segment {
        path,
        frames,
        bytes,
    }))
}

/// A new segment: header written and synced under a temporary name, then renamed into place, so
/// that a segment file always has a whole header and a failed creation leaves nothing behind.
fn create_segment(
    st: &dyn Storage,
    dir: &Path,
    first_seq: u64,
    key_check: &[u8; 16],
) -> Result<(Segment, Box<dyn StorageFile>)> {
    let path = dir.join(segment::segment_name(first_seq));
    let tmp = dir.join(format!("{}.tmp", segment::segment_name(first_seq)));
    write_atomically(
        st,
        dir,
        &path,
        &tmp,
        &segment::encode_header(first_seq, key_check),
    )?;
    let file = match st.open(&path, Open::Existing) {
        Ok(file) => file,
        Err(e) => {
            // Leave no empty segment after the one still being written to.
            let _ = st.remove_file(&path).and_then(|()| st.sync_dir(dir));
            return Err(io(&path)(e));
        }
    };
    Ok((
        Segment {
            path,
            frames: Vec::new(),
            bytes: HEADER_LEN as u64,
        },
        file,
    ))
}

fn read_legacy_cursor(st: &dyn Storage, path: &Path) -> Result<u64> {
    match st.read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            text.trim().parse().map_err(|_| QueueError::NotAQueue {
                path: path.into(),
                message: format!(
                    "expected the acknowledged sequence number, found {:?}",
                    text.trim()
                ),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(path)(e)),
    }
}

/// Write `bytes` to `tmp`, sync it, rename it to `path` and sync the directory; on failure the
/// temporary file is removed (best effort: the next open removes it otherwise).
fn write_atomically(
    st: &dyn Storage,
    dir: &Path,
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
) -> Result<()> {
    let written = (|| {
        let mut f = st.open(tmp, Open::Truncate).map_err(io(tmp))?;
        f.write_all_at(bytes, 0).map_err(io(tmp))?;
        f.sync_data().map_err(io(tmp))?;
        st.rename(tmp, path).map_err(io(path))
    })();
    if let Err(e) = written {
        let _ = st.remove_file(tmp);
        return Err(e);
    }
    st.sync_dir(dir).map_err(io(dir))
}

/// `quarantine/` (created, with its entry synced, if needed) and the file name of `path`.
fn quarantine_dir(st: &dyn Storage, dir: &Path, path: &Path) -> Result<(PathBuf, String)> {
    let qdir = dir.join(QUARANTINE);
    if !st.exists(&qdir).map_err(io(&qdir))? {
        st.create_dir_all(&qdir).map_err(io(&qdir))?;
        st.sync_dir(dir).map_err(io(dir))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((qdir, name))
}

/// Move a whole file into `quarantine/` (by renaming: its bytes need not be readable).
fn move_aside(st: &dyn Storage, dir: &Path, path: &Path) -> Result<PathBuf> {
    let (qdir, name) = quarantine_dir(st, dir, path)?;
    let aside = qdir.join(format!("{name}.unreadable"));
    st.rename(path, &aside).map_err(io(path))?;
    st.sync_dir(&qdir).map_err(io(&qdir))?;
    st.sync_dir(dir).map_err(io(dir))?;
    Ok(aside)
}

/// Copy damaged or truncated bytes to `quarantine/` (synced, with its directory) before the
/// original is cut.
fn quarantine(
    st: &dyn Storage,
    dir: &Path,
    segment: &Path,
    offset: u64,
    bytes: &[u8],
) -> Result<PathBuf> {
    let (qdir, name) = quarantine_dir(st, dir, segment)?;
    let path = qdir.join(format!("{name}.at-{offset}.bin"));
    if st.exists(&path).map_err(io(&path))? {
        return Ok(path);
    }
    write_atomically(
        st,
        &qdir,
        &path,
        &qdir.join(format!("{name}.at-{offset}.tmp")),
        bytes,
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests;
