//! A recorded stream of raw camera buffers, so a session can be replayed through the same decoder
//! the live camera uses. Layout (little-endian): the magic `DMRAW1\0\0`, then per frame
//! `format u8 | width u32 | height u32 | timestamp µs u64 | length u32 | bytes`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use dermedge_core::SourceError;

use crate::RawFormat;

pub const MAGIC: &[u8; 8] = b"DMRAW1\0\0";
/// Largest frame accepted from a recording (a 4K YUYV frame is 16.6 MB).
pub const MAX_FRAME_BYTES: u32 = 64 << 20;

/// One recorded buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct RawFrame {
    pub format: RawFormat,
    pub width: u32,
    pub height: u32,
    pub timestamp_us: u64,
    pub data: Vec<u8>,
}

pub struct RecordingWriter {
    out: BufWriter<File>,
}

impl RecordingWriter {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let mut out = BufWriter::new(File::create(path)?);
        out.write_all(MAGIC)?;
        Ok(Self { out })
    }

    pub fn write(&mut self, f: &RawFrame) -> std::io::Result<()> {
        self.out.write_all(&[f.format.code()])?;
        self.out.write_all(&f.width.to_le_bytes())?;
        self.out.write_all(&f.height.to_le_bytes())?;
        self.out.write_all(&f.timestamp_us.to_le_bytes())?;
        self.out.write_all(&(f.data.len() as u32).to_le_bytes())?;
        self.out.write_all(&f.data)
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

pub struct RecordingReader {
    path: PathBuf,
    input: BufReader<File>,
    offset: u64,
}

impl RecordingReader {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let err = |message: String| SourceError::Recording {
            path: path.display().to_string(),
            message,
        };
        let mut input =
            BufReader::new(File::open(path).map_err(|e| err(format!("cannot open: {e}")))?);
        let mut magic = [0u8; 8];
        input
            .read_exact(&mut magic)
            .map_err(|_| err("too short for a dermedge recording".into()))?;
        if &magic != MAGIC {
            return Err(err("not a dermedge raw recording (bad magic)".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            input,
            offset: 8,
        })
    }

    /// The next frame, `Ok(None)` at a clean end; a truncated last frame is an error.
    pub fn next_raw(&mut self) -> Result<Option<RawFrame>, SourceError> {
        let err = |offset: u64, message: String| SourceError::Recording {
            path: self.path.display().to_string(),
            message: format!("at byte {offset}: {message}"),
        };
        let mut header = [0u8; 21];
        let mut got = 0;
        while got < header.len() {
            match self.input.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(err(self.offset, "truncated frame header".into())),
                Ok(n) => got += n,
                Err(e) => return Err(err(self.offset, e.to_string())),
            }
        }
        let format = RawFormat::from_code(header[0])
            .ok_or_else(|| err(self.offset, format!("unknown format code {}", header[0])))?;
        let width = u32::from_le_bytes(header[1..5].try_into().unwrap());
        let height = u32::from_le_bytes(header[5..9].try_into().unwrap());
        let timestamp_us = u64::from_le_bytes(header[9..17].try_into().unwrap());
        let len = u32::from_le_bytes(header[17..21].try_into().unwrap());
        if len > MAX_FRAME_BYTES {
            return Err(err(
                self.offset,
                format!("frame of {len} bytes exceeds the {MAX_FRAME_BYTES} byte limit"),
            ));
        }
        let mut data = vec![0u8; len as usize];
        self.input.read_exact(&mut data).map_err(|_| {
            err(
                self.offset,
                format!("truncated frame data ({len} bytes announced)"),
            )
        })?;
        self.offset += 21 + len as u64;
        Ok(Some(RawFrame {
            format,
            width,
            height,
            timestamp_us,
            data,
        }))
    }
}
