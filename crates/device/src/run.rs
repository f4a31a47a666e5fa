//! The device loop: preview → capture → quality gate → embed → heads → result screen → enqueue,
//! with sync in the background. An explicit state machine; SIGINT/SIGTERM (the `stop` flag)
//! end it after the record in hand is queued.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use dermedge_camera::Handoff;
use dermedge_core::quality::measure;
use dermedge_core::Ranged;
use dermedge_core::{Embedder, Frame};
use dermedge_display::{HeadView, Screen, Status, SyncView};
use dermedge_queue::{Durability, Queue, QueueOptions, QueueStats};
use dermedge_record::{now_ms, DeviceKey, Envelope, HubPublic};
use dermedge_sync::{sleep_unless, SyncClient, SyncConfig};
use serde::Serialize;

use crate::config::{DurabilityMode, LoadedConfig, TriggerKind};
use crate::hub_heads::{self, HubHeads};
use crate::pipeline::{Outcome, Pipeline, PipelineOptions};
use crate::screens::{self, ScreenOutput};
use crate::source::open_source;
use crate::trigger::{AutoTrigger, Trigger};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Queue(#[from] dermedge_queue::QueueError),
    #[error(transparent)]
    Key(#[from] dermedge_record::KeyError),
    #[error(transparent)]
    Sync(#[from] dermedge_sync::SyncError),
    #[cfg(feature = "dev-hub")]
    #[error(transparent)]
    Hub(#[from] dermedge_hub::HubError),
    #[error(transparent)]
    Display(#[from] dermedge_display::DisplayError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// Said once: the camera's error is the message, not also its cause.
    #[error("camera: {0}")]
    Source(dermedge_core::SourceError),
    #[error("{0}")]
    Setup(String),
}

impl From<dermedge_core::SourceError> for RunError {
    fn from(e: dermedge_core::SourceError) -> Self {
        RunError::Source(e)
    }
}

/// Where the loop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Showing the live frame, waiting for the trigger.
    Preview,
    /// A result or refusal is on screen until the deadline.
    Showing(Instant),
}

#[derive(Debug, Default)]
struct SyncShared {
    last_ok: Option<Instant>,
    last_error: Option<String>,
    synced_records: u64,
    /// Heads the hub published since the last capture, checked and kept on disk: the loop runs
    /// them from the next capture.
    new_heads: Vec<dermedge_head::LinearHead>,
}

/// What a run did, written as JSON at the end.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub device_id: String,
    pub config: PathBuf,
    pub seconds: f64,
    pub frames: u64,
    pub dropped_frames: u64,
    pub corrupt_frames: u64,
    pub accepted: u64,
    pub refused: u64,
    pub failed: u64,
    /// Record ids queued this run, in order.
    pub records: Vec<String>,
    pub queue: QueueStats,
    pub hub: Option<String>,
    pub synced_records: u64,
    pub last_sync_error: Option<String>,
    pub stopped_by: String,
    pub screens: Option<PathBuf>,
}

fn frame_ms(frame: &Frame) -> i64 {
    frame
        .captured_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_else(|_| now_ms())
}

pub fn load_or_create_key(config: &LoadedConfig) -> Result<DeviceKey, RunError> {
    let path = &config.config.device.key_file;
    if !path.exists() && config.config.device.create_key {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| RunError::Setup(format!("{}: {e}", dir.display())))?;
        }
        DeviceKey::generate().save_new(path)?;
        log::warn!("created a new device key in {}", path.display());
    }
    if !path.exists() {
        return Err(RunError::Setup(format!(
            "{}: no device key (device.key_file); provision one with `dermedge keygen --out {}` and enroll it at the hub",
            path.display(),
            path.display()
        )));
    }
    Ok(DeviceKey::load(path)?)
}

pub fn queue_options(config: &LoadedConfig) -> QueueOptions {
    let q = &config.config.queue;
    QueueOptions {
        durability: match q.durability {
            DurabilityMode::Group => Durability::Group {
                max_records: q.group_max_records.get_u32(),
                max_delay_ms: q.group_max_delay_ms.get(),
            },
            DurabilityMode::PerRecord => Durability::PerRecord,
        },
        max_bytes: q.max_bytes.get(),
        max_records: q.max_records.get(),
        full_policy: q.full_policy,
        ..QueueOptions::default()
    }
}

