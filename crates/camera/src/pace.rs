//! Pacing a source to a frame rate, as a camera would deliver frames.

use std::time::{Duration, Instant};

/// Sleeps until the next frame is due. After a stall it does not burst to catch up: a camera
/// that fell behind delivers the next frame one interval later, not all the missed ones at once.
#[derive(Debug, Clone, Default)]
pub struct Pacer {
    interval: Option<Duration>,
    next_due: Option<Instant>,
}

impl Pacer {
    /// `fps`: frames per second; `None` or non-positive means no pacing.
    pub fn new(fps: Option<f64>) -> Self {
        Self {
            interval: fps
                .filter(|f| *f > 0.0)
                .map(|f| Duration::from_secs_f64(1.0 / f)),
            next_due: None,
        }
    }

    pub fn wait(&mut self) {
        let Some(interval) = self.interval else {
            return;
        };
        let due = *self.next_due.get_or_insert_with(Instant::now);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        self.next_due = Some(due.max(now) + interval);
    }
}
