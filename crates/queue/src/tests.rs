use std::fs;

use dermedge_record::{
    new_record_id, EmbeddingType, HeadResult, HubKey, Record, StoredEmbedding, RECORD_FORMAT,
};

use super::*;

/// The clinic key the test records are sealed to.
fn hub() -> HubKey {
    HubKey::from_bytes([9; 32])
}

fn record(i: u64, marker: &str) -> Envelope {
    Envelope::seal(&plain_record(i, marker), &hub().public())
}

fn plain_record(i: u64, marker: &str) -> Record {
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: 1_790_000_000_000 + i as i64,
        device_id: "dev-1".into(),
        model_id: "df-mini".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&[i as f32, 0.5, -1.0, 2.0], EmbeddingType::F32),
        heads: vec![HeadResult {
            head: "condition".into(),
            classes: vec!["a".into(), "b".into()],
            probabilities: vec![0.25, 0.75],
            version: None,
        }],
        quality: None,
        source: Some(format!("{marker}-{i}.png")),
        thumbnail_jpeg: None,
    }
}

fn small() -> QueueOptions {
    QueueOptions {
        segment_bytes: 4096,
        ..QueueOptions::default()
    }
}

fn all(q: &Queue) -> Vec<Stored> {
    q.read_after(0, usize::MAX, usize::MAX).unwrap()
}

#[test]
fn records_survive_reopening_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    let mut written = Vec::new();
    {
        let mut q = Queue::open(dir.path(), &key, "dev-1", small()).unwrap();
        for i in 0..40 {
            let r = record(i, "x");
            let receipt = q.append(&r).unwrap();
            assert_eq!(
                receipt,
                Receipt {
                    seq: i + 1,
                    durable: true
                }
            );
            written.push(r);
        }
        assert!(q.stats().segments > 1, "the test should span segments");
    }
    let mut q = Queue::open(dir.path(), &key, "dev-1", small()).unwrap();
    assert!(q.recovery().is_clean());
    let read: Vec<Envelope> = all(&q).into_iter().map(|s| s.envelope).collect();
    assert_eq!(
        read[3].open(&hub()).unwrap().source.as_deref(),
        Some("x-3.png")
    );
    assert_eq!(read, written);
    assert_eq!(q.append(&record(40, "x")).unwrap().seq, 41);
}

/// The files of `dir` copied to a new directory, with its last segment cut at `cut` bytes.
fn copy_with_last_segment_cut(
    dir: &Path,
    last: &Path,
    full: &[u8],
    cut: usize,
) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            fs::copy(&p, copy.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    fs::write(copy.path().join(last.file_name().unwrap()), &full[..cut]).unwrap();
    copy
}

/// A queue of 30 records spanning segments; the last segment's path, bytes and frame ends.
fn thirty_records(
    dir: &Path,
    key: &DeviceKey,
    options: QueueOptions,
) -> (PathBuf, Vec<u8>, Vec<(u64, u64)>) {
    let mut q = Queue::open(dir, key, "dev-1", options).unwrap();
    for i in 0..30 {
        q.append(&record(i, "x")).unwrap();
    }
    let last = q.segments.last().unwrap();
    let ends = last
        .frames
        .iter()
        .map(|f| (f.seq, f.offset + u64::from(f.len)))
        .collect();
    let path = last.path.clone();
    drop(q);
    let full = fs::read(&path).unwrap();
    (path, full, ends)
}

#[test]
fn an_append_cut_short_at_every_byte_is_truncated_and_its_seqs_were_never_durable() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    // Group commit that never fires: the last segment's records were appended, never synced.
    let options = QueueOptions {
        durability: Durability::Group {
            max_records: 1000,
            max_delay_ms: 3_600_000,
        },
        ..small()
    };
    let (last, full, ends) = thirty_records(dir.path(), &key, options.clone());
    let durable = ends[0].0 - 1;
    for cut in 0..=full.len() {
        let copy = copy_with_last_segment_cut(dir.path(), &last, &full, cut);
        let mut q = Queue::open(copy.path(), &key, "dev-1", options.clone())
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let seqs: Vec<u64> = all(&q).iter().map(|s| s.seq).collect();
        assert_eq!(seqs, (1..=durable).collect::<Vec<_>>(), "cut at {cut}");
        assert!(
            !q.recovery().found_damage(),
            "cut at {cut}: {:?}",
            q.recovery()
        );
        assert_eq!(
            q.recovery().torn_tails.len(),
            usize::from(cut != HEADER_LEN),
            "cut at {cut}"
        );
        q.append(&record(99, "x")).unwrap();
        q.commit().unwrap();
        assert_eq!(q.durable_seq(), durable + 1, "cut at {cut}");
    }
}

