//! The image-quality gate: refuse frames that are too dark, too bright, blurred or colour-cast
//! before the model spends a second on them (Derm Foundation degrades on badly exposed photos).
//!
//! Measures are computed on a fixed-size luminance thumbnail (longest side [`ANALYSIS_SIDE`]), so
//! thresholds do not depend on the camera's resolution.

use serde::{Deserialize, Serialize};

use crate::bounds::{Bounds, OutOfBounds};
use crate::RgbImage;

/// Longest side of the analysis thumbnail, in pixels.
pub const ANALYSIS_SIDE: u32 = 256;

/// Thresholds; the defaults were calibrated on real dermoscopy patches and photos (see tests):
/// good images measured sharpness 14–1600 and mean luminance 96–202; blurred (σ 6) at most 5.3,
/// darkened (×0.15) at most 30, brightened at least 222 with at least 35 % clipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QualityThresholds {
    /// Mean luminance (0–255) must lie in [min, max].
    pub min_mean_luminance: f32,
    pub max_mean_luminance: f32,
    /// At most this share of pixels at or below 5 / at or above 250.
    pub max_clipped_dark: f32,
    pub max_clipped_bright: f32,
    /// Variance of the Laplacian of the luminance thumbnail must reach this.
    pub min_sharpness: f32,
    /// Largest allowed distance of the mean chroma from neutral (0–255 scale); `None` disables.
    pub max_colour_cast: Option<f32>,
}

impl Default for QualityThresholds {
    fn default() -> Self {
        Self {
            min_mean_luminance: 45.0,
            max_mean_luminance: 220.0,
            max_clipped_dark: 0.25,
            max_clipped_bright: 0.20,
            min_sharpness: 9.0,
            max_colour_cast: None,
        }
    }
}

/// What the gate measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QualityMeasures {
    pub mean_luminance: f32,
    pub p5_luminance: f32,
    pub p95_luminance: f32,
    pub clipped_dark: f32,
    pub clipped_bright: f32,
    pub sharpness: f32,
    pub colour_cast: f32,
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QualityIssue {
    TooDark,
    TooBright,
    Blurred,
    ColourCast,
}

impl QualityIssue {
    /// Short text for a display or a log line.
    pub fn message(self) -> &'static str {
        match self {
            QualityIssue::TooDark => "too dark: add light or move closer",
            QualityIssue::TooBright => "too bright: reduce light or glare",
            QualityIssue::Blurred => "blurred: hold still and refocus",
            QualityIssue::ColourCast => "colour cast: check white balance / lighting",
        }
    }
}

/// The gate's decision with its reasons and measures, carried to the display and the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityVerdict {
    pub accepted: bool,
    pub issues: Vec<QualityIssue>,
    pub measures: QualityMeasures,
}

fn thumbnail_luma(image: &RgbImage) -> (Vec<f32>, usize, usize, [f32; 3]) {
    let (w, h) = image.dimensions();
    let scale = (ANALYSIS_SIDE as f32 / w.max(h) as f32).min(1.0);
    let (tw, th) = (
        ((w as f32 * scale).round() as usize).max(1),
        ((h as f32 * scale).round() as usize).max(1),
    );
    let mut luma = vec![0f32; tw * th];
    let mut rgb_mean = [0f32; 3];
    // Box-average each thumbnail cell: cheap, and it keeps focus differences visible at any size.
    for ty in 0..th {
        let (y0, y1) = (
            ty * h as usize / th,
            ((ty + 1) * h as usize / th).max(ty * h as usize / th + 1),
        );
        for tx in 0..tw {
            let (x0, x1) = (
                tx * w as usize / tw,
                ((tx + 1) * w as usize / tw).max(tx * w as usize / tw + 1),
            );
            let mut acc = [0f32; 3];
            for y in y0..y1 {
                for x in x0..x1 {
                    let p = image.get_pixel(x as u32, y as u32).0;
                    for c in 0..3 {
                        acc[c] += p[c] as f32;
                    }
                }
            }
            let n = ((y1 - y0) * (x1 - x0)) as f32;
            let px = [acc[0] / n, acc[1] / n, acc[2] / n];
            for c in 0..3 {
                rgb_mean[c] += px[c];
            }
            luma[ty * tw + tx] = 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2];
        }
    }
    let cells = (tw * th) as f32;
    (
        luma,
        tw,
        th,
        [
            rgb_mean[0] / cells,
            rgb_mean[1] / cells,
            rgb_mean[2] / cells,
        ],
    )
}

