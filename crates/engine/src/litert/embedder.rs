//! [`LiteRtEmbedder`]: a `.tflite` model compiled by LiteRT, checked against its manifest.

use std::ffi::{c_int, CStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use dermedge_core::manifest::{ModelManifest, TensorDtype};
use dermedge_core::{
    EmbedError, Embedder, Embedding, InputBuffer, Preprocessor, QuantParams, RgbImage,
};

use super::ffi::{self, Handle};
use super::runtime::{
    cpu_options_payload, free_cstring_payload, CpuSettings, Environment, LiteRtRuntime,
};
use dermedge_core::ManifestError;

use crate::check::{check_against_manifest, check_tflite, map_model};
use crate::{
    Accelerator, ElementType, EngineError, EngineOptions, Fallback, Quantization, TensorDetails,
};

/// A model loaded and compiled by LiteRT, with its input/output buffers, ready to embed frames.
pub struct LiteRtEmbedder {
    manifest: ModelManifest,
    model_path: PathBuf,
    preprocessor: Preprocessor,
    input: TensorDetails,
    output: TensorDetails,
    signature_key: String,
    signature_index: usize,
    threads: u32,
    accelerator: Accelerator,
    fully_accelerated: Option<bool>,
    input_buffer: Handle,
    output_buffer: Handle,
    compiled: Handle,
    model: Handle,
    /// The checked model file, which LiteRT reads in place: dropped after `model` (see `Drop`).
    /// Never read on our side once handed over; holding it is its purpose.
    #[allow(dead_code)]
    bytes: memmap2::Mmap,
    /// Dropped after the handles above (see `Drop`), which live inside it.
    env: Environment,
}

// SAFETY: the LiteRT handles are owned exclusively by this value and used through `&mut self`
// (or `&self` for read-only queries); LiteRT objects may move between threads when not shared.
unsafe impl Send for LiteRtEmbedder {}

fn element_type(code: c_int) -> ElementType {
    match code {
        ffi::ELEMENT_FLOAT32 => ElementType::Float32,
        ffi::ELEMENT_FLOAT16 => ElementType::Float16,
        ffi::ELEMENT_INT8 => ElementType::Int8,
        ffi::ELEMENT_UINT8 => ElementType::Uint8,
        ffi::ELEMENT_INT16 => ElementType::Int16,
        ffi::ELEMENT_INT32 => ElementType::Int32,
        ffi::ELEMENT_INT64 => ElementType::Int64,
        other => ElementType::Other(other),
    }
}

fn c_str(ptr: *const std::ffi::c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: LiteRT returns NUL-terminated strings owned by the model, valid while it lives.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

impl LiteRtEmbedder {
    /// Verify the model file against the manifest, load it into LiteRT, check its tensors against
    /// the manifest, compile it for the requested accelerator (or CPU, per the fallback policy).
    pub fn load(manifest: &ModelManifest, options: &EngineOptions) -> Result<Self, EngineError> {
        let threads = options.resolved_threads()?;
        let model_path = manifest.model_path();
        let started = Instant::now();
        // The runtime reads the very bytes that were checked: one mapping, hashed and checked,
        // never the path again.
        let bytes = map_model(&model_path).map_err(|cause| ManifestError::ModelMissing {
            manifest: manifest.path.clone(),
            model: model_path.clone(),
            cause,
        })?;
        match &options.weight_cache {
            // A warm start maps the packed weights from the cache; re-hashing the model file
            // would then cost more than loading it (docs/BENCHMARKS.md).
            Some(cache) => {
                let mut stamp = cache.clone().into_os_string();
                stamp.push(".verified");
                manifest.verify_model_file_with_stamp(Path::new(&stamp))?;
            }
            None => manifest.verify_model_bytes(&bytes)?,
        }
        let verified_s = started.elapsed().as_secs_f64();
        check_tflite(&model_path, &bytes)?;
        let runtime = LiteRtRuntime::locate(options)?;
        let env = runtime.create_environment()?;
        let api = &runtime.api;
        let check = |call, status| runtime.check(&model_path, call, status);

        let mut model: Handle = std::ptr::null_mut();
        // SAFETY: `bytes` is a valid mapping of `bytes.len()` bytes that `Self` keeps alive for as
        // long as the model (LiteRT reads the buffer in place); the out-pointer is valid.
        check("LiteRtCreateModelFromBuffer", unsafe {
            (api.LiteRtCreateModelFromBuffer)(bytes.as_ptr().cast(), bytes.len(), &mut model)
        })?;
        // From here on `guard` destroys the model if anything fails before `Self` owns it.
        let guard = ModelGuard {
            runtime: &runtime,
            model,
        };

        let (signature_index, signature_key, signature) =
            find_signature(&runtime, &model_path, model, manifest)?;
        let (input, input_type) = tensor_details(&runtime, &model_path, signature, 0, true)?;
        let output_index = output_index(&runtime, &model_path, signature, &manifest.output.name)?;
        let (output, output_type) =
            tensor_details(&runtime, &model_path, signature, output_index, false)?;
        check_against_manifest(manifest, &model_path, &input, &output)?;
        let input_quant = match input.quantization {
            Quantization::PerTensor { scale, zero_point } => {
                Some(QuantParams { scale, zero_point })
            }
            _ => None,
        };
        let opened_s = started.elapsed().as_secs_f64();
        let (compiled, accelerator) = compile(
            &runtime,
            &env,
            &model_path,
            model,
            options,
            &CpuSettings {
                threads,
                weight_cache: options.weight_cache.clone(),
            },
        )?;
        let mut fully = false;
        // SAFETY: live compiled model, valid out-pointer.
        let fully_accelerated =
            (unsafe { (api.LiteRtCompiledModelIsFullyAccelerated)(compiled, &mut fully) }
                == ffi::STATUS_OK)
                .then_some(fully);
        let buffers = create_buffers(
            &runtime,
            &env,
            &model_path,
            compiled,
            signature_index,
            output_index,
            &input_type,
            &output_type,
        );
        let (input_buffer, output_buffer) = match buffers {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: created above, not used elsewhere.
                unsafe { (api.LiteRtDestroyCompiledModel)(compiled) };
                return Err(e);
            }
        };
        std::mem::forget(guard);
        // Where start-up time goes: the checksum is proportional to the file, compiling to the
        // weights XNNPACK packs (or maps, with a weight cache).
        log::debug!(
            "{}: sha256 verified in {verified_s:.3} s, opened by {opened_s:.3} s, compiled by {:.3} s",
            model_path.display(),
            started.elapsed().as_secs_f64()
        );
        log::info!(
            "{}: {} {} on LiteRT {} ({}, {} threads); input {}; output {}",
            model_path.display(),
            manifest.model.id,
            manifest.model.precision.as_str(),
            runtime.version(),
            accelerator,
            threads,
            input,
            output
        );
        Ok(Self {
            manifest: manifest.clone(),
            model_path,
            preprocessor: Preprocessor::new(&manifest.input, input_quant),
            input,
            output,
            signature_key,
            signature_index,
            threads,
            accelerator,
            fully_accelerated,
            input_buffer,
            output_buffer,
            compiled,
            model,
            bytes,
            env,
        })
    }

    pub fn input_details(&self) -> &TensorDetails {
        &self.input
    }

    pub fn output_details(&self) -> &TensorDetails {
        &self.output
    }

    pub fn signature_key(&self) -> &str {
        &self.signature_key
    }

    pub fn threads(&self) -> u32 {
        self.threads
    }

    /// The accelerator the model actually runs on (after any fallback).
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    /// Whether LiteRT placed every op on the chosen accelerator, when it says.
    pub fn fully_accelerated(&self) -> Option<bool> {
        self.fully_accelerated
    }

    pub fn runtime(&self) -> &Arc<LiteRtRuntime> {
        &self.env.runtime
    }

    fn backend_error(&self, message: String) -> EmbedError {
        EmbedError::Backend {
            backend: self.backend(),
            message,
        }
    }

    fn runtime_error(&self, call: &'static str, status: ffi::Status) -> EmbedError {
        let message = self.env.runtime.status_message(status);
        self.backend_error(format!(
            "{}: {call} failed: {message} (status {status})",
            self.model_path.display()
        ))
    }

    /// Write the preprocessed `image` into the input tensor.
    /// Stage 1 of [`Embedder::embed`]: preprocess `image` straight into the input tensor.
    pub fn fill_input(&mut self, image: &RgbImage) -> Result<(), EmbedError> {
        let api = &self.env.runtime.api;
        let len = self.manifest.input_len();
        let mut ptr: *mut std::ffi::c_void = std::ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: live buffer; out-pointers valid.
        let status = unsafe { (api.LiteRtGetTensorBufferSize)(self.input_buffer, &mut size) };
        if status != ffi::STATUS_OK {
            return Err(self.runtime_error("LiteRtGetTensorBufferSize", status));
        }
        let elem = match self.manifest.input.dtype {
            TensorDtype::Float32 => 4,
            TensorDtype::Uint8 | TensorDtype::Int8 => 1,
        };
        if size < len * elem {
            return Err(self.backend_error(format!(
                "input buffer holds {size} bytes, {} needed",
                len * elem
            )));
        }
        // SAFETY: live buffer, locked for writing until the unlock below.
        let status =
            unsafe { (api.LiteRtLockTensorBuffer)(self.input_buffer, &mut ptr, ffi::LOCK_WRITE) };
        if status != ffi::STATUS_OK || ptr.is_null() {
            return Err(self.runtime_error("LiteRtLockTensorBuffer", status));
        }
        if !(ptr as usize).is_multiple_of(elem) {
            // SAFETY: locked above.
            unsafe { (api.LiteRtUnlockTensorBuffer)(self.input_buffer) };
            return Err(self.backend_error("input buffer is misaligned".into()));
        }
        // SAFETY: `ptr` is aligned for the element type and holds at least `len` elements; the
        // buffer is locked and no other reference to it exists until it is unlocked.
        let result = unsafe {
            match self.manifest.input.dtype {
                TensorDtype::Float32 => self.preprocessor.run(
                    image,
                    InputBuffer::F32(std::slice::from_raw_parts_mut(ptr.cast(), len)),
                ),
                TensorDtype::Uint8 => self.preprocessor.run(
                    image,
                    InputBuffer::U8(std::slice::from_raw_parts_mut(ptr.cast(), len)),
                ),
                TensorDtype::Int8 => self.preprocessor.run(
                    image,
                    InputBuffer::I8(std::slice::from_raw_parts_mut(ptr.cast(), len)),
                ),
            }
        };
        // SAFETY: locked above.
        unsafe { (api.LiteRtUnlockTensorBuffer)(self.input_buffer) };
        result.map_err(EmbedError::from)
    }

    /// Read and dequantise the output tensor.
    /// Stage 3: the embedding from the output tensor.
    pub fn read_output(&self) -> Result<Vec<f32>, EmbedError> {
        let api = &self.env.runtime.api;
        let dim = self.manifest.model.embedding_dim;
        let mut ptr: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: live buffer, locked for reading until the unlock below.
        let status =
            unsafe { (api.LiteRtLockTensorBuffer)(self.output_buffer, &mut ptr, ffi::LOCK_READ) };
        if status != ffi::STATUS_OK || ptr.is_null() {
            return Err(self.runtime_error("LiteRtLockTensorBuffer", status));
        }
        // SAFETY: the output buffer was created for this tensor type, which check_against_manifest
        // proved holds exactly `dim` elements of it; it stays locked while read.
        let bytes = unsafe {
            std::slice::from_raw_parts(ptr.cast::<u8>(), dim * self.output.element_size())
        };
        let values = self.output.dequantise(bytes);
        // SAFETY: locked above.
        unsafe { (api.LiteRtUnlockTensorBuffer)(self.output_buffer) };
        if values.len() != dim {
            return Err(
                self.backend_error(format!("unsupported output type {}", self.output.dtype))
            );
        }
        Ok(values)
    }

    /// Run the model on the input tensor as it is.
    /// Stage 2: run the model on the input already filled.
    pub fn invoke(&mut self) -> Result<(), EmbedError> {
        let api = &self.env.runtime.api;
        let mut inputs = [self.input_buffer];
        let mut outputs = [self.output_buffer];
        // SAFETY: live compiled model and buffers created from its requirements.
        let status = unsafe {
            (api.LiteRtRunCompiledModel)(
                self.compiled,
                self.signature_index,
                1,
                inputs.as_mut_ptr(),
                1,
                outputs.as_mut_ptr(),
            )
        };
        if status != ffi::STATUS_OK {
            return Err(self.runtime_error("LiteRtRunCompiledModel", status));
        }
        Ok(())
    }
}

impl Embedder for LiteRtEmbedder {
    fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    fn backend(&self) -> String {
        format!("litert/{}", self.accelerator)
    }

    fn runtime_description(&self) -> String {
        format!(
            "LiteRT {} {}, {} threads",
            self.env.runtime.version(),
            self.accelerator,
            self.threads
        )
    }

    fn embed(&mut self, image: &RgbImage) -> Result<Embedding, EmbedError> {
        self.fill_input(image)?;
        self.invoke()?;
        let values = self.read_output()?;
        Ok(Embedding {
            model_id: self.manifest.model.id.clone(),
            precision: self.manifest.model.precision.as_str().to_string(),
            values,
        })
    }
}

impl Drop for LiteRtEmbedder {
    fn drop(&mut self) {
        let api = &self.env.runtime.api;
        // SAFETY: each handle was created by LiteRT for this value and is destroyed exactly once,
        // buffers and compiled model before the model; the environment is dropped afterwards.
        unsafe {
            (api.LiteRtDestroyTensorBuffer)(self.input_buffer);
            (api.LiteRtDestroyTensorBuffer)(self.output_buffer);
            (api.LiteRtDestroyCompiledModel)(self.compiled);
            (api.LiteRtDestroyModel)(self.model);
        }
    }
}

/// Destroys a model on early return from `load`.
struct ModelGuard<'a> {
    runtime: &'a LiteRtRuntime,
    model: Handle,
}

