//! `dermedge bench hub`: the hub (real server, real SQLite and optionally a real PostgreSQL, on
//! loopback) while many devices sync
//! at once and broken clients hold connections: stalled in their headers or bodies (a handheld
//! that lost power mid-upload), vanishing mid-body, dripping a byte at a time. Measures ingest
//! rate, per-batch latency, health-check latency throughout, and peak RSS; checks that every
//! record arrived exactly once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dermedge_fidelity::stats::percentile;
use dermedge_hub::server::{HubServer, Limits};
use dermedge_hub::store::{Location, Store};
use dermedge_queue::{Durability, Queue, QueueOptions};
use dermedge_record::{DeviceKey, EmbeddingType, Envelope, HubKey};
use dermedge_sync::{wire, Pushed, SyncClient, SyncConfig};

use crate::bench::{peak_rss_bytes, record, scratch};

/// A device's batch latencies (ms) and retries.
type DeviceResult = Result<(Vec<f64>, usize)>;

/// One round's results.
struct Round {
    store: &'static str,
    devices: usize,
    records: usize,
    seconds: f64,
    batch_ms: Vec<f64>,
    health_ms: Vec<f64>,
    health_failed: usize,
    retries: usize,
    exactly_once: bool,
    peak_rss: u64,
}

pub fn run(
    dir: &Option<PathBuf>,
    devices: &[usize],
    records: usize,
    stalled: usize,
    dim: usize,
    postgres: Option<&str>,
) -> Result<()> {
    let mut rounds = Vec::new();
    let postgres = postgres.map(|url| Location::parse(url.as_ref()));
    for (index, &n) in devices.iter().enumerate() {
        eprintln!(
            "bench hub: SQLite, {n} devices × {records} records, {stalled} stalled clients ..."
        );
        let tmp = scratch(dir)?;
        let sqlite = Location::from(tmp.path().join("hub.sqlite"));
        rounds.push(round(
            dir, &sqlite, "SQLite", index, n, records, stalled, dim,
        )?);
        if let Some(pg) = &postgres {
            eprintln!("bench hub: PostgreSQL ({pg}), {n} devices ...");
            rounds.push(round(
                dir,
                pg,
                "PostgreSQL",
                index,
                n,
                records,
                stalled,
                dim,
            )?);
        }
    }
    println!(
        "| store | devices (× {records} records of {dim}-d f16) | records/s | batch p50 / p99 ms | \
         health p50 / p99 / max ms ({stalled} stalled + vanishing + slow-drip clients) | \
         health failures | sync retries | peak RSS MB (hub + devices) | every record once |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rounds {
        let sorted = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v
        };
        let (batch, health) = (sorted(&r.batch_ms), sorted(&r.health_ms));
        let at = |v: &[f64], q: f64| {
            if v.is_empty() {
                f64::NAN
            } else {
                percentile(v, q)
            }
        };
        println!(
            "| {} | {} | {:.0} | {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {} of {} | {} | {:.0} | {} |",
            r.store,
            r.devices,
            r.records as f64 / r.seconds,
            at(&batch, 0.5),
            at(&batch, 0.99),
            at(&health, 0.5),
            at(&health, 0.99),
            health.last().copied().unwrap_or(f64::NAN),
            r.health_failed,
            health.len() + r.health_failed,
            r.retries,
            r.peak_rss as f64 / 1e6,
            if r.exactly_once { "yes" } else { "NO" }
        );
    }
    anyhow::ensure!(
        rounds.iter().all(|r| r.exactly_once),
        "a round did not store every record exactly once"
    );
    Ok(())
}

