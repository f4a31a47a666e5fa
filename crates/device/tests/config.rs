//! Device configuration validation: whatever `LoadedConfig::load` accepts, the run can turn into
//! its settings without panicking; NaN, infinities and out-of-range numbers are refused with the
//! file, the key and the allowed range; the committed configurations stay valid.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dermedge_camera::pace::Pacer;
use dermedge_core::{Accelerator, Backend, Fallback, Ranged, RangedFloat, RgbImage};
use dermedge_device::config::{
    CameraSection, CaptureSection, ConfigError, DeviceConfig, DeviceSection, DisplaySection,
    DisplayTarget, DurabilityMode, LoadedConfig, ModelSection, QueueSection, SourceKind,
    SyncSection, TriggerKind,
};
use dermedge_device::run::Settings;
use dermedge_device::screens;
use dermedge_device::source::open_source;
use dermedge_device::trigger::{thumbnail, AutoTrigger};
use dermedge_display::{Screen, Status, SyncView};
use dermedge_queue::FullPolicy;
use dermedge_record::EmbeddingType;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestRunner};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A directory holding what a generated configuration names: the model manifest (loading checks
/// only that it exists), a replay image, and room for the queue and the screens.
struct Place {
    dir: tempfile::TempDir,
}

impl Place {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("model.toml"), "").unwrap();
        frame().save(dir.path().join("frame.png")).unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write `config` as TOML and load it.
    fn load(&self, config: &toml::Table) -> Result<LoadedConfig, ConfigError> {
        let file = self.path().join("device.toml");
        fs::write(&file, toml::to_string(config).unwrap()).unwrap();
        LoadedConfig::load(&file)
    }
}

fn frame() -> RgbImage {
    RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    })
}

/// A valid configuration whose files live in `place`.
fn base(place: &Path) -> DeviceConfig {
    DeviceConfig {
        device: DeviceSection {
            id: "prop-01".into(),
            key_file: place.join("device.key"),
            create_key: false,
            hub_public: Some(place.join("hub.pub")),
        },
        model: ModelSection {
            manifest: place.join("model.toml"),
            backend: Backend::Litert,
            threads: None,
            accelerator: Accelerator::Cpu,
            fallback: Fallback::Cpu,
            runtime: None,
            weight_cache: None,
            cpu_arithmetic: Default::default(),
        },
        heads: Vec::new(),
        camera: CameraSection {
            source: SourceKind::Replay,
            path: Some(place.join("frame.png")),
            fps: None,
            looped: false,
            hold_frames: Ranged::of(1),
            device: None,
            width: None,
            height: None,
            format: None,
        },
        capture: CaptureSection {
            gpio_value_file: Some(place.join("gpio-value")),
            ..CaptureSection::default()
        },
        quality: Default::default(),
        display: DisplaySection {
            target: DisplayTarget::None,
            size: "320x240".into(),
            dir: Some(place.join("screens")),
            device: Some(place.join("no-framebuffer")),
            pixel_format: None,
            result_seconds: RangedFloat::of_milli(3_000),
            preview_every: Ranged::of(1),
        },
        queue: QueueSection {
            dir: place.join("queue"),
            durability: DurabilityMode::PerRecord,
            group_max_records: Ranged::of(16),
            group_max_delay_ms: Ranged::of(200),
            max_bytes: Ranged::of(1 << 30),
            max_records: Ranged::of(1_000_000),
            full_policy: FullPolicy::Reject,
            embedding: EmbeddingType::F32,
            thumbnail_side: Ranged::of(96),
        },
        sync: SyncSection {
            hub: Some("http://127.0.0.1:9".into()),
            ..SyncSection::default()
        },
        health: Default::default(),
        run: Default::default(),
    }
}

/// One numeric key: its dotted name in the file and its documented range
/// (firmware-config/README.md). Values are set in the TOML text itself, so that values outside
/// the range (which the typed configuration cannot hold) reach the parser.
struct Key<T> {
    name: &'static str,
    lo: T,
    hi: T,
    /// May be left unset.
    optional: bool,
}