impl Drop for ModelGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: the model was created by LiteRtCreateModelFromBuffer and nothing else owns it.
        unsafe { (self.runtime.api.LiteRtDestroyModel)(self.model) }
    }
}

fn zeroed_layout() -> ffi::Layout {
    ffi::Layout {
        rank_and_flags: 0,
        dimensions: [0; ffi::MAX_RANK],
        strides: [0; ffi::MAX_RANK],
    }
}

fn signature_outputs(
    rt: &LiteRtRuntime,
    path: &Path,
    signature: Handle,
) -> Result<Vec<String>, EngineError> {
    let mut n = 0usize;
    // SAFETY: live signature, valid out-pointers.
    rt.check(path, "LiteRtGetNumSignatureOutputs", unsafe {
        (rt.api.LiteRtGetNumSignatureOutputs)(signature, &mut n)
    })?;
    (0..n)
        .map(|i| {
            let mut name = std::ptr::null();
            // SAFETY: i < n.
            rt.check(path, "LiteRtGetSignatureOutputName", unsafe {
                (rt.api.LiteRtGetSignatureOutputName)(signature, i, &mut name)
            })?;
            Ok(c_str(name))
        })
        .collect()
}

/// The signature whose outputs include the manifest's output name.
fn find_signature(
    rt: &LiteRtRuntime,
    path: &Path,
    model: Handle,
    manifest: &ModelManifest,
) -> Result<(usize, String, Handle), EngineError> {
    let mut count = 0usize;
    // SAFETY: live model, valid out-pointer.
    rt.check(path, "LiteRtGetNumModelSignatures", unsafe {
        (rt.api.LiteRtGetNumModelSignatures)(model, &mut count)
    })?;
    let mut seen = Vec::new();
    for i in 0..count {
        let mut signature: Handle = std::ptr::null_mut();
        let mut key = std::ptr::null();
        // SAFETY: i < count; valid out-pointers.
        unsafe {
            rt.check(
                path,
                "LiteRtGetModelSignature",
                (rt.api.LiteRtGetModelSignature)(model, i, &mut signature),
            )?;
            rt.check(
                path,
                "LiteRtGetSignatureKey",
                (rt.api.LiteRtGetSignatureKey)(signature, &mut key),
            )?;
        }
        let outputs = signature_outputs(rt, path, signature)?;
        if outputs.iter().any(|o| o == &manifest.output.name) {
            return Ok((i, c_str(key), signature));
        }
        seen.push(format!("{} -> [{}]", c_str(key), outputs.join(", ")));
    }
    Err(EngineError::TensorMismatch {
        manifest: manifest.path.clone(),
        model: path.to_path_buf(),
        message: format!(
            "no signature has an output named `{}` (output.name); the model has: {}",
            manifest.output.name,
            if seen.is_empty() {
                "no signatures".to_string()
            } else {
                seen.join("; ")
            }
        ),
    })
}

