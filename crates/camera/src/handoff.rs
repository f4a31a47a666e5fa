//! The capture → inference handoff: a fixed-capacity mailbox that never blocks the capture thread
//! and never grows. When the embedder is slower than the camera, the oldest waiting frame is
//! dropped (and counted), so the embedder always gets the newest frame.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use dermedge_core::Frame;
use heapless::Deque;

/// Frames that may wait for the embedder. One: a dermatoscope shows what is under it *now*.
pub const HANDOFF_CAPACITY: usize = 1;

/// What happened to frames, for the health line and the display.
#[derive(Debug, Default)]
pub struct Counters {
    pub captured: AtomicU64,
    pub dropped: AtomicU64,
    pub rejected_by_quality: AtomicU64,
    pub embedded: AtomicU64,
    pub corrupt: AtomicU64,
}

/// A plain copy of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterSnapshot {
    pub captured: u64,
    pub dropped: u64,
    pub rejected_by_quality: u64,
    pub embedded: u64,
    pub corrupt: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            captured: self.captured.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            rejected_by_quality: self.rejected_by_quality.load(Ordering::Relaxed),
            embedded: self.embedded.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
        }
    }
}

struct Slot {
    frames: Deque<Frame, HANDOFF_CAPACITY>,
    closed: bool,
}

/// Shared between one capture thread (`offer`) and one consumer (`take`).
pub struct Handoff {
    slot: Mutex<Slot>,
    ready: Condvar,
    pub counters: Counters,
}

impl Default for Handoff {
    fn default() -> Self {
        Self {
            slot: Mutex::new(Slot {
                frames: Deque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            counters: Counters::default(),
        }
    }
}

impl Handoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hand over a captured frame; drops the oldest waiting frame when full. Never blocks long.
    pub fn offer(&self, frame: Frame) {
        self.counters.captured.fetch_add(1, Ordering::Relaxed);
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.frames.is_full() {
            slot.frames.pop_front();
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        let _ = slot.frames.push_back(frame);
        drop(slot);
        self.ready.notify_one();
    }

    /// The next frame, waiting at most `timeout`; `None` on timeout or when closed and empty.
    pub fn take(&self, timeout: Duration) -> Option<Frame> {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        let (mut slot, _) = self
            .ready
            .wait_timeout_while(slot, timeout, |s| s.frames.is_empty() && !s.closed)
            .unwrap_or_else(|e| e.into_inner());
        slot.frames.pop_front()
    }

    /// No more frames will come (the source ended or the device loop is shutting down).
    pub fn close(&self) {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    /// Frames waiting now (at most [`HANDOFF_CAPACITY`]).
    pub fn waiting(&self) -> usize {
        self.slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .frames
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::ReplaySource;
    use dermedge_core::FrameSource;
    use std::sync::Arc;
    use std::time::Instant;

    /// A replay source looping over the fixture images at a simulated 30 fps, against an embedder
    /// that needs 100 ms per frame: the queue never holds
    /// more than its capacity, stale frames are dropped and counted, and every frame the embedder
    /// takes is the newest one captured at that moment.
    #[test]
    fn slow_consumer_gets_the_newest_frame_and_memory_stays_flat() {
        let handoff = Arc::new(Handoff::new());
        let latest = Arc::new(AtomicU64::new(0));
        let producer = {
            let (handoff, latest) = (handoff.clone(), latest.clone());
            std::thread::spawn(move || {
                let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../tests/fixtures/images");
                let mut source = ReplaySource::from_images(&[fixtures], true, Some(30.0)).unwrap();
                for _ in 0..45 {
                    let frame = source
                        .next_frame()
                        .unwrap()
                        .expect("looping replay never ends");
                    latest.store(frame.sequence, Ordering::SeqCst);
                    handoff.offer(frame);
                    assert!(handoff.waiting() <= HANDOFF_CAPACITY);
                }
                handoff.close();
            })
        };
        let mut taken = Vec::new();
        let started = Instant::now();
        while let Some(frame) = handoff.take(Duration::from_secs(2)) {
            let newest = latest.load(Ordering::SeqCst);
            // The frame handed out is the newest, or the producer published a newer one since.
            assert!(
                frame.sequence + 1 >= newest,
                "got frame {} while {} was captured",
                frame.sequence,
                newest
            );
            taken.push(frame.sequence);
            handoff.counters.embedded.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
        }
        producer.join().unwrap();
        let c = handoff.counters.snapshot();
        assert_eq!(c.captured, 45);
        assert_eq!(c.embedded as usize, taken.len());
        assert_eq!(c.captured, c.embedded + c.dropped, "{c:?}");
        assert!(
            c.dropped >= 20,
            "a 1.5 s stream at 30 fps against 10 fps must drop frames: {c:?}"
        );
        assert!(taken.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            *taken.last().unwrap(),
            44,
            "the last frame is always embedded"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
