//! The HTTP side: `POST /v2/batches` (signed batches in, signed acks out), `POST /v2/heads`
//! (published heads out) and `GET /v1/health`; every other path is the clinicians' web page
//! ([`crate::web`]).
//!
//! hyper (HTTP/1.1 only) on a tokio runtime of its own. Every connection is bounded: headers must
//! arrive within [`Limits::header_timeout`] and fit in [`Limits::max_header_bytes`], a body must
//! keep arriving (no pause over [`Limits::body_idle_timeout`], an average of at least
//! [`Limits::min_body_bytes_per_s`]) and fit in [`Limits::max_body_bytes`], and at most
//! [`Limits::max_connections`] are open at once, [`Limits::max_connections_per_address`] from
//! one address. A handheld that loses power mid-upload leaves a
//! stalled connection; these bounds close it, and health checks are answered meanwhile. The
//! device's identity is checked from the headers, before any of the body is read. Database work
//! runs on blocking threads, each with a connection from a small pool (never on the threads that
//! drive the connections: the PostgreSQL client blocks on a runtime of its own).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dermedge_record::{DevicePublic, Envelope, HubKey};
use dermedge_sync::wire::{self, Ack, Conflict, OpenError};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{watch, Semaphore};

use crate::store::{Location, SessionPolicy, Store, Stored, VerifiedBatch};
use crate::HubError;

/// The one answer to a request the hub cannot authenticate, whatever the reason (an unknown,
/// revoked or not re-enrolled device, or a bad signature), so that it does not tell which device
/// ids exist or what became of them; the reason goes to the `rejections` log.
pub const UNAUTHENTICATED: &str = "unauthenticated request";

/// The largest sequence number the hub stores (SQLite and PostgreSQL integers are signed).
const MAX_SEQ: u64 = i64::MAX as u64;

/// The path of protocol `dermedge-sync/1`, answered with a pointer to the upgrade.
/// The most head bytes one answer to a head query carries (the device reads up to twice this).
const MAX_HEAD_OFFER_BYTES: usize = 16 << 20;
const V1_BATCH_PATH: &str = "/v1/batches";

/// The largest request body accepted: a device's batch is at most 2 MiB by default (records of
/// at most 1 MiB); a bound well above that keeps what unauthenticated bodies can pin in memory
/// small (the signature is checked once the body is in).
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// The longest device id accepted in a request header.
pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// How much of a device-written string the rejections log and the log lines keep.
const LOGGED_FIELD_CHARS: usize = 96;

/// Idle database connections kept for reuse.
const POOLED_STORES: usize = 8;

/// Database connections in use at once: more requests wait for one (a PostgreSQL server shared
/// by several hubs has a bounded number of connections).
const MAX_STORES: usize = 16;

/// What one connection may take from the hub.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From the connection's first byte (or the end of its previous request) to the end of the
    /// request's headers; an idle keep-alive connection is closed after it too.
    pub header_timeout: Duration,
    /// The request line and headers together.
    pub max_header_bytes: usize,
    /// The longest pause between two pieces of a body.
    pub body_idle_timeout: Duration,
    /// A body must arrive within `body_grace + length / min_body_bytes_per_s`.
    pub body_grace: Duration,
    pub min_body_bytes_per_s: u64,
    pub max_body_bytes: usize,
    /// Device request bodies being read or handled at once, in bytes all together (each counted
    /// at the memory it holds so far, claimed as it arrives): a body is read before its signature
    /// is checked, and without this bound every open connection could hold `max_body_bytes`. A
    /// request that would go over it is answered `503` (the device retries).
    pub max_body_bytes_in_flight: usize,
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Connections open at once from one address, so that one client (or one clinic's NAT gone
    /// wrong) cannot take every slot; more from it are closed as they arrive.
    pub max_connections_per_address: usize,
    /// TCP keepalive: a peer that vanished (power cut, lost Wi-Fi) is noticed after this idle
    /// time plus a few probes.
    pub tcp_keepalive: Duration,
    /// Keep each record's `source` as the device wrote it (a full input path can name a
    /// patient) instead of its file name alone.
    pub keep_source_paths: bool,
    /// Rejections written to the database per second, and the burst allowed; the rest are
    /// counted and summarised.
    pub rejections_per_s: f64,
    pub rejections_burst: f64,
    /// How long a clinician's session on the web page lasts.
    pub sessions: SessionPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 16 << 10,
            body_idle_timeout: Duration::from_secs(20),
            body_grace: Duration::from_secs(20),
            // 128 kbit/s: a poor rural uplink still gets a full batch through.
            min_body_bytes_per_s: 16 << 10,
            max_body_bytes: MAX_BODY_BYTES,
            max_body_bytes_in_flight: 256 << 20,
            max_connections: 512,
            max_connections_per_address: 64,
            tcp_keepalive: Duration::from_secs(30),
            keep_source_paths: false,
            rejections_per_s: 5.0,
            rejections_burst: 50.0,
            sessions: SessionPolicy::default(),
        }
    }
}

