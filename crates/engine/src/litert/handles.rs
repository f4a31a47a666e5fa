//! One owning wrapper per LiteRT object, each destroying its handle on `Drop`, and guards for
//! tensor-buffer locks. Everything `unsafe` about LiteRT's C API lives here or in `ffi`.
//!
//! Objects that LiteRT owns on a parent's behalf (signatures, tensors, buffer requirements) are
//! borrowed views whose lifetime is tied to the parent wrapper.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::marker::PhantomData;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use super::ffi::{self, Status, STATUS_OK};
use super::runtime::{free_cstring_payload, CpuSettings, LiteRtRuntime};
use crate::EngineError;

/// A LiteRT call that returned an error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallFailed {
    pub call: &'static str,
    pub status: Status,
}

impl CallFailed {
    /// The engine error for a call made on behalf of `path` (a model or the runtime library).
    pub fn at(self, path: &Path) -> EngineError {
        EngineError::Runtime {
            path: path.to_path_buf(),
            call: self.call,
            status: self.status,
            message: ffi::status_name(self.status).to_string(),
        }
    }
}

impl std::fmt::Display for CallFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed: {} (status {})",
            self.call,
            ffi::status_name(self.status),
            self.status
        )
    }
}

type CallResult<T> = Result<T, CallFailed>;

fn ok(call: &'static str, status: Status) -> CallResult<()> {
    if status == STATUS_OK {
        Ok(())
    } else {
        Err(CallFailed { call, status })
    }
}

/// A handle a successful call wrote, or the call's failure when it wrote null.
fn created<T>(call: &'static str, status: Status, raw: *mut T) -> CallResult<NonNull<T>> {
    ok(call, status)?;
    NonNull::new(raw).ok_or(CallFailed {
        call,
        status: 9, // "unknown error": success reported, but no object
    })
}

fn owned_c_str(ptr: *const c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: LiteRT returns NUL-terminated strings owned by the parent object, which the
        // caller's borrow keeps alive for the duration of this copy.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

/// `LiteRtEnvironment`: owns the registered accelerators; outlives everything created in it.
pub(crate) struct Environment {
    raw: NonNull<ffi::EnvironmentT>,
    runtime: Arc<LiteRtRuntime>,
}

/// One accelerator as the environment lists it.
pub(crate) struct AcceleratorView {
    pub name: String,
    pub version: Option<ffi::ApiVersion>,
    pub hardware: Option<c_int>,
}

impl Environment {
    pub fn new(runtime: &Arc<LiteRtRuntime>) -> CallResult<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: zero options (a null array is allowed with a zero count), valid out-pointer.
        let status =
            unsafe { (runtime.api.LiteRtCreateEnvironment)(0, std::ptr::null(), &mut raw) };
        Ok(Self {
            raw: created("LiteRtCreateEnvironment", status, raw)?,
            runtime: runtime.clone(),
        })
    }

    pub fn runtime(&self) -> &Arc<LiteRtRuntime> {
        &self.runtime
    }

    pub fn accelerators(&self) -> CallResult<Vec<AcceleratorView>> {
        let api = &self.runtime.api;
        let mut count = 0usize;
        // SAFETY: live environment, valid out-pointer.
        ok("LiteRtGetNumAccelerators", unsafe {
            (api.LiteRtGetNumAccelerators)(self.raw.as_ptr(), &mut count)
        })?;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let mut acc = std::ptr::null_mut();
            // SAFETY: i < count; valid out-pointer. The accelerator is owned by the environment.
            let status = unsafe { (api.LiteRtGetAccelerator)(self.raw.as_ptr(), i, &mut acc) };
            let acc = created("LiteRtGetAccelerator", status, acc)?;
            let mut name = std::ptr::null();
            // SAFETY: live accelerator, valid out-pointer.
            ok("LiteRtGetAcceleratorName", unsafe {
                (api.LiteRtGetAcceleratorName)(acc.as_ptr(), &mut name)
            })?;
            let mut version = ffi::ApiVersion::default();
            // SAFETY: live accelerator, valid out-pointer.
            let version_ok =
                unsafe { (api.LiteRtGetAcceleratorVersion)(acc.as_ptr(), &mut version) }
                    == STATUS_OK;
            let mut hardware: c_int = 0;
            // SAFETY: live accelerator, valid out-pointer.
            let hardware_ok =
                unsafe { (api.LiteRtGetAcceleratorHardwareSupport)(acc.as_ptr(), &mut hardware) }
                    == STATUS_OK;
            out.push(AcceleratorView {
                name: owned_c_str(name),
                version: version_ok.then_some(version),
                hardware: hardware_ok.then_some(hardware),
            });
        }
        Ok(out)
    }
}

