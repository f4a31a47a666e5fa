//! The hub, a real queue and the real sync client, in one process over loopback HTTP.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use dermedge_queue::{
    new_record_id, DeviceKey, Embedding, EmbeddingType, Envelope, FullPolicy, Gap, GapReason,
    HubKey, HubPublic, Queue, QueueOptions, Record, RECORD_FORMAT,
};
use dermedge_sync::{wire, SyncClient, SyncConfig, SyncError};

use crate::server::{HubServer, UNAUTHENTICATED};
use crate::store::{Enrolled, Store};

fn record(device: &str, i: u64) -> Record {
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: 1_790_000_000_000 + i as i64,
        device_id: device.into(),
        model_id: "df-mini".into(),
        precision: "int8".into(),
        embedding: Embedding::new(&[i as f32, 1.5, -2.0], EmbeddingType::F32),
        heads: Vec::new(),
        quality: None,
        source: Some(format!("img-{i}.png")),
        thumbnail_jpeg: None,
    }
}

struct Setup {
    dir: tempfile::TempDir,
    db: PathBuf,
    hub: HubServer,
    hub_key: HubKey,
    key: DeviceKey,
    queue_dir: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hub.sqlite");
        let key = DeviceKey::generate();
        let hub_key = HubKey::generate();
        assert_eq!(
            Store::open(&db)
                .unwrap()
                .enroll("dev-1", &key.public())
                .unwrap(),
            Enrolled::New
        );
        let hub = HubServer::start(&db, hub_key.clone(), "127.0.0.1:0", 2).unwrap();
        let queue_dir = dir.path().join("queue");
        Setup {
            dir,
            db,
            hub,
            hub_key,
            key,
            queue_dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.hub.addr())
    }

    fn hub_public(&self) -> HubPublic {
        self.hub_key.public()
    }

    fn queue(&self, dir: &Path, key: &DeviceKey, options: QueueOptions) -> Mutex<Queue> {
        Mutex::new(Queue::open(dir, key, "dev-1", options).unwrap())
    }

    fn append(&self, queue: &Mutex<Queue>, record: &Record) {
        queue
            .lock()
            .unwrap()
            .append(&Envelope::seal(record, &self.hub_public()))
            .unwrap();
    }

    fn client(&self, dir: &Path, key: &DeviceKey) -> SyncClient {
        SyncClient::new(SyncConfig::new(&self.url()), key, self.hub_public(), dir).unwrap()
    }

    /// POST a raw body; (status, body).
    fn post(&self, device: &str, counter: u64, body: &[u8]) -> (u16, Vec<u8>) {
        let response = ureq::post(&format!("{}{}", self.url(), wire::BATCH_PATH))
            .set(wire::DEVICE_HEADER, device)
            .set(wire::COUNTER_HEADER, &counter.to_string())
            .send_bytes(body);
        let (status, r) = match response {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(code, r)) => (code, r),
            Err(e) => panic!("{e}"),
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes).unwrap();
        (status, bytes)
    }

    fn health(&self) -> serde_json::Value {
        let text = ureq::get(&format!("{}{}", self.url(), wire::HEALTH_PATH))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

fn rejections(db: &Path) -> Vec<(i64, String)> {
    let store = Store::open(db).unwrap();
    let mut stmt = store
        .connection()
        .prepare("SELECT status, reason FROM rejections ORDER BY rowid")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows
}

/// (epoch, seq, record id) of every stored record of `device`, in storage order.
fn stored(db: &Path, device: &str) -> Vec<(i64, i64, String)> {
    let store = Store::open(db).unwrap();
    let mut stmt = store
        .connection()
        .prepare("SELECT epoch, seq, record_id FROM records WHERE device_id = ?1 ORDER BY row")
        .unwrap();
    let rows = stmt
        .query_map([device], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn records_arrive_once_each_in_order_with_identical_bytes() {
    let s = Setup::new();
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    let mut sent = Vec::new();
    for i in 0..150 {
        let r = record("dev-1", i);
        s.append(&queue, &r);
        sent.push(r);
    }
    let mut config = SyncConfig::new(&s.url());
    config.batch_records = 40;
    let mut client = SyncClient::new(config, &s.key, s.hub_public(), &s.queue_dir).unwrap();
    let report = client
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    assert_eq!(
        (
            report.batches,
            report.records,
            report.gaps,
            report.acked_through
        ),
        (4, 150, 0, 150)
    );
    assert_eq!(queue.lock().unwrap().stats().pending_records, 0);

    let store = Store::open(&s.db).unwrap();
    let mut stmt = store
        .connection()
        .prepare("SELECT record_id, seq, embedding, record_cbor FROM records ORDER BY row")
        .unwrap();
    let rows: Vec<(String, i64, Vec<u8>, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 150);
    for (i, (r, (id, seq, embedding, cbor))) in sent.iter().zip(&rows).enumerate() {
        assert_eq!((id, *seq), (&r.id, i as i64 + 1));
        assert_eq!(embedding, &r.embedding.data);
        assert_eq!(cbor, &r.to_cbor());
    }
    s.hub.shutdown();
}

#[test]
fn tampered_replayed_and_unknown_requests_are_rejected_and_logged() {
    let s = Setup::new();
    let envelope = Envelope::seal(&record("dev-1", 1), &s.hub_public());
    let batch = wire::Batch {
        after_seq: 0,
        records: vec![wire::BatchRecord {
            seq: 1,
            cbor: envelope.to_cbor(),
        }],
        gaps: Vec::new(),
    };
    let body = wire::seal_batch(&s.key, "dev-1", 5, &batch);
    let mut tampered = body.clone();
    tampered[70] ^= 1;
    let unauthenticated = |(status, body): (u16, Vec<u8>)| {
        assert_eq!(status, 401);
        assert_eq!(String::from_utf8(body).unwrap().trim(), UNAUTHENTICATED);
    };
    unauthenticated(s.post("dev-1", 5, &tampered));
    // The header counter differs from the signed one.
    unauthenticated(s.post("dev-1", 6, &body));
    unauthenticated(s.post("dev-9", 5, &body));
    let other = wire::seal_batch(&DeviceKey::generate(), "dev-1", 5, &batch);
    unauthenticated(s.post("dev-1", 5, &other));
    unauthenticated(s.post("dev-1", 5, &body[..63]));
    let (status, ack) = s.post("dev-1", 5, &body);
    assert_eq!(status, 200);
    let ack = wire::open_ack(&s.hub_public(), "dev-1", 5, &body, &ack).unwrap();
    assert_eq!((ack.acked_through, ack.stored), (1, 1));
    let (status, conflict) = s.post("dev-1", 5, &body);
    assert_eq!(status, 409, "replayed");
    let conflict = wire::open_conflict(&s.hub_public(), "dev-1", 5, &body, &conflict).unwrap();
    assert_eq!(conflict.hub_last_counter, Some(5));
    let store = Store::open(&s.db).unwrap();
    assert_eq!(store.record_count().unwrap(), 1);
    let reasons = rejections(&s.db);
    assert_eq!(reasons.len(), 6, "{reasons:?}");
    assert!(reasons[0].1.contains("bad signature"));
    assert!(reasons[2].1.contains("unknown device"));
    assert!(reasons[4].1.contains("bad signature"));
    assert!(reasons[5].1.contains("replayed"));
    // A device that still speaks dermedge-sync/1 is told what to do.
    match ureq::post(&format!("{}/v1/batches", s.url())).send_bytes(&body) {
        Err(ureq::Error::Status(404, r)) => {
            assert!(r.into_string().unwrap().contains("upgrade the device"))
        }
        other => panic!("{other:?}"),
    }
    s.hub.shutdown();
}

/// Envelopes in a batch the device signed that cannot be read, opened or attributed are that
/// device's reported losses: the rest of the batch is stored and its queue moves on (a refused
/// batch would be sent again for ever).
#[test]
fn envelopes_that_do_not_open_or_name_another_device_become_reported_losses() {
    let s = Setup::new();
    let good = Envelope::seal(&record("dev-1", 1), &s.hub_public());
    let to_another_hub = Envelope::seal(&record("dev-1", 2), &HubKey::generate().public());
    let other_device = Envelope::seal(&record("dev-2", 3), &s.hub_public());
    // The outside says dev-1, the sealed record says dev-2.
    let mut relabelled = Envelope::seal(&record("dev-2", 4), &s.hub_public());
    relabelled.device_id = "dev-1".into();
    let mut records: Vec<wire::BatchRecord> = [good, to_another_hub, other_device, relabelled]
        .iter()
        .enumerate()
        .map(|(i, e)| wire::BatchRecord {
            seq: i as u64 + 1,
            cbor: e.to_cbor(),
        })
        .collect();
    records.push(wire::BatchRecord {
        seq: 5,
        cbor: b"not cbor".to_vec(),
    });
    let batch = wire::Batch {
        after_seq: 0,
        records,
        gaps: Vec::new(),
    };
    let body = wire::seal_batch(&s.key, "dev-1", 1, &batch);
    let (status, reply) = s.post("dev-1", 1, &body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    let ack = wire::open_ack(&s.hub_public(), "dev-1", 1, &body, &reply).unwrap();
    assert_eq!((ack.acked_through, ack.stored), (5, 1));
    assert_eq!(stored(&s.db, "dev-1").len(), 1);
    let store = Store::open(&s.db).unwrap();
    let mut stmt = store
        .connection()
        .prepare("SELECT from_seq, reason FROM gaps ORDER BY from_seq")
        .unwrap();
    let gaps: Vec<(i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let seqs: Vec<i64> = gaps.iter().map(|g| g.0).collect();
    assert_eq!(seqs, [2, 3, 4, 5], "{gaps:?}");
    assert!(gaps[0].1.contains("cannot be opened"), "{gaps:?}");
    assert!(
        gaps[1].1.contains("an envelope of device dev-2"),
        "{gaps:?}"
    );
    assert!(
        gaps[2].1.contains("the sealed record is") && gaps[2].1.contains("of dev-2"),
        "{gaps:?}"
    );
    assert!(gaps[3].1.contains("not an envelope"), "{gaps:?}");
    s.hub.shutdown();
}

#[test]
fn a_device_with_the_wrong_key_gets_a_clear_error_and_keeps_its_records() {
    let s = Setup::new();
    let wrong = DeviceKey::generate();
    let queue = s.queue(&s.queue_dir, &wrong, QueueOptions::default());
    s.append(&queue, &record("dev-1", 1));
    let mut client = s.client(&s.queue_dir, &wrong);
    let err = client
        .drain(&queue, &AtomicBool::new(false), Some(3))
        .unwrap_err();
    assert!(
        matches!(err, SyncError::Refused { status: 401, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
    assert_eq!(queue.lock().unwrap().stats().pending_records, 1);
    s.hub.shutdown();
}

#[test]
fn a_replacement_device_starts_a_new_epoch_and_the_old_records_stay() {
    let s = Setup::new();
    let old_queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    for i in 0..3 {
        s.append(&old_queue, &record("dev-1", i));
    }
    let mut client = s.client(&s.queue_dir, &s.key);
    client
        .drain(&old_queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    let old_ids: Vec<String> = stored(&s.db, "dev-1").into_iter().map(|r| r.2).collect();
    assert_eq!(old_ids.len(), 3);

    // The replacement: a new key under the same id.
    let new_key = DeviceKey::generate();
    let store = Store::open(&s.db).unwrap();
    assert_eq!(
        store.enroll("dev-1", &new_key.public()).unwrap(),
        Enrolled::Replaced { epoch: 2 }
    );
    assert_eq!(
        store.enroll("dev-1", &new_key.public()).unwrap(),
        Enrolled::Unchanged
    );
    let device = store.device("dev-1").unwrap().unwrap();
    assert_eq!(
        (device.last_counter, device.highest_seq, device.epoch),
        (0, 0, 2)
    );
    assert_eq!(device.public, Some(new_key.public()));

    let new_dir = s.dir.path().join("queue-2");
    let new_queue = s.queue(&new_dir, &new_key, QueueOptions::default());
    for i in 0..2 {
        s.append(&new_queue, &record("dev-1", 10 + i));
    }
    let report = s
        .client(&new_dir, &new_key)
        .drain(&new_queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    assert_eq!((report.records, report.acked_through), (2, 2));
    let rows = stored(&s.db, "dev-1");
    let positions: Vec<(i64, i64)> = rows.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(positions, [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]);
    assert_eq!(
        rows[..3].iter().map(|r| r.2.clone()).collect::<Vec<_>>(),
        old_ids
    );

    // The old device's key is no longer accepted.
    s.append(&old_queue, &record("dev-1", 3));
    let err = client
        .drain(&old_queue, &AtomicBool::new(false), Some(0))
        .unwrap_err();
    assert!(
        matches!(err, SyncError::Refused { status: 401, .. }),
        "{err}"
    );
    s.hub.shutdown();
}

#[test]
fn a_revoked_device_gets_the_same_answer_as_an_unknown_one() {
    let s = Setup::new();
    let batch = wire::Batch {
        after_seq: 0,
        records: vec![wire::BatchRecord {
            seq: 1,
            cbor: Envelope::seal(&record("dev-1", 1), &s.hub_public()).to_cbor(),
        }],
        gaps: Vec::new(),
    };
    let unknown = s.post("dev-9", 1, &wire::seal_batch(&s.key, "dev-9", 1, &batch));
    let store = Store::open(&s.db).unwrap();
    store.revoke("dev-1").unwrap();
    store.revoke("dev-1").unwrap();
    assert!(store.revoke("dev-9").is_err());
    assert!(store
        .device("dev-1")
        .unwrap()
        .unwrap()
        .revoked_at_ms
        .is_some());
    let revoked = s.post("dev-1", 1, &wire::seal_batch(&s.key, "dev-1", 1, &batch));
    assert_eq!(revoked, unknown);
    assert_eq!(revoked.0, 401);
    assert_eq!(store.record_count().unwrap(), 0);
    let reasons = rejections(&s.db);
    assert!(reasons[0].1.contains("unknown device"), "{reasons:?}");
    assert!(reasons[1].1.contains("revoked"), "{reasons:?}");
    // A revoked key stays revoked; a new key lifts it.
    let err = store.enroll("dev-1", &s.key.public()).unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    let replacement = DeviceKey::generate();
    store.enroll("dev-1", &replacement.public()).unwrap();
    assert!(store
        .device("dev-1")
        .unwrap()
        .unwrap()
        .revoked_at_ms
        .is_none());
    s.hub.shutdown();
}

/// The database holds public keys only: a copy of it, without the hub key file, cannot make an
/// acknowledgement or conflict that the device accepts.
#[test]
fn the_database_holds_no_secret() {
    let s = Setup::new();
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    s.append(&queue, &record("dev-1", 1));
    s.client(&s.queue_dir, &s.key)
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    let Setup {
        dir,
        db,
        hub,
        hub_key,
        key,
        ..
    } = s;
    hub.shutdown();

    let copy = dir.path().join("copy.sqlite");
    {
        let store = Store::open(&db).unwrap();
        store
            .connection()
            .execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
            .unwrap();
    }
    let store = Store::open(&copy).unwrap();
    let stored_key: Vec<u8> = store
        .connection()
        .query_row(
            "SELECT public_key FROM devices WHERE device_id = 'dev-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored_key, key.public().0);
    // Every blob and text cell of the devices table, and every 32-byte window of the whole
    // file, tried as a hub key or a device key: nothing signs what the device or hub accepts.
    let mut candidates: Vec<[u8; 32]> = Vec::new();
    let mut stmt = store.connection().prepare("SELECT * FROM devices").unwrap();
    let columns = stmt.column_count();
    let mut rows = stmt.query([]).unwrap();
    while let Some(row) = rows.next().unwrap() {
        for i in 0..columns {
            let bytes = match row.get_ref(i).unwrap() {
                rusqlite::types::ValueRef::Blob(b) => b.to_vec(),
                rusqlite::types::ValueRef::Text(t) => t.to_vec(),
                _ => continue,
            };
            for w in bytes.windows(32) {
                candidates.push(w.try_into().unwrap());
            }
        }
    }
    let file = std::fs::read(&copy).unwrap();
    candidates.extend(
        file.windows(32)
            .step_by(4)
            .map(|w| <[u8; 32]>::try_from(w).unwrap()),
    );
    candidates.sort_unstable();
    candidates.dedup();
    let hex = key.to_hex();
    let seed: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(!file
        .windows(32)
        .any(|w| w == seed || w == key.at_rest_key()));
    assert!(!file.windows(64).any(|w| w == hex.as_bytes()));
    let hub_public = hub_key.public();
    let ack = wire::Ack {
        counter: 99,
        acked_through: 1_000,
        stored: 0,
        duplicates: 0,
    };
    for candidate in candidates {
        let forged = HubKey::from_bytes(candidate);
        assert_ne!(forged.public(), hub_public);
        let body = wire::seal_ack(&forged, "dev-1", b"request", &ack);
        assert!(wire::open_ack(&hub_public, "dev-1", 99, b"request", &body).is_err());
        let device = DeviceKey::from_bytes(candidate);
        assert_ne!(device.public(), key.public());
    }
}

#[test]
fn the_database_and_exports_are_private_to_their_owner() {
    let s = Setup::new();
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    s.append(&queue, &record("dev-1", 1));
    s.client(&s.queue_dir, &s.key)
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    let store = Store::open(&s.db).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", s.db.display()));
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    let dir = s.dir.path();
    let (csv, npy) = (dir.join("r.csv"), dir.join("e.npy"));
    std::fs::write(&csv, "old").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&csv, std::fs::Permissions::from_mode(0o644)).unwrap();
    crate::export::export(&store, &Default::default(), Some(&csv), Some(&npy)).unwrap();
    for path in [
        csv,
        npy.clone(),
        PathBuf::from(format!("{}.json", npy.display())),
    ] {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    // An existing database left readable by others is tightened on open.
    let loose = dir.join("loose.sqlite");
    drop(Store::open(&loose).unwrap());
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(Store::open(&loose).unwrap());
    assert_eq!(mode(&loose), 0o600);
    s.hub.shutdown();
}

#[test]
fn export_writes_csv_and_npy_in_sequence_order() {
    let s = Setup::new();
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    for i in 0..5 {
        s.append(&queue, &record("dev-1", i));
    }
    s.client(&s.queue_dir, &s.key)
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    let store = Store::open(&s.db).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (csv, npy) = (dir.path().join("r.csv"), dir.path().join("e.npy"));
    let out = crate::export::export(&store, &Default::default(), Some(&csv), Some(&npy)).unwrap();
    assert_eq!(
        out,
        crate::export::Exported {
            rows: 5,
            dim: Some(3),
            gaps: 0,
            skipped: 0,
        }
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 6);
    assert!(text.lines().nth(3).unwrap().contains(",3,"));
    assert!(text.lines().nth(3).unwrap().ends_with(",1"), "epoch");
    assert!(!crate::export::gaps_csv_path(&csv).exists());
    let bytes = std::fs::read(&npy).unwrap();
    let data = &bytes[bytes.len() - 5 * 3 * 4..];
    assert_eq!(f32::from_le_bytes(data[12..16].try_into().unwrap()), 1.0);
    s.hub.shutdown();
}

/// A queue that evicts under pressure reports what it dropped; the hub stores each loss once,
/// shows it in health and export, and takes the surviving records after it.
#[test]
fn evicted_records_are_reported_once_and_appear_in_health_and_export() {
    let s = Setup::new();
    let options = QueueOptions {
        segment_bytes: 4096,
        max_bytes: 8192,
        full_policy: FullPolicy::EvictOldest,
        ..QueueOptions::default()
    };
    let queue = s.queue(&s.queue_dir, &s.key, options);
    let mut sent = Vec::new();
    for i in 0..60 {
        let r = record("dev-1", i);
        s.append(&queue, &r);
        sent.push(r);
    }
    let gaps = queue.lock().unwrap().unreported_gaps();
    assert!(!gaps.is_empty(), "nothing was evicted");
    let lost: u64 = gaps.iter().map(|g| g.to - g.from + 1).sum();
    let report = s
        .client(&s.queue_dir, &s.key)
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    assert_eq!(report.records as u64 + lost, 60);
    assert_eq!((report.gaps, report.acked_through), (gaps.len(), 60));
    assert!(queue.lock().unwrap().unreported_gaps().is_empty());
    let rows = stored(&s.db, "dev-1");
    assert_eq!(rows.len() as u64, 60 - lost);
    for (_, seq, id) in &rows {
        assert!(!gaps.iter().any(|g| g.covers(*seq as u64)));
        assert_eq!(id, &sent[*seq as usize - 1].id);
    }

    // The same gap sent again (a lost ack) is stored once; a record inside it is refused.
    let counter = 1_000;
    let again = wire::Batch {
        after_seq: 60,
        records: Vec::new(),
        gaps: gaps.clone(),
    };
    let (status, _) = s.post(
        "dev-1",
        counter,
        &wire::seal_batch(&s.key, "dev-1", counter, &again),
    );
    assert_eq!(status, 200);
    let inside = wire::Batch {
        after_seq: 0,
        records: vec![wire::BatchRecord {
            seq: gaps[0].from,
            cbor: Envelope::seal(&record("dev-1", 99), &s.hub_public()).to_cbor(),
        }],
        gaps: Vec::new(),
    };
    let (status, _) = s.post(
        "dev-1",
        counter + 1,
        &wire::seal_batch(&s.key, "dev-1", counter + 1, &inside),
    );
    assert_eq!(status, 400);

    let store = Store::open(&s.db).unwrap();
    let count: i64 = store
        .connection()
        .query_row("SELECT COUNT(*) FROM gaps", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count as usize, gaps.len());
    let health = s.health();
    assert_eq!(health["devices"], 1);
    assert_eq!(health["gaps"], gaps.len());
    assert!(
        !health.to_string().contains("dev-1"),
        "health lists device ids: {health}"
    );
    let summary = &store.summaries().unwrap()[0];
    assert_eq!(summary.device_id, "dev-1");
    assert_eq!(summary.gaps, gaps.len() as u64);
    assert_eq!(summary.records, 60 - lost);

    let csv = s.dir.path().join("records.csv");
    let out = crate::export::export(&store, &Default::default(), Some(&csv), None).unwrap();
    assert_eq!(out.gaps, gaps.len());
    let gaps_csv = crate::export::gaps_csv_path(&csv);
    assert_eq!(gaps_csv, s.dir.path().join("records.gaps.csv"));
    assert_eq!(mode(&gaps_csv), 0o600);
    let text = std::fs::read_to_string(&gaps_csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("device_id,epoch,from,to,reason,at_ms"));
    for (line, gap) in lines.zip(&gaps) {
        assert!(
            line.starts_with(&format!("dev-1,1,{},{},evicted,", gap.from, gap.to)),
            "{line}"
        );
    }
    s.hub.shutdown();
}

/// When nothing but a loss waits (every segment vanished), a batch of gaps alone reports it and
/// moves the cursor; the next record follows it.
#[test]
fn a_batch_of_gaps_alone_reports_a_loss_with_no_records_left() {
    let s = Setup::new();
    {
        let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
        for i in 0..5 {
            s.append(&queue, &record("dev-1", i));
        }
    }
    for entry in std::fs::read_dir(&s.queue_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "dlog") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    let gaps = queue.lock().unwrap().unreported_gaps();
    assert_eq!(
        gaps,
        [Gap {
            from: 1,
            to: 5,
            reason: GapReason::Missing,
            at_ms: gaps[0].at_ms,
        }]
    );
    let mut client = s.client(&s.queue_dir, &s.key);
    let report = client
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    assert_eq!(
        (
            report.batches,
            report.records,
            report.gaps,
            report.acked_through
        ),
        (1, 0, 1, 5)
    );
    assert_eq!(queue.lock().unwrap().acked_seq(), 5);
    assert!(queue.lock().unwrap().unreported_gaps().is_empty());
    assert_eq!(
        client.push_once(&queue).unwrap(),
        dermedge_sync::Pushed::Idle
    );
    s.append(&queue, &record("dev-1", 6));
    let report = client
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    assert_eq!((report.records, report.acked_through), (1, 6));
    let rows = stored(&s.db, "dev-1");
    assert_eq!(rows.iter().map(|r| r.1).collect::<Vec<_>>(), [6]);
    let store = Store::open(&s.db).unwrap();
    assert_eq!(store.device("dev-1").unwrap().unwrap().highest_seq, 6);
    assert_eq!(store.summaries().unwrap()[0].gaps, 1);
    s.hub.shutdown();
}

/// The schema before public keys: devices with a shared sync key.
const SCHEMA_1: &str = "
CREATE TABLE devices (
    device_id      TEXT PRIMARY KEY,
    sync_key       BLOB NOT NULL,
    last_counter   INTEGER NOT NULL DEFAULT 0,
    highest_seq    INTEGER NOT NULL DEFAULT 0,
    enrolled_at_ms INTEGER NOT NULL
);
CREATE TABLE records (
    row             INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id       TEXT NOT NULL UNIQUE,
    device_id       TEXT NOT NULL REFERENCES devices(device_id),
    seq             INTEGER NOT NULL,
    captured_at_ms  INTEGER NOT NULL,
    model_id        TEXT NOT NULL,
    precision       TEXT NOT NULL,
    embedding_dtype TEXT NOT NULL,
    embedding_dim   INTEGER NOT NULL,
    embedding       BLOB NOT NULL,
    heads_json      TEXT NOT NULL,
    quality_json    TEXT,
    source          TEXT,
    thumbnail_jpeg  BLOB,
    record_cbor     BLOB NOT NULL,
    received_at_ms  INTEGER NOT NULL,
    UNIQUE (device_id, seq)
);
CREATE TABLE rejections (
    at_ms     INTEGER NOT NULL,
    remote    TEXT,
    device_id TEXT,
    status    INTEGER NOT NULL,
    reason    TEXT NOT NULL
);
";

#[test]
fn a_shared_key_database_is_migrated_and_its_devices_must_re_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.sqlite");
    let shared = [0x5au8; 32];
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .unwrap();
        conn.execute_batch(SCHEMA_1).unwrap();
        conn.execute(
            "INSERT INTO devices VALUES ('dev-1', ?1, 7, 2, 1)",
            [shared.to_vec()],
        )
        .unwrap();
        for seq in 1..=2 {
            let r = record("dev-1", seq);
            conn.execute(
                "INSERT INTO records (record_id, device_id, seq, captured_at_ms, model_id,
                     precision, embedding_dtype, embedding_dim, embedding, heads_json, record_cbor,
                     received_at_ms)
                 VALUES (?1, 'dev-1', ?2, 1, 'df-mini', 'int8', 'f32', 3, ?3, '[]', ?4, 1)",
                rusqlite::params![r.id, seq as i64, r.embedding.data, r.to_cbor()],
            )
            .unwrap();
        }
    }
    let store = Store::open(&db).unwrap();
    let version: i64 = store
        .connection()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, crate::store::SCHEMA_VERSION);
    let device = store.device("dev-1").unwrap().unwrap();
    assert_eq!(device.public, None);
    assert_eq!(
        (device.last_counter, device.highest_seq, device.epoch),
        (7, 2, 1)
    );
    assert_eq!(stored(&db, "dev-1").len(), 2);
    let columns: Vec<String> = store
        .connection()
        .prepare("SELECT name FROM pragma_table_info('devices')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!columns.iter().any(|c| c == "sync_key"), "{columns:?}");
    drop(store);
    let file = std::fs::read(&db).unwrap();
    assert!(
        !file.windows(32).any(|w| w == shared),
        "the shared key is left in the file"
    );
    // Opening again changes nothing.
    drop(Store::open(&db).unwrap());

    let key = DeviceKey::generate();
    let hub_key = HubKey::generate();
    let hub = HubServer::start(&db, hub_key.clone(), "127.0.0.1:0", 1).unwrap();
    let queue_dir = dir.path().join("queue");
    // The upgraded device keeps its queue: records 1 and 2 were acknowledged before.
    let queue =
        Mutex::new(Queue::open(&queue_dir, &key, "dev-1", QueueOptions::default()).unwrap());
    {
        let mut q = queue.lock().unwrap();
        for seq in 1..=3 {
            q.append(&Envelope::seal(&record("dev-1", seq), &hub_key.public()))
                .unwrap();
        }
        q.acknowledge(2).unwrap();
    }
    let mut client = SyncClient::new(
        SyncConfig::new(&format!("http://{}", hub.addr())),
        &key,
        hub_key.public(),
        &queue_dir,
    )
    .unwrap();
    let err = client
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Refused { status: 401, message, .. } if message == UNAUTHENTICATED),
        "{err}"
    );
    let reasons = rejections(&db);
    assert!(
        reasons[0].1.contains("old shared-key scheme: re-enroll"),
        "{reasons:?}"
    );
    assert_eq!(
        Store::open(&db)
            .unwrap()
            .enroll("dev-1", &key.public())
            .unwrap(),
        Enrolled::Migrated
    );
    // Its counter state is new here: the hub's signed conflict moves it past 7, then it syncs.
    let report = client
        .drain(&queue, &AtomicBool::new(false), Some(3))
        .unwrap();
    assert_eq!(report.records, 1);
    let positions: Vec<(i64, i64)> = stored(&db, "dev-1").iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(positions, [(1, 1), (1, 2), (1, 3)]);
    hub.shutdown();
}

#[test]
fn the_rejections_log_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("hub.sqlite")).unwrap();
    let n = crate::store::MAX_REJECTIONS + 5;
    store.connection().execute_batch("BEGIN").unwrap();
    for i in 0..n {
        store.log_rejection(None, None, 400, &format!("reason {i}"));
    }
    store.connection().execute_batch("COMMIT").unwrap();
    let (count, first): (i64, String) = store
        .connection()
        .query_row(
            "SELECT COUNT(*), (SELECT reason FROM rejections ORDER BY rowid LIMIT 1) FROM rejections",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(count, crate::store::MAX_REJECTIONS);
    assert_eq!(first, "reason 5");
}

/// Device-written fields that would forge CSV rows, run as spreadsheet formulas, shift columns
/// or break the `.npy`: inert in the export, or refused on arrival with the reason kept as the
/// device's loss, while the rest of the batch is stored.
#[test]
fn forged_fields_are_inert_in_the_export_or_refused_on_arrival() {
    let s = Setup::new();
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    let mut formula = record("dev-1", 1);
    formula.source = Some("/home/jane-doe/=HYPERLINK(1).png".into());
    formula.model_id = "=cmd|' /C calc'!A0".into();
    let mut forged_id = record("dev-1", 2);
    forged_id.id = "abc\r\nforged,row,=1+1".into();
    let mut comma = record("dev-1", 3);
    comma.precision = "int8,shifted".into();
    let mut short = record("dev-1", 4);
    short.embedding.data.truncate(5);
    let good = record("dev-1", 5);
    for r in [&formula, &forged_id, &comma, &short, &good] {
        s.append(&queue, r);
    }
    let report = s
        .client(&s.queue_dir, &s.key)
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    assert_eq!(
        report.records, 5,
        "the device's queue moved past every record"
    );
    let store = Store::open(&s.db).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (csv, npy) = (dir.path().join("r.csv"), dir.path().join("e.npy"));
    let filter = crate::export::ExportFilter {
        model_id: Some("df-mini".into()),
        ..Default::default()
    };
    let out = crate::export::export(&store, &filter, Some(&csv), Some(&npy)).unwrap();
    assert_eq!((out.rows, out.skipped), (1, 0), "{out:?}");
    let all = crate::export::export(&store, &Default::default(), Some(&csv), None).unwrap();
    assert_eq!((all.rows, all.gaps), (2, 3), "{all:?}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2, "{text}");
    for row in &rows {
        assert_eq!(row.len(), 11, "{row:?}");
        for cell in row {
            assert!(
                !cell.starts_with(['=', '+', '-', '@']),
                "a live formula: {cell:?}"
            );
        }
    }
    let forged = rows.iter().find(|r| r[4].contains("cmd")).unwrap();
    assert_eq!(&forged[4], "'=cmd|' /C calc'!A0");
    // The stored source is the file name alone.
    assert_eq!(&forged[7], "'=HYPERLINK(1).png");
    let gaps = std::fs::read_to_string(crate::export::gaps_csv_path(&csv)).unwrap();
    for expected in ["refused: id", "refused: precision", "refused: embedding"] {
        assert!(gaps.contains(expected), "{expected} in {gaps}");
    }
    assert!(!gaps.contains("forged,row"), "{gaps}");
    s.hub.shutdown();
}

/// A batch holding a refused record, sent again after its ack was lost (a new counter, the same
/// records): the refusal is already recorded, so the batch is acknowledged again, not refused.
#[test]
fn a_refused_record_sent_again_is_acknowledged_again() {
    let s = Setup::new();
    let mut bad = record("dev-1", 2);
    bad.id = "not-hex".into();
    let batch = wire::Batch {
        after_seq: 0,
        records: [record("dev-1", 1), bad]
            .iter()
            .enumerate()
            .map(|(i, r)| wire::BatchRecord {
                seq: i as u64 + 1,
                cbor: Envelope::seal(r, &s.hub_public()).to_cbor(),
            })
            .collect(),
        gaps: Vec::new(),
    };
    for (counter, duplicates) in [(5, 0), (6, 2)] {
        let body = wire::seal_batch(&s.key, "dev-1", counter, &batch);
        let (status, reply) = s.post("dev-1", counter, &body);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
        let ack = wire::open_ack(&s.hub_public(), "dev-1", counter, &body, &reply).unwrap();
        assert_eq!((ack.acked_through, ack.duplicates), (2, duplicates));
    }
    assert_eq!(stored(&s.db, "dev-1").len(), 1);
    s.hub.shutdown();
}
