//! The part of LiteRT 2.1's C API (`litert/c/*.h`) that dermedge uses, resolved from the
//! library with `dlopen`. Types mirror the C declarations; layouts are checked by tests.

use std::ffi::{c_char, c_int, c_uint, c_void};

use libloading::Library;

pub type Status = c_int;
pub const STATUS_OK: Status = 0;

/// Meaning of a `LiteRtStatus` (litert_common.h); the runtime exports no string function.
pub fn status_name(status: Status) -> &'static str {
    match status {
        0 => "ok",
        1 => "invalid argument",
        2 => "memory allocation failure",
        3 => "runtime failure",
        4 => "missing input tensor",
        5 => "unsupported",
        6 => "not found",
        7 => "timeout expired",
        8 => "wrong version",
        9 => "unknown error",
        10 => "already exists",
        100 => "cancelled",
        500 => "file I/O error",
        501 => "invalid flatbuffer",
        502 => "dynamic loading error",
        503 => "serialization error",
        504 => "compilation error",
        1000 => "index out of bounds",
        1001 => "invalid IR type",
        1002 => "invalid graph invariant",
        1003 => "graph modification error",
        1500 => "invalid tool config",
        4000 => "unsupported runtime version",
        4001 => "unsupported compiler version",
        4002 => "incompatible byte code version",
        _ => "unrecognised status",
    }
}

pub type Handle = *mut c_void;
pub type ParamIndex = usize;

pub const ELEMENT_FLOAT32: c_int = 1;
pub const ELEMENT_INT32: c_int = 2;
pub const ELEMENT_UINT8: c_int = 3;
pub const ELEMENT_INT64: c_int = 4;
pub const ELEMENT_INT16: c_int = 7;
pub const ELEMENT_INT8: c_int = 9;
pub const ELEMENT_FLOAT16: c_int = 10;

pub const QUANT_NONE: c_int = 0;
pub const QUANT_PER_TENSOR: c_int = 1;
pub const QUANT_PER_CHANNEL: c_int = 2;

pub const HW_CPU: c_int = 1;
pub const HW_GPU: c_int = 1 << 1;
pub const HW_NPU: c_int = 1 << 2;

pub const LOCK_READ: c_uint = 0;
pub const LOCK_WRITE: c_uint = 1;

pub const MAX_RANK: usize = 8;

/// `LiteRtLayout`: a 7-bit rank and a 1-bit has_strides flag share the first byte.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub rank_and_flags: u8,
    pub dimensions: [i32; MAX_RANK],
    pub strides: [u32; MAX_RANK],
}

impl Layout {
    pub fn rank(&self) -> usize {
        (self.rank_and_flags & 0x7f) as usize
    }

    pub fn dims(&self) -> &[i32] {
        &self.dimensions[..self.rank().min(MAX_RANK)]
    }
}

/// `LiteRtRankedTensorType`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RankedTensorType {
    pub element_type: c_int,
    pub layout: Layout,
}

/// `LiteRtQuantizationPerTensor`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct QuantizationPerTensor {
    pub scale: f32,
    pub zero_point: i64,
}

/// `LiteRtQuantizationPerChannel`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct QuantizationPerChannel {
    pub quantized_dimension: i32,
    pub num_channels: u64,
    pub scales: *mut f32,
    pub zero_points: *mut i64,
}

/// `LiteRtApiVersion`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiVersion {
    pub major: c_int,
    pub minor: c_int,
    pub patch: c_int,
}

pub type PayloadDestructor = unsafe extern "C" fn(*mut c_void);

