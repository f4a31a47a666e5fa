//! The device application end to end: the README's main-job config on the bundled session,
//! the head loop (a head the hub trains from labels runs on the device), SIGTERM during a run,
//! and each example config broken five ways.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod binary;

use binary::{dermedge, dermedge_bin, train_image_kind_head, HubProcess};
use dermedge_e2e::{fixtures, read_npy_rows, root, text};
use serde_json::Value;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn ok(args: &[&str]) -> std::process::Output {
    let out = dermedge(args);
    assert!(
        out.status.success(),
        "dermedge {args:?}: {}",
        text(&out.stderr)
    );
    out
}

/// firmware-config/x86-dev.toml with its outputs moved into `dir` and `edit` applied.
fn x86_config(dir: &Path, head: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let text = fs::read_to_string(root().join("firmware-config/x86-dev.toml"))
        .unwrap()
        .replace("../out/x86-dev/heads/image-kind.json", &s(head))
        .replace("../out/x86-dev", &s(dir))
        .replace("../tests/fixtures", &s(&fixtures()));
    let path = dir.join("device.toml");
    fs::write(&path, edit(text)).unwrap();
    path
}

#[test]
fn the_main_job_leaves_screens_records_and_a_hub_database() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let head = train_image_kind_head(dir);
    // Slower pacing than the demo, so a loaded CI machine still sees every held image.
    let config = x86_config(dir, &head, |t| t.replace("fps = 12", "fps = 4"));
    ok(&["config", "check", &s(&config)]);
    let out = ok(&["run", "--config", &s(&config)]);
    assert!(
        text(&out.stdout).contains("5 accepted, 2 refused"),
        "{}",
        text(&out.stdout)
    );

    let summary: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["accepted"], 5);
    assert_eq!(summary["refused"], 2);
    assert_eq!(summary["queue"]["pending_records"], 0, "{summary}");
    let ids: Vec<String> = summary["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();

    let screens: Vec<String> = fs::read_dir(dir.join("screens"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "preview.png",
        "latest.png",
        "0001-result.png",
        "0002-quality.png",
    ] {
        assert!(
            screens.contains(&expected.to_string()),
            "{expected} missing from {screens:?}"
        );
    }
    assert_eq!(
        screens
            .iter()
            .filter(|n| n.ends_with("-result.png"))
            .count(),
        5
    );
    assert_eq!(
        screens
            .iter()
            .filter(|n| n.ends_with("-quality.png"))
            .count(),
        2
    );

    // The hub holds exactly the accepted records, in order, with the embeddings dermedge computes
    // for those files.
    let db = dir.join("hub.sqlite");
    let csv = dir.join("hub.csv");
    let npy = dir.join("hub.npy");
    ok(&[
        "hub",
        "export",
        "--db",
        &s(&db),
        "--csv",
        &s(&csv),
        "--npy",
        &s(&npy),
    ]);
    let rows: Vec<Vec<String>> = fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    assert_eq!(rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>(), ids);
    // The hub keeps each capture's file name, not the device's path to it.
    let sources: Vec<PathBuf> = rows
        .iter()
        .map(|r| {
            assert!(!r[7].contains('/'), "a path reached the hub: {}", r[7]);
            fixtures().join("device").join(&r[7])
        })
        .collect();
    for (row, source) in rows.iter().zip(&sources) {
        let kind = if source.to_string_lossy().contains("dermoscopy") {
            "image-kind=dermoscopy"
        } else {
            "image-kind=photo"
        };
        assert!(row[9].starts_with(kind), "{row:?}");
    }
    let direct = dir.join("direct.npy");
    let mut args = vec![
        "embed".to_string(),
        "--model".into(),
        s(&fixtures().join("df-mini/df-mini.int8.toml")),
        "--threads".into(),
        "2".into(),
        "--out".into(),
        s(&direct),
    ];
    args.extend(sources.iter().map(|p| s(p)));
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        read_npy_rows(&npy),
        read_npy_rows(&direct),
        "hub embeddings differ from `dermedge embed`"
    );
}

