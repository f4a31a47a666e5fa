//! The clinicians' web page in a real browser: headless Chromium driven through chromedriver's
//! WebDriver protocol (W3C, JSON over HTTP).
//!
//! Runs when `DERMEDGE_TEST_CHROMEDRIVER` names chromedriver (`scripts/test-browser.sh` installs
//! Debian's `chromium` and `chromium-driver` and sets it); otherwise it says so and passes without
//! running. `DERMEDGE_TEST_CHROMIUM` may name the browser if chromedriver does not find it, and
//! `DERMEDGE_SCREENSHOT_TO` a PNG file to write a screenshot of the records page to (the README's
//! `docs/hub-page.png`; the heads page goes to `hub-heads.png` beside it).
//!
//! A hub on SQLite in a temporary directory receives real signed batches from two devices,
//! records with JPEG thumbnails; in the browser a clinician is sent to the sign-in form, signs in,
//! finds the records with their thumbnails loaded, filters by device, opens a record, labels it
//! from the head's classes (and sees the label on the page and in the database), trains a head
//! from labels on the heads page and publishes it, has a form with
//! a forged CSRF token refused, and signs out; without the cookie the page, the export and a
//! thumbnail are refused.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dermedge_hub::server::HubServer;
use dermedge_hub::store::Store;
use dermedge_record::{
    new_record_id, DeviceKey, EmbeddingType, Envelope, HeadResult, HubKey, QualityResult, Record,
    StoredEmbedding, RECORD_FORMAT,
};
use dermedge_sync::wire;
use serde_json::{json, Value};

const CHROMEDRIVER_VAR: &str = "DERMEDGE_TEST_CHROMEDRIVER";
const CHROMIUM_VAR: &str = "DERMEDGE_TEST_CHROMIUM";
const SCREENSHOT_VAR: &str = "DERMEDGE_SCREENSHOT_TO";
/// W3C WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const PASSWORD: &str = "browser test password";
/// 2026-09-21 08:00 UTC.
const MORNING: i64 = 1_789_977_600_000;

/// chromedriver on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

