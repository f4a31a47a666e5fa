//! Camera buffers to RGB8. MJPEG is decoded with the `image` crate's pure-Rust JPEG decoder (a
//! corrupt frame is an error, never a crash in C code); YUYV, NV12 and GREY with nokhwa's
//! converters, after checking the buffer holds a whole frame.

use std::fmt;
use std::ops::Not;

use dermedge_core::{RgbImage, SourceError};
use nokhwa_core::types::{nv12_to_rgb, yuyv422_to_rgb, Resolution};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawFormat {
    Mjpeg,
    Yuyv,
    Nv12,
    Grey,
}

impl RawFormat {
    pub const ALL: [RawFormat; 4] = [
        RawFormat::Mjpeg,
        RawFormat::Yuyv,
        RawFormat::Nv12,
        RawFormat::Grey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RawFormat::Mjpeg => "mjpeg",
            RawFormat::Yuyv => "yuyv",
            RawFormat::Nv12 => "nv12",
            RawFormat::Grey => "grey",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            RawFormat::Mjpeg => 1,
            RawFormat::Yuyv => 2,
            RawFormat::Nv12 => 3,
            RawFormat::Grey => 4,
        }
    }

    pub fn from_code(code: u8) -> Option<RawFormat> {
        RawFormat::ALL.into_iter().find(|f| f.code() == code)
    }

    /// Bytes in one frame (None for compressed formats).
    pub fn frame_len(self, width: u32, height: u32) -> Option<usize> {
        let px = width as usize * height as usize;
        match self {
            RawFormat::Mjpeg => None,
            RawFormat::Yuyv => Some(px * 2),
            RawFormat::Nv12 => Some(px * 3 / 2),
            RawFormat::Grey => Some(px),
        }
    }
}

impl fmt::Display for RawFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RawFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RawFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unsupported format {s:?}; expected mjpeg, yuyv, nv12 or grey"))
    }
}