impl Drop for Environment {
    fn drop(&mut self) {
        // SAFETY: created by LiteRtCreateEnvironment and destroyed once; every object made in it
        // is owned by a value its owner drops first (see `LiteRtEmbedder`'s field order).
        super::quiet::quietly(|| unsafe {
            (self.runtime.api.LiteRtDestroyEnvironment)(self.raw.as_ptr())
        })
    }
}

/// `LiteRtModel`, read in place from a mapping it owns, so the bytes outlive the model.
pub(crate) struct Model {
    raw: NonNull<ffi::ModelT>,
    runtime: Arc<LiteRtRuntime>,
    /// LiteRT reads the buffer in place for the model's whole life; dropped after it.
    _bytes: memmap2::Mmap,
}

impl Model {
    /// Hand LiteRT the very bytes that were checked.
    pub fn from_mapping(runtime: &Arc<LiteRtRuntime>, bytes: memmap2::Mmap) -> CallResult<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `bytes` is a valid mapping of `bytes.len()` bytes, moved into `Self` below so
        // it lives as long as the model; the out-pointer is valid.
        let status = unsafe {
            (runtime.api.LiteRtCreateModelFromBuffer)(bytes.as_ptr().cast(), bytes.len(), &mut raw)
        };
        Ok(Self {
            raw: created("LiteRtCreateModelFromBuffer", status, raw)?,
            runtime: runtime.clone(),
            _bytes: bytes,
        })
    }

    /// Drop the model mapping's resident pages. Once compiled, the CPU path reads its weights
    /// from XNNPACK's packed copy (its heap, or the weight cache), so the pages LiteRT touched
    /// while loading only swell the resident set; any page touched again is read back from the
    /// file.
    pub fn release_resident_pages(&self) -> std::io::Result<()> {
        // SAFETY: a read-only file mapping this process never writes: MADV_DONTNEED drops its
        // pages, and the next access reads the same file's pages back (it cannot zero-fill
        // them, as it would an anonymous or written private page).
        unsafe {
            self._bytes
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        }
    }

    pub fn signature_count(&self) -> CallResult<usize> {
        let mut count = 0usize;
        // SAFETY: live model, valid out-pointer.
        ok("LiteRtGetNumModelSignatures", unsafe {
            (self.runtime.api.LiteRtGetNumModelSignatures)(self.raw.as_ptr(), &mut count)
        })?;
        Ok(count)
    }

    /// Signature `index` (LiteRT reports an out-of-range index as an error status).
    pub fn signature(&self, index: usize) -> CallResult<Signature<'_>> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: live model, valid out-pointer; the signature is owned by the model.
        let status = unsafe {
            (self.runtime.api.LiteRtGetModelSignature)(self.raw.as_ptr(), index, &mut raw)
        };
        Ok(Signature {
            raw: created("LiteRtGetModelSignature", status, raw)?,
            api: &self.runtime.api,
            _model: PhantomData,
        })
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: created by LiteRtCreateModelFromBuffer and destroyed once, after the compiled
        // model made from it (field order of its owner); the mapping is dropped after this.
        unsafe { (self.runtime.api.LiteRtDestroyModel)(self.raw.as_ptr()) }
    }
}

/// A signature of a [`Model`], valid while the model is.
#[derive(Clone, Copy)]
pub(crate) struct Signature<'m> {
    raw: NonNull<ffi::SignatureT>,
    api: &'m ffi::Api,
    _model: PhantomData<&'m Model>,
}

