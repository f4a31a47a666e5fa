//! The few TensorFlow Lite C API calls tflitec does not wrap, for an interpreter with a delegate.
//!
//! tflitec builds its interpreter options internally and has no way to add a delegate, so the
//! Edge TPU path creates the model, options and interpreter itself, through the same
//! `libtensorflowlite_c` that tflitec links (these symbols resolve against it).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

use crate::{ElementType, Quantization, TensorDetails};

type Opaque = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
struct QuantizationParams {
    scale: f32,
    zero_point: i32,
}

const STATUS_OK: c_int = 0;
const STATUS_ERROR: c_int = 1;
const BUILTIN_CUSTOM: i32 = 32;

/// `TfLiteRegistration` as TensorFlow Lite 2.6's common.h lays it out (64 bytes).
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
}

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
};

extern "C" {
    fn TfLiteVersion() -> *const c_char;
    fn TfLiteModelCreateFromFile(path: *const c_char) -> Opaque;
    fn TfLiteModelDelete(model: Opaque);
    fn TfLiteInterpreterOptionsCreate() -> Opaque;
    fn TfLiteInterpreterOptionsDelete(options: Opaque);
    fn TfLiteInterpreterOptionsSetNumThreads(options: Opaque, threads: i32);
    fn TfLiteInterpreterOptionsAddDelegate(options: Opaque, delegate: Opaque);
    fn TfLiteInterpreterOptionsAddCustomOp(
        options: Opaque,
        name: *const c_char,
        registration: *const Registration,
        min_version: i32,
        max_version: i32,
    );
    fn TfLiteInterpreterCreate(model: Opaque, options: Opaque) -> Opaque;
    fn TfLiteInterpreterDelete(interpreter: Opaque);
    fn TfLiteInterpreterAllocateTensors(interpreter: Opaque) -> c_int;
    fn TfLiteInterpreterInvoke(interpreter: Opaque) -> c_int;
    fn TfLiteInterpreterGetInputTensorCount(interpreter: Opaque) -> i32;
    fn TfLiteInterpreterGetInputTensor(interpreter: Opaque, index: i32) -> Opaque;
    fn TfLiteInterpreterGetOutputTensorCount(interpreter: Opaque) -> i32;
    fn TfLiteInterpreterGetOutputTensor(interpreter: Opaque, index: i32) -> Opaque;
    fn TfLiteTensorType(tensor: Opaque) -> c_int;
    fn TfLiteTensorNumDims(tensor: Opaque) -> i32;
    fn TfLiteTensorDim(tensor: Opaque, index: i32) -> i32;
    fn TfLiteTensorByteSize(tensor: Opaque) -> usize;
    fn TfLiteTensorName(tensor: Opaque) -> *const c_char;
    fn TfLiteTensorQuantizationParams(tensor: Opaque) -> QuantizationParams;
    fn TfLiteTensorCopyFromBuffer(tensor: Opaque, data: *const c_void, size: usize) -> c_int;
    fn TfLiteTensorCopyToBuffer(tensor: Opaque, data: *mut c_void, size: usize) -> c_int;
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
    interpreter: Opaque,
    model: Opaque,
}

// SAFETY: the interpreter and model are owned by this value alone and used through `&mut self`
// (or `&self` for reads); TFLite interpreters may move between threads when not shared.
unsafe impl Send for DelegatedInterpreter {}

impl DelegatedInterpreter {
    /// Load `path`, attach `delegate` (a live `TfLiteDelegate*`) and allocate tensors.
    pub(super) fn new(path: &Path, threads: u32, delegate: *mut c_void) -> Result<Self, String> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| "path contains a NUL byte".to_string())?;
        // SAFETY: valid C string; every pointer is checked before use and freed on every path.
        unsafe {
            let model = TfLiteModelCreateFromFile(c_path.as_ptr());
            if model.is_null() {
                return Err("TfLiteModelCreateFromFile failed".into());
            }
            let options = TfLiteInterpreterOptionsCreate();
            if options.is_null() {
                TfLiteModelDelete(model);
                return Err("TfLiteInterpreterOptionsCreate failed".into());
            }
            TfLiteInterpreterOptionsSetNumThreads(options, threads as i32);
            // Versions are registered one by one: the Edge TPU op has only version 1.
            TfLiteInterpreterOptionsAddCustomOp(
                options,
                EDGETPU_PLACEHOLDER.custom_name,
                &EDGETPU_PLACEHOLDER,
                1,
                1,
            );
            TfLiteInterpreterOptionsAddDelegate(options, delegate);
            let interpreter = TfLiteInterpreterCreate(model, options);
            TfLiteInterpreterOptionsDelete(options);
            if interpreter.is_null() {
                TfLiteModelDelete(model);
                return Err(
                    "the interpreter could not be created with the delegate (the delegate \
                            refused the graph)"
                        .into(),
                );
            }
            let this = Self { interpreter, model };
            if TfLiteInterpreterAllocateTensors(interpreter) != STATUS_OK {
                return Err("TfLiteInterpreterAllocateTensors failed".into());
            }
            Ok(this)
        }
    }

    fn details(tensor: Opaque) -> TensorDetails {
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
            if TfLiteInterpreterGetInputTensorCount(self.interpreter) != 1 {
                return Err("the model must have exactly one input".into());
            }
            Ok(Self::details(TfLiteInterpreterGetInputTensor(
                self.interpreter,
                0,
            )))
        }
    }

    pub(super) fn outputs(&self) -> Vec<TensorDetails> {
        // SAFETY: live interpreter; indices below its output count.
        unsafe {
            (0..TfLiteInterpreterGetOutputTensorCount(self.interpreter))
                .map(|i| Self::details(TfLiteInterpreterGetOutputTensor(self.interpreter, i)))
                .collect()
        }
    }

    pub(super) fn write_input(&mut self, bytes: &[u8]) -> Result<(), String> {
        // SAFETY: live interpreter; CopyFromBuffer checks the size against the tensor's.
        unsafe {
            let tensor = TfLiteInterpreterGetInputTensor(self.interpreter, 0);
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
        match unsafe { TfLiteInterpreterInvoke(self.interpreter) } {
            STATUS_OK => Ok(()),
            status => Err(format!("TfLiteInterpreterInvoke failed (status {status})")),
        }
    }

    pub(super) fn read_output(&self, index: usize, out: &mut Vec<u8>) -> Result<(), String> {
        // SAFETY: live interpreter; `out` is sized to the tensor before the copy.
        unsafe {
            let tensor = TfLiteInterpreterGetOutputTensor(self.interpreter, index as i32);
            out.resize(TfLiteTensorByteSize(tensor), 0);
            if TfLiteTensorCopyToBuffer(tensor, out.as_mut_ptr().cast(), out.len()) != STATUS_OK {
                return Err("TfLiteTensorCopyToBuffer failed".into());
            }
        }
        Ok(())
    }
}

impl Drop for DelegatedInterpreter {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed exactly once, interpreter before model.
        unsafe {
            TfLiteInterpreterDelete(self.interpreter);
            TfLiteModelDelete(self.model);
        }
    }
}