/// Set `name` (`section.key`, or `display.size (width|height)`) in the configuration's TOML.
fn set_key(table: &mut toml::Table, name: &str, value: toml::Value) {
    if let Some(side) = name.strip_prefix("display.size (") {
        let display = table["display"].as_table_mut().unwrap();
        let size = display["size"].as_str().unwrap().to_string();
        let (w, h) = size.split_once('x').unwrap();
        let value = value.as_integer().unwrap().to_string();
        let size = if side.starts_with("width") {
            format!("{value}x{h}")
        } else {
            format!("{w}x{value}")
        };
        display.insert("size".into(), toml::Value::String(size));
        return;
    }
    let (section, key) = name.split_once('.').unwrap();
    table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert(key.into(), value);
}

fn float_keys() -> Vec<Key<f64>> {
    let key = |name, lo, hi| Key {
        name,
        lo,
        hi,
        optional: false,
    };
    vec![
        Key {
            optional: true,
            ..key("camera.fps", 0.01, 120.0)
        },
        key("capture.stillness", 0.0, 255.0),
        key("quality.min_mean_luminance", 0.0, 255.0),
        key("quality.max_mean_luminance", 0.0, 255.0),
        key("quality.max_clipped_dark", 0.0, 1.0),
        key("quality.max_clipped_bright", 0.0, 1.0),
        key("quality.min_sharpness", 0.0, 1e6),
        Key {
            optional: true,
            ..key("quality.max_colour_cast", 0.0, 255.0)
        },
        key("display.result_seconds", 0.0, 60.0),
        key("sync.interval_seconds", 1.0, 86_400.0),
        key("sync.timeout_seconds", 0.1, 600.0),
        key("sync.final_sync_seconds", 0.0, 600.0),
        key("health.interval_seconds", 1.0, 86_400.0),
    ]
}

fn integer_keys() -> Vec<Key<i64>> {
    let key = |name, lo, hi| Key {
        name,
        lo,
        hi,
        optional: false,
    };
    let optional = |name, lo, hi| Key {
        optional: true,
        ..key(name, lo, hi)
    };
    vec![
        optional("model.threads", 1, 64),
        optional("camera.width", 16, 8192),
        optional("camera.height", 16, 8192),
        key("camera.hold_frames", 1, 100),
        key("capture.stable_frames", 1, 100),
        optional("capture.max_captures", 1, i64::MAX),
        key("display.size (width)", 96, 4096),
        key("display.size (height)", 96, 4096),
        key("display.preview_every", 1, 1000),
        key("queue.group_max_records", 1, 100_000),
        key("queue.group_max_delay_ms", 1, 600_000),
        key("queue.max_bytes", 8 << 20, i64::MAX),
        key("queue.max_records", 1, i64::MAX),
        key("queue.thumbnail_side", 0, 1024),
        key("sync.batch_records", 1, 10_000),
    ]
}

/// A value no configuration may get through, or one on the very edge: NaN, infinities,
/// negative, zero, subnormal, just outside the range, huge; `random` for the last class.
fn float_bait(class: usize, lo: f64, hi: f64, random: f64) -> f64 {
    [
        f64::NAN,
        -f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1.0,
        -0.0,
        0.0,
        5e-324,
        1e-310,
        lo - 1e-6,
        hi + 1e-6,
        1e300,
        f64::MAX,
        random,
    ][class % 14]
}

fn integer_bait(class: usize, lo: i64, hi: i64, random: i64) -> i64 {
    [
        i64::MIN,
        -1,
        0,
        lo.saturating_sub(1),
        hi.saturating_add(1),
        u32::MAX as i64 + 1,
        1 << 53,
        i64::MAX,
        random,
    ][class % 9]
}

/// A value in `lo..=hi`, the ends more often than chance would pick them.
fn in_range<T>(lo: T, hi: T) -> BoxedStrategy<T>
where
    T: Copy + std::fmt::Debug + 'static,
    std::ops::RangeInclusive<T>: Strategy<Value = T>,
{
    prop_oneof![8 => lo..=hi, 1 => select(vec![lo, hi])].boxed()
}

/// One generated case: the choices, every numeric key's value in its documented range (`None`:
/// left unset), and up to two keys given bait instead.
#[derive(Debug, Clone)]
struct Case {
    source: SourceKind,
    trigger: TriggerKind,
    target: DisplayTarget,
    durability: DurabilityMode,
    full_policy: FullPolicy,
    embedding: EmbeddingType,
    looped: bool,
    sync: bool,
    floats: Vec<Option<f64>>,
    integers: Vec<Option<i64>>,
    /// (key, bait class, random float, random integer); keys index floats, then integers.
    baits: Vec<(usize, usize, f64, i64)>,
}

