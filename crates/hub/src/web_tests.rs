//! The clinicians' web page over loopback HTTP, without a browser (`tests/browser.rs` drives a
//! real one): sign-in, sessions, CSRF, refusals without a session, escaping of device-written
//! strings, the export; and the page's queries on both backends ([`on_both_backends!`]).

use std::collections::BTreeMap;

use dermedge_queue::{Gap, GapReason};
use dermedge_record::{
    new_record_id, DeviceKey, EmbeddingType, Envelope, HeadResult, HubKey, QualityResult, Record,
    StoredEmbedding, RECORD_FORMAT,
};
use dermedge_sync::wire;

use crate::server::{HubServer, Limits};
use crate::store::{LoginOutcome, RecordFilter, SessionPolicy, Store};
use crate::test_db::{on_both_backends, Backend, TestDb};
use crate::web::{LOGIN_COOKIE, SESSION_COOKIE};

on_both_backends!(
    filters_return_the_right_records,
    labels_keep_their_history_and_the_newest_is_current,
    sessions_expire_and_end_on_logout_in_the_store,
    failed_logins_lock_the_account_for_a_while,
    device_health_counts_losses_by_reason_and_the_last_batch,
);

const PASSWORD: &str = "a long clinic password";
/// 2026-09-21 00:00 UTC.
const DAY: i64 = 1_789_948_800_000;
const HOUR: i64 = 3_600_000;

/// A record captured `at_ms`, with a `kind` head whose top class is `top`.
fn record(device: &str, at_ms: i64, top: &str) -> Record {
    let classes = vec![
        "nevus".to_string(),
        "melanoma".to_string(),
        "other".to_string(),
    ];
    let probabilities = classes
        .iter()
        .map(|c| if c == top { 0.8 } else { 0.1 })
        .collect();
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: at_ms,
        device_id: device.into(),
        model_id: "df-mini".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&[1.0, 2.0, 3.0], EmbeddingType::F32),
        heads: vec![HeadResult {
            head: "kind".into(),
            classes,
            probabilities,
            version: None,
        }],
        quality: Some(QualityResult {
            acceptable: true,
            reasons: Vec::new(),
            metrics: BTreeMap::from([("sharpness".to_string(), 0.9)]),
        }),
        source: Some("img.png".into()),
        thumbnail_jpeg: Some(vec![0xFF, 0xD8, 0xFF, 0xD9]),
    }
}

/// A hub with enrolled devices, and what it takes to send them batches.
struct Hub {
    hub: HubServer,
    hub_key: HubKey,
    keys: Vec<(String, DeviceKey)>,
    counters: std::cell::RefCell<BTreeMap<String, (u64, u64)>>,
    db: TestDb,
}

impl Hub {
    fn new(backend: Backend, devices: &[&str]) -> Self {
        Self::with(backend, devices, Limits::default())
    }

    fn with(backend: Backend, devices: &[&str], limits: Limits) -> Self {
        let db = TestDb::new(backend);
        let store = db.open();
        let keys: Vec<(String, DeviceKey)> = devices
            .iter()
            .map(|d| {
                let key = DeviceKey::generate();
                store.enroll(d, &key.public()).unwrap();
                (d.to_string(), key)
            })
            .collect();
        store.add_user("dr.ada", PASSWORD).unwrap();
        let hub_key = HubKey::generate();
        let hub =
            HubServer::start_with(&db.location, hub_key.clone(), "127.0.0.1:0", 2, limits).unwrap();
        Hub {
            hub,
            hub_key,
            keys,
            counters: Default::default(),
            db,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.hub.addr())
    }

