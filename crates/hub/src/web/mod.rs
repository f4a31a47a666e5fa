//! The clinicians' web page, on the hub's listener next to the device API.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /login`, `POST /login` | the sign-in form; the only page without a session |
//! | `POST /logout` | ends the session |
//! | `GET /` | records, newest first, 50 a page; filters in the query string |
//! | `GET /records/{id}` | one record, its labels and the forms to label it |
//! | `POST /records/{id}/labels` | a label from the head's classes, or free text |
//! | `GET /records/{id}/thumbnail.jpg` | the record's thumbnail |
//! | `GET /devices` | each device's sync: last batch, acknowledged sequence, losses |
//! | `GET /heads` | heads trained from the labels, their held-out scores, the training form |
//! | `POST /heads` | train a head from one label set ([`crate::heads`]); kept as a draft |
//! | `POST /heads/{id}/publish` | sign and publish a draft: devices fetch it on their next sync |
//! | `GET /export.csv` | the filtered records as CSV (the `hub export` columns, plus labels) |
//!
//! Without a valid session a page answers `303` to `/login` and a resource (thumbnail, export)
//! `401`; the sign-in page shows nothing of the records. Every `POST` carries the session's CSRF
//! token (the sign-in form a token of its own, double-submitted in a cookie) and, when the
//! browser sends `Origin` or `Referer`, must come from this hub's own origin. Every answer
//! carries a strict Content-Security-Policy (no script at all), `X-Frame-Options: DENY`,
//! `Referrer-Policy: same-origin`, `X-Content-Type-Options: nosniff` and `Cache-Control:
//! no-store`. Failed sign-ins are slowed, counted per address and per account, and lock the
//! account for a while after [`crate::store::FAILURES_BEFORE_LOCK`] in a row.

pub(crate) mod html;

pub use html::{day as utc_day, time as utc_time};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use dermedge_record::now_ms;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_TYPE, COOKIE, HOST, ORIGIN, REFERER};
use hyper::{Method, Request};
use sha2::{Digest, Sha256};

use crate::accounts;
use crate::export::{csv_writer, write_header, write_row, CsvRecord};
use crate::server::{blocking, printable, read_body, Limits, Reply, State};
use crate::store::{LoginOutcome, RecordFilter, RecordSummary, Store};
use crate::HubError;
use html::Nav;

/// The session cookie: 256 random bits, `HttpOnly; SameSite=Strict; Path=/`.
pub const SESSION_COOKIE: &str = "dermedge_session";
/// The sign-in form's own CSRF token, double-submitted (cookie and form field).
pub const LOGIN_COOKIE: &str = "dermedge_login";
/// Records on one page.
pub const PAGE_SIZE: u32 = 50;
/// The most records one CSV export from the page holds (`dermedge hub export` has no bound).
pub const MAX_EXPORT_ROWS: u64 = 100_000;
/// The longest free-text label, in characters.
pub const MAX_LABEL_CHARS: usize = 200;
/// The largest form body accepted.
const MAX_FORM_BYTES: usize = 64 << 10;
/// The longest query-string value used.
const MAX_QUERY_VALUE_CHARS: usize = 200;
/// How long a failed sign-in waits before it is answered.
const FAILED_LOGIN_DELAY: Duration = Duration::from_millis(500);
/// Failed sign-ins from one address within [`IP_WINDOW`] after which it is refused until the
/// window passes.
const IP_FAILURES: u32 = 20;
const IP_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Addresses tracked at most (the oldest are forgotten first).
const MAX_TRACKED_IPS: usize = 10_000;

/// Failed sign-ins per client address (in memory: a hub restart forgets them; the per-account
/// lock is in the database).
#[derive(Default)]
pub(crate) struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginThrottle {
    fn allowed(&self, ip: IpAddr) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        !matches!(failures.get(&ip), Some((n, since)) if *n >= IP_FAILURES && since.elapsed() < IP_WINDOW)
    }

    fn failed(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= MAX_TRACKED_IPS && !failures.contains_key(&ip) {
            failures.retain(|_, (_, since)| since.elapsed() < IP_WINDOW);
            if failures.len() >= MAX_TRACKED_IPS {
                if let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, (_, s))| *s)
                    .map(|(k, _)| *k)
                {
                    failures.remove(&oldest);
                }
            }
        }
        let entry = failures.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= IP_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    fn succeeded(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ip);
    }
}

