//! Model-based crash tests: random sequences of queue operations, power cuts and I/O faults on
//! the simulated page cache ([`crate::sim`]), checked against what the queue promised.
//!
//! After every recovery: the queue opens; every record it reported durable and the hub has not
//! acknowledged is there, byte for byte, or journalled as evicted; nothing it returns is damaged;
//! a sequence number once durable never names another record; a record reported not saved never
//! comes back; opening again changes nothing. `DERMEDGE_CRASH_CASES` sets the number of random
//! sequences (default 1500; the long mode in docs/QUEUE-AND-SYNC.md runs 100000).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use dermedge_record::{
    new_record_id, EmbeddingType, HubKey, Record, StoredEmbedding, RECORD_FORMAT,
};

use super::*;
use crate::sim::{Rng, SimDisk};

#[derive(Debug, Clone)]
enum Op {
    Append {
        thumbnail: u16,
    },
    Commit,
    Tick,
    /// Acknowledge a fraction (/255) of the durable records not yet acknowledged.
    Acknowledge {
        fraction: u8,
    },
    Reopen,
    PowerCut {
        seed: u64,
    },
    /// The n-th I/O call from now fails with ENOSPC or EIO.
    Fault {
        call: u8,
        no_space: bool,
    },
    /// The disk fills up, leaving `headroom` bytes.
    Fill {
        headroom: u16,
    },
    Unfill,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u16..1500).prop_map(|thumbnail| Op::Append { thumbnail }),
        2 => Just(Op::Commit),
        1 => Just(Op::Tick),
        2 => any::<u8>().prop_map(|fraction| Op::Acknowledge { fraction }),
        1 => Just(Op::Reopen),
        2 => any::<u64>().prop_map(|seed| Op::PowerCut { seed }),
        2 => (1u8..12, any::<bool>()).prop_map(|(call, no_space)| Op::Fault { call, no_space }),
        1 => (0u16..3000).prop_map(|headroom| Op::Fill { headroom }),
        1 => Just(Op::Unfill),
    ]
}

fn options() -> impl Strategy<Value = QueueOptions> {
    (
        prop_oneof![
            Just(Durability::PerRecord),
            (1u32..5).prop_map(|max_records| Durability::Group {
                max_records,
                max_delay_ms: 3_600_000,
            }),
        ],
        any::<bool>(),
        2u64..6,
    )
        .prop_map(|(durability, evict, segments)| QueueOptions {
            durability,
            segment_bytes: 4096,
            max_record_bytes: 4096,
            max_bytes: 4096 * segments,
            max_records: 1000,
            full_policy: if evict {
                FullPolicy::EvictOldest
            } else {
                FullPolicy::Reject
            },
        })
}

fn record(n: u64, thumbnail: u16) -> Envelope {
    let hub = HubKey::from_bytes([9; 32]).public();
    Envelope::seal(&plain_record(n, thumbnail), &hub)
}

fn plain_record(n: u64, thumbnail: u16) -> Record {
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: n as i64,
        device_id: "dev-1".into(),
        model_id: "m".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&[n as f32, 1.0], EmbeddingType::F16),
        heads: Vec::new(),
        quality: None,
        source: None,
        thumbnail_jpeg: Some(vec![n as u8; thumbnail as usize]),
    }
}

/// What the queue has promised so far.
#[derive(Default)]
struct Promises {
    /// Every record ever reported durable, by sequence number.
    durable: BTreeMap<u64, Vec<u8>>,
    /// Appended, not yet reported durable.
    pending: BTreeMap<u64, Vec<u8>>,
    /// Records reported not saved (their append or commit failed).
    not_saved: BTreeSet<Vec<u8>>,
    acked: u64,
}

impl Promises {
    fn settle(&mut self, q: &Queue) {
        let durable = q.durable_seq();
        let now: Vec<u64> = self.pending.range(..=durable).map(|(s, _)| *s).collect();
        for seq in now {
            let cbor = self.pending.remove(&seq).expect("pending");
            self.durable.insert(seq, cbor);
        }
    }

    /// After an error: what is durable is, and a poisoned handle has given up the rest.
    fn failed(&mut self, q: &Queue) {
        self.settle(q);
        if q.poisoned.is_none() {
            return;
        }
        let durable = q.durable_seq();
        let lost: Vec<u64> = self.pending.range(durable + 1..).map(|(s, _)| *s).collect();
        for seq in lost {
            self.not_saved
                .insert(self.pending.remove(&seq).expect("pending"));
        }
    }

