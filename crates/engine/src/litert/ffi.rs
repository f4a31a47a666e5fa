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

/// Declares C's opaque `struct LiteRt…T`: never built or dereferenced on the Rust side, only
/// pointed to, so that a model handle cannot be passed where a tensor buffer is expected.
macro_rules! opaque {
    ($($name:ident),* $(,)?) => {
        $(
            #[repr(C)]
            pub struct $name {
                _data: [u8; 0],
                _marker: std::marker::PhantomData<(*mut u8, std::marker::PhantomPinned)>,
            }
        )*
    };
}

opaque!(
    EnvironmentT,
    AcceleratorT,
    ModelT,
    SignatureT,
    TensorT,
    OptionsT,
    OpaqueOptionsT,
    CompiledModelT,
    BufferRequirementsT,
    TensorBufferT,
);

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
    LiteRtCreateEnvironment: fn(c_int, *const c_void, *mut *mut EnvironmentT) -> Status;
    LiteRtDestroyEnvironment: fn(*mut EnvironmentT);
    LiteRtGetNumAccelerators: fn(*mut EnvironmentT, *mut ParamIndex) -> Status;
    LiteRtGetAccelerator: fn(*mut EnvironmentT, ParamIndex, *mut *mut AcceleratorT) -> Status;
    LiteRtGetAcceleratorName: fn(*mut AcceleratorT, *mut *const c_char) -> Status;
    LiteRtGetAcceleratorVersion: fn(*mut AcceleratorT, *mut ApiVersion) -> Status;
    LiteRtGetAcceleratorHardwareSupport: fn(*mut AcceleratorT, *mut c_int) -> Status;
    LiteRtCreateModelFromBuffer: fn(*const c_void, usize, *mut *mut ModelT) -> Status;
    LiteRtDestroyModel: fn(*mut ModelT);
    LiteRtGetNumModelSignatures: fn(*mut ModelT, *mut ParamIndex) -> Status;
    LiteRtGetModelSignature: fn(*mut ModelT, ParamIndex, *mut *mut SignatureT) -> Status;
    LiteRtGetSignatureKey: fn(*mut SignatureT, *mut *const c_char) -> Status;
    LiteRtGetNumSignatureInputs: fn(*mut SignatureT, *mut ParamIndex) -> Status;
    LiteRtGetNumSignatureOutputs: fn(*mut SignatureT, *mut ParamIndex) -> Status;
    LiteRtGetSignatureInputName: fn(*mut SignatureT, ParamIndex, *mut *const c_char) -> Status;
    LiteRtGetSignatureOutputName: fn(*mut SignatureT, ParamIndex, *mut *const c_char) -> Status;
    LiteRtGetSignatureInputTensorByIndex: fn(*mut SignatureT, ParamIndex, *mut *mut TensorT) -> Status;
    LiteRtGetSignatureOutputTensorByIndex: fn(*mut SignatureT, ParamIndex, *mut *mut TensorT) -> Status;
    LiteRtGetRankedTensorType: fn(*mut TensorT, *mut RankedTensorType) -> Status;
    LiteRtGetQuantizationTypeId: fn(*mut TensorT, *mut c_int) -> Status;
    LiteRtGetPerTensorQuantization: fn(*mut TensorT, *mut QuantizationPerTensor) -> Status;
    LiteRtGetPerChannelQuantization: fn(*mut TensorT, *mut QuantizationPerChannel) -> Status;
    LiteRtCreateOptions: fn(*mut *mut OptionsT) -> Status;
    LiteRtDestroyOptions: fn(*mut OptionsT);
    LiteRtSetOptionsHardwareAccelerators: fn(*mut OptionsT, c_int) -> Status;
    LiteRtCreateOpaqueOptions: fn(*const c_char, *mut c_void, Option<PayloadDestructor>, *mut *mut OpaqueOptionsT) -> Status;
    LiteRtAddOpaqueOptions: fn(*mut OptionsT, *mut OpaqueOptionsT) -> Status;
    LiteRtCreateCompiledModel: fn(*mut EnvironmentT, *mut ModelT, *mut OptionsT, *mut *mut CompiledModelT) -> Status;
    LiteRtDestroyCompiledModel: fn(*mut CompiledModelT);
    LiteRtCompiledModelIsFullyAccelerated: fn(*mut CompiledModelT, *mut bool) -> Status;
    LiteRtGetCompiledModelInputBufferRequirements: fn(*mut CompiledModelT, ParamIndex, ParamIndex, *mut *mut BufferRequirementsT) -> Status;
    LiteRtGetCompiledModelOutputBufferRequirements: fn(*mut CompiledModelT, ParamIndex, ParamIndex, *mut *mut BufferRequirementsT) -> Status;
    LiteRtCreateManagedTensorBufferFromRequirements: fn(*mut EnvironmentT, *const RankedTensorType, *mut BufferRequirementsT, *mut *mut TensorBufferT) -> Status;
    LiteRtDestroyTensorBuffer: fn(*mut TensorBufferT);
    LiteRtGetTensorBufferSize: fn(*mut TensorBufferT, *mut usize) -> Status;
    LiteRtLockTensorBuffer: fn(*mut TensorBufferT, *mut *mut c_void, c_uint) -> Status;
    LiteRtUnlockTensorBuffer: fn(*mut TensorBufferT) -> Status;
    LiteRtRunCompiledModel: fn(*mut CompiledModelT, ParamIndex, usize, *mut *mut TensorBufferT, usize, *mut *mut TensorBufferT) -> Status;
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
        assert_eq!(std::mem::size_of::<Layout>(), 68);
        assert_eq!(std::mem::offset_of!(Layout, strides), 36);
        assert_eq!(std::mem::offset_of!(QuantizationPerTensor, zero_point), 8);
        assert_eq!(
            std::mem::offset_of!(QuantizationPerChannel, num_channels),
            8
        );
        assert_eq!(std::mem::offset_of!(QuantizationPerChannel, scales), 16);
        assert_eq!(
            std::mem::offset_of!(QuantizationPerChannel, zero_points),
            24
        );
        assert_eq!(std::mem::size_of::<ApiVersion>(), 12);
        // Opaque handles are never sized on the Rust side.
        assert_eq!(std::mem::size_of::<ModelT>(), 0);
    }
}