impl Limits {
    fn body_deadline(&self, length: u64) -> Duration {
        let per_s = self.min_body_bytes_per_s.max(1);
        self.body_grace + Duration::from_secs(length / per_s)
    }
}

pub struct HubServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Listen on `listen` (`host:port`; port 0 picks a free one) with `workers` threads and the
    /// default [`Limits`]; `hub_key` opens the records and signs the replies. `db`: an SQLite
    /// path or a [`Location`]. Called from a plain thread, not from asynchronous code (the
    /// PostgreSQL client blocks).
    pub fn start(
        db: impl Into<Location>,
        hub_key: HubKey,
        listen: &str,
        workers: usize,
    ) -> Result<Self, HubError> {
        Self::start_with(db, hub_key, listen, workers, Limits::default())
    }

    pub fn start_with(
        db: impl Into<Location>,
        hub_key: HubKey,
        listen: &str,
        workers: usize,
        limits: Limits,
    ) -> Result<Self, HubError> {
        Self::start_listener(db, hub_key, listen, workers, limits, None)
    }

    /// [`HubServer::start_with`], speaking TLS (HTTPS) with the certificate and key in `tls`.
    pub fn start_tls(
        db: impl Into<Location>,
        hub_key: HubKey,
        listen: &str,
        workers: usize,
        limits: Limits,
        tls: &crate::tls::TlsFiles,
    ) -> Result<Self, HubError> {
        let config = crate::tls::server_config(tls)?;
        Self::start_listener(db, hub_key, listen, workers, limits, Some(config))
    }

    fn start_listener(
        db: impl Into<Location>,
        hub_key: HubKey,
        listen: &str,
        workers: usize,
        limits: Limits,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self, HubError> {
        let listen_err = |message: String| HubError::Listen {
            addr: listen.into(),
            message,
        };
        let db: Location = db.into();
        // Open once up front so that a bad database path or URL fails here, clearly.
        let stores = Stores::new(&db, Store::connect(&db)?);
        let listener =
            std::net::TcpListener::bind(listen).map_err(|e| listen_err(e.to_string()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| listen_err(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| listen_err(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("hub")
            .enable_all()
            .build()
            .map_err(|e| listen_err(format!("cannot start the server's threads: {e}")))?;
        let https = tls.is_some();
        log::info!(
            "hub listening on {}://{addr} (database {db}, {})",
            if tls.is_some() { "https" } else { "http" },
            hub_key.public()
        );
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        // Never below one whole body: a request the budget could never admit would be retried
        // for ever.
        let limits_budget_kib = limits
            .max_body_bytes_in_flight
            .max(limits.max_body_bytes)
            .div_ceil(1024)
            .max(1);
        let state = Arc::new(State {
            stores,
            rejections: RejectionLog::new(limits.rejections_per_s, limits.rejections_burst),
            logins: crate::web::LoginThrottle::default(),
            hub_key,
            limits,
            https,
            health_store: Mutex::new(None),
            training: Semaphore::new(1),
            body_budget: Arc::new(Semaphore::new(
                limits_budget_kib.min(Semaphore::MAX_PERMITS),
            )),
            busy_refusals: std::sync::atomic::AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("hub-accept".into())
            .spawn(move || {
                // Held until the runtime is down, so that the connections are closed here and
                // not on a thread that drives tasks (a PostgreSQL client cannot be dropped there).
                let held = state.clone();
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, tls, state, stopped).await,
                        Err(e) => log::error!("hub: cannot listen on {addr}: {e}"),
                    }
                });
                // Requests still on blocking threads finish their transaction first.
                runtime.shutdown_timeout(Duration::from_secs(10));
                drop(held);
            })
            .map_err(|e| listen_err(format!("cannot start the server's thread: {e}")))?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, finish the requests in progress (for up to a few seconds), and return.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

pub(crate) struct State {
    stores: Stores,
    rejections: RejectionLog,
    /// Failed web logins per address.
    pub(crate) logins: crate::web::LoginThrottle,
    pub(crate) hub_key: HubKey,
    /// One head is trained at a time, off the database's threads (`crate::heads`).
    pub(crate) training: Semaphore,
    /// [`Limits::max_body_bytes_in_flight`], in KiB.
    body_budget: Arc<Semaphore>,
    /// Requests answered `503` for the budget, for a log line at powers of two.
    busy_refusals: std::sync::atomic::AtomicU64,
    pub(crate) limits: Limits,
    /// Served over TLS: cookies are marked `Secure`.
    https: bool,
    /// `/v1/health`'s own database connection (see [`health`]).
    health_store: Mutex<Option<Store>>,
}

/// Database connections for blocking threads: one is taken for a piece of work and put back
/// (unless it was lost: a PostgreSQL server that restarted); at most [`MAX_STORES`] at once.
struct Stores {
    db: Location,
    idle: Mutex<Vec<Store>>,
    in_use: Arc<Semaphore>,
}

impl Stores {
    fn new(db: &Location, first: Store) -> Self {
        Self {
            db: db.clone(),
            idle: Mutex::new(vec![first]),
            in_use: Arc::new(Semaphore::new(MAX_STORES)),
        }
    }

    fn with<R>(&self, work: impl FnOnce(&mut Store) -> R) -> Result<R, HubError> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut store = match pooled {
            Some(s) if !s.is_broken() => s,
            Some(_) => {
                log::warn!("hub: {}: a lost database connection replaced", self.db);
                Store::connect(&self.db)?
            }
            None => Store::connect(&self.db)?,
        };
        let result = work(&mut store);
        if store.is_broken() {
            return Ok(result);
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < POOLED_STORES {
            idle.push(store);
        }
        Ok(result)
    }
}

/// Run database work on a blocking thread with a pooled connection.
pub(crate) async fn blocking<R: Send + 'static>(
    state: &Arc<State>,
    work: impl FnOnce(&State, &mut Store) -> R + Send + 'static,
) -> Result<R, String> {
    let state = state.clone();
    let Ok(permit) = state.stores.in_use.clone().acquire_owned().await else {
        return Err("the hub is shutting down".into());
    };
    let work = move || {
        let _permit = permit;
        state.stores.with(|store| work(&state, store))
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("the request's worker failed: {e}")),
    }
}

/// The `rejections` table, written at a bounded rate with bounded fields, so that refused
/// requests cannot fill the disk or the log.
struct RejectionLog {
    per_s: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
    last_summary: Instant,
}

impl RejectionLog {
    fn new(per_s: f64, burst: f64) -> Self {
        let now = Instant::now();
        Self {
            per_s,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: now,
                suppressed: 0,
                last_summary: now,
            }),
        }
    }

    /// Whether this rejection may be written; a suppressed one is counted and summarised.
    fn admit(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.tokens =
            (b.tokens + now.duration_since(b.last).as_secs_f64() * self.per_s).min(self.burst);
        b.last = now;
        if b.suppressed > 0 && now.duration_since(b.last_summary) >= Duration::from_secs(1) {
            log::warn!(
                "hub: {} rejections were not logged (over {}/s)",
                b.suppressed,
                self.per_s
            );
            b.suppressed = 0;
            b.last_summary = now;
        }
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            b.suppressed += 1;
            false
        }
    }

    fn log(
        &self,
        store: &Store,
        remote: SocketAddr,
        device: Option<&str>,
        status: u16,
        reason: &str,
    ) {
        if self.admit() {
            self.write(store, remote, device, status, reason);
        }
    }

    /// Write one rejection the rate limit has admitted.
    fn write(
        &self,
        store: &Store,
        remote: SocketAddr,
        device: Option<&str>,
        status: u16,
        reason: &str,
    ) {
        let device = device.map(|d| printable(d, LOGGED_FIELD_CHARS));
        let reason = printable(reason, 4 * LOGGED_FIELD_CHARS);
        log::warn!(
            "hub: rejected status={status} remote={remote} device={} reason={reason}",
            device.as_deref().unwrap_or("-")
        );
        store.log_rejection(
            Some(&remote.to_string()),
            device.as_deref(),
            status,
            &reason,
        );
    }
}

