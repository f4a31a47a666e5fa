//! USB dermatoscopes (UVC) through nokhwa's V4L2 backend: device selection, format negotiation,
//! reconnection with backoff. Frames are decoded by [`crate::decode`], like recorded ones.

use std::time::{Duration, Instant, SystemTime};

use dermedge_core::{Frame, FrameSource, SourceError};
use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
    Resolution,
};
use nokhwa::Camera;

use crate::{decode, DeviceInfo, RawFormat};

/// Which camera: `0`, `/dev/video2`, or (part of) its name.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceSelector {
    Index(u32),
    Path(String),
    Name(String),
}

impl std::str::FromStr for DeviceSelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(if let Ok(i) = s.parse() {
            DeviceSelector::Index(i)
        } else if s.starts_with("/dev/") {
            DeviceSelector::Path(s.into())
        } else {
            DeviceSelector::Name(s.into())
        })
    }
}

/// Forced settings from configuration; anything left `None` is negotiated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptureRequest {
    pub format: Option<RawFormat>,
    pub resolution: Option<(u32, u32)>,
    pub fps: Option<u32>,
    /// The model input side: negotiation prefers the smallest resolution whose short side reaches it.
    pub min_short_side: u32,
}

/// Preference among formats: MJPEG (small over USB), then YUYV, NV12, GREY.
const PREFERENCE: [RawFormat; 4] = [
    RawFormat::Mjpeg,
    RawFormat::Yuyv,
    RawFormat::Nv12,
    RawFormat::Grey,
];
const MIN_FPS: u32 = 15;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

fn raw_format(f: FrameFormat) -> Option<RawFormat> {
    match f {
        FrameFormat::MJPEG => Some(RawFormat::Mjpeg),
        FrameFormat::YUYV => Some(RawFormat::Yuyv),
        FrameFormat::NV12 => Some(RawFormat::Nv12),
        FrameFormat::GRAY => Some(RawFormat::Grey),
        _ => None,
    }
}

fn frame_format(f: RawFormat) -> FrameFormat {
    match f {
        RawFormat::Mjpeg => FrameFormat::MJPEG,
        RawFormat::Yuyv => FrameFormat::YUYV,
        RawFormat::Nv12 => FrameFormat::NV12,
        RawFormat::Grey => FrameFormat::GRAY,
    }
}

/// Pick a format from what the device offers (pure: tested without a device).
pub fn negotiate(
    offered: &[(RawFormat, u32, u32, u32)],
    request: &CaptureRequest,
) -> Result<(RawFormat, u32, u32, u32), String> {
    let matches = |&&(f, w, h, fps): &&(RawFormat, u32, u32, u32)| {
        request.format.is_none_or(|rf| rf == f)
            && request.resolution.is_none_or(|r| r == (w, h))
            && request.fps.is_none_or(|r| r == fps)
    };
    let candidates: Vec<&(RawFormat, u32, u32, u32)> = offered.iter().filter(matches).collect();
    if candidates.is_empty() {
        let list: Vec<String> = offered
            .iter()
            .map(|(f, w, h, fps)| format!("{f} {w}×{h}@{fps}"))
            .collect();
        return Err(format!(
            "the device offers no format matching {request:?}; it offers: {}",
            list.join(", ")
        ));
    }
    for preferred in PREFERENCE {
        let mut good: Vec<&&(RawFormat, u32, u32, u32)> = candidates
            .iter()
            .filter(|(f, w, h, fps)| {
                *f == preferred && (*w).min(*h) >= request.min_short_side && *fps >= MIN_FPS
            })
            .collect();
        good.sort_by_key(|(_, w, h, fps)| (w * h, u32::MAX - fps));
        if let Some(best) = good.first() {
            return Ok(***best);
        }
    }
    // Nothing reaches the model size at 15 fps: take the largest frames, fastest first.
    let best = candidates.iter().max_by_key(|(f, w, h, fps)| {
        (
            w * h,
            *fps,
            PREFERENCE.len() - PREFERENCE.iter().position(|p| p == f).unwrap_or(0),
        )
    });
    Ok(**best.expect("non-empty"))
}