/// What [`run`] derives from a loaded configuration before it opens the queue, the camera, the
/// display or the hub. [`LoadedConfig::load`] range-checks every number these conversions use,
/// so none of them can panic or wrap.
#[derive(Debug, Clone)]
pub struct Settings {
    pub queue: QueueOptions,
    pub pipeline: PipelineOptions,
    /// auto trigger: still frames needed, and the change that still counts as still.
    pub stable_frames: u32,
    pub stillness: f32,
    pub max_captures: Option<u64>,
    pub display_size: (u32, u32),
    /// How long a result or refusal stays on screen.
    pub result_for: Duration,
    pub preview_every: u64,
    pub health_interval: Duration,
    pub sync_batch_records: usize,
    pub sync_timeout: Duration,
    pub sync_interval: Duration,
    /// On a normal end, keep pushing this long (zero: not at all).
    pub final_sync: Duration,
}

impl Settings {
    pub fn new(config: &LoadedConfig) -> Self {
        let c = &config.config;
        let mut pipeline = PipelineOptions::new(&c.device.id);
        pipeline.quality = c.quality.clone();
        pipeline.embedding_type = c.queue.embedding;
        pipeline.thumbnail_side =
            (c.queue.thumbnail_side.get() > 0).then_some(c.queue.thumbnail_side.get_u32());
        Self {
            queue: queue_options(config),
            pipeline,
            stable_frames: c.capture.stable_frames.get_u32(),
            stillness: c.capture.stillness.get() as f32,
            max_captures: c.capture.max_captures.map(Ranged::get),
            display_size: config.display_size,
            result_for: c.display.result_seconds.seconds(),
            preview_every: c.display.preview_every.get(),
            health_interval: c.health.interval_seconds.seconds(),
            sync_batch_records: c.sync.batch_records.get_usize(),
            sync_timeout: c.sync.timeout_seconds.seconds(),
            sync_interval: c.sync.interval_seconds.seconds(),
            final_sync: c.sync.final_sync_seconds.seconds(),
        }
    }
}

/// What the loop has counted so far.
#[derive(Debug, Default)]
struct Tally {
    frames: u64,
    accepted: u64,
    refused: u64,
    failed: u64,
    /// Record ids queued, in order.
    records: Vec<String>,
}

/// Why the loop ended, as the summary and the last screen say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Signal,
    MaxCaptures,
    EndOfSource,
}

impl StopReason {
    fn as_str(self) -> &'static str {
        match self {
            StopReason::Signal => "signal",
            StopReason::MaxCaptures => "max_captures",
            StopReason::EndOfSource => "end of source",
        }
    }
}