/// `text` cut to `max` characters with control characters escaped, fit for a log line or a cell.
pub(crate) fn printable(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(state.limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut refused_at_cap: u64 = 0;
    let per_address = Arc::new(PerAddress::default());
    let mut refused_per_address: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                log::warn!("hub: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused_at_cap += 1;
            if refused_at_cap.is_power_of_two() {
                log::warn!(
                    "hub: {} connections open, the limit: {refused_at_cap} refused so far",
                    state.limits.max_connections
                );
            }
            drop(stream);
            continue;
        };
        let Some(address_slot) = per_address.take(
            client_address(remote.ip()),
            state.limits.max_connections_per_address,
        ) else {
            refused_per_address += 1;
            if refused_per_address.is_power_of_two() {
                log::warn!(
                    "hub: {} connections open from {}, the limit for one address: \
                     {refused_per_address} refused so far",
                    state.limits.max_connections_per_address,
                    remote.ip()
                );
            }
            drop(stream);
            continue;
        };
        let slot = (slot, address_slot);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(state.limits.tcp_keepalive)
            .with_interval(Duration::from_secs(10));
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            log::debug!("hub: no TCP keepalive for {remote}: {e}");
        }
        let _ = stream.set_nodelay(true);
        let conn_state = state.clone();
        let service = service_fn(move |request| {
            let state = conn_state.clone();
            async move { Ok::<_, Infallible>(route(state, remote, request).await) }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(state.limits.header_timeout)
            .max_buf_size(state.limits.max_header_bytes.max(8192))
            // A client may close its sending side and wait for the answer.
            .half_close(true)
            .keep_alive(true);
        let Some(tls) = &tls else {
            let connection =
                graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    log::debug!("hub: connection from {remote} ended: {e}");
                }
                drop(slot);
            });
            continue;
        };
        // The handshake runs in the connection's task, bounded like a request's headers, so a
        // client that stalls in it holds only its own slot.
        let (tls, watcher, handshake_timeout) =
            (tls.clone(), graceful.watcher(), state.limits.header_timeout);
        tokio::spawn(async move {
            match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let connection =
                        watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
                    if let Err(e) = connection.await {
                        log::debug!("hub: TLS connection from {remote} ended: {e}");
                    }
                }
                Ok(Err(e)) => log::debug!("hub: TLS handshake with {remote} failed: {e}"),
                Err(_) => log::debug!("hub: TLS handshake with {remote} timed out"),
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        log::warn!("hub: stopped with requests still in progress");
    }
}