/// Decode one frame. `source` and `sequence` name it in errors.
pub fn decode(
    format: RawFormat,
    width: u32,
    height: u32,
    data: &[u8],
    source: &str,
    sequence: u64,
) -> Result<RgbImage, SourceError> {
    let corrupt = |message: String| SourceError::Corrupt {
        source_name: source.into(),
        sequence,
        message,
    };
    if width == 0 || height == 0 || width > 16_384 || height > 16_384 {
        return Err(corrupt(format!("impossible frame size {width}×{height}")));
    }
    if let Some(expected) = format.frame_len(width, height) {
        if data.len() < expected {
            return Err(corrupt(format!(
                "truncated {format} buffer: {} bytes, a {width}×{height} frame needs {expected}",
                data.len()
            )));
        }
        let odd = match format {
            RawFormat::Yuyv => !width.is_multiple_of(2),
            RawFormat::Nv12 => !width.is_multiple_of(2) || !height.is_multiple_of(2),
            _ => false,
        };
        if odd {
            return Err(corrupt(format!(
                "{format} needs even dimensions, got {width}×{height}"
            )));
        }
    }
    let rgb = match format {
        RawFormat::Mjpeg => {
            // A frame cut short on the USB bus lacks its end-of-image marker; decoders would fill
            // the missing rows with grey, so such frames are refused. Trailing padding is allowed.
            let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            if data.len() < 4
                || data[..2] != [0xff, 0xd8]
                || data[..end].ends_with(&[0xff, 0xd9]).not()
            {
                return Err(corrupt(
                    "corrupt MJPEG frame: missing start or end-of-image marker (truncated?)".into(),
                ));
            }
            let img = image::load_from_memory_with_format(data, image::ImageFormat::Jpeg)
                .map_err(|e| corrupt(format!("corrupt MJPEG frame: {e}")))?;
            if img.width() != width || img.height() != height {
                return Err(corrupt(format!(
                    "MJPEG frame is {}×{}, stream says {width}×{height}",
                    img.width(),
                    img.height()
                )));
            }
            return Ok(img.into_rgb8());
        }
        RawFormat::Yuyv => yuyv422_to_rgb(&data[..width as usize * height as usize * 2], false),
        RawFormat::Nv12 => nv12_to_rgb(
            Resolution::new(width, height),
            &data[..width as usize * height as usize * 3 / 2],
            false,
        ),
        RawFormat::Grey => Ok(data[..width as usize * height as usize]
            .iter()
            .flat_map(|&v| [v, v, v])
            .collect()),
    }
    .map_err(|e| corrupt(format!("{format} conversion failed: {e}")))?;
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| {
        corrupt(format!(
            "{format} conversion gave the wrong number of bytes"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/camera")
    }

    /// Tolerances per format: MJPEG and the 4:2:2 / 4:2:0 formats subsample or quantise colour.
    fn tolerance(format: RawFormat) -> (f64, u8) {
        match format {
            RawFormat::Mjpeg => (4.0, 60), // quality-90 JPEG, 4:2:0, on fine skin texture
            RawFormat::Yuyv => (3.0, 40),
            RawFormat::Nv12 => (4.0, 60),
            RawFormat::Grey => (0.6, 2),
        }
    }

    #[test]
    fn fixture_buffers_decode_to_their_source_photos() {
        let index = std::fs::read_to_string(fixtures().join("index.txt"))
            .expect("run tests/fixtures/camera/generate.py");
        let mut seen = 0;
        for line in index
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (file, format, w, h, source) = (
                f[0],
                f[1].parse::<RawFormat>().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[4],
            );
            let data = std::fs::read(fixtures().join(file)).unwrap();
            let decoded = decode(format, w, h, &data, file, 0).unwrap();
            let reference = image::open(fixtures().join(source)).unwrap();
            let reference = reference.to_rgb8().into_raw();
            let reference: Vec<u8> = if format == RawFormat::Grey {
                // ITU-R 601 luma, as the fixture generator (PIL "L") computed the GREY buffers.
                reference
                    .chunks(3)
                    .flat_map(|p| {
                        let l = ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500)
                            / 1000) as u8;
                        [l, l, l]
                    })
                    .collect()
            } else {
                reference
            };
            let diffs: Vec<u8> = decoded
                .as_raw()
                .iter()
                .zip(&reference)
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
            let p999 = {
                let mut s = diffs.clone();
                s.sort_unstable();
                s[s.len() * 999 / 1000]
            };
            let (max_mean, max_p999) = tolerance(format);
            assert!(
                mean <= max_mean && p999 <= max_p999,
                "{file} ({format}): mean abs diff {mean:.2}, p99.9 {p999}"
            );
            seen += 1;
        }
        assert!(seen >= 4, "expected fixtures for all four formats");
    }

    #[test]
    fn truncated_and_corrupt_buffers_are_errors() {
        let err = decode(RawFormat::Yuyv, 64, 48, &vec![0u8; 64 * 48], "cam", 7).unwrap_err();
        assert!(
            err.is_frame_level()
                && err.to_string().contains("truncated yuyv")
                && err.to_string().contains("frame 7"),
            "{err}"
        );
        assert!(decode(RawFormat::Nv12, 64, 48, &[0u8; 10], "cam", 0).is_err());
        assert!(decode(RawFormat::Grey, 0, 48, &[], "cam", 0).is_err());
        let err = decode(
            RawFormat::Mjpeg,
            64,
            48,
            b"\xff\xd8\xff\xe0 garbage",
            "cam",
            3,
        )
        .unwrap_err();
        assert!(err.to_string().contains("corrupt MJPEG"), "{err}");
        let mut garbage_inside = b"\xff\xd8\xff\xe0 garbage".to_vec();
        garbage_inside.extend_from_slice(&[0xff, 0xd9, 0, 0]);
        assert!(decode(RawFormat::Mjpeg, 64, 48, &garbage_inside, "cam", 4).is_err());
    }
}