#[test]
fn durable_records_cut_at_every_byte_are_reported_lost_and_their_seqs_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    let (last, full, ends) = thirty_records(dir.path(), &key, small());
    let before_last = ends[0].0 - 1;
    for cut in 0..=full.len() {
        let copy = copy_with_last_segment_cut(dir.path(), &last, &full, cut);
        let mut q = Queue::open(copy.path(), &key, "dev-1", small())
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let expected = ends
            .iter()
            .filter(|(_, end)| *end as usize <= cut)
            .map(|(seq, _)| *seq)
            .max()
            .unwrap_or(before_last);
        let seqs: Vec<u64> = all(&q).iter().map(|s| s.seq).collect();
        assert_eq!(seqs, (1..=expected).collect::<Vec<_>>(), "cut at {cut}");
        if expected < 30 {
            let gaps = &q.recovery().gaps;
            assert_eq!(gaps.len(), 1, "cut at {cut}: {:?}", q.recovery());
            assert_eq!(
                (gaps[0].from, gaps[0].to),
                (expected + 1, 30),
                "cut at {cut}"
            );
            let partial = !ends.iter().any(|(_, end)| *end as usize == cut) && cut > HEADER_LEN;
            let reason = if partial {
                GapReason::Damaged
            } else {
                GapReason::Missing
            };
            assert_eq!(gaps[0].reason, reason, "cut at {cut}");
            assert!(q.recovery().found_damage());
        } else {
            assert!(q.recovery().is_clean(), "cut at {cut}: {:?}", q.recovery());
        }
        assert_eq!(q.append(&record(99, "x")).unwrap().seq, 31, "cut at {cut}");
        drop(q);
        let q = Queue::open(copy.path(), &key, "dev-1", small()).unwrap();
        assert!(
            q.recovery().gaps.is_empty(),
            "a loss is journalled once: cut at {cut}"
        );
        assert_eq!(q.unreported_gaps().len(), usize::from(expected < 30));
    }
}

#[test]
fn a_damaged_record_in_the_middle_is_skipped_reported_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    let target;
    {
        let mut q = Queue::open(dir.path(), &key, "dev-1", QueueOptions::default()).unwrap();
        for i in 0..5 {
            q.append(&record(i, "x")).unwrap();
        }
        target = (q.segments[0].path.clone(), q.segments[0].frames[2]);
    }
    let mut bytes = fs::read(&target.0).unwrap();
    bytes[target.1.offset as usize + 60] ^= 0x55;
    fs::write(&target.0, &bytes).unwrap();
    for _ in 0..2 {
        let q = Queue::open(dir.path(), &key, "dev-1", QueueOptions::default()).unwrap();
        let seqs: Vec<u64> = all(&q).iter().map(|s| s.seq).collect();
        assert_eq!(seqs, [1, 2, 4, 5]);
        assert_eq!(q.recovery().skipped.len(), 1);
        assert_eq!(q.recovery().skipped[0].1, target.1.offset);
        let copy = &q.recovery().quarantined[0];
        assert_eq!(fs::read(copy).unwrap().len(), target.1.len as usize);
    }
}

#[test]
fn without_the_key_nothing_is_readable_and_a_wrong_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    {
        let mut q = Queue::open(dir.path(), &key, "dev-1", QueueOptions::default()).unwrap();
        q.append(&record(7, "patient-secret-marker")).unwrap();
    }
    for entry in fs::read_dir(dir.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            let bytes = fs::read(&p).unwrap();
            for needle in [
                &b"patient-secret-marker"[..],
                b"df-mini",
                b"condition",
                b"dev-1-",
            ] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{} holds {:?} in the clear",
                    p.display(),
                    String::from_utf8_lossy(needle)
                );
            }
        }
    }
    let err = Queue::open(
        dir.path(),
        &DeviceKey::generate(),
        "dev-1",
        QueueOptions::default(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, QueueError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("another device key"));
    let err = Queue::open(dir.path(), &key, "dev-2", QueueOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("dev-1"), "{err}");
}