    /// Records appended but never reported durable may vanish at a crash or a reopen.
    fn crashed(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.not_saved.extend(pending.into_values());
    }
}

/// Open the queue; an injected fault that fires during the open fails it, and the retry (as the
/// device's supervisor would) must succeed.
/// A queue on the model disk with 4 KiB segments holding `n` records with `thumbnail`-byte
/// thumbnails.
fn small_segments_holding(n: u64, thumbnail: u16) -> (SimDisk, DeviceKey, QueueOptions, Queue) {
    let disk = SimDisk::new();
    let key = DeviceKey::from_bytes([7; 32]);
    let options = QueueOptions {
        segment_bytes: 4096,
        ..QueueOptions::default()
    };
    let mut q = open(&disk, &key, &options);
    for i in 0..n {
        q.append(&record(i, thumbnail)).unwrap();
    }
    (disk, key, options, q)
}

fn open(disk: &SimDisk, key: &DeviceKey, options: &QueueOptions) -> Queue {
    let attempt = || {
        let storage: Arc<dyn Storage> = Arc::new(disk.clone());
        Queue::open_with(storage, Path::new("/q"), key, "dev-1", options.clone())
    };
    let armed = disk.fault_pending();
    let q = match attempt() {
        Ok(q) => q,
        Err(e) if armed && !disk.fault_pending() => attempt()
            .unwrap_or_else(|again| panic!("the queue must open after a fault ({e}): {again}")),
        Err(e) => panic!("the queue must always open: {e}"),
    };
    // A fault that did not fire during the open is not meant for the checks that follow.
    disk.clear_fault();
    q
}

/// The checks every recovery must pass. `interrupted`: an operation failed since the last open,
/// so a removal may have been left half done.
fn check_recovered(q: &Queue, promises: &Promises, interrupted: bool) {
    // After operations that all reported success, nothing is left half done: no temporary file
    // to roll back, no removed segment back again.
    assert!(
        interrupted || (q.recovery().reclaimed.is_empty() && q.recovery().rolled_back.is_empty()),
        "files that operations reporting success had removed came back: {:?}",
        q.recovery()
    );
    assert!(
        !q.recovery().found_damage(),
        "no durable data was damaged, yet recovery reports {:?}",
        q.recovery()
    );
    let stored = q
        .read_after(0, usize::MAX, usize::MAX)
        .unwrap_or_else(|e| panic!("a recovered record is unreadable: {e}"));
    let by_seq: BTreeMap<u64, &Vec<u8>> = stored.iter().map(|s| (s.seq, &s.cbor)).collect();
    for (seq, cbor) in &promises.durable {
        if *seq <= promises.acked.max(q.acked_seq()) {
            continue;
        }
        match by_seq.get(seq) {
            Some(found) => assert_eq!(*found, cbor, "record {seq} changed"),
            None => assert!(
                q.gaps()
                    .iter()
                    .any(|g| g.reason == GapReason::Evicted && g.covers(*seq)),
                "durable record {seq} is gone and no eviction accounts for it; gaps {:?}",
                q.gaps()
            ),
        }
    }
    for s in &stored {
        if let Some(cbor) = promises.durable.get(&s.seq) {
            assert_eq!(&s.cbor, cbor, "sequence number {} was reused", s.seq);
        }
        assert!(
            !promises.not_saved.contains(&s.cbor),
            "record {} was reported not saved but came back",
            s.seq
        );
    }
    assert!(
        q.acked_seq() >= promises.acked,
        "the acknowledged cursor went back"
    );
}