/// Run the device until the source ends, `max_captures` is reached, or `stop` is set.
pub fn run<E: Embedder>(
    config: &LoadedConfig,
    embedder: E,
    heads: Vec<dermedge_head::LinearHead>,
    stop: Arc<AtomicBool>,
) -> Result<Summary, RunError> {
    let c = &config.config;
    let settings = Settings::new(config);
    let started = Instant::now();
    let key = load_or_create_key(config)?;
    let queue = open_queue(config, &key, &settings)?;
    let mut pipeline = Pipeline::new(embedder, heads, settings.pipeline.clone())?;
    let mut screens: Box<dyn ScreenOutput> = screens::open(&c.display, settings.display_size)?;
    let (local_hub, hub_public) = connect_hub(config, &key)?;
    queue
        .lock()
        .expect("queue")
        .seal_earlier_records_to(hub_public);
    let hub_heads = HubHeads::new(&c.queue.dir, hub_public);
    let model = pipeline.embedder().manifest().model.clone();
    for head in hub_heads.load(&model.id, model.embedding_dim) {
        adopt_head(&mut pipeline, head);
    }
    let hub_url = hub_url(
        local_hub.as_ref().map(|h| h.addr()),
        c.sync.enabled,
        c.sync.hub.as_deref(),
    );
    let shared = Arc::new(Mutex::new(SyncShared::default()));
    let sync_stop = Arc::new(AtomicBool::new(false));
    let sync_thread = match &hub_url {
        Some(url) => Some(spawn_sync(
            url,
            &settings,
            &key,
            hub_public,
            config,
            &queue,
            &shared,
            &sync_stop,
            HeadSync {
                heads: hub_heads,
                query: hub_heads::query(&model.id, model.embedding_dim, pipeline.heads()),
                device: c.device.id.clone(),
            },
        )?),
        None => None,
    };
    let handoff = Arc::new(Handoff::new());
    let capture = spawn_capture(c.camera.clone(), handoff.clone(), stop.clone());
    let (mut trigger, hint) = trigger_for(config, &settings);
    let status = |captures: u64| -> Status {
        let depth = queue.lock().map(|q| q.stats().pending_records).unwrap_or(0);
        let s = shared.lock().expect("sync state");
        Status {
            device: c.device.id.clone(),
            queue_depth: depth,
            sync: sync_view(hub_url.is_some(), &s),
            captures,
        }
    };

    let mut tally = Tally::default();
    let mut state = State::Preview;
    let mut last_health = Instant::now();
    let mut health_frames = 0u64;
    let stopped_by = loop {
        if stop.load(Ordering::Relaxed) {
            break StopReason::Signal;
        }
        if settings.max_captures.is_some_and(|m| tally.accepted >= m) {
            break StopReason::MaxCaptures;
        }
        if last_health.elapsed() >= settings.health_interval {
            let fps = health_frames as f64 / last_health.elapsed().as_secs_f64();
            let line = health_line(
                fps,
                &tally,
                handoff.counters.snapshot(),
                &status(tally.accepted),
            );
            log::info!("{line}");
            last_health = Instant::now();
            health_frames = 0;
        }
        commit_due_group(&queue, &key);
        let new_heads = std::mem::take(&mut shared.lock().expect("sync state").new_heads);
        for head in new_heads {
            adopt_head(&mut pipeline, head);
        }
        let Some(frame) = handoff.take(Duration::from_millis(100)) else {
            if handoff.is_closed() && handoff.waiting() == 0 {
                break StopReason::EndOfSource;
            }
            continue;
        };
        tally.frames += 1;
        health_frames += 1;
        if let State::Showing(until) = state {
            if Instant::now() >= until {
                state = State::Preview;
            }
        }
        let fire = trigger.fires(&frame.image, || {
            measure(&frame.image).sharpness >= settings.pipeline.quality.min_sharpness
        });
        if !fire {
            if state == State::Preview && tally.frames % settings.preview_every == 0 {
                let preview = Screen::Preview {
                    frame: &frame.image,
                    hint,
                };
                show(&mut *screens, &preview, &status(tally.accepted));
            }
            continue;
        }
        // Capture: the record is queued before the loop looks at the stop flag again.
        let outcome = pipeline.process(&frame.image, frame_ms(&frame), Some(frame.source.clone()));
        capture_one(
            outcome,
            &frame,
            &queue,
            &key,
            &hub_public,
            &handoff,
            &mut tally,
            &mut *screens,
            &status,
        );
        state = State::Showing(Instant::now() + settings.result_for);
    };
    log::info!("stopping: {}", stopped_by.as_str());
    handoff.close();
    let source_result = capture.join().unwrap_or_else(|_| {
        Err(dermedge_core::SourceError::Device {
            source_name: "capture thread".into(),
            message: "panicked".into(),
        })
    });
    queue.lock().expect("queue").commit()?;

    // Background sync ends after its batch in flight; on a normal end, push what is left.
    sync_stop.store(true, Ordering::Relaxed);
    if let Some(Ok(mut client)) = sync_thread.map(JoinHandle::join) {
        if stopped_by != StopReason::Signal && !settings.final_sync.is_zero() {
            final_sync(&mut client, &queue, &shared, settings.final_sync);
        }
    }
    if let Some(hub) = local_hub {
        hub.shutdown();
    }
    let stopped = [format!("Stopped: {}", stopped_by.as_str())];
    show(
        &mut *screens,
        &Screen::Status { details: &stopped },
        &status(tally.accepted),
    );
    let s = shared.lock().expect("sync state");
    let counters = handoff.counters.snapshot();
    let summary = Summary {
        device_id: c.device.id.clone(),
        config: config.path.clone(),
        seconds: started.elapsed().as_secs_f64(),
        frames: tally.frames,
        dropped_frames: counters.dropped,
        corrupt_frames: counters.corrupt,
        accepted: tally.accepted,
        refused: tally.refused,
        failed: tally.failed,
        records: tally.records,
        queue: queue.lock().expect("queue").stats(),
        hub: hub_url.clone(),
        synced_records: s.synced_records,
        last_sync_error: s.last_error.clone(),
        stopped_by: stopped_by.as_str().into(),
        screens: c.display.dir.clone(),
    };
    if let Some(path) = &c.run.summary {
        write_summary(path, &summary)?;
    }
    source_result?;
    Ok(summary)
}

/// The queue, with what recovery found at open logged.
fn open_queue(
    config: &LoadedConfig,
    key: &DeviceKey,
    settings: &Settings,
) -> Result<Arc<Mutex<Queue>>, RunError> {
    let c = &config.config;
    let queue = Queue::open(&c.queue.dir, key, &c.device.id, settings.queue.clone())?;
    let recovery = queue.recovery();
    if !recovery.is_clean() {
        log::warn!("queue recovery: {recovery:?}");
    }
    Ok(Arc::new(Mutex::new(queue)))
}

