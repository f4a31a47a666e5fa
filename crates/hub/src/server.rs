//! The HTTP side: `POST /v1/batches` (sealed batches in, sealed acks out) and `GET /v1/health`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use dermedge_queue::Record;
use dermedge_sync::wire::{self, Ack, Conflict, OpenError};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::store::{Store, Stored};
use crate::HubError;

/// The one answer to a request the hub cannot authenticate, whatever the reason (an unknown
/// device or a bad seal), so that it does not tell which device ids exist.
const UNAUTHENTICATED: &str = "unauthenticated request";

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 << 20;

pub struct HubServer {
    server: Arc<Server>,
    workers: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl HubServer {
    /// Listen on `listen` (`host:port`; port 0 picks a free one) with `workers` threads, each
    /// with its own connection to the database at `db`.
    pub fn start(db: &Path, listen: &str, workers: usize) -> Result<Self, HubError> {
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
        let workers = (0..workers.max(1))
            .map(|i| {
                let server = server.clone();
                let db: PathBuf = db.into();
                std::thread::Builder::new()
                    .name(format!("hub-{i}"))
                    .spawn(move || worker(&server, &db))
                    .expect("spawn a hub worker")
            })
            .collect();
        log::info!("hub listening on http://{addr} (database {})", db.display());
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

fn worker(server: &Server, db: &Path) {
    let mut store = match Store::open(db) {
        Ok(s) => s,
        Err(e) => {
            log::error!("hub worker cannot open the database: {e}");
            return;
        }
    };
    while let Ok(request) = server.recv() {
        handle(&mut store, request);
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

fn handle(store: &mut Store, mut request: Request) {
    let remote = request.remote_addr().map(|a| a.to_string());
    let reply = match (request.method(), request.url()) {
        (Method::Post, wire::BATCH_PATH) => batch(store, &mut request, remote.as_deref()),
        (Method::Get, wire::HEALTH_PATH) => match store.record_count() {
            Ok(n) => Reply::json(200, &serde_json::json!({"status": "ok", "records": n})),
            Err(e) => Reply::text(500, e.to_string()),
        },
        (_, wire::BATCH_PATH) | (_, wire::HEALTH_PATH) => Reply::text(405, "method not allowed"),
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

fn batch(store: &mut Store, request: &mut Request, remote: Option<&str>) -> Reply {
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
        Ok(None) => {
            store.log_rejection(remote, Some(&device), 401, "unknown device");
            return Reply::text(401, UNAUTHENTICATED);
        }
        Err(e) => return Reply::text(500, e.to_string()),
    };
    let batch = match wire::open_batch(&known.sync_key, &device, counter, &body) {
        Ok(b) => b,
        Err(OpenError::Unauthenticated) => {
            store.log_rejection(
                remote,
                Some(&device),
                401,
                "bad signature: the batch is not sealed with this device's key for this counter",
            );
            return Reply::text(401, UNAUTHENTICATED);
        }
        Err(OpenError::Malformed(m)) => {
            return reject(store, 400, Some(&device), format!("malformed batch: {m}"))
        }
    };
    let mut records = Vec::with_capacity(batch.records.len());
    let mut prev = batch.after_seq;
    for r in batch.records {
        if r.seq <= prev {
            return reject(
                store,
                400,
                Some(&device),
                format!(
                    "record {} follows {prev}: sequence numbers must rise",
                    r.seq
                ),
            );
        }
        prev = r.seq;
        match Record::from_cbor(&r.cbor) {
            Ok(record) => records.push((r.seq, record, r.cbor)),
            Err(e) => return reject(store, 400, Some(&device), format!("record {}: {e}", r.seq)),
        }
    }
    match store.store_batch(&device, counter, batch.after_seq, &records) {
        Ok(Stored::Ok {
            stored,
            duplicates,
            highest_seq,
        }) => {
            log::info!(
                "hub: {device} request {counter}: stored {stored}, {duplicates} duplicates, through {highest_seq}"
            );
            let ack = Ack {
                counter,
                acked_through: highest_seq,
                stored,
                duplicates,
            };
            Reply {
                status: 200,
                body: wire::seal_ack(&known.sync_key, &device, &ack),
                content_type: "application/octet-stream",
            }
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
            Reply {
                status: 409,
                body: wire::seal_conflict(
                    &known.sync_key,
                    &device,
                    counter,
                    &Conflict {
                        error: reason,
                        hub_highest_seq: None,
                        hub_last_counter: Some(last_counter),
                    },
                ),
                content_type: "application/octet-stream",
            }
        }
        Ok(Stored::Gap { highest_seq }) => {
            let reason = format!(
                "the batch follows record {}, the hub holds this device's records only through {highest_seq}",
                batch.after_seq
            );
            store.log_rejection(remote, Some(&device), 409, &reason);
            Reply {
                status: 409,
                body: wire::seal_conflict(
                    &known.sync_key,
                    &device,
                    counter,
                    &Conflict {
                        error: reason,
                        hub_highest_seq: Some(highest_seq),
                        hub_last_counter: None,
                    },
                ),
                content_type: "application/octet-stream",
            }
        }
        Err(HubError::BadRequest(m)) => reject(store, 400, Some(&device), m),
        Err(e) => {
            log::error!("hub: {e}");
            Reply::text(500, "the hub could not store the batch; retry later")
        }
    }
}
