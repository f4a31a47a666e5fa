//! The HTTP side: `POST /v2/batches` (signed batches in, signed acks out) and `GET /v1/health`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use dermedge_queue::{Envelope, HubKey};
use dermedge_sync::wire::{self, Ack, Conflict, OpenError};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::store::{Store, Stored};
use crate::HubError;

/// The one answer to a request the hub cannot authenticate, whatever the reason (an unknown,
/// revoked or not re-enrolled device, or a bad signature), so that it does not tell which device
/// ids exist or what became of them; the reason goes to the `rejections` log.
pub const UNAUTHENTICATED: &str = "unauthenticated request";

/// The largest sequence number the hub stores (SQLite integers are signed).
const MAX_SEQ: u64 = i64::MAX as u64;

/// The path of protocol `dermedge-sync/1`, answered with a pointer to the upgrade.
const V1_BATCH_PATH: &str = "/v1/batches";

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 << 20;

pub struct HubServer {
    server: Arc<Server>,
    workers: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl HubServer {
    /// Listen on `listen` (`host:port`; port 0 picks a free one) with `workers` threads, each
    /// with its own connection to the database at `db`; `hub_key` opens the records and signs
    /// the replies.
    pub fn start(
        db: &Path,
        hub_key: HubKey,
        listen: &str,
        workers: usize,
    ) -> Result<Self, HubError> {
        // Open once up front so that a bad database path fails here, clearly.
        Store::open(db)?;
        let server = Server::http(listen).map_err(|e| HubError::Listen {
            addr: listen.into(),
            message: e.to_string(),
        })?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| HubError::Listen {
                addr: listen.into(),
                message: "not an IP address".into(),
            })?;
        let server = Arc::new(server);
        let hub_key = Arc::new(hub_key);
        let workers = (0..workers.max(1))
            .map(|i| {
                let server = server.clone();
                let hub_key = hub_key.clone();
                let db: PathBuf = db.into();
                std::thread::Builder::new()
                    .name(format!("hub-{i}"))
                    .spawn(move || worker(&server, &db, &hub_key))
                    .expect("spawn a hub worker")
            })
            .collect();
        log::info!(
            "hub listening on http://{addr} (database {}, {})",
            db.display(),
            hub_key.public()
        );
        Ok(Self {
            server,
            workers,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, finish the requests in progress, and return.
    pub fn shutdown(self) {
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers {
            let _ = w.join();
        }
    }
}

fn worker(server: &Server, db: &Path, hub_key: &HubKey) {
    let mut store = match Store::open(db) {
        Ok(s) => s,
        Err(e) => {
            log::error!("hub worker cannot open the database: {e}");
            return;
        }
    };
    while let Ok(request) = server.recv() {
        handle(&mut store, hub_key, request);
    }
}

struct Reply {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
}

impl Reply {
    fn text(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: format!("{}\n", message.into()).into_bytes(),
            content_type: "text/plain; charset=utf-8",
        }
    }

    fn json(status: u16, value: &impl serde::Serialize) -> Self {
        Self {
            status,
            body: serde_json::to_vec(value).expect("serialisable"),
            content_type: "application/json",
        }
    }
}

fn handle(store: &mut Store, hub_key: &HubKey, mut request: Request) {
    let remote = request.remote_addr().map(|a| a.to_string());
    let reply = match (request.method(), request.url()) {
        (Method::Post, wire::BATCH_PATH) => batch(store, hub_key, &mut request, remote.as_deref()),
        (Method::Get, wire::HEALTH_PATH) => health(store),
        (_, wire::BATCH_PATH) | (_, wire::HEALTH_PATH) => Reply::text(405, "method not allowed"),
        (_, V1_BATCH_PATH) => Reply::text(
            404,
            format!(
                "this hub speaks {} (POST {}): upgrade the device",
                wire::PROTOCOL,
                wire::BATCH_PATH
            ),
        ),
        _ => Reply::text(404, "not found"),
    };
    let response = Response::from_data(reply.body)
        .with_status_code(reply.status)
        .with_header(
            Header::from_bytes(&b"Content-Type"[..], reply.content_type.as_bytes())
                .expect("valid header"),
        );
    if let Err(e) = request.respond(response) {
        log::warn!("hub: could not answer {}: {e}", remote.unwrap_or_default());
    }
}

fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

fn health(store: &Store) -> Reply {
    match store
        .record_count()
        .and_then(|n| Ok((n, store.summaries()?)))
    {
        // Totals only: anyone on the LAN may ask, and device ids are not theirs to list
        // (`dermedge hub status` shows each device on the hub machine).
        Ok((records, devices)) => Reply::json(
            200,
            &serde_json::json!({
                "status": "ok",
                "protocol": wire::PROTOCOL,
                "records": records,
                "gaps": devices.iter().map(|d| d.gaps).sum::<u64>(),
                "devices": devices.len(),
            }),
        ),
        Err(e) => Reply::text(500, e.to_string()),
    }
}

fn signed(status: u16, body: Vec<u8>) -> Reply {
    Reply {
        status,
        body,
        content_type: "application/octet-stream",
    }
}

fn batch(
    store: &mut Store,
    hub_key: &HubKey,
    request: &mut Request,
    remote: Option<&str>,
) -> Reply {
    let device = header(request, wire::DEVICE_HEADER).map(String::from);
    let reject = |store: &Store, status: u16, device: Option<&str>, reason: String| {
        log::warn!(
            "hub: rejected a batch from {} (device {}): {reason}",
            remote.unwrap_or("?"),
            device.unwrap_or("?")
        );
        store.log_rejection(remote, device, status, &reason);
        Reply::text(status, reason)
    };
    // Logged with its reason; answered with the one text that tells nothing.
    let unauthenticated = |store: &Store, device: &str, reason: &str| {
        log::warn!(
            "hub: refused a batch from {} (device {device}): {reason}",
            remote.unwrap_or("?")
        );
        store.log_rejection(remote, Some(device), 401, reason);
        Reply::text(401, UNAUTHENTICATED)
    };
    let Some(device) = device else {
        return reject(
            store,
            400,
            None,
            format!("missing {} header", wire::DEVICE_HEADER),
        );
    };
    let Some(counter) = header(request, wire::COUNTER_HEADER).and_then(|c| c.parse::<u64>().ok())
    else {
        return reject(
            store,
            400,
            Some(&device),
            format!("missing or non-numeric {} header", wire::COUNTER_HEADER),
        );
    };
    if request.body_length().is_some_and(|n| n > MAX_BODY_BYTES) {
        return reject(
            store,
            413,
            Some(&device),
            format!("body over {MAX_BODY_BYTES} bytes"),
        );
    }
    let mut body = Vec::new();
    if let Err(e) = request
        .as_reader()
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut body)
    {
        return Reply::text(400, format!("cannot read the body: {e}"));
    }
    if body.len() > MAX_BODY_BYTES {
        return reject(
            store,
            413,
            Some(&device),
            format!("body over {MAX_BODY_BYTES} bytes"),
        );
    }
    let known = match store.device(&device) {
        Ok(Some(d)) => d,
        Ok(None) => return unauthenticated(store, &device, "unknown device"),
        Err(e) => return Reply::text(500, e.to_string()),
    };
    if let Some(at) = known.revoked_at_ms {
        return unauthenticated(store, &device, &format!("device revoked (at {at} ms)"));
    }
    let Some(public) = known.public else {
        return unauthenticated(
            store,
            &device,
            "enrolled with the old shared-key scheme: re-enroll",
        );
    };
    let batch =
        match wire::open_batch(&public, &device, counter, &body) {
            Ok(b) => b,
            Err(OpenError::Unauthenticated) => return unauthenticated(
                store,
                &device,
                "bad signature: the batch is not signed with this device's key for this counter",
            ),
            Err(OpenError::Malformed(m)) => {
                return reject(store, 400, Some(&device), format!("malformed batch: {m}"))
            }
        };
    let records = match open_records(hub_key, &device, &batch) {
        Ok(r) => r,
        Err(reason) => return reject(store, 400, Some(&device), reason),
    };
    let conflict = |conflict: Conflict| {
        signed(
            409,
            wire::seal_conflict(hub_key, &device, counter, &body, &conflict),
        )
    };
    match store.store_batch(
        &device,
        &public,
        counter,
        batch.after_seq,
        &records,
        &batch.gaps,
    ) {
        Ok(Stored::Ok {
            stored,
            duplicates,
            gaps,
            highest_seq,
        }) => {
            log::info!(
                "hub: {device} request {counter}: stored {stored}, {duplicates} duplicates, \
                 {gaps} new gaps, through {highest_seq}"
            );
            for gap in &batch.gaps {
                log::warn!("hub: {device} reports {gap}");
            }
            let ack = Ack {
                counter,
                acked_through: highest_seq,
                stored,
                duplicates,
            };
            signed(200, wire::seal_ack(hub_key, &device, &body, &ack))
        }
        Ok(Stored::Replayed { last_counter }) => {
            let reason = format!(
                "replayed request: counter {counter} is not above the last one seen ({last_counter})"
            );
            log::warn!(
                "hub: rejected a batch from {} (device {device}): {reason}",
                remote.unwrap_or("?")
            );
            store.log_rejection(remote, Some(&device), 409, &reason);
            conflict(Conflict {
                error: reason,
                hub_highest_seq: None,
                hub_last_counter: Some(last_counter),
            })
        }
        Ok(Stored::Behind { highest_seq }) => {
            let reason = format!(
                "the batch follows record {}, the hub holds this device's records only through {highest_seq}",
                batch.after_seq
            );
            store.log_rejection(remote, Some(&device), 409, &reason);
            conflict(Conflict {
                error: reason,
                hub_highest_seq: Some(highest_seq),
                hub_last_counter: None,
            })
        }
        Ok(Stored::KeyChanged) => unauthenticated(
            store,
            &device,
            "the device was revoked or enrolled with another key while the batch was verified",
        ),
        Err(HubError::BadRequest(m)) => reject(store, 400, Some(&device), m),
        Err(e) => {
            log::error!("hub: {e}");
            Reply::text(500, "the hub could not store the batch; retry later")
        }
    }
}

/// The batch's records, opened with the hub key, after the checks that need no database: rising
/// sequence numbers after `after_seq`, well-formed gaps, envelopes from the sender that open.
fn open_records(
    hub_key: &HubKey,
    device: &str,
    batch: &wire::Batch,
) -> Result<Vec<(u64, dermedge_queue::Record)>, String> {
    for gap in &batch.gaps {
        if gap.from == 0 || gap.from > gap.to || gap.to > MAX_SEQ {
            return Err(format!(
                "gap {}..={}: expected 1 <= from <= to <= {MAX_SEQ}",
                gap.from, gap.to
            ));
        }
    }
    let mut records = Vec::with_capacity(batch.records.len());
    let mut prev = batch.after_seq;
    for r in &batch.records {
        if r.seq > MAX_SEQ {
            return Err(format!("record {}: above {MAX_SEQ}", r.seq));
        }
        if r.seq <= prev {
            return Err(format!(
                "record {} follows {prev}: sequence numbers must rise",
                r.seq
            ));
        }
        prev = r.seq;
        let envelope =
            Envelope::from_cbor(&r.cbor).map_err(|e| format!("record {}: {e}", r.seq))?;
        if envelope.device_id != device {
            return Err(format!(
                "record {} is an envelope of device {}, the request is from {device}",
                r.seq, envelope.device_id
            ));
        }
        let record = envelope
            .open(hub_key)
            .map_err(|e| format!("record {}: {e}", r.seq))?;
        records.push((r.seq, record));
    }
    Ok(records)
}
