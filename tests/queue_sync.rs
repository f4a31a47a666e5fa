//! The queue, sync and hub together: exactly-once delivery through a faulty network to a real
//! hub process, and images → hub end to end.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod binary;

use binary::{dermedge, train_image_kind_head, HubProcess};
use dermedge_e2e::{fixtures, read_npy_rows, text};
use dermedge_queue::{Queue, QueueOptions};
use dermedge_record::{
    new_record_id, DeviceKey, EmbeddingType, Envelope, HubKey, Record, StoredEmbedding,
    RECORD_FORMAT,
};
use dermedge_sync::{Backoff, SyncClient, SyncConfig};

#[derive(Debug, Clone, Copy)]
enum Fault {
    Pass,
    /// Answer 503 without forwarding.
    Unavailable,
    /// Close the device's connection before forwarding.
    ResetBefore,
    /// Forward (the hub stores the batch), then close before the ack reaches the device.
    ResetAfter,
    /// Forward only after the device's timeout.
    Slow,
    /// Forward half the body, SIGKILL the hub, start it again.
    KillHubMidBatch,
}

/// Read one HTTP/1.1 message (headers and a Content-Length body) from `stream`.
fn read_message(stream: &mut impl Read) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let length = String::from_utf8_lossy(&head)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).ok()?;
    Some((head, body))
}

struct Proxy {
    addr: SocketAddr,
}

impl Proxy {
    fn start(
        db: PathBuf,
        hub: Arc<Mutex<HubProcess>>,
        faults: Vec<Fault>,
        timeout: Duration,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Mutex::new(VecDeque::from(faults)));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let fault = faults.lock().unwrap().pop_front().unwrap_or(Fault::Pass);
                let Some((head, body)) = read_message(&mut client) else {
                    continue;
                };
                let upstream = hub.lock().unwrap().addr;
                let forward = |client: &mut TcpStream| -> Option<()> {
                    let mut hub = TcpStream::connect(upstream).ok()?;
                    hub.write_all(&head).ok()?;
                    hub.write_all(&body).ok()?;
                    let (rhead, rbody) = read_message(&mut hub)?;
                    client.write_all(&rhead).ok()?;
                    client.write_all(&rbody).ok()?;
                    Some(())
                };
                match fault {
                    Fault::Pass => {
                        forward(&mut client);
                    }
                    Fault::Unavailable => {
                        let _ = client.write_all(
                            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n",
                        );
                    }
                    Fault::ResetBefore => {}
                    Fault::ResetAfter => {
                        let mut sink = Vec::new();
                        let mut hub = TcpStream::connect(upstream).unwrap();
                        hub.write_all(&head).unwrap();
                        hub.write_all(&body).unwrap();
                        let _ = read_message(&mut hub)
                            .map(|(h, b)| sink.extend(h.into_iter().chain(b)));
                    }
                    Fault::Slow => {
                        std::thread::sleep(timeout + Duration::from_millis(300));
                        forward(&mut client);
                    }
                    Fault::KillHubMidBatch => {
                        let mut stream = TcpStream::connect(upstream).unwrap();
                        stream.write_all(&head).unwrap();
                        stream.write_all(&body[..body.len() / 2]).unwrap();
                        let mut hub = hub.lock().unwrap();
                        hub.kill();
                        *hub = HubProcess::start(&db, &db.with_file_name("hub.key"));
                    }
                }
                let _ = client.shutdown(Shutdown::Both);
            }
        });
        Self { addr }
    }
}

fn synthetic_record(device: &str, i: u64) -> Record {
    let values: Vec<f32> = (0..512)
        .map(|j| ((i * 512 + j) as f32 * 0.37).sin())
        .collect();
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: 1_790_000_000_000 + i as i64,
        device_id: device.into(),
        model_id: "df-mini".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&values, EmbeddingType::F32),
        heads: Vec::new(),
        quality: None,
        source: Some(format!("img-{i}.png")),
        thumbnail_jpeg: None,
    }
}

/// The hub's records as (record_id, device, seq) rows in storage order, via `dermedge hub export`.
fn hub_rows(db: &Path, tmp: &Path) -> Vec<(String, String, u64)> {
    let csv = tmp.join("export.csv");
    let out = dermedge(&[
        "hub",
        "export",
        "--db",
        db.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].to_string(), f[2].parse().unwrap())
        })
        .collect()
}

