//! Coral Edge TPU: `libedgetpu.so.1` loaded at run time, its delegate created for the first
//! device it lists (libedgetpu's C API, `edgetpu_c.h`).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The library name Coral's runtime packages install (`libedgetpu1-std` / `-max`).
pub const LIBRARY: &str = "libedgetpu.so.1";
/// Overrides where the library is looked for.
pub const LIBRARY_ENV: &str = "DERMEDGE_EDGETPU_LIB";
/// The custom op `edgetpu_compiler` puts the compiled part of a graph in.
pub const CUSTOM_OP: &str = "edgetpu-custom-op";

/// Why the Edge TPU cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EdgeTpuError {
    #[error(
        "{library}: cannot load the Edge TPU runtime ({message}); install Coral's libedgetpu1-std \
         or point {LIBRARY_ENV} at it"
    )]
    LibraryMissing { library: String, message: String },
    #[error("{library}: not an Edge TPU runtime: symbol {symbol} missing")]
    NotEdgeTpuLibrary {
        library: String,
        symbol: &'static str,
    },
    #[error(
        "no Edge TPU device found (libedgetpu {version}); is the Coral plugged in and powered?"
    )]
    NoDevice { version: String },
    #[error("the Edge TPU delegate for {device} could not be created (device busy or failed)")]
    DelegateRefused { device: String },
    #[error(
        "{path}: model not compiled for the Edge TPU ({reason}); compile the int8 model with \
         `edgetpu_compiler`, which writes <name>_edgetpu.tflite next to it"
    )]
    NotCompiled { path: PathBuf, reason: String },
}

#[repr(C)]
struct RawDevice {
    kind: c_int,
    path: *const c_char,
}

#[repr(C)]
struct RawOption {
    name: *const c_char,
    value: *const c_char,
}

type ListDevices = unsafe extern "C" fn(*mut usize) -> *mut RawDevice;
type FreeDevices = unsafe extern "C" fn(*mut RawDevice);
type CreateDelegate =
    unsafe extern "C" fn(c_int, *const c_char, *const RawOption, usize) -> *mut c_void;
type FreeDelegate = unsafe extern "C" fn(*mut c_void);
type Version = unsafe extern "C" fn() -> *const c_char;

/// One Edge TPU the runtime lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `usb` or `pci`.
    pub kind: &'static str,
    pub path: String,
    raw_kind: c_int,
}

/// The loaded `libedgetpu` and the entry points dermedge uses.
pub struct EdgeTpuRuntime {
    path: String,
    list_devices: ListDevices,
    free_devices: FreeDevices,
    create_delegate: CreateDelegate,
    free_delegate: FreeDelegate,
    version: Version,
    /// Kept last: the function pointers above live inside it.
    _library: libloading::Library,
}

impl EdgeTpuRuntime {
    /// Load `explicit`, else `$DERMEDGE_EDGETPU_LIB`, else `libedgetpu.so.1` from the loader's path.
    pub fn load(explicit: Option<&Path>) -> Result<Self, EdgeTpuError> {
        let path = explicit
            .map(|p| p.display().to_string())
            .or_else(|| std::env::var(LIBRARY_ENV).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| LIBRARY.to_string());
        // SAFETY: loading a shared library runs its initialisers; libedgetpu's are plain C++
        // static constructors. This is the documented way to use it.
        let library = unsafe { libloading::Library::new(&path) }.map_err(|e| {
            EdgeTpuError::LibraryMissing {
                library: path.clone(),
                message: e.to_string(),
            }
        })?;
        macro_rules! symbol {
            ($name:literal, $ty:ty) => {
                // SAFETY: the symbol has this signature in libedgetpu's C API (edgetpu_c.h).
                *unsafe { library.get::<$ty>(concat!($name, "\0").as_bytes()) }.map_err(|_| {
                    EdgeTpuError::NotEdgeTpuLibrary {
                        library: path.clone(),
                        symbol: $name,
                    }
                })?
            };
        }
        let runtime = Self {
            list_devices: symbol!("edgetpu_list_devices", ListDevices),
            free_devices: symbol!("edgetpu_free_devices", FreeDevices),
            create_delegate: symbol!("edgetpu_create_delegate", CreateDelegate),
            free_delegate: symbol!("edgetpu_free_delegate", FreeDelegate),
            version: symbol!("edgetpu_version", Version),
            path,
            _library: library,
        };
        log::info!("Edge TPU runtime {}: {}", runtime.path, runtime.version());
        Ok(runtime)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn version(&self) -> String {
        // SAFETY: returns a static NUL-terminated string (or null).
        let v = unsafe { (self.version)() };
        if v.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            unsafe { CStr::from_ptr(v) }.to_string_lossy().into_owned()
        }
    }

    /// The Edge TPUs present now.
    pub fn devices(&self) -> Vec<Device> {
        let mut n = 0usize;
        // SAFETY: valid out-pointer; the array is freed with edgetpu_free_devices below.
        let raw = unsafe { (self.list_devices)(&mut n) };
        if raw.is_null() {
            return Vec::new();
        }
        // SAFETY: the runtime returned `n` devices at `raw`, valid until freed.
        let devices = unsafe { std::slice::from_raw_parts(raw, n) }
            .iter()
            .map(|d| Device {
                kind: if d.kind == 0 { "pci" } else { "usb" },
                path: if d.path.is_null() {
                    String::new()
                } else {
                    // SAFETY: NUL-terminated string owned by the device list.
                    unsafe { CStr::from_ptr(d.path) }
                        .to_string_lossy()
                        .into_owned()
                },
                raw_kind: d.kind,
            })
            .collect();
        // SAFETY: returned by edgetpu_list_devices, freed once.
        unsafe { (self.free_devices)(raw) };
        devices
    }

    /// A delegate for the first device listed.
    pub fn delegate(self: &Arc<Self>) -> Result<Delegate, EdgeTpuError> {
        let device = self
            .devices()
            .into_iter()
            .next()
            .ok_or_else(|| EdgeTpuError::NoDevice {
                version: self.version(),
            })?;
        let name = std::ffi::CString::new(device.path.clone()).unwrap_or_default();
        // SAFETY: a device kind and path the runtime listed; no options.
        let raw =
            unsafe { (self.create_delegate)(device.raw_kind, name.as_ptr(), std::ptr::null(), 0) };
        if raw.is_null() {
            return Err(EdgeTpuError::DelegateRefused {
                device: format!("{} {}", device.kind, device.path),
            });
        }
        Ok(Delegate {
            runtime: Arc::clone(self),
            raw,
            device,
        })
    }
}

/// A live Edge TPU delegate; freed on drop, after every interpreter that uses it.
pub struct Delegate {
    runtime: Arc<EdgeTpuRuntime>,
    raw: *mut c_void,
    device: Device,
}

// SAFETY: the delegate is owned by this value and only handed to one interpreter, which the
// owner keeps next to it; libedgetpu delegates are not tied to the creating thread.
unsafe impl Send for Delegate {}

impl Delegate {
    pub fn as_ptr(&self) -> *mut c_void {
        self.raw
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl Drop for Delegate {
    fn drop(&mut self) {
        // SAFETY: created by edgetpu_create_delegate, freed once.
        unsafe { (self.runtime.free_delegate)(self.raw) }
    }
}

/// The file `edgetpu_compiler` writes for `model`: `<stem>_edgetpu.tflite` next to it.
pub fn compiled_path(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    model.with_file_name(format!("{stem}_edgetpu.tflite"))
}
