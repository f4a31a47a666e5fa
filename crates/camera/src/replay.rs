//! Replay: image files (a directory, a `*`/`?` pattern, or a list) or a raw recording, optionally
//! looped, optionally paced to a frame rate.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use dermedge_core::preprocess::{decode_file, DecodeLimits};
use dermedge_core::{Frame, FrameSource, SourceError};

use crate::decode::decode;
use crate::pace::Pacer;
use crate::recording::RecordingReader;

enum Input {
    Files {
        files: Vec<PathBuf>,
        next: usize,
    },
    Recording {
        path: PathBuf,
        reader: RecordingReader,
    },
}

pub struct ReplaySource {
    name: String,
    input: Input,
    looped: bool,
    pacer: Pacer,
    sequence: u64,
    limits: DecodeLimits,
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"];

fn wildcard(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(
        &pattern.chars().collect::<Vec<_>>(),
        &name.chars().collect::<Vec<_>>(),
    )
}

/// Image files named by `spec`: a file, a directory (sorted, image extensions) or `dir/pattern`.
pub fn expand(spec: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let err = |message: String| SourceError::Recording {
        path: spec.display().to_string(),
        message,
    };
    if spec.is_file() {
        return Ok(vec![spec.to_path_buf()]);
    }
    let (dir, pattern) = if spec.is_dir() {
        (spec.to_path_buf(), None)
    } else {
        let name = spec
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains(['*', '?']) {
            return Err(err("no such file or directory".into()));
        }
        (
            spec.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            Some(name),
        )
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| err(format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| match &pattern {
            Some(pat) => wildcard(pat, &p.file_name().unwrap_or_default().to_string_lossy()),
            None => p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())),
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err("matches no image files".into()));
    }
    Ok(files)
}

impl ReplaySource {
    pub fn from_images(
        specs: &[PathBuf],
        looped: bool,
        fps: Option<f64>,
    ) -> Result<Self, SourceError> {
        let mut files = Vec::new();
        for spec in specs {
            files.extend(expand(spec)?);
        }
        let name = format!("replay of {} image(s)", files.len());
        Ok(Self::new(
            name,
            Input::Files { files, next: 0 },
            looped,
            fps,
        ))
    }

    pub fn from_recording(
        path: &Path,
        looped: bool,
        fps: Option<f64>,
    ) -> Result<Self, SourceError> {
        let reader = RecordingReader::open(path)?;
        Ok(Self::new(
            format!("recording {}", path.display()),
            Input::Recording {
                path: path.into(),
                reader,
            },
            looped,
            fps,
        ))
    }

    fn new(name: String, input: Input, looped: bool, fps: Option<f64>) -> Self {
        Self {
            name,
            input,
            looped,
            pacer: Pacer::new(fps),
            sequence: 0,
            limits: DecodeLimits::default(),
        }
    }
}

impl FrameSource for ReplaySource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        self.pacer.wait();
        let sequence = self.sequence;
        self.sequence += 1;
        match &mut self.input {
            Input::Files { files, next } => {
                if *next == files.len() {
                    if !self.looped {
                        return Ok(None);
                    }
                    *next = 0;
                }
                let path = files[*next].clone();
                *next += 1;
                let image = decode_file(&path, &self.limits).map_err(|e| SourceError::Corrupt {
                    source_name: path.display().to_string(),
                    sequence,
                    message: e.to_string(),
                })?;
                Ok(Some(Frame {
                    image,
                    sequence,
                    captured_at: SystemTime::now(),
                    source: path.display().to_string(),
                }))
            }
            Input::Recording { path, reader } => {
                let raw = match reader.next_raw()? {
                    Some(raw) => raw,
                    None if self.looped => {
                        *reader = RecordingReader::open(path)?;
                        match reader.next_raw()? {
                            Some(raw) => raw,
                            None => return Ok(None),
                        }
                    }
                    None => return Ok(None),
                };
                let source = path.display().to_string();
                let image = decode(
                    raw.format, raw.width, raw.height, &raw.data, &source, sequence,
                )?;
                Ok(Some(Frame {
                    image,
                    sequence,
                    captured_at: SystemTime::now(),
                    source,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::{RawFrame, RecordingWriter};
    use crate::RawFormat;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    #[test]
    fn replays_a_directory_a_pattern_and_loops() {
        let mut all = ReplaySource::from_images(&[fixtures().join("images")], false, None).unwrap();
        let mut n = 0;
        while all.next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 8);
        let mut bmp =
            ReplaySource::from_images(&[fixtures().join("images/*.bmp")], true, None).unwrap();
        let names: Vec<String> = (0..4)
            .map(|_| bmp.next_frame().unwrap().unwrap().source)
            .collect();
        assert!(
            names[0].ends_with("patch1354a.bmp") && names[3] == names[0],
            "{names:?}"
        );
        assert!(
            ReplaySource::from_images(&[fixtures().join("images/*.gif")], false, None).is_err()
        );
        assert!(ReplaySource::from_images(&[fixtures().join("nope")], false, None).is_err());
    }

    #[test]
    fn a_corrupt_mjpeg_frame_mid_stream_is_skipped_and_the_stream_continues() {
        let cam = fixtures().join("camera");
        let good = std::fs::read(cam.join("patch.mjpeg")).unwrap();
        let mut bad = good.clone();
        bad.truncate(good.len() / 3);
        bad.extend_from_slice(&[0x13; 40]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.dmraw");
        let mut w = RecordingWriter::create(&path).unwrap();
        for (i, data) in [&good, &bad, &good].iter().enumerate() {
            w.write(&RawFrame {
                format: RawFormat::Mjpeg,
                width: 128,
                height: 96,
                timestamp_us: i as u64 * 33_000,
                data: data.to_vec(),
            })
            .unwrap();
        }
        w.write(&RawFrame {
            format: RawFormat::Yuyv,
            width: 128,
            height: 96,
            timestamp_us: 99_000,
            data: vec![0; 100],
        })
        .unwrap();
        w.finish().unwrap();

        let mut src = ReplaySource::from_recording(&path, false, None).unwrap();
        let (mut ok, mut corrupt) = (0, 0);
        loop {
            match src.next_frame() {
                Ok(Some(f)) => {
                    assert_eq!(f.image.dimensions(), (128, 96));
                    ok += 1;
                }
                Ok(None) => break,
                Err(e) if e.is_frame_level() => corrupt += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            (ok, corrupt),
            (2, 2),
            "good, corrupt MJPEG, good, truncated YUYV"
        );
    }

    #[test]
    fn broken_recordings_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let not = dir.path().join("x.dmraw");
        std::fs::write(&not, b"hello world, not a recording").unwrap();
        assert!(ReplaySource::from_recording(&not, false, None)
            .err()
            .unwrap()
            .to_string()
            .contains("bad magic"));
        let cut = dir.path().join("cut.dmraw");
        let mut w = RecordingWriter::create(&cut).unwrap();
        w.write(&RawFrame {
            format: RawFormat::Grey,
            width: 4,
            height: 4,
            timestamp_us: 0,
            data: vec![7; 16],
        })
        .unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&cut).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
        let mut src = ReplaySource::from_recording(&cut, false, None).unwrap();
        let err = src.next_frame().unwrap_err();
        assert!(
            !err.is_frame_level() && err.to_string().contains("truncated"),
            "{err}"
        );
    }
}