fn run_case(options: QueueOptions, ops: Vec<Op>) {
    let disk = SimDisk::new();
    let key = DeviceKey::from_bytes([7; 32]);
    let mut promises = Promises::default();
    let mut q = Some(open(&disk, &key, &options));
    let mut fault_armed = false;
    let mut full = false;
    // An operation failed since the last open (a removal may be half done).
    let mut interrupted = false;
    let mut n = 0u64;
    for op in ops {
        let queue = q.as_mut().expect("the queue is open between operations");
        match op {
            Op::Append { thumbnail } => {
                n += 1;
                let r = record(n, thumbnail);
                let cbor = r.to_cbor();
                let before = promises.durable.keys().next_back().copied().unwrap_or(0);
                match queue.append(&r) {
                    Ok(receipt) => {
                        assert!(
                            receipt.seq > before,
                            "seq {} handed out again (durable through {before})",
                            receipt.seq
                        );
                        promises.pending.insert(receipt.seq, cbor);
                        promises.settle(queue);
                    }
                    Err(_) => {
                        interrupted = true;
                        promises.not_saved.insert(cbor);
                        promises.failed(queue);
                    }
                }
            }
            Op::Commit | Op::Tick => {
                let result = if matches!(op, Op::Commit) {
                    queue.commit()
                } else {
                    queue.tick()
                };
                match result {
                    Ok(()) => promises.settle(queue),
                    Err(_) => {
                        interrupted = true;
                        promises.failed(queue);
                    }
                }
            }
            Op::Acknowledge { fraction } => {
                let durable = queue.durable_seq();
                let acked = queue.acked_seq();
                let through = acked + (durable - acked) * u64::from(fraction) / 255;
                match queue.acknowledge(through) {
                    Ok(()) => promises.acked = promises.acked.max(through),
                    Err(e) => {
                        assert!(
                            fault_armed,
                            "acknowledging must work without a fault, full disk or not ({full}): {e}"
                        );
                        interrupted = true;
                    }
                }
            }
            Op::Reopen => {
                drop(q.take());
                promises.crashed();
                disk.fill(None);
                full = false;
                let queue = open(&disk, &key, &options);
                check_recovered(&queue, &promises, interrupted);
                q = Some(queue);
                fault_armed = false;
                interrupted = false;
                continue;
            }
            Op::PowerCut { seed } => {
                drop(q.take());
                promises.crashed();
                disk.power_cut(&mut Rng::new(seed));
                full = false;
                disk.fill(None);
                let first = open(&disk, &key, &options);
                check_recovered(&first, &promises, interrupted);
                let first_seqs: Vec<u64> = first
                    .read_after(0, usize::MAX, usize::MAX)
                    .unwrap()
                    .iter()
                    .map(|s| s.seq)
                    .collect();
                drop(first);
                // Recovery is idempotent: a second open finds nothing more to do.
                let again = open(&disk, &key, &options);
                assert!(
                    again.recovery().is_clean(),
                    "the second recovery found {:?}",
                    again.recovery()
                );
                let again_seqs: Vec<u64> = again
                    .read_after(0, usize::MAX, usize::MAX)
                    .unwrap()
                    .iter()
                    .map(|s| s.seq)
                    .collect();
                assert_eq!(first_seqs, again_seqs);
                q = Some(again);
                fault_armed = false;
                interrupted = false;
                continue;
            }
            Op::Fault { call, no_space } => {
                disk.fail_call(u64::from(call), no_space);
                fault_armed = true;
                continue;
            }
            Op::Fill { headroom } => {
                disk.fill(Some(u64::from(headroom)));
                full = true;
                continue;
            }
            Op::Unfill => {
                disk.fill(None);
                full = false;
                continue;
            }
        }
    }
    drop(q);
    promises.crashed();
    disk.fill(None);
    let q = open(&disk, &key, &options);
    check_recovered(&q, &promises, interrupted);
}

