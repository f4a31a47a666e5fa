//! dermedge-sync: drains the queue to the hub when a link exists.
//!
//! Batches go out in sequence order, signed with the device's key ([`wire`], `dermedge-sync/2`),
//! each with the losses the queue journalled and has not yet reported ([`Gap`]); the queue's
//! acknowledged cursor advances only on an acknowledgement signed by the hub key pinned at
//! enrollment, so an interrupted push (dropped link, hub restart, timeout) is simply sent
//! again, and the hub's dedup by record id keeps it exactly-once. Failures that may pass
//! (transport, `5xx`) are retried with exponential backoff and jitter; ones that will not
//! (unknown or revoked device, wrong key, a hub that lost records, a hub that speaks another
//! protocol version) stop with a clear error.

pub mod wire;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dermedge_queue::{Gap, Queue, QueueError, SYNC_STATE};
use dermedge_record::{DeviceKey, HubPublic};
use serde::{Deserialize, Serialize};

use wire::{Batch, BatchRecord, OpenError};

/// Counters are reserved on disk this many at a time, so a request costs no extra fsync.
const COUNTER_BLOCK: u64 = 64;
/// A hub may move the device's counter forward (after a lost state file), but not past this.
const COUNTER_CEILING: u64 = 1 << 60;
const MAX_RESPONSE_BYTES: u64 = 64 << 10;
/// How long a hub that has no `/v2/heads` is left alone.
const HEADS_RETRY: Duration = Duration::from_secs(3600);
/// Heads are weights: a 6144-d head of a few classes is a few hundred KiB.
pub const MAX_HEAD_OFFER_BYTES: u64 = 32 << 20;

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
    #[error(
        "hub at {url} does not speak {protocol} (HTTP {status} at {path}): upgrade the hub",
        protocol = wire::PROTOCOL,
        path = wire::BATCH_PATH
    )]
    Version { url: String, status: u16 },
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
    /// For `https://`: PEM certificates to trust instead of the public web's roots (the
    /// clinic's own CA, or the hub's self-signed certificate: a clinic LAN has no public CA).
    pub trust: Option<PathBuf>,
}

impl SyncConfig {
    pub fn new(hub_url: &str) -> Self {
        Self {
            hub_url: hub_url.trim_end_matches('/').to_string(),
            batch_records: 64,
            batch_bytes: 2 << 20,
            timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            trust: None,
        }
    }
}

/// The outcome of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Nothing was waiting.
    Idle,
    /// A batch of `records` and `gaps` went out and the hub acknowledged through
    /// `acked_through`.
    Batch {
        records: usize,
        gaps: usize,
        acked_through: u64,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    pub batches: usize,
    pub records: usize,
    /// Losses reported to the hub.
    pub gaps: usize,
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
    key: DeviceKey,
    /// The hub's public key pinned at enrollment: only replies it signed change anything.
    hub: HubPublic,
    agent: ureq::Agent,
    state_path: PathBuf,
    next_counter: u64,
    reserved_through: u64,
    /// The hub answered a head query: it knows this release's additions to the batch
    /// (`queued_after`), which an older hub refuses as an unknown field.
    hub_is_current: bool,
    /// An older hub without `/v2/heads`: not asked again before this.
    heads_unsupported_until: Option<Instant>,
}

