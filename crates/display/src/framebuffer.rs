//! The Linux framebuffer (`/dev/fb0`, SPI panels through fbtft/DRM fbdev emulation, HDMI):
//! geometry and pixel layout from the kernel (`FBIOGET_VSCREENINFO`, `FBIOGET_FSCREENINFO`), or
//! given explicitly for devices and files that do not answer those ioctls.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use embedded_graphics::pixelcolor::RgbColor;

use crate::{Canvas, DisplayError};

/// The framebuffer layouts a configuration may name when the device does not report its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FramebufferLayout {
    Rgb565,
    Xrgb8888,
}

/// Where each channel sits in a pixel (bit offset, bit length), as the kernel describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bytes_per_pixel: u32,
    pub red: (u32, u32),
    pub green: (u32, u32),
    pub blue: (u32, u32),
}

impl PixelFormat {
    pub const RGB565: Self = Self {
        bytes_per_pixel: 2,
        red: (11, 5),
        green: (5, 6),
        blue: (0, 5),
    };
    pub const XRGB8888: Self = Self {
        bytes_per_pixel: 4,
        red: (16, 8),
        green: (8, 8),
        blue: (0, 8),
    };

    /// The pixel format a configuration names.
    pub fn of(layout: FramebufferLayout) -> Self {
        match layout {
            FramebufferLayout::Rgb565 => Self::RGB565,
            FramebufferLayout::Xrgb8888 => Self::XRGB8888,
        }
    }

    /// The pixel's bytes, little-endian as the framebuffer stores them.
    fn pack(&self, r: u8, g: u8, b: u8, out: &mut [u8]) {
        let channel = |v: u8, (offset, length): (u32, u32)| -> u32 {
            (u32::from(v) >> (8 - length.min(8))) << offset
        };
        let value = channel(r, self.red) | channel(g, self.green) | channel(b, self.blue);
        out.copy_from_slice(&value.to_le_bytes()[..self.bytes_per_pixel as usize]);
    }
}

pub struct Framebuffer {
    file: File,
    path: PathBuf,
    width: u32,
    height: u32,
    line_length: u32,
    format: PixelFormat,
}

#[repr(C)]
#[derive(Default)]
struct Bitfield {
    offset: u32,
    length: u32,
    msb_right: u32,
}

#[repr(C)]
#[derive(Default)]
struct VarScreenInfo {
    xres: u32,
    yres: u32,
    xres_virtual: u32,
    yres_virtual: u32,
    xoffset: u32,
    yoffset: u32,
    bits_per_pixel: u32,
    grayscale: u32,
    red: Bitfield,
    green: Bitfield,
    blue: Bitfield,
    transp: Bitfield,
    rest: [u32; 20],
}

#[repr(C)]
struct FixScreenInfo {
    id: [u8; 16],
    smem_start: libc::c_ulong,
    smem_len: u32,
    kind: u32,
    type_aux: u32,
    visual: u32,
    xpanstep: u16,
    ypanstep: u16,
    ywrapstep: u16,
    line_length: u32,
    mmio_start: libc::c_ulong,
    mmio_len: u32,
    accel: u32,
    capabilities: u16,
    reserved: [u16; 2],
}

const FBIOGET_VSCREENINFO: libc::c_ulong = 0x4600;
const FBIOGET_FSCREENINFO: libc::c_ulong = 0x4602;

