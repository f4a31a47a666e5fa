//! The TLS listener end to end: a device that pins the hub's self-signed certificate syncs over
//! HTTPS; one that trusts only the public web's roots, or speaks plain HTTP, gets nowhere; the
//! web page's cookies are `Secure`.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use dermedge_queue::{Queue, QueueOptions};
use dermedge_record::{
    new_record_id, DeviceKey, EmbeddingType, Envelope, HubKey, Record, StoredEmbedding,
    RECORD_FORMAT,
};
use dermedge_sync::{SyncClient, SyncConfig, SyncError};

use crate::server::{HubServer, Limits};
use crate::store::Store;
use crate::tls::TlsFiles;

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM into `dir`.
fn certificate(dir: &Path) -> TlsFiles {
    certificate_for(dir, &["127.0.0.1", "localhost"])
}

/// A self-signed certificate for `names`, written as PEM into `dir`.
fn certificate_for(dir: &Path, names: &[&str]) -> TlsFiles {
    let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let generated = rcgen::generate_simple_self_signed(names).unwrap();
    let files = TlsFiles {
        certificate: dir.join("hub.crt"),
        key: dir.join("hub.key.pem"),
    };
    std::fs::write(&files.certificate, generated.cert.pem()).unwrap();
    std::fs::write(&files.key, generated.key_pair.serialize_pem()).unwrap();
    files
}

/// A TLS hub on a new SQLite database in `dir`, with `files` for its certificate.
fn tls_hub(dir: &Path, files: &TlsFiles, limits: Limits) -> HubServer {
    let db = dir.join("hub.sqlite");
    Store::open(&db).unwrap();
    HubServer::start_tls(&db, HubKey::generate(), "127.0.0.1:0", 1, limits, files).unwrap()
}

/// `GET /v1/health` over TLS to `hub` at 127.0.0.1, from a client that pins `trust`: the status.
fn pinned_health(
    hub: &HubServer,
    trust: &Path,
    timeout: std::time::Duration,
) -> Result<u16, Box<ureq::Error>> {
    let agent = ureq::AgentBuilder::new()
        .tls_config(dermedge_sync::pinned_tls(trust).unwrap())
        .timeout(timeout)
        .build();
    let url = format!("https://127.0.0.1:{}/v1/health", hub.addr().port());
    agent.get(&url).call().map(|r| r.status()).map_err(Box::new)
}

fn record(i: u64) -> Record {
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: 1_790_000_000_000 + i as i64,
        device_id: "dev-tls".into(),
        model_id: "df-mini".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&[i as f32, 0.5], EmbeddingType::F32),
        heads: Vec::new(),
        quality: None,
        source: None,
        thumbnail_jpeg: None,
    }
}

#[test]
fn a_device_pinning_the_hub_certificate_syncs_over_https_and_no_other_way() {
    let dir = tempfile::tempdir().unwrap();
    let files = certificate(dir.path());
    let db = dir.path().join("hub.sqlite");
    let (hub_key, device_key) = (HubKey::generate(), DeviceKey::generate());
    Store::open(&db)
        .unwrap()
        .enroll("dev-tls", &device_key.public())
        .unwrap();
    let hub = HubServer::start_tls(
        &db,
        hub_key.clone(),
        "127.0.0.1:0",
        1,
        Limits::default(),
        &files,
    )
    .unwrap();
    let queue_dir = dir.path().join("queue");
    let queue = Mutex::new(
        Queue::open(&queue_dir, &device_key, "dev-tls", QueueOptions::default()).unwrap(),
    );
    for i in 0..5 {
        let sealed = Envelope::seal(&record(i), &hub_key.public());
        queue.lock().unwrap().append(&sealed).unwrap();
    }
    let client = |url: String, trust: Option<&Path>| {
        let mut config = SyncConfig::new(&url);
        config.trust = trust.map(Path::to_path_buf);
        config.timeout = std::time::Duration::from_secs(5);
        SyncClient::new(config, &device_key, hub_key.public(), &queue_dir).unwrap()
    };
    let https = format!("https://{}", hub.addr());
    let never = AtomicBool::new(false);

    // The public web's roots do not vouch for a clinic's own certificate.
    let refused = client(https.clone(), None).drain(&queue, &never, Some(0));
    assert!(
        matches!(&refused, Err(SyncError::Transport { message, .. }) if message.to_lowercase().contains("certificate")),
        "{refused:?}"
    );
    // Plain HTTP to the TLS listener is not answered as HTTP.
    let plain = client(format!("http://{}", hub.addr()), None).drain(&queue, &never, Some(0));
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(queue.lock().unwrap().stats().pending_records, 5);

    let report = client(https.clone(), Some(&files.certificate))
        .drain(&queue, &never, Some(0))
        .unwrap();
    assert_eq!((report.records, report.acked_through), (5, 5));
    assert_eq!(Store::open(&db).unwrap().record_count().unwrap(), 5);

    // The web page's cookies are never sent back over plain HTTP.
    let pinned = dermedge_sync::pinned_tls(&files.certificate).unwrap();
    let agent = ureq::AgentBuilder::new()
        .tls_config(pinned)
        .redirects(0)
        .build();
    let login = agent.get(&format!("{https}/login")).call().unwrap();
    let cookies: Vec<&str> = login.all("set-cookie");
    assert!(!cookies.is_empty());
    assert!(
        cookies.iter().all(|c| c.ends_with("; Secure")),
        "{cookies:?}"
    );
    hub.shutdown();
}