macro_rules! api {
    ($($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// Function pointers into a loaded `libLiteRt.so`; valid while `_library` lives.
        #[allow(non_snake_case)]
        pub struct Api {
            $(pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
            _library: Library,
        }

        impl Api {
            /// Resolve every symbol dermedge needs; a missing one means the library is not the
            /// LiteRT 2.1 C API.
            ///
            /// # Safety
            /// `library` must be a LiteRT 2.1 runtime whose C functions have the declared types.
            #[allow(non_snake_case)]
            pub unsafe fn resolve(library: Library) -> Result<Self, String> {
                $(
                    // SAFETY: the caller promises the library is the LiteRT 2.1 runtime, whose
                    // symbol has exactly this C signature; the pointer stays valid while
                    // `_library` is held in the same struct.
                    let $name = *unsafe {
                        library.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(
                            concat!(stringify!($name), "\0").as_bytes(),
                        )
                    }
                    .map_err(|e| format!("missing symbol {}: {e}", stringify!($name)))?;
                )*
                Ok(Self { $($name,)* _library: library })
            }
        }
    };
}

api! {
    LiteRtCreateEnvironment: fn(c_int, *const c_void, *mut Handle) -> Status;
    LiteRtDestroyEnvironment: fn(Handle);
    LiteRtGetNumAccelerators: fn(Handle, *mut ParamIndex) -> Status;
    LiteRtGetAccelerator: fn(Handle, ParamIndex, *mut Handle) -> Status;
    LiteRtGetAcceleratorName: fn(Handle, *mut *const c_char) -> Status;
    LiteRtGetAcceleratorVersion: fn(Handle, *mut ApiVersion) -> Status;
    LiteRtGetAcceleratorHardwareSupport: fn(Handle, *mut c_int) -> Status;
    LiteRtCreateModelFromBuffer: fn(*const c_void, usize, *mut Handle) -> Status;
    LiteRtDestroyModel: fn(Handle);
    LiteRtGetNumModelSignatures: fn(Handle, *mut ParamIndex) -> Status;
    LiteRtGetModelSignature: fn(Handle, ParamIndex, *mut Handle) -> Status;
    LiteRtGetSignatureKey: fn(Handle, *mut *const c_char) -> Status;
    LiteRtGetNumSignatureInputs: fn(Handle, *mut ParamIndex) -> Status;
    LiteRtGetNumSignatureOutputs: fn(Handle, *mut ParamIndex) -> Status;
    LiteRtGetSignatureInputName: fn(Handle, ParamIndex, *mut *const c_char) -> Status;
    LiteRtGetSignatureOutputName: fn(Handle, ParamIndex, *mut *const c_char) -> Status;
    LiteRtGetSignatureInputTensorByIndex: fn(Handle, ParamIndex, *mut Handle) -> Status;
    LiteRtGetSignatureOutputTensorByIndex: fn(Handle, ParamIndex, *mut Handle) -> Status;
    LiteRtGetRankedTensorType: fn(Handle, *mut RankedTensorType) -> Status;
    LiteRtGetQuantizationTypeId: fn(Handle, *mut c_int) -> Status;
    LiteRtGetPerTensorQuantization: fn(Handle, *mut QuantizationPerTensor) -> Status;
    LiteRtGetPerChannelQuantization: fn(Handle, *mut QuantizationPerChannel) -> Status;
    LiteRtCreateOptions: fn(*mut Handle) -> Status;
    LiteRtDestroyOptions: fn(Handle);
    LiteRtSetOptionsHardwareAccelerators: fn(Handle, c_int) -> Status;
    LiteRtCreateOpaqueOptions: fn(*const c_char, *mut c_void, Option<PayloadDestructor>, *mut Handle) -> Status;
    LiteRtAddOpaqueOptions: fn(Handle, Handle) -> Status;
    LiteRtCreateCompiledModel: fn(Handle, Handle, Handle, *mut Handle) -> Status;
    LiteRtDestroyCompiledModel: fn(Handle);
    LiteRtCompiledModelIsFullyAccelerated: fn(Handle, *mut bool) -> Status;
    LiteRtGetCompiledModelInputBufferRequirements: fn(Handle, ParamIndex, ParamIndex, *mut Handle) -> Status;
    LiteRtGetCompiledModelOutputBufferRequirements: fn(Handle, ParamIndex, ParamIndex, *mut Handle) -> Status;
    LiteRtCreateManagedTensorBufferFromRequirements: fn(Handle, *const RankedTensorType, Handle, *mut Handle) -> Status;
    LiteRtDestroyTensorBuffer: fn(Handle);
    LiteRtGetTensorBufferSize: fn(Handle, *mut usize) -> Status;
    LiteRtLockTensorBuffer: fn(Handle, *mut *mut c_void, c_uint) -> Status;
    LiteRtUnlockTensorBuffer: fn(Handle) -> Status;
    LiteRtRunCompiledModel: fn(Handle, ParamIndex, usize, *mut Handle, usize, *mut Handle) -> Status;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes and offsets the C headers assert for 64-bit targets.
    #[test]
    fn layouts_match_the_c_api() {
        assert_eq!(std::mem::size_of::<RankedTensorType>(), 72);
        assert_eq!(std::mem::offset_of!(RankedTensorType, layout), 4);
        assert_eq!(std::mem::offset_of!(Layout, dimensions), 4);
        assert_eq!(std::mem::size_of::<QuantizationPerTensor>(), 16);
        assert_eq!(std::mem::size_of::<QuantizationPerChannel>(), 32);
    }
}
