//! dermedge-camera: where frames come from, and how they reach the embedder.
//!
//! - [`decode`]: camera buffers (MJPEG, YUYV, NV12, GREY) to RGB8 — the one path both the live
//!   camera and recorded/fixture buffers take;
//! - [`replay`]: image files or a recorded raw-buffer stream, optionally looped and paced;
//! - [`synthetic`]: generated frames for tests and demos;
//! - [`uvc`] (feature `uvc`): USB dermatoscopes through nokhwa's V4L2 backend;
//! - [`handoff`]: a fixed-capacity mailbox between the capture thread and the embedder that keeps
//!   the newest frame, drops stale ones and counts everything.
//!
//! Depends on `dermedge-core` (the `FrameSource` contract).

pub mod decode;
pub mod handoff;
pub mod pace;
pub mod recording;
pub mod replay;
pub mod synthetic;
#[cfg(feature = "uvc")]
pub mod uvc;

pub use decode::{decode, RawFormat};
pub use handoff::{Counters, Handoff};
pub use replay::ReplaySource;
pub use synthetic::SyntheticSource;

/// A camera as `dermedge devices` lists it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub index: String,
    pub name: String,
    pub description: String,
    /// (format, width, height, fps) the device offers.
    pub formats: Vec<(String, u32, u32, u32)>,
}

/// Cameras present on this machine (empty without the `uvc` feature or without devices).
pub fn list_devices() -> Result<Vec<DeviceInfo>, dermedge_core::SourceError> {
    #[cfg(feature = "uvc")]
    {
        uvc::list_devices()
    }
    #[cfg(not(feature = "uvc"))]
    {
        log::info!("built without the `uvc` feature: no live camera support");
        Ok(Vec::new())
    }
}