/// Which side of a signature a tensor is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Input,
    Output,
}

impl<'m> Signature<'m> {
    pub fn key(&self) -> CallResult<String> {
        let mut key = std::ptr::null();
        // SAFETY: live signature, valid out-pointer.
        ok("LiteRtGetSignatureKey", unsafe {
            (self.api.LiteRtGetSignatureKey)(self.raw.as_ptr(), &mut key)
        })?;
        Ok(owned_c_str(key))
    }

    pub fn count(&self, side: Side) -> CallResult<usize> {
        let mut n = 0usize;
        // SAFETY: live signature, valid out-pointer.
        let status = unsafe {
            match side {
                Side::Input => (self.api.LiteRtGetNumSignatureInputs)(self.raw.as_ptr(), &mut n),
                Side::Output => (self.api.LiteRtGetNumSignatureOutputs)(self.raw.as_ptr(), &mut n),
            }
        };
        ok(
            match side {
                Side::Input => "LiteRtGetNumSignatureInputs",
                Side::Output => "LiteRtGetNumSignatureOutputs",
            },
            status,
        )?;
        Ok(n)
    }

    pub fn name(&self, side: Side, index: usize) -> CallResult<String> {
        let mut name = std::ptr::null();
        // SAFETY: live signature, valid out-pointer; an out-of-range index is an error status.
        let (call, status) = unsafe {
            match side {
                Side::Input => (
                    "LiteRtGetSignatureInputName",
                    (self.api.LiteRtGetSignatureInputName)(self.raw.as_ptr(), index, &mut name),
                ),
                Side::Output => (
                    "LiteRtGetSignatureOutputName",
                    (self.api.LiteRtGetSignatureOutputName)(self.raw.as_ptr(), index, &mut name),
                ),
            }
        };
        ok(call, status)?;
        Ok(owned_c_str(name))
    }

    pub fn names(&self, side: Side) -> CallResult<Vec<String>> {
        (0..self.count(side)?).map(|i| self.name(side, i)).collect()
    }

    pub fn tensor(&self, side: Side, index: usize) -> CallResult<Tensor<'m>> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: live signature, valid out-pointer; the tensor is owned by the model.
        let (call, status) = unsafe {
            match side {
                Side::Input => (
                    "LiteRtGetSignatureInputTensorByIndex",
                    (self.api.LiteRtGetSignatureInputTensorByIndex)(
                        self.raw.as_ptr(),
                        index,
                        &mut raw,
                    ),
                ),
                Side::Output => (
                    "LiteRtGetSignatureOutputTensorByIndex",
                    (self.api.LiteRtGetSignatureOutputTensorByIndex)(
                        self.raw.as_ptr(),
                        index,
                        &mut raw,
                    ),
                ),
            }
        };
        Ok(Tensor {
            raw: created(call, status, raw)?,
            api: self.api,
            _model: PhantomData,
        })
    }
}

/// A tensor of a [`Model`], valid while the model is.
pub(crate) struct Tensor<'m> {
    raw: NonNull<ffi::TensorT>,
    api: &'m ffi::Api,
    _model: PhantomData<&'m Model>,
}

/// A tensor's quantisation as LiteRT reports it.
pub(crate) enum TensorQuantization {
    None,
    PerTensor(ffi::QuantizationPerTensor),
    PerChannel { dimension: i32, channels: u64 },
    Other(c_int),
}