/// Measure `image` (any size).
pub fn measure(image: &RgbImage) -> QualityMeasures {
    let (luma, w, h, rgb) = thumbnail_luma(image);
    let n = luma.len() as f32;
    let mean = luma.iter().sum::<f32>() / n;
    let mut sorted = luma.clone();
    sorted.sort_by(f32::total_cmp);
    let pct = |q: f32| sorted[((sorted.len() - 1) as f32 * q).round() as usize];
    let clipped_dark = luma.iter().filter(|&&v| v <= 5.0).count() as f32 / n;
    let clipped_bright = luma.iter().filter(|&&v| v >= 250.0).count() as f32 / n;
    let mut lap = Vec::with_capacity(w * h);
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let c = luma[y * w + x];
            lap.push(
                luma[(y - 1) * w + x]
                    + luma[(y + 1) * w + x]
                    + luma[y * w + x - 1]
                    + luma[y * w + x + 1]
                    - 4.0 * c,
            );
        }
    }
    let sharpness = if lap.is_empty() {
        0.0
    } else {
        let m = lap.iter().sum::<f32>() / lap.len() as f32;
        lap.iter().map(|v| (v - m).powi(2)).sum::<f32>() / lap.len() as f32
    };
    let grey = (rgb[0] + rgb[1] + rgb[2]) / 3.0;
    let colour_cast =
        ((rgb[0] - grey).powi(2) + (rgb[1] - grey).powi(2) + (rgb[2] - grey).powi(2)).sqrt();
    QualityMeasures {
        mean_luminance: mean,
        p5_luminance: pct(0.05),
        p95_luminance: pct(0.95),
        clipped_dark,
        clipped_bright,
        sharpness,
        colour_cast,
    }
}

impl QualityThresholds {
    /// Allowed mean luminance thresholds (0–255 scale).
    pub const LUMINANCE: Bounds<f32> = Bounds::new(0.0, 255.0);
    /// Allowed shares of clipped pixels.
    pub const CLIPPED: Bounds<f32> = Bounds::new(0.0, 1.0);
    /// Allowed sharpness thresholds (variance of the Laplacian).
    pub const SHARPNESS: Bounds<f32> = Bounds::new(0.0, 1e6);
    /// Allowed colour-cast thresholds (0–255 scale).
    pub const COLOUR_CAST: Bounds<f32> = Bounds::new(0.0, 255.0);

    /// Refuse NaN, infinities and out-of-range thresholds (a NaN threshold would turn its test
    /// off: every comparison with it is false). The error's key is the field name, e.g.
    /// `min_sharpness`; `max_mean_luminance` may not be below `min_mean_luminance`.
    pub fn validate(&self) -> Result<(), OutOfBounds> {
        Self::LUMINANCE.check("min_mean_luminance", self.min_mean_luminance)?;
        let checks = [
            (
                "max_mean_luminance",
                self.max_mean_luminance,
                Bounds::new(self.min_mean_luminance, Self::LUMINANCE.max),
            ),
            ("max_clipped_dark", self.max_clipped_dark, Self::CLIPPED),
            ("max_clipped_bright", self.max_clipped_bright, Self::CLIPPED),
            ("min_sharpness", self.min_sharpness, Self::SHARPNESS),
        ];
        for (key, value, bounds) in checks {
            bounds.check(key, value)?;
        }
        if let Some(cast) = self.max_colour_cast {
            Self::COLOUR_CAST.check("max_colour_cast", cast)?;
        }
        Ok(())
    }

