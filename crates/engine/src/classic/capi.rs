//! The few TensorFlow Lite C API calls tflitec does not wrap, for an interpreter with a delegate.
//!
//! tflitec builds its interpreter options internally and has no way to add a delegate, so the
//! Edge TPU path creates the model, options and interpreter itself, through the same
//! `libtensorflowlite_c` that tflitec links (these symbols resolve against it).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;

use crate::{ElementType, Quantization, TensorDetails};

/// C's opaque TF Lite structs: only ever pointed to, so one handle cannot stand for another.
macro_rules! opaque {
    ($($name:ident),* $(,)?) => {
        $(
            #[repr(C)]
            pub(super) struct $name {
                _data: [u8; 0],
                _marker: std::marker::PhantomData<(*mut u8, std::marker::PhantomPinned)>,
            }
        )*
    };
}

opaque!(ModelT, OptionsT, InterpreterT, TensorT);

#[repr(C)]
#[derive(Clone, Copy)]
struct QuantizationParams {
    scale: f32,
    zero_point: i32,
}

const STATUS_OK: c_int = 0;
const STATUS_ERROR: c_int = 1;
const BUILTIN_CUSTOM: i32 = 32;

/// `TfLiteRegistration`, which has grown at its end across TF Lite releases (`_V1`, 64 bytes:
/// the 2.6 layout tflitec links; `_V2` + `registration_external`; `_V3` + `async_kernel`; the
/// current one + `inplace_operator`, 88 bytes), and which `TfLiteInterpreterOptionsAddCustomOp`
/// copies at the *library's* size. dermedge declares the newest layout plus a zeroed reserve, so
/// a newer library never reads past the end: every field added so far means "absent" when zero.
#[repr(C)]
struct Registration {
    init: Option<unsafe extern "C" fn(*mut c_void, *const c_char, usize) -> *mut c_void>,
    free: Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>,
    prepare: Option<unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int>,
    invoke: Option<unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int>,
    profiling_string: Option<unsafe extern "C" fn(*const c_void, *const c_void) -> *const c_char>,
    builtin_code: i32,
    custom_name: *const c_char,
    version: c_int,
    registration_external: *const c_void,
    async_kernel: Option<unsafe extern "C" fn(*mut c_void, *mut c_void) -> *mut c_void>,
    inplace_operator: u64,
    /// Room for fields later releases may append, zero like the ones above.
    reserved: [u64; 5],
}

/// The TF Lite major version whose registration layouts are mirrored above.
const SUPPORTED_MAJOR: u32 = 2;
/// The oldest release with the `_V1` layout and the C API calls used here.
const OLDEST_MINOR: u32 = 6;

// SAFETY: a constant table of function pointers and a static string, never written.
unsafe impl Sync for Registration {}

unsafe extern "C" fn refuse_on_cpu(_context: *mut c_void, _node: *mut c_void) -> c_int {
    STATUS_ERROR
}

/// A CPU kernel for the Edge TPU op that only resolves it: with the op unresolved, runtimes that
/// apply a default delegate (XNNPACK) fail before the Edge TPU delegate is offered the graph. The
/// Edge TPU delegate replaces it; if it ever runs on the CPU, Invoke fails instead.
static EDGETPU_PLACEHOLDER: Registration = Registration {
    init: None,
    free: None,
    prepare: None,
    invoke: Some(refuse_on_cpu),
    profiling_string: None,
    builtin_code: BUILTIN_CUSTOM,
    custom_name: c"edgetpu-custom-op".as_ptr(),
    version: 1,
    registration_external: std::ptr::null(),
    async_kernel: None,
    inplace_operator: 0,
    reserved: [0; 5],
};

