//! The hub, a real queue and the real sync client, in one process over loopback HTTP. The tests
//! of what the hub stores run on SQLite and, when `DERMEDGE_TEST_POSTGRES_URL` is set, on
//! PostgreSQL ([`on_both_backends!`]); the tests of the SQLite file itself on SQLite only.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use dermedge_queue::{FullPolicy, Gap, GapReason, Queue, QueueOptions};
use dermedge_record::{
    new_record_id, DeviceKey, EmbeddingType, Envelope, HubKey, HubPublic, Record, StoredEmbedding,
    ENVELOPE_FORMAT, RECORD_FORMAT,
};
use dermedge_sync::{wire, SyncClient, SyncConfig, SyncError};

use crate::server::{HubServer, UNAUTHENTICATED};
use crate::store::{Enrolled, Store};
use crate::test_db::{on_both_backends, Backend, TestDb};

on_both_backends!(
    records_arrive_once_each_in_order_with_identical_bytes,
    tampered_replayed_and_unknown_requests_are_rejected_and_logged,
    envelopes_that_do_not_open_or_name_another_device_become_reported_losses,
    a_device_with_the_wrong_key_gets_a_clear_error_and_keeps_its_records,
    a_replacement_device_starts_a_new_epoch_and_the_old_records_stay,
    a_revoked_device_gets_the_same_answer_as_an_unknown_one,
    export_writes_csv_and_npy_in_sequence_order,
    evicted_records_are_reported_once_and_appear_in_health_and_export,
    a_batch_of_gaps_alone_reports_a_loss_with_no_records_left,
    the_rejections_log_is_bounded,
    forged_fields_are_inert_in_the_export_or_refused_on_arrival,
    a_refused_record_sent_again_is_acknowledged_again,
    migrations_are_recorded_once_and_a_newer_schema_is_refused,
    hubs_starting_together_migrate_once,
    a_missing_database_is_not_created_where_one_must_exist,
    two_hubs_on_one_database_store_every_record_exactly_once,
);

fn record(device: &str, i: u64) -> Record {
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: 1_790_000_000_000 + i as i64,
        device_id: device.into(),
        model_id: "df-mini".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&[i as f32, 1.5, -2.0], EmbeddingType::F32),
        heads: Vec::new(),
        quality: None,
        source: Some(format!("img-{i}.png")),
        thumbnail_jpeg: None,
    }
}

struct Setup {
    /// Dropped (stopped) before the database.
    hub: HubServer,
    hub_key: HubKey,
    key: DeviceKey,
    queue_dir: PathBuf,
    db: TestDb,
}

impl Setup {
    fn new(backend: Backend) -> Self {
        let db = TestDb::new(backend);
        let key = DeviceKey::generate();
        let hub_key = HubKey::generate();
        assert_eq!(
            db.open().enroll("dev-1", &key.public()).unwrap(),
            Enrolled::New
        );
        let hub = HubServer::start(&db.location, hub_key.clone(), "127.0.0.1:0", 2).unwrap();
        let queue_dir = db.dir.path().join("queue");
        Setup {
            hub,
            hub_key,
            key,
            queue_dir,
            db,
        }
    }