    /// Send `records` (and `gaps`) from `device` in one signed batch through the device API.
    fn send(&self, device: &str, records: &[Record], gaps: &[Gap]) {
        let key = &self.keys.iter().find(|(d, _)| d == device).unwrap().1;
        let mut counters = self.counters.borrow_mut();
        let (counter, seq) = counters.entry(device.into()).or_insert((0, 0));
        *counter += 1;
        let after_seq = *seq;
        let mut batch_records = Vec::new();
        let mut next = after_seq;
        for r in records {
            next += 1;
            while gaps.iter().any(|g| g.covers(next)) {
                next += 1;
            }
            batch_records.push(wire::BatchRecord {
                seq: next,
                cbor: Envelope::seal(r, &self.hub_key.public()).to_cbor(),
            });
        }
        let batch = wire::Batch {
            queued_after: None,
            after_seq,
            records: batch_records,
            gaps: gaps.to_vec(),
        };
        *seq = batch.last();
        let body = wire::seal_batch(key, device, *counter, &batch);
        let response = ureq::post(&self.url(wire::BATCH_PATH))
            .set(wire::DEVICE_HEADER, device)
            .set(wire::COUNTER_HEADER, &counter.to_string())
            .send_bytes(&body)
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

/// An answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value a `set-cookie` header gives `name`.
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == "set-cookie")
            .filter_map(|(_, v)| v.split(';').next()?.split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a csrf field")
            + 19;
        self.body[at..].split('"').next().unwrap().to_string()
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().redirects(0).build()
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> Answer {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let headers = response
        .headers_names()
        .into_iter()
        .flat_map(|n| {
            response
                .all(&n)
                .into_iter()
                .map(|v| (n.to_lowercase(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let status = response.status();
    let body = response.into_string().unwrap_or_default();
    Answer {
        status,
        headers,
        body,
    }
}

fn get(url: &str, cookie: Option<&str>) -> Answer {
    let mut request = agent().get(url);
    if let Some(c) = cookie {
        request = request.set("Cookie", c);
    }
    answer(request.call())
}

fn post(url: &str, cookie: Option<&str>, extra: &[(&str, &str)], form: &[(&str, &str)]) -> Answer {
    let mut request = agent().post(url);
    if let Some(c) = cookie {
        request = request.set("Cookie", c);
    }
    for (n, v) in extra {
        request = request.set(n, v);
    }
    answer(request.send_form(form))
}

/// Sign in as `name`; the answer to the form.
fn sign_in(hub: &Hub, name: &str, password: &str) -> Answer {
    let form = get(&hub.url("/login"), None);
    assert_eq!(form.status, 200, "{}", form.body);
    let token = form.cookie(LOGIN_COOKIE).expect("a sign-in cookie");
    post(
        &hub.url("/login"),
        Some(&format!("{LOGIN_COOKIE}={token}")),
        &[],
        &[
            ("csrf", &form.csrf()),
            ("name", name),
            ("password", password),
        ],
    )
}

/// Sign in as the test's clinician: the `Cookie` header value of the session.
fn session(hub: &Hub) -> String {
    let answer = sign_in(hub, "dr.ada", PASSWORD);
    assert_eq!(answer.status, 303, "{}", answer.body);
    assert_eq!(answer.header("location"), Some("/"));
    let token = answer.cookie(SESSION_COOKIE).expect("a session cookie");
    let set = answer
        .headers
        .iter()
        .find(|(n, v)| n == "set-cookie" && v.starts_with(SESSION_COOKIE))
        .unwrap();
    assert!(
        set.1.contains("HttpOnly") && set.1.contains("SameSite=Strict") && set.1.contains("Path=/"),
        "{set:?}"
    );
    format!("{SESSION_COOKIE}={token}")
}

fn label_count(db: &TestDb) -> i64 {
    db.open().query("SELECT COUNT(*) FROM labels", &[]).unwrap()[0]
        .int(0)
        .unwrap()
}

#[test]
fn the_page_asks_for_a_login_and_shows_nothing_without_one() {
    let hub = Hub::new(Backend::Sqlite, &["dev-1"]);
    let r = record("dev-1", DAY, "nevus");
    hub.send("dev-1", std::slice::from_ref(&r), &[]);
    let id = &r.id;
    for path in ["/", "/devices", &format!("/records/{id}"), "/?device=dev-1"] {
        let answer = get(&hub.url(path), None);
        assert_eq!(answer.status, 303, "{path}");
        assert_eq!(answer.header("location"), Some("/login"), "{path}");
        assert!(
            !answer.body.contains(id) && !answer.body.contains("dev-1"),
            "{path}"
        );
    }
    for path in [format!("/records/{id}/thumbnail.jpg"), "/export.csv".into()] {
        let answer = get(&hub.url(&path), None);
        assert_eq!(answer.status, 401, "{path}");
        assert!(!answer.body.contains(id), "{path}");
        assert_ne!(answer.header("content-type"), Some("image/jpeg"));
    }
    let login = get(&hub.url("/login"), None);
    assert_eq!(login.status, 200);
    assert!(login
        .body
        .contains("<form method=\"post\" action=\"/login\""));
    assert!(login.body.contains("type=\"password\""));
    for secret in [id.as_str(), "dev-1", "df-mini", "nevus", "dr.ada"] {
        assert!(
            !login.body.contains(secret),
            "the login page shows {secret}"
        );
    }
    for (name, value) in [
        ("x-frame-options", "DENY"),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
    ] {
        assert_eq!(login.header(name), Some(value), "{name}");
    }
    let csp = login.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("img-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("script-src"), "{csp}");
    // A cookie that names no session, or a malformed one, opens nothing.
    let forged = format!("{SESSION_COOKIE}={}", crate::accounts::new_token().unwrap());
    for cookie in [
        forged.as_str(),
        "dermedge_session=../../etc",
        "dermedge_session=",
    ] {
        assert_eq!(get(&hub.url("/"), Some(cookie)).status, 303, "{cookie}");
        assert_eq!(
            get(&hub.url("/export.csv"), Some(cookie)).status,
            401,
            "{cookie}"
        );
    }
    // A label posted without a session is not stored.
    let answer = post(
        &hub.url(&format!("/records/{id}/labels")),
        None,
        &[],
        &[("kind", "text"), ("label", "x"), ("csrf", "x")],
    );
    assert_eq!(answer.status, 303);
    assert_eq!(label_count(&hub.db), 0);
    // The device API is unchanged beside it.
    assert_eq!(get(&hub.url(wire::HEALTH_PATH), None).status, 200);
    assert_eq!(get(&hub.url("/nothing-here"), None).status, 404);
}

#[test]
fn a_wrong_password_or_name_is_refused_alike_and_opens_no_session() {
    let hub = Hub::new(Backend::Sqlite, &["dev-1"]);
    let wrong = sign_in(&hub, "dr.ada", "not the password at all");
    let nobody = sign_in(&hub, "dr.nobody", PASSWORD);
    for answer in [&wrong, &nobody] {
        assert_eq!(answer.status, 401);
        assert!(answer.cookie(SESSION_COOKIE).is_none());
        assert!(
            answer.body.contains("Wrong name or password"),
            "{}",
            answer.body
        );
    }
    assert_eq!(
        hub.db
            .open()
            .query("SELECT COUNT(*) FROM sessions", &[])
            .unwrap()[0]
            .int(0)
            .unwrap(),
        0
    );
    // The sign-in form's own token is required: a form posted from elsewhere is refused.
    let forged = post(
        &hub.url("/login"),
        None,
        &[],
        &[("csrf", "x"), ("name", "dr.ada"), ("password", PASSWORD)],
    );
    assert_eq!(forged.status, 403);
    assert!(forged.cookie(SESSION_COOKIE).is_none());
    let form = get(&hub.url("/login"), None);
    let token = form.cookie(LOGIN_COOKIE).unwrap();
    let cross_site = post(
        &hub.url("/login"),
        Some(&format!("{LOGIN_COOKIE}={token}")),
        &[("Origin", "http://evil.example")],
        &[("csrf", &token), ("name", "dr.ada"), ("password", PASSWORD)],
    );
    assert_eq!(cross_site.status, 403);
    // The right password opens a session; signed in, /login goes to the records.
    let cookie = session(&hub);
    assert_eq!(get(&hub.url("/login"), Some(&cookie)).status, 303);
    let page = get(&hub.url("/"), Some(&cookie));
    assert_eq!(page.status, 200);
    assert!(page.body.contains("dr.ada"));
}

#[test]
fn logout_and_expiry_end_the_session() {
    let limits = Limits {
        sessions: SessionPolicy {
            idle: std::time::Duration::from_secs(3600),
            lifetime: std::time::Duration::from_secs(4 * 3600),
        },
        ..Limits::default()
    };
    let hub = Hub::with(Backend::Sqlite, &["dev-1"], limits);
    let cookie = session(&hub);
    let page = get(&hub.url("/"), Some(&cookie));
    assert_eq!(page.status, 200);
    // Logging out needs the page's token too.
    let refused = post(&hub.url("/logout"), Some(&cookie), &[], &[("csrf", "nope")]);
    assert_eq!(refused.status, 403);
    assert_eq!(get(&hub.url("/"), Some(&cookie)).status, 200);
    let out = post(
        &hub.url("/logout"),
        Some(&cookie),
        &[],
        &[("csrf", &page.csrf())],
    );
    assert_eq!(out.status, 303);
    assert_eq!(out.header("location"), Some("/login"));
    assert_eq!(out.cookie(SESSION_COOKIE).as_deref(), Some(""));
    assert_eq!(get(&hub.url("/"), Some(&cookie)).status, 303);
    assert_eq!(get(&hub.url("/export.csv"), Some(&cookie)).status, 401);

    // Idle past the limit: refused, and the session is gone from the database.
    let cookie = session(&hub);
    assert_eq!(get(&hub.url("/"), Some(&cookie)).status, 200);
    let store = hub.db.open();
    store
        .execute(
            "UPDATE sessions SET last_seen_ms = last_seen_ms - ?1",
            &[(2 * HOUR).into()],
        )
        .unwrap();
    assert_eq!(get(&hub.url("/"), Some(&cookie)).status, 303);
    let left = store.query("SELECT COUNT(*) FROM sessions", &[]).unwrap()[0]
        .int(0)
        .unwrap();
    assert_eq!(left, 0);
    // In use, but signed in longer ago than the lifetime.
    let cookie = session(&hub);
    store
        .execute(
            "UPDATE sessions SET created_at_ms = created_at_ms - ?1",
            &[(5 * HOUR).into()],
        )
        .unwrap();
    assert_eq!(get(&hub.url("/devices"), Some(&cookie)).status, 303);
    // Removing the account ends its sessions.
    let cookie = session(&hub);
    store.remove_user("dr.ada").unwrap();
    assert_eq!(get(&hub.url("/"), Some(&cookie)).status, 303);
}

#[test]
fn forms_without_the_sessions_token_or_from_another_origin_are_refused() {
    let hub = Hub::new(Backend::Sqlite, &["dev-1"]);
    let r = record("dev-1", DAY, "nevus");
    hub.send("dev-1", std::slice::from_ref(&r), &[]);
    let cookie = session(&hub);
    let url = hub.url(&format!("/records/{}", r.id));
    let page = get(&url, Some(&cookie));
    assert_eq!(page.status, 200);
    let csrf = page.csrf();
    let labels = format!("{url}/labels");
    let form = |csrf: &str| {
        vec![
            ("csrf", csrf.to_string()),
            ("kind", "class".to_string()),
            ("head", "kind".to_string()),
            ("label", "melanoma".to_string()),
        ]
    };
    let send = |fields: &[(&str, String)], extra: &[(&str, &str)]| {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        post(&labels, Some(&cookie), extra, &fields)
    };
    // Another session's token, none, a wrong one.
    let other = crate::accounts::csrf_token(&crate::accounts::new_token().unwrap());
    for bad in [other.as_str(), "", "0"] {
        let answer = send(&form(bad), &[]);
        assert_eq!(answer.status, 403, "{bad:?}");
    }
    let mut without = form(&csrf);
    without.remove(0);
    assert_eq!(send(&without, &[]).status, 403);
    // The right token from another origin.
    assert_eq!(
        send(&form(&csrf), &[("Origin", "http://evil.example")]).status,
        403
    );
    assert_eq!(
        send(&form(&csrf), &[("Referer", "http://evil.example/page")]).status,
        403
    );
    assert_eq!(label_count(&hub.db), 0);
    // A class the head does not have, and an unknown head, are refused with the reason.
    let mut odd = form(&csrf);
    odd[3].1 = "<script>".into();
    let answer = send(&odd, &[]);
    assert_eq!(answer.status, 400);
    assert!(
        answer.body.contains("is not a class of head"),
        "{}",
        answer.body
    );
    assert!(!answer.body.contains("<script>"));
    let mut unknown = form(&csrf);
    unknown[2].1 = "size".into();
    assert_eq!(send(&unknown, &[]).status, 400);
    assert_eq!(label_count(&hub.db), 0);
    // The page's own form, from the page's origin.
    let origin = format!("http://{}", hub.hub.addr());
    let answer = send(&form(&csrf), &[("Origin", &origin)]);
    assert_eq!(answer.status, 303, "{}", answer.body);
    assert_eq!(label_count(&hub.db), 1);
    let page = get(&url, Some(&cookie));
    assert!(page.body.contains("kind: <b>melanoma</b>"), "{}", page.body);
}

#[test]
fn device_written_strings_render_inert() {
    let device = "dev-<i>1</i>";
    let hub = Hub::new(Backend::Sqlite, &[device]);
    let mut r = record(device, DAY, "nevus");
    r.model_id = "<script>alert('model')</script>".into();
    r.source = Some("<b onclick=alert(1)>x.png".into());
    r.heads[0].head = "<img src=x onerror=alert(2)>".into();
    r.heads[0].classes[0] = "\"><script>alert(3)</script>".into();
    r.quality.as_mut().unwrap().metrics =
        BTreeMap::from([("<svg onload=alert(4)>".to_string(), 0.5)]);
    hub.send(device, std::slice::from_ref(&r), &[]);
    let cookie = session(&hub);
    let record_url = hub.url(&format!("/records/{}", r.id));
    let page = get(&record_url, Some(&cookie));
    assert_eq!(page.status, 200);
    // A label written by a clinician is shown, not run, too.
    post(
        &format!("{record_url}/labels"),
        Some(&cookie),
        &[],
        &[
            ("csrf", &page.csrf()),
            ("kind", "text"),
            ("label", "<script>alert(5)</script>"),
        ],
    );
    for path in [
        "/".to_string(),
        format!("/records/{}", r.id),
        "/devices".into(),
    ] {
        let body = get(&hub.url(&path), Some(&cookie)).body;
        for live in ["<script", "<img src=x", "<svg", "<i>1</i>", "<b onclick"] {
            assert!(!body.contains(live), "{path}: {live} in {body}");
        }
        assert!(body.contains("dev-&lt;i&gt;1&lt;/i&gt;"), "{path}: {body}");
    }
    let body = get(&record_url, Some(&cookie)).body;
    for shown in [
        "&lt;script&gt;alert(&#39;model&#39;)&lt;/script&gt;",
        "&lt;b onclick=alert(1)&gt;x.png",
        "&lt;img src=x onerror=alert(2)&gt;",
        "&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;",
        "&lt;script&gt;alert(5)&lt;/script&gt;",
    ] {
        assert!(body.contains(shown), "{shown} not in {body}");
    }
}

#[test]
fn the_export_follows_the_filters_and_neutralises_formulas() {
    let hub = Hub::new(Backend::Sqlite, &["dev-1", "dev-2"]);
    let mut a = record("dev-1", DAY, "nevus");
    a.source = Some("=HYPERLINK(\"x\").png".into());
    let b = record("dev-2", DAY + HOUR, "melanoma");
    hub.send("dev-1", std::slice::from_ref(&a), &[]);
    hub.send("dev-2", std::slice::from_ref(&b), &[]);
    let store = hub.db.open();
    store
        .add_label(&a.id, None, "=cmd|' /C calc'!A0", "dr.ada", DAY)
        .unwrap();
    let cookie = session(&hub);
    let all = get(&hub.url("/export.csv"), Some(&cookie));
    assert_eq!(all.status, 200);
    assert_eq!(all.header("content-type"), Some("text/csv; charset=utf-8"));
    assert!(all
        .header("content-disposition")
        .unwrap()
        .contains("attachment"));
    let mut reader = csv::Reader::from_reader(all.body.as_bytes());
    let header = reader.headers().unwrap().clone();
    assert_eq!(header.len(), 12);
    assert_eq!(&header[11], "labels");
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    let row_a = rows.iter().find(|r| &r[0] == a.id.as_str()).unwrap();
    assert_eq!(&row_a[7], "'=HYPERLINK(\"x\").png");
    assert_eq!(&row_a[11], "record: =cmd|' /C calc'!A0");
    for row in &rows {
        for cell in row {
            assert!(!cell.starts_with(['=', '+', '-', '@']), "{cell:?}");
        }
    }
    let one = get(
        &hub.url("/export.csv?device=dev-2&top=melanoma"),
        Some(&cookie),
    );
    let rows: Vec<csv::StringRecord> = csv::Reader::from_reader(one.body.as_bytes())
        .records()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(&rows[0][0], b.id.as_str());
    // The thumbnail is served to a session, as a JPEG.
    let thumb = get(
        &hub.url(&format!("/records/{}/thumbnail.jpg", a.id)),
        Some(&cookie),
    );
    assert_eq!(thumb.status, 200);
    assert_eq!(thumb.header("content-type"), Some("image/jpeg"));
}

fn check(got: Vec<String>, want: &[&String]) {
    let got: Vec<&String> = got.iter().collect();
    assert_eq!(got, want);
}

/// Records of two devices over two days, with different top classes, some labelled.
fn filters_return_the_right_records(backend: Backend) {
    let hub = Hub::new(backend, &["dev-1", "dev-2"]);
    let a = record("dev-1", DAY + HOUR, "nevus");
    let b = record("dev-1", DAY + 30 * HOUR, "melanoma");
    let c = record("dev-2", DAY + 2 * HOUR, "melanoma");
    let mut d = record("dev-2", DAY + 50 * HOUR, "other");
    d.heads.clear();
    hub.send("dev-1", &[a.clone(), b.clone()], &[]);
    hub.send("dev-2", &[c.clone(), d.clone()], &[]);
    let store = hub.db.open();
    store
        .add_label(&a.id, Some("kind"), "nevus", "dr.ada", 1)
        .unwrap();
    store
        .add_label(&c.id, None, "Needs 50% review_", "dr.ada", 2)
        .unwrap();
    let ids = |filter: RecordFilter| -> Vec<String> {
        let page = store.record_page(&filter, 50, 0).unwrap();
        let ids: Vec<String> = page.records.iter().map(|r| r.record_id.clone()).collect();
        assert_eq!(page.total, ids.len() as u64, "{filter:?}");
        let all = store.filtered_records(&filter, 100).unwrap().unwrap();
        assert_eq!(all.len(), ids.len(), "{filter:?}");
        ids
    };
    // Newest capture first.
    check(ids(RecordFilter::default()), &[&d.id, &b.id, &c.id, &a.id]);
    let device = RecordFilter {
        device: Some("dev-1".into()),
        ..Default::default()
    };
    check(ids(device), &[&b.id, &a.id]);
    let first_day = RecordFilter {
        from_ms: Some(DAY),
        until_ms: Some(DAY + 24 * HOUR),
        ..Default::default()
    };
    check(ids(first_day), &[&c.id, &a.id]);
    let melanoma = RecordFilter {
        head: Some("kind".into()),
        top_class: Some("melanoma".into()),
        ..Default::default()
    };
    check(ids(melanoma), &[&b.id, &c.id]);
    let any_kind = RecordFilter {
        head: Some("kind".into()),
        ..Default::default()
    };
    assert_eq!(ids(any_kind).len(), 3);
    let labelled = RecordFilter {
        labelled_only: true,
        ..Default::default()
    };
    check(ids(labelled), &[&c.id, &a.id]);
    let unlabelled = RecordFilter {
        unlabelled_only: true,
        ..Default::default()
    };
    check(ids(unlabelled), &[&d.id, &b.id]);
    // Text anywhere in a current label, case-insensitive, with LIKE's wildcards as text.
    for (text, expected) in [
        ("REVIEW", vec![&c.id]),
        ("50% review_", vec![&c.id]),
        ("5_%", vec![]),
        ("nev", vec![&a.id]),
    ] {
        let filter = RecordFilter {
            label: Some(text.into()),
            ..Default::default()
        };
        check(ids(filter), &expected);
    }
    // A label replaced is no longer current: the filter sees the new one only.
    store
        .add_label(&a.id, Some("kind"), "other", "dr.ada", 3)
        .unwrap();
    let nevus = RecordFilter {
        label: Some("nevus".into()),
        ..Default::default()
    };
    assert!(ids(nevus).is_empty());
    let combined = RecordFilter {
        device: Some("dev-2".into()),
        top_class: Some("melanoma".into()),
        labelled_only: true,
        ..Default::default()
    };
    check(ids(combined), &[&c.id]);
    // Pages, and the bound of an export.
    let page = store.record_page(&RecordFilter::default(), 3, 3).unwrap();
    assert_eq!(page.total, 4);
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].record_id, a.id);
    assert_eq!(page.records[0].labels.len(), 1);
    assert_eq!(page.records[0].labels[0].label, "other");
    assert!(store
        .filtered_records(&RecordFilter::default(), 3)
        .unwrap()
        .is_none());
    let heads = store.head_results().unwrap();
    assert_eq!(
        heads,
        [
            ("kind".to_string(), "melanoma".to_string()),
            ("kind".to_string(), "nevus".to_string())
        ]
    );
    assert_eq!(store.device_ids().unwrap(), ["dev-1", "dev-2"]);
    let summary = store.record_summary(&b.id).unwrap().unwrap();
    assert_eq!((summary.device_id.as_str(), summary.seq), ("dev-1", 2));
    assert!(summary.has_thumbnail && summary.quality.unwrap().acceptable);
    assert_eq!(
        store.thumbnail(&b.id).unwrap(),
        Some(vec![0xFF, 0xD8, 0xFF, 0xD9])
    );
    assert!(store.record_summary("nope").unwrap().is_none());
}

fn labels_keep_their_history_and_the_newest_is_current(backend: Backend) {
    let hub = Hub::new(backend, &["dev-1"]);
    let r = record("dev-1", DAY, "nevus");
    hub.send("dev-1", std::slice::from_ref(&r), &[]);
    let store = hub.db.open();
    store
        .add_label(&r.id, Some("kind"), "nevus", "dr.ada", 1)
        .unwrap();
    store
        .add_label(&r.id, None, "follow up", "dr.bo", 2)
        .unwrap();
    store
        .add_label(&r.id, Some("kind"), "melanoma", "dr.bo", 3)
        .unwrap();
    let history = store.labels(&r.id).unwrap();
    assert_eq!(
        history
            .iter()
            .map(|l| (l.head.as_deref(), l.label.as_str(), l.author.as_str()))
            .collect::<Vec<_>>(),
        [
            (Some("kind"), "nevus", "dr.ada"),
            (None, "follow up", "dr.bo"),
            (Some("kind"), "melanoma", "dr.bo")
        ]
    );
    let current = store.record_summary(&r.id).unwrap().unwrap().labels;
    assert_eq!(
        current.iter().map(|l| l.label.as_str()).collect::<Vec<_>>(),
        ["follow up", "melanoma"]
    );
    let err = store
        .add_label("no-such-record", None, "x", "dr.ada", 4)
        .unwrap_err();
    assert!(err.to_string().contains("no record"), "{err}");
}

fn sessions_expire_and_end_on_logout_in_the_store(backend: Backend) {
    let db = TestDb::new(backend);
    let store = db.open();
    store.add_user("dr.ada", PASSWORD).unwrap();
    assert!(
        store.add_user("dr.ada", PASSWORD).is_err(),
        "a second dr.ada"
    );
    assert!(store.add_user("dr.short", "short").is_err());
    let policy = SessionPolicy {
        idle: std::time::Duration::from_secs(3600),
        lifetime: std::time::Duration::from_secs(10 * 3600),
    };
    let token = crate::accounts::new_token().unwrap();
    let hash = crate::accounts::token_hash(&token);
    let t0 = DAY;
    store.open_session("dr.ada", &hash, t0, policy).unwrap();
    assert_eq!(
        store
            .session_user(&hash, t0 + 30 * 60_000, policy)
            .unwrap()
            .as_deref(),
        Some("dr.ada")
    );
    // Used 30 minutes in, so still open 80 minutes in; closed 3 h after the last use.
    assert!(store
        .session_user(&hash, t0 + 80 * 60_000, policy)
        .unwrap()
        .is_some());
    assert!(store
        .session_user(&hash, t0 + 4 * HOUR, policy)
        .unwrap()
        .is_none());
    // Gone for good once expired.
    assert!(store
        .session_user(&hash, t0 + 81 * 60_000, policy)
        .unwrap()
        .is_none());
    // Kept in use, it still ends at its lifetime.
    let hash = crate::accounts::token_hash(&crate::accounts::new_token().unwrap());
    store.open_session("dr.ada", &hash, t0, policy).unwrap();
    for hour in 1..10 {
        assert!(store
            .session_user(&hash, t0 + hour * HOUR, policy)
            .unwrap()
            .is_some());
    }
    assert!(store
        .session_user(&hash, t0 + 10 * HOUR + 1, policy)
        .unwrap()
        .is_none());
    // Logout.
    let hash = crate::accounts::token_hash(&crate::accounts::new_token().unwrap());
    store.open_session("dr.ada", &hash, t0, policy).unwrap();
    store.close_session(&hash).unwrap();
    assert!(store.session_user(&hash, t0, policy).unwrap().is_none());
    // The database holds no token, only its hash.
    let stored: Vec<Vec<u8>> = store
        .query("SELECT token_hash FROM sessions", &[])
        .unwrap()
        .iter()
        .map(|r| r.blob(0).unwrap())
        .collect();
    assert!(stored
        .iter()
        .all(|h| h.len() == 32 && h != token.as_bytes()));
    let users = store.users().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].name, "dr.ada");
    store.remove_user("dr.ada").unwrap();
    assert!(store.remove_user("dr.ada").is_err());
    assert!(store.users().unwrap().is_empty());
}

fn failed_logins_lock_the_account_for_a_while(backend: Backend) {
    let db = TestDb::new(backend);
    let store = db.open();
    store.add_user("dr.ada", PASSWORD).unwrap();
    let t0 = DAY;
    assert_eq!(
        store.login("dr.ada", PASSWORD, t0).unwrap(),
        LoginOutcome::Ok
    );
    assert_eq!(
        store.login("dr.nobody", PASSWORD, t0).unwrap(),
        LoginOutcome::NoSuchUser
    );
    for failures in 1..crate::store::FAILURES_BEFORE_LOCK {
        assert_eq!(
            store.login("dr.ada", "wrong password!", t0).unwrap(),
            LoginOutcome::WrongPassword { failures }
        );
    }
    let locked = store.login("dr.ada", "wrong password!", t0).unwrap();
    let until = t0 + crate::store::FIRST_LOCK_MS;
    assert_eq!(locked, LoginOutcome::Locked { until_ms: until });
    // The right password does not open a locked account, until the lock ends.
    assert_eq!(
        store.login("dr.ada", PASSWORD, t0 + 1000).unwrap(),
        LoginOutcome::Locked { until_ms: until }
    );
    // Another failure after the lock locks for twice as long.
    assert_eq!(
        store.login("dr.ada", "wrong password!", until).unwrap(),
        LoginOutcome::Locked {
            until_ms: until + 2 * crate::store::FIRST_LOCK_MS
        }
    );
    let later = until + 2 * crate::store::FIRST_LOCK_MS;
    assert_eq!(
        store.login("dr.ada", PASSWORD, later).unwrap(),
        LoginOutcome::Ok
    );
    // A success starts the count again.
    assert_eq!(
        store.login("dr.ada", "wrong password!", later).unwrap(),
        LoginOutcome::WrongPassword { failures: 1 }
    );
}

fn device_health_counts_losses_by_reason_and_the_last_batch(backend: Backend) {
    let hub = Hub::new(backend, &["dev-1", "dev-2"]);
    let gap = |from, to, reason| Gap {
        from,
        to,
        reason,
        at_ms: DAY,
    };
    let mut refused = record("dev-1", DAY, "nevus");
    refused.id = "not a record id".into();
    hub.send(
        "dev-1",
        &[
            record("dev-1", DAY, "nevus"),
            refused,
            record("dev-1", DAY + HOUR, "nevus"),
        ],
        &[
            gap(2, 4, GapReason::Evicted),
            gap(6, 6, GapReason::Evicted),
            gap(8, 8, GapReason::Damaged),
        ],
    );
    let store = hub.db.open();
    let health = store.device_health(0).unwrap();
    assert_eq!(health.len(), 2);
    let d = &health[0];
    assert_eq!(d.device_id, "dev-1");
    // Records at 1, 5 (refused) and 7; losses 2-4, 6, 8.
    assert_eq!(
        (d.acked_through, d.highest_record_seq, d.records),
        (8, Some(7), 2)
    );
    assert_eq!(d.last_captured_at_ms, Some(DAY + HOUR));
    assert!(d.last_batch_at_ms.is_some_and(|at| at > DAY));
    let totals: Vec<(&str, u64, u64)> = d
        .gaps
        .iter()
        .map(|g| (g.reason.as_str(), g.ranges, g.records))
        .collect();
    assert_eq!(
        totals,
        [("damaged", 1, 1), ("evicted", 2, 4), ("refused", 1, 1)]
    );
    let quiet = &health[1];
    assert_eq!(
        (quiet.records, quiet.last_batch_at_ms, quiet.gaps.len()),
        (0, None, 0)
    );
    store.log_rejection(Some("127.0.0.1:1"), Some("dev-2"), 401, "bad signature");
    assert_eq!(store.device_health(0).unwrap()[1].recent_rejections, 1);
    assert_eq!(
        store.device_health(i64::MAX).unwrap()[1].recent_rejections,
        0
    );
}

/// An SQLite database of version 1 holding records with heads: migration 2 fills the table of
/// each record's top classes, so the page's filter finds them.
#[test]
fn migration_2_fills_the_top_classes_of_records_stored_before_it() {
    let hub = Hub::new(Backend::Sqlite, &["dev-1"]);
    let a = record("dev-1", DAY, "melanoma");
    let b = record("dev-1", DAY + HOUR, "nevus");
    hub.send("dev-1", &[a.clone(), b], &[]);
    {
        let store = hub.db.open();
        store.execute("DELETE FROM record_heads", &[]).unwrap();
        store.execute("DELETE FROM sessions", &[]).unwrap();
        store.execute("DELETE FROM users", &[]).unwrap();
        crate::tests::roll_back_to_version_1(store.connection());
    }
    let store = Store::open(hub.db.path()).unwrap();
    let filter = RecordFilter {
        top_class: Some("melanoma".into()),
        ..Default::default()
    };
    let page = store.record_page(&filter, 50, 0).unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].record_id, a.id);
    assert_eq!(store.head_results().unwrap().len(), 2);
}

#[test]
fn the_heads_page_trains_scores_and_publishes_from_labels() {
    let hub = Hub::new(Backend::Sqlite, &["dev-1"]);
    let classes = ["nevus", "melanoma"];
    let records: Vec<Record> = (0..12)
        .map(|i| {
            let mut r = record("dev-1", DAY + i as i64, classes[i % 2]);
            let mut v = [0.3f32; 4];
            v[i % 2] += 1.0;
            v[2] += 0.01 * i as f32;
            r.embedding = StoredEmbedding::new(&v, EmbeddingType::F32);
            r
        })
        .collect();
    hub.send("dev-1", &records, &[]);
    let store = hub.db.open();
    for (i, r) in records.iter().enumerate() {
        store
            .add_label(&r.id, Some("kind"), classes[i % 2], "dr.ada", DAY)
            .unwrap();
    }
    // Nothing without a session, and no form without the session's token.
    let answer = get(&hub.url("/heads"), None);
    assert_eq!(
        (answer.status, answer.header("location")),
        (303, Some("/login"))
    );
    let answer = post(&hub.url("/heads"), None, &[], &[("name", "diagnosis")]);
    assert_eq!(
        (answer.status, answer.header("location")),
        (303, Some("/login"))
    );
    let cookie = session(&hub);
    let page = get(&hub.url("/heads"), Some(&cookie));
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("labels of head kind (12 records)"),
        "{}",
        page.body
    );
    let set = r#"["df-mini","kind"]"#;
    let answer = post(
        &hub.url("/heads"),
        Some(&cookie),
        &[],
        &[("csrf", "0"), ("label_set", set), ("name", "diagnosis")],
    );
    assert_eq!(answer.status, 403);
    assert!(store.heads().unwrap().is_empty());
    // A name that could not be a file name on the device is refused with the reason.
    let csrf = page.csrf();
    let train = |name: &str| {
        post(
            &hub.url("/heads"),
            Some(&cookie),
            &[],
            &[("csrf", &csrf), ("label_set", set), ("name", name)],
        )
    };
    let answer = train("../x");
    assert_eq!(answer.status, 400);
    assert!(answer.body.contains("head name"), "{}", answer.body);
    let answer = train("diagnosis");
    assert_eq!(answer.status, 303, "{}", answer.body);
    let id = store.heads().unwrap()[0].id;
    assert_eq!(
        answer.header("location"),
        Some(format!("/heads#head-{id}").as_str())
    );
    let page = get(&hub.url("/heads"), Some(&cookie));
    assert!(
        page.body.contains("class=\"accuracy\">100.0%"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("table class=\"confusion\""),
        "{}",
        page.body
    );
    assert!(page.body.contains(">draft<"), "{}", page.body);
    assert!(page.body.contains("too few to judge"), "{}", page.body);
    // Publishing takes the session's token; then it signs: the page says so, and the store
    // holds the blob devices receive.
    let answer = post(
        &hub.url(&format!("/heads/{id}/publish")),
        Some(&cookie),
        &[],
        &[("csrf", "0")],
    );
    assert_eq!(answer.status, 403);
    assert!(store
        .publications("df-mini", 4, |_, _| true, 1 << 20)
        .unwrap()
        .is_empty());
    let answer = post(
        &hub.url(&format!("/heads/{id}/publish")),
        Some(&cookie),
        &[],
        &[("csrf", &csrf)],
    );
    assert_eq!(answer.status, 303, "{}", answer.body);
    let page = get(&hub.url("/heads"), Some(&cookie));
    assert!(
        page.body.contains("published as version 1"),
        "{}",
        page.body
    );
    let publications = store
        .publications("df-mini", 4, |_, _| true, 1 << 20)
        .unwrap();
    assert_eq!(publications.len(), 1);
    let head = wire::open_head(&hub.hub_key.public(), &publications[0].signed).unwrap();
    assert_eq!((head.name.as_str(), head.version), ("diagnosis", Some(1)));
    // Published once: a second publish is refused on the page.
    let answer = post(
        &hub.url(&format!("/heads/{id}/publish")),
        Some(&cookie),
        &[],
        &[("csrf", &csrf)],
    );
    assert_eq!(answer.status, 400);
    assert!(answer.body.contains("published already"), "{}", answer.body);
}
