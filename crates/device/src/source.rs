//! Opening the configured frame source, and holding replayed images for several frames as a
//! steady hand would.

use dermedge_camera::pace::Pacer;
use dermedge_core::{Frame, FrameSource, SourceError};
use dermedge_core::{Ranged, RangedFloat};

use crate::config::{CameraSection, SourceKind};

/// Repeats each frame of `inner` `hold` times (new sequence numbers, same image), paced at
/// the camera's frame rate: the held frames arrive one interval apart, as from a camera.
pub struct Hold {
    inner: Box<dyn FrameSource>,
    hold: u32,
    pacer: Pacer,
    current: Option<Frame>,
    shown: u32,
    sequence: u64,
}

impl Hold {
    pub fn new(inner: Box<dyn FrameSource>, hold: u32, fps: Option<f64>) -> Self {
        Self {
            inner,
            hold: hold.max(1),
            pacer: Pacer::new(fps),
            current: None,
            shown: 0,
            sequence: 0,
        }
    }
}

impl FrameSource for Hold {
    fn name(&self) -> String {
        if self.hold > 1 {
            format!("{} (each held {} frames)", self.inner.name(), self.hold)
        } else {
            self.inner.name()
        }
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.current.is_none() || self.shown >= self.hold {
            self.current = self.inner.next_frame()?;
            self.shown = 0;
        }
        let Some(frame) = &self.current else {
            return Ok(None);
        };
        self.shown += 1;
        self.pacer.wait();
        let mut frame = frame.clone();
        frame.sequence = self.sequence;
        frame.captured_at = std::time::SystemTime::now();
        self.sequence += 1;
        Ok(Some(frame))
    }
}

/// Open the source the configuration names. Call it on the thread that will read it.
pub fn open_source(camera: &CameraSection) -> Result<Box<dyn FrameSource>, SourceError> {
    let source: Box<dyn FrameSource> = match camera.source {
        SourceKind::Replay => {
            let path = camera.path.clone().unwrap_or_default();
            let replay = if path.extension().is_some_and(|e| e == "dmraw") {
                dermedge_camera::ReplaySource::from_recording(&path, camera.looped, None)?
            } else {
                dermedge_camera::ReplaySource::from_images(&[path], camera.looped, None)?
            };
            // Paced below, per held frame.
            return Ok(Box::new(Hold::new(
                Box::new(replay),
                camera.hold_frames.get_u32(),
                camera.fps.map(RangedFloat::get),
            )));
        }
        SourceKind::Synthetic => Box::new(dermedge_camera::SyntheticSource::new(
            camera.width.map_or(640, Ranged::get_u32),
            camera.height.map_or(480, Ranged::get_u32),
            camera.fps.map(RangedFloat::get),
            None,
        )),
        SourceKind::Uvc => open_uvc(camera)?,
    };
    Ok(source)
}

#[cfg(feature = "uvc")]
fn open_uvc(camera: &CameraSection) -> Result<Box<dyn FrameSource>, SourceError> {
    use dermedge_camera::uvc::{CaptureRequest, DeviceSelector, UvcSource};
    let selector: DeviceSelector = camera
        .device
        .as_deref()
        .unwrap_or("0")
        .parse()
        .expect("any text selects a device");
    let request = CaptureRequest {
        format: camera.format,
        resolution: camera
            .width
            .zip(camera.height)
            .map(|(w, h)| (w.get_u32(), h.get_u32())),
        fps: camera.fps.map(|f| f.get().round() as u32),
        min_short_side: 448,
    };
    Ok(Box::new(UvcSource::open(selector, request)?))
}

#[cfg(not(feature = "uvc"))]
fn open_uvc(_camera: &CameraSection) -> Result<Box<dyn FrameSource>, SourceError> {
    Err(SourceError::NoDevice {
        source_name: "uvc".into(),
        hint: "this dermedge was built without the `uvc` feature".into(),
    })
}