fn cases() -> impl Strategy<Value = Case> {
    let floats: Vec<_> = float_keys()
        .iter()
        .map(|k| {
            let value = in_range(k.lo, k.hi);
            if k.optional {
                proptest::option::weighted(0.7, value).boxed()
            } else {
                value.prop_map(Some).boxed()
            }
        })
        .collect();
    let integers: Vec<_> = integer_keys()
        .iter()
        .map(|k| {
            // Mostly small screens: a 4096×4096 canvas is slow to draw in a debug build.
            let value = if k.name.starts_with("display.size") {
                prop_oneof![8 => 96i64..=800, 1 => select(vec![96i64, 4096])].boxed()
            } else {
                in_range(k.lo, k.hi)
            };
            if k.optional {
                proptest::option::weighted(0.7, value).boxed()
            } else {
                value.prop_map(Some).boxed()
            }
        })
        .collect();
    let keys = float_keys().len() + integer_keys().len();
    let choices = (
        select(vec![
            SourceKind::Replay,
            SourceKind::Synthetic,
            SourceKind::Uvc,
        ]),
        select(vec![TriggerKind::Auto, TriggerKind::Key, TriggerKind::Gpio]),
        select(vec![
            DisplayTarget::Png,
            DisplayTarget::Framebuffer,
            DisplayTarget::Simulator,
            DisplayTarget::None,
        ]),
        select(vec![DurabilityMode::PerRecord, DurabilityMode::Group]),
        select(vec![FullPolicy::Reject, FullPolicy::EvictOldest]),
        select(vec![EmbeddingType::F32, EmbeddingType::F16]),
        any::<bool>(),
        any::<bool>(),
    );
    let baits = proptest::collection::vec((0..keys, 0..14usize, any::<f64>(), any::<i64>()), 0..=2);
    (choices, floats, integers, baits).prop_map(
        |(
            (source, trigger, target, durability, full_policy, embedding, looped, sync),
            floats,
            integers,
            baits,
        )| Case {
            source,
            trigger,
            target,
            durability,
            full_policy,
            embedding,
            looped,
            sync,
            floats,
            integers,
            baits,
        },
    )
}

impl Case {
    /// The configuration as TOML, and the keys given bait that lies outside their documented
    /// range (as the configuration holds the value: quality thresholds are f32).
    fn config(&self, place: &Path) -> (toml::Table, Vec<String>) {
        let mut c = base(place);
        c.camera.source = self.source;
        c.camera.looped = self.looped;
        c.capture.trigger = self.trigger;
        c.display.target = self.target;
        c.queue.durability = self.durability;
        c.queue.full_policy = self.full_policy;
        c.queue.embedding = self.embedding;
        c.sync.enabled = self.sync;
        let mut table = toml::Table::try_from(&c).unwrap();
        let (fk, ik) = (float_keys(), integer_keys());
        let mut floats: BTreeMap<&str, f64> = BTreeMap::new();
        for (k, v) in fk.iter().zip(&self.floats) {
            if let Some(v) = v {
                floats.insert(k.name, *v);
            }
        }
        let (lo, hi) = ("quality.min_mean_luminance", "quality.max_mean_luminance");
        if let (Some(&a), Some(&b)) = (floats.get(lo), floats.get(hi)) {
            if a > b {
                floats.insert(lo, b);
                floats.insert(hi, a);
            }
        }
        for (name, v) in floats {
            set_key(&mut table, name, toml::Value::Float(v));
        }
        for (k, v) in ik.iter().zip(&self.integers) {
            if let Some(v) = v {
                set_key(&mut table, k.name, toml::Value::Integer(*v));
            }
        }
        // A key baited twice holds the second bait.
        let mut outside = BTreeMap::new();
        for &(key, class, random_float, random_integer) in &self.baits {
            outside.remove(&key);
            if let Some(k) = fk.get(key) {
                let v = float_bait(class, k.lo, k.hi, random_float);
                set_key(&mut table, k.name, toml::Value::Float(v));
                let held = if k.name.starts_with("quality.") {
                    v as f32 as f64
                } else {
                    v
                };
                if !(k.lo..=k.hi).contains(&held) {
                    outside.insert(key, format!("{} = {v}", k.name));
                }
            } else {
                let k = &ik[key - fk.len()];
                let v = integer_bait(class, k.lo, k.hi, random_integer);
                set_key(&mut table, k.name, toml::Value::Integer(v));
                if !(k.lo..=k.hi).contains(&v) {
                    outside.insert(key, format!("{} = {v}", k.name));
                }
            }
        }
        let outside = outside.into_values().collect();
        (table, outside)
    }
}