impl SyncClient {
    /// A client for the queue in `queue_dir` that signs with `key` and believes only `hub`; its
    /// request counter is kept in `<queue_dir>/sync.json`.
    pub fn new(
        config: SyncConfig,
        key: &DeviceKey,
        hub: HubPublic,
        queue_dir: &Path,
    ) -> Result<Self, SyncError> {
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
            // Damaged or impossible counter state is as if lost: counting starts again, and the
            // hub's signed conflict moves the counter past the last one it saw.
            Ok(text) => match serde_json::from_str::<CounterState>(&text) {
                Ok(state) if state.reserved_through < COUNTER_CEILING => state,
                Ok(state) => {
                    log::error!(
                        "{}: counter {} is beyond {COUNTER_CEILING}; starting again",
                        state_path.display(),
                        state.reserved_through
                    );
                    CounterState::default()
                }
                Err(e) => {
                    log::error!(
                        "{}: not a sync state file ({e}); starting again",
                        state_path.display()
                    );
                    CounterState::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CounterState::default(),
            Err(e) => {
                return Err(SyncError::State {
                    path: state_path,
                    message: e.to_string(),
                })
            }
        };
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(config.timeout.min(Duration::from_secs(10)))
            .timeout(config.timeout);
        if let Some(trust) = &config.trust {
            agent = agent.tls_config(pinned_tls(trust)?);
        }
        let agent = agent.build();
        let mut client = Self {
            config,
            key: key.clone(),
            hub,
            agent,
            state_path,
            // Counters up to the reservation may have been used before a restart: skip them.
            next_counter: state.reserved_through + 1,
            reserved_through: state.reserved_through,
            hub_is_current: false,
            heads_unsupported_until: None,
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

    /// Send one batch (unacknowledged records, with the unreported losses among them, or only
    /// losses when no record waits) and advance the cursor on the hub's signed ack.
    pub fn push_once(&mut self, queue: &Mutex<Queue>) -> Result<Pushed, SyncError> {
        let (device, after_seq, durable_seq, records, gaps, pending) = {
            let q = queue.lock().expect("queue lock");
            let records = q.unacknowledged(self.config.batch_records, self.config.batch_bytes)?;
            (
                q.device_id().to_string(),
                q.acked_seq(),
                q.durable_seq(),
                records,
                q.unreported_gaps(),
                q.stats().pending_records,
            )
        };
        let pending = self.hub_is_current.then_some(pending);
        let Some((batch, last)) = plan_batch(after_seq, durable_seq, records, gaps, pending) else {
            return Ok(Pushed::Idle);
        };
        let count = batch.records.len();
        let gap_count = batch.gaps.len();
        let counter = self.take_counter()?;
        let body = wire::seal_batch(&self.key, &device, counter, &batch);
        let url = format!("{}{}", self.config.hub_url, wire::BATCH_PATH);
        log::debug!(
            "sync: request {counter}: {count} records and {gap_count} gaps after {after_seq} through {last} to {url}"
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
                let reply = read_body(r);
                return Err(self.status_error(status, &reply, &device, counter, &body, after_seq));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(SyncError::Transport {
                    url: hub,
                    message: t.to_string(),
                })
            }
        };
        let ack = wire::open_ack(&self.hub, &device, counter, &body, &ack_body).map_err(|e| {
            SyncError::BadAck {
                url: hub.clone(),
                message: match e {
                    OpenError::Unauthenticated => {
                        "not signed by the hub key pinned at enrollment".into()
                    }
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
        for gap in &batch.gaps {
            log::warn!("sync: reported to the hub: {gap}");
        }
        log::info!(
            "sync: hub stored {} new records ({} already there), acknowledged through {last}",
            ack.stored,
            ack.duplicates
        );
        Ok(Pushed::Batch {
            records: count,
            gaps: gap_count,
            acked_through: last,
        })
    }

    /// The heads the hub published for `query`'s model that are newer than those the device
    /// holds, each checked: signed by the pinned hub key, bound to the query's model and
    /// dimension, and of a higher version than the one held. A head that fails a check is
    /// refused with a log line naming why, and the rest are still returned.
    pub fn fetch_heads(
        &mut self,
        device: &str,
        query: &wire::HeadQuery,
    ) -> Result<Vec<FetchedHead>, SyncError> {
        if self
            .heads_unsupported_until
            .is_some_and(|until| Instant::now() < until)
        {
            return Ok(Vec::new());
        }
        let counter = self.take_counter()?;
        let body = wire::seal_head_query(&self.key, device, counter, query);
        let url = format!("{}{}", self.config.hub_url, wire::HEADS_PATH);
        let response = self
            .agent
            .post(&url)
            .set(wire::DEVICE_HEADER, device)
            .set(wire::COUNTER_HEADER, &counter.to_string())
            .set("Content-Type", wire::CONTENT_TYPE)
            .send_bytes(&body);
        let hub = self.config.hub_url.clone();
        let reply = match response {
            Ok(r) => read_body_up_to(r, MAX_HEAD_OFFER_BYTES),
            Err(ureq::Error::Status(status, r)) => {
                let text = String::from_utf8_lossy(&read_body(r)).trim().to_string();
                return Err(if status == 404 || status == 405 {
                    log::info!(
                        "sync: the hub at {hub} publishes no heads (HTTP {status} at {}: an \
                         older hub); asking again in an hour",
                        wire::HEADS_PATH
                    );
                    self.heads_unsupported_until = Some(Instant::now() + HEADS_RETRY);
                    return Ok(Vec::new());
                } else {
                    status_failure(hub, status, text)
                });
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(SyncError::Transport {
                    url: hub,
                    message: t.to_string(),
                })
            }
        };
        self.hub_is_current = true;
        self.heads_unsupported_until = None;
        let offer: wire::HeadOffer =
            ciborium::from_reader(reply.as_slice()).map_err(|e| SyncError::BadAck {
                url: hub.clone(),
                message: format!("not a head offer: {e}"),
            })?;
        let mut accepted = Vec::new();
        for blob in offer.heads {
            match check_head(&self.hub, query, &blob) {
                Ok(head) => {
                    log::info!(
                        "sync: hub published head {} for {}",
                        head.label(),
                        head.model_id
                    );
                    accepted.push(FetchedHead {
                        head,
                        signed: blob.into_vec(),
                    });
                }
                Err(why) => log::error!("sync: head from {hub} refused, the old one kept: {why}"),
            }
        }
        Ok(accepted)
    }

    /// `body`: the reply; `request`: the body this device sent.
    fn status_error(
        &mut self,
        status: u16,
        body: &[u8],
        device: &str,
        counter: u64,
        request: &[u8],
        after_seq: u64,
    ) -> SyncError {
        let url = self.config.hub_url.clone();
        let text = String::from_utf8_lossy(body).trim().to_string();
        if status == 404 || status == 405 {
            return SyncError::Version { url, status };
        }
        if status == 409 {
            // Only a conflict signed by the pinned hub key for this request may move the
            // counter or explain the cursor; anything else changes nothing and is retried.
            let Ok(conflict) = wire::open_conflict(&self.hub, device, counter, request, body)
            else {
                log::warn!("sync: {url} answered 409 without the hub's signature; ignored");
                return SyncError::HubFailed {
                    url,
                    status,
                    message: "a conflict reply that is not signed by the hub key pinned at \
                              enrollment (ignored)"
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
        status_failure(url, status, text)
    }

    /// Push until the queue holds nothing unacknowledged and no unreported loss, retrying transient failures with
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
                    gaps,
                    acked_through,
                }) => {
                    attempt = 0;
                    failing = None;
                    report.batches += 1;
                    report.records += records;
                    report.gaps += gaps;
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

/// The next batch and the sequence number it is acknowledged through, or `None` when nothing
/// waits.
///
/// A batch with records carries the unreported gaps that end at or before its last record (the
/// hub advances over a gap as over a record, so a gap beyond the batch would put the records
/// before it out of order; it goes with a later batch). When no record waits, the batch holds
/// only the gaps that start at or below `durable_seq`, and is acknowledged through the end of the
/// last one, never past `durable_seq`.
fn plan_batch(
    after_seq: u64,
    durable_seq: u64,
    records: Vec<dermedge_queue::Stored>,
    gaps: Vec<Gap>,
    pending: Option<u64>,
) -> Option<(Batch, u64)> {
    let (gaps, last): (Vec<Gap>, u64) = match records.last() {
        Some(r) => {
            let last = r.seq;
            (gaps.into_iter().filter(|g| g.to <= last).collect(), last)
        }
        None => {
            // Clipped at the durable mark: the hub must not move past records still to come.
            let gaps: Vec<Gap> = gaps
                .into_iter()
                .filter(|g| g.from <= durable_seq)
                .map(|g| Gap {
                    to: g.to.min(durable_seq),
                    ..g
                })
                .collect();
            let last = gaps.iter().map(|g| g.to).max()?.min(durable_seq);
            if last <= after_seq {
                // Nothing a hub's ack could move: the rest of these ranges is not durable yet.
                return None;
            }
            (gaps, last)
        }
    };
    let batch = Batch {
        after_seq,
        queued_after: pending.map(|p| p.saturating_sub(records.len() as u64)),
        records: records
            .into_iter()
            .map(|s| BatchRecord {
                seq: s.seq,
                cbor: s.cbor,
            })
            .collect(),
        gaps,
    };
    Some((batch, last))
}

/// A TLS client that trusts exactly the certificates in the PEM file `trust` (what
/// [`SyncConfig::trust`] gives the sync client).
pub fn pinned_tls(trust: &Path) -> Result<std::sync::Arc<rustls::ClientConfig>, SyncError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let config_error =
        |message: String| SyncError::Config(format!("{}: {message}", trust.display()));
    let certificates = CertificateDer::pem_file_iter(trust)
        .map_err(|e| config_error(format!("cannot read the trusted certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(format!("not PEM certificates: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        roots
            .add(certificate)
            .map_err(|e| config_error(format!("not a usable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(config_error(
            "no CERTIFICATE block: expected the hub's certificate or the clinic's CA in PEM".into(),
        ));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// A failed request's status as an error: one that may pass (a `5xx`, a timeout, too many
/// requests), or a refusal.
fn status_failure(url: String, status: u16, message: String) -> SyncError {
    if status >= 500 || status == 408 || status == 429 {
        SyncError::HubFailed {
            url,
            status,
            message,
        }
    } else {
        SyncError::Refused {
            url,
            status,
            message,
        }
    }
}

fn read_body(response: ureq::Response) -> Vec<u8> {
    read_body_up_to(response, MAX_RESPONSE_BYTES)
}

/// At most `max` bytes of the reply; a longer one comes back cut, and fails to decode.
fn read_body_up_to(response: ureq::Response, max: u64) -> Vec<u8> {
    let mut body = Vec::new();
    let _ = response.into_reader().take(max).read_to_end(&mut body);
    body
}

/// A head the hub published, checked, with the signed publication to store as it came.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchedHead {
    pub head: dermedge_head::LinearHead,
    pub signed: Vec<u8>,
}

/// The head in a signed publication, if `hub` signed it, it fits `query`'s model and dimension,
/// and it is newer than the head of that name `query` says the device holds.
pub fn check_head(
    hub: &HubPublic,
    query: &wire::HeadQuery,
    signed: &[u8],
) -> Result<dermedge_head::LinearHead, String> {
    let head = wire::open_head(hub, signed).map_err(|e| match e {
        OpenError::Unauthenticated => "not signed by the hub key pinned at enrollment".to_string(),
        OpenError::Malformed(m) => format!("not a valid head: {m}"),
    })?;
    let dim = usize::try_from(query.embedding_dim).unwrap_or(usize::MAX);
    head.check_model(&query.model_id, dim)
        .map_err(|e| e.to_string())?;
    let version = head.version.unwrap_or(0);
    if let Some(held) = query.have.iter().find(|h| h.name == head.name) {
        if version <= held.version {
            return Err(format!(
                "head {} is version {version}, not newer than the version {} held",
                head.name, held.version
            ));
        }
    }
    Ok(head)
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
    fn a_head_must_fit_the_model_and_be_newer_than_the_one_held() {
        let hub = HubKey::generate();
        let head = wire::tests::head(Some(3));
        let blob = wire::seal_head(&hub, &head);
        let query = |model: &str, dim: u64, held: Option<u64>| wire::HeadQuery {
            model_id: model.into(),
            embedding_dim: dim,
            have: held
                .map(|version| wire::HeldHead {
                    name: "diagnosis".into(),
                    version,
                })
                .into_iter()
                .collect(),
        };
        assert_eq!(
            check_head(&hub.public(), &query("df-mini", 2, None), &blob).unwrap(),
            head
        );
        assert!(check_head(&hub.public(), &query("df-mini", 2, Some(2)), &blob).is_ok());
        let err = check_head(&hub.public(), &query("df-mini", 2, Some(3)), &blob).unwrap_err();
        assert!(err.contains("not newer"), "{err}");
        let err = check_head(&hub.public(), &query("lesion-x448", 2, None), &blob).unwrap_err();
        assert!(err.contains("lesion-x448"), "{err}");
        assert!(check_head(&hub.public(), &query("df-mini", 3, None), &blob).is_err());
        let err = check_head(
            &HubKey::generate().public(),
            &query("df-mini", 2, None),
            &blob,
        )
        .unwrap_err();
        assert!(err.contains("pinned"), "{err}");
    }
    use dermedge_queue::{GapReason, QueueOptions, Stored};
    use dermedge_record::{Envelope, HubKey, Record, ENVELOPE_FORMAT};

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

    fn hub_public() -> HubPublic {
        HubKey::generate().public()
    }

    #[test]
    fn counters_never_repeat_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let config = SyncConfig::new("http://127.0.0.1:9");
        let mut used = Vec::new();
        for _ in 0..3 {
            let mut client =
                SyncClient::new(config.clone(), &key, hub_public(), dir.path()).unwrap();
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

    fn record(device: &str) -> Record {
        Record {
            format: dermedge_record::RECORD_FORMAT,
            id: dermedge_record::new_record_id(),
            captured_at_ms: 1,
            device_id: device.into(),
            model_id: "m".into(),
            precision: dermedge_record::Precision::Int8,
            embedding: dermedge_record::StoredEmbedding::new(
                &[1.0],
                dermedge_record::EmbeddingType::F32,
            ),
            heads: Vec::new(),
            quality: None,
            source: None,
            thumbnail_jpeg: None,
        }
    }

    /// A fake hub on loopback: `reply(counter)` answers each of `requests` requests (status,
    /// body), then it stops.
    fn fake_hub(
        requests: usize,
        reply: impl Fn(u64) -> (u16, Vec<u8>) + Send + 'static,
    ) -> (String, std::thread::JoinHandle<()>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            for _ in 0..requests {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let (mut length, mut counter) = (0usize, 0u64);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if let Some(v) =
                        lower.strip_prefix(&format!("{}:", wire::COUNTER_HEADER.to_lowercase()))
                    {
                        counter = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).unwrap();
                let (status, body) = reply(counter);
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            }
        });
        (url, handle)
    }

    fn queue_with_one_record(dir: &Path, key: &DeviceKey, hub: &HubPublic) -> Mutex<Queue> {
        let mut queue = Queue::open(dir, key, "dev-1", QueueOptions::default()).unwrap();
        queue
            .append(&Envelope::seal(&record("dev-1"), hub))
            .unwrap();
        Mutex::new(queue)
    }

    /// A keyless fake hub answers every request with `409` and a counter near the ceiling, as
    /// conflicts were once sent (plain JSON): the device changes nothing.
    #[test]
    fn an_unsealed_conflict_moves_nothing() {
        let (url, fake) = fake_hub(2, |_| {
            let body = r#"{"error":"replayed","hub_highest_seq":0,"hub_last_counter":1152921504606846976}"#;
            (409, body.as_bytes().to_vec())
        });
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let hub = hub_public();
        let queue = queue_with_one_record(dir.path(), &key, &hub);
        let mut client = SyncClient::new(SyncConfig::new(&url), &key, hub, dir.path()).unwrap();
        let state = std::fs::read(dir.path().join(SYNC_STATE)).unwrap();
        for _ in 0..2 {
            let before = client.next_counter;
            let err = client.push_once(&queue).unwrap_err();
            assert!(err.is_transient(), "{err}");
            assert!(err.to_string().contains("not signed"), "{err}");
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

    /// Replies signed with a hub key other than the pinned one (an ack, and a conflict that
    /// would move the counter) change nothing on the device.
    #[test]
    fn replies_signed_by_another_hub_move_nothing() {
        let impostor = HubKey::generate();
        let (url, fake) = fake_hub(2, move |counter| {
            if counter == 1 {
                let ack = wire::Ack {
                    counter,
                    acked_through: 1,
                    stored: 1,
                    duplicates: 0,
                };
                (200, wire::seal_ack(&impostor, "dev-1", b"", &ack))
            } else {
                let conflict = wire::Conflict {
                    error: "replayed".into(),
                    hub_highest_seq: None,
                    hub_last_counter: Some(1 << 40),
                };
                (
                    409,
                    wire::seal_conflict(&impostor, "dev-1", counter, b"", &conflict),
                )
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let hub = hub_public();
        let queue = queue_with_one_record(dir.path(), &key, &hub);
        let mut client = SyncClient::new(SyncConfig::new(&url), &key, hub, dir.path()).unwrap();
        let err = client.push_once(&queue).unwrap_err();
        assert!(matches!(err, SyncError::BadAck { .. }), "{err}");
        assert!(err.to_string().contains("pinned"), "{err}");
        let err = client.push_once(&queue).unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert_eq!(client.next_counter, 3);
        fake.join().unwrap();
        assert_eq!(queue.lock().unwrap().acked_seq(), 0);
    }

    #[test]
    fn a_hub_without_v2_is_a_clear_version_error() {
        let (url, fake) = fake_hub(1, |_| (404, b"not found\n".to_vec()));
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let hub = hub_public();
        let queue = queue_with_one_record(dir.path(), &key, &hub);
        let mut client = SyncClient::new(SyncConfig::new(&url), &key, hub, dir.path()).unwrap();
        let err = client
            .drain(&queue, &AtomicBool::new(false), Some(5))
            .unwrap_err();
        fake.join().unwrap();
        assert!(
            matches!(err, SyncError::Version { status: 404, .. }),
            "{err}"
        );
        assert!(!err.is_transient());
        assert_eq!(
            err.to_string(),
            format!(
                "hub at {url} does not speak dermedge-sync/2 (HTTP 404 at /v2/batches): upgrade the hub"
            )
        );
        assert_eq!(queue.lock().unwrap().acked_seq(), 0);
    }

    #[test]
    fn an_older_hub_without_heads_is_asked_once_an_hour_and_gets_no_new_fields() {
        // A hub that answers the one head query it gets with 404.
        let (url, fake) = fake_hub(1, |_| (404, b"not found\n".to_vec()));
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let mut client =
            SyncClient::new(SyncConfig::new(&url), &key, hub_public(), dir.path()).unwrap();
        let query = wire::HeadQuery {
            model_id: "df-mini".into(),
            embedding_dim: 16,
            have: Vec::new(),
        };
        assert!(client.fetch_heads("dev-1", &query).unwrap().is_empty());
        fake.join().unwrap();
        // Not asked again within the hour: no connection is made (the fake hub is gone).
        assert!(client.fetch_heads("dev-1", &query).unwrap().is_empty());
        assert!(!client.hub_is_current);
    }

    fn stored(seq: u64) -> Stored {
        let envelope = Envelope {
            format: ENVELOPE_FORMAT,
            id: format!("{seq:032x}"),
            captured_at_ms: 1,
            device_id: "dev-1".into(),
            sealed: Vec::new(),
        };
        Stored {
            seq,
            cbor: envelope.to_cbor(),
            envelope,
        }
    }

    fn gap(from: u64, to: u64) -> Gap {
        Gap {
            from,
            to,
            reason: GapReason::Evicted,
            at_ms: 0,
        }
    }

    #[test]
    fn batches_carry_the_gaps_before_their_last_record_or_only_gaps() {
        // Nothing waits.
        assert!(plan_batch(4, 4, Vec::new(), Vec::new(), None).is_none());
        // Records with a gap among them and one beyond them (sent later).
        let (batch, last) = plan_batch(
            4,
            20,
            vec![stored(8), stored(9)],
            vec![gap(5, 7), gap(12, 14)],
            Some(5),
        )
        .unwrap();
        assert_eq!(last, 9);
        assert_eq!(
            batch.queued_after,
            Some(3),
            "5 waiting, 2 of them in this batch"
        );
        assert_eq!(batch.last(), 9);
        assert_eq!(batch.gaps, [gap(5, 7)]);
        assert_eq!(batch.records.len(), 2);
        // Only gaps: acknowledged through the end of the last.
        let (batch, last) = plan_batch(9, 20, Vec::new(), vec![gap(12, 14)], None).unwrap();
        assert_eq!((last, batch.last(), batch.records.len()), (14, 14, 0));
        // Never past what is durable; nothing that could not move the cursor.
        let (_, last) = plan_batch(9, 13, Vec::new(), vec![gap(12, 14)], None).unwrap();
        assert_eq!(last, 13);
        assert!(plan_batch(13, 13, Vec::new(), vec![gap(12, 14)], None).is_none());
        assert!(plan_batch(9, 11, Vec::new(), vec![gap(12, 14)], None).is_none());
    }

    #[test]
    fn damaged_or_impossible_counter_state_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let config = SyncConfig::new("http://127.0.0.1:9");
        for text in ["{not json", "{\"reserved_through\":18446744073709551615}"] {
            fs::write(dir.path().join(SYNC_STATE), text).unwrap();
            let mut client =
                SyncClient::new(config.clone(), &key, hub_public(), dir.path()).unwrap();
            assert_eq!(client.take_counter().unwrap(), 1, "{text}");
        }
    }

    #[test]
    fn a_bad_hub_url_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = SyncClient::new(
            SyncConfig::new("ftp://hub"),
            &DeviceKey::generate(),
            hub_public(),
            dir.path(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("ftp://hub"), "{err}");
    }
}