fn output_index(
    rt: &LiteRtRuntime,
    path: &Path,
    signature: Handle,
    name: &str,
) -> Result<usize, EngineError> {
    Ok(signature_outputs(rt, path, signature)?
        .iter()
        .position(|o| o == name)
        .unwrap_or(0))
}

/// Details of one signature input or output, and the ranked type its runtime buffer is created with.
fn tensor_details(
    rt: &LiteRtRuntime,
    path: &Path,
    signature: Handle,
    index: usize,
    input: bool,
) -> Result<(TensorDetails, ffi::RankedTensorType), EngineError> {
    let api = &rt.api;
    let mut tensor: Handle = std::ptr::null_mut();
    let mut name = std::ptr::null();
    let mut ranked = ffi::RankedTensorType {
        element_type: 0,
        layout: zeroed_layout(),
    };
    let mut quant_kind: c_int = ffi::QUANT_NONE;
    // SAFETY: live signature; index checked by the caller against the signature's arity (an
    // out-of-range index is reported by LiteRT as an error status); valid out-pointers.
    unsafe {
        if input {
            let mut n = 0usize;
            rt.check(
                path,
                "LiteRtGetNumSignatureInputs",
                (api.LiteRtGetNumSignatureInputs)(signature, &mut n),
            )?;
            if n != 1 {
                return Err(EngineError::NotTflite {
                    path: path.to_path_buf(),
                    reason: format!(
                        "an embedding model takes one image input; this signature has {n}"
                    ),
                });
            }
            rt.check(
                path,
                "LiteRtGetSignatureInputName",
                (api.LiteRtGetSignatureInputName)(signature, index, &mut name),
            )?;
            rt.check(
                path,
                "LiteRtGetSignatureInputTensorByIndex",
                (api.LiteRtGetSignatureInputTensorByIndex)(signature, index, &mut tensor),
            )?;
        } else {
            rt.check(
                path,
                "LiteRtGetSignatureOutputName",
                (api.LiteRtGetSignatureOutputName)(signature, index, &mut name),
            )?;
            rt.check(
                path,
                "LiteRtGetSignatureOutputTensorByIndex",
                (api.LiteRtGetSignatureOutputTensorByIndex)(signature, index, &mut tensor),
            )?;
        }
        rt.check(
            path,
            "LiteRtGetRankedTensorType",
            (api.LiteRtGetRankedTensorType)(tensor, &mut ranked),
        )?;
        rt.check(
            path,
            "LiteRtGetQuantizationTypeId",
            (api.LiteRtGetQuantizationTypeId)(tensor, &mut quant_kind),
        )?;
    }
    let quantization = match quant_kind {
        ffi::QUANT_NONE => Quantization::None,
        ffi::QUANT_PER_TENSOR => {
            let mut q = ffi::QuantizationPerTensor::default();
            // SAFETY: the tensor has per-tensor quantisation.
            rt.check(path, "LiteRtGetPerTensorQuantization", unsafe {
                (api.LiteRtGetPerTensorQuantization)(tensor, &mut q)
            })?;
            Quantization::PerTensor {
                scale: q.scale,
                zero_point: q.zero_point,
            }
        }
        ffi::QUANT_PER_CHANNEL => {
            let mut q = ffi::QuantizationPerChannel {
                quantized_dimension: 0,
                num_channels: 0,
                scales: std::ptr::null_mut(),
                zero_points: std::ptr::null_mut(),
            };
            // SAFETY: the tensor has per-channel quantisation.
            rt.check(path, "LiteRtGetPerChannelQuantization", unsafe {
                (api.LiteRtGetPerChannelQuantization)(tensor, &mut q)
            })?;
            Quantization::PerChannel {
                channels: q.num_channels,
                dimension: q.quantized_dimension,
            }
        }
        code => Quantization::Other { code },
    };
    let details = TensorDetails {
        name: c_str(name),
        dtype: element_type(ranked.element_type),
        shape: ranked.layout.dims().to_vec(),
        quantization,
    };
    Ok((details, ranked))
}