fn camera_index(selector: &DeviceSelector) -> Result<CameraIndex, SourceError> {
    Ok(match selector {
        DeviceSelector::Index(i) => CameraIndex::Index(*i),
        DeviceSelector::Path(p) => {
            if !std::path::Path::new(p).exists() {
                return Err(SourceError::NoDevice {
                    source_name: p.clone(),
                    hint: "the path does not exist; `dermedge devices` lists cameras".into(),
                });
            }
            let number = p
                .trim_start_matches("/dev/video")
                .parse::<u32>()
                .map_err(|_| SourceError::Device {
                    source_name: p.clone(),
                    message: "not a V4L2 video device (expected /dev/videoN)".into(),
                })?;
            CameraIndex::Index(number)
        }
        DeviceSelector::Name(name) => {
            let devices =
                nokhwa::query(ApiBackend::Video4Linux).map_err(|e| SourceError::Device {
                    source_name: name.clone(),
                    message: e.to_string(),
                })?;
            let found = devices
                .iter()
                .find(|d| d.human_name().to_lowercase().contains(&name.to_lowercase()));
            match found {
                Some(d) => d.index().clone(),
                None => {
                    return Err(SourceError::NoDevice {
                        source_name: name.clone(),
                        hint: format!("{} camera(s) present, none named like that", devices.len()),
                    })
                }
            }
        }
    })
}

