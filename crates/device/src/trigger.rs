//! When to capture: auto (still and sharp), a key, or a GPIO line.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use dermedge_core::RgbImage;

/// A 32×32 luminance thumbnail: enough to tell a still scene from a moving one.
pub fn thumbnail(image: &RgbImage) -> Vec<f32> {
    let (w, h) = image.dimensions();
    let mut out = vec![0f32; 32 * 32];
    for ty in 0..32u32 {
        for tx in 0..32u32 {
            let x = (tx * w / 32 + w / 64).min(w.saturating_sub(1));
            let y = (ty * h / 32 + h / 64).min(h.saturating_sub(1));
            let p = image.get_pixel(x, y).0;
            out[(ty * 32 + tx) as usize] =
                0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
        }
    }
    out
}

fn change(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

/// Fires once per still scene: after `stable_frames` still frames if the frame is sharp, or
/// after twice as many if it is not (so the quality gate can say why), then waits for the
/// scene to change.
pub struct AutoTrigger {
    stable_frames: u32,
    stillness: f32,
    previous: Option<Vec<f32>>,
    still: u32,
    captured: Option<Vec<f32>>,
}

impl AutoTrigger {
    pub fn new(stable_frames: u32, stillness: f32) -> Self {
        Self {
            stable_frames: stable_frames.max(1),
            stillness,
            previous: None,
            still: 1,
            captured: None,
        }
    }

    pub fn observe(&mut self, thumb: Vec<f32>, sharp: bool) -> bool {
        let is_still = self
            .previous
            .as_ref()
            .is_some_and(|p| change(p, &thumb) <= self.stillness);
        self.still = if is_still { self.still + 1 } else { 1 };
        if self
            .captured
            .as_ref()
            .is_some_and(|c| change(c, &thumb) > self.stillness)
        {
            self.captured = None; // a new scene: armed again
        }
        let needed = if sharp {
            self.stable_frames
        } else {
            2 * self.stable_frames
        };
        let fire = self.captured.is_none() && self.still >= needed;
        if fire {
            self.captured = Some(thumb.clone());
        }
        self.previous = Some(thumb);
        fire
    }
}

pub enum Trigger {
    Auto(AutoTrigger),
    /// Lines from standard input.
    Key(Receiver<()>),
    /// A GPIO line's sysfs value file: fires on 0 → 1.
    Gpio {
        value_file: PathBuf,
        last: bool,
    },
}

impl Trigger {
    pub fn key() -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                if tx.send(()).is_err() {
                    break;
                }
                line.clear();
            }
        });
        Trigger::Key(rx)
    }

    /// Whether to capture this frame.
    pub fn fires(&mut self, image: &RgbImage, sharp: impl FnOnce() -> bool) -> bool {
        match self {
            Trigger::Auto(auto) => {
                let sharp = sharp();
                auto.observe(thumbnail(image), sharp)
            }
            Trigger::Key(rx) => {
                // Every press since the last frame counts as one capture request.
                let mut fired = false;
                while rx.try_recv().is_ok() {
                    fired = true;
                }
                fired
            }
            Trigger::Gpio { value_file, last } => {
                let now = std::fs::read_to_string(&*value_file)
                    .map(|v| v.trim() == "1")
                    .unwrap_or_else(|e| {
                        log::warn!(
                            "{}: cannot read the trigger line: {e}",
                            value_file.display()
                        );
                        false
                    });
                let fired = now && !*last;
                *last = now;
                fired
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(v: f32) -> Vec<f32> {
        vec![v; 32 * 32]
    }

    #[test]
    fn auto_fires_once_per_still_scene() {
        let mut t = AutoTrigger::new(2, 4.0);
        let frames = [10.0, 10.0, 10.0, 10.0, 80.0, 80.0, 80.0];
        let fired: Vec<bool> = frames.iter().map(|v| t.observe(flat(*v), true)).collect();
        assert_eq!(fired, [false, true, false, false, false, true, false]);
    }

    #[test]
    fn a_blurred_scene_needs_twice_the_stillness() {
        let mut t = AutoTrigger::new(2, 4.0);
        let fired: Vec<bool> = (0..5).map(|_| t.observe(flat(50.0), false)).collect();
        assert_eq!(fired, [false, false, false, true, false]);
    }

    #[test]
    fn gpio_fires_on_the_rising_edge() {
        let dir = tempfile::tempdir().unwrap();
        let value_file = dir.path().join("value");
        let mut t = Trigger::Gpio {
            value_file: value_file.clone(),
            last: false,
        };
        let image = RgbImage::new(4, 4);
        let mut seen = Vec::new();
        for v in ["0", "1", "1", "0", "1"] {
            std::fs::write(&value_file, format!("{v}\n")).unwrap();
            seen.push(t.fires(&image, || true));
        }
        assert_eq!(seen, [false, true, false, false, true]);
    }
}