/// What `run` derives from an accepted configuration before it needs a model or a camera, and
/// the first uses it makes of each: none of it may panic.
fn derive_everything(loaded: &LoadedConfig) {
    let c = &loaded.config;
    let settings = Settings::new(loaded);
    settings
        .queue
        .validate()
        .expect("the queue accepts the options an accepted configuration gives it");
    settings.pipeline.quality.validate().unwrap();
    let image = frame();
    let verdict = settings.pipeline.quality.judge(&image);
    assert_eq!(verdict.accepted, verdict.issues.is_empty());

    let mut auto = AutoTrigger::new(settings.stable_frames, settings.stillness);
    for sharp in [true, true, false, true] {
        auto.observe(thumbnail(&image), sharp);
    }
    let now = Instant::now();
    for wait in [
        settings.result_for,
        settings.health_interval,
        settings.sync_timeout,
        settings.sync_interval,
        settings.final_sync,
    ] {
        assert!(now.checked_add(wait).is_some(), "{wait:?}");
    }
    assert_eq!(
        7 % settings.preview_every,
        7 % c.display.preview_every.get()
    );
    assert!(settings.sync_batch_records >= 1);
    assert!(settings.max_captures.is_none_or(|m| m >= 1));

    // The source, as the capture thread opens it (and one replayed frame: the first is not paced).
    let _ = Pacer::new(c.camera.fps.map(RangedFloat::get));
    if let Ok(mut source) = open_source(&c.camera) {
        if c.camera.source == SourceKind::Replay {
            source.next_frame().unwrap().unwrap();
        }
    }

    // The screens at the configured size; a framebuffer or simulator that is not there is an
    // error, not a panic.
    if let Ok(mut out) = screens::open(&c.display, settings.display_size) {
        let status = Status {
            device: c.device.id.clone(),
            queue_depth: 3,
            sync: SyncView::Waiting,
            captures: 1,
        };
        let screen = Screen::Preview {
            frame: &image,
            hint: "Hold still",
        };
        out.show(&screen, &status).unwrap();
    }
}

#[test]
fn whatever_validation_accepts_runs_without_panicking() {
    let place = Place::new();
    let (accepted, refused) = (Cell::new(0u32), Cell::new(0u32));
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&cases(), |case| {
            let (config, outside) = case.config(place.path());
            match place.load(&config) {
                Ok(loaded) => {
                    accepted.set(accepted.get() + 1);
                    prop_assert!(outside.is_empty(), "accepted {outside:?}");
                    derive_everything(&loaded);
                }
                Err(e) => {
                    refused.set(refused.get() + 1);
                    let text = e.to_string();
                    prop_assert!(
                        !case.baits.is_empty(),
                        "values in the documented ranges refused: {text}"
                    );
                    prop_assert!(text.contains("device.toml"), "{text}");
                    prop_assert!(
                        e.message.contains("allowed range") || e.key == "display.size",
                        "{text}"
                    );
                }
            }
            Ok(())
        })
        .unwrap();
    // Both sides of the boundary were exercised.
    let (accepted, refused) = (accepted.get(), refused.get());
    assert!(
        accepted >= 400 && refused >= 400,
        "{accepted} accepted, {refused} refused"
    );
}

/// A committed configuration as the bundle installs it (`firmware-config/` beside `models/`),
/// with every file it must name present, and with `edit` applied to its text.
fn staged(name: &str, edit: impl FnOnce(String) -> String) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let configs = tmp.path().join("firmware-config");
    fs::create_dir_all(&configs).unwrap();
    let text = fs::read_to_string(root().join("firmware-config").join(name)).unwrap();
    let raw: DeviceConfig = toml::from_str(&text).unwrap();
    let mut named = vec![raw.model.manifest.clone()];
    named.extend(raw.heads.iter().cloned());
    if raw.camera.source == SourceKind::Replay {
        named.extend(raw.camera.path.clone());
    }
    for path in named {
        let path = configs.join(path);
        if path.extension().is_some() {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, "").unwrap();
        } else {
            fs::create_dir_all(&path).unwrap();
        }
    }
    let file = configs.join(name);
    fs::write(&file, edit(text)).unwrap();
    (tmp, file)
}