    fn dir(&self) -> &Path {
        self.db.dir.path()
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

fn rejections(db: &TestDb) -> Vec<(i64, String)> {
    db.open()
        .rejections()
        .unwrap()
        .into_iter()
        .map(|r| (r.status, r.reason))
        .collect()
}

/// (epoch, seq, record id) of every stored record of `device`, in storage order.
fn stored(db: &TestDb, device: &str) -> Vec<(i64, i64, String)> {
    db.open()
        .query(
            "SELECT epoch, seq, record_id FROM records WHERE device_id = ?1 ORDER BY row",
            &[device.into()],
        )
        .unwrap()
        .iter()
        .map(|r| (r.int(0).unwrap(), r.int(1).unwrap(), r.text(2).unwrap()))
        .collect()
}

/// (from, reason) of every stored gap, by where it starts.
fn gaps(store: &Store) -> Vec<(i64, String)> {
    store
        .gaps(None)
        .unwrap()
        .into_iter()
        .map(|g| (g.from, g.reason))
        .collect()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn records_arrive_once_each_in_order_with_identical_bytes(backend: Backend) {
    let s = Setup::new(backend);
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
    let depth = |s: &Setup| s.db.open().device_health(0).unwrap()[0].queue_depth;
    // Until the hub has shown it is of this release (it answered a head query), the batch
    // carries nothing an older hub would refuse.
    client.push_once(&queue).unwrap();
    assert_eq!(depth(&s), None);
    let query = wire::HeadQuery {
        model_id: "df-mini".into(),
        embedding_dim: 3,
        have: Vec::new(),
    };
    assert!(client.fetch_heads("dev-1", &query).unwrap().is_empty());
    client.push_once(&queue).unwrap();
    assert_eq!(
        depth(&s),
        Some(70),
        "the device reports what it still holds"
    );
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
        (2, 70, 0, 150)
    );
    assert_eq!(queue.lock().unwrap().stats().pending_records, 0);
    assert_eq!(depth(&s), Some(0));

    let rows: Vec<(String, i64, Vec<u8>, Vec<u8>)> =
        s.db.open()
            .query(
                "SELECT record_id, seq, embedding, record_cbor FROM records ORDER BY row",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.text(0).unwrap(),
                    r.int(1).unwrap(),
                    r.blob(2).unwrap(),
                    r.blob(3).unwrap(),
                )
            })
            .collect();
    assert_eq!(rows.len(), 150);
    for (i, (r, (id, seq, embedding, cbor))) in sent.iter().zip(&rows).enumerate() {
        assert_eq!((id, *seq), (&r.id, i as i64 + 1));
        assert_eq!(embedding, &r.embedding.data);
        assert_eq!(cbor, &r.to_cbor());
    }
    s.hub.shutdown();
}