/// Compile for the requested accelerator; fall back to CPU (logged) or fail, per the options.
fn compile(
    rt: &Arc<LiteRtRuntime>,
    env: &Environment,
    path: &Path,
    model: Handle,
    options: &EngineOptions,
    cpu: &CpuSettings,
) -> Result<(Handle, Accelerator), EngineError> {
    let requested = options.accelerator;
    let unavailable = |reason: String| -> Result<(Handle, Accelerator), EngineError> {
        match options.fallback {
            Fallback::Fail => Err(EngineError::AcceleratorUnavailable {
                requested: requested.to_string(),
                reason,
            }),
            Fallback::Cpu => {
                log::warn!("accelerator {requested} unavailable ({reason}); falling back to CPU");
                Ok((
                    compile_for(rt, env, path, model, ffi::HW_CPU, cpu)?,
                    Accelerator::Cpu,
                ))
            }
        }
    };
    let hw = match requested {
        Accelerator::Cpu => return Ok((compile_for(rt, env, path, model, ffi::HW_CPU, cpu)?, Accelerator::Cpu)),
        Accelerator::Gpu => ffi::HW_GPU,
        Accelerator::Npu => ffi::HW_NPU,
        Accelerator::EdgeTpu => {
            return unavailable("the Edge TPU is reached through libedgetpu's delegate on the classic TFLite API, not LiteRT".into())
        }
    };
    let registered = env.accelerators()?;
    let name = requested.name();
    if !registered.iter().any(|a| a.hardware.contains(&name)) {
        let list = registered
            .iter()
            .map(|a| format!("{} ({})", a.name, a.hardware.join("+")))
            .collect::<Vec<_>>();
        return unavailable(format!(
            "LiteRT registered no {name} accelerator on this machine; it has: {}",
            list.join(", ")
        ));
    }
    match compile_for(rt, env, path, model, hw | ffi::HW_CPU, cpu) {
        Ok(compiled) => Ok((compiled, requested)),
        Err(e) => unavailable(format!("compiling for {name} failed: {e}")),
    }
}