/// Whether the linked library's `TfLiteRegistration` is one dermedge's declaration covers.
fn registration_layout_supported(version: &str) -> Result<(), String> {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(SUPPORTED_MAJOR)), Some(Ok(minor))) if minor >= OLDEST_MINOR => Ok(()),
        _ => Err(format!(
            "the linked TensorFlow Lite is {version}; the Edge TPU op is registered only with \
             TensorFlow Lite {SUPPORTED_MAJOR}.{OLDEST_MINOR} or a later {SUPPORTED_MAJOR}.x, \
             whose TfLiteRegistration layouts dermedge mirrors"
        )),
    }
}

extern "C" {
    fn TfLiteVersion() -> *const c_char;
    fn TfLiteModelCreateFromFile(path: *const c_char) -> *mut ModelT;
    fn TfLiteModelDelete(model: *mut ModelT);
    fn TfLiteInterpreterOptionsCreate() -> *mut OptionsT;
    fn TfLiteInterpreterOptionsDelete(options: *mut OptionsT);
    fn TfLiteInterpreterOptionsSetNumThreads(options: *mut OptionsT, threads: i32);
    fn TfLiteInterpreterOptionsAddDelegate(options: *mut OptionsT, delegate: *mut c_void);
    fn TfLiteInterpreterOptionsAddCustomOp(
        options: *mut OptionsT,
        name: *const c_char,
        registration: *const Registration,
        min_version: i32,
        max_version: i32,
    );
    fn TfLiteInterpreterCreate(model: *const ModelT, options: *const OptionsT)
        -> *mut InterpreterT;
    fn TfLiteInterpreterDelete(interpreter: *mut InterpreterT);
    fn TfLiteInterpreterAllocateTensors(interpreter: *mut InterpreterT) -> c_int;
    fn TfLiteInterpreterInvoke(interpreter: *mut InterpreterT) -> c_int;
    fn TfLiteInterpreterGetInputTensorCount(interpreter: *const InterpreterT) -> i32;
    fn TfLiteInterpreterGetInputTensor(
        interpreter: *const InterpreterT,
        index: i32,
    ) -> *mut TensorT;
    fn TfLiteInterpreterGetOutputTensorCount(interpreter: *const InterpreterT) -> i32;
    fn TfLiteInterpreterGetOutputTensor(
        interpreter: *const InterpreterT,
        index: i32,
    ) -> *const TensorT;
    fn TfLiteTensorType(tensor: *const TensorT) -> c_int;
    fn TfLiteTensorNumDims(tensor: *const TensorT) -> i32;
    fn TfLiteTensorDim(tensor: *const TensorT, index: i32) -> i32;
    fn TfLiteTensorByteSize(tensor: *const TensorT) -> usize;
    fn TfLiteTensorName(tensor: *const TensorT) -> *const c_char;
    fn TfLiteTensorQuantizationParams(tensor: *const TensorT) -> QuantizationParams;
    fn TfLiteTensorCopyFromBuffer(tensor: *mut TensorT, data: *const c_void, size: usize) -> c_int;
    fn TfLiteTensorCopyToBuffer(tensor: *const TensorT, data: *mut c_void, size: usize) -> c_int;
}

/// An owned `TfLiteModel`.
struct Model(NonNull<ModelT>);

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: created by TfLiteModelCreateFromFile, deleted once, after its interpreter
        // (`DelegatedInterpreter` declares the interpreter first).
        unsafe { TfLiteModelDelete(self.0.as_ptr()) }
    }
}

/// Owned `TfLiteInterpreterOptions`; an interpreter keeps no reference to them once created.
struct Options(NonNull<OptionsT>);

impl Drop for Options {
    fn drop(&mut self) {
        // SAFETY: created by TfLiteInterpreterOptionsCreate, deleted once.
        unsafe { TfLiteInterpreterOptionsDelete(self.0.as_ptr()) }
    }
}

/// An owned `TfLiteInterpreter`.
struct Interpreter(NonNull<InterpreterT>);

impl Drop for Interpreter {
    fn drop(&mut self) {
        // SAFETY: created by TfLiteInterpreterCreate, deleted once, before its model.
        unsafe { TfLiteInterpreterDelete(self.0.as_ptr()) }
    }
}

