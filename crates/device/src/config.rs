//! Per-device configuration (`firmware-config/*.toml`): schema, defaults, validation.
//!
//! Every error names the file, the key and what was expected. Relative paths are relative to the
//! configuration file's directory.

use std::path::{Path, PathBuf};

use dermedge_camera::RawFormat;
use dermedge_core::bounds::{Bounds, OutOfBounds, Ranged, RangedFloat};
use dermedge_core::quality::QualityThresholds;
use dermedge_core::{Accelerator, Backend, CpuArithmetic, Fallback};
use dermedge_display::framebuffer::FramebufferLayout;
use dermedge_queue::{FullPolicy, DEFAULT_SEGMENT_BYTES};
use dermedge_record::EmbeddingType;
use serde::{Deserialize, Serialize};

/// The upper end of a count that needs none: TOML integers stop at `i64::MAX`.
const NO_LIMIT: u64 = i64::MAX as u64;
/// The queue needs room for at least two of its segments.
const MIN_QUEUE_BYTES: u64 = 2 * DEFAULT_SEGMENT_BYTES;

#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub device: DeviceSection,
    pub model: ModelSection,
    /// Head files run on every capture (`dermedge-head/1` JSON).
    #[serde(default)]
    pub heads: Vec<PathBuf>,
    pub camera: CameraSection,
    #[serde(default)]
    pub capture: CaptureSection,
    #[serde(default)]
    pub quality: QualityThresholds,
    pub display: DisplaySection,
    pub queue: QueueSection,
    #[serde(default)]
    pub sync: SyncSection,
    #[serde(default)]
    pub health: HealthSection,
    #[serde(default)]
    pub run: RunSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// 1–128 printable characters; the hub knows the device by it.
    pub id: String,
    /// The device key (64 hex digits; `dermedge keygen`).
    pub key_file: PathBuf,
    /// Make the key on first start if the file does not exist (development devices).
    #[serde(default)]
    pub create_key: bool,
    /// The clinic hub's public key (`hub.pub`, from `dermedge hub init`), pinned at enrollment:
    /// records are sealed to it and the hub's replies are checked against it. Required unless
    /// `sync.local_hub` provides one.
    #[serde(default)]
    pub hub_public: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The model's manifest (.toml next to the .tflite).
    pub manifest: PathBuf,
    /// The runtime backend: `litert` (CPU, GPU, NPU) or `classic` (CPU, Edge TPU). `config
    /// check` refuses one this build lacks, naming the cargo feature.
    #[serde(default)]
    pub backend: Backend,
    /// Inference threads, 1–64 (default: every core).
    pub threads: Option<Ranged<1, 64>>,
    /// cpu, gpu, npu or edge-tpu (the backend must reach it).
    #[serde(default)]
    pub accelerator: Accelerator,
    /// What to do when the accelerator is unavailable: `cpu` (log and fall back) or `fail`.
    #[serde(default)]
    pub fallback: Fallback,
    /// The LiteRT runtime library (file or directory) instead of the search path.
    pub runtime: Option<PathBuf>,
    /// XNNPACK weight cache file (CPU): made on the first start, mapped on later ones.
    pub weight_cache: Option<PathBuf>,
    /// Arithmetic of float ops on the CPU: `fp32`, or `fp16` (XNNPACK's float16, native on
    /// Cortex-A76 / A78AE; falls back to fp32 per `fallback` where the CPU lacks it).
    #[serde(default)]
    pub cpu_arithmetic: CpuArithmetic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Image files or a raw recording, paced at `fps`.
    Replay,
    /// A USB dermatoscope (UVC).
    Uvc,
    /// Generated frames.
    Synthetic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraSection {
    pub source: SourceKind,
    /// replay: an image file, a directory, `dir/pattern`, or a `.dmraw` recording.
    pub path: Option<PathBuf>,
    /// Frames per second (replay, synthetic: pacing; uvc: requested), 0.01–120.
    pub fps: Option<RangedFloat<10, 120_000>>,
    /// replay: start again at the end.
    #[serde(default)]
    pub looped: bool,
    /// replay: show each image for this many frames, as a held camera would (1–100).
    #[serde(default = "one")]
    pub hold_frames: Ranged<1, 100>,
    /// uvc: device index or name (default: the first).
    pub device: Option<String>,
    /// uvc: requested resolution.
    pub width: Option<Ranged<16, 8192>>,
    pub height: Option<Ranged<16, 8192>>,
    /// uvc: mjpeg, yuyv, nv12 or grey (default: negotiated).
    pub format: Option<RawFormat>,
}