fn compile_for(
    rt: &Arc<LiteRtRuntime>,
    env: &Environment,
    path: &Path,
    model: Handle,
    hw: c_int,
    cpu: &CpuSettings,
) -> Result<Handle, EngineError> {
    let api = &rt.api;
    let mut options: Handle = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    rt.check(path, "LiteRtCreateOptions", unsafe {
        (api.LiteRtCreateOptions)(&mut options)
    })?;
    let result = (|| {
        // SAFETY: live options handle.
        rt.check(path, "LiteRtSetOptionsHardwareAccelerators", unsafe {
            (api.LiteRtSetOptionsHardwareAccelerators)(options, hw)
        })?;
        let (identifier, payload) = cpu_options_payload(cpu);
        let payload = payload.into_raw();
        let mut opaque: Handle = std::ptr::null_mut();
        // SAFETY: LiteRT copies the identifier; the payload is owned by the opaque options from
        // here on and freed through `free_cstring_payload`.
        let status = unsafe {
            (api.LiteRtCreateOpaqueOptions)(
                identifier.as_ptr(),
                payload.cast(),
                Some(free_cstring_payload),
                &mut opaque,
            )
        };
        if status != ffi::STATUS_OK {
            // SAFETY: LiteRT did not take the payload.
            unsafe { free_cstring_payload(payload.cast()) };
        }
        rt.check(path, "LiteRtCreateOpaqueOptions", status)?;
        // SAFETY: ownership of `opaque` moves to `options`.
        rt.check(path, "LiteRtAddOpaqueOptions", unsafe {
            (api.LiteRtAddOpaqueOptions)(options, opaque)
        })?;
        let mut compiled: Handle = std::ptr::null_mut();
        // SAFETY: live environment, model and options.
        rt.check(path, "LiteRtCreateCompiledModel", unsafe {
            (api.LiteRtCreateCompiledModel)(env.handle, model, options, &mut compiled)
        })?;
        Ok(compiled)
    })();
    // SAFETY: created above; the compiled model does not keep the options.
    unsafe { (api.LiteRtDestroyOptions)(options) };
    result
}

