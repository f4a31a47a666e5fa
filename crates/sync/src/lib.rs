//! dermedge-sync: drains the queue to the hub when a link exists.
//!
//! Batches go out in sequence order, sealed with the device's sync key ([`wire`]); the queue's
//! acknowledged cursor advances only on an authentic acknowledgement from the hub, so an
//! interrupted push (dropped link, hub restart, timeout) is simply sent again, and the hub's
//! dedup by record id keeps it exactly-once. Failures that may pass (transport, `5xx`) are
//! retried with exponential backoff and jitter; ones that will not (unknown device, wrong key,
//! a hub that lost records) stop with a clear error.

pub mod wire;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dermedge_queue::{DeviceKey, Queue, QueueError, SYNC_STATE};
use serde::{Deserialize, Serialize};

use wire::{Batch, BatchRecord, OpenError};

/// Counters are reserved on disk this many at a time, so a request costs no extra fsync.
const COUNTER_BLOCK: u64 = 64;
/// A hub may move the device's counter forward (after a lost state file), but not past this.
const COUNTER_CEILING: u64 = 1 << 60;
const MAX_RESPONSE_BYTES: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot reach the hub at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("hub at {url} answered {status}: {message}")]
    HubFailed {
        url: String,
        status: u16,
        message: String,
    },
    #[error("hub at {url} refused this device ({status}): {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error(
        "hub at {url} holds records of this device only through {hub_highest_seq}, but the device \
         had them acknowledged through {after_seq}: the hub lost data (restored from a backup?) \
         and needs an operator"
    )]
    HubBehind {
        url: String,
        hub_highest_seq: u64,
        after_seq: u64,
    },
    #[error("hub at {url} sent an acknowledgement that does not verify: {message}")]
    BadAck { url: String, message: String },
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

impl SyncError {
    /// Worth retrying after a pause.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SyncError::Transport { .. } | SyncError::HubFailed { .. } | SyncError::BadAck { .. }
        )
    }
}

/// Exponential backoff with jitter: attempt `n` waits between half and all of
/// `min(max, initial * 2^n)`, so devices that lost the link together do not return together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// `unit` is a uniform random number in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("the OS random source is available");
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// `http://host:port` or `https://host:port` of the hub.
    pub hub_url: String,
    pub batch_records: usize,
    pub batch_bytes: usize,
    /// Per request: connect, send and receive.
    pub timeout: Duration,
    pub backoff: Backoff,
}

impl SyncConfig {
    pub fn new(hub_url: &str) -> Self {
        Self {
            hub_url: hub_url.trim_end_matches('/').to_string(),
            batch_records: 64,
            batch_bytes: 2 << 20,
            timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
        }
    }
}

/// The outcome of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Nothing was waiting.
    Idle,
    /// A batch of `records` went out and the hub acknowledged through `acked_through`.
    Batch { records: usize, acked_through: u64 },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    pub batches: usize,
    pub records: usize,
    pub retries: usize,
    pub acked_through: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterState {
    reserved_through: u64,
}

pub struct SyncClient {
    config: SyncConfig,
    sync_key: [u8; 32],
    agent: ureq::Agent,
    state_path: PathBuf,
    next_counter: u64,
    reserved_through: u64,
}