/// The Content-Security-Policy of every page: nothing but this origin's images and forms, and
/// the page's own stylesheet by its hash; no script.
fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(html::CSS));
        format!(
            "default-src 'none'; img-src 'self'; style-src 'sha256-{hash}'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'"
        )
    })
}

/// The headers every answer of the page carries.
fn secured(reply: Reply) -> Reply {
    reply
        .with("content-security-policy", content_security_policy())
        .with("x-frame-options", "DENY")
        .with("x-content-type-options", "nosniff")
        .with("referrer-policy", "same-origin")
        .with("cache-control", "no-store")
        .with("cross-origin-opener-policy", "same-origin")
        .with("cross-origin-resource-policy", "same-origin")
}

fn page(status: u16, html: String) -> Reply {
    Reply::new(status, "text/html; charset=utf-8", html.into_bytes())
}

fn see_other(location: &str) -> Reply {
    Reply::text(303, "see other").with("location", location)
}

fn session_cookie(token: &str) -> String {
    format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/")
}

fn expired_cookie(name: &str, path: &str) -> String {
    format!("{name}=; HttpOnly; SameSite=Strict; Path={path}; Max-Age=0")
}

/// The value of cookie `name`, if the request sent it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim())
}

/// Whether a state-changing request comes from this hub's own pages: its `Origin` (or, without
/// one, its `Referer`) names the host the request was sent to. A request with neither passes
/// here (the CSRF token still decides); one with `Origin: null` does not.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let authority = |url: &str| {
        url.strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or("").to_string())
    };
    match headers.get(ORIGIN).or_else(|| headers.get(REFERER)) {
        Some(source) => source
            .to_str()
            .ok()
            .and_then(authority)
            .is_some_and(|a| a.eq_ignore_ascii_case(host)),
        None => true,
    }
}

/// A signed-in clinician's request.
struct Session {
    user: String,
    csrf: String,
}

impl Session {
    fn nav<'a>(&'a self, active: &'a str) -> Nav<'a> {
        Nav {
            user: &self.user,
            csrf: &self.csrf,
            active,
        }
    }
}

/// What a request without a valid session gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// A page: `303` to `/login`.
    Page,
    /// A thumbnail or an export: `401`.
    Resource,
}

fn unavailable(e: impl std::fmt::Display) -> Reply {
    log::error!("hub: web: {e}");
    page(
        500,
        html::message_page(
            None,
            "Error",
            "The hub cannot read its database; try again later.",
        ),
    )
}

/// Database work for a request; a failure becomes an error page.
async fn db<R: Send + 'static>(
    state: &Arc<State>,
    work: impl FnOnce(&Store) -> Result<R, HubError> + Send + 'static,
) -> Result<R, Reply> {
    match blocking(state, move |_, store| work(store)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(e) => Err(unavailable(e)),
    }
}

/// The session the request's cookie names, if it is open.
async fn session(state: &Arc<State>, headers: &HeaderMap) -> Result<Option<Session>, Reply> {
    let Some(token) = cookie(headers, SESSION_COOKIE).filter(|t| accounts::is_token(t)) else {
        return Ok(None);
    };
    let token = token.to_string();
    let policy = state.limits.sessions;
    let hash = accounts::token_hash(&token);
    let user = db(state, move |store| {
        store.session_user(&hash, now_ms(), policy)
    })
    .await?;
    Ok(user.map(|user| Session {
        user,
        csrf: accounts::csrf_token(&token),
    }))
}

/// The request's session, or the refusal for `access`.
async fn require(
    state: &Arc<State>,
    headers: &HeaderMap,
    access: Access,
) -> Result<Session, Reply> {
    match session(state, headers).await? {
        Some(s) => Ok(s),
        None if access == Access::Page => Err(see_other("/login")),
        None => Err(Reply::text(401, "sign in first")),
    }
}

