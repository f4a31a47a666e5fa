//! The hub, a real queue and the real sync client, in one process over loopback HTTP.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use dermedge_queue::{
    new_record_id, DeviceKey, Embedding, EmbeddingType, Queue, QueueOptions, Record, RECORD_FORMAT,
};
use dermedge_sync::{wire, SyncClient, SyncConfig, SyncError};

use crate::server::HubServer;
use crate::store::Store;

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
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    hub: HubServer,
    key: DeviceKey,
    queue_dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.sqlite");
    let key = DeviceKey::generate();
    Store::open(&db).unwrap().enroll("dev-1", &key).unwrap();
    let hub = HubServer::start(&db, "127.0.0.1:0", 2).unwrap();
    let queue_dir = dir.path().join("queue");
    Setup {
        _dir: dir,
        db,
        hub,
        key,
        queue_dir,
    }
}

fn url(s: &Setup) -> String {
    format!("http://{}", s.hub.addr())
}

#[test]
fn records_arrive_once_each_in_order_with_identical_bytes() {
    let s = setup();
    let queue = Queue::open(&s.queue_dir, &s.key, "dev-1", QueueOptions::default()).unwrap();
    let queue = Mutex::new(queue);
    let mut sent = Vec::new();
    for i in 0..150 {
        let r = record("dev-1", i);
        queue.lock().unwrap().append(&r).unwrap();
        sent.push(r);
    }
    let mut config = SyncConfig::new(&url(&s));
    config.batch_records = 40;
    let mut client = SyncClient::new(config, &s.key, &s.queue_dir).unwrap();
    let report = client
        .drain(&queue, &AtomicBool::new(false), Some(0))
        .unwrap();
    assert_eq!(
        (report.batches, report.records, report.acked_through),
        (4, 150, 150)
    );
    assert_eq!(queue.lock().unwrap().stats().pending_records, 0);

    let store = Store::open(&s.db).unwrap();
    let mut stmt = store
        .connection()
        .prepare("SELECT record_id, seq, embedding FROM records ORDER BY row")
        .unwrap();
    let rows: Vec<(String, i64, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 150);
    for (i, (r, (id, seq, embedding))) in sent.iter().zip(&rows).enumerate() {
        assert_eq!((id, *seq), (&r.id, i as i64 + 1));
        assert_eq!(embedding, &r.embedding.data);
    }
    s.hub.shutdown();
}

#[test]
fn tampered_replayed_and_unknown_requests_are_rejected_and_logged() {
    let s = setup();
    let batch = wire::Batch {
        after_seq: 0,
        records: vec![wire::BatchRecord {
            seq: 1,
            cbor: record("dev-1", 1).to_cbor(),
        }],
    };
    let post = |device: &str, counter: u64, body: &[u8]| match ureq::post(&format!(
        "{}{}",
        url(&s),
        wire::BATCH_PATH
    ))
    .set(wire::DEVICE_HEADER, device)
    .set(wire::COUNTER_HEADER, &counter.to_string())
    .send_bytes(body)
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    };
    let sync_key = s.key.sync_key();
    let body = wire::seal_batch(&sync_key, "dev-1", 5, &batch);
    let mut tampered = body.clone();
    tampered[40] ^= 1;
    assert_eq!(post("dev-1", 5, &tampered), 401, "tampered body");
    assert_eq!(
        post("dev-1", 6, &body),
        401,
        "header counter differs from the sealed one"
    );
    assert_eq!(post("dev-9", 5, &body), 401, "unknown device");
    let other = wire::seal_batch(&DeviceKey::generate().sync_key(), "dev-1", 5, &batch);
    assert_eq!(post("dev-1", 5, &other), 401, "another key");
    assert_eq!(post("dev-1", 5, &body), 200);
    assert_eq!(post("dev-1", 5, &body), 409, "replayed");
    let store = Store::open(&s.db).unwrap();
    assert_eq!(store.record_count().unwrap(), 1);
    let reasons: Vec<(i64, String)> = store
        .connection()
        .prepare("SELECT status, reason FROM rejections ORDER BY rowid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(reasons[0].1.contains("bad signature"));
    assert!(reasons[2].1.contains("unknown device"));
    assert!(reasons[4].1.contains("replayed"));
    s.hub.shutdown();
}

#[test]
fn a_device_with_the_wrong_key_gets_a_clear_error_and_keeps_its_records() {
    let s = setup();
    let wrong = DeviceKey::generate();
    let queue_dir = s.queue_dir.clone();
    let queue =
        Mutex::new(Queue::open(&queue_dir, &wrong, "dev-1", QueueOptions::default()).unwrap());
    queue.lock().unwrap().append(&record("dev-1", 1)).unwrap();
    let mut client = SyncClient::new(SyncConfig::new(&url(&s)), &wrong, &queue_dir).unwrap();
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
fn export_writes_csv_and_npy_in_sequence_order() {
    let s = setup();
    let queue =
        Mutex::new(Queue::open(&s.queue_dir, &s.key, "dev-1", QueueOptions::default()).unwrap());
    for i in 0..5 {
        queue.lock().unwrap().append(&record("dev-1", i)).unwrap();
    }
    let mut client = SyncClient::new(SyncConfig::new(&url(&s)), &s.key, &s.queue_dir).unwrap();
    client
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
            dim: Some(3)
        }
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 6);
    assert!(text.lines().nth(3).unwrap().contains(",3,"));
    let bytes = std::fs::read(&npy).unwrap();
    let data = &bytes[bytes.len() - 5 * 3 * 4..];
    assert_eq!(f32::from_le_bytes(data[12..16].try_into().unwrap()), 1.0);
    s.hub.shutdown();
}