impl SyncClient {
    /// A client for the queue in `queue_dir`; its request counter is kept in `<queue_dir>/sync.json`.
    pub fn new(config: SyncConfig, key: &DeviceKey, queue_dir: &Path) -> Result<Self, SyncError> {
        if !(config.hub_url.starts_with("http://") || config.hub_url.starts_with("https://")) {
            return Err(SyncError::Config(format!(
                "hub url {:?}: expected http://host:port or https://host:port",
                config.hub_url
            )));
        }
        if config.batch_records == 0 {
            return Err(SyncError::Config("batch_records must be at least 1".into()));
        }
        let state_path = queue_dir.join(SYNC_STATE);
        let state: CounterState = match fs::read_to_string(&state_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| SyncError::State {
                path: state_path.clone(),
                message: format!("not a sync state file: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CounterState::default(),
            Err(e) => {
                return Err(SyncError::State {
                    path: state_path,
                    message: e.to_string(),
                })
            }
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(config.timeout.min(Duration::from_secs(10)))
            .timeout(config.timeout)
            .build();
        let mut client = Self {
            config,
            sync_key: key.sync_key(),
            agent,
            state_path,
            // Counters up to the reservation may have been used before a restart: skip them.
            next_counter: state.reserved_through + 1,
            reserved_through: state.reserved_through,
        };
        client.reserve()?;
        Ok(client)
    }

    pub fn hub_url(&self) -> &str {
        &self.config.hub_url
    }

    fn reserve(&mut self) -> Result<(), SyncError> {
        let reserved_through = self.next_counter + COUNTER_BLOCK - 1;
        let tmp = self.state_path.with_extension("json.tmp");
        let text = serde_json::to_string(&CounterState { reserved_through }).expect("serialisable");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.state_path)?;
            if let Some(dir) = self.state_path.parent() {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| SyncError::State {
            path: self.state_path.clone(),
            message: e.to_string(),
        })?;
        self.reserved_through = reserved_through;
        Ok(())
    }

    fn take_counter(&mut self) -> Result<u64, SyncError> {
        if self.next_counter > self.reserved_through {
            self.reserve()?;
        }
        let c = self.next_counter;
        self.next_counter += 1;
        Ok(c)
    }

    /// Send one batch of unacknowledged records and advance the cursor on the hub's ack.
    pub fn push_once(&mut self, queue: &Mutex<Queue>) -> Result<Pushed, SyncError> {
        let (device, after_seq, records) = {
            let q = queue.lock().expect("queue lock");
            let records = q.unacknowledged(self.config.batch_records, self.config.batch_bytes)?;
            (q.device_id().to_string(), q.acked_seq(), records)
        };
        let Some(last) = records.last().map(|r| r.seq) else {
            return Ok(Pushed::Idle);
        };
        let batch = Batch {
            after_seq,
            records: records
                .into_iter()
                .map(|s| BatchRecord {
                    seq: s.seq,
                    cbor: s.cbor,
                })
                .collect(),
        };
        let count = batch.records.len();
        let counter = self.take_counter()?;
        let body = wire::seal_batch(&self.sync_key, &device, counter, &batch);
        let url = format!("{}{}", self.config.hub_url, wire::BATCH_PATH);
        log::debug!(
            "sync: request {counter}: {count} records {}..={last} to {url}",
            batch.records[0].seq
        );
        let response = self
            .agent
            .post(&url)
            .set(wire::DEVICE_HEADER, &device)
            .set(wire::COUNTER_HEADER, &counter.to_string())
            .set("Content-Type", wire::CONTENT_TYPE)
            .send_bytes(&body);
        let hub = self.config.hub_url.clone();
        let ack_body = match response {
            Ok(r) => read_body(r),
            Err(ureq::Error::Status(status, r)) => {
                let body = read_body(r);
                return Err(self.status_error(status, &body, &device, counter, after_seq));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(SyncError::Transport {
                    url: hub,
                    message: t.to_string(),
                })
            }
        };
        let ack = wire::open_ack(&self.sync_key, &device, counter, &ack_body).map_err(|e| {
            SyncError::BadAck {
                url: hub.clone(),
                message: match e {
                    OpenError::Unauthenticated => "not sealed with this device's key".into(),
                    OpenError::Malformed(m) => m,
                },
            }
        })?;
        if ack.acked_through < last {
            return Err(SyncError::BadAck {
                url: hub,
                message: format!(
                    "acknowledged through {}, the batch ended at {last}",
                    ack.acked_through
                ),
            });
        }
        queue.lock().expect("queue lock").acknowledge(last)?;
        log::info!(
            "sync: hub stored {} new records ({} already there), acknowledged through {last}",
            ack.stored,
            ack.duplicates
        );
        Ok(Pushed::Batch {
            records: count,
            acked_through: last,
        })
    }

    fn status_error(
        &mut self,
        status: u16,
        body: &[u8],
        device: &str,
        counter: u64,
        after_seq: u64,
    ) -> SyncError {
        let url = self.config.hub_url.clone();
        let text = String::from_utf8_lossy(body).trim().to_string();
        if status == 409 {
            // Only a conflict sealed with this device's key for this request may move the
            // counter or explain the cursor; anything else changes nothing and is retried.
            let Ok(conflict) = wire::open_conflict(&self.sync_key, device, counter, body) else {
                log::warn!("sync: {url} answered 409 without the hub's seal; ignored");
                return SyncError::HubFailed {
                    url,
                    status,
                    message: "a conflict reply that is not sealed with this device's key (ignored)"
                        .into(),
                };
            };
            if let Some(hub_counter) = conflict.hub_last_counter {
                if hub_counter >= self.next_counter && hub_counter < COUNTER_CEILING {
                    // Our counter state was lost or restored: continue above the hub's.
                    log::warn!("sync: hub has seen request counter {hub_counter}; moving past it");
                    self.next_counter = hub_counter + 1;
                    self.reserved_through = 0;
                    return SyncError::HubFailed {
                        url,
                        status,
                        message: conflict.error,
                    };
                }
            }
            if let Some(highest) = conflict.hub_highest_seq {
                if highest < after_seq {
                    return SyncError::HubBehind {
                        url,
                        hub_highest_seq: highest,
                        after_seq,
                    };
                }
            }
            return SyncError::Refused {
                url,
                status,
                message: conflict.error,
            };
        }
        if status >= 500 || status == 408 || status == 429 {
            SyncError::HubFailed {
                url,
                status,
                message: text,
            }
        } else {
            SyncError::Refused {
                url,
                status,
                message: text,
            }
        }
    }

    /// Push until the queue holds nothing unacknowledged, retrying transient failures with
    /// backoff. Stops early when `stop` is set (with the last error if the hub was failing then),
    /// or with the last error after `max_retries` consecutive failures.
    pub fn drain(
        &mut self,
        queue: &Mutex<Queue>,
        stop: &AtomicBool,
        max_retries: Option<u32>,
    ) -> Result<DrainReport, SyncError> {
        let mut report = DrainReport::default();
        let mut attempt = 0u32;
        let mut failing: Option<SyncError> = None;
        while !stop.load(Ordering::Relaxed) {
            match self.push_once(queue) {
                Ok(Pushed::Idle) => return Ok(report),
                Ok(Pushed::Batch {
                    records,
                    acked_through,
                }) => {
                    attempt = 0;
                    failing = None;
                    report.batches += 1;
                    report.records += records;
                    report.acked_through = acked_through;
                }
                Err(e) if e.is_transient() && max_retries.is_none_or(|m| attempt < m) => {
                    let wait = self.config.backoff.delay(attempt, random_unit());
                    log::warn!("sync: {e}; retrying in {:.1}s", wait.as_secs_f64());
                    attempt += 1;
                    report.retries += 1;
                    failing = Some(e);
                    sleep_unless(stop, wait);
                }
                Err(e) => return Err(e),
            }
        }
        // Stopped while the hub was failing: that failure is the outcome.
        if let Some(e) = failing {
            return Err(e);
        }
        Ok(report)
    }
}

fn read_body(response: ureq::Response) -> Vec<u8> {
    let mut body = Vec::new();
    let _ = response
        .into_reader()
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut body);
    body
}

/// Sleep for `wait`, waking early when `stop` is set.
pub fn sleep_unless(stop: &AtomicBool, wait: Duration) {
    let until = Instant::now() + wait;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay(10, 1.0), Duration::from_secs(2));
        assert_eq!(b.delay(40, 0.0), Duration::from_secs(1));
        let u = random_unit();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn counters_never_repeat_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let config = SyncConfig::new("http://127.0.0.1:9");
        let mut used = Vec::new();
        for _ in 0..3 {
            let mut client = SyncClient::new(config.clone(), &key, dir.path()).unwrap();
            for _ in 0..100 {
                used.push(client.take_counter().unwrap());
            }
        }
        let mut sorted = used.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), used.len());
        assert!(used.windows(2).all(|w| w[1] > w[0]));
    }

    /// A keyless fake hub answers every request with `409` and a counter near the ceiling, as
    /// the hub's conflict used to be sent (plain JSON): the device changes nothing.
    #[test]
    fn an_unsealed_conflict_moves_nothing() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().unwrap();
                let mut buf = [0u8; 65536];
                let _ = stream.read(&mut buf);
                let body = r#"{"error":"replayed","hub_highest_seq":0,"hub_last_counter":1152921504606846976}"#;
                let _ = write!(
                    stream,
                    "HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let queue = Queue::open(dir.path(), &key, "dev-1", Default::default()).unwrap();
        let record = dermedge_queue::Record {
            format: dermedge_queue::RECORD_FORMAT,
            id: dermedge_queue::new_record_id(),
            captured_at_ms: 1,
            device_id: "dev-1".into(),
            model_id: "m".into(),
            precision: "int8".into(),
            embedding: dermedge_queue::Embedding::new(&[1.0], dermedge_queue::EmbeddingType::F32),
            heads: Vec::new(),
            quality: None,
            source: None,
            thumbnail_jpeg: None,
        };
        let queue = Mutex::new(queue);
        queue.lock().unwrap().append(&record).unwrap();
        let mut client = SyncClient::new(SyncConfig::new(&url), &key, dir.path()).unwrap();
        let state = std::fs::read(dir.path().join(SYNC_STATE)).unwrap();
        for _ in 0..2 {
            let before = client.next_counter;
            let err = client.push_once(&queue).unwrap_err();
            assert!(err.is_transient(), "{err}");
            assert!(err.to_string().contains("not sealed"), "{err}");
            assert_eq!(
                client.next_counter,
                before + 1,
                "the counter moved on a keyless word"
            );
        }
        fake.join().unwrap();
        assert_eq!(std::fs::read(dir.path().join(SYNC_STATE)).unwrap(), state);
        assert_eq!(queue.lock().unwrap().acked_seq(), 0);
    }

    #[test]
    fn a_bad_hub_url_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = SyncClient::new(
            SyncConfig::new("ftp://hub"),
            &DeviceKey::generate(),
            dir.path(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("ftp://hub"), "{err}");
    }
}