/// The fields of a form body (`application/x-www-form-urlencoded`, at most 64 KiB).
async fn form(state: &State, request: Request<Incoming>) -> Result<(HeaderMap, Fields), Reply> {
    let (parts, body) = request.into_parts();
    let is_form = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(Reply::text(
            415,
            "expected a form (application/x-www-form-urlencoded)",
        ));
    }
    let limits = Limits {
        max_body_bytes: MAX_FORM_BYTES,
        ..state.limits.clone()
    };
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if declared.is_some_and(|n: u64| n > MAX_FORM_BYTES as u64) {
        return Err(Reply::text(
            413,
            format!("form over {MAX_FORM_BYTES} bytes"),
        ));
    }
    let body = read_body(body, declared, &limits, None)
        .await
        .map_err(|r| Reply::text(r.status, r.reason))?;
    Ok((
        parts.headers,
        Fields(form_urlencoded::parse(&body).into_owned().collect()),
    ))
}

/// A form's or a query string's fields.
struct Fields(Vec<(String, String)>);

impl Fields {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Refuse a form that did not come from this session's page (its CSRF token, its origin).
/// A signed-in clinician's form: the session, the request's headers and the form's fields, once
/// the session's CSRF token and the request's origin have been checked. Every `POST` but the
/// sign-in goes through here.
async fn session_form(
    state: &Arc<State>,
    request: Request<Incoming>,
) -> Result<(Session, HeaderMap, Fields), Reply> {
    let session = require(state, request.headers(), Access::Page).await?;
    let (headers, fields) = form(state, request).await?;
    check_csrf(&session, &headers, &fields)?;
    Ok((session, headers, fields))
}

fn check_csrf(session: &Session, headers: &HeaderMap, fields: &Fields) -> Result<(), Reply> {
    let token_ok = fields
        .get("csrf")
        .is_some_and(|t| accounts::same(t.as_bytes(), session.csrf.as_bytes()));
    if token_ok && same_origin(headers) {
        return Ok(());
    }
    log::warn!(
        "hub: web: a form from {} refused: {}",
        printable(&session.user, 64),
        if token_ok {
            "another origin"
        } else {
            "wrong CSRF token"
        }
    );
    Err(page(
        403,
        html::message_page(
            Some(&session.nav("")),
            "Refused",
            "This form did not come from your current page of the hub: reload the page and try again.",
        ),
    ))
}

/// The records page's query: the filter, the page number, and the values as given (for the
/// form and the links).
pub(crate) struct ListQuery {
    values: Vec<(&'static str, String)>,
    pub(crate) filter: RecordFilter,
    pub(crate) page: u64,
    /// A value that was not understood, said on the page.
    pub(crate) problem: Option<String>,
}

/// The records page's filter parameters, in the order the links write them.
const FILTER_NAMES: [&str; 7] = ["device", "from", "to", "label", "labelled", "head", "top"];

impl ListQuery {
    pub(crate) fn parse(query: Option<&str>) -> Self {
        let mut q = ListQuery {
            values: Vec::new(),
            filter: RecordFilter::default(),
            page: 1,
            problem: None,
        };
        let pairs: Vec<(String, String)> = query
            .map(|s| form_urlencoded::parse(s.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        for name in FILTER_NAMES {
            let Some(value) = pairs
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.trim())
            else {
                continue;
            };
            if value.is_empty() {
                continue;
            }
            let value: String = value.chars().take(MAX_QUERY_VALUE_CHARS).collect();
            let f = &mut q.filter;
            match name {
                "device" => f.device = Some(value.clone()),
                "from" | "to" => match html::parse_day(&value) {
                    Some(ms) if name == "from" => f.from_ms = Some(ms),
                    Some(ms) => f.until_ms = Some(ms + 86_400_000),
                    None => {
                        q.problem = Some(format!("{value:?} is not a date (YYYY-MM-DD): ignored"));
                        continue;
                    }
                },
                "label" => f.label = Some(value.clone()),
                "labelled" => match value.as_str() {
                    "yes" => f.labelled_only = true,
                    "no" => f.unlabelled_only = true,
                    _ => continue,
                },
                "head" => f.head = Some(value.clone()),
                "top" => f.top_class = Some(value.clone()),
                _ => continue,
            }
            q.values.push((name, value));
        }
        if let Some((_, page)) = pairs.iter().rev().find(|(n, _)| n == "page") {
            q.page = page.trim().parse::<u64>().unwrap_or(1).clamp(1, 1 << 40);
        }
        q
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `?name=value&…` of the filter (and `page`), or "" when there is nothing to say.
    pub(crate) fn query_string(&self, page: Option<u64>) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &self.values {
            s.append_pair(name, value);
        }
        if let Some(page) = page.filter(|&p| p > 1) {
            s.append_pair("page", &page.to_string());
        }
        let s = s.finish();
        if s.is_empty() {
            s
        } else {
            format!("?{s}")
        }
    }
}

/// Answer a request that is not the device API's: the page, with its security headers.
pub(crate) async fn route(
    state: &Arc<State>,
    remote: SocketAddr,
    request: Request<Incoming>,
) -> Reply {
    let reply = match dispatch(state, remote, request).await {
        Ok(reply) | Err(reply) => reply,
    };
    secured(reply)
}

async fn dispatch(
    state: &Arc<State>,
    remote: SocketAddr,
    request: Request<Incoming>,
) -> Result<Reply, Reply> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    match (&method, path.as_str()) {
        (&Method::GET, "/login") => login_form(state, request.headers(), None, 200).await,
        (&Method::POST, "/login") => login(state, remote, request).await,
        (&Method::POST, "/logout") => logout(state, request).await,
        (&Method::GET, "/") => records(state, &request).await,
        (&Method::GET, "/devices") => devices(state, request.headers()).await,
        (&Method::GET, "/heads") => heads(state, request.headers(), None).await,
        (&Method::POST, "/heads") => train_head(state, request).await,
        (&Method::GET, "/export.csv") => export(state, &request).await,
        (_, "/login" | "/logout" | "/" | "/devices" | "/heads" | "/export.csv") => {
            Ok(Reply::text(405, "method not allowed"))
        }
        (_, p) if p.starts_with("/records/") => {
            let rest = &p["/records/".len()..];
            let (id, what) = rest.split_once('/').unwrap_or((rest, ""));
            let id = percent_encoding::percent_decode_str(id)
                .decode_utf8()
                .map(|s| s.into_owned())
                .unwrap_or_default();
            if id.is_empty() || id.len() > 128 {
                return Ok(Reply::text(404, "not found"));
            }
            match (&method, what) {
                (&Method::GET, "") => record(state, request.headers(), id, None).await,
                (&Method::GET, "thumbnail.jpg") => thumbnail(state, request.headers(), id).await,
                (&Method::POST, "labels") => add_label(state, request, id).await,
                (_, "" | "thumbnail.jpg" | "labels") => Ok(Reply::text(405, "method not allowed")),
                _ => Ok(Reply::text(404, "not found")),
            }
        }
        (_, p) if p.starts_with("/heads/") => match p["/heads/".len()..].split_once('/') {
            Some((id, "publish")) => match id.parse::<i64>() {
                Ok(id) if method == Method::POST => publish_head(state, request, id).await,
                Ok(_) => Ok(Reply::text(405, "method not allowed")),
                Err(_) => Ok(Reply::text(404, "not found")),
            },
            _ => Ok(Reply::text(404, "not found")),
        },
        _ => Ok(Reply::text(404, "not found")),
    }
}

/// The sign-in form, with a new sign-in token in its cookie; a signed-in browser goes to `/`.
async fn login_form(
    state: &Arc<State>,
    headers: &HeaderMap,
    note: Option<&str>,
    status: u16,
) -> Result<Reply, Reply> {
    if status == 200 && session(state, headers).await?.is_some() {
        return Ok(see_other("/"));
    }
    let token = accounts::new_token().map_err(unavailable)?;
    Ok(page(status, html::login_page(note, &token)).with(
        "set-cookie",
        format!("{LOGIN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/login; Max-Age=3600"),
    ))
}

const LOGIN_REFUSED: &str =
    "Wrong name or password, or too many failed attempts: wait a few minutes and try again.";

async fn login(
    state: &Arc<State>,
    remote: SocketAddr,
    request: Request<Incoming>,
) -> Result<Reply, Reply> {
    let (headers, fields) = form(state, request).await?;
    let form_token = fields.get("csrf").unwrap_or("");
    let cookie_token = cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if !same_origin(&headers)
        || cookie_token.is_empty()
        || !accounts::same(form_token.as_bytes(), cookie_token.as_bytes())
    {
        log::warn!("hub: web: a sign-in from {remote} refused: its form token or origin is not this page's");
        return login_form(
            state,
            &headers,
            Some("The sign-in form had expired: please sign in again."),
            403,
        )
        .await;
    }
    let ip = remote.ip();
    if !state.logins.allowed(ip) {
        log::warn!("hub: web: sign-in from {remote} refused: too many failures from this address");
        return login_form(state, &headers, Some(LOGIN_REFUSED), 429).await;
    }
    let name = fields.get("name").unwrap_or("").to_string();
    let password = fields.get("password").unwrap_or("").to_string();
    let policy = state.limits.sessions;
    let shown = printable(&name, 64);
    // A session this browser had already is ended: a sign-in always starts a new one.
    let previous = cookie(&headers, SESSION_COOKIE)
        .filter(|t| accounts::is_token(t))
        .map(accounts::token_hash);
    let outcome = db(state, move |store| {
        let now = now_ms();
        match store.login(&name, &password, now)? {
            LoginOutcome::Ok => {
                if let Some(previous) = previous {
                    store.close_session(&previous)?;
                }
                let token = accounts::new_token()?;
                store.open_session(&name, &accounts::token_hash(&token), now, policy)?;
                Ok(Ok(token))
            }
            refused => Ok(Err(refused)),
        }
    })
    .await?;
    match outcome {
        Ok(token) => {
            state.logins.succeeded(ip);
            log::info!("hub: web: {shown} signed in from {remote}");
            Ok(see_other("/")
                .with("set-cookie", session_cookie(&token))
                .with("set-cookie", expired_cookie(LOGIN_COOKIE, "/login")))
        }
        Err(refused) => {
            state.logins.failed(ip);
            log::warn!("hub: web: sign-in as {shown:?} from {remote} refused: {refused:?}");
            tokio::time::sleep(FAILED_LOGIN_DELAY).await;
            login_form(state, &headers, Some(LOGIN_REFUSED), 401).await
        }
    }
}

async fn logout(state: &Arc<State>, request: Request<Incoming>) -> Result<Reply, Reply> {
    let (session, headers, _) = session_form(state, request).await?;
    let token = cookie(&headers, SESSION_COOKIE).unwrap_or("").to_string();
    let hash = accounts::token_hash(&token);
    db(state, move |store| store.close_session(&hash)).await?;
    log::info!("hub: web: {} signed out", printable(&session.user, 64));
    Ok(see_other("/login").with("set-cookie", expired_cookie(SESSION_COOKIE, "/")))
}

async fn records(state: &Arc<State>, request: &Request<Incoming>) -> Result<Reply, Reply> {
    let session = require(state, request.headers(), Access::Page).await?;
    let query = ListQuery::parse(request.uri().query());
    let filter = query.filter.clone();
    let offset = (query.page - 1).saturating_mul(u64::from(PAGE_SIZE));
    let (records, devices, head_results) = db(state, move |store| {
        Ok((
            store.record_page(&filter, PAGE_SIZE, offset)?,
            store.device_ids()?,
            store.head_results()?,
        ))
    })
    .await?;
    let view = html::RecordsView {
        query: &query,
        page: &records,
        page_size: PAGE_SIZE,
        devices: &devices,
        head_results: &head_results,
    };
    Ok(page(200, html::records_page(&session.nav("/"), &view)))
}

async fn devices(state: &Arc<State>, headers: &HeaderMap) -> Result<Reply, Reply> {
    let session = require(state, headers, Access::Page).await?;
    let now = now_ms();
    let devices = db(state, move |store| store.device_health(now - 86_400_000)).await?;
    Ok(page(
        200,
        html::devices_page(&session.nav("/devices"), &devices, now),
    ))
}

/// The heads page; `note`: a refusal of the last form, with its status.
async fn heads(
    state: &Arc<State>,
    headers: &HeaderMap,
    note: Option<(u16, String)>,
) -> Result<Reply, Reply> {
    let session = require(state, headers, Access::Page).await?;
    let (heads, label_sets) = db(state, |store| Ok((store.heads()?, store.label_sets()?))).await?;
    let (status, message) = note.map_or((200, None), |(status, m)| (status, Some(m)));
    let view = html::HeadsView {
        heads: &heads,
        label_sets: &label_sets,
        message: message.as_deref(),
    };
    Ok(page(
        status,
        html::heads_page(&session.nav("/heads"), &view),
    ))
}

/// A refusal of a heads form is shown on the page; any other failure is an error page.
async fn head_work<R: Send + 'static>(
    state: &Arc<State>,
    work: impl FnOnce(&State, &Store) -> Result<R, HubError> + Send + 'static,
) -> Result<Result<R, String>, Reply> {
    match blocking(state, move |state, store| work(state, store)).await {
        Ok(Ok(r)) => Ok(Ok(r)),
        Ok(Err(HubError::BadRequest(why))) => Ok(Err(why)),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(e) => Err(unavailable(e)),
    }
}

/// `POST /heads`: train a head from the label set the form names.
async fn train_head(state: &Arc<State>, request: Request<Incoming>) -> Result<Reply, Reply> {
    let (session, headers, fields) = session_form(state, request).await?;
    let name = fields.get("name").unwrap_or("").trim().to_string();
    let set: Option<(String, Option<String>)> = fields
        .get("label_set")
        .and_then(|v| serde_json::from_str(v).ok());
    let Some((model_id, label_set)) = set else {
        let why = "choose the labels to train on".to_string();
        return heads(state, &headers, Some((400, why))).await;
    };
    let request = crate::heads::TrainRequest {
        name,
        model_id,
        label_set,
    };
    // One training at a time, and not on a database thread: a large set takes minutes of CPU.
    let Ok(_training) = state.training.try_acquire() else {
        let why = "a head is being trained: try again when it is done".to_string();
        return heads(state, &headers, Some((409, why))).await;
    };
    let load = request.clone();
    let records = match head_work(state, move |_, store| {
        crate::heads::load_training_set(store, &load)
    })
    .await?
    {
        Ok(r) => r,
        Err(why) => return heads(state, &headers, Some((400, why))).await,
    };
    let train = request.clone();
    let trained =
        tokio::task::spawn_blocking(move || crate::heads::train_and_score(&train, records))
            .await
            .map_err(|e| unavailable(format!("the training failed: {e}")))?;
    let (head, evaluation) = match trained {
        Ok(t) => t,
        Err(HubError::BadRequest(why)) => return heads(state, &headers, Some((400, why))).await,
        Err(e) => return Err(unavailable(e)),
    };
    let by = session.user.clone();
    let kept = head_work(state, move |state, store| {
        crate::heads::keep_draft(
            store,
            &state.hub_key,
            &request,
            &head,
            &evaluation,
            &by,
            now_ms(),
        )
    })
    .await?;
    match kept {
        Ok(id) => Ok(see_other(&format!("/heads#head-{id}"))),
        Err(why) => heads(state, &headers, Some((400, why))).await,
    }
}

/// `POST /heads/{id}/publish`: sign a draft with the hub key; devices fetch it on their next sync.
async fn publish_head(
    state: &Arc<State>,
    request: Request<Incoming>,
    id: i64,
) -> Result<Reply, Reply> {
    let (session, headers, _) = session_form(state, request).await?;
    let by = session.user.clone();
    let published = head_work(state, move |state, store| {
        crate::heads::publish(store, &state.hub_key, id, &by, now_ms())
    })
    .await?;
    match published {
        Ok(_) => Ok(see_other(&format!("/heads#head-{id}"))),
        Err(why) => heads(state, &headers, Some((400, why))).await,
    }
}

/// `head: label; …` of a record's current labels, for the CSV.
fn labels_cell(record: &RecordSummary) -> String {
    record
        .labels
        .iter()
        .map(|l| format!("{}: {}", l.head.as_deref().unwrap_or("record"), l.label))
        .collect::<Vec<_>>()
        .join("; ")
}

async fn export(state: &Arc<State>, request: &Request<Incoming>) -> Result<Reply, Reply> {
    let session = require(state, request.headers(), Access::Resource).await?;
    let query = ListQuery::parse(request.uri().query());
    let filter = query.filter.clone();
    let records = db(state, move |store| {
        store.filtered_records(&filter, MAX_EXPORT_ROWS)
    })
    .await?;
    let Some(records) = records else {
        return Ok(Reply::text(
            413,
            format!(
                "more than {MAX_EXPORT_ROWS} records match: narrow the filters, or run \
                 `dermedge hub export` on the hub machine"
            ),
        ));
    };
    let mut out = csv_writer(Vec::new());
    let written = write_header(&mut out, &["labels"]).and_then(|()| {
        records.iter().try_for_each(|r| {
            let row = CsvRecord {
                record_id: &r.record_id,
                device_id: &r.device_id,
                epoch: r.epoch,
                seq: r.seq,
                captured_at_ms: r.captured_at_ms,
                model_id: &r.model_id,
                precision: &r.precision,
                embedding_dim: r.embedding_dim,
                source: r.source.as_deref(),
                quality_ok: r.quality.as_ref().map(|q| q.acceptable),
                heads: &r.heads,
            };
            write_row(&mut out, &row, &[labels_cell(r)])
        })
    });
    let body = written
        .map_err(|e| e.to_string())
        .and_then(|()| out.into_inner().map_err(|e| e.to_string()))
        .map_err(unavailable)?;
    log::info!(
        "hub: web: {} exported {} records",
        printable(&session.user, 64),
        records.len()
    );
    Ok(Reply::new(200, "text/csv; charset=utf-8", body).with(
        "content-disposition",
        "attachment; filename=\"dermedge-records.csv\"",
    ))
}

async fn record(
    state: &Arc<State>,
    headers: &HeaderMap,
    id: String,
    note: Option<(u16, String)>,
) -> Result<Reply, Reply> {
    let session = require(state, headers, Access::Page).await?;
    let found = db(state, move |store| {
        Ok(match store.record_summary(&id)? {
            Some(r) => {
                let history = store.labels(&id)?;
                Some((r, history))
            }
            None => None,
        })
    })
    .await?;
    let Some((record, history)) = found else {
        return Ok(page(
            404,
            html::message_page(
                Some(&session.nav("")),
                "Not found",
                "There is no such record.",
            ),
        ));
    };
    let (status, note) = note.map_or((200, None), |(s, n)| (s, Some(n)));
    Ok(page(
        status,
        html::record_page(&session.nav(""), &record, &history, note.as_deref()),
    ))
}

async fn thumbnail(state: &Arc<State>, headers: &HeaderMap, id: String) -> Result<Reply, Reply> {
    require(state, headers, Access::Resource).await?;
    match db(state, move |store| store.thumbnail(&id)).await? {
        Some(jpeg) => Ok(Reply::new(200, "image/jpeg", jpeg)),
        None => Ok(Reply::text(404, "no thumbnail")),
    }
}

/// The label a form asks for, checked against the record: `(head, label)`.
fn label_from_form(
    record: &RecordSummary,
    fields: &Fields,
) -> Result<(Option<String>, String), String> {
    let head = fields.get("head").unwrap_or("").trim();
    let head = if head.is_empty() {
        None
    } else {
        Some(
            record
                .heads
                .iter()
                .find(|h| h.head == head)
                .ok_or_else(|| format!("this record has no head {head:?}"))?,
        )
    };
    let label = fields.get("label").unwrap_or("").trim();
    match fields.get("kind") {
        Some("class") => {
            let head = head.ok_or("a label from a head's classes needs the head")?;
            if !head.classes.iter().any(|c| c == label) {
                return Err(format!("{label:?} is not a class of head {:?}", head.head));
            }
        }
        Some("text") => {
            let n = label.chars().count();
            if n == 0 || n > MAX_LABEL_CHARS || label.chars().any(char::is_control) {
                return Err(format!(
                    "a label is 1 to {MAX_LABEL_CHARS} characters, without control characters"
                ));
            }
        }
        _ => return Err("the form names no kind of label".into()),
    }
    Ok((head.map(|h| h.head.clone()), label.to_string()))
}

async fn add_label(
    state: &Arc<State>,
    request: Request<Incoming>,
    id: String,
) -> Result<Reply, Reply> {
    let (session, headers, fields) = session_form(state, request).await?;
    let lookup = id.clone();
    let Some(found) = db(state, move |store| store.record_summary(&lookup)).await? else {
        return Ok(page(
            404,
            html::message_page(
                Some(&session.nav("")),
                "Not found",
                "There is no such record.",
            ),
        ));
    };
    let (head, label) = match label_from_form(&found, &fields) {
        Ok(l) => l,
        Err(why) => return record(state, &headers, id, Some((400, why))).await,
    };
    let author = session.user.clone();
    let record_id = id.clone();
    db(state, move |store| {
        store.add_label(&record_id, head.as_deref(), &label, &author, now_ms())
    })
    .await?;
    Ok(see_other(&format!("{}#labels", html::record_url(&id))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let h = headers(&[
            ("cookie", "a=1; dermedge_session_x=2"),
            ("cookie", "dermedge_session=abc ; b=3"),
        ]);
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("3"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn only_this_hosts_origin_passes() {
        let host = ("host", "hub.local:8787");
        assert!(same_origin(&headers(&[host])));
        assert!(same_origin(&headers(&[
            host,
            ("origin", "http://hub.local:8787")
        ])));
        assert!(same_origin(&headers(&[
            host,
            ("referer", "http://hub.local:8787/records/x?y")
        ])));
        for (name, bad) in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("origin", "http://hub.local:8787.evil.example"),
            ("referer", "http://evil.example/http://hub.local:8787/"),
        ] {
            assert!(
                !same_origin(&headers(&[host, (name, bad)])),
                "{name}: {bad}"
            );
        }
        assert!(!same_origin(&headers(&[])), "no Host");
    }

    #[test]
    fn the_list_query_keeps_what_it_understood() {
        let q = ListQuery::parse(Some(
            "device=dev-1&from=2026-09-21&to=2026-09-22&labelled=no&head=kind&top=a+b&page=3&x=1",
        ));
        assert_eq!(q.filter.device.as_deref(), Some("dev-1"));
        assert_eq!(q.filter.from_ms, Some(1_789_948_800_000));
        assert_eq!(q.filter.until_ms, Some(1_789_948_800_000 + 2 * 86_400_000));
        assert!(q.filter.unlabelled_only && !q.filter.labelled_only);
        assert_eq!(q.filter.top_class.as_deref(), Some("a b"));
        assert_eq!(q.page, 3);
        assert_eq!(
            q.query_string(Some(4)),
            "?device=dev-1&from=2026-09-21&to=2026-09-22&labelled=no&head=kind&top=a+b&page=4"
        );
        let bad = ListQuery::parse(Some("from=yesterday&page=-2"));
        assert!(bad.problem.is_some());
        assert_eq!((bad.filter.from_ms, bad.page), (None, 1));
        assert_eq!(bad.query_string(None), "");
    }

    #[test]
    fn the_policy_allows_no_script_and_only_the_pages_stylesheet() {
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"));
    }
}