/// The address a connection counts against: an IPv4 address, or an IPv6 address's /64 (one
/// host is usually handed a whole /64, and could otherwise open a cap's worth from each).
fn client_address(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Connections open per remote address.
#[derive(Default)]
struct PerAddress(Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One open connection from `ip`; counted until dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An answer: status, body, its type, and any further headers (lower-case names).
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
    pub(crate) content_type: &'static str,
    pub(crate) headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub(crate) fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Self {
            status,
            body,
            content_type,
            headers: Vec::new(),
        }
    }

    pub(crate) fn text(status: u16, message: impl Into<String>) -> Self {
        Self::new(
            status,
            "text/plain; charset=utf-8",
            format!("{}\n", message.into()).into_bytes(),
        )
    }

    /// Add a header (several of one name are all sent: `set-cookie`).
    pub(crate) fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn json(status: u16, value: &impl serde::Serialize) -> Self {
        Self::new(
            status,
            "application/json",
            serde_json::to_vec(value).expect("serialisable"),
        )
    }

    fn signed(status: u16, body: Vec<u8>) -> Self {
        Self::new(status, "application/octet-stream", body)
    }

    /// Over TLS, every cookie is sent with `Secure`: a browser never returns it over plain HTTP.
    fn secure_cookies(mut self) -> Self {
        for (name, value) in &mut self.headers {
            if *name == "set-cookie" {
                value.push_str("; Secure");
            }
        }
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(self.content_type),
        );
        for (name, value) in self.headers {
            match hyper::header::HeaderValue::from_str(&value) {
                Ok(value) => {
                    headers.append(name, value);
                }
                Err(e) => log::error!("hub: header {name} not sent: {e}"),
            }
        }
        response
    }
}

async fn route(
    state: Arc<State>,
    remote: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = printable(request.uri().path(), LOGGED_FIELD_CHARS);
    let reply = match (&method, request.uri().path()) {
        (&Method::POST, wire::BATCH_PATH) => batch(&state, remote, request).await,
        (&Method::POST, wire::HEADS_PATH) => heads(&state, remote, request).await,
        (&Method::GET, wire::HEALTH_PATH) => health(&state).await,
        (_, wire::BATCH_PATH | wire::HEADS_PATH | wire::HEALTH_PATH) => {
            Reply::text(405, "method not allowed")
        }
        (_, V1_BATCH_PATH) => Reply::text(
            404,
            format!(
                "this hub speaks {} (POST {}): upgrade the device",
                wire::PROTOCOL,
                wire::BATCH_PATH
            ),
        ),
        // The clinicians' web page: everything else.
        _ => crate::web::route(&state, remote, request).await,
    };
    // Health checks and the pages' reads (a page of records loads fifty thumbnails) at debug.
    let quiet = (path == wire::HEALTH_PATH && reply.status == 200)
        || (method == Method::GET && reply.status < 400 && !path.starts_with("/v"));
    let level = if quiet {
        log::Level::Debug
    } else {
        log::Level::Info
    };
    log::log!(
        level,
        "hub: request method={method} path={path} status={} remote={remote} ms={}",
        reply.status,
        started.elapsed().as_millis()
    );
    if state.https {
        reply.secure_cookies().into_response()
    } else {
        reply.into_response()
    }
}

