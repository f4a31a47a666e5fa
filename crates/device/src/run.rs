//! The device loop: preview → capture → quality gate → embed → heads → result screen → enqueue,
//! with sync in the background. An explicit state machine; SIGINT/SIGTERM (the `stop` flag)
//! end it after the record in hand is queued.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, UNIX_EPOCH};

use dermedge_camera::Handoff;
use dermedge_core::quality::measure;
use dermedge_core::{Embedder, Frame};
use dermedge_display::{HeadView, Screen, Status, SyncView};
use dermedge_queue::{
    now_ms, DeviceKey, Durability, Envelope, HubPublic, Queue, QueueOptions, QueueStats,
};
use dermedge_sync::{sleep_unless, SyncClient, SyncConfig};
use serde::Serialize;

use crate::config::{DurabilityMode, LoadedConfig, TriggerKind};
use crate::pipeline::{Outcome, Pipeline, PipelineOptions};
use crate::screens::{self, ScreenOutput};
use crate::source::open_source;
use crate::trigger::{AutoTrigger, Trigger};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Queue(#[from] dermedge_queue::QueueError),
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
                max_records: q.group_max_records as u32,
                max_delay_ms: q.group_max_delay_ms as u64,
            },
            DurabilityMode::PerRecord => Durability::PerRecord,
        },
        max_bytes: q.max_bytes as u64,
        max_records: q.max_records as u64,
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
            (c.queue.thumbnail_side > 0).then_some(c.queue.thumbnail_side as u32);
        Self {
            queue: queue_options(config),
            pipeline,
            stable_frames: c.capture.stable_frames as u32,
            stillness: c.capture.stillness as f32,
            max_captures: c.capture.max_captures.map(|m| m as u64),
            display_size: config.display_size,
            result_for: Duration::from_secs_f64(c.display.result_seconds),
            preview_every: c.display.preview_every as u64,
            health_interval: Duration::from_secs_f64(c.health.interval_seconds),
            sync_batch_records: c.sync.batch_records as usize,
            sync_timeout: Duration::from_secs_f64(c.sync.timeout_seconds),
            sync_interval: Duration::from_secs_f64(c.sync.interval_seconds),
            final_sync: Duration::from_secs_f64(c.sync.final_sync_seconds),
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
    let queue = Queue::open(&c.queue.dir, &key, &c.device.id, settings.queue.clone())?;
    let recovery = queue.recovery().clone();
    if !recovery.is_clean() {
        log::warn!("queue recovery: {recovery:?}");
    }
    let queue = Arc::new(Mutex::new(queue));
    let mut pipeline = Pipeline::new(embedder, heads, settings.pipeline.clone())?;
    let mut screens: Box<dyn ScreenOutput> = screens::open(&c.display, settings.display_size)?;

    // The hub: a local one for development (enrolled with this device's public key, and whose
    // public key records are sealed to), else the configured URL and the pinned `hub.pub`.
    // (With sync off, a configured local hub still names the key records are sealed to.)
    let (local_hub, hub_public) = match &c.sync.local_hub {
        Some(h) => crate::dev_hub::start(h, c.sync.enabled, &c.device.id, &key)?,
        None => {
            let path = c.device.hub_public.as_ref().ok_or_else(|| {
                RunError::Setup("device.hub_public: required to seal records".into())
            })?;
            (None, HubPublic::load(path)?)
        }
    };
    queue
        .lock()
        .expect("queue")
        .seal_earlier_records_to(hub_public);
    let hub_url = match (&local_hub, &c.sync.hub) {
        (Some(h), _) => Some(format!("http://{}", h.addr())),
        (None, Some(url)) if c.sync.enabled => Some(url.clone()),
        _ => None,
    };
    let shared = Arc::new(Mutex::new(SyncShared::default()));
    let sync_stop = Arc::new(AtomicBool::new(false));
    let mut sync_thread: Option<JoinHandle<SyncClient>> = None;
    if let Some(url) = &hub_url {
        let mut sync_config = SyncConfig::new(url);
        sync_config.batch_records = settings.sync_batch_records;
        sync_config.timeout = settings.sync_timeout;
        let mut client = SyncClient::new(sync_config, &key, hub_public, &c.queue.dir)?;
        let (queue, shared, sync_stop) = (queue.clone(), shared.clone(), sync_stop.clone());
        let interval = settings.sync_interval;
        log::info!("sync to {url} every {:.0} s", interval.as_secs_f64());
        sync_thread = Some(
            std::thread::Builder::new()
                .name("sync".into())
                .spawn(move || {
                    while !sync_stop.load(Ordering::Relaxed) {
                        sync_round(&mut client, &queue, &shared, &sync_stop, Some(2));
                        sleep_unless(&sync_stop, interval);
                    }
                    client
                })
                .expect("spawn the sync thread"),
        );
    }

    // Capture thread: opens the source itself, hands the newest frame over.
    let handoff = Arc::new(Handoff::new());
    let camera = c.camera.clone();
    let capture = {
        let (handoff, stop) = (handoff.clone(), stop.clone());
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || -> Result<(), dermedge_core::SourceError> {
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
    };

    let mut trigger = match c.capture.trigger {
        TriggerKind::Auto => {
            Trigger::Auto(AutoTrigger::new(settings.stable_frames, settings.stillness))
        }
        TriggerKind::Key => Trigger::key(),
        TriggerKind::Gpio => Trigger::Gpio {
            value_file: c.capture.gpio_value_file.clone().unwrap_or_default(),
            last: false,
        },
    };
    let hint = match c.capture.trigger {
        TriggerKind::Auto => "Hold still: capturing when sharp",
        TriggerKind::Key => "Press Enter to capture",
        TriggerKind::Gpio => "Press the button to capture",
    };
    let status = |captures: u64| -> Status {
        let depth = queue.lock().map(|q| q.stats().pending_records).unwrap_or(0);
        let s = shared.lock().expect("sync state");
        Status {
            device: c.device.id.clone(),
            queue_depth: depth,
            sync: match (&hub_url, s.last_ok, &s.last_error) {
                (None, _, _) => SyncView::Disabled,
                (Some(_), _, Some(e)) => SyncView::Offline { reason: e.clone() },
                (Some(_), Some(t), None) => SyncView::Synced {
                    seconds_ago: t.elapsed().as_secs(),
                },
                (Some(_), None, None) => SyncView::Waiting,
            },
            captures,
        }
    };

    let (mut frames, mut accepted, mut refused, mut failed) = (0u64, 0u64, 0u64, 0u64);
    let mut records = Vec::new();
    let mut state = State::Preview;
    let mut last_health = Instant::now();
    let mut health_frames = 0u64;
    let result_for = settings.result_for;
    let max_captures = settings.max_captures;
    let stopped_by = loop {
        if stop.load(Ordering::Relaxed) {
            break "signal";
        }
        if max_captures.is_some_and(|m| accepted >= m) {
            break "max_captures";
        }
        if last_health.elapsed() >= settings.health_interval {
            let counters = handoff.counters.snapshot();
            let s = status(accepted);
            log::info!(
                "health: {:.1} fps, frames {frames}, dropped {}, corrupt {}, accepted {accepted}, refused {refused}, queue depth {}, last sync {}",
                health_frames as f64 / last_health.elapsed().as_secs_f64(),
                counters.dropped,
                counters.corrupt,
                s.queue_depth,
                match s.sync {
                    SyncView::Disabled => "off".to_string(),
                    SyncView::Waiting => "not yet".to_string(),
                    SyncView::Synced { seconds_ago } => format!("{seconds_ago} s ago"),
                    SyncView::Offline { reason } => format!("failing ({reason})"),
                }
            );
            last_health = Instant::now();
            health_frames = 0;
        }
        {
            let mut q = queue.lock().expect("queue");
            if let Err(e) = q.tick() {
                log::error!("queue: group commit failed, its records are not saved: {e}");
                if q.is_poisoned() {
                    if let Err(e) = q.reopen(&key) {
                        log::error!("queue: cannot recover after a failed sync: {e}");
                    }
                }
            }
        }
        let Some(frame) = handoff.take(Duration::from_millis(100)) else {
            if handoff.is_closed() && handoff.waiting() == 0 {
                break "end of source";
            }
            continue;
        };
        frames += 1;
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
            if state == State::Preview && frames % settings.preview_every == 0 {
                show(
                    &mut *screens,
                    &Screen::Preview {
                        frame: &frame.image,
                        hint,
                    },
                    &status(accepted),
                );
            }
            continue;
        }
        // Capture: the record is queued before the loop looks at the stop flag again.
        match pipeline.process(&frame.image, frame_ms(&frame), Some(frame.source.clone())) {
            Ok(Outcome::Refused(verdict)) => {
                refused += 1;
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
                show(
                    &mut *screens,
                    &Screen::QualityWarning {
                        frame: Some(&frame.image),
                        reasons: &reasons,
                    },
                    &status(accepted),
                );
            }
            Ok(Outcome::Accepted { record, .. }) => {
                // Under group durability the record becomes durable at the group's commit (the
                // loop's `tick`, or the commit at shutdown); its receipt says which.
                let sealed = Envelope::seal(&record, &hub_public);
                let appended = {
                    let mut q = queue.lock().expect("queue");
                    let appended = q.append(&sealed);
                    if q.is_poisoned() {
                        // A failed sync: this record is not saved; recover so the next is.
                        match q.reopen(&key) {
                            Ok(()) => log::warn!("queue: recovered after a failed sync"),
                            Err(e) => log::error!("queue: cannot recover after a failed sync: {e}"),
                        }
                    }
                    appended
                };
                match appended {
                    Ok(receipt) => {
                        accepted += 1;
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
                        records.push(record.id.clone());
                        let views: Vec<HeadView> = record
                            .heads
                            .iter()
                            .map(|h| HeadView::new(&h.head, &h.classes, &h.probabilities))
                            .collect();
                        show(
                            &mut *screens,
                            &Screen::Result {
                                heads: &views,
                                record: &record.id,
                            },
                            &status(accepted),
                        );
                    }
                    Err(e) => {
                        failed += 1;
                        log::error!("capture from {} not queued: {e}", frame.source);
                        show(
                            &mut *screens,
                            &Screen::Error {
                                title: "Not saved",
                                message: &e.to_string(),
                            },
                            &status(accepted),
                        );
                    }
                }
            }
            Err(e) => {
                failed += 1;
                log::error!("capture from {} failed: {e}", frame.source);
                show(
                    &mut *screens,
                    &Screen::Error {
                        title: "Capture failed",
                        message: &e.to_string(),
                    },
                    &status(accepted),
                );
            }
        }
        state = State::Showing(Instant::now() + result_for);
    };
    log::info!("stopping: {stopped_by}");
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
    if let Some(thread) = sync_thread {
        if let Ok(mut client) = thread.join() {
            if stopped_by != "signal" && !settings.final_sync.is_zero() {
                let deadline = Arc::new(AtomicBool::new(false));
                let flag = deadline.clone();
                let final_sync = settings.final_sync;
                std::thread::spawn(move || {
                    std::thread::sleep(final_sync);
                    flag.store(true, Ordering::Relaxed);
                });
                while !deadline.load(Ordering::Relaxed) {
                    sync_round(&mut client, &queue, &shared, &deadline, Some(3));
                    let q = queue.lock().expect("queue");
                    if q.stats().pending_records == 0 {
                        break;
                    }
                    drop(q);
                    sleep_unless(&deadline, Duration::from_millis(500));
                }
            }
        }
    }
    if let Some(hub) = local_hub {
        hub.shutdown();
    }
    let final_status = status(accepted);
    show(
        &mut *screens,
        &Screen::Status {
            details: &[format!("Stopped: {stopped_by}")],
        },
        &final_status,
    );
    let s = shared.lock().expect("sync state");
    let summary = Summary {
        device_id: c.device.id.clone(),
        config: config.path.clone(),
        seconds: started.elapsed().as_secs_f64(),
        frames,
        dropped_frames: handoff.counters.snapshot().dropped,
        corrupt_frames: handoff.counters.snapshot().corrupt,
        accepted,
        refused,
        failed,
        records,
        queue: queue.lock().expect("queue").stats(),
        hub: hub_url.clone(),
        synced_records: s.synced_records,
        last_sync_error: s.last_error.clone(),
        stopped_by: stopped_by.into(),
        screens: c.display.dir.clone(),
    };
    if let Some(path) = &c.run.summary {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(
            path,
            serde_json::to_string_pretty(&summary).expect("serialisable"),
        )
        .map_err(|e| RunError::Setup(format!("{}: {e}", path.display())))?;
    }
    source_result?;
    Ok(summary)
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
) {
    match client.drain(queue, stop, retries) {
        Ok(report) => {
            let mut s = shared.lock().expect("sync state");
            s.last_ok = Some(Instant::now());
            s.last_error = None;
            s.synced_records += report.records as u64;
        }
        Err(e) => {
            log::warn!("sync: {e}; working offline, will retry");
            shared.lock().expect("sync state").last_error = Some(short_reason(&e));
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