impl Tensor<'_> {
    pub fn ranked_type(&self) -> CallResult<ffi::RankedTensorType> {
        let mut ranked = ffi::RankedTensorType {
            element_type: 0,
            layout: ffi::Layout {
                rank_and_flags: 0,
                dimensions: [0; ffi::MAX_RANK],
                strides: [0; ffi::MAX_RANK],
            },
        };
        // SAFETY: live tensor, valid out-pointer.
        ok("LiteRtGetRankedTensorType", unsafe {
            (self.api.LiteRtGetRankedTensorType)(self.raw.as_ptr(), &mut ranked)
        })?;
        Ok(ranked)
    }

    pub fn quantization(&self) -> CallResult<TensorQuantization> {
        let mut kind: c_int = ffi::QUANT_NONE;
        // SAFETY: live tensor, valid out-pointer.
        ok("LiteRtGetQuantizationTypeId", unsafe {
            (self.api.LiteRtGetQuantizationTypeId)(self.raw.as_ptr(), &mut kind)
        })?;
        Ok(match kind {
            ffi::QUANT_NONE => TensorQuantization::None,
            ffi::QUANT_PER_TENSOR => {
                let mut q = ffi::QuantizationPerTensor::default();
                // SAFETY: the tensor has per-tensor quantisation; valid out-pointer.
                ok("LiteRtGetPerTensorQuantization", unsafe {
                    (self.api.LiteRtGetPerTensorQuantization)(self.raw.as_ptr(), &mut q)
                })?;
                TensorQuantization::PerTensor(q)
            }
            ffi::QUANT_PER_CHANNEL => {
                let mut q = ffi::QuantizationPerChannel {
                    quantized_dimension: 0,
                    num_channels: 0,
                    scales: std::ptr::null_mut(),
                    zero_points: std::ptr::null_mut(),
                };
                // SAFETY: the tensor has per-channel quantisation; valid out-pointer. Only the
                // counts are kept: the arrays belong to the model.
                ok("LiteRtGetPerChannelQuantization", unsafe {
                    (self.api.LiteRtGetPerChannelQuantization)(self.raw.as_ptr(), &mut q)
                })?;
                TensorQuantization::PerChannel {
                    dimension: q.quantized_dimension,
                    channels: q.num_channels,
                }
            }
            code => TensorQuantization::Other(code),
        })
    }
}

/// `LiteRtOptions`: what a compiled model is compiled for.
pub(crate) struct Options {
    raw: NonNull<ffi::OptionsT>,
    runtime: Arc<LiteRtRuntime>,
}

impl Options {
    pub fn new(runtime: &Arc<LiteRtRuntime>) -> CallResult<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let status = unsafe { (runtime.api.LiteRtCreateOptions)(&mut raw) };
        Ok(Self {
            raw: created("LiteRtCreateOptions", status, raw)?,
            runtime: runtime.clone(),
        })
    }

    pub fn set_hardware(&mut self, hardware: c_int) -> CallResult<()> {
        // SAFETY: live options.
        ok("LiteRtSetOptionsHardwareAccelerators", unsafe {
            (self.runtime.api.LiteRtSetOptionsHardwareAccelerators)(self.raw.as_ptr(), hardware)
        })
    }

    /// Attach the CPU (XNNPACK) settings as an opaque-options entry the options then own.
    pub fn add_cpu_settings(&mut self, cpu: &CpuSettings) -> CallResult<()> {
        let api = &self.runtime.api;
        let (identifier, payload) = cpu.opaque_entry();
        let payload = payload.into_raw();
        let mut opaque = std::ptr::null_mut();
        // SAFETY: LiteRT copies the identifier; on success the payload belongs to the opaque
        // options, which free it through `free_cstring_payload`.
        let status = unsafe {
            (api.LiteRtCreateOpaqueOptions)(
                identifier.as_ptr(),
                payload.cast(),
                Some(free_cstring_payload),
                &mut opaque,
            )
        };
        let opaque = match created("LiteRtCreateOpaqueOptions", status, opaque) {
            Ok(opaque) => opaque,
            Err(failed) => {
                // SAFETY: LiteRT did not take the payload, made by `CString::into_raw` above.
                unsafe { free_cstring_payload(payload.cast::<c_void>()) };
                return Err(failed);
            }
        };
        // SAFETY: live options; ownership of `opaque` moves to them.
        ok("LiteRtAddOpaqueOptions", unsafe {
            (api.LiteRtAddOpaqueOptions)(self.raw.as_ptr(), opaque.as_ptr())
        })
    }
}

