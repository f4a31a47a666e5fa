//! Generated frames: a moving skin-toned pattern with texture, deterministic per sequence number.

use std::time::SystemTime;

use dermedge_core::{Frame, FrameSource, RgbImage, SourceError};

use crate::pace::Pacer;

pub struct SyntheticSource {
    width: u32,
    height: u32,
    pacer: Pacer,
    remaining: Option<u64>,
    sequence: u64,
}

impl SyntheticSource {
    /// `fps`: pace frames in real time (None: as fast as asked); `count`: stop after that many.
    pub fn new(width: u32, height: u32, fps: Option<f64>, count: Option<u64>) -> Self {
        Self {
            width,
            height,
            pacer: Pacer::new(fps),
            remaining: count,
            sequence: 0,
        }
    }

    pub fn render(width: u32, height: u32, sequence: u64) -> RgbImage {
        let t = sequence as f32 * 0.15;
        RgbImage::from_fn(width, height, |x, y| {
            let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
            let lesion = (((fx - 0.5 - 0.1 * t.sin()).powi(2) + (fy - 0.5).powi(2)).sqrt() < 0.2)
                as u8 as f32;
            let texture = ((x as f32 * 0.9 + t).sin() * (y as f32 * 0.7).cos()) * 18.0;
            let r = 200.0 - 90.0 * lesion + texture;
            let g = 150.0 - 80.0 * lesion + texture * 0.8;
            let b = 130.0 - 70.0 * lesion + texture * 0.6;
            image::Rgb([
                r.clamp(0.0, 255.0) as u8,
                g.clamp(0.0, 255.0) as u8,
                b.clamp(0.0, 255.0) as u8,
            ])
        })
    }
}

impl FrameSource for SyntheticSource {
    fn name(&self) -> String {
        format!("synthetic {}×{}", self.width, self.height)
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.remaining == Some(0) {
            return Ok(None);
        }
        self.pacer.wait();
        self.remaining = self.remaining.map(|r| r - 1);
        let frame = Frame {
            image: Self::render(self.width, self.height, self.sequence),
            sequence: self.sequence,
            captured_at: SystemTime::now(),
            source: "synthetic".into(),
        };
        self.sequence += 1;
        Ok(Some(frame))
    }
}