/// The heads of each record the hub holds: `(head, version)` per record, in capture order.
fn hub_heads(db: &Path) -> Vec<Vec<(String, Option<u64>)>> {
    let store = dermedge_hub::store::Store::open(db).unwrap();
    store
        .records(None, None)
        .unwrap()
        .iter()
        .map(|r| {
            let heads: Vec<dermedge_record::HeadResult> =
                serde_json::from_str(&r.heads_json).unwrap();
            heads.into_iter().map(|h| (h.head, h.version)).collect()
        })
        .collect()
}

#[test]
fn a_head_the_hub_trains_from_labels_runs_on_the_device_and_a_tampered_one_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let head = train_image_kind_head(dir);
    let config = x86_config(dir, &head, |t| t.replace("fps = 12", "fps = 4"));
    ok(&["run", "--config", &s(&config)]);

    // A clinician labels the synced records by what they show; the hub trains a head of the
    // same name as the device's own, scores it, and publishes it.
    let db = dir.join("hub.sqlite");
    let store = dermedge_hub::store::Store::open(&db).unwrap();
    let records = store.records(None, None).unwrap();
    assert_eq!(records.len(), 5);
    for r in &records {
        let kind = if r.source.as_deref().unwrap_or("").contains("dermoscopy") {
            "dermoscopy"
        } else {
            "photo"
        };
        store
            .add_label(&r.record_id, None, kind, "dr.ada", 1)
            .unwrap();
    }
    drop(store);
    let (db_arg, key_arg) = (s(&db), s(&dir.join("hub.key")));
    let model = records[0].model_id.clone();
    let trained = ok(&[
        "hub",
        "head",
        "train",
        "--db",
        &db_arg,
        "--key",
        &key_arg,
        "--model",
        &model,
        "--name",
        "image-kind",
    ]);
    let printed = text(&trained.stdout);
    assert!(
        printed.contains("2 classes")
            && printed.contains("dermoscopy")
            && printed.contains("photo"),
        "{printed}"
    );
    let id = printed
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<i64>()
        .unwrap();
    let published = ok(&[
        "hub",
        "head",
        "publish",
        "--db",
        &db_arg,
        "--key",
        &key_arg,
        &id.to_string(),
    ]);
    assert!(
        text(&published.stdout).contains("published as version 1"),
        "{}",
        text(&published.stdout)
    );
    let listed = text(&ok(&["hub", "head", "list", "--db", &db_arg]).stdout);
    assert!(
        listed.contains("image-kind") && listed.contains("published v1"),
        "{listed}"
    );

    // The next run fetches it on sync and keeps it; the run after uses it for every capture.
    let out = ok(&["run", "--config", &s(&config)]);
    let kept = dir.join("queue-heads/image-kind.head");
    assert!(kept.exists(), "{}", text(&out.stderr));
    let out = ok(&["run", "--config", &s(&config)]);
    assert!(
        text(&out.stderr).contains("head image-kind v1 (published by the hub) loaded"),
        "{}",
        text(&out.stderr)
    );
    let runs = hub_heads(&db);
    assert_eq!(runs.len(), 15);
    // The second run switched once, between two captures, and never back.
    let versions: Vec<Option<u64>> = runs[5..10].iter().map(|heads| heads[0].1).collect();
    assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{versions:?}");
    let third = &runs[10..];
    assert!(
        third
            .iter()
            .all(|heads| heads == &vec![("image-kind".to_string(), Some(1))]),
        "{third:?}"
    );
    assert!(
        runs[..5]
            .iter()
            .all(|heads| heads == &vec![("image-kind".to_string(), None)]),
        "the first run used the local head file"
    );

    // A kept head changed on the device's disk is refused at start, the device's own head file
    // runs meanwhile, and the next sync brings the hub's signed head back.
    let published = fs::read(&kept).unwrap();
    let mut bytes = published.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&kept, bytes).unwrap();
    let out = ok(&["run", "--config", &s(&config)]);
    let log = text(&out.stderr);
    assert!(
        log.contains("published head refused: not signed by the hub key"),
        "{log}"
    );
    assert!(log.contains("hub published head image-kind v1"), "{log}");
    assert_eq!(fs::read(&kept).unwrap(), published);
}