#[test]
fn foreign_files_and_a_second_writer_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    let q = Queue::open(dir.path(), &key, "dev-1", QueueOptions::default()).unwrap();
    let err = Queue::open(dir.path(), &key, "dev-1", QueueOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, QueueError::Locked { .. }), "{err}");
    drop(q);
    fs::write(dir.path().join("holiday.jpg"), b"jpeg").unwrap();
    let err = Queue::open(dir.path(), &key, "dev-1", QueueOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("holiday.jpg"), "{err}");
    fs::remove_file(dir.path().join("holiday.jpg")).unwrap();
    // A file named like a segment without a segment header is damage, not a reason to stop:
    // the queue opens, and the file is moved to quarantine and reported by name.
    fs::write(
        dir.path().join("seg-00000000000000000099.dlog"),
        b"garbage that is long enough to be a header",
    )
    .unwrap();
    let q = Queue::open(dir.path(), &key, "dev-1", QueueOptions::default()).unwrap();
    assert!(q.recovery().found_damage());
    let (path, _, _, reason) = &q.recovery().skipped[0];
    assert!(path.ends_with("seg-00000000000000000099.dlog"), "{reason}");
    assert!(q.recovery().quarantined[0]
        .to_string_lossy()
        .contains("seg-00000000000000000099.dlog"));
    assert!(!dir.path().join("seg-00000000000000000099.dlog").exists());
}

