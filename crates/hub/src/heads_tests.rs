//! The head loop end to end in one process: records synced by the real client, labelled,
//! trained into a head, published, and fetched by the client, which checks each head's
//! signature, model and version. On SQLite and PostgreSQL ([`on_both_backends!`]).

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use dermedge_queue::{Queue, QueueOptions};
use dermedge_record::{
    new_record_id, DeviceKey, EmbeddingType, Envelope, HubKey, Record, StoredEmbedding,
    RECORD_FORMAT,
};
use dermedge_sync::wire::{self, HeadQuery, HeldHead};
use dermedge_sync::{SyncClient, SyncConfig, SyncError};

use crate::heads::{self, TrainRequest};
use crate::server::HubServer;
use crate::test_db::{on_both_backends, Backend, TestDb};
use crate::HubError;

on_both_backends!(
    labelled_records_become_a_signed_head_devices_fetch_once,
    a_label_set_without_two_classes_trains_nothing,
);

const DIM: usize = 8;
const CLASSES: [&str; 3] = ["melanoma", "naevus", "seborrhoeic keratosis"];

/// A record whose embedding points along its class's axis, with a little spread.
fn record(i: usize, class: usize) -> Record {
    let mut v = vec![0.2f32; DIM];
    v[class] += 1.0;
    v[3 + i % 5] += 0.05 * (i as f32).sin();
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: 1_790_000_000_000 + i as i64,
        device_id: "dev-1".into(),
        model_id: "df-mini".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&v, EmbeddingType::F16),
        heads: Vec::new(),
        quality: None,
        source: None,
        thumbnail_jpeg: None,
    }
}

struct Loop {
    hub: HubServer,
    hub_key: HubKey,
    key: DeviceKey,
    db: TestDb,
}

impl Loop {
    fn new(backend: Backend) -> Self {
        let db = TestDb::new(backend);
        let key = DeviceKey::generate();
        db.open().enroll("dev-1", &key.public()).unwrap();
        let hub_key = HubKey::generate();
        let hub = HubServer::start(&db.location, hub_key.clone(), "127.0.0.1:0", 2).unwrap();
        Loop {
            hub,
            hub_key,
            key,
            db,
        }
    }

    fn client(&self, pinned: &HubKey) -> SyncClient {
        let url = format!("http://{}", self.hub.addr());
        let dir = self.db.dir.path().join("queue");
        SyncClient::new(SyncConfig::new(&url), &self.key, pinned.public(), &dir).unwrap()
    }

    /// Sync `records` from the device; each labelled (whole record) with its class.
    fn sync_and_label(&self, records: &[(Record, &str)]) {
        let dir = self.db.dir.path().join("queue");
        let queue =
            Mutex::new(Queue::open(&dir, &self.key, "dev-1", QueueOptions::default()).unwrap());
        for (r, _) in records {
            queue
                .lock()
                .unwrap()
                .append(&Envelope::seal(r, &self.hub_key.public()))
                .unwrap();
        }
        self.client(&self.hub_key)
            .drain(&queue, &AtomicBool::new(false), Some(0))
            .unwrap();
        let store = self.db.open();
        for (r, label) in records {
            store.add_label(&r.id, None, label, "dr.ada", 1).unwrap();
        }
    }
}

fn query(model: &str, have: &[(&str, u64)]) -> HeadQuery {
    HeadQuery {
        model_id: model.into(),
        embedding_dim: DIM as u64,
        have: have
            .iter()
            .map(|(n, v)| HeldHead {
                name: n.to_string(),
                version: *v,
            })
            .collect(),
    }
}

fn request(name: &str) -> TrainRequest {
    TrainRequest {
        name: name.into(),
        model_id: "df-mini".into(),
        label_set: None,
    }
}