/// The linked library's TensorFlow Lite version.
pub(super) fn version() -> String {
    // SAFETY: returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(TfLiteVersion()) }
        .to_string_lossy()
        .into_owned()
}

/// `TfLiteType` codes (tensorflow/lite/c/common.h).
fn element_type(code: c_int) -> ElementType {
    match code {
        1 => ElementType::Float32,
        2 => ElementType::Int32,
        3 => ElementType::Uint8,
        4 => ElementType::Int64,
        7 => ElementType::Int16,
        9 => ElementType::Int8,
        10 => ElementType::Float16,
        other => ElementType::Other(other),
    }
}

/// A classic interpreter with one delegate attached; owns the model, and must be dropped before
/// the delegate it was created with.
pub(super) struct DelegatedInterpreter {
    // Dropped in declaration order: the interpreter before the model it runs.
    interpreter: Interpreter,
    _model: Model,
}

// SAFETY: the interpreter and model are owned by this value alone and used through `&mut self`
// (or `&self` for reads); TFLite interpreters may move between threads when not shared.
unsafe impl Send for DelegatedInterpreter {}

impl DelegatedInterpreter {
    /// Load `path`, attach `delegate` (a live `TfLiteDelegate*`) and allocate tensors.
    pub(super) fn new(path: &Path, threads: u32, delegate: *mut c_void) -> Result<Self, String> {
        registration_layout_supported(&version())?;
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| "path contains a NUL byte".to_string())?;
        // SAFETY: valid C string.
        let model = NonNull::new(unsafe { TfLiteModelCreateFromFile(c_path.as_ptr()) })
            .map(Model)
            .ok_or("TfLiteModelCreateFromFile failed")?;
        // SAFETY: no arguments.
        let options = NonNull::new(unsafe { TfLiteInterpreterOptionsCreate() })
            .map(Options)
            .ok_or("TfLiteInterpreterOptionsCreate failed")?;
        // SAFETY: live options; the registration is a static laid out for every supported
        // version (checked above), and the name it points to is static too; the caller promises
        // `delegate` is a live delegate that outlives the interpreter.
        unsafe {
            TfLiteInterpreterOptionsSetNumThreads(options.0.as_ptr(), threads as i32);
            // Versions are registered one by one: the Edge TPU op has only version 1.
            TfLiteInterpreterOptionsAddCustomOp(
                options.0.as_ptr(),
                EDGETPU_PLACEHOLDER.custom_name,
                &EDGETPU_PLACEHOLDER,
                1,
                1,
            );
            TfLiteInterpreterOptionsAddDelegate(options.0.as_ptr(), delegate);
        }
        // SAFETY: live model and options.
        let interpreter =
            NonNull::new(unsafe { TfLiteInterpreterCreate(model.0.as_ptr(), options.0.as_ptr()) })
                .map(Interpreter)
                .ok_or(
                    "the interpreter could not be created with the delegate (the delegate \
                     refused the graph)",
                )?;
        drop(options);
        let this = Self {
            interpreter,
            _model: model,
        };
        // SAFETY: live interpreter.
        if unsafe { TfLiteInterpreterAllocateTensors(this.raw()) } != STATUS_OK {
            return Err("TfLiteInterpreterAllocateTensors failed".into());
        }
        Ok(this)
    }

    fn raw(&self) -> *mut InterpreterT {
        self.interpreter.0.as_ptr()
    }

    fn details(tensor: *const TensorT) -> TensorDetails {
        // SAFETY: `tensor` is a live tensor of this interpreter; the name is owned by the model.
        unsafe {
            let name = TfLiteTensorName(tensor);
            let q = TfLiteTensorQuantizationParams(tensor);
            TensorDetails {
                name: if name.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(name).to_string_lossy().into_owned()
                },
                dtype: element_type(TfLiteTensorType(tensor)),
                shape: (0..TfLiteTensorNumDims(tensor))
                    .map(|d| TfLiteTensorDim(tensor, d))
                    .collect(),
                quantization: if q.scale == 0.0 {
                    Quantization::None
                } else {
                    Quantization::PerTensor {
                        scale: q.scale,
                        zero_point: q.zero_point as i64,
                    }
                },
            }
        }
    }

    pub(super) fn input(&self) -> Result<TensorDetails, String> {
        // SAFETY: live interpreter.
        unsafe {
            if TfLiteInterpreterGetInputTensorCount(self.raw()) != 1 {
                return Err("the model must have exactly one input".into());
            }
            Ok(Self::details(TfLiteInterpreterGetInputTensor(
                self.raw(),
                0,
            )))
        }
    }

    pub(super) fn outputs(&self) -> Vec<TensorDetails> {
        // SAFETY: live interpreter; indices below its output count.
        unsafe {
            (0..TfLiteInterpreterGetOutputTensorCount(self.raw()))
                .map(|i| Self::details(TfLiteInterpreterGetOutputTensor(self.raw(), i)))
                .collect()
        }
    }

    pub(super) fn write_input(&mut self, bytes: &[u8]) -> Result<(), String> {
        // SAFETY: live interpreter; CopyFromBuffer checks the size against the tensor's.
        unsafe {
            let tensor = TfLiteInterpreterGetInputTensor(self.raw(), 0);
            if TfLiteTensorByteSize(tensor) != bytes.len()
                || TfLiteTensorCopyFromBuffer(tensor, bytes.as_ptr().cast(), bytes.len())
                    != STATUS_OK
            {
                return Err(format!(
                    "input tensor holds {} bytes, {} given",
                    TfLiteTensorByteSize(tensor),
                    bytes.len()
                ));
            }
        }
        Ok(())
    }

    pub(super) fn invoke(&mut self) -> Result<(), String> {
        // SAFETY: live interpreter with allocated tensors.
        match unsafe { TfLiteInterpreterInvoke(self.raw()) } {
            STATUS_OK => Ok(()),
            status => Err(format!("TfLiteInterpreterInvoke failed (status {status})")),
        }
    }

    pub(super) fn read_output(&self, index: usize, out: &mut Vec<u8>) -> Result<(), String> {
        // SAFETY: live interpreter; `out` is sized to the tensor before the copy.
        unsafe {
            let tensor = TfLiteInterpreterGetOutputTensor(self.raw(), index as i32);
            out.resize(TfLiteTensorByteSize(tensor), 0);
            if TfLiteTensorCopyToBuffer(tensor, out.as_mut_ptr().cast(), out.len()) != STATUS_OK {
                return Err("TfLiteTensorCopyToBuffer failed".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of each `TfLiteRegistration` layout sits where TF Lite's common.h puts it,
    /// and the declaration is at least as long as the newest one.
    #[test]
    fn the_registration_covers_every_layout() {
        use std::mem::{offset_of, size_of};
        assert_eq!(offset_of!(Registration, builtin_code), 40);
        assert_eq!(offset_of!(Registration, custom_name), 48);
        assert_eq!(offset_of!(Registration, version), 56);
        assert_eq!(offset_of!(Registration, registration_external), 64); // _V1 ends here
        assert_eq!(offset_of!(Registration, async_kernel), 72); // _V2
        assert_eq!(offset_of!(Registration, inplace_operator), 80); // _V3
        assert!(
            size_of::<Registration>() >= 88 + 32,
            "reserve after the newest layout"
        );
        assert_eq!(size_of::<QuantizationParams>(), 8);
    }

    #[test]
    fn registration_is_refused_outside_the_mirrored_versions() {
        assert!(registration_layout_supported("2.6.0").is_ok());
        assert!(registration_layout_supported("2.19.1").is_ok());
        assert!(registration_layout_supported("2.20.0-rc1").is_ok());
        for bad in ["2.5.0", "3.0.0", "1.15.0", "", "garbage"] {
            let err = registration_layout_supported(bad).expect_err(bad);
            assert!(err.contains(bad) && err.contains("2.6"), "{err}");
        }
    }
}