async fn health(state: &Arc<State>) -> Reply {
    let state = state.clone();
    // Health has a connection of its own, outside the pool's limit: with every pooled connection
    // waiting on the writer behind a hundred devices' batches, it still answers at once (a
    // reader is not blocked by the writer on either backend).
    let counts = tokio::task::spawn_blocking(move || {
        let mut slot = state.health_store.lock().unwrap_or_else(|p| p.into_inner());
        let store = match slot.take() {
            Some(store) if !store.is_broken() => store,
            _ => Store::connect(&state.stores.db).map_err(|e| e.to_string())?,
        };
        let counts = store.totals().map_err(|e| e.to_string());
        if !store.is_broken() {
            *slot = Some(store);
        }
        counts
    })
    .await
    .map_err(|e| format!("the health check's worker failed: {e}"))
    .and_then(|r| r);
    match counts {
        // Totals only: anyone on the LAN may ask, and device ids are not theirs to list
        // (`dermedge hub status` shows each device on the hub machine).
        Ok((records, gaps, devices)) => Reply::json(
            200,
            &serde_json::json!({
                "status": "ok",
                "protocol": wire::PROTOCOL,
                "records": records,
                "gaps": gaps,
                "devices": devices,
            }),
        ),
        Err(e) => {
            log::error!("hub: health: {e}");
            Reply::text(500, "the hub cannot read its database")
        }
    }
}

/// Why a request was refused before its body was read or stored.
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: String,
    /// Logged with this reason, answered with [`UNAUTHENTICATED`].
    unauthenticated: bool,
    /// Already admitted by the rejections log's rate limit.
    admitted: bool,
}

impl Refusal {
    fn bad(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            unauthenticated: false,
            admitted: false,
        }
    }

    fn unauthenticated(reason: impl Into<String>) -> Self {
        Self {
            status: 401,
            reason: reason.into(),
            unauthenticated: true,
            admitted: false,
        }
    }

    fn log_and_answer(
        self,
        state: &State,
        store: &Store,
        remote: SocketAddr,
        device: Option<&str>,
    ) -> Reply {
        if self.admitted || state.rejections.admit() {
            state
                .rejections
                .write(store, remote, device, self.status, &self.reason);
        }
        if self.unauthenticated {
            Reply::text(401, UNAUTHENTICATED)
        } else {
            Reply::text(self.status, self.reason)
        }
    }
}

async fn refuse(
    state: &Arc<State>,
    remote: SocketAddr,
    device: Option<String>,
    refusal: Refusal,
) -> Reply {
    let status = refusal.status;
    let fallback = if refusal.unauthenticated {
        UNAUTHENTICATED.to_string()
    } else {
        refusal.reason.clone()
    };
    // Over the log's rate, the answer needs no database (and no blocking thread) at all.
    if !state.rejections.admit() {
        return Reply::text(status, fallback);
    }
    let refusal = Refusal {
        admitted: true,
        ..refusal
    };
    blocking(state, move |state, store| {
        refusal.log_and_answer(state, store, remote, device.as_deref())
    })
    .await
    .unwrap_or_else(|_| Reply::text(status, fallback))
}

/// The device id and request counter from the headers.
fn identify(headers: &HeaderMap) -> Result<(String, u64), (Option<String>, Refusal)> {
    let device = match headers.get(wire::DEVICE_HEADER).map(|v| v.to_str()) {
        None => {
            return Err((
                None,
                Refusal::bad(400, format!("missing {} header", wire::DEVICE_HEADER)),
            ))
        }
        Some(Err(_)) => {
            return Err((
                None,
                Refusal::bad(
                    400,
                    format!("{}: expected printable ASCII", wire::DEVICE_HEADER),
                ),
            ))
        }
        Some(Ok(d)) => d.to_owned(),
    };
    if device.is_empty() || device.len() > MAX_DEVICE_ID_BYTES {
        return Err((
            Some(device),
            Refusal::bad(
                400,
                format!(
                    "{}: expected 1 to {MAX_DEVICE_ID_BYTES} bytes",
                    wire::DEVICE_HEADER
                ),
            ),
        ));
    }
    let counter = headers
        .get(wire::COUNTER_HEADER)
        .and_then(|c| c.to_str().ok())
        .and_then(|c| c.parse::<u64>().ok());
    let Some(counter) = counter else {
        return Err((
            Some(device),
            Refusal::bad(
                400,
                format!("missing or non-numeric {} header", wire::COUNTER_HEADER),
            ),
        ));
    };
    Ok((device, counter))
}