fn labelled_records_become_a_signed_head_devices_fetch_once(backend: Backend) {
    let l = Loop::new(backend);
    let mut records: Vec<(Record, &str)> = (0..24)
        .map(|i| (record(i, i % 3), CLASSES[i % 3]))
        .collect();
    // One label nobody else used: too few records to train or score a class on.
    records.push((record(99, 0), "odd one"));
    l.sync_and_label(&records);
    // A newer label replaces the older: the record counts once, under its current label.
    l.db.open()
        .add_label(&records[0].0.id, None, CLASSES[0], "dr.ada", 2)
        .unwrap();

    let store = l.db.open();
    let (id, evaluation) =
        heads::train_from_labels(&store, &l.hub_key, &request("diagnosis"), "dr.ada", 10).unwrap();
    assert_eq!(evaluation.classes, CLASSES);
    assert_eq!(evaluation.left_out, [("odd one".to_string(), 1)]);
    assert_eq!(evaluation.heldout_counts, [2, 2, 2]);
    assert_eq!(evaluation.train_counts, [6, 6, 6]);
    assert_eq!(evaluation.heldout.count, 6);
    assert_eq!(evaluation.heldout.accuracy, 1.0, "separable classes");
    let confusion = evaluation.heldout.confusion.clone().unwrap();
    assert_eq!((0..3).map(|c| confusion[c][c]).sum::<usize>(), 6);
    assert!(evaluation
        .heldout
        .classes
        .iter()
        .all(|c| c.roc_auc == Some(1.0)));

    // A draft is never sent.
    let mut client = l.client(&l.hub_key);
    assert!(client
        .fetch_heads("dev-1", &query("df-mini", &[]))
        .unwrap()
        .is_empty());

    assert_eq!(
        heads::publish(&store, &l.hub_key, id, "dr.ada", 20).unwrap(),
        1
    );
    let err = heads::publish(&store, &l.hub_key, id, "dr.ada", 21).unwrap_err();
    assert!(
        matches!(err, HubError::BadRequest(ref m) if m.contains("published already")),
        "{err}"
    );
    let fetched = client.fetch_heads("dev-1", &query("df-mini", &[])).unwrap();
    assert_eq!(fetched.len(), 1);
    let head = &fetched[0].head;
    assert_eq!(
        (head.name.as_str(), head.version, head.model_id.as_str()),
        ("diagnosis", Some(1), "df-mini")
    );
    assert_eq!(head.classes, CLASSES);
    assert_eq!(
        wire::open_head(&l.hub_key.public(), &fetched[0].signed).unwrap(),
        *head
    );
    // What the device holds is not sent again; a head of another name would be.
    assert!(client
        .fetch_heads("dev-1", &query("df-mini", &[("diagnosis", 1)]))
        .unwrap()
        .is_empty());
    assert_eq!(
        client
            .fetch_heads("dev-1", &query("df-mini", &[("site", 3)]))
            .unwrap()
            .len(),
        1
    );
    // Another model, or another dimension, gets nothing.
    assert!(client
        .fetch_heads("dev-1", &query("lesion-x448", &[]))
        .unwrap()
        .is_empty());
    let mut wide = query("df-mini", &[]);
    wide.embedding_dim = 2048;
    assert!(client.fetch_heads("dev-1", &wide).unwrap().is_empty());

    // A retrain, published, is version 2; only the newest version is offered.
    let (again, _) =
        heads::train_from_labels(&store, &l.hub_key, &request("diagnosis"), "dr.ada", 30).unwrap();
    assert_eq!(
        heads::publish(&store, &l.hub_key, again, "dr.ada", 40).unwrap(),
        2
    );
    let fetched = client
        .fetch_heads("dev-1", &query("df-mini", &[("diagnosis", 1)]))
        .unwrap();
    assert_eq!(
        fetched.iter().map(|f| f.head.version).collect::<Vec<_>>(),
        [Some(2)]
    );
    // A device told of a newer version than the hub has is offered nothing older.
    assert!(client
        .fetch_heads("dev-1", &query("df-mini", &[("diagnosis", 7)]))
        .unwrap()
        .is_empty());

    // A device that pinned another hub key refuses what this hub signed, and keeps what it has.
    let stranger = HubKey::generate();
    assert!(l
        .client(&stranger)
        .fetch_heads("dev-1", &query("df-mini", &[]))
        .unwrap()
        .is_empty());
    // An unknown device is refused before anything is read.
    let err = client
        .fetch_heads("dev-9", &query("df-mini", &[]))
        .unwrap_err();
    assert!(
        matches!(err, SyncError::Refused { status: 401, .. }),
        "{err}"
    );
    let listed = store.heads().unwrap();
    assert_eq!(
        listed.iter().map(|h| h.version).collect::<Vec<_>>(),
        [Some(2), Some(1)]
    );

    // A draft whose stored weights were changed behind the hub (a database writer) is not
    // signed for devices.
    let (third, _) =
        heads::train_from_labels(&store, &l.hub_key, &request("diagnosis"), "dr.ada", 50).unwrap();
    store
        .execute(
            "UPDATE heads SET head_json = REPLACE(head_json, '\"classes\":[\"', '\"classes\":[\"not ') WHERE id = ?1",
            &[third.into()],
        )
        .unwrap();
    let err = heads::publish(&store, &l.hub_key, third, "dr.ada", 60).unwrap_err();
    assert!(
        err.to_string().contains("not the head this hub trained"),
        "{err}"
    );
    assert!(store.head(third).unwrap().unwrap().version.is_none());
    l.hub.shutdown();
}

fn a_label_set_without_two_classes_trains_nothing(backend: Backend) {
    let l = Loop::new(backend);
    // A second "naevus" whose embedding holds a NaN is left out of training, so that class
    // still has one record.
    let mut broken = record(10, 1);
    broken.embedding = StoredEmbedding::new(&[f32::NAN; DIM], EmbeddingType::F16);
    let records: Vec<(Record, &str)> = (0..4)
        .map(|i| (record(i, 0), "melanoma"))
        .chain([(record(9, 1), "naevus"), (broken, "naevus")])
        .collect();
    l.sync_and_label(&records);
    let store = l.db.open();
    assert_eq!(
        store.records(None, None).unwrap().len(),
        6,
        "the NaN record is stored"
    );
    let err = heads::train_from_labels(&store, &l.hub_key, &request("diagnosis"), "dr.ada", 1)
        .unwrap_err();
    let HubError::BadRequest(message) = err else {
        panic!("{err}")
    };
    assert!(
        message.contains("1 classes") && message.contains("\"naevus\" with 1"),
        "{message}"
    );
    let err = heads::train_from_labels(&store, &l.hub_key, &request("../diagnosis"), "dr.ada", 1)
        .unwrap_err();
    assert!(err.to_string().contains("head name"), "{err}");
    let mut by_head = request("diagnosis");
    by_head.label_set = Some("kind".into());
    let err = heads::train_from_labels(&store, &l.hub_key, &by_head, "dr.ada", 1).unwrap_err();
    assert!(
        err.to_string().contains("labels of head \"kind\"")
            && err.to_string().contains("0 classes"),
        "no labels of that head: {err}"
    );
    assert!(store.heads().unwrap().is_empty());
    l.hub.shutdown();
}
