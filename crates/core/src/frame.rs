//! Frames and where they come from.

use std::time::SystemTime;

use crate::RgbImage;

/// One captured frame, decoded to RGB8.
#[derive(Debug, Clone)]
pub struct Frame {
    pub image: RgbImage,
    /// Position in its source's stream, from 0; gaps mean frames were skipped or dropped.
    pub sequence: u64,
    pub captured_at: SystemTime,
    /// Where it came from: a device path, a file, `synthetic`.
    pub source: String,
}

/// Why a source could not deliver a frame.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source_name}: no such camera; {hint}")]
    NoDevice { source_name: String, hint: String },
    #[error("{source_name}: {message}")]
    Device {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: frame {sequence}: {message}")]
    Corrupt {
        source_name: String,
        sequence: u64,
        message: String,
    },
    #[error("{source_name}: disconnected: {message}")]
    Disconnected {
        source_name: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Recording { path: String, message: String },
}

impl SourceError {
    /// A bad frame: skip it and go on with the stream.
    pub fn is_frame_level(&self) -> bool {
        matches!(self, SourceError::Corrupt { .. })
    }
}

/// Something that produces frames: a USB dermatoscope, a replay directory, a generator.
/// Not `Send`: some camera backends must stay on the thread that opened them, so a capture thread
/// opens its source itself.
pub trait FrameSource {
    fn name(&self) -> String;

    /// The next frame; `Ok(None)` at the end of a finite stream. A frame-level error
    /// ([`SourceError::is_frame_level`]) leaves the source usable.
    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError>;
}