/// A request from an enrolled device: its id, counter, public key and body. The device is
/// looked up from the headers alone, so an unknown or revoked one is refused before a byte of
/// its body is read.
struct DeviceRequest {
    device: String,
    counter: u64,
    public: DevicePublic,
    body: Vec<u8>,
    /// Its share of [`Limits::max_body_bytes_in_flight`], held until the request is answered.
    _claim: BodyClaim,
}

async fn device_request(
    state: &Arc<State>,
    remote: SocketAddr,
    request: Request<Incoming>,
) -> Result<DeviceRequest, Reply> {
    let (device, counter) = match identify(request.headers()) {
        Ok(found) => found,
        Err((device, refusal)) => return Err(refuse(state, remote, device, refusal).await),
    };
    let max_body = state.limits.max_body_bytes;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        let refusal = Refusal::bad(413, format!("body over {max_body} bytes"));
        return Err(refuse(state, remote, Some(device), refusal).await);
    }
    let lookup = {
        let device = device.clone();
        blocking(state, move |_, store| store.device(&device)).await
    };
    let public = match lookup {
        Ok(Ok(Some(known))) => match (known.revoked_at_ms, known.public) {
            (Some(at), _) => Err(Refusal::unauthenticated(format!(
                "device revoked (at {at} ms)"
            ))),
            (None, None) => Err(Refusal::unauthenticated(
                "enrolled with the old shared-key scheme: re-enroll",
            )),
            (None, Some(public)) => Ok(public),
        },
        Ok(Ok(None)) => Err(Refusal::unauthenticated("unknown device")),
        Ok(Err(e)) => {
            log::error!("hub: {e}");
            return Err(Reply::text(
                500,
                "the hub cannot read its database; retry later",
            ));
        }
        Err(e) => {
            log::error!("hub: {e}");
            return Err(Reply::text(
                500,
                "the hub cannot read its database; retry later",
            ));
        }
    };
    let public = match public {
        Ok(p) => p,
        Err(refusal) => return Err(refuse(state, remote, Some(device), refusal).await),
    };
    let mut claim = BodyClaim::new(state.body_budget.clone());
    match read_body(
        request.into_body(),
        declared,
        &state.limits,
        Some(&mut claim),
    )
    .await
    {
        Ok(body) => Ok(DeviceRequest {
            device,
            counter,
            public,
            body,
            _claim: claim,
        }),
        Err(refusal) if refusal.status == 503 => {
            drop(claim);
            let refused = state.busy_refusals.fetch_add(1, Ordering::Relaxed) + 1;
            if refused.is_power_of_two() {
                log::warn!(
                    "hub: bodies in flight at the limit ({} bytes): {refused} requests answered \
                     503 so far, the last from {device}",
                    state.limits.max_body_bytes_in_flight
                );
            }
            Err(Reply::text(503, refusal.reason).with("retry-after", "5"))
        }
        Err(refusal) => {
            drop(claim);
            Err(refuse(state, remote, Some(device), refusal).await)
        }
    }
}

/// The memory a device request's body holds, claimed from
/// [`Limits::max_body_bytes_in_flight`] as its buffer grows (whole KiB of capacity) and given
/// back when dropped.
pub(crate) struct BodyClaim {
    budget: Arc<Semaphore>,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
    kib: u32,
}

impl BodyClaim {
    fn new(budget: Arc<Semaphore>) -> Self {
        Self {
            budget,
            held: None,
            kib: 0,
        }
    }

    /// Claim up to `bytes` in all; `false` when the budget has no room for it.
    fn cover(&mut self, bytes: usize) -> bool {
        let Ok(want) = u32::try_from(bytes.div_ceil(1024)) else {
            return false;
        };
        if want <= self.kib {
            return true;
        }
        match self.budget.clone().try_acquire_many_owned(want - self.kib) {
            Ok(more) => {
                match &mut self.held {
                    Some(held) => held.merge(more),
                    None => self.held = Some(more),
                }
                self.kib = want;
                true
            }
            Err(_) => false,
        }
    }
}

