//! The server's bounds, tried over raw TCP the way a power cut, a lost Wi-Fi link or an attacker
//! would: stalled and slow uploads, oversized headers and bodies, unknown devices, floods.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dermedge_record::{DeviceKey, HubKey};
use dermedge_sync::wire;

use crate::server::{HubServer, Limits, UNAUTHENTICATED};
use crate::store::Store;

struct Hub {
    _dir: tempfile::TempDir,
    db: PathBuf,
    server: HubServer,
}

fn hub(limits: Limits) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.sqlite");
    Store::open(&db)
        .unwrap()
        .enroll("dev-1", &DeviceKey::generate().public())
        .unwrap();
    let server = HubServer::start_with(&db, HubKey::generate(), "127.0.0.1:0", 2, limits).unwrap();
    Hub {
        _dir: dir,
        db,
        server,
    }
}

/// Short timeouts, so that the tests watch them expire.
fn quick() -> Limits {
    Limits {
        header_timeout: Duration::from_secs(1),
        body_idle_timeout: Duration::from_secs(1),
        body_grace: Duration::from_secs(2),
        ..Limits::default()
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Everything the hub sends until it closes the connection or `timeout` passes.
fn read_all(s: &mut TcpStream, timeout: Duration) -> String {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

/// One request on a fresh connection; the status and how long it took.
fn exchange(addr: SocketAddr, request: &[u8]) -> (Option<u16>, Duration) {
    let started = Instant::now();
    let mut s = connect(addr);
    let _ = s.write_all(request);
    let _ = s.shutdown(Shutdown::Write);
    let response = read_all(&mut s, Duration::from_secs(10));
    (status(&response), started.elapsed())
}

const HEALTH: &[u8] = b"GET /v1/health HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n";

fn batch_head(device: &str, length: u64) -> Vec<u8> {
    format!(
        "POST {} HTTP/1.1\r\nHost: hub\r\n{}: {device}\r\n{}: 1\r\nContent-Length: {length}\r\n\r\n",
        wire::BATCH_PATH,
        wire::DEVICE_HEADER,
        wire::COUNTER_HEADER
    )
    .into_bytes()
}

fn rejection_count(db: &std::path::Path) -> i64 {
    Store::open(db)
        .unwrap()
        .connection()
        .query_row("SELECT COUNT(*) FROM rejections", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn twelve_stalled_uploads_do_not_stop_health_and_are_closed() {
    let hub = hub(quick());
    let addr = hub.server.addr();
    // Six stop inside their headers, six inside their bodies: a handheld losing power mid-upload.
    let mut stalled: Vec<TcpStream> = (0..12)
        .map(|i| {
            let mut s = connect(addr);
            let head = batch_head("dev-1", 100_000);
            let sent = if i % 2 == 0 {
                head[..head.len() / 2].to_vec()
            } else {
                [head, vec![0u8; 500]].concat()
            };
            s.write_all(&sent).unwrap();
            s
        })
        .collect();
    for _ in 0..5 {
        let (code, took) = exchange(addr, HEALTH);
        assert_eq!(code, Some(200));
        assert!(took < Duration::from_secs(1), "health took {took:?}");
    }
    // Each stalled connection is answered (408 for a body) or closed once its timeout passes.
    for (i, s) in stalled.iter_mut().enumerate() {
        let started = Instant::now();
        let response = read_all(s, Duration::from_secs(8));
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "stalled connection {i} still open: {response:?}"
        );
        if i % 2 == 1 {
            assert_eq!(status(&response), Some(408), "{response}");
        }
    }
}

#[test]
fn bodies_in_flight_are_bounded_all_together() {
    let hub = hub(Limits {
        max_body_bytes: 600_000,
        max_body_bytes_in_flight: 1_000_000,
        body_idle_timeout: Duration::from_secs(3),
        ..quick()
    });
    let addr = hub.server.addr();
    // A body that stalls after 560 kB holds what it received; one that only declared its
    // length holds next to nothing.
    let mut stalled = connect(addr);
    stalled
        .write_all(&[batch_head("dev-1", 600_000), vec![0u8; 560_000]].concat())
        .unwrap();
    let mut declared_only = connect(addr);
    declared_only
        .write_all(&[batch_head("dev-1", 600_000), vec![0u8; 10]].concat())
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A third that would not fit beside the first is told to come back, at once.
    let third = [batch_head("dev-1", 600_000), vec![0u8; 600_000]].concat();
    let (code, took) = exchange(addr, &third);
    assert_eq!(code, Some(503));
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(exchange(addr, HEALTH).0, Some(200));
    // Once the stalled ones are cut off, their share is free again.
    for s in [&mut stalled, &mut declared_only] {
        let response = read_all(s, Duration::from_secs(8));
        assert_eq!(status(&response), Some(408), "{response}");
    }
    let (code, _) = exchange(addr, &third);
    assert_eq!(
        code,
        Some(401),
        "the body was read and its signature checked"
    );
}

#[test]
fn a_slow_drip_body_is_cut_off_at_the_minimum_rate() {
    let hub = hub(Limits {
        min_body_bytes_per_s: 1000,
        body_grace: Duration::from_millis(500),
        body_idle_timeout: Duration::from_secs(5),
        ..Limits::default()
    });
    let mut s = connect(hub.server.addr());
    s.write_all(&batch_head("dev-1", 2000)).unwrap();
    // A byte every 100 ms never pauses long, but 2000 bytes would take 200 s (limit: 2.5 s).
    let started = Instant::now();
    let mut response = String::new();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while started.elapsed() < Duration::from_secs(10) {
        if s.write_all(b"x").is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
        if !response.is_empty() {
            break;
        }
    }
    assert_eq!(status(&response), Some(408), "{response:?}");
    // Cut once the grace time is over and the average falls behind, not when 2000 bytes at the
    // minimum rate would be due (2.5 s).
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[test]
fn an_unknown_device_is_refused_before_its_body_is_sent() {
    let hub = hub(quick());
    let mut s = connect(hub.server.addr());
    // Headers only; the 1 MiB body never comes.
    s.write_all(&batch_head("dev-unknown", 1 << 20)).unwrap();
    let started = Instant::now();
    let response = read_all(&mut s, Duration::from_secs(5));
    assert_eq!(status(&response), Some(401), "{response}");
    assert!(response.contains(UNAUTHENTICATED));
    assert!(started.elapsed() < Duration::from_millis(900));
}

#[test]
fn oversized_requests_are_refused_and_the_hub_stays_up() {
    let hub = hub(quick());
    let addr = hub.server.addr();
    for length in [u64::MAX, 18_000_000_000_000_000, (64 << 20) + 1] {
        // hyper itself refuses lengths it cannot represent; the hub refuses those over its limit.
        let (code, _) = exchange(addr, &batch_head("dev-1", length));
        assert!(
            matches!(code, Some(413) | Some(400) | Some(431)),
            "Content-Length {length}: {code:?}"
        );
        if length < u64::from(u32::MAX) {
            assert_eq!(code, Some(413));
        }
    }
    // A header line over the limit.
    let mut long = b"GET /v1/health HTTP/1.1\r\nX-Pad: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 64 << 10));
    long.extend_from_slice(b"\r\n\r\n");
    let (code, _) = exchange(addr, &long);
    assert!(matches!(code, Some(431) | Some(400) | None), "{code:?}");
    // A device id over the limit is refused, and logged cut short.
    let long_id = "d".repeat(10_000);
    let (code, _) = exchange(addr, &batch_head(&long_id, 0));
    assert_eq!(code, Some(400));
    // HTTP/2.0 and 3.0 request lines get an answer or a close, not a hung thread.
    for version in ["HTTP/2.0", "HTTP/3.0"] {
        let request = format!("GET /v1/health {version}\r\nHost: hub\r\n\r\n");
        let (code, took) = exchange(addr, request.as_bytes());
        assert!(matches!(code, Some(505) | Some(400) | None), "{code:?}");
        assert!(took < Duration::from_secs(2), "{version}: {took:?}");
    }
    assert_eq!(exchange(addr, HEALTH).0, Some(200));
    let store = Store::open(&hub.db).unwrap();
    let longest: i64 = store
        .connection()
        .query_row("SELECT MAX(LENGTH(device_id)) FROM rejections", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(longest <= 100, "device id logged with {longest} characters");
}

#[test]
fn a_flood_of_refused_requests_writes_a_bounded_number_of_rows() {
    let hub = hub(Limits {
        rejections_per_s: 2.0,
        rejections_burst: 10.0,
        ..quick()
    });
    let addr = hub.server.addr();
    let started = Instant::now();
    for i in 0..200 {
        let (code, _) = exchange(addr, &batch_head(&format!("dev-{i}-{}", "x".repeat(80)), 0));
        assert_eq!(code, Some(401));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rows = rejection_count(&hub.db);
    let allowed = 10.0 + 2.0 * elapsed + 1.0;
    assert!(
        rows >= 10 && rows as f64 <= allowed,
        "{rows} rows in {elapsed:.1} s"
    );
}

#[test]
fn connections_over_the_cap_are_closed_and_idle_ones_time_out() {
    let hub = hub(Limits {
        max_connections: 4,
        ..quick()
    });
    let addr = hub.server.addr();
    let idle: Vec<TcpStream> = (0..4).map(|_| connect(addr)).collect();
    // Give the hub a moment to accept all four.
    std::thread::sleep(Duration::from_millis(200));
    let (code, _) = exchange(addr, HEALTH);
    assert_eq!(code, None, "a fifth connection was served");
    // The idle ones are closed after the header timeout, and the hub serves again.
    for mut s in idle {
        let started = Instant::now();
        read_all(&mut s, Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(exchange(addr, HEALTH).0, Some(200));
}

/// `exchange` from another loopback address (127.0.0.2), as a second client machine would.
fn exchange_from(source: &str, addr: SocketAddr, request: &[u8]) -> Option<u16> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&source.parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let _ = s.shutdown(Shutdown::Write);
    status(&read_all(&mut s, Duration::from_secs(10)))
}

#[test]
fn one_address_cannot_take_every_connection() {
    let hub = hub(Limits {
        max_connections_per_address: 3,
        ..quick()
    });
    let addr = hub.server.addr();
    let idle: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        exchange(addr, HEALTH).0,
        None,
        "a fourth from 127.0.0.1 was served"
    );
    assert_eq!(
        exchange_from("127.0.0.2:0", addr, HEALTH),
        Some(200),
        "another address is served meanwhile"
    );
    // Once the idle ones time out, the address is served again.
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(exchange(addr, HEALTH).0, Some(200));
}

#[test]
fn a_keep_alive_connection_serves_several_requests() {
    let hub = hub(quick());
    let mut s = connect(hub.server.addr());
    let request = b"GET /v1/health HTTP/1.1\r\nHost: hub\r\n\r\n";
    s.write_all(request).unwrap();
    s.write_all(request).unwrap();
    s.write_all(HEALTH).unwrap();
    let response = read_all(&mut s, Duration::from_secs(5));
    assert_eq!(response.matches("HTTP/1.1 200").count(), 3, "{response}");
}