impl Framebuffer {
    /// Open a framebuffer device and ask the kernel for its geometry and pixel layout.
    pub fn open(path: &Path) -> Result<Self, DisplayError> {
        let err = |message: String| DisplayError::Output {
            path: path.display().to_string(),
            message,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        let mut var = VarScreenInfo::default();
        // SAFETY: FBIOGET_VSCREENINFO fills a struct fb_var_screeninfo, which VarScreenInfo mirrors.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FBIOGET_VSCREENINFO as _,
                &mut var as *mut VarScreenInfo,
            )
        };
        if rc != 0 {
            return Err(err(format!(
                "not a framebuffer device ({}); give its size and pixel format explicitly",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: all-zero bytes are a valid FixScreenInfo (plain integers).
        let mut fix: FixScreenInfo = unsafe { std::mem::zeroed() };
        // SAFETY: FBIOGET_FSCREENINFO fills a struct fb_fix_screeninfo, which FixScreenInfo mirrors.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FBIOGET_FSCREENINFO as _,
                &mut fix as *mut FixScreenInfo,
            )
        };
        if rc != 0 {
            return Err(err(format!(
                "FBIOGET_FSCREENINFO: {}",
                std::io::Error::last_os_error()
            )));
        }
        let format = match var.bits_per_pixel {
            16 | 32 => PixelFormat {
                bytes_per_pixel: var.bits_per_pixel / 8,
                red: (var.red.offset, var.red.length),
                green: (var.green.offset, var.green.length),
                blue: (var.blue.offset, var.blue.length),
            },
            bpp => {
                return Err(err(format!(
                    "{bpp} bits per pixel; RGB565 (16) or XRGB8888 (32) expected"
                )))
            }
        };
        log::info!(
            "framebuffer {}: {}x{}, {} bpp, line {} bytes",
            path.display(),
            var.xres,
            var.yres,
            var.bits_per_pixel,
            fix.line_length
        );
        Ok(Self {
            file,
            path: path.into(),
            width: var.xres,
            height: var.yres,
            line_length: fix.line_length,
            format,
        })
    }

    /// A framebuffer of known geometry: a device that does not answer the ioctls, or a file.
    pub fn with_geometry(
        path: &Path,
        width: u32,
        height: u32,
        format: PixelFormat,
    ) -> Result<Self, DisplayError> {
        let file = OpenOptions::new()
            .write(true)
            .create(!path.starts_with("/dev"))
            .truncate(false)
            .open(path)
            .map_err(|e| DisplayError::Output {
                path: path.display().to_string(),
                message: format!("cannot open: {e}"),
            })?;
        Ok(Self {
            file,
            path: path.into(),
            width,
            height,
            line_length: width * format.bytes_per_pixel,
            format,
        })
    }

    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    pub fn format(&self) -> PixelFormat {
        self.format
    }

    /// Copy `canvas` to the top-left of the screen, one row per write.
    pub fn present(&mut self, canvas: &Canvas) -> Result<(), DisplayError> {
        if canvas.width() > self.width || canvas.height() > self.height {
            return Err(DisplayError::Size {
                width: canvas.width(),
                height: canvas.height(),
                message: format!(
                    "larger than the framebuffer ({}x{})",
                    self.width, self.height
                ),
            });
        }
        let bpp = self.format.bytes_per_pixel as usize;
        let mut row = vec![0u8; canvas.width() as usize * bpp];
        for y in 0..canvas.height() {
            for x in 0..canvas.width() {
                let p = canvas.pixel(x, y);
                let at = x as usize * bpp;
                self.format
                    .pack(p.r(), p.g(), p.b(), &mut row[at..at + bpp]);
            }
            self.file
                .write_all_at(&row, u64::from(y) * u64::from(self.line_length))
                .map_err(|e| DisplayError::Output {
                    path: self.path.display().to_string(),
                    message: e.to_string(),
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::pixelcolor::Rgb888;
    use embedded_graphics::prelude::*;
    use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};

    #[test]
    fn pixels_are_packed_as_the_kernel_lays_them_out() {
        let mut out = [0u8; 2];
        PixelFormat::RGB565.pack(255, 0, 0, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0xF800);
        PixelFormat::RGB565.pack(0, 255, 0, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x07E0);
        let mut out = [0u8; 4];
        PixelFormat::XRGB8888.pack(0x12, 0x34, 0x56, &mut out);
        assert_eq!(u32::from_le_bytes(out), 0x0012_3456);
    }

    #[test]
    fn a_canvas_is_written_row_by_row_at_the_line_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fb");
        let mut canvas = Canvas::new(4, 2);
        Rectangle::new(Point::new(1, 1), Size::new(1, 1))
            .into_styled(PrimitiveStyle::with_fill(Rgb888::new(0, 0, 255)))
            .draw(&mut canvas)
            .unwrap();
        let mut fb = Framebuffer::with_geometry(&path, 4, 2, PixelFormat::RGB565).unwrap();
        fb.present(&canvas).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 16);
        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 0x001F);
        assert!(fb.present(&Canvas::new(5, 2)).is_err());
        let err = Framebuffer::open(&path).err().unwrap().to_string();
        assert!(err.contains("not a framebuffer"), "{err}");
    }

    /// The structs the two ioctls fill, laid out as linux/fb.h declares them.
    #[test]
    fn screen_info_layouts_match_the_kernel() {
        use std::mem::{offset_of, size_of};
        assert_eq!(size_of::<Bitfield>(), 12);
        assert_eq!(size_of::<VarScreenInfo>(), 160);
        assert_eq!(offset_of!(VarScreenInfo, bits_per_pixel), 24);
        assert_eq!(offset_of!(VarScreenInfo, red), 32);
        assert_eq!(offset_of!(VarScreenInfo, transp), 68);
        assert_eq!(offset_of!(VarScreenInfo, rest), 80);
        let long = size_of::<libc::c_ulong>();
        assert_eq!(offset_of!(FixScreenInfo, smem_start), 16);
        assert_eq!(offset_of!(FixScreenInfo, smem_len), 16 + long);
        assert_eq!(offset_of!(FixScreenInfo, xpanstep), 16 + long + 16);
        // ywrapstep is followed by two bytes of padding before line_length.
        assert_eq!(offset_of!(FixScreenInfo, line_length), 16 + long + 24);
        if long == 8 {
            assert_eq!(offset_of!(FixScreenInfo, mmio_start), 56);
            assert_eq!(offset_of!(FixScreenInfo, capabilities), 72);
            assert_eq!(size_of::<FixScreenInfo>(), 80);
        } else {
            assert_eq!(offset_of!(FixScreenInfo, mmio_start), 44);
            assert_eq!(size_of::<FixScreenInfo>(), 68);
        }
    }
}