/// One round on `db`. Device ids are unique per round (`r<round>-dev-<i>`), so rounds can share
/// a PostgreSQL database and each counts only its own records.
#[allow(clippy::too_many_arguments)]
fn round(
    dir: &Option<PathBuf>,
    db: &Location,
    store_name: &'static str,
    round_index: usize,
    n: usize,
    records: usize,
    stalled: usize,
    dim: usize,
) -> Result<Round> {
    let tmp = scratch(dir)?;
    let hub_key = HubKey::generate();
    let hub_public = hub_key.public();
    let store = Store::connect(db)?;
    let mut devices = Vec::with_capacity(n);
    let prefix = format!("r{round_index}-dev-");
    for i in 0..n {
        let id = format!("{prefix}{i:03}");
        let key = DeviceKey::generate();
        store.enroll(&id, &key.public())?;
        let qdir = tmp.path().join(&id);
        let options = QueueOptions {
            durability: Durability::Group {
                max_records: 64,
                max_delay_ms: 1000,
            },
            ..QueueOptions::default()
        };
        let mut queue = Queue::open(&qdir, &key, &id, options)?;
        for r in 0..records {
            let mut rec = record(i * records + r, dim, EmbeddingType::F16);
            rec.device_id = id.clone();
            queue.append(&Envelope::seal(&rec, &hub_public))?;
        }
        queue.commit()?;
        devices.push((id, key, qdir, queue));
    }
    // Every simulated device and broken client comes from 127.0.0.1: the per-address cap,
    // meant for one client among many, would measure the cap instead of the hub.
    let limits = Limits {
        max_connections_per_address: usize::MAX,
        ..Limits::default()
    };
    let hub = HubServer::start_with(db, hub_key, "127.0.0.1:0", 2, limits)?;
    let addr = hub.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let faults = broken_clients(addr, stalled, stop.clone());
    let prober = health_prober(addr, stop.clone());
    // Let the broken clients take their connections before the devices start.
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let workers: Vec<JoinHandle<DeviceResult>> = devices
        .into_iter()
        .map(|(id, key, qdir, queue)| {
            let url = format!("http://{addr}");
            std::thread::spawn(move || {
                let mut config = SyncConfig::new(&url);
                config.batch_records = 16;
                let mut client = SyncClient::new(config, &key, hub_public, &qdir)?;
                let queue = Mutex::new(queue);
                let (mut latencies, mut retries) = (Vec::new(), 0);
                loop {
                    let t = Instant::now();
                    match client.push_once(&queue) {
                        Ok(Pushed::Idle) => return Ok((latencies, retries)),
                        Ok(Pushed::Batch { .. }) => latencies.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(e) if e.is_transient() && retries < 20 => {
                            retries += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => return Err(e).with_context(|| format!("{id} syncing")),
                    }
                }
            })
        })
        .collect();
    let (mut batch_ms, mut retries) = (Vec::new(), 0);
    for w in workers {
        let (latencies, r) = w.join().expect("a device thread")?;
        batch_ms.extend(latencies);
        retries += r;
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (health_ms, health_failed) = prober.join().expect("the health prober");
    for f in faults {
        let _ = f.join();
    }
    let peak_rss = peak_rss_bytes();
    hub.shutdown();
    // Record ids are unique in the store's schema; every device must hold each of its records
    // once, in sequence.
    let mine: Vec<_> = store
        .summaries()?
        .into_iter()
        .filter(|s| s.device_id.starts_with(&prefix))
        .collect();
    let exactly_once = mine.len() == n
        && mine
            .iter()
            .all(|s| s.records as usize == records && s.highest_seq as usize == records);
    Ok(Round {
        store: store_name,
        devices: n,
        records: n * records,
        seconds,
        batch_ms,
        health_ms,
        health_failed,
        retries,
        exactly_once,
        peak_rss,
    })
}

fn batch_head(length: usize) -> Vec<u8> {
    format!(
        "POST {} HTTP/1.1\r\nHost: hub\r\n{}: dev-000\r\n{}: 999999\r\nContent-Length: {length}\r\n\r\n",
        wire::BATCH_PATH,
        wire::DEVICE_HEADER,
        wire::COUNTER_HEADER
    )
    .into_bytes()
}

/// Clients that break the protocol until `stop`: `stalled` connections held open mid-request
/// (reopened when the hub closes them), one that vanishes mid-body every 50 ms, and five that
/// drip a byte every 200 ms.
fn broken_clients(addr: SocketAddr, stalled: usize, stop: Arc<AtomicBool>) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    let stop_stalled = stop.clone();
    threads.push(std::thread::spawn(move || {
        let open = |i: usize| -> Option<TcpStream> {
            let mut s = TcpStream::connect(addr).ok()?;
            let head = batch_head(1 << 20);
            let sent = if i.is_multiple_of(2) {
                head[..head.len() / 2].to_vec()
            } else {
                [head, vec![0u8; 1000]].concat()
            };
            s.write_all(&sent).ok()?;
            s.set_nonblocking(true).ok()?;
            Some(s)
        };
        let mut held: Vec<Option<TcpStream>> = (0..stalled).map(open).collect();
        while !stop_stalled.load(Ordering::Relaxed) {
            for (i, slot) in held.iter_mut().enumerate() {
                let closed = match slot {
                    // An answer (408) or an end of stream: the hub closed it.
                    Some(s) => s.read(&mut [0u8; 512]).is_ok(),
                    None => true,
                };
                if closed {
                    *slot = open(i);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }));
    let stop_vanish = stop.clone();
    threads.push(std::thread::spawn(move || {
        while !stop_vanish.load(Ordering::Relaxed) {
            if let Ok(mut s) = TcpStream::connect(addr) {
                let _ = s.write_all(&[batch_head(100_000), vec![1u8; 5000]].concat());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }));
    for _ in 0..5 {
        let stop_drip = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop_drip.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    return;
                };
                if s.write_all(&batch_head(100_000)).is_err() {
                    continue;
                }
                while !stop_drip.load(Ordering::Relaxed) && s.write_all(b"x").is_ok() {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }));
    }
    threads
}

/// `GET /v1/health` every 20 ms until `stop`: each answer's latency in ms, and the failures
/// (no 200 within 2 s).
fn health_prober(addr: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<(Vec<f64>, usize)> {
    std::thread::spawn(move || {
        let (mut latencies, mut failed) = (Vec::new(), 0);
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n",
            wire::HEALTH_PATH
        );
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let ok = (|| -> std::io::Result<bool> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(request.as_bytes())?;
                let mut response = Vec::new();
                s.read_to_end(&mut response)?;
                Ok(response.starts_with(b"HTTP/1.1 200"))
            })();
            match ok {
                Ok(true) => latencies.push(t.elapsed().as_secs_f64() * 1e3),
                _ => failed += 1,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (latencies, failed)
    })
}