/// The hub: a local one for development (enrolled with this device's public key, and whose
/// public key records are sealed to), else the pinned `hub.pub` of the configured hub. With sync
/// off, a configured local hub still names the key records are sealed to.
fn connect_hub(
    config: &LoadedConfig,
    key: &DeviceKey,
) -> Result<(Option<crate::dev_hub::LocalHub>, HubPublic), RunError> {
    let c = &config.config;
    match &c.sync.local_hub {
        Some(h) => crate::dev_hub::start(h, c.sync.enabled, &c.device.id, key),
        None => {
            let path = c.device.hub_public.as_ref().ok_or_else(|| {
                RunError::Setup("device.hub_public: required to seal records".into())
            })?;
            Ok((None, HubPublic::load(path)?))
        }
    }
}

/// Where sync pushes to: the local hub when there is one (whatever `sync.enabled` says: it is
/// only started when enabled), else the configured URL when sync is on.
fn hub_url(local_hub: Option<SocketAddr>, enabled: bool, hub: Option<&str>) -> Option<String> {
    match (local_hub, hub) {
        (Some(addr), _) => Some(format!("http://{addr}")),
        (None, Some(url)) if enabled => Some(url.to_string()),
        _ => None,
    }
}

/// Run `head` from the next capture if it is newer than the head of its name that runs now
/// (a local head file counts as version 0).
fn adopt_head<E: Embedder>(pipeline: &mut Pipeline<E>, head: dermedge_head::LinearHead) {
    let running = pipeline
        .heads()
        .iter()
        .find(|h| h.name == head.name)
        .map(|h| h.version.unwrap_or(0));
    if running.is_some_and(|v| head.version.unwrap_or(0) <= v) {
        return;
    }
    let label = head.label();
    match pipeline.install_head(head) {
        Ok(()) => log::info!("head {label} from the hub: in use from the next capture"),
        Err(e) => log::error!("head {label} from the hub refused, the old one kept: {e}"),
    }
}

/// What the sync thread needs to fetch published heads.
struct HeadSync {
    heads: HubHeads,
    query: dermedge_sync::wire::HeadQuery,
    device: String,
}

/// Ask the hub for newer heads; keep each on disk and hand it to the loop.
fn fetch_heads(client: &mut SyncClient, head_sync: &mut HeadSync, shared: &Mutex<SyncShared>) {
    let fetched = match client.fetch_heads(&head_sync.device, &head_sync.query) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("sync: cannot fetch published heads: {e}");
            return;
        }
    };
    for f in fetched {
        if let Err(e) = head_sync.heads.save(&f) {
            log::error!(
                "sync: head {} not kept on disk ({e}); in use until the device restarts",
                f.head.label()
            );
        }
        let held = dermedge_sync::wire::HeldHead {
            name: f.head.name.clone(),
            version: f.head.version.unwrap_or(0),
        };
        match head_sync
            .query
            .have
            .iter_mut()
            .find(|h| h.name == held.name)
        {
            Some(slot) => slot.version = slot.version.max(held.version),
            None => head_sync.query.have.push(held),
        }
        shared.lock().expect("sync state").new_heads.push(f.head);
    }
}

/// The background sync thread: a drain every `sync.interval_seconds` until `sync_stop`, each
/// followed by a look for newer heads.
#[allow(clippy::too_many_arguments)]
fn spawn_sync(
    url: &str,
    settings: &Settings,
    key: &DeviceKey,
    hub_public: HubPublic,
    config: &LoadedConfig,
    queue: &Arc<Mutex<Queue>>,
    shared: &Arc<Mutex<SyncShared>>,
    sync_stop: &Arc<AtomicBool>,
    mut head_sync: HeadSync,
) -> Result<JoinHandle<SyncClient>, RunError> {
    let mut sync_config = SyncConfig::new(url);
    sync_config.batch_records = settings.sync_batch_records;
    sync_config.timeout = settings.sync_timeout;
    sync_config.trust = config.config.sync.hub_ca.clone();
    let mut client = SyncClient::new(sync_config, key, hub_public, &config.config.queue.dir)?;
    let (queue, shared, sync_stop) = (queue.clone(), shared.clone(), sync_stop.clone());
    let interval = settings.sync_interval;
    log::info!("sync to {url} every {:.0} s", interval.as_secs_f64());
    std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || {
            while !sync_stop.load(Ordering::Relaxed) {
                if sync_round(&mut client, &queue, &shared, &sync_stop, Some(2)) {
                    fetch_heads(&mut client, &mut head_sync, &shared);
                }
                sleep_unless(&sync_stop, interval);
            }
            client
        })
        .map_err(|e| RunError::Setup(format!("cannot start the sync thread: {e}")))
}