fn cases() -> u32 {
    std::env::var("DERMEDGE_CRASH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_promise_survives_power_cuts_and_faults(
        options in options(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        run_case(options, ops);
    }
}

/// fsyncgate: the sync of a record fails and the cache forgets the write; the record is reported
/// not saved, is never handed to sync, and does not come back after a reopen or a power cut.
#[test]
fn a_record_whose_sync_failed_never_comes_back() {
    for cut in [false, true] {
        let disk = SimDisk::new();
        let key = DeviceKey::from_bytes([7; 32]);
        let options = QueueOptions::default();
        let mut q = open(&disk, &key, &options);
        q.append(&record(1, 10)).unwrap();
        // An append is a write then a sync: fail the sync.
        disk.fail_call(2, false);
        let err = q.append(&record(2, 10)).unwrap_err();
        assert!(err.to_string().contains("Input/output error"), "{err}");
        let err = q.append(&record(3, 10)).unwrap_err();
        assert!(matches!(err, QueueError::Poisoned { .. }), "{err}");
        assert_eq!(q.unacknowledged(10, usize::MAX).unwrap().len(), 1);
        assert!(q.is_poisoned());
        if cut {
            drop(q);
            disk.power_cut(&mut Rng::new(3));
            q = open(&disk, &key, &options);
        } else {
            // What `dermedge run` does: recover in place, keeping the lock.
            q.reopen(&key).unwrap();
            assert!(!q.is_poisoned());
        }
        let seqs: Vec<u64> = q
            .unacknowledged(10, usize::MAX)
            .unwrap()
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(seqs, [1]);
        assert_eq!(q.append(&record(4, 10)).unwrap().seq, 2);
    }
}

/// A full disk: appends fail with a clear error, nothing accepted is lost, and acknowledging
/// (which frees space) still works.
#[test]
fn a_full_disk_refuses_appends_and_still_drains() {
    let (disk, key, options, mut q) = small_segments_holding(20, 500);
    disk.fill(Some(0));
    let err = q.append(&record(99, 500)).unwrap_err().to_string();
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(q.unacknowledged(100, usize::MAX).unwrap().len(), 20);
    let segments = q.stats().segments;
    q.acknowledge(15).unwrap();
    assert!(q.stats().segments < segments);
    drop(q);
    let q = open(&disk, &key, &options);
    assert_eq!(q.acked_seq(), 15);
    assert_eq!(q.unacknowledged(100, usize::MAX).unwrap().len(), 5);
}

/// Every temporary file the queue and its sync client write is rolled back on open.
#[test]
fn interrupted_updates_are_rolled_back() {
    let disk = SimDisk::new();
    let key = DeviceKey::from_bytes([7; 32]);
    let options = QueueOptions::default();
    let mut q = open(&disk, &key, &options);
    q.append(&record(1, 10)).unwrap();
    drop(q);
    for name in [
        SYNC_STATE_TMP,
        STATE_TMP,
        META_TMP,
        "seg-00000000000000000002.dlog.tmp",
    ] {
        let mut f = disk
            .open(&Path::new("/q").join(name), Open::CreateNew)
            .unwrap();
        f.write_all_at(b"half", 0).unwrap();
    }
    let q = open(&disk, &key, &options);
    assert_eq!(q.recovery().rolled_back.len(), 4);
    assert!(!q.recovery().found_damage());
    assert_eq!(q.unacknowledged(10, usize::MAX).unwrap().len(), 1);
    assert!(disk
        .files_in(Path::new("/q"))
        .iter()
        .all(|p| !p.to_string_lossy().ends_with(".tmp")));
}

/// Flipped bytes in the last, durable records: damage (quarantined, journalled), not a torn
/// tail; their sequence numbers are never reused.
#[test]
fn durable_records_damaged_at_the_tail_are_reported_and_their_seqs_kept() {
    let disk = SimDisk::new();
    let key = DeviceKey::from_bytes([7; 32]);
    let options = QueueOptions::default();
    let mut q = open(&disk, &key, &options);
    for i in 0..6 {
        q.append(&record(i, 10)).unwrap();
    }
    let segment = q.segments.last().unwrap();
    let (path, frames) = (segment.path.clone(), segment.frames.clone());
    drop(q);
    for f in &frames[4..] {
        assert!(disk.corrupt(&path, f.offset + u64::from(f.len) - 2, 0x40));
    }
    let mut q = open(&disk, &key, &options);
    assert!(q.recovery().found_damage());
    assert!(q.recovery().torn_tails.is_empty());
    let gap = &q.recovery().gaps[0];
    assert_eq!((gap.from, gap.to, gap.reason), (5, 6, GapReason::Damaged));
    assert_eq!(q.recovery().quarantined.len(), 1);
    assert_eq!(q.append(&record(7, 10)).unwrap().seq, 7);
    drop(q);
    let q = open(&disk, &key, &options);
    assert!(q.recovery().is_clean(), "{:?}", q.recovery());
    assert_eq!(q.unreported_gaps().len(), 1);
}

/// A segment deleted from the middle: the missing range is reported and journalled, the rest
/// is read.
#[test]
fn a_missing_segment_is_a_reported_gap() {
    let (disk, key, options, q) = small_segments_holding(30, 600);
    assert!(q.segments.len() >= 3);
    let middle = q.segments[1].path.clone();
    let lost: Vec<u64> = q.segments[1].frames.iter().map(|f| f.seq).collect();
    drop(q);
    disk.delete(&middle);
    let q = open(&disk, &key, &options);
    let gap = &q.recovery().gaps[0];
    assert_eq!(
        (gap.from, gap.to, gap.reason),
        (lost[0], *lost.last().unwrap(), GapReason::Missing)
    );
    assert_eq!(
        q.unacknowledged(100, usize::MAX).unwrap().len(),
        30 - lost.len()
    );
}

/// A segment whose header is damaged is moved to quarantine at open; the move is durable, so a
/// power cut after the open does not bring the file back to be reported again.
#[test]
fn a_quarantined_segment_stays_quarantined_across_a_power_cut() {
    let (disk, key, options, q) = small_segments_holding(12, 600);
    let first = q.segments[0].path.clone();
    drop(q);
    assert!(disk.corrupt(&first, 0, 0xff));
    let q = open(&disk, &key, &options);
    assert_eq!(q.recovery().quarantined.len(), 1);
    assert_eq!(q.recovery().gaps[0].reason, GapReason::Missing);
    drop(q);
    for seed in 0..20 {
        disk.power_cut(&mut Rng::new(seed));
        let q = open(&disk, &key, &options);
        assert!(q.recovery().is_clean(), "seed {seed}: {:?}", q.recovery());
        assert!(disk
            .exists(&Path::new("/q/quarantine").join(format!(
                "{}.at-0.bin",
                first.file_name().unwrap().to_string_lossy()
            )))
            .unwrap());
    }
}

/// A segment whose header an earlier release cut short holds no records: removed at open, and
/// the removal lasts.
#[test]
fn a_segment_with_a_torn_header_is_removed_for_good() {
    let disk = SimDisk::new();
    let key = DeviceKey::from_bytes([7; 32]);
    let options = QueueOptions::default();
    let mut q = open(&disk, &key, &options);
    q.append(&record(1, 10)).unwrap();
    drop(q);
    let torn = Path::new("/q/seg-00000000000000000002.dlog");
    let mut f = disk.open(torn, Open::CreateNew).unwrap();
    f.write_all_at(b"DMQSEG", 0).unwrap();
    f.sync_data().unwrap();
    disk.sync_dir(Path::new("/q")).unwrap();
    drop(f);
    let q = open(&disk, &key, &options);
    assert_eq!(q.recovery().torn_tails.len(), 1);
    drop(q);
    for seed in 0..20 {
        disk.power_cut(&mut Rng::new(seed));
        let q = open(&disk, &key, &options);
        assert!(q.recovery().is_clean(), "seed {seed}: {:?}", q.recovery());
    }
}

/// A disk whose reads of one file always fail (a bad sector), otherwise the simulated disk.
struct BadSector {
    disk: SimDisk,
    bad: std::path::PathBuf,
}

impl Storage for BadSector {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.disk.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<Entry>> {
        self.disk.list(dir)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        if path == self.bad {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        self.disk.read(path)
    }
    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        self.disk.exists(path)
    }
    fn open(&self, path: &Path, how: Open) -> std::io::Result<Box<dyn StorageFile>> {
        self.disk.open(path, how)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.disk.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.disk.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.disk.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> std::io::Result<Option<LockGuard>> {
        self.disk.lock(path)
    }
}

/// A segment that can never be read again does not stop the queue: it is moved aside, its range
/// reported as lost, and the rest is read and appended to.
#[test]
fn an_unreadable_segment_is_moved_aside_and_the_queue_opens() {
    let (disk, key, options, q) = small_segments_holding(30, 600);
    let middle = q.segments[1].path.clone();
    let lost: Vec<u64> = q.segments[1].frames.iter().map(|f| f.seq).collect();
    drop(q);
    let storage: Arc<dyn Storage> = Arc::new(BadSector {
        disk: disk.clone(),
        bad: middle.clone(),
    });
    let mut q = Queue::open_with(storage, Path::new("/q"), &key, "dev-1", options.clone())
        .expect("opens despite the bad sector");
    assert!(q.recovery().found_damage());
    let gap = &q.recovery().gaps[0];
    assert_eq!((gap.from, gap.to), (lost[0], *lost.last().unwrap()));
    assert_eq!(
        q.unacknowledged(100, usize::MAX).unwrap().len(),
        30 - lost.len()
    );
    assert_eq!(q.append(&record(99, 10)).unwrap().seq, 31);
    assert!(!disk.exists(&middle).unwrap());
}