pub fn list_devices() -> Result<Vec<DeviceInfo>, SourceError> {
    let devices = nokhwa::query(ApiBackend::Video4Linux).map_err(|e| SourceError::Device {
        source_name: "v4l2".into(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for d in devices {
        let mut formats = Vec::new();
        match Camera::new(
            d.index().clone(),
            RequestedFormat::new::<RgbFormat>(RequestedFormatType::None),
        ) {
            Ok(mut cam) => {
                for f in cam.compatible_camera_formats().unwrap_or_default() {
                    formats.push((
                        f.format().to_string(),
                        f.width(),
                        f.height(),
                        f.frame_rate(),
                    ));
                }
            }
            Err(e) => log::warn!("{}: cannot open to list formats: {e}", d.human_name()),
        }
        out.push(DeviceInfo {
            index: d.index().to_string(),
            name: d.human_name(),
            description: d.description().to_string(),
            formats,
        });
    }
    Ok(out)
}

/// A live UVC camera.
pub struct UvcSource {
    selector: DeviceSelector,
    request: CaptureRequest,
    camera: Option<Camera>,
    chosen: Option<(RawFormat, u32, u32, u32)>,
    sequence: u64,
    backoff: Duration,
    retry_at: Option<Instant>,
}

impl UvcSource {
    pub fn open(selector: DeviceSelector, request: CaptureRequest) -> Result<Self, SourceError> {
        let mut source = Self {
            selector,
            request,
            camera: None,
            chosen: None,
            sequence: 0,
            backoff: Duration::from_secs(1),
            retry_at: None,
        };
        source.connect()?;
        Ok(source)
    }

    fn label(&self) -> String {
        match &self.selector {
            DeviceSelector::Index(i) => format!("camera {i}"),
            DeviceSelector::Path(p) => p.clone(),
            DeviceSelector::Name(n) => format!("camera {n:?}"),
        }
    }

    fn connect(&mut self) -> Result<(), SourceError> {
        let label = self.label();
        let index = camera_index(&self.selector)?;
        let device_err = |e: nokhwa::NokhwaError| SourceError::Device {
            source_name: label.clone(),
            message: e.to_string(),
        };
        let mut camera = Camera::new(
            index,
            RequestedFormat::new::<RgbFormat>(RequestedFormatType::None),
        )
        .map_err(|e| SourceError::NoDevice {
            source_name: label.clone(),
            hint: format!("cannot open it as a camera: {e}"),
        })?;
        let offered: Vec<(RawFormat, u32, u32, u32)> = camera
            .compatible_camera_formats()
            .map_err(device_err)?
            .into_iter()
            .filter_map(|f| {
                raw_format(f.format()).map(|rf| (rf, f.width(), f.height(), f.frame_rate()))
            })
            .collect();
        for (f, w, h, fps) in &offered {
            log::info!("{label}: offers {f} {w}×{h} @ {fps} fps");
        }
        let chosen = negotiate(&offered, &self.request).map_err(|message| SourceError::Device {
            source_name: label.clone(),
            message,
        })?;
        log::info!(
            "{label}: chose {} {}×{} @ {} fps",
            chosen.0,
            chosen.1,
            chosen.2,
            chosen.3
        );
        let format = CameraFormat::new(
            Resolution::new(chosen.1, chosen.2),
            frame_format(chosen.0),
            chosen.3,
        );
        camera
            .set_camera_requset(RequestedFormat::new::<RgbFormat>(
                RequestedFormatType::Exact(format),
            ))
            .map_err(device_err)?;
        camera.open_stream().map_err(device_err)?;
        self.camera = Some(camera);
        self.chosen = Some(chosen);
        self.backoff = Duration::from_secs(1);
        Ok(())
    }
}

impl FrameSource for UvcSource {
    fn name(&self) -> String {
        self.label()
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SourceError> {
        if self.camera.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                std::thread::sleep(self.retry_at.unwrap() - Instant::now());
            }
            if let Err(e) = self.connect() {
                self.retry_at = Some(Instant::now() + self.backoff);
                log::warn!(
                    "{}: reconnect failed ({e}); next try in {:?}",
                    self.label(),
                    self.backoff
                );
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                return Err(SourceError::Disconnected {
                    source_name: self.label(),
                    message: e.to_string(),
                });
            }
            log::info!("{}: reconnected", self.label());
        }
        let sequence = self.sequence;
        self.sequence += 1;
        let camera = self.camera.as_mut().expect("connected above");
        match camera.frame() {
            Ok(buffer) => {
                let format = raw_format(buffer.source_frame_format()).unwrap_or(RawFormat::Mjpeg);
                let res = buffer.resolution();
                let image = decode(
                    format,
                    res.width(),
                    res.height(),
                    buffer.buffer(),
                    &self.label(),
                    sequence,
                )?;
                Ok(Some(Frame {
                    image,
                    sequence,
                    captured_at: SystemTime::now(),
                    source: self.label(),
                }))
            }
            Err(e) => {
                log::warn!("{}: lost the camera ({e}); will reconnect", self.label());
                self.camera = None;
                self.retry_at = Some(Instant::now() + self.backoff);
                Err(SourceError::Disconnected {
                    source_name: self.label(),
                    message: e.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered() -> Vec<(RawFormat, u32, u32, u32)> {
        vec![
            (RawFormat::Yuyv, 640, 480, 30),
            (RawFormat::Mjpeg, 1920, 1080, 30),
            (RawFormat::Mjpeg, 640, 480, 30),
            (RawFormat::Mjpeg, 320, 240, 30),
            (RawFormat::Yuyv, 1920, 1080, 5),
        ]
    }

    #[test]
    fn prefers_the_smallest_mjpeg_that_covers_the_model_input() {
        let req = CaptureRequest {
            min_short_side: 448,
            ..Default::default()
        };
        assert_eq!(
            negotiate(&offered(), &req).unwrap(),
            (RawFormat::Mjpeg, 640, 480, 30)
        );
        let req = CaptureRequest {
            min_short_side: 720,
            ..Default::default()
        };
        assert_eq!(
            negotiate(&offered(), &req).unwrap(),
            (RawFormat::Mjpeg, 1920, 1080, 30)
        );
        let req = CaptureRequest {
            min_short_side: 224,
            ..Default::default()
        };
        assert_eq!(
            negotiate(&offered(), &req).unwrap(),
            (RawFormat::Mjpeg, 320, 240, 30)
        );
        let req = CaptureRequest {
            min_short_side: 224,
            format: Some(RawFormat::Yuyv),
            ..Default::default()
        };
        assert_eq!(
            negotiate(&offered(), &req).unwrap(),
            (RawFormat::Yuyv, 640, 480, 30)
        );
    }

    #[test]
    fn an_unsupported_forced_format_is_an_error_listing_the_offer() {
        let req = CaptureRequest {
            format: Some(RawFormat::Nv12),
            ..Default::default()
        };
        let err = negotiate(&offered(), &req).unwrap_err();
        assert!(
            err.contains("offers no format") && err.contains("mjpeg 640×480@30"),
            "{err}"
        );
    }

    #[test]
    fn missing_and_non_camera_devices_are_errors() {
        let err = UvcSource::open(
            DeviceSelector::Path("/dev/video99".into()),
            CaptureRequest::default(),
        )
        .err()
        .unwrap();
        assert!(
            matches!(err, SourceError::NoDevice { .. }) && err.to_string().contains("/dev/video99"),
            "{err}"
        );
        let err = UvcSource::open(
            DeviceSelector::Path("/dev/null".into()),
            CaptureRequest::default(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("not a V4L2 video device"), "{err}");
        assert!(UvcSource::open(DeviceSelector::Index(57), CaptureRequest::default()).is_err());
        assert!(UvcSource::open(
            DeviceSelector::Name("no-such-scope".into()),
            CaptureRequest::default()
        )
        .is_err());
    }
}