#[test]
fn sigterm_loses_no_accepted_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let head = train_image_kind_head(dir);
    let config = x86_config(dir, &head, |t| {
        t.replace("fps = 12", "fps = 20\nlooped = true")
            .replace("hold_frames = 4", "hold_frames = 2")
            .replace("enabled = true", "enabled = false")
    });
    let mut child = Command::new(dermedge_bin())
        .args(["run", "--config", &s(&config)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut accepted = Vec::new();
    let mut lines = stderr.lines();
    let started = Instant::now();
    while accepted.len() < 4 && started.elapsed() < Duration::from_secs(120) {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.split("accepted record ").nth(1) {
            accepted.push(rest.split_whitespace().next().unwrap().to_string());
        }
    }
    assert!(
        accepted.len() >= 4,
        "the device should have accepted captures: {accepted:?}"
    );
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    // Records accepted while the signal was being delivered count too.
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.split("accepted record ").nth(1) {
            accepted.push(rest.split_whitespace().next().unwrap().to_string());
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {:?}", out.status);
    assert!(
        text(&out.stdout).contains("(signal"),
        "{}",
        text(&out.stdout)
    );
    let list = ok(&[
        "queue",
        "list",
        "--queue",
        &s(&dir.join("queue")),
        "--key-file",
        &s(&dir.join("device.key")),
    ]);
    let queued: Vec<String> = text(&list.stdout)
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap().to_string())
        .collect();
    for id in &accepted {
        assert!(
            queued.contains(id),
            "accepted record {id} is not in the queue after SIGTERM"
        );
    }
    assert_eq!(queued.len(), accepted.len());
}

/// The shipped device configs as installed by the bundle: firmware-config/ next to models/,
/// with the model they name (df-mini's files under that name) and a head bound to it.
fn staged_bundle(dir: &Path, head: &Path) -> PathBuf {
    let models = dir.join("models/derm-foundation");
    fs::create_dir_all(&models).unwrap();
    for p in ["int8", "fp32"] {
        fs::copy(
            fixtures().join(format!("df-mini/df-mini.{p}.toml")),
            models.join(format!("derm-foundation.{p}.toml")),
        )
        .unwrap();
        fs::copy(
            fixtures().join(format!("df-mini/df-mini.{p}.tflite")),
            models.join(format!("df-mini.{p}.tflite")),
        )
        .unwrap();
    }
    fs::copy(head, models.join("condition.head.json")).unwrap();
    let configs = dir.join("firmware-config");
    fs::create_dir_all(&configs).unwrap();
    for name in ["pi5-handheld.toml", "jetson-orin-kiosk.toml"] {
        fs::copy(
            root().join("firmware-config").join(name),
            configs.join(name),
        )
        .unwrap();
    }
    configs
}

#[test]
fn each_example_config_broken_five_ways_is_a_clear_error_or_runs_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let head = train_image_kind_head(dir);
    let configs = staged_bundle(dir, &head);
    let x86 = x86_config(dir, &head, |t| t);
    let files = [
        x86.clone(),
        configs.join("pi5-handheld.toml"),
        configs.join("jetson-orin-kiosk.toml"),
    ];
    for file in &files {
        let good = fs::read_to_string(file).unwrap();
        ok(&["config", "check", &s(file)]);
        let threads_line = good
            .lines()
            .find(|l| l.starts_with("threads = "))
            .unwrap()
            .to_string();
        let manifest_line = good
            .lines()
            .find(|l| l.starts_with("manifest = "))
            .unwrap()
            .to_string();
        let accelerator_line = good
            .lines()
            .find(|l| l.starts_with("accelerator = "))
            .unwrap()
            .to_string();
        let broken: [(&str, String, &[&str]); 6] = [
            (
                "an accelerator the backend cannot reach",
                good.replacen(&accelerator_line, "accelerator = \"edge-tpu\"", 1),
                &["model.accelerator", "edge-tpu", "cargo feature `classic`"],
            ),
            (
                "a backend this build lacks",
                good.replacen(
                    &accelerator_line,
                    &format!("{accelerator_line}\nbackend = \"classic\""),
                    1,
                ),
                &["model.backend", "cargo feature `classic`"],
            ),
            (
                "unknown key",
                good.replacen(
                    &threads_line,
                    &format!("{threads_line}\nthread_count = 4"),
                    1,
                ),
                &["thread_count", "unknown field"],
            ),
            (
                "wrong type",
                good.replacen(&threads_line, "threads = \"four\"", 1),
                &["invalid type", "line"],
            ),
            (
                "missing model file",
                good.replacen(&manifest_line, "manifest = \"no-such-model.toml\"", 1),
                &[
                    "model.manifest",
                    "no-such-model.toml",
                    "no such model manifest",
                ],
            ),
            (
                "negative threads",
                good.replacen(&threads_line, "threads = -2", 1),
                &["model.threads", "-2", "1 to 64"],
            ),
        ];
        for (what, text_, expected) in broken {
            let path = file.with_extension("broken.toml");
            fs::write(&path, text_).unwrap();
            let out = dermedge(&["config", "check", &s(&path)]);
            let err = text(&out.stderr);
            assert!(!out.status.success(), "{}: {what} accepted", file.display());
            assert!(
                err.contains("broken.toml"),
                "{what}: the error must name the file: {err}"
            );
            for e in expected {
                assert!(
                    err.contains(e),
                    "{}: {what}: expected {e:?} in: {err}",
                    file.display()
                );
            }
            // The device refuses to start on it, with the same message.
            let run = dermedge(&["run", "--config", &s(&path)]);
            assert!(
                !run.status.success() && text(&run.stderr).contains("broken.toml"),
                "{what}"
            );
        }
        // The backend this build has, named explicitly.
        let path = file.with_extension("litert.toml");
        fs::write(
            &path,
            good.replacen(
                &accelerator_line,
                &format!("{accelerator_line}\nbackend = \"litert\""),
                1,
            ),
        )
        .unwrap();
        ok(&["config", "check", &s(&path)]);
        // An unreachable hub is not a configuration error: the device works offline.
        let offline = good
            .replace(
                "hub = \"http://dermedge-hub.local:8787\"",
                "hub = \"http://127.0.0.1:9\"",
            )
            .replace(
                "hub = \"http://192.168.10.2:8787\"",
                "hub = \"http://127.0.0.1:9\"",
            );
        let path = file.with_extension("offline.toml");
        fs::write(&path, &offline).unwrap();
        ok(&["config", "check", &s(&path)]);
    }

    // x86-dev with an unreachable hub runs offline, keeps its records (sealed to the hub's
    // pinned public key), and syncs later.
    let hub_key = dir.join("later.key");
    let hub_public = dir.join("later.pub");
    ok(&[
        "hub",
        "init",
        "--key",
        &s(&hub_key),
        "--public",
        &s(&hub_public),
    ]);
    let offline = x86_config(dir, &head, |t| {
        t.replace(
            "local_hub = { db = ",
            "hub = \"http://127.0.0.1:9\"\ntimeout_seconds = 1\nfinal_sync_seconds = 1\n# local_hub = { db = ",
        )
        .replace(
            "create_key = true",
            &format!("create_key = true\nhub_public = {:?}", s(&hub_public)),
        )
        .replace("fps = 12", "fps = 4")
    });
    let out = ok(&["run", "--config", &s(&offline)]);
    assert!(
        text(&out.stdout).contains("5 accepted"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("last sync attempt failed"),
        "{}",
        text(&out.stderr)
    );
    let queue = [
        "--queue".to_string(),
        s(&dir.join("queue")),
        "--key-file".into(),
        s(&dir.join("device.key")),
    ];
    let status = ok(&[
        "queue", "status", &queue[0], &queue[1], &queue[2], &queue[3],
    ]);
    assert!(
        text(&status.stdout).contains("5 records waiting"),
        "{}",
        text(&status.stdout)
    );
    // The hub comes back: the same records arrive.
    let db = dir.join("later.sqlite");
    let device_public = dermedge_record::DeviceKey::load(&dir.join("device.key"))
        .unwrap()
        .public()
        .to_string();
    ok(&[
        "hub",
        "enroll",
        "--db",
        &s(&db),
        "--device-id",
        "x86-dev-01",
        "--device-public",
        &device_public,
    ]);
    let mut hub = HubProcess::start(&db, &hub_key);
    let url = hub.url();
    let synced = dermedge(&[
        "sync",
        "--hub",
        &url,
        "--hub-public",
        &s(&hub_public),
        &queue[0],
        &queue[1],
        &queue[2],
        &queue[3],
    ]);
    hub.kill();
    assert!(synced.status.success(), "{}", text(&synced.stderr));
    assert!(
        text(&synced.stdout).contains("synced 5 records"),
        "{}",
        text(&synced.stdout)
    );
}
