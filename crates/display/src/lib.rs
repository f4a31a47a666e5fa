//! dermedge-display: what the clinician sees, drawn with embedded-graphics onto any `DrawTarget`
//! whose colour converts from `Rgb888` (so `Rgb565` panels too).
//!
//! Screens: live preview, quality warning with its reasons, result (each head's top classes with
//! confidence bars and a permanent "not a diagnosis" line), queue and sync status, error. Layouts
//! are derived from the target's size; 240×240, 320×240 and 800×480 are tested against golden
//! images. Text that does not fit is shortened or wrapped at character boundaries and surplus rows
//! are summarised ("+3 more"), never clipped mid-glyph.
//!
//! Outputs: [`Canvas`] (in memory, PNG snapshots), [`framebuffer::Framebuffer`] (Linux `/dev/fb*`,
//! RGB565 or XRGB8888), and a desktop window behind the `simulator` feature.

mod canvas;
pub mod framebuffer;
mod layout;
#[cfg(feature = "simulator")]
pub mod simulator;

pub use canvas::Canvas;
pub use layout::{draw, Layout};

use image::RgbImage;

/// The permanent line under every result, as the model card requires.
pub const NOT_A_DIAGNOSIS: &str = "Decision support only. Not a diagnosis.";

#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    #[error("{path}: {message}")]
    Output { path: String, message: String },
    #[error("display size {width}x{height}: {message}")]
    Size {
        width: u32,
        height: u32,
        message: String,
    },
}

/// How sync is doing, for the status bar.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncView {
    Disabled,
    /// Enabled, not yet succeeded.
    Waiting,
    /// The last push succeeded this many seconds ago.
    Synced {
        seconds_ago: u64,
    },
    /// The hub could not be reached.
    Offline {
        reason: String,
    },
}

/// The status bar shown on every screen.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub device: String,
    /// Records waiting for the hub.
    pub queue_depth: u64,
    pub sync: SyncView,
    /// Captures accepted this session.
    pub captures: u64,
}

/// One head's answer: classes with probabilities, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadView {
    pub name: String,
    pub classes: Vec<(String, f32)>,
}

impl HeadView {
    /// Sort `classes`/`probabilities` into a view, most likely first.
    pub fn new(name: &str, classes: &[String], probabilities: &[f32]) -> Self {
        let mut pairs: Vec<(String, f32)> = classes
            .iter()
            .cloned()
            .zip(probabilities.iter().copied())
            .collect();
        pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
        Self {
            name: name.into(),
            classes: pairs,
        }
    }
}

/// What to show.
#[derive(Debug, Clone)]
pub enum Screen<'a> {
    Preview {
        frame: &'a RgbImage,
        /// What the device waits for: "hold still", "press to capture".
        hint: &'a str,
    },
    QualityWarning {
        frame: Option<&'a RgbImage>,
        reasons: &'a [String],
    },
    Result {
        heads: &'a [HeadView],
        /// No heads configured: say the record was queued.
        record: &'a str,
    },
    Status {
        /// Extra lines (last error, model, accelerator…).
        details: &'a [String],
    },
    Error {
        title: &'a str,
        message: &'a str,
    },
}

impl Screen<'_> {
    /// A short stable name, for snapshot files and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Screen::Preview { .. } => "preview",
            Screen::QualityWarning { .. } => "quality",
            Screen::Result { .. } => "result",
            Screen::Status { .. } => "status",
            Screen::Error { .. } => "error",
        }
    }
}