#[test]
fn sync_delivers_exactly_once_through_resets_errors_timeouts_and_a_killed_hub() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.sqlite");
    let key = DeviceKey::generate();
    let hub_key = HubKey::generate();
    let hub_key_file = dir.path().join("hub.key");
    hub_key.save_new(&hub_key_file).unwrap();
    // Enrollment moves the device's public key only.
    let public = key.public().to_string();
    let out = dermedge(&[
        "hub",
        "enroll",
        "--db",
        db.to_str().unwrap(),
        "--device-id",
        "dev-7",
        "--device-public",
        &public,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let hub = Arc::new(Mutex::new(HubProcess::start(&db, &hub_key_file)));
    // The proxy's thread holds a clone of `hub` for ever, so its Drop would never run and the hub
    // process would outlive the test: kill it when this test ends, pass or fail.
    let _reap = ReapHub(hub.clone());
    let timeout = Duration::from_millis(800);
    use Fault::*;
    let faults = vec![
        Pass,
        Unavailable,
        Pass,
        ResetBefore,
        ResetAfter,
        Pass,
        Slow,
        Pass,
        KillHubMidBatch,
        ResetAfter,
        Unavailable,
        Unavailable,
        Pass,
        ResetAfter,
        KillHubMidBatch,
        Slow,
    ];
    let proxy = Proxy::start(db.clone(), hub.clone(), faults, timeout);

    let queue_dir = dir.path().join("queue");
    let queue = Queue::open(&queue_dir, &key, "dev-7", QueueOptions::default()).unwrap();
    let queue = Mutex::new(queue);
    let mut queued = Vec::new();
    for i in 0..240 {
        let r = synthetic_record("dev-7", i);
        queue
            .lock()
            .unwrap()
            .append(&Envelope::seal(&r, &hub_key.public()))
            .unwrap();
        queued.push(r);
    }
    let mut config = SyncConfig::new(&format!("http://{}", proxy.addr));
    config.batch_records = 16;
    config.timeout = timeout;
    config.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    let mut client = SyncClient::new(config, &key, hub_key.public(), &queue_dir).unwrap();
    let report = client
        .drain(&queue, &AtomicBool::new(false), Some(30))
        .unwrap();
    assert!(
        report.retries >= 10,
        "the faults should have forced retries: {report:?}"
    );
    assert_eq!(queue.lock().unwrap().stats().pending_records, 0);

    let rows = hub_rows(&db, dir.path());
    assert_eq!(rows.len(), 240, "every record exactly once");
    for (i, (row, record)) in rows.iter().zip(&queued).enumerate() {
        assert_eq!(
            row,
            &(record.id.clone(), "dev-7".to_string(), i as u64 + 1),
            "row {i}"
        );
    }
    // The database's storage order is the devices' sequence order.
    let npy = dir.path().join("e.npy");
    let out = dermedge(&[
        "hub",
        "export",
        "--db",
        db.to_str().unwrap(),
        "--npy",
        npy.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (row, record) in read_npy_rows(&npy).iter().zip(&queued) {
        let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            bytes, record.embedding.data,
            "embedding bytes changed on the way"
        );
    }
    eprintln!("sync under faults: {report:?}");
}

struct ReapHub(Arc<Mutex<HubProcess>>);

impl Drop for ReapHub {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).kill();
    }
}