async fn batch(state: &Arc<State>, remote: SocketAddr, request: Request<Incoming>) -> Reply {
    let r = match device_request(state, remote, request).await {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    blocking(state, move |state, store| {
        store_verified(
            state, store, remote, &r.device, &r.public, r.counter, &r.body,
        )
    })
    .await
    .unwrap_or_else(|e| {
        log::error!("hub: {e}");
        Reply::text(500, "the hub could not store the batch; retry later")
    })
}

/// `POST /v2/heads`: the published heads for the device's model that it does not hold yet.
async fn heads(state: &Arc<State>, remote: SocketAddr, request: Request<Incoming>) -> Reply {
    let r = match device_request(state, remote, request).await {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    blocking(state, move |state, store| {
        offer_heads(state, store, remote, &r)
    })
    .await
    .unwrap_or_else(|e| {
        log::error!("hub: {e}");
        Reply::text(500, "the hub cannot read its heads; retry later")
    })
}

fn offer_heads(state: &State, store: &mut Store, remote: SocketAddr, r: &DeviceRequest) -> Reply {
    let refuse = |refusal: Refusal| refusal.log_and_answer(state, store, remote, Some(&r.device));
    let query = match wire::open_head_query(&r.public, &r.device, r.counter, &r.body) {
        Ok(q) => q,
        Err(OpenError::Unauthenticated) => return refuse(Refusal::unauthenticated(
            "bad signature: the head query is not signed with this device's key for this counter",
        )),
        Err(OpenError::Malformed(m)) => {
            return refuse(Refusal::bad(400, format!("malformed head query: {m}")))
        }
    };
    let Ok(dim) = i64::try_from(query.embedding_dim) else {
        return refuse(Refusal::bad(400, "embedding_dim out of range"));
    };
    let wanted = |name: &str, version: u64| {
        query
            .have
            .iter()
            .find(|h| h.name == name)
            .is_none_or(|h| version > h.version)
    };
    let newer = match store.publications(&query.model_id, dim, wanted, MAX_HEAD_OFFER_BYTES) {
        Ok(p) => p,
        Err(e) => {
            log::error!("hub: {e}");
            return Reply::text(500, "the hub cannot read its heads; retry later");
        }
    };
    for p in &newer {
        log::info!(
            "hub: {} gets head {} v{} for {}",
            r.device,
            p.name,
            p.version,
            query.model_id
        );
    }
    let offer = wire::HeadOffer {
        heads: newer
            .into_iter()
            .map(|p| serde_bytes::ByteBuf::from(p.signed))
            .collect(),
    };
    let mut body = Vec::new();
    ciborium::into_writer(&offer, &mut body).expect("serialisable");
    Reply::new(200, "application/cbor", body)
}

/// The body, as long as it keeps arriving fast enough and stays within the limit (and, with a
/// `claim`, within the budget of bodies in flight: `503` otherwise).
pub(crate) async fn read_body(
    mut body: Incoming,
    declared: Option<u64>,
    limits: &Limits,
    mut claim: Option<&mut BodyClaim>,
) -> Result<Vec<u8>, Refusal> {
    let max = limits.max_body_bytes;
    let started = tokio::time::Instant::now();
    let expected = declared.unwrap_or(max as u64).min(max as u64) as usize;
    let deadline = started + limits.body_deadline(expected as u64);
    let rate = limits.min_body_bytes_per_s.max(1) as f64;
    let busy = || Refusal::bad(503, "the hub is receiving too much at once; retry later");
    let mut out: Vec<u8> = Vec::new();
    loop {
        let pause_ends = tokio::time::Instant::now() + limits.body_idle_timeout;
        // The average rate so far must stay above the minimum once the grace time is over, so
        // a slow drip is cut off early, not at the end of what its length allows.
        let behind = started + limits.body_grace + Duration::from_secs_f64(out.len() as f64 / rate);
        let frame =
            tokio::time::timeout_at(deadline.min(pause_ends).min(behind), body.frame()).await;
        match frame {
            Err(_) => {
                return Err(Refusal::bad(
                    408,
                    format!(
                        "the body stalled: {} bytes in, expected {}",
                        out.len(),
                        declared.map_or("more".into(), |n| n.to_string())
                    ),
                ))
            }
            Ok(None) => return Ok(out),
            Ok(Some(Err(e))) => {
                return Err(Refusal::bad(400, format!("cannot read the body: {e}")))
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    let needed = out.len() + data.len();
                    if needed > max {
                        return Err(Refusal::bad(413, format!("body over {max} bytes")));
                    }
                    if needed > out.capacity() {
                        // Doubling, but never past the declared length: what the buffer holds
                        // is at most twice what arrived, and is claimed before it is taken.
                        let capacity = needed.max(out.capacity() * 2).min(expected).max(needed);
                        if let Some(claim) = claim.as_deref_mut() {
                            if !claim.cover(capacity) {
                                return Err(busy());
                            }
                        }
                        out.reserve_exact(capacity - out.len());
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Verify, open and store a batch from an enrolled device; runs on a blocking thread.
fn store_verified(
    state: &State,
    store: &mut Store,
    remote: SocketAddr,
    device: &str,
    public: &DevicePublic,
    counter: u64,
    body: &[u8],
) -> Reply {
    let hub_key = &state.hub_key;
    let refuse = |store: &Store, refusal: Refusal| {
        refusal.log_and_answer(state, store, remote, Some(device))
    };
    let batch = match wire::open_batch(public, device, counter, body) {
        Ok(b) => b,
        Err(OpenError::Unauthenticated) => return refuse(
            store,
            Refusal::unauthenticated(
                "bad signature: the batch is not signed with this device's key for this counter",
            ),
        ),
        Err(OpenError::Malformed(m)) => {
            return refuse(store, Refusal::bad(400, format!("malformed batch: {m}")))
        }
    };
    let (records, refused) = match open_records(hub_key, device, &batch) {
        Ok(r) => r,
        Err(reason) => return refuse(store, Refusal::bad(400, reason)),
    };

    let conflict = |conflict: Conflict| {
        Reply::signed(
            409,
            wire::seal_conflict(hub_key, device, counter, body, &conflict),
        )
    };
    match store.store_batch(&VerifiedBatch {
        device_id: device,
        public,
        counter,
        after_seq: batch.after_seq,
        records: &records,
        gaps: &batch.gaps,
        refused: &refused,
        keep_source_paths: state.limits.keep_source_paths,
        queued_after: batch.queued_after,
    }) {
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
            for (seq, why) in &refused {
                log::warn!("hub: {device} record {seq} refused and kept as a loss: {why}");
            }
            let ack = Ack {
                counter,
                acked_through: highest_seq,
                stored,
                duplicates,
            };
            Reply::signed(200, wire::seal_ack(hub_key, device, body, &ack))
        }
        Ok(Stored::Replayed { last_counter }) => {
            let reason = format!(
                "replayed request: counter {counter} is not above the last one seen ({last_counter})"
            );
            state
                .rejections
                .log(store, remote, Some(device), 409, &reason);
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
            state
                .rejections
                .log(store, remote, Some(device), 409, &reason);
            conflict(Conflict {
                error: reason,
                hub_highest_seq: Some(highest_seq),
                hub_last_counter: None,
            })
        }
        Ok(Stored::KeyChanged) => refuse(
            store,
            Refusal::unauthenticated(
                "the device was revoked or enrolled with another key while the batch was verified",
            ),
        ),
        Err(HubError::BadRequest(m)) => refuse(store, Refusal::bad(400, m)),
        Err(e) => {
            log::error!("hub: {e}");
            Reply::text(500, "the hub could not store the batch; retry later")
        }
    }
}

/// Opened records, and refused ones with the reason.
type Opened = (Vec<(u64, dermedge_record::Record)>, Vec<(u64, String)>);

/// The batch's records, opened with the hub key, after the checks that need no database: rising
/// sequence numbers after `after_seq`, well-formed gaps, envelopes from the sender that open.
/// A record that opens but whose fields the hub will not store ([`crate::validate`]) is set
/// aside with its reason; the rest of the batch is stored.
fn open_records(hub_key: &HubKey, device: &str, batch: &wire::Batch) -> Result<Opened, String> {
    for gap in &batch.gaps {
        if gap.from == 0 || gap.from > gap.to || gap.to > MAX_SEQ {
            return Err(format!(
                "gap {}..={}: expected 1 <= from <= to <= {MAX_SEQ}",
                gap.from, gap.to
            ));
        }
    }
    let mut records = Vec::with_capacity(batch.records.len());
    let mut refused = Vec::new();
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
        // The batch is the device's (its signature verified): a record in it that cannot be
        // read, opened or stored is that device's loss, reported, and the queue moves on; a
        // refused batch would be sent again for ever.
        let opened = Envelope::from_cbor(&r.cbor)
            .map_err(|e| format!("not an envelope: {e}"))
            .and_then(|envelope| {
                if envelope.device_id != device {
                    return Err(format!(
                        "an envelope of device {}, the request is from {device}",
                        envelope.device_id
                    ));
                }
                let record = envelope
                    .open(hub_key)
                    .map_err(|e| format!("the sealed record {e}"))?;
                if record.device_id != device {
                    return Err(format!(
                        "the sealed record names device {}, the request is from {device}",
                        record.device_id
                    ));
                }
                Ok(record)
            });
        match opened.map(|record| (crate::validate::refusal(&record), record)) {
            Ok((None, record)) => records.push((r.seq, record)),
            Ok((Some(why), _)) | Err(why) => refused.push((r.seq, why)),
        }
    }
    Ok((records, refused))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn printable_escapes_controls_and_cuts() {
        assert_eq!(printable("dev\n1", 10), "dev\\n1");
        assert_eq!(printable("abcdef", 3), "abc…");
        assert_eq!(printable("", 3), "");
    }

    #[test]
    fn body_deadline_grows_with_the_length() {
        let limits = Limits::default();
        assert_eq!(limits.body_deadline(0), limits.body_grace);
        assert_eq!(
            limits.body_deadline(64 << 20),
            limits.body_grace + Duration::from_secs(4096)
        );
    }
}