const COMMITTED: [&str; 3] = [
    "x86-dev.toml",
    "pi5-handheld.toml",
    "jetson-orin-kiosk.toml",
];

#[test]
fn the_committed_configs_pass_validation() {
    let on_disk: Vec<String> = fs::read_dir(root().join("firmware-config"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    for name in &on_disk {
        assert!(COMMITTED.contains(&name.as_str()), "{name} is not tested");
    }
    for name in COMMITTED {
        let (_tmp, file) = staged(name, |t| t);
        let loaded = LoadedConfig::load(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        derive_everything(&loaded);
    }
    let (_tmp, file) = staged("pi5-handheld.toml", |t| t);
    let settings = Settings::new(&LoadedConfig::load(&file).unwrap());
    assert_eq!(
        settings.queue.durability,
        dermedge_queue::Durability::Group {
            max_records: 8,
            max_delay_ms: 250
        }
    );
    assert_eq!(settings.display_size, (320, 240));
    assert_eq!(settings.result_for.as_secs_f64(), 4.0);
    assert_eq!(settings.sync_timeout.as_secs_f64(), 15.0);
    assert_eq!(settings.pipeline.quality.min_sharpness, 9.0);
}

/// The error loading x86-dev.toml with `edit` applied.
fn refused(edit: impl FnOnce(String) -> String) -> ConfigError {
    let (_tmp, file) = staged("x86-dev.toml", edit);
    LoadedConfig::load(&file).expect_err("accepted")
}

fn assert_names(e: &ConfigError, key: &str, range: &str) {
    let text = e.to_string();
    assert!(text.contains("x86-dev.toml"), "the file: {text}");
    assert_eq!(e.key, key, "{text}");
    assert!(
        text.contains(&format!("allowed range {range}")),
        "the range: {text}"
    );
}

#[test]
fn nan_or_infinite_min_sharpness_is_refused() {
    for value in ["nan", "+nan", "-nan", "inf", "+inf", "-inf"] {
        let e = refused(|t| format!("{t}\n[quality]\nmin_sharpness = {value}\n"));
        assert_names(&e, "quality.min_sharpness", "0 to 1000000");
    }
    let e = refused(|t| format!("{t}\n[quality]\nmax_colour_cast = nan\n"));
    assert_names(&e, "quality.max_colour_cast", "0 to 255");
}

#[test]
fn nan_negative_or_endless_durations_are_refused() {
    let cases = [
        (
            "result_seconds = 0.5",
            "result_seconds = nan",
            "display.result_seconds",
            "0 to 60",
        ),
        (
            "result_seconds = 0.5",
            "result_seconds = -0.5",
            "display.result_seconds",
            "0 to 60",
        ),
        (
            "[sync]\n",
            "[sync]\ntimeout_seconds = -1.0\n",
            "sync.timeout_seconds",
            "0.1 to 600",
        ),
        (
            "[sync]\n",
            "[sync]\nfinal_sync_seconds = inf\n",
            "sync.final_sync_seconds",
            "0 to 600",
        ),
        (
            "[health]\ninterval_seconds = 2",
            "[health]\ninterval_seconds = -2",
            "health.interval_seconds",
            "1 to 86400",
        ),
        (
            "[health]\ninterval_seconds = 2",
            "[health]\ninterval_seconds = nan",
            "health.interval_seconds",
            "1 to 86400",
        ),
        // 1 / fps is the frame interval: a tiny rate would be an endless one.
        ("fps = 12", "fps = 1e-310", "camera.fps", "0.01 to 120"),
        ("fps = 12", "fps = nan", "camera.fps", "0.01 to 120"),
    ];
    for (from, to, key, range) in cases {
        let e = refused(|t| {
            assert!(t.contains(from), "{from}");
            t.replacen(from, to, 1)
        });
        assert_names(&e, key, range);
    }
}

#[test]
fn counts_are_range_checked_before_any_cast() {
    // A synthetic camera uses width and height too, not only a UVC one.
    let e = refused(|t| {
        t.replace("source = \"replay\"", "source = \"synthetic\"")
            .replace("fps = 12", "fps = 12\nwidth = -640")
    });
    assert_names(&e, "camera.width", "16 to 8192");
    // The queue needs room for two segments; less passed `config check` but failed at run.
    let e = refused(|t| t.replace("[queue]\n", "[queue]\nmax_bytes = 1048576\n"));
    assert_names(&e, "queue.max_bytes", "8388608 to 9223372036854775807");
    let e = refused(|t| t.replace("size = \"320x240\"", "size = \"4294967392x240\""));
    assert_eq!(e.key, "display.size", "{e}");
}

#[test]
fn enumerated_keys_are_typed_and_a_bad_value_names_its_key() {
    let cases = [
        (
            "accelerator = \"cpu\"",
            "accelerator = \"tpu\"",
            "model.accelerator",
        ),
        (
            "[model]\n",
            "[model]\nbackend = \"tensorflow\"\n",
            "model.backend",
        ),
        (
            "[model]\n",
            "[model]\nfallback = \"gpu\"\n",
            "model.fallback",
        ),
        (
            "[queue]\n",
            "[queue]\ndurability = \"sometimes\"\n",
            "queue.durability",
        ),
        (
            "[queue]\n",
            "[queue]\nfull_policy = \"drop\"\n",
            "queue.full_policy",
        ),
        (
            "[queue]\n",
            "[queue]\nembedding = \"f64\"\n",
            "queue.embedding",
        ),
        (
            "[display]\n",
            "[display]\npixel_format = \"bgr24\"\n",
            "display.pixel_format",
        ),
        (
            "[camera]\n",
            "[camera]\nformat = \"h264\"\n",
            "camera.format",
        ),
        (
            "[model]\n",
            "[model]\nthread_count = 2\n",
            "model.thread_count",
        ),
    ];
    for (from, to, key) in cases {
        let e = refused(|t| {
            assert!(t.contains(from), "{from}");
            t.replacen(from, to, 1)
        });
        assert_eq!(e.key, key, "{to}: {e}");
        assert!(e.message.contains("line"), "{e}");
    }
    // The typed values reach the run's settings.
    let (_tmp, file) = staged("x86-dev.toml", |t| {
        t.replacen(
            "[model]\n",
            "[model]\nbackend = \"classic\"\nfallback = \"fail\"\n",
            1,
        )
        .replacen(
            "embedding = \"f32\"",
            "full_policy = \"evict-oldest\"\nembedding = \"f16\"",
            1,
        )
    });
    let loaded = LoadedConfig::load(&file).unwrap();
    assert_eq!(loaded.config.model.backend, Backend::Classic);
    assert_eq!(loaded.config.model.fallback, Fallback::Fail);
    let settings = Settings::new(&loaded);
    assert_eq!(settings.queue.full_policy, FullPolicy::EvictOldest);
    assert_eq!(settings.pipeline.embedding_type, EmbeddingType::F16);
}

#[test]
fn a_pinned_hub_certificate_must_exist_and_needs_an_https_hub() {
    fn with_hub(hub: &'static str, ca: &'static str) -> impl FnOnce(String) -> String {
        move |t| {
            t.replace(
                "[sync]\n",
                &format!("[sync]\nhub = \"{hub}\"\nhub_ca = \"{ca}\"\n"),
            )
        }
    }
    let e = refused(with_hub("https://hub.clinic:8443", "no-such-hub.crt"));
    assert_eq!(e.key, "sync.hub_ca", "{e}");
    assert!(e.to_string().contains("no-such-hub.crt"), "{e}");

    let e = refused(with_hub("http://hub.clinic:8787", "x86-dev.toml"));
    assert_eq!(e.key, "sync.hub_ca", "{e}");
    assert!(
        e.to_string().contains("only used for an https:// hub"),
        "{e}"
    );

    // An existing certificate with an https:// hub is accepted.
    let (_tmp, file) = staged(
        "x86-dev.toml",
        with_hub("https://hub.clinic:8443", "x86-dev.toml"),
    );
    let loaded = LoadedConfig::load(&file).unwrap();
    assert!(loaded
        .config
        .sync
        .hub_ca
        .unwrap()
        .ends_with("firmware-config/x86-dev.toml"));
}