#[allow(clippy::too_many_arguments)]
fn create_buffers(
    rt: &Arc<LiteRtRuntime>,
    env: &Environment,
    path: &Path,
    compiled: Handle,
    signature: usize,
    output_index: usize,
    input_type: &ffi::RankedTensorType,
    output_type: &ffi::RankedTensorType,
) -> Result<(Handle, Handle), EngineError> {
    let api = &rt.api;
    let mut in_req: Handle = std::ptr::null_mut();
    let mut out_req: Handle = std::ptr::null_mut();
    let mut input: Handle = std::ptr::null_mut();
    let mut output: Handle = std::ptr::null_mut();
    // SAFETY: live compiled model and environment; requirements are owned by the compiled model.
    unsafe {
        rt.check(
            path,
            "LiteRtGetCompiledModelInputBufferRequirements",
            (api.LiteRtGetCompiledModelInputBufferRequirements)(
                compiled,
                signature,
                0,
                &mut in_req,
            ),
        )?;
        rt.check(
            path,
            "LiteRtGetCompiledModelOutputBufferRequirements",
            (api.LiteRtGetCompiledModelOutputBufferRequirements)(
                compiled,
                signature,
                output_index,
                &mut out_req,
            ),
        )?;
        rt.check(
            path,
            "LiteRtCreateManagedTensorBufferFromRequirements",
            (api.LiteRtCreateManagedTensorBufferFromRequirements)(
                env.handle, input_type, in_req, &mut input,
            ),
        )?;
        let status = (api.LiteRtCreateManagedTensorBufferFromRequirements)(
            env.handle,
            output_type,
            out_req,
            &mut output,
        );
        if status != ffi::STATUS_OK {
            (api.LiteRtDestroyTensorBuffer)(input);
        }
        rt.check(
            path,
            "LiteRtCreateManagedTensorBufferFromRequirements",
            status,
        )?;
    }
    Ok((input, output))
}

impl crate::LoadedModel for LiteRtEmbedder {
    fn signature_key(&self) -> &str {
        LiteRtEmbedder::signature_key(self)
    }
    fn input_details(&self) -> &TensorDetails {
        LiteRtEmbedder::input_details(self)
    }
    fn output_details(&self) -> &TensorDetails {
        LiteRtEmbedder::output_details(self)
    }
    fn accelerator(&self) -> Accelerator {
        LiteRtEmbedder::accelerator(self)
    }
    fn threads(&self) -> u32 {
        LiteRtEmbedder::threads(self)
    }
    fn fill_input(&mut self, image: &RgbImage) -> Result<(), EmbedError> {
        LiteRtEmbedder::fill_input(self, image)
    }
    fn invoke(&mut self) -> Result<(), EmbedError> {
        LiteRtEmbedder::invoke(self)
    }
    fn read_output(&mut self) -> Result<Vec<f32>, EmbedError> {
        LiteRtEmbedder::read_output(self)
    }
}