impl Drop for Options {
    fn drop(&mut self) {
        // SAFETY: created by LiteRtCreateOptions, destroyed once; a compiled model keeps no
        // reference to the options it was compiled with.
        unsafe { (self.runtime.api.LiteRtDestroyOptions)(self.raw.as_ptr()) }
    }
}

/// `LiteRtCompiledModel`. LiteRT keeps pointers to the environment and model it was made from:
/// its owner must drop it before them (`LiteRtEmbedder` declares its fields in that order).
pub(crate) struct CompiledModel {
    raw: NonNull<ffi::CompiledModelT>,
    runtime: Arc<LiteRtRuntime>,
}

impl CompiledModel {
    pub fn new(env: &Environment, model: &Model, options: &Options) -> CallResult<Self> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: live environment, model and options; valid out-pointer.
        let status = unsafe {
            (env.runtime.api.LiteRtCreateCompiledModel)(
                env.raw.as_ptr(),
                model.raw.as_ptr(),
                options.raw.as_ptr(),
                &mut raw,
            )
        };
        Ok(Self {
            raw: created("LiteRtCreateCompiledModel", status, raw)?,
            runtime: env.runtime.clone(),
        })
    }

    /// Whether every op runs on the chosen accelerator, when LiteRT says.
    pub fn fully_accelerated(&self) -> Option<bool> {
        let mut fully = false;
        // SAFETY: live compiled model, valid out-pointer.
        let status = unsafe {
            (self.runtime.api.LiteRtCompiledModelIsFullyAccelerated)(self.raw.as_ptr(), &mut fully)
        };
        (status == STATUS_OK).then_some(fully)
    }

    /// A managed buffer for tensor `index` of `side` in `signature`, created in `env` with `ty`.
    pub fn create_buffer(
        &self,
        env: &Environment,
        signature: usize,
        side: Side,
        index: usize,
        ty: &ffi::RankedTensorType,
    ) -> CallResult<TensorBuffer> {
        let api = &self.runtime.api;
        let mut requirements = std::ptr::null_mut();
        // SAFETY: live compiled model, valid out-pointer; the requirements are owned by the
        // compiled model, used only within this call.
        let (call, status) = unsafe {
            match side {
                Side::Input => (
                    "LiteRtGetCompiledModelInputBufferRequirements",
                    (api.LiteRtGetCompiledModelInputBufferRequirements)(
                        self.raw.as_ptr(),
                        signature,
                        index,
                        &mut requirements,
                    ),
                ),
                Side::Output => (
                    "LiteRtGetCompiledModelOutputBufferRequirements",
                    (api.LiteRtGetCompiledModelOutputBufferRequirements)(
                        self.raw.as_ptr(),
                        signature,
                        index,
                        &mut requirements,
                    ),
                ),
            }
        };
        let requirements = created(call, status, requirements)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: live environment and requirements; `ty` outlives the call; valid out-pointer.
        let status = unsafe {
            (api.LiteRtCreateManagedTensorBufferFromRequirements)(
                env.raw.as_ptr(),
                ty,
                requirements.as_ptr(),
                &mut raw,
            )
        };
        let raw = created(
            "LiteRtCreateManagedTensorBufferFromRequirements",
            status,
            raw,
        )?;
        let mut buffer = TensorBuffer {
            raw,
            runtime: self.runtime.clone(),
            size: 0,
        };
        let mut size = 0usize;
        // SAFETY: live buffer, valid out-pointer.
        ok("LiteRtGetTensorBufferSize", unsafe {
            (api.LiteRtGetTensorBufferSize)(buffer.raw.as_ptr(), &mut size)
        })?;
        buffer.size = size;
        Ok(buffer)
    }

    /// Run `signature` reading `input` and writing `output`.
    pub fn run(
        &mut self,
        signature: usize,
        input: &mut TensorBuffer,
        output: &mut TensorBuffer,
    ) -> CallResult<()> {
        let mut inputs = [input.raw.as_ptr()];
        let mut outputs = [output.raw.as_ptr()];
        // SAFETY: live compiled model; both buffers are live, unlocked (a lock borrows the
        // buffer, which `&mut` here excludes) and were made from this model's requirements.
        ok("LiteRtRunCompiledModel", unsafe {
            (self.runtime.api.LiteRtRunCompiledModel)(
                self.raw.as_ptr(),
                signature,
                inputs.len(),
                inputs.as_mut_ptr(),
                outputs.len(),
                outputs.as_mut_ptr(),
            )
        })
    }
}