    /// Measure `image` and decide.
    pub fn judge(&self, image: &RgbImage) -> QualityVerdict {
        let m = measure(image);
        let mut issues = Vec::new();
        if m.mean_luminance < self.min_mean_luminance || m.clipped_dark > self.max_clipped_dark {
            issues.push(QualityIssue::TooDark);
        }
        if m.mean_luminance > self.max_mean_luminance || m.clipped_bright > self.max_clipped_bright
        {
            issues.push(QualityIssue::TooBright);
        }
        if m.sharpness < self.min_sharpness && !issues.contains(&QualityIssue::TooDark) {
            // A very dark frame has little contrast to measure focus on: report it as dark only.
            issues.push(QualityIssue::Blurred);
        }
        if self.max_colour_cast.is_some_and(|max| m.colour_cast > max) {
            issues.push(QualityIssue::ColourCast);
        }
        QualityVerdict {
            accepted: issues.is_empty(),
            issues,
            measures: m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{decode_file, DecodeLimits};
    use std::path::Path;

    fn fixture(name: &str) -> RgbImage {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/images")
            .join(name);
        decode_file(&path, &DecodeLimits::default()).unwrap()
    }

    /// A 32 px dermoscopy patch tiled into a native-resolution 224 px skin texture (with flips),
    /// as a dermatoscope close-up looks.
    fn tiled_patch(name: &str) -> RgbImage {
        let p = fixture(name);
        RgbImage::from_fn(224, 224, |x, y| {
            let (tx, ty) = (x / 32, y / 32);
            let (mut px, mut py) = (x % 32, y % 32);
            if (tx + ty) % 2 == 1 {
                px = 31 - px;
            }
            if tx % 3 == 0 {
                py = 31 - py;
            }
            *p.get_pixel(px, py)
        })
    }

    fn darken(img: &RgbImage, f: f32) -> RgbImage {
        RgbImage::from_fn(img.width(), img.height(), |x, y| {
            image::Rgb(img.get_pixel(x, y).0.map(|v| (v as f32 * f) as u8))
        })
    }

    fn brighten(img: &RgbImage, add: f32) -> RgbImage {
        RgbImage::from_fn(img.width(), img.height(), |x, y| {
            image::Rgb(
                img.get_pixel(x, y)
                    .0
                    .map(|v| (v as f32 * 1.6 + add).min(255.0) as u8),
            )
        })
    }

    fn blur(img: &RgbImage) -> RgbImage {
        image::imageops::blur(img, 6.0)
    }

    fn good_images() -> Vec<(&'static str, RgbImage)> {
        vec![
            ("astronaut", fixture("astronaut-480.png")),
            ("coffee", fixture("coffee-300x400.png")),
            ("chelsea", fixture("chelsea-gray.png")),
            ("retina", fixture("retina-16bit.png")),
            ("patch1354a tiled", tiled_patch("dermoscopy-patch1354a.bmp")),
            ("patch1542b tiled", tiled_patch("dermoscopy-patch1542b.bmp")),
            ("patch1840b tiled", tiled_patch("dermoscopy-patch1840b.bmp")),
        ]
    }

    #[test]
    fn well_exposed_real_images_pass() {
        let gate = QualityThresholds::default();
        for (name, img) in good_images() {
            let v = gate.judge(&img);
            let m = v.measures;
            eprintln!(
                "{name:<18} mean {:6.1} dark {:.3} bright {:.3} sharpness {:8.1}",
                m.mean_luminance, m.clipped_dark, m.clipped_bright, m.sharpness
            );
            assert!(v.accepted, "{name}: {:?} {:?}", v.issues, v.measures);
        }
    }

    #[test]
    fn darkened_brightened_and_blurred_fail_for_the_right_reason() {
        let gate = QualityThresholds::default();
        for (name, img) in good_images() {
            let dark = gate.judge(&darken(&img, 0.15));
            assert_eq!(
                dark.issues,
                vec![QualityIssue::TooDark],
                "{name} darkened: {:?}",
                dark.measures
            );
            let bright = gate.judge(&brighten(&img, 140.0));
            assert!(
                bright.issues.contains(&QualityIssue::TooBright) && !bright.accepted,
                "{name} brightened: {:?}",
                bright.measures
            );
            let blurred = gate.judge(&blur(&img));
            eprintln!("{name:<18} darkened mean {:.1}, brightened mean {:.1} bright {:.2}, blurred sharpness {:.2}", dark.measures.mean_luminance, bright.measures.mean_luminance, bright.measures.clipped_bright, blurred.measures.sharpness);
            assert_eq!(
                blurred.issues,
                vec![QualityIssue::Blurred],
                "{name} blurred: {:?}",
                blurred.measures
            );
        }
    }

    #[test]
    fn the_defaults_are_valid_and_nan_or_infinite_thresholds_are_not() {
        QualityThresholds::default().validate().unwrap();
        type Set = fn(&mut QualityThresholds, f32);
        let fields: [(&str, Set); 6] = [
            ("min_mean_luminance", |q, v| q.min_mean_luminance = v),
            ("max_mean_luminance", |q, v| q.max_mean_luminance = v),
            ("max_clipped_dark", |q, v| q.max_clipped_dark = v),
            ("max_clipped_bright", |q, v| q.max_clipped_bright = v),
            ("min_sharpness", |q, v| q.min_sharpness = v),
            ("max_colour_cast", |q, v| q.max_colour_cast = Some(v)),
        ];
        for (key, set) in fields {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, 1e7] {
                let mut q = QualityThresholds::default();
                set(&mut q, bad);
                let e = q.validate().unwrap_err();
                assert_eq!(e.key, key, "{bad}: {e}");
                assert!(e.message.contains("allowed range"), "{e}");
            }
        }
        let inverted = QualityThresholds {
            min_mean_luminance: 100.0,
            max_mean_luminance: 99.0,
            ..Default::default()
        };
        let e = inverted.validate().unwrap_err();
        assert_eq!(e.key, "max_mean_luminance");
        assert!(e.message.contains("100 to 255"), "{e}");
    }

    #[test]
    fn colour_cast_is_optional() {
        let img = fixture("astronaut-480.png");
        let red = RgbImage::from_fn(img.width(), img.height(), |x, y| {
            let p = img.get_pixel(x, y).0;
            image::Rgb([p[0].saturating_add(90), p[1] / 2, p[2] / 2])
        });
        assert!(!QualityThresholds::default()
            .judge(&red)
            .issues
            .contains(&QualityIssue::ColourCast));
        let strict = QualityThresholds {
            max_colour_cast: Some(40.0),
            ..Default::default()
        };
        assert!(strict
            .judge(&red)
            .issues
            .contains(&QualityIssue::ColourCast));
        assert!(strict.judge(&img).accepted);
    }
}