impl Driver {
    fn start(chromedriver: &Path, log: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start: {e}", chromedriver.display()));
        let driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(90))
                .build(),
        };
        let started = Instant::now();
        loop {
            let ready = driver
                .agent
                .get(&format!("{}/status", driver.base))
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                return driver;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver is not ready after 20 s (log: {})",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One WebDriver command: its `value`, or a panic with the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// One WebDriver command: its `value`, or the driver's error (a stale element while the
    /// page changes, say).
    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let request = self
            .agent
            .request(method, &url)
            .set("Content-Type", "application/json");
        let result = match body {
            Some(body) => request.send_string(&body.to_string()),
            None if method == "POST" => request.send_string("{}"),
            None => request.call(),
        };
        let (status, text) = match result {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {status}: not JSON ({e}): {text}"));
        if status != 200 {
            return Err(format!("{method} {path}: {status}: {}", value["value"]));
        }
        Ok(value["value"].clone())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session, ended when dropped.
struct Browser<'a> {
    driver: &'a Driver,
    id: String,
}

impl<'a> Browser<'a> {
    fn open(driver: &'a Driver) -> Self {
        let mut options = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1360,900",
                "--force-device-scale-factor=1",
                "--no-first-run",
                "--password-store=basic"
            ]
        });
        let binary = std::env::var_os(CHROMIUM_VAR)
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.exists()));
        if let Some(binary) = binary {
            options["binary"] = json!(binary.to_string_lossy());
        }
        let capabilities = json!({
            "capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": options,
            }}
        });
        let session = driver.call("POST", "/session", Some(capabilities));
        let id = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {session}"))
            .to_string();
        Browser { driver, id }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.driver
            .call(method, &format!("/session/{}{path}", self.id), body)
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn url(&self) -> String {
        self.call("GET", "/url", None).as_str().unwrap().to_string()
    }

    fn source(&self) -> String {
        self.call("GET", "/source", None)
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Every element `css` selects.
    fn find_all(&self, css: &str) -> Vec<String> {
        let found = self.call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        );
        found
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[ELEMENT].as_str().unwrap().to_string())
            .collect()
    }

    /// The one element `css` selects.
    fn find(&self, css: &str) -> String {
        let mut all = self.find_all(css);
        assert_eq!(all.len(), 1, "{css} selects {} elements", all.len());
        all.remove(0)
    }

    fn click(&self, element: &str) {
        self.call("POST", &format!("/element/{element}/click"), None);
    }

    fn type_into(&self, element: &str, text: &str) {
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn text(&self, element: &str) -> String {
        self.call("GET", &format!("/element/{element}/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The text of the one element `css` selects, or None while there is not exactly one or
    /// it goes stale (the page is being replaced).
    fn try_text(&self, css: &str) -> Option<String> {
        let session = format!("/session/{}", self.id);
        let found = self
            .driver
            .try_call(
                "POST",
                &format!("{session}/elements"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .ok()?;
        let [element] = found.as_array()?.as_slice() else {
            return None;
        };
        let element = element[ELEMENT].as_str()?;
        self.driver
            .try_call("GET", &format!("{session}/element/{element}/text"), None)
            .ok()
            .and_then(|text| text.as_str().map(String::from))
    }

    fn attribute(&self, element: &str, name: &str) -> Option<String> {
        self.call("GET", &format!("/element/{element}/attribute/{name}"), None)
            .as_str()
            .map(String::from)
    }

    fn execute(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let data = self.call("GET", "/screenshot", None);
        base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap())
            .unwrap()
    }

    /// Wait (up to 15 s) until `done` holds.
    fn wait_for(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let started = Instant::now();
        while !done(self) {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "waited 15 s for {what}; at {}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until every `img` that `css` selects has loaded; their natural widths.
    fn loaded_widths(&self, css: &str) -> Vec<u64> {
        let script = format!(
            "return Array.from(document.querySelectorAll({})).map(i => [i.complete, i.naturalWidth]);",
            json!(css)
        );
        let mut widths = Vec::new();
        self.wait_for("the thumbnails", |b| {
            let images = b.execute(&script);
            let images = images.as_array().unwrap();
            widths = images.iter().map(|i| i[1].as_u64().unwrap()).collect();
            images.iter().all(|i| i[0] == true)
        });
        widths
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = self
            .driver
            .agent
            .delete(&format!("{}/session/{}", self.driver.base, self.id))
            .call();
    }
}

/// A small JPEG like the device's thumbnails: a dark oval lesion of colour `rgb` on skin.
fn jpeg(rgb: [u8; 3], width: u32, height: u32) -> Vec<u8> {
    let skin = [224.0, 178.0, 150.0];
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        let dx = (x as f32 - width as f32 * 0.52) / (width as f32 * 0.3);
        let dy = (y as f32 - height as f32 * 0.48) / (height as f32 * 0.34);
        let r = (dx * dx + dy * dy).sqrt();
        // Inside the oval the lesion's colour, fading into the skin over its edge.
        let t = ((1.15 - r) / 0.3).clamp(0.0, 1.0);
        let shade = 0.92 + 0.08 * ((x + 2 * y) % 7) as f32 / 7.0;
        let mix = |i: usize| ((skin[i] * (1.0 - t) + f32::from(rgb[i]) * t) * shade) as u8;
        image::Rgb([mix(0), mix(1), mix(2)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .encode_image(&image)
        .unwrap();
    out
}

fn record(device: &str, i: i64, top: usize, rgb: [u8; 3]) -> Record {
    let classes: Vec<String> = ["nevus", "melanoma", "seborrheic keratosis", "other"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    let probabilities = (0..classes.len())
        .map(|c| if c == top { 0.7 } else { 0.1 })
        .collect();
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: MORNING + i * 47 * 60_000,
        device_id: device.into(),
        model_id: "df-mini".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&[0.25, -1.0, 2.0, 0.5], EmbeddingType::F32),
        heads: vec![HeadResult {
            head: "lesion".into(),
            classes,
            probabilities,
            version: None,
        }],
        quality: Some(QualityResult {
            acceptable: i % 4 != 3,
            reasons: if i % 4 == 3 {
                vec!["blurred".into()]
            } else {
                Vec::new()
            },
            metrics: [
                ("sharpness".to_string(), 0.8),
                ("exposure".to_string(), 0.5),
            ]
            .into_iter()
            .collect(),
        }),
        source: Some(format!("capture-{i:03}.jpg")),
        thumbnail_jpeg: Some(jpeg(rgb, 96, 72)),
    }
}

/// Send `records` from `device` in one signed batch, as the device's sync client does.
fn send(hub: &str, hub_key: &HubKey, device: &str, key: &DeviceKey, records: &[Record]) {
    let batch = wire::Batch {
        queued_after: None,
        after_seq: 0,
        records: records
            .iter()
            .enumerate()
            .map(|(i, r)| wire::BatchRecord {
                seq: i as u64 + 1,
                cbor: Envelope::seal(r, &hub_key.public()).to_cbor(),
            })
            .collect(),
        gaps: Vec::new(),
    };
    let body = wire::seal_batch(key, device, 1, &batch);
    let response = ureq::post(&format!("{hub}{}", wire::BATCH_PATH))
        .set(wire::DEVICE_HEADER, device)
        .set(wire::COUNTER_HEADER, "1")
        .send_bytes(&body)
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Status of a plain request without a cookie (no redirects followed).
fn status_without_cookie(url: &str) -> u16 {
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    match agent.get(url).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{url}: {e}"),
    }
}

#[test]
fn a_clinician_signs_in_finds_the_synced_records_and_labels_one() {
    let Some(chromedriver) = std::env::var_os(CHROMEDRIVER_VAR).filter(|v| !v.is_empty()) else {
        eprintln!(
            "note: the browser test passes without running: {CHROMEDRIVER_VAR} is not set \
             (scripts/test-browser.sh installs Chromium and chromedriver and sets it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.sqlite");
    let hub_key = HubKey::generate();
    let devices = [
        ("derm-cart-1", DeviceKey::generate()),
        ("kiosk-2", DeviceKey::generate()),
    ];
    {
        let store = Store::open(&db).unwrap();
        for (id, key) in &devices {
            store.enroll(id, &key.public()).unwrap();
        }
        store.add_user("dr.ada", PASSWORD).unwrap();
    }
    let server = HubServer::start(&db, hub_key.clone(), "127.0.0.1:0", 2).unwrap();
    let hub = format!("http://{}", server.addr());
    let colours = [
        [120, 72, 50],
        [70, 42, 34],
        [150, 100, 70],
        [95, 55, 45],
        [135, 80, 60],
    ];
    let first: Vec<Record> = (0..3)
        .map(|i| record(devices[0].0, i, (i % 3) as usize, colours[i as usize]))
        .collect();
    let second: Vec<Record> = (3..5)
        .map(|i| record(devices[1].0, i, 1, colours[i as usize]))
        .collect();
    send(&hub, &hub_key, devices[0].0, &devices[0].1, &first);
    send(&hub, &hub_key, devices[1].0, &devices[1].1, &second);
    let all: Vec<&Record> = first.iter().chain(&second).collect();

    let driver = Driver::start(
        Path::new(&chromedriver),
        &dir.path().join("chromedriver.log"),
    );
    let browser = Browser::open(&driver);

    // The page asks for a login and shows nothing without one.
    browser.goto(&format!("{hub}/"));
    assert_eq!(browser.url(), format!("{hub}/login"));
    let source = browser.source();
    assert!(source.contains("Sign in"), "{source}");
    for r in &all {
        assert!(
            !source.contains(&r.id),
            "the login page shows record {}",
            r.id
        );
    }
    assert!(!source.contains(devices[0].0) && !source.contains(devices[1].0));

    // A wrong password is refused.
    browser.type_into(&browser.find("#name"), "dr.ada");
    browser.type_into(&browser.find("#password"), "not the password");
    browser.click(&browser.find("#sign-in"));
    browser.wait_for("the refusal", |b| {
        b.source().contains("Wrong name or password")
    });
    assert_eq!(browser.url(), format!("{hub}/login"));

    // Signing in leads to the records, each with its thumbnail loaded.
    browser.type_into(&browser.find("#name"), "dr.ada");
    browser.type_into(&browser.find("#password"), PASSWORD);
    browser.click(&browser.find("#sign-in"));
    browser.wait_for("the records page", |b| b.url() == format!("{hub}/"));
    let rows = browser.find_all("tr.record");
    let mut shown: Vec<String> = rows
        .iter()
        .map(|row| browser.attribute(row, "data-record").unwrap())
        .collect();
    shown.sort();
    let mut sent: Vec<String> = all.iter().map(|r| r.id.clone()).collect();
    sent.sort();
    assert_eq!(shown, sent, "the synced records");
    let widths = browser.loaded_widths("img.thumb");
    assert_eq!(widths, vec![96; all.len()], "every thumbnail loaded");
    assert!(browser
        .text(&browser.find("#records"))
        .contains("lesion: melanoma"));
    // The inline stylesheet applies (the Content-Security-Policy allows it by its hash).
    assert_eq!(
        browser.execute("return getComputedStyle(document.body).marginTop;"),
        "0px"
    );

    // Filter by device.
    browser.click(&browser.find(&format!("#device option[value=\"{}\"]", devices[1].0)));
    browser.click(&browser.find("#apply"));
    browser.wait_for("the filtered page", |b| b.url().contains("device=kiosk-2"));
    let rows = browser.find_all("tr.record");
    assert_eq!(rows.len(), second.len());
    for cell in browser.find_all("tr.record td.device") {
        assert_eq!(browser.text(&cell), devices[1].0);
    }
    assert_eq!(browser.loaded_widths("img.thumb"), vec![96; second.len()]);

    // Open one record and label it from the head's classes.
    let chosen = &second[0];
    browser.click(&browser.find(&format!(
        "tr.record[data-record=\"{}\"] td:nth-child(2) a",
        chosen.id
    )));
    let record_url = format!("{hub}/records/{}", chosen.id);
    browser.wait_for("the record page", |b| b.url() == record_url);
    assert_eq!(browser.loaded_widths("img.large"), vec![96]);
    let form = "form.head-label[data-head=\"lesion\"]";
    browser.click(&browser.find(&format!("{form} option[value=\"seborrheic keratosis\"]")));
    browser.click(&browser.find(&format!("{form} button")));
    browser.wait_for("the label", |b| {
        b.try_text("#current-labels")
            .is_some_and(|text| text.contains("lesion: seborrheic keratosis"))
    });
    assert!(browser.url().starts_with(&record_url));
    assert!(browser
        .text(&browser.find("#current-labels"))
        .contains("dr.ada"));
    let stored = Store::open(&db).unwrap().labels(&chosen.id).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (
            stored[0].head.as_deref(),
            stored[0].label.as_str(),
            stored[0].author.as_str()
        ),
        (Some("lesion"), "seborrheic keratosis", "dr.ada")
    );

    // A form whose CSRF token is not the session's is refused, and stores nothing.
    browser.execute(
        "document.querySelector('#free-label input[name=csrf]').value = 'forged'; return true;",
    );
    browser.type_into(
        &browser.find("#free-label input[name=label]"),
        "forged label",
    );
    browser.click(&browser.find("#free-label button"));
    browser.wait_for("the refusal", |b| b.source().contains("<h1>Refused</h1>"));
    assert_eq!(
        Store::open(&db).unwrap().labels(&chosen.id).unwrap().len(),
        1
    );

    // The head loop: labels on every record (two classes), a head trained on the heads page,
    // its held-out scores and confusion matrix shown, and published for devices.
    {
        let store = Store::open(&db).unwrap();
        for (i, r) in all.iter().enumerate() {
            let label = if i % 2 == 0 { "benign" } else { "refer" };
            store
                .add_label(&r.id, None, label, "dr.ada", MORNING)
                .unwrap();
        }
    }
    browser.goto(&format!("{hub}/heads"));
    browser.wait_for("the heads page", |b| b.try_text("#train").is_some());
    browser.click(&browser.find("#label-set option[value='[\"df-mini\",null]']"));
    let name = browser.find("#head-name");
    browser.call("POST", &format!("/element/{name}/clear"), Some(json!({})));
    browser.type_into(&name, "referral");
    browser.click(&browser.find("#train-head"));
    browser.wait_for("the trained head", |b| {
        b.try_text("table.confusion").is_some()
    });
    assert!(
        browser.source().contains("referral"),
        "{}",
        browser.source()
    );
    browser.click(&browser.find("form.publish button"));
    browser.wait_for("the publication", |b| {
        b.try_text("span.published")
            .is_some_and(|t| t.contains("published as version 1"))
    });
    if let Some(path) = std::env::var_os(SCREENSHOT_VAR).filter(|v| !v.is_empty()) {
        let heads_png = Path::new(&path).with_file_name("hub-heads.png");
        std::fs::write(&heads_png, browser.screenshot()).unwrap();
        eprintln!("screenshot of the heads page in {}", heads_png.display());
    }
    let published = Store::open(&db)
        .unwrap()
        .publications("df-mini", 4, |_, _| true, 1 << 20)
        .unwrap();
    assert_eq!(
        published
            .iter()
            .map(|p| (p.name.as_str(), p.version))
            .collect::<Vec<_>>(),
        [("referral", 1)]
    );

    // The records page, labelled, for the README.
    browser.goto(&format!("{hub}/"));
    browser.wait_for("the records page", |b| b.url() == format!("{hub}/"));
    browser.loaded_widths("img.thumb");
    if let Some(path) = std::env::var_os(SCREENSHOT_VAR).filter(|v| !v.is_empty()) {
        let png = browser.screenshot();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(&path, png).unwrap();
        eprintln!(
            "screenshot of the records page in {}",
            Path::new(&path).display()
        );
    }

    // Sign out: the page asks for a login again.
    browser.click(&browser.find("#logout"));
    browser.wait_for("the sign-in page", |b| b.url() == format!("{hub}/login"));
    browser.goto(&format!("{hub}/records/{}", chosen.id));
    assert_eq!(browser.url(), format!("{hub}/login"));
    assert!(!browser.source().contains(&chosen.id));

    // Without the cookie: the page is a redirect, the export and a thumbnail are refused.
    assert_eq!(status_without_cookie(&format!("{hub}/")), 303);
    assert_eq!(status_without_cookie(&format!("{hub}/export.csv")), 401);
    assert_eq!(
        status_without_cookie(&format!("{hub}/records/{}/thumbnail.jpg", chosen.id)),
        401
    );
    drop(browser);
    drop(driver);
    server.shutdown();
}