fn tampered_replayed_and_unknown_requests_are_rejected_and_logged(backend: Backend) {
    let s = Setup::new(backend);
    let envelope = Envelope::seal(&record("dev-1", 1), &s.hub_public());
    let batch = wire::Batch {
        queued_after: None,
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
    let store = s.db.open();
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
fn envelopes_that_do_not_open_or_name_another_device_become_reported_losses(backend: Backend) {
    let s = Setup::new(backend);
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
        queued_after: None,
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
    let gaps = gaps(&s.db.open());
    let seqs: Vec<i64> = gaps.iter().map(|g| g.0).collect();
    assert_eq!(seqs, [2, 3, 4, 5], "{gaps:?}");
    assert!(
        gaps[0]
            .1
            .contains("the sealed record is not sealed to this hub's key"),
        "{gaps:?}"
    );
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

fn a_device_with_the_wrong_key_gets_a_clear_error_and_keeps_its_records(backend: Backend) {
    let s = Setup::new(backend);
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

fn a_replacement_device_starts_a_new_epoch_and_the_old_records_stay(backend: Backend) {
    let s = Setup::new(backend);
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
    let store = s.db.open();
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

    let new_dir = s.dir().join("queue-2");
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

fn a_revoked_device_gets_the_same_answer_as_an_unknown_one(backend: Backend) {
    let s = Setup::new(backend);
    let batch = wire::Batch {
        queued_after: None,
        after_seq: 0,
        records: vec![wire::BatchRecord {
            seq: 1,
            cbor: Envelope::seal(&record("dev-1", 1), &s.hub_public()).to_cbor(),
        }],
        gaps: Vec::new(),
    };
    let unknown = s.post("dev-9", 1, &wire::seal_batch(&s.key, "dev-9", 1, &batch));
    let store = s.db.open();
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
    let s = Setup::new(Backend::Sqlite);
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    s.append(&queue, &record("dev-1", 1));
    s.client(&s.queue_dir, &s.key)
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    let Setup {
        db,
        hub,
        hub_key,
        key,
        ..
    } = s;
    hub.shutdown();

    let copy = db.dir.path().join("copy.sqlite");
    {
        let store = db.open();
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
    let s = Setup::new(Backend::Sqlite);
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    s.append(&queue, &record("dev-1", 1));
    s.client(&s.queue_dir, &s.key)
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    let store = s.db.open();
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", s.db.path().display()));
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    let dir = s.dir();
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

fn export_writes_csv_and_npy_in_sequence_order(backend: Backend) {
    let s = Setup::new(backend);
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    for i in 0..5 {
        s.append(&queue, &record("dev-1", i));
    }
    s.client(&s.queue_dir, &s.key)
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    let store = s.db.open();
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
fn evicted_records_are_reported_once_and_appear_in_health_and_export(backend: Backend) {
    let s = Setup::new(backend);
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
        queued_after: None,
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
        queued_after: None,
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

    let store = s.db.open();
    assert_eq!(store.gaps(None).unwrap().len(), gaps.len());
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

    let csv = s.dir().join("records.csv");
    let out = crate::export::export(&store, &Default::default(), Some(&csv), None).unwrap();
    assert_eq!(out.gaps, gaps.len());
    let gaps_csv = crate::export::gaps_csv_path(&csv);
    assert_eq!(gaps_csv, s.dir().join("records.gaps.csv"));
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
fn a_batch_of_gaps_alone_reports_a_loss_with_no_records_left(backend: Backend) {
    let s = Setup::new(backend);
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
    let store = s.db.open();
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
    let test_db = TestDb::new(Backend::Sqlite);
    let db = test_db.path();
    let shared = [0x5au8; 32];
    {
        let conn = rusqlite::Connection::open(db).unwrap();
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
    let store = Store::open(db).unwrap();
    let version: i64 = store
        .connection()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    // What a dermedge from before schema_migrations reads as its own schema (2).
    assert_eq!(version, crate::store::SCHEMA_VERSION + 1);
    assert_eq!(migrations(&store), all_migrations());
    let device = store.device("dev-1").unwrap().unwrap();
    assert_eq!(device.public, None);
    assert_eq!(
        (device.last_counter, device.highest_seq, device.epoch),
        (7, 2, 1)
    );
    assert_eq!(stored(&test_db, "dev-1").len(), 2);
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
    let file = std::fs::read(db).unwrap();
    assert!(
        !file.windows(32).any(|w| w == shared),
        "the shared key is left in the file"
    );
    // Opening again changes nothing.
    drop(Store::open(db).unwrap());

    let key = DeviceKey::generate();
    let hub_key = HubKey::generate();
    let hub = HubServer::start(db, hub_key.clone(), "127.0.0.1:0", 1).unwrap();
    let queue_dir = test_db.dir.path().join("queue");
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
    let reasons = rejections(&test_db);
    assert!(
        reasons[0].1.contains("old shared-key scheme: re-enroll"),
        "{reasons:?}"
    );
    assert_eq!(
        Store::open(db)
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
    let positions: Vec<(i64, i64)> = stored(&test_db, "dev-1")
        .iter()
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(positions, [(1, 1), (1, 2), (1, 3)]);
    hub.shutdown();
}

fn the_rejections_log_is_bounded(backend: Backend) {
    let db = TestDb::new(backend);
    let store = db.open();
    let n = crate::store::MAX_REJECTIONS + 5;
    // One transaction on SQLite, so that the ten thousand rows take no minute; PostgreSQL
    // commits each (the test cluster does not wait for the disk).
    let batched = backend == Backend::Sqlite;
    if batched {
        store.connection().execute_batch("BEGIN").unwrap();
    }
    for i in 0..n {
        store.log_rejection(None, None, 400, &format!("reason {i}"));
    }
    if batched {
        store.connection().execute_batch("COMMIT").unwrap();
    }
    let log = store.rejections().unwrap();
    assert_eq!(log.len() as i64, crate::store::MAX_REJECTIONS);
    assert_eq!(log[0].reason, "reason 5");
    assert_eq!(log.last().unwrap().reason, format!("reason {}", n - 1));
}

/// Device-written fields that would forge CSV rows, run as spreadsheet formulas, shift columns
/// or break the `.npy`: inert in the export, or refused on arrival with the reason kept as the
/// device's loss, while the rest of the batch is stored.
fn forged_fields_are_inert_in_the_export_or_refused_on_arrival(backend: Backend) {
    let s = Setup::new(backend);
    let queue = s.queue(&s.queue_dir, &s.key, QueueOptions::default());
    let mut formula = record("dev-1", 1);
    formula.source = Some("/home/jane-doe/=HYPERLINK(1).png".into());
    formula.model_id = "=cmd|' /C calc'!A0".into();
    let mut forged_id = record("dev-1", 2);
    forged_id.id = "abc\r\nforged,row,=1+1".into();
    // A precision with a comma (to shift the CSV's columns): no device makes one, so it is
    // written into the record's CBOR by hand and sealed as a device would.
    let comma = record("dev-1", 3);
    let mut short = record("dev-1", 4);
    short.embedding.data.truncate(5);
    let good = record("dev-1", 5);
    for r in [&formula, &forged_id] {
        s.append(&queue, r);
    }
    queue
        .lock()
        .unwrap()
        .append(&sealed_with_precision(
            &comma,
            "int8,shifted",
            &s.hub_public(),
        ))
        .unwrap();
    for r in [&short, &good] {
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
    let store = s.db.open();
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
    for expected in [
        "refused: id",
        // (quoted as CSV quotes it)
        "refused: the sealed record does not decode: precision \"\"int8,shifted\"\": expected one of",
        "refused: embedding",
    ] {
        assert!(gaps.contains(expected), "{expected} in {gaps}");
    }
    assert!(!gaps.contains("forged,row"), "{gaps}");
    s.hub.shutdown();
}

/// `record` sealed to the hub with its precision replaced by `precision` in its CBOR.
fn sealed_with_precision(record: &Record, precision: &str, hub: &HubPublic) -> Envelope {
    let mut value: ciborium::Value = ciborium::from_reader(record.to_cbor().as_slice()).unwrap();
    for (key, v) in value.as_map_mut().unwrap() {
        if key.as_text() == Some("precision") {
            *v = ciborium::Value::Text(precision.into());
        }
    }
    let mut cbor = Vec::new();
    ciborium::into_writer(&value, &mut cbor).unwrap();
    Envelope {
        format: ENVELOPE_FORMAT,
        id: record.id.clone(),
        captured_at_ms: record.captured_at_ms,
        device_id: record.device_id.clone(),
        sealed: hub.seal(&cbor),
    }
}

/// A batch holding a refused record, sent again after its ack was lost (a new counter, the same
/// records): the refusal is already recorded, so the batch is acknowledged again, not refused.
fn a_refused_record_sent_again_is_acknowledged_again(backend: Backend) {
    let s = Setup::new(backend);
    let mut bad = record("dev-1", 2);
    bad.id = "not-hex".into();
    let batch = wire::Batch {
        queued_after: None,
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

/// Every version this dermedge knows, in order.
fn all_migrations() -> Vec<i64> {
    (1..=crate::store::SCHEMA_VERSION).collect()
}

/// Undo migration 2 (the web page's tables) by hand, leaving an SQLite database of version 1.
pub(crate) fn roll_back_to_version_1(conn: &rusqlite::Connection) {
    conn.execute_batch(
        "DROP TABLE heads; ALTER TABLE devices DROP COLUMN queue_depth;
         DROP TABLE labels; DROP TABLE sessions; DROP TABLE users; DROP TABLE record_heads;
         DROP INDEX records_by_capture; ALTER TABLE devices DROP COLUMN last_batch_at_ms;
         DELETE FROM schema_migrations WHERE version IN (2, 3); PRAGMA user_version = 2;",
    )
    .unwrap();
}

/// The versions recorded in `schema_migrations`, in order.
fn migrations(store: &Store) -> Vec<i64> {
    store
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.int(0).unwrap())
        .collect()
}

fn migrations_are_recorded_once_and_a_newer_schema_is_refused(backend: Backend) {
    let db = TestDb::new(backend);
    let store = db.open();
    assert_eq!(migrations(&store), all_migrations());
    let applied_at = store
        .query("SELECT applied_at_ms FROM schema_migrations", &[])
        .unwrap()[0]
        .int(0)
        .unwrap();
    assert!(applied_at > 1_700_000_000_000, "{applied_at}");
    // Opening again (a restart, a second hub) applies nothing.
    drop(db.open());
    drop(db.open());
    assert_eq!(migrations(&store), all_migrations());

    // A database a newer dermedge migrated further is refused, by name.
    store
        .execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, 0)",
            &[(crate::store::SCHEMA_VERSION + 1).into()],
        )
        .unwrap();
    let err = Store::connect(&db.location).err().expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("newer than this dermedge's") && text.contains(&db.location.to_string()),
        "{text}"
    );
}

/// Hubs started at the same moment on a new database: one creates the schema, every one opens.
fn hubs_starting_together_migrate_once(backend: Backend) {
    let db = TestDb::new(backend);
    let location = &db.location;
    let stores: Vec<Store> = std::thread::scope(|scope| {
        let opening: Vec<_> = (0..4)
            .map(|_| scope.spawn(move || Store::connect(location).unwrap()))
            .collect();
        opening.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for store in &stores {
        assert_eq!(migrations(store), all_migrations());
        assert_eq!(store.record_count().unwrap(), 0);
    }
}

fn a_missing_database_is_not_created_where_one_must_exist(backend: Backend) {
    let db = TestDb::new(backend);
    let err = Store::connect_existing(&db.location)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("no hub database here"), "{err}");
    if backend == Backend::Sqlite {
        assert!(!db.path().exists());
    }
    // Where a database may be created, it is; then it exists.
    drop(db.open());
    let store = Store::connect_existing(&db.location).unwrap();
    assert_eq!(store.record_count().unwrap(), 0);
}

/// A database written by dermedge before `schema_migrations` (schema version 2 in
/// `user_version`) opens as version 1, its records kept, and is migrated on from there.
#[test]
fn a_database_from_before_schema_migrations_is_at_version_1() {
    let db = TestDb::new(Backend::Sqlite);
    let key = DeviceKey::generate();
    {
        let store = db.open();
        store.enroll("dev-1", &key.public()).unwrap();
        roll_back_to_version_1(store.connection());
        store
            .connection()
            .execute_batch("DROP TABLE schema_migrations; PRAGMA user_version = 2;")
            .unwrap();
    }
    let store = db.open();
    assert_eq!(migrations(&store), all_migrations());
    assert_eq!(
        store.device("dev-1").unwrap().unwrap().public,
        Some(key.public())
    );
    let version: i64 = store
        .connection()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, crate::store::SCHEMA_VERSION + 1);
    // A database of a dermedge from before schema_migrations that is newer than it knew.
    store
        .connection()
        .execute_batch("DROP TABLE schema_migrations; PRAGMA user_version = 7;")
        .unwrap();
    let err = Store::open(db.path()).err().expect("refused");
    assert!(
        err.to_string().contains("newer than this dermedge's"),
        "{err}"
    );
}

/// A connection URL's password appears in no error (nor in the location's `Debug`).
#[test]
fn a_postgres_password_never_appears_in_errors() {
    let url = "postgres://hub:s3cret-pw@127.0.0.1:1/dermedge?connect_timeout=5";
    let location = crate::store::Location::parse(std::ffi::OsStr::new(url));
    let err = Store::connect(&location)
        .err()
        .expect("nothing listens on port 1");
    let text = format!("{err} {err:?} {location:?}");
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert!(
        text.contains("postgres://hub:***@127.0.0.1:1/dermedge"),
        "{text}"
    );
    assert!(text.contains("cannot connect to PostgreSQL"), "{text}");
    let err = HubServer::start(&location, HubKey::generate(), "127.0.0.1:0", 1)
        .err()
        .expect("no database");
    assert!(!err.to_string().contains("s3cret-pw"), "{err}");
}

/// Two hubs (two servers, two connection pools) on one database, several devices sending at
/// once: each batch goes to both hubs together under two counters (a retry after a lost ack
/// meeting the original), and every third batch once more afterwards. Every record is stored
/// exactly once, in order, and the acks account for each.
fn two_hubs_on_one_database_store_every_record_exactly_once(backend: Backend) {
    const DEVICES: usize = 4;
    const RECORDS: u64 = 36;
    const PER_BATCH: u64 = 5;
    let db = TestDb::new(backend);
    let hub_key = HubKey::generate();
    let keys: Vec<DeviceKey> = (0..DEVICES).map(|_| DeviceKey::generate()).collect();
    let store = db.open();
    for (d, key) in keys.iter().enumerate() {
        store.enroll(&format!("dev-{d}"), &key.public()).unwrap();
    }
    let hubs: Vec<HubServer> = (0..2)
        .map(|_| HubServer::start(&db.location, hub_key.clone(), "127.0.0.1:0", 2).unwrap())
        .collect();
    let urls: Vec<String> = hubs
        .iter()
        .map(|h| format!("http://{}", h.addr()))
        .collect();
    let sent: Vec<Vec<Record>> = (0..DEVICES)
        .map(|d| {
            (1..=RECORDS)
                .map(|i| record(&format!("dev-{d}"), i))
                .collect()
        })
        .collect();
    let totals: Vec<DeviceTotals> = std::thread::scope(|scope| {
        let senders: Vec<_> = keys
            .iter()
            .zip(&sent)
            .enumerate()
            .map(|(d, (key, records))| {
                let (urls, hub_public) = (&urls, hub_key.public());
                scope.spawn(move || {
                    send_through_two_hubs(
                        urls,
                        &hub_public,
                        &format!("dev-{d}"),
                        key,
                        records,
                        PER_BATCH,
                    )
                })
            })
            .collect();
        senders.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for hub in hubs {
        hub.shutdown();
    }

    let store = db.open();
    assert_eq!(store.record_count().unwrap(), DEVICES as u64 * RECORDS);
    for (d, (records, totals)) in sent.iter().zip(&totals).enumerate() {
        let device = format!("dev-{d}");
        assert_eq!(totals.stored, RECORDS, "{device}: acks of stored records");
        assert_eq!(
            totals.stored + totals.duplicates,
            totals.in_accepted,
            "{device}: each record of an accepted request stored or a duplicate: {totals:?}"
        );
        assert!(totals.duplicates > 0, "{device}: {totals:?}");
        let rows = stored(&db, &device);
        let expected: Vec<(i64, i64, String)> = records
            .iter()
            .enumerate()
            .map(|(i, r)| (1, i as i64 + 1, r.id.clone()))
            .collect();
        assert_eq!(rows, expected, "{device}: every record once, in order");
        let known = store.device(&device).unwrap().unwrap();
        assert_eq!(
            (known.highest_seq, known.last_counter),
            (RECORDS, totals.last_counter)
        );
    }
    assert!(store.gaps(None).unwrap().is_empty());
}

/// What one device's acks said.
#[derive(Debug, Default)]
struct DeviceTotals {
    stored: u64,
    duplicates: u64,
    /// Records in the requests answered 200.
    in_accepted: u64,
    last_counter: u64,
}

/// POST `body` to `url`: (status, reply).
fn post_batch(url: &str, device: &str, counter: u64, body: &[u8]) -> (u16, Vec<u8>) {
    let response = ureq::post(&format!("{url}{}", wire::BATCH_PATH))
        .set(wire::DEVICE_HEADER, device)
        .set(wire::COUNTER_HEADER, &counter.to_string())
        .send_bytes(body);
    let (status, r) = match response {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("{device} request {counter}: {e}"),
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes).unwrap();
    (status, bytes)
}

/// Send `records` in batches, each to both hubs at once under two counters; the acks' totals.
fn send_through_two_hubs(
    urls: &[String],
    hub_public: &HubPublic,
    device: &str,
    key: &DeviceKey,
    records: &[Record],
    per_batch: u64,
) -> DeviceTotals {
    let envelopes: Vec<Vec<u8>> = records
        .iter()
        .map(|r| Envelope::seal(r, hub_public).to_cbor())
        .collect();
    let mut totals = DeviceTotals::default();
    let (mut acked, mut batch_number) = (0u64, 0usize);
    while acked < records.len() as u64 {
        let last = (acked + per_batch).min(records.len() as u64);
        let batch = wire::Batch {
            queued_after: None,
            after_seq: acked,
            records: (acked + 1..=last)
                .map(|seq| wire::BatchRecord {
                    seq,
                    cbor: envelopes[seq as usize - 1].clone(),
                })
                .collect(),
            gaps: Vec::new(),
        };
        let counters = [totals.last_counter + 1, totals.last_counter + 2];
        totals.last_counter += 2;
        // Which hub gets which counter alternates from batch to batch.
        let order = [batch_number % 2, 1 - batch_number % 2];
        let requests: Vec<(String, u64, Vec<u8>)> = order
            .iter()
            .zip(counters)
            .map(|(&hub, counter)| {
                let body = wire::seal_batch(key, device, counter, &batch);
                (urls[hub].clone(), counter, body)
            })
            .collect();
        let replies: Vec<(u16, Vec<u8>)> = std::thread::scope(|scope| {
            let sending: Vec<_> = requests
                .iter()
                .map(|(url, counter, body)| {
                    scope.spawn(move || post_batch(url, device, *counter, body))
                })
                .collect();
            sending.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut accepted = 0;
        for ((_, counter, body), (status, reply)) in requests.iter().zip(&replies) {
            match status {
                200 => {
                    let ack = wire::open_ack(hub_public, device, *counter, body, reply).unwrap();
                    assert_eq!(ack.acked_through, last, "{device} request {counter}");
                    totals.stored += u64::from(ack.stored);
                    totals.duplicates += u64::from(ack.duplicates);
                    totals.in_accepted += batch.records.len() as u64;
                    accepted += 1;
                }
                // The higher counter was stored first: the lower one is a replay.
                409 => {
                    let conflict =
                        wire::open_conflict(hub_public, device, *counter, body, reply).unwrap();
                    assert_eq!(
                        conflict.hub_last_counter,
                        Some(counters[1]),
                        "{device} request {counter}: {conflict:?}"
                    );
                }
                other => panic!(
                    "{device} request {counter}: {other} {}",
                    String::from_utf8_lossy(reply)
                ),
            }
        }
        assert!(
            accepted >= 1,
            "{device}: neither hub took batch {batch_number}"
        );
        if batch_number % 3 == 0 {
            // Once more later, to the other hub: a retry after a lost ack, all duplicates.
            totals.last_counter += 1;
            let counter = totals.last_counter;
            let body = wire::seal_batch(key, device, counter, &batch);
            let (status, reply) = post_batch(&urls[order[1]], device, counter, &body);
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
            let ack = wire::open_ack(hub_public, device, counter, &body, &reply).unwrap();
            assert_eq!((ack.stored, ack.acked_through), (0, last));
            totals.duplicates += u64::from(ack.duplicates);
            totals.in_accepted += batch.records.len() as u64;
        }
        acked = last;
        batch_number += 1;
    }
    totals
}

/// The PostgreSQL server's certificate (`scripts/postgres-cluster.sh`'s `pg_ca`).
const POSTGRES_CA_VAR: &str = "DERMEDGE_TEST_POSTGRES_CA";

#[test]
fn a_regional_hub_reaches_postgres_over_tls_with_the_server_checked() {
    let Some(_) = crate::test_db::postgres_url("a_regional_hub_reaches_postgres_over_tls") else {
        return;
    };
    let Some(ca) = std::env::var_os(POSTGRES_CA_VAR).filter(|v| !v.is_empty()) else {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "note: the hub's PostgreSQL TLS tests pass without running: {POSTGRES_CA_VAR} is not \
             set (scripts/postgres-cluster.sh makes the server's certificate)"
        );
        return;
    };
    let db = TestDb::new(Backend::Postgres);
    let crate::store::Location::Postgres(url) = &db.location else {
        unreachable!("a PostgreSQL test database")
    };
    let with = |extra: String| {
        let base = url.secret();
        let separator = if base.contains('?') { '&' } else { '?' };
        crate::store::Location::parse(std::ffi::OsStr::new(&format!("{base}{separator}{extra}")))
    };
    let ca = PathBuf::from(ca);
    let store = Store::connect(&with(format!("sslrootcert={}", ca.display()))).unwrap();
    let ssl = store
        .query(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap();
    assert!(ssl[0].bool(0).unwrap(), "the connection is not TLS");
    // A server whose certificate the file does not vouch for is refused.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let other_ca = db.dir.path().join("other.crt");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let err = Store::connect(&with(format!("sslrootcert={}", other_ca.display())))
        .err()
        .expect("a server with another certificate was accepted")
        .to_string();
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    let password = password_of(url.secret());
    assert!(
        password.is_empty() || !err.contains(&password),
        "the password leaked: {err}"
    );
    // A certificate with a mode that may fall back to plain TCP is refused before connecting.
    let err = Store::connect(&with(format!(
        "sslmode=prefer&sslrootcert={}",
        ca.display()
    )))
    .err()
    .expect("sslmode=prefer with a root certificate was accepted")
    .to_string();
    assert!(err.contains("needs sslmode=require"), "{err}");
    // A missing certificate file is named.
    let err = Store::connect(&with("sslrootcert=/nonexistent/ca.crt".into()))
        .err()
        .expect("a missing root certificate was accepted")
        .to_string();
    assert!(err.contains("/nonexistent/ca.crt"), "{err}");
}

/// The password in a `postgres://user:password@…` URL.
fn password_of(url: &str) -> String {
    let credentials = url.split("://").nth(1).unwrap().split('@').next().unwrap();
    credentials.split(':').nth(1).unwrap_or("").to_string()
}