#[test]
fn images_reach_the_hub_through_heads_queue_and_sync() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let s = |path: &PathBuf| path.to_str().unwrap().to_string();
    let model = fixtures().join("df-mini/df-mini.int8.toml");
    let images = fixtures().join("images");
    let run = |args: &[&str]| {
        let out = dermedge(args);
        assert!(
            out.status.success(),
            "dermedge {args:?}: {}",
            text(&out.stderr)
        );
        out
    };
    // A head trained on the model's embeddings of the fixtures: dermoscopy patch or photo.
    let kind_head = s(&train_image_kind_head(dir.path()));

    // Provisioning moves public keys only: the device's to the hub, the hub's to the device.
    run(&["keygen", "--out", &s(&p("device.key"))]);
    run(&[
        "hub",
        "init",
        "--key",
        &s(&p("hub.key")),
        "--public",
        &s(&p("hub.pub")),
    ]);
    run(&[
        "hub",
        "enroll",
        "--db",
        &s(&p("hub.sqlite")),
        "--device-id",
        "kiosk-1",
        "--device-public",
        &s(&p("device.key.pub")),
    ]);
    let queue = [
        "--queue",
        &s(&p("queue")),
        "--key-file",
        &s(&p("device.key")),
    ];
    let hub_public = s(&p("hub.pub"));
    let mut add = vec![
        "queue",
        "add",
        "--device-id",
        "kiosk-1",
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "2",
        "--head",
        &kind_head,
        "--hub-public",
        &hub_public,
    ];
    add.extend(queue);
    add.push(images.to_str().unwrap());
    run(&add);

    // At rest, nothing of the records is readable.
    for entry in std::fs::read_dir(p("queue")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            for needle in ["astronaut", "dermoscopy", "photo", "df-mini"] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{} shows {needle:?} in the clear",
                    path.display()
                );
            }
        }
    }
    let other_key = p("other.key");
    run(&["keygen", "--out", &s(&other_key)]);
    let out = dermedge(&[
        "queue",
        "status",
        "--queue",
        &s(&p("queue")),
        "--key-file",
        &s(&other_key),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("another device key"),
        "{}",
        text(&out.stderr)
    );

    // The device cannot read what it queued: `queue list` shows only what is not secret.
    let out = run(&["queue", "list", queue[0], queue[1], queue[2], queue[3]]);
    let listing = text(&out.stdout);
    assert_eq!(listing.lines().count(), 8, "{listing}");
    for needle in ["dermoscopy", "astronaut", "df-mini", "kind="] {
        assert!(
            !listing.contains(needle),
            "queue list shows {needle:?}: {listing}"
        );
    }

    let hub = HubProcess::start(&p("hub.sqlite"), &p("hub.key"));
    let mut sync = vec!["sync", "--hub"];
    let url = format!("http://{}", hub.addr);
    sync.push(&url);
    sync.extend(["--hub-public", &hub_public]);
    sync.extend(queue);
    let out = run(&sync);
    assert!(
        text(&out.stdout).contains("synced 8 records"),
        "{}",
        text(&out.stdout)
    );
    drop(hub);

    let rows = hub_rows(&p("hub.sqlite"), dir.path());
    assert_eq!(
        rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    let csv = std::fs::read_to_string(p("export.csv")).unwrap();
    for line in csv.lines().skip(1) {
        let expected = if line.contains("dermoscopy-") {
            "kind=dermoscopy"
        } else {
            "kind=photo"
        };
        assert!(line.contains(expected), "{line}");
    }
    // The embeddings in the hub are bit for bit the ones `dermedge embed` computes.
    run(&[
        "hub",
        "export",
        "--db",
        &s(&p("hub.sqlite")),
        "--npy",
        &s(&p("hub.npy")),
    ]);
    assert_eq!(
        read_npy_rows(&p("hub.npy")),
        read_npy_rows(&p("training.npy"))
    );
}

#[test]
fn bad_queue_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    assert!(dermedge(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let again = dermedge(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(!again.status.success() && text(&again.stderr).contains("never overwritten"));
    let qdir = dir.path().join("q");
    std::fs::create_dir(&qdir).unwrap();
    std::fs::write(qdir.join("notes.txt"), "mine").unwrap();
    let out = dermedge(&[
        "queue",
        "status",
        "--queue",
        qdir.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--device-id",
        "d",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("notes.txt"),
        "{}",
        text(&out.stderr)
    );
    // A head bound to another model is refused before anything is queued.
    let head = dir.path().join("h.json");
    std::fs::write(
        &head,
        r#"{"format":"dermedge-head/1","name":"h","model_id":"lesion-x448","embedding_dim":2,"kind":"softmax","classes":["a"],"l2_normalize":true,"input_mean":[],"input_scale":1.0,"weights":[[0.0,0.0]],"bias":[0.0]}"#,
    )
    .unwrap();
    let hub_public = dir.path().join("hub.pub");
    std::fs::write(&hub_public, HubKey::generate().public().to_string()).unwrap();
    let out = dermedge(&[
        "queue",
        "add",
        "--hub-public",
        hub_public.to_str().unwrap(),
        "--queue",
        dir.path().join("q2").to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--device-id",
        "d",
        "--model",
        fixtures()
            .join("df-mini/df-mini.int8.toml")
            .to_str()
            .unwrap(),
        "--head",
        head.to_str().unwrap(),
        fixtures().join("images").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("lesion-x448") && err.contains("df-mini"),
        "{err}"
    );
    let bad_key = dir.path().join("bad.key");
    std::fs::write(&bad_key, "123").unwrap();
    let out = dermedge(&[
        "queue",
        "status",
        "--queue",
        qdir.to_str().unwrap(),
        "--key-file",
        bad_key.to_str().unwrap(),
    ]);
    assert!(
        text(&out.stderr).contains("bad.key"),
        "{}",
        text(&out.stderr)
    );
}