#[test]
fn bad_certificate_or_key_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = certificate(dir.path());
    let db = dir.path().join("hub.sqlite");
    let start = |files: &TlsFiles| {
        HubServer::start_tls(
            &db,
            HubKey::generate(),
            "127.0.0.1:0",
            1,
            Limits::default(),
            files,
        )
        .err()
        .expect("refused")
        .to_string()
    };
    let text = dir.path().join("not-pem.txt");
    std::fs::write(&text, "hello").unwrap();
    let missing = dir.path().join("missing.pem");
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let foreign_key = certificate(&other).key;
    // (files, whether the error names the key file rather than the certificate, what it says)
    let cases = [
        (
            TlsFiles {
                certificate: text.clone(),
                key: good.key.clone(),
            },
            false,
            "no CERTIFICATE block",
        ),
        (
            TlsFiles {
                certificate: missing.clone(),
                key: good.key.clone(),
            },
            false,
            "cannot read",
        ),
        (
            TlsFiles {
                certificate: good.certificate.clone(),
                key: text.clone(),
            },
            true,
            "PEM private key",
        ),
        // A certificate's key must be its own.
        (
            TlsFiles {
                certificate: good.certificate.clone(),
                key: foreign_key,
            },
            true,
            "does not fit",
        ),
    ];
    for (files, key_named, says) in cases {
        let err = start(&files);
        let named = if key_named {
            &files.key
        } else {
            &files.certificate
        };
        assert!(
            err.contains(&named.display().to_string()) && err.contains(says),
            "{err}"
        );
    }
}

#[test]
fn clients_stalled_in_the_tls_handshake_hold_nothing_up_and_are_cut_off() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let files = certificate(dir.path());
    let header_timeout = Duration::from_secs(8);
    let limits = Limits {
        header_timeout,
        ..Limits::default()
    };
    let hub = tls_hub(dir.path(), &files, limits);
    // Twelve clients stall in the handshake: six say nothing, six send half a ClientHello.
    let stalled: Vec<std::net::TcpStream> = (0..12)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(hub.addr()).unwrap();
            if i % 2 == 1 {
                s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
                    .unwrap();
            }
            s
        })
        .collect();
    let started = Instant::now();
    // Answered well before the stalled handshakes time out: they hold up nobody.
    assert_eq!(
        pinned_health(&hub, &files.certificate, header_timeout / 2).unwrap(),
        200
    );
    // And each stalled client is cut off once the header timeout has passed.
    for mut s in stalled {
        s.set_read_timeout(Some(header_timeout * 2)).unwrap();
        let mut buf = [0u8; 256];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) => {
                    break !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        };
        assert!(
            closed,
            "a stalled handshake was still open after {:?}",
            started.elapsed()
        );
    }
    assert!(started.elapsed() < header_timeout * 2);
    hub.shutdown();
}

/// The README's recipe for a hub certificate (`openssl req …`), run as written but for the
/// address: a device that pins the result must accept it.
#[test]
fn the_readmes_certificate_recipe_makes_one_devices_accept() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let mut lines = readme
        .lines()
        .skip_while(|l| !l.starts_with("openssl req -x509"));
    let mut command = String::new();
    for line in lines.by_ref() {
        let line = line.split(" # ").next().unwrap().trim_end();
        command.push_str(line.trim_end_matches('\\'));
        command.push(' ');
        if !line.ends_with('\\') {
            break;
        }
    }
    assert!(
        command.contains("-out hub-tls.crt"),
        "no recipe in the README: {command}"
    );
    let command = command.replace("IP:192.168.1.10", "IP:127.0.0.1");
    let openssl = std::process::Command::new("openssl")
        .arg("version")
        .output();
    if !openssl.is_ok_and(|o| o.status.success()) {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "note: the README's certificate recipe test passes without running: no openssl \
             (scripts/setup.sh installs it)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let made = std::process::Command::new("sh")
        .args(["-c", &command])
        .current_dir(dir.path())
        .status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "the README's openssl command failed: {command}"
    );
    let files = TlsFiles {
        certificate: dir.path().join("hub-tls.crt"),
        key: dir.path().join("hub-tls.key"),
    };
    let hub = tls_hub(dir.path(), &files, Limits::default());
    let status = pinned_health(&hub, &files.certificate, std::time::Duration::from_secs(5));
    assert!(matches!(status, Ok(200)), "{status:?}");
    hub.shutdown();
}

/// A pinned certificate for another name is no certificate for this hub.
#[test]
fn a_pinned_certificate_for_another_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = certificate_for(dir.path(), &["hub.other-clinic"]);
    let hub = tls_hub(dir.path(), &files, Limits::default());
    let err = pinned_health(&hub, &files.certificate, std::time::Duration::from_secs(5))
        .expect_err("a certificate for another name was accepted");
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
    hub.shutdown();
}