#[test]
fn an_oversized_record_is_refused_and_nothing_else_changes() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    let options = QueueOptions {
        max_record_bytes: 1000,
        ..small()
    };
    let mut q = Queue::open(dir.path(), &key, "dev-1", options.clone()).unwrap();
    q.append(&record(0, "x")).unwrap();
    let mut big = plain_record(1, "x");
    big.thumbnail_jpeg = Some(vec![0xAB; 5000]);
    let big = Envelope::seal(&big, &hub().public());
    let err = q.append(&big).unwrap_err();
    assert!(
        matches!(err, QueueError::RecordTooLarge { bytes, limit: 1000, .. } if bytes > 5000),
        "{err}"
    );
    q.append(&record(2, "x")).unwrap();
    drop(q);
    let q = Queue::open(dir.path(), &key, "dev-1", options).unwrap();
    assert_eq!(all(&q).iter().map(|s| s.seq).collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn a_full_queue_rejects_or_evicts_as_configured() {
    let key = DeviceKey::generate();
    let reject = QueueOptions {
        max_records: 10,
        ..small()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut q = Queue::open(dir.path(), &key, "dev-1", reject.clone()).unwrap();
    for i in 0..10 {
        q.append(&record(i, "x")).unwrap();
    }
    let err = q.append(&record(10, "x")).unwrap_err();
    assert!(matches!(err, QueueError::Full { records: 10, .. }), "{err}");
    assert_eq!(all(&q).len(), 10, "nothing queued is lost");
    q.acknowledge(4).unwrap();
    q.append(&record(10, "x")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let bytes_cap = QueueOptions {
        max_bytes: 8192,
        ..small()
    };
    let mut q = Queue::open(dir.path(), &key, "dev-1", bytes_cap).unwrap();
    let mut refused = 0;
    for i in 0..100 {
        if let Err(e) = q.append(&record(i, "x")) {
            assert!(matches!(e, QueueError::Full { .. }), "{e}");
            refused += 1;
        }
    }
    assert!(refused > 0 && q.stats().bytes <= 8192);

    let dir = tempfile::tempdir().unwrap();
    let evict = QueueOptions {
        max_records: 30,
        full_policy: FullPolicy::EvictOldest,
        ..small()
    };
    let mut q = Queue::open(dir.path(), &key, "dev-1", evict.clone()).unwrap();
    for i in 0..100 {
        q.append(&record(i, "x")).unwrap();
    }
    let seqs: Vec<u64> = all(&q).iter().map(|s| s.seq).collect();
    assert!(seqs.len() <= 30 && *seqs.last().unwrap() == 100, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    let journal = fs::read_to_string(dir.path().join(GAPS)).unwrap();
    assert!(journal.contains("\"from\":1,"), "{journal}");
    assert_eq!(q.gaps()[0].reason, GapReason::Evicted);
    // Every evicted record is accounted for: the journal and the queue cover 1..=100.
    let evicted: u64 = q.gaps().iter().map(|g| g.to - g.from + 1).sum();
    assert_eq!(evicted + seqs.len() as u64, 100);
    drop(q);
    let q = Queue::open(dir.path(), &key, "dev-1", evict).unwrap();
    assert!(q.recovery().is_clean(), "{:?}", q.recovery());
}

#[test]
fn acknowledged_segments_are_removed_and_the_cursor_survives() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    let mut q = Queue::open(dir.path(), &key, "dev-1", small()).unwrap();
    for i in 0..60 {
        q.append(&record(i, "x")).unwrap();
    }
    let before = q.stats().segments;
    assert!(matches!(
        q.acknowledge(61),
        Err(QueueError::AckBeyondEnd { .. })
    ));
    q.acknowledge(45).unwrap();
    assert!(q.stats().segments < before);
    assert_eq!(q.unacknowledged(usize::MAX, usize::MAX).unwrap()[0].seq, 46);
    drop(q);
    let mut q = Queue::open(dir.path(), &key, "dev-1", small()).unwrap();
    assert_eq!(q.acked_seq(), 45);
    assert_eq!(q.stats().pending_records, 15);
    q.acknowledge(60).unwrap();
    drop(q);
    let mut q = Queue::open(dir.path(), &key, "dev-1", small()).unwrap();
    assert_eq!(
        q.append(&record(60, "x")).unwrap().seq,
        61,
        "sequence numbers never repeat"
    );
}

#[test]
fn group_commit_accepts_records_in_groups() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    let options = QueueOptions {
        durability: Durability::Group {
            max_records: 3,
            max_delay_ms: 60_000,
        },
        ..QueueOptions::default()
    };
    let mut q = Queue::open(dir.path(), &key, "dev-1", options).unwrap();
    let durable: Vec<bool> = (0..4)
        .map(|i| q.append(&record(i, "x")).unwrap().durable)
        .collect();
    assert_eq!(durable, [false, false, true, false]);
    assert_eq!(q.durable_seq(), 3);
    assert_eq!(
        q.unacknowledged(10, usize::MAX).unwrap().len(),
        3,
        "only accepted records are synced"
    );
    q.commit().unwrap();
    assert_eq!(q.durable_seq(), 4);
}

#[test]
fn bad_options_name_the_field() {
    let err = QueueOptions {
        segment_bytes: 10,
        ..QueueOptions::default()
    }
    .validate()
    .unwrap_err();
    assert!(err.to_string().starts_with("segment_bytes"), "{err}");
}

#[test]
fn running_counts_match_the_files_through_appends_acks_and_evictions() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    let options = QueueOptions {
        max_records: 25,
        full_policy: FullPolicy::EvictOldest,
        ..small()
    };
    let mut q = Queue::open(dir.path(), &key, "dev-1", options.clone()).unwrap();
    let check = |q: &Queue| {
        let on_disk: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "dlog"))
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        let stats = q.stats();
        assert_eq!(stats.bytes, on_disk);
        assert_eq!(
            stats.pending_records,
            q.unacknowledged(usize::MAX, usize::MAX).unwrap().len() as u64
        );
    };
    for i in 0..60 {
        q.append(&record(i, "x")).unwrap();
        check(&q);
        if i % 17 == 16 {
            let last = q.stats().last_seq;
            q.acknowledge(last - 3).unwrap();
            check(&q);
        }
    }
    drop(q);
    let q = Queue::open(dir.path(), &key, "dev-1", options).unwrap();
    check(&q);
}

/// A queue written before records were sealed to the hub: its records are read out sealed to
/// the hub's key once the queue is given it, and are a clear error before.
#[test]
fn records_queued_before_sealing_are_sealed_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = DeviceKey::generate();
    let mut q = Queue::open(dir.path(), &key, "dev-1", small()).unwrap();
    q.append(&record(1, "x")).unwrap();
    let segment = q.segments[0].path.clone();
    drop(q);
    // An earlier release's frame: the record's own CBOR under the at-rest key.
    let old = plain_record(2, "old");
    let frame = segment::Cipher::new(&key.at_rest_key()).seal(2, &old.to_cbor());
    let mut bytes = fs::read(&segment).unwrap();
    bytes.extend(frame);
    fs::write(&segment, bytes).unwrap();
    // An earlier release kept no recovery point.
    fs::remove_file(dir.path().join(STATE)).unwrap();
    let mut q = Queue::open(dir.path(), &key, "dev-1", small()).unwrap();
    assert!(!q.recovery().found_damage(), "{:?}", q.recovery());
    let err = q.read_after(0, 10, usize::MAX).unwrap_err().to_string();
    assert!(err.contains("hub's public key"), "{err}");
    q.seal_earlier_records_to(hub().public());
    let read = q.read_after(0, 10, usize::MAX).unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[1].envelope.open(&hub()).unwrap(), old);
}