fn one<const MAX: u64>() -> Ranged<1, MAX> {
    Ranged::of(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TriggerKind {
    /// When the frame has been still for `stable_frames` frames and is sharp (or has been still
    /// long enough that the quality gate should explain why not).
    Auto,
    /// A line on standard input (a key press on a kiosk keyboard, a foot switch as keyboard).
    Key,
    /// A rising edge on a GPIO line, read from its sysfs `value` file.
    Gpio,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureSection {
    pub trigger: TriggerKind,
    /// auto: consecutive still frames needed (1–100).
    pub stable_frames: Ranged<1, 100>,
    /// auto: mean absolute change of the 32×32 luminance thumbnail (0–255) below which a frame
    /// counts as still.
    pub stillness: RangedFloat<0, 255_000>,
    /// gpio: the line's value file, e.g. /sys/class/gpio/gpio17/value.
    pub gpio_value_file: Option<PathBuf>,
    /// Stop after this many accepted captures (default: run until stopped or the source ends).
    pub max_captures: Option<Ranged<1, NO_LIMIT>>,
}

impl Default for CaptureSection {
    fn default() -> Self {
        Self {
            trigger: TriggerKind::Auto,
            stable_frames: Ranged::of(3),
            stillness: RangedFloat::of_milli(4_000),
            gpio_value_file: None,
            max_captures: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DisplayTarget {
    /// PNG snapshots of each screen (headless).
    Png,
    /// A Linux framebuffer device.
    Framebuffer,
    /// A desktop window (built with the `simulator` feature).
    Simulator,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisplaySection {
    pub target: DisplayTarget,
    /// `WIDTHxHEIGHT`; layouts are tested at 240x240, 320x240 and 800x480.
    #[serde(default = "default_size")]
    pub size: String,
    /// png: where snapshots go.
    pub dir: Option<PathBuf>,
    /// framebuffer: the device, e.g. /dev/fb0 (or /dev/fb1 for an SPI panel).
    pub device: Option<PathBuf>,
    /// framebuffer: `rgb565` or `xrgb8888` when the device does not report its layout.
    pub pixel_format: Option<FramebufferLayout>,
    /// How long a result or refusal stays before the preview returns (0–60 s).
    #[serde(default = "default_result_seconds")]
    pub result_seconds: RangedFloat<0, 60_000>,
    /// Redraw the preview every this many frames (1–1000).
    #[serde(default = "one")]
    pub preview_every: Ranged<1, 1000>,
}

fn default_size() -> String {
    "320x240".into()
}

fn default_result_seconds() -> RangedFloat<0, 60_000> {
    RangedFloat::of_milli(3_000)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    pub dir: PathBuf,
    /// `per-record` (fsync each) or `group`.
    #[serde(default)]
    pub durability: DurabilityMode,
    #[serde(default = "default_group_records")]
    pub group_max_records: Ranged<1, 100_000>,
    #[serde(default = "default_group_delay")]
    pub group_max_delay_ms: Ranged<1, 600_000>,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: Ranged<MIN_QUEUE_BYTES, NO_LIMIT>,
    #[serde(default = "default_max_records")]
    pub max_records: Ranged<1, NO_LIMIT>,
    /// `reject` or `evict-oldest`.
    #[serde(default = "default_full_policy")]
    pub full_policy: FullPolicy,
    /// `f32` or `f16`.
    #[serde(default = "default_embedding")]
    pub embedding: EmbeddingType,
    /// Longest side of the JPEG thumbnail kept with each record; 0 keeps none.
    #[serde(default = "default_thumbnail")]
    pub thumbnail_side: Ranged<0, 1024>,
}

/// When a queued record is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityMode {
    /// Each record before it is reported saved.
    #[default]
    PerRecord,
    /// Groups of up to `group_max_records`, at most `group_max_delay_ms` after the first.
    Group,
}
fn default_group_records() -> Ranged<1, 100_000> {
    Ranged::of(16)
}
fn default_group_delay() -> Ranged<1, 600_000> {
    Ranged::of(200)
}
fn default_max_bytes() -> Ranged<MIN_QUEUE_BYTES, NO_LIMIT> {
    Ranged::of(1 << 30)
}
fn default_max_records() -> Ranged<1, NO_LIMIT> {
    Ranged::of(1_000_000)
}
fn default_full_policy() -> FullPolicy {
    FullPolicy::Reject
}
fn default_embedding() -> EmbeddingType {
    EmbeddingType::F32
}
fn default_thumbnail() -> Ranged<0, 1024> {
    Ranged::of(96)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalHubSection {
    /// The hub's SQLite database.
    pub db: PathBuf,
    /// The hub's key file (made on first start); its public key is the one records are sealed to.
    pub key: PathBuf,
    /// host:port (port 0: any free port).
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:0".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    pub enabled: bool,
    /// http://host:port or https://host:port. An unreachable hub is not an error: the device
    /// works offline and syncs when the hub answers.
    pub hub: Option<String>,
    /// For an https:// hub: the PEM certificate(s) to trust (the hub's own, or the clinic's CA)
    /// instead of the public web's roots.
    pub hub_ca: Option<PathBuf>,
    /// Seconds between sync attempts (1–86400).
    pub interval_seconds: RangedFloat<1_000, 86_400_000>,
    /// Records per batch (1–10000).
    pub batch_records: Ranged<1, 10_000>,
    /// Seconds a batch may take (0.1–600).
    pub timeout_seconds: RangedFloat<100, 600_000>,
    /// Development: run a hub in this process (and enroll this device in it).
    pub local_hub: Option<LocalHubSection>,
    /// On a normal end (source finished), try to push what is left before exiting (0–600 s).
    pub final_sync_seconds: RangedFloat<0, 600_000>,
}

impl Default for SyncSection {
    fn default() -> Self {
        Self {
            enabled: false,
            hub: None,
            hub_ca: None,
            interval_seconds: RangedFloat::of_milli(30_000),
            batch_records: Ranged::of(64),
            timeout_seconds: RangedFloat::of_milli(10_000),
            local_hub: None,
            final_sync_seconds: RangedFloat::of_milli(10_000),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    /// Seconds between health log lines (1–86400).
    pub interval_seconds: RangedFloat<1_000, 86_400_000>,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            interval_seconds: RangedFloat::of_milli(10_000),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Where to write the run summary (JSON) at the end.
    pub summary: Option<PathBuf>,
}

/// A validated configuration with paths resolved.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub config: DeviceConfig,
    pub display_size: (u32, u32),
}

fn existing(file: &Path, key: &str, path: &Path, what: &str) -> Result<(), ConfigError> {
    if !path.exists() {
        return Err(ConfigError {
            file: file.into(),
            key: key.into(),
            message: format!("{}: no such {what}", path.display()),
        });
    }
    Ok(())
}

/// `path` with `.` and `dir/..` pairs removed, so that messages name `/x/out/queue` rather than
/// `/x/firmware-config/../out/queue`. `base` is already the configuration's real directory, so
/// a `..` here climbs out of it as the file system would.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            // `/..` is `/`.
            Component::ParentDir if out.has_root() && out.parent().is_none() => {}
            other => out.push(other),
        }
    }
    out
}

/// The dotted key whose line holds byte `at` of a TOML document: `section.key` for a
/// `key = value` line, the section for a `[section]` header, or `(syntax)` where there is none.
fn key_at(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let header = |line: &str| {
        let line = line.trim();
        line.strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .map(|name| name.trim_matches(['[', ' ']).to_string())
    };
    let line = &text[start..end];
    if let Some(section) = header(line) {
        return section;
    }
    let section = text[..start].lines().rev().find_map(header);
    match line.split_once('=') {
        Some((key, _)) => {
            let key = key.trim().trim_matches('"');
            match section {
                Some(s) => format!("{s}.{key}"),
                None => key.to_string(),
            }
        }
        None => section.unwrap_or_else(|| "(syntax)".into()),
    }
}

pub fn parse_size(text: &str) -> Option<(u32, u32)> {
    let (w, h) = text.split_once(['x', 'X'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

impl LoadedConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: path.into(),
            key: key.into(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err("(file)", e.to_string()))?;
        let mut config: DeviceConfig = toml::from_str(&text).map_err(|e| {
            let (key, place) = match e.span() {
                Some(span) => {
                    let line = text[..span.start].matches('\n').count() + 1;
                    (key_at(&text, span.start), format!(" (line {line})"))
                }
                None => ("(syntax)".to_string(), String::new()),
            };
            err(&key, format!("{}{place}", e.message()))
        })?;
        // Relative paths follow the real file, so a symlinked config (device.toml) still finds
        // the models next to it.
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let base = real.parent().unwrap_or(Path::new(".")).to_path_buf();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = lexically_normal(&base.join(&*p));
            }
        };
        resolve(&mut config.device.key_file);
        if let Some(p) = config.device.hub_public.as_mut() {
            resolve(p);
        }
        if let Some(p) = config.sync.hub_ca.as_mut() {
            resolve(p);
        }
        resolve(&mut config.model.manifest);
        if let Some(r) = config.model.runtime.as_mut() {
            resolve(r);
        }
        if let Some(w) = config.model.weight_cache.as_mut() {
            resolve(w);
        }
        config.heads.iter_mut().for_each(resolve);
        if let Some(p) = config.camera.path.as_mut() {
            resolve(p);
        }
        if let Some(p) = config.capture.gpio_value_file.as_mut() {
            resolve(p);
        }
        if let Some(p) = config.display.dir.as_mut() {
            resolve(p);
        }
        resolve(&mut config.queue.dir);
        if let Some(h) = config.sync.local_hub.as_mut() {
            resolve(&mut h.db);
            resolve(&mut h.key);
        }
        if let Some(p) = config.run.summary.as_mut() {
            resolve(p);
        }
        let display_size = validate(path, &config)?;
        Ok(Self {
            path: path.into(),
            config,
            display_size,
        })
    }
}

/// Allowed `display.size` width and height.
pub const DISPLAY_SIDE: Bounds<u32> = Bounds::new(96, 4096);

fn validate(file: &Path, c: &DeviceConfig) -> Result<(u32, u32), ConfigError> {
    let err = |key: &str, message: String| ConfigError {
        file: file.into(),
        key: key.into(),
        message,
    };
    let out_of_bounds = |e: OutOfBounds| err(e.key, e.message);
    let id = &c.device.id;
    if id.is_empty() || id.len() > 128 || id.chars().any(|ch| ch.is_control()) {
        return Err(err(
            "device.id",
            format!("{id:?}: expected 1 to 128 printable characters"),
        ));
    }
    c.quality.validate().map_err(|e| ConfigError {
        file: file.into(),
        key: format!("quality.{}", e.key),
        message: e.message,
    })?;
    existing(file, "model.manifest", &c.model.manifest, "model manifest")?;
    if let Some(r) = &c.model.runtime {
        existing(file, "model.runtime", r, "runtime library")?;
    }
    for (i, h) in c.heads.iter().enumerate() {
        existing(file, &format!("heads[{i}]"), h, "head file")?;
    }
    match c.camera.source {
        SourceKind::Replay => {
            let path = c.camera.path.as_ref().ok_or_else(|| {
                err(
                    "camera.path",
                    "required for source = \"replay\": image files, a directory or a recording"
                        .into(),
                )
            })?;
            let pattern = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains(['*', '?']));
            if !pattern {
                existing(file, "camera.path", path, "file or directory")?;
            }
        }
        SourceKind::Uvc | SourceKind::Synthetic => {}
    }
    if c.capture.trigger == TriggerKind::Gpio && c.capture.gpio_value_file.is_none() {
        return Err(err(
            "capture.gpio_value_file",
            "required for trigger = \"gpio\"".into(),
        ));
    }

    let size = parse_size(&c.display.size).ok_or_else(|| {
        err(
            "display.size",
            format!("{:?}: expected WIDTHxHEIGHT, e.g. 320x240", c.display.size),
        )
    })?;
    DISPLAY_SIDE
        .check("display.size (width)", size.0)
        .map_err(out_of_bounds)?;
    DISPLAY_SIDE
        .check("display.size (height)", size.1)
        .map_err(out_of_bounds)?;
    match c.display.target {
        DisplayTarget::Png if c.display.dir.is_none() => {
            return Err(err("display.dir", "required for target = \"png\"".into()))
        }
        DisplayTarget::Framebuffer if c.display.device.is_none() => {
            return Err(err(
                "display.device",
                "required for target = \"framebuffer\", e.g. /dev/fb0".into(),
            ))
        }
        _ => {}
    }

    let s = &c.sync;
    if c.device.hub_public.is_none() && s.local_hub.is_none() {
        return Err(err(
            "device.hub_public",
            "required: the clinic hub's public key (hub.pub, from `dermedge hub init`) that records are sealed to"
                .into(),
        ));
    }
    if s.enabled {
        match (&s.hub, &s.local_hub) {
            (Some(url), _) => {
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"))
                    .ok_or_else(|| {
                        err(
                            "sync.hub",
                            format!("{url:?}: expected http://host:port or https://host:port"),
                        )
                    })?;
                if rest.trim_end_matches('/').is_empty() {
                    return Err(err("sync.hub", format!("{url:?}: no host")));
                }
                if let Some(ca) = &s.hub_ca {
                    if !url.starts_with("https://") {
                        return Err(err(
                            "sync.hub_ca",
                            format!(
                                "{}: a certificate is only used for an https:// hub, not {url:?}",
                                ca.display()
                            ),
                        ));
                    }
                    existing(file, "sync.hub_ca", ca, "certificate file")?;
                }
            }
            (None, Some(_)) => {}
            (None, None) => {
                return Err(err(
                    "sync.hub",
                    "required when sync.enabled = true (or configure sync.local_hub)".into(),
                ))
            }
        }
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_paths_are_lexically_normal() {
        let n = |p: &str| lexically_normal(Path::new(p));
        assert_eq!(
            n("/x/firmware-config/../out/queue"),
            Path::new("/x/out/queue")
        );
        assert_eq!(n("/x/./a/b/../../c"), Path::new("/x/c"));
        assert_eq!(n("/../a"), Path::new("/a"));
        assert_eq!(n("../a"), Path::new("../a"));
    }

    #[test]
    fn error_keys_come_from_the_parser_span() {
        let text = "[model]\nthreads = 2\n\n[queue]\ndir = \"q\"\nfull_policy = \"drop\"\n";
        let at = text.find("\"drop\"").unwrap();
        assert_eq!(key_at(text, at), "queue.full_policy");
        assert_eq!(key_at(text, 1), "model");
        assert_eq!(key_at("x = 1\n", 4), "x");
    }
}