/// The capture thread: opens the source itself and hands the newest frame over until the source
/// ends, fails, or `stop` is set; closes the handoff on the way out.
fn spawn_capture(
    camera: crate::config::CameraSection,
    handoff: Arc<Handoff>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<(), dermedge_core::SourceError>> {
    std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let result = (|| {
                let mut source = open_source(&camera)?;
                log::info!("camera: {}", source.name());
                while !stop.load(Ordering::Relaxed) && !handoff.is_closed() {
                    match source.next_frame() {
                        Ok(Some(frame)) => handoff.offer(frame),
                        Ok(None) => break,
                        Err(e) if e.is_frame_level() => {
                            handoff.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                            log::warn!("camera: {e}");
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })();
            handoff.close();
            result
        })
        .expect("spawn the capture thread")
}

/// The configured trigger and the hint the preview screen shows for it.
fn trigger_for(config: &LoadedConfig, settings: &Settings) -> (Trigger, &'static str) {
    let capture = &config.config.capture;
    match capture.trigger {
        TriggerKind::Auto => (
            Trigger::Auto(AutoTrigger::new(settings.stable_frames, settings.stillness)),
            "Hold still: capturing when sharp",
        ),
        TriggerKind::Key => (Trigger::key(), "Press Enter to capture"),
        TriggerKind::Gpio => (
            Trigger::Gpio {
                value_file: capture.gpio_value_file.clone().unwrap_or_default(),
                last: false,
            },
            "Press the button to capture",
        ),
    }
}

/// What the status bar says about sync.
fn sync_view(enabled: bool, s: &SyncShared) -> SyncView {
    match (enabled, s.last_ok, &s.last_error) {
        (false, _, _) => SyncView::Disabled,
        (true, _, Some(e)) => SyncView::Offline { reason: e.clone() },
        (true, Some(t), None) => SyncView::Synced {
            seconds_ago: t.elapsed().as_secs(),
        },
        (true, None, None) => SyncView::Waiting,
    }
}

/// The periodic health log line.
fn health_line(
    fps: f64,
    tally: &Tally,
    counters: dermedge_camera::handoff::CounterSnapshot,
    status: &Status,
) -> String {
    let sync = match &status.sync {
        SyncView::Disabled => "off".to_string(),
        SyncView::Waiting => "not yet".to_string(),
        SyncView::Synced { seconds_ago } => format!("{seconds_ago} s ago"),
        SyncView::Offline { reason } => format!("failing ({reason})"),
    };
    format!(
        "health: {fps:.1} fps, frames {}, dropped {}, corrupt {}, accepted {}, refused {}, queue depth {}, last sync {sync}",
        tally.frames,
        counters.dropped,
        counters.corrupt,
        tally.accepted,
        tally.refused,
        status.queue_depth,
    )
}

/// Commit a group whose delay has run out; after a failed fsync, reopen the queue so the next
/// record can be saved (the failed group's records are reported lost, never claimed saved).
fn commit_due_group(queue: &Mutex<Queue>, key: &DeviceKey) {
    let mut q = queue.lock().expect("queue");
    if let Err(e) = q.tick() {
        log::error!("queue: group commit failed, its records are not saved: {e}");
        recover_if_poisoned(&mut q, key);
    }
}

fn recover_if_poisoned(q: &mut Queue, key: &DeviceKey) {
    if q.is_poisoned() {
        match q.reopen(key) {
            Ok(()) => log::warn!("queue: recovered after a failed sync"),
            Err(e) => log::error!("queue: cannot recover after a failed sync: {e}"),
        }
    }
}

/// One capture's outcome: counted, logged, queued when accepted, and shown.
#[allow(clippy::too_many_arguments)]
fn capture_one(
    outcome: Result<Outcome, crate::pipeline::PipelineError>,
    frame: &Frame,
    queue: &Mutex<Queue>,
    key: &DeviceKey,
    hub_public: &HubPublic,
    handoff: &Handoff,
    tally: &mut Tally,
    screens: &mut dyn ScreenOutput,
    status: &dyn Fn(u64) -> Status,
) {
    match outcome {
        Ok(Outcome::Refused(verdict)) => {
            tally.refused += 1;
            handoff
                .counters
                .rejected_by_quality
                .fetch_add(1, Ordering::Relaxed);
            let reasons: Vec<String> = verdict
                .issues
                .iter()
                .map(|i| i.message().to_string())
                .collect();
            log::info!(
                "refused frame {} from {}: {}",
                frame.sequence,
                frame.source,
                reasons.join("; ")
            );
            let warning = Screen::QualityWarning {
                frame: Some(&frame.image),
                reasons: &reasons,
            };
            show(screens, &warning, &status(tally.accepted));
        }
        Ok(Outcome::Accepted { record, .. }) => {
            // Under group durability the record becomes durable at the group's commit (the
            // loop's `tick`, or the commit at shutdown); its receipt says which.
            let sealed = Envelope::seal(&record, hub_public);
            let appended = {
                let mut q = queue.lock().expect("queue");
                let appended = q.append(&sealed);
                recover_if_poisoned(&mut q, key);
                appended
            };
            match appended {
                Ok(receipt) => {
                    tally.accepted += 1;
                    handoff.counters.embedded.fetch_add(1, Ordering::Relaxed);
                    log::info!(
                        "accepted record {} seq {} from {}{}",
                        record.id,
                        receipt.seq,
                        frame.source,
                        if receipt.durable {
                            ""
                        } else {
                            " (durable at the next group commit)"
                        }
                    );
                    tally.records.push(record.id.clone());
                    let views: Vec<HeadView> = record
                        .heads
                        .iter()
                        .map(|h| HeadView::new(&h.label(), &h.classes, &h.probabilities))
                        .collect();
                    let result = Screen::Result {
                        heads: &views,
                        record: &record.id,
                    };
                    show(screens, &result, &status(tally.accepted));
                }
                Err(e) => {
                    log::error!("capture from {} not queued: {e}", frame.source);
                    failed(tally, screens, status, "Not saved", &e.to_string());
                }
            }
        }
        Err(e) => {
            log::error!("capture from {} failed: {e}", frame.source);
            failed(tally, screens, status, "Capture failed", &e.to_string());
        }
    }
}

/// A capture that produced no saved record: counted, and said on screen.
fn failed(
    tally: &mut Tally,
    screens: &mut dyn ScreenOutput,
    status: &dyn Fn(u64) -> Status,
    title: &str,
    message: &str,
) {
    tally.failed += 1;
    show(
        screens,
        &Screen::Error { title, message },
        &status(tally.accepted),
    );
}

/// After a normal end, keep pushing until the queue is empty or `limit` has passed.
fn final_sync(
    client: &mut SyncClient,
    queue: &Mutex<Queue>,
    shared: &Mutex<SyncShared>,
    limit: Duration,
) {
    let deadline = Arc::new(AtomicBool::new(false));
    let flag = deadline.clone();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        flag.store(true, Ordering::Relaxed);
    });
    while !deadline.load(Ordering::Relaxed) {
        sync_round(client, queue, shared, &deadline, Some(3));
        if queue.lock().expect("queue").stats().pending_records == 0 {
            break;
        }
        sleep_unless(&deadline, Duration::from_millis(500));
    }
}

