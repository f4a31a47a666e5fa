//! Where screens go: PNG snapshots, a framebuffer, a simulator window, or nowhere.

use std::path::{Path, PathBuf};

use dermedge_display::framebuffer::{Framebuffer, PixelFormat};
use dermedge_display::{draw, Canvas, DisplayError, Screen, Status};

use crate::config::{DisplaySection, DisplayTarget};

pub trait ScreenOutput {
    fn show(&mut self, screen: &Screen, status: &Status) -> Result<(), DisplayError>;
}

/// PNG snapshots: `preview.png` (overwritten), and every other screen as `NNNN-<screen>.png`
/// plus `latest.png`.
pub struct PngScreens {
    dir: PathBuf,
    canvas: Canvas,
    events: u32,
}

impl PngScreens {
    pub fn new(dir: &Path, size: (u32, u32)) -> Result<Self, DisplayError> {
        std::fs::create_dir_all(dir).map_err(|e| DisplayError::Output {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            dir: dir.into(),
            canvas: Canvas::new(size.0, size.1),
            events: 0,
        })
    }
}

impl ScreenOutput for PngScreens {
    fn show(&mut self, screen: &Screen, status: &Status) -> Result<(), DisplayError> {
        let _ = draw(&mut self.canvas, screen, status);
        if let Screen::Preview { .. } = screen {
            return self.canvas.save_png(&self.dir.join("preview.png"));
        }
        self.events += 1;
        self.canvas.save_png(&self.dir.join(format!(
            "{:04}-{}.png",
            self.events,
            screen.name()
        )))?;
        self.canvas.save_png(&self.dir.join("latest.png"))
    }
}

pub struct FramebufferScreens {
    fb: Framebuffer,
    canvas: Canvas,
}

impl ScreenOutput for FramebufferScreens {
    fn show(&mut self, screen: &Screen, status: &Status) -> Result<(), DisplayError> {
        let _ = draw(&mut self.canvas, screen, status);
        self.fb.present(&self.canvas)
    }
}

#[cfg(feature = "simulator")]
pub struct SimulatorScreens {
    window: dermedge_display::simulator::SimulatorWindow,
    canvas: Canvas,
}

#[cfg(feature = "simulator")]
impl ScreenOutput for SimulatorScreens {
    fn show(&mut self, screen: &Screen, status: &Status) -> Result<(), DisplayError> {
        let _ = draw(&mut self.canvas, screen, status);
        self.window.present(&self.canvas);
        Ok(())
    }
}

pub struct NoScreens;

impl ScreenOutput for NoScreens {
    fn show(&mut self, _: &Screen, _: &Status) -> Result<(), DisplayError> {
        Ok(())
    }
}

pub fn open(
    display: &DisplaySection,
    size: (u32, u32),
) -> Result<Box<dyn ScreenOutput>, DisplayError> {
    Ok(match display.target {
        DisplayTarget::Png => Box::new(PngScreens::new(
            display.dir.as_deref().unwrap_or(Path::new("screens")),
            size,
        )?),
        DisplayTarget::Framebuffer => {
            let device = display.device.clone().unwrap_or_else(|| "/dev/fb0".into());
            let fb = match display.pixel_format {
                Some(layout) => {
                    Framebuffer::with_geometry(&device, size.0, size.1, PixelFormat::of(layout))?
                }
                None => Framebuffer::open(&device)?,
            };
            let (w, h) = fb.size();
            if w < size.0 || h < size.1 {
                return Err(DisplayError::Size {
                    width: size.0,
                    height: size.1,
                    message: format!("larger than {} ({w}x{h})", device.display()),
                });
            }
            Box::new(FramebufferScreens {
                fb,
                canvas: Canvas::new(size.0, size.1),
            })
        }
        #[cfg(feature = "simulator")]
        DisplayTarget::Simulator => Box::new(SimulatorScreens {
            window: dermedge_display::simulator::SimulatorWindow::new(size.0, size.1, 2),
            canvas: Canvas::new(size.0, size.1),
        }),
        #[cfg(not(feature = "simulator"))]
        DisplayTarget::Simulator => {
            return Err(DisplayError::Output {
                path: "display.target".into(),
                message: "\"simulator\" needs a dermedge built with the `simulator` feature".into(),
            })
        }
        DisplayTarget::None => Box::new(NoScreens),
    })
}