impl Drop for CompiledModel {
    fn drop(&mut self) {
        // SAFETY: created by LiteRtCreateCompiledModel, destroyed once, after the buffers made
        // from it and before its model and environment (field order of its owner).
        unsafe { (self.runtime.api.LiteRtDestroyCompiledModel)(self.raw.as_ptr()) }
    }
}

/// A managed `LiteRtTensorBuffer` of `size` bytes.
pub(crate) struct TensorBuffer {
    raw: NonNull<ffi::TensorBufferT>,
    runtime: Arc<LiteRtRuntime>,
    size: usize,
}

impl TensorBuffer {
    pub fn size(&self) -> usize {
        self.size
    }

    fn lock(&self, mode: std::ffi::c_uint) -> CallResult<NonNull<u8>> {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: live buffer, valid out-pointer; the caller's guard unlocks it.
        let status =
            unsafe { (self.runtime.api.LiteRtLockTensorBuffer)(self.raw.as_ptr(), &mut ptr, mode) };
        let ptr = created("LiteRtLockTensorBuffer", status, ptr.cast::<u8>())?;
        Ok(ptr)
    }

    fn unlock(&self) {
        // SAFETY: called once by the guard that locked it. An unlock failure leaves nothing to
        // undo and the next lock reports it.
        let status = unsafe { (self.runtime.api.LiteRtUnlockTensorBuffer)(self.raw.as_ptr()) };
        if status != STATUS_OK {
            log::warn!(
                "LiteRtUnlockTensorBuffer failed: {}",
                ffi::status_name(status)
            );
        }
    }

    /// The buffer's bytes for writing, until the guard drops.
    pub fn write(&mut self) -> CallResult<WriteLock<'_>> {
        let ptr = self.lock(ffi::LOCK_WRITE)?;
        Ok(WriteLock { buffer: self, ptr })
    }

    /// The buffer's bytes for reading, until the guard drops.
    pub fn read(&mut self) -> CallResult<ReadLock<'_>> {
        let ptr = self.lock(ffi::LOCK_READ)?;
        Ok(ReadLock { buffer: self, ptr })
    }
}

impl Drop for TensorBuffer {
    fn drop(&mut self) {
        // SAFETY: created by LiteRtCreateManagedTensorBufferFromRequirements, destroyed once
        // (no lock guard can outlive the borrow of `self`), before its compiled model.
        unsafe { (self.runtime.api.LiteRtDestroyTensorBuffer)(self.raw.as_ptr()) }
    }
}

/// A tensor buffer locked for writing; unlocked on drop.
pub(crate) struct WriteLock<'b> {
    buffer: &'b mut TensorBuffer,
    ptr: NonNull<u8>,
}

impl WriteLock<'_> {
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: LiteRT locked `size` bytes at `ptr` for writing until this guard unlocks them;
        // the guard holds the only (mutable) borrow of the buffer meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.buffer.size) }
    }
}

impl Drop for WriteLock<'_> {
    fn drop(&mut self) {
        self.buffer.unlock();
    }
}

/// A tensor buffer locked for reading; unlocked on drop.
pub(crate) struct ReadLock<'b> {
    buffer: &'b mut TensorBuffer,
    ptr: NonNull<u8>,
}

impl ReadLock<'_> {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: LiteRT locked `size` bytes at `ptr` for reading until this guard unlocks them;
        // the guard holds the only borrow of the buffer meanwhile, so nothing writes to it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.buffer.size) }
    }
}

impl Drop for ReadLock<'_> {
    fn drop(&mut self) {
        self.buffer.unlock();
    }
}