fn write_summary(path: &std::path::Path, summary: &Summary) -> Result<(), RunError> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let json = serde_json::to_string_pretty(summary).expect("serialisable");
    std::fs::write(path, json).map_err(|e| RunError::Setup(format!("{}: {e}", path.display())))
}

/// Draw a screen; a display fault is logged, never allowed to stop capture or lose a record.
fn show(screens: &mut dyn ScreenOutput, screen: &Screen, status: &Status) {
    if let Err(e) = screens.show(screen, status) {
        log::error!("display: {e}");
    }
}

fn sync_round(
    client: &mut SyncClient,
    queue: &Mutex<Queue>,
    shared: &Mutex<SyncShared>,
    stop: &AtomicBool,
    retries: Option<u32>,
) -> bool {
    match client.drain(queue, stop, retries) {
        Ok(report) => {
            let mut s = shared.lock().expect("sync state");
            s.last_ok = Some(Instant::now());
            s.last_error = None;
            s.synced_records += report.records as u64;
            true
        }
        Err(e) => {
            log::warn!("sync: {e}; working offline, will retry");
            shared.lock().expect("sync state").last_error = Some(short_reason(&e));
            false
        }
    }
}

fn short_reason(e: &dermedge_sync::SyncError) -> String {
    match e {
        dermedge_sync::SyncError::Transport { .. } => "hub unreachable".into(),
        dermedge_sync::SyncError::HubFailed { status, .. } => format!("hub error {status}"),
        dermedge_sync::SyncError::Refused { status, .. } => format!("refused ({status})"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use dermedge_core::quality::{QualityIssue, QualityMeasures, QualityVerdict};
    use dermedge_core::RgbImage;
    use dermedge_record::{
        new_record_id, EmbeddingType, HubKey, Record, StoredEmbedding, RECORD_FORMAT,
    };

    /// Which screens were drawn, by kind, and the status each carried.
    #[derive(Default)]
    struct Drawn(Vec<(String, u64)>);

    impl ScreenOutput for Drawn {
        fn show(
            &mut self,
            screen: &Screen,
            status: &Status,
        ) -> Result<(), dermedge_display::DisplayError> {
            let kind = match screen {
                Screen::Preview { .. } => "preview".to_string(),
                Screen::QualityWarning { reasons, .. } => {
                    format!("warning: {}", reasons.join("; "))
                }
                Screen::Result { record, .. } => format!("result {record}"),
                Screen::Error { title, .. } => format!("error: {title}"),
                Screen::Status { details } => format!("status: {}", details.join("; ")),
            };
            self.0.push((kind, status.captures));
            Ok(())
        }
    }

    fn frame() -> Frame {
        Frame {
            image: RgbImage::new(8, 8),
            sequence: 7,
            captured_at: std::time::SystemTime::now(),
            source: "test.png".into(),
        }
    }

    fn verdict(issues: Vec<QualityIssue>) -> QualityVerdict {
        QualityVerdict {
            accepted: issues.is_empty(),
            issues,
            measures: QualityMeasures {
                mean_luminance: 0.5,
                p5_luminance: 0.1,
                p95_luminance: 0.9,
                clipped_dark: 0.0,
                clipped_bright: 0.0,
                sharpness: 1.0,
                colour_cast: 0.0,
            },
        }
    }

    fn record() -> Box<Record> {
        Box::new(Record {
            format: RECORD_FORMAT,
            id: new_record_id(),
            captured_at_ms: 1_790_000_000_000,
            device_id: "dev-1".into(),
            model_id: "df-mini".into(),
            precision: dermedge_record::Precision::Int8,
            embedding: StoredEmbedding::new(&[0.25; 16], EmbeddingType::F32),
            heads: Vec::new(),
            quality: None,
            source: Some("test.png".into()),
            thumbnail_jpeg: None,
        })
    }

    struct Rig {
        _dir: tempfile::TempDir,
        queue: Mutex<Queue>,
        key: DeviceKey,
        hub: HubPublic,
        handoff: Handoff,
        tally: Tally,
        drawn: Drawn,
    }

    impl Rig {
        fn new(options: QueueOptions) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let key = DeviceKey::generate();
            let queue = Queue::open(&dir.path().join("queue"), &key, "dev-1", options).unwrap();
            Self {
                _dir: dir,
                queue: Mutex::new(queue),
                key,
                hub: HubKey::generate().public(),
                handoff: Handoff::new(),
                tally: Tally::default(),
                drawn: Drawn::default(),
            }
        }

        fn capture(&mut self, outcome: Result<Outcome, crate::pipeline::PipelineError>) {
            let status = |captures: u64| Status {
                device: "dev-1".into(),
                queue_depth: 0,
                sync: SyncView::Disabled,
                captures,
            };
            capture_one(
                outcome,
                &frame(),
                &self.queue,
                &self.key,
                &self.hub,
                &self.handoff,
                &mut self.tally,
                &mut self.drawn,
                &status,
            );
        }
    }

    #[test]
    fn an_accepted_capture_is_queued_counted_and_shown() {
        let mut rig = Rig::new(QueueOptions::default());
        let record = record();
        let id = record.id.clone();
        rig.capture(Ok(Outcome::Accepted {
            record,
            verdict: verdict(vec![]),
            embedding: vec![0.25; 16],
        }));
        assert_eq!((rig.tally.accepted, rig.tally.failed), (1, 0));
        assert_eq!(rig.tally.records, vec![id.clone()]);
        assert_eq!(rig.drawn.0, vec![(format!("result {id}"), 1)]);
        let queued = rig
            .queue
            .lock()
            .unwrap()
            .unacknowledged(10, usize::MAX)
            .unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].envelope.id, id);
        assert_eq!(rig.handoff.counters.snapshot().embedded, 1);
    }

    #[test]
    fn a_refused_frame_is_counted_and_warned_about_but_not_queued() {
        let mut rig = Rig::new(QueueOptions::default());
        rig.capture(Ok(Outcome::Refused(verdict(vec![QualityIssue::Blurred]))));
        assert_eq!((rig.tally.refused, rig.tally.accepted), (1, 0));
        assert_eq!(rig.drawn.0.len(), 1);
        assert!(
            rig.drawn.0[0].0.starts_with("warning: "),
            "{:?}",
            rig.drawn.0
        );
        assert_eq!(rig.queue.lock().unwrap().stats().pending_records, 0);
        assert_eq!(rig.handoff.counters.snapshot().rejected_by_quality, 1);
    }

    #[test]
    fn a_full_queue_says_not_saved_and_keeps_what_it_holds() {
        let mut rig = Rig::new(QueueOptions {
            max_records: 1,
            ..QueueOptions::default()
        });
        let first = record();
        let first_id = first.id.clone();
        for r in [first, record()] {
            rig.capture(Ok(Outcome::Accepted {
                record: r,
                verdict: verdict(vec![]),
                embedding: vec![0.25; 16],
            }));
        }
        assert_eq!((rig.tally.accepted, rig.tally.failed), (1, 1));
        assert_eq!(rig.drawn.0[1], ("error: Not saved".to_string(), 1));
        let queued = rig
            .queue
            .lock()
            .unwrap()
            .unacknowledged(10, usize::MAX)
            .unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].envelope.id, first_id);
    }

    #[test]
    fn a_failed_capture_is_counted_and_shown() {
        let mut rig = Rig::new(QueueOptions::default());
        let failure = crate::pipeline::PipelineError::Embed(dermedge_core::EmbedError::Backend {
            backend: "litert/cpu".into(),
            message: "invoke failed".into(),
        });
        rig.capture(Err(failure));
        assert_eq!(rig.tally.failed, 1);
        assert_eq!(rig.drawn.0, vec![("error: Capture failed".to_string(), 0)]);
    }

    #[test]
    fn sync_goes_to_the_local_hub_or_the_configured_url_when_enabled() {
        let local: SocketAddr = "127.0.0.1:4100".parse().unwrap();
        let url = Some("http://hub.clinic:8080");
        assert_eq!(
            hub_url(Some(local), true, url).as_deref(),
            Some("http://127.0.0.1:4100")
        );
        assert_eq!(hub_url(None, true, url).as_deref(), url);
        assert_eq!(hub_url(None, false, url), None);
        assert_eq!(hub_url(None, true, None), None);
    }

    #[test]
    fn the_status_bar_says_what_sync_last_did() {
        let mut shared = SyncShared::default();
        assert!(matches!(sync_view(false, &shared), SyncView::Disabled));
        assert!(matches!(sync_view(true, &shared), SyncView::Waiting));
        shared.last_ok = Some(Instant::now());
        assert!(matches!(
            sync_view(true, &shared),
            SyncView::Synced { seconds_ago: 0 }
        ));
        shared.last_error = Some("hub unreachable".into());
        assert!(
            matches!(sync_view(true, &shared), SyncView::Offline { reason } if reason == "hub unreachable")
        );
    }

    #[test]
    fn the_health_line_names_every_counter() {
        let tally = Tally {
            frames: 120,
            accepted: 3,
            refused: 2,
            ..Tally::default()
        };
        let handoff = Handoff::new();
        handoff.counters.dropped.fetch_add(4, Ordering::Relaxed);
        let status = Status {
            device: "dev-1".into(),
            queue_depth: 5,
            sync: SyncView::Offline {
                reason: "hub unreachable".into(),
            },
            captures: 3,
        };
        let line = health_line(29.96, &tally, handoff.counters.snapshot(), &status);
        assert_eq!(
            line,
            "health: 30.0 fps, frames 120, dropped 4, corrupt 0, accepted 3, refused 2, queue depth 5, last sync failing (hub unreachable)"
        );
    }

    #[test]
    fn stop_reasons_read_as_the_summary_writes_them() {
        let said: Vec<&str> = [
            StopReason::Signal,
            StopReason::MaxCaptures,
            StopReason::EndOfSource,
        ]
        .into_iter()
        .map(StopReason::as_str)
        .collect();
        assert_eq!(said, ["signal", "max_captures", "end of source"]);
    }

    #[test]
    fn a_missing_camera_is_said_once() {
        let e = RunError::from(dermedge_core::SourceError::NoDevice {
            source_name: "camera 0".into(),
            hint: "cannot open it".into(),
        });
        let mut said = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            said.push_str(&format!(": {c}"));
            cause = c.source();
        }
        assert_eq!(said, "camera: camera 0: no such camera; cannot open it");
    }
}