// The named steps of recovery, each on its own.

#[test]
fn find_gaps_names_damaged_and_missing_ranges_and_skips_journalled_ones() {
    let known = vec![Gap {
        from: 9,
        to: 9,
        reason: GapReason::Evicted,
        at_ms: 1,
    }];
    // Acked through 2; 3..=10 expected; 4, 5 and 8 present; 9 already journalled.
    let found = find_gaps(2, 10, &[4, 5, 8], &known, &[(6, 7)], 42);
    let ranges: Vec<(u64, u64, GapReason)> =
        found.iter().map(|g| (g.from, g.to, g.reason)).collect();
    assert_eq!(
        ranges,
        vec![
            (3, 3, GapReason::Missing),
            (6, 7, GapReason::Damaged),
            (10, 10, GapReason::Missing),
        ]
    );
    assert!(found.iter().all(|g| g.at_ms == 42));
    assert!(
        find_gaps(5, 5, &[], &[], &[], 0).is_empty(),
        "nothing past the cursor"
    );
}

#[test]
fn a_missing_recovery_point_falls_back_to_the_legacy_cursor_and_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let mut recovery = RecoveryReport::default();
    let (point, high_water) = read_recovery_point(&Disk, dir.path(), &mut recovery).unwrap();
    assert_eq!((point.acked, point.durable, high_water), (0, 0, None));
    fs::write(dir.path().join(LEGACY_CURSOR), "17\n").unwrap();
    let (point, high_water) = read_recovery_point(&Disk, dir.path(), &mut recovery).unwrap();
    assert_eq!((point.acked, point.durable, high_water), (17, 17, None));
    assert!(!recovery.state_rebuilt);
}

#[test]
fn an_unreadable_recovery_point_is_rebuilt_from_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(STATE), vec![0xa5; 64]).unwrap();
    let mut recovery = RecoveryReport::default();
    let (point, high_water) = read_recovery_point(&Disk, dir.path(), &mut recovery).unwrap();
    assert_eq!((point.acked, high_water), (0, None));
    assert!(recovery.state_rebuilt);
}

#[test]
fn a_written_recovery_point_reads_back_with_its_high_water_mark() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(LEGACY_CURSOR), "3\n").unwrap();
    let mut point = RecoveryPoint::default();
    open_state_file(&Disk, dir.path(), &mut point, None, 3, 12).unwrap();
    assert_eq!((point.acked, point.durable), (3, 12));
    assert!(
        !dir.path().join(LEGACY_CURSOR).exists(),
        "the legacy cursor is retired"
    );
    let mut recovery = RecoveryReport::default();
    let (read, high_water) = read_recovery_point(&Disk, dir.path(), &mut recovery).unwrap();
    assert_eq!((read.acked, read.durable, high_water), (3, 12, Some(12)));

    // Frames found past the high-water mark move it; none found leave it.
    let mut point = read;
    open_state_file(&Disk, dir.path(), &mut point, Some(12), 3, 15).unwrap();
    let (read, _) = read_recovery_point(&Disk, dir.path(), &mut recovery).unwrap();
    assert_eq!(read.durable, 15);
    let mut point = read;
    open_state_file(&Disk, dir.path(), &mut point, Some(15), 3, 15).unwrap();
    let (read, _) = read_recovery_point(&Disk, dir.path(), &mut recovery).unwrap();
    assert_eq!(read.durable, 15);
}

#[test]
fn the_gaps_journal_reads_empty_when_absent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(GAPS);
    assert!(read_gaps_journal(&Disk, &path).unwrap().is_empty());
    let gap = Gap {
        from: 4,
        to: 6,
        reason: GapReason::Damaged,
        at_ms: 7,
    };
    gaps::append(&Disk, &path, std::slice::from_ref(&gap)).unwrap();
    assert_eq!(read_gaps_journal(&Disk, &path).unwrap(), vec![gap]);
}
