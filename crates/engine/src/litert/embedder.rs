//! [`LiteRtEmbedder`]: a `.tflite` model compiled by LiteRT, checked against its manifest.

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use dermedge_core::manifest::{ModelManifest, TensorDtype};
use dermedge_core::{
    EmbedError, Embedder, Embedding, InputBuffer, Preprocessor, QuantParams, RgbImage,
};

use super::ffi;
use super::handles::{
    CallFailed, CompiledModel, Environment, Model, Options, Side, Signature, TensorBuffer,
    TensorQuantization,
};
use super::quiet::quietly;
use super::runtime::{CpuSettings, LiteRtRuntime};
use super::weight_cache::{self, CacheState};
use dermedge_core::ManifestError;

use crate::backend::accelerator_unavailable;
use crate::check::{check_against_manifest, check_tflite, map_model};
use crate::{
    Accelerator, CpuArithmetic, ElementType, EngineError, EngineOptions, Fallback, Quantization,
    TensorDetails,
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
    /// The arithmetic float ops run in on the CPU (after any fallback).
    arithmetic: CpuArithmetic,
    fully_accelerated: Option<bool>,
    // LiteRT objects drop in declaration order, the reverse of creation: the buffers before the
    // compiled model that made them, which LiteRT requires to go before its model (and the
    // mapping the model reads in place) and the environment everything was created in.
    input_buffer: TensorBuffer,
    output_buffer: TensorBuffer,
    compiled: CompiledModel,
    _model: Model,
    env: Environment,
}

// SAFETY: the LiteRT objects are owned exclusively by this value and used through `&mut self`
// (or `&self` for queries that read no LiteRT state); LiteRT objects may move between threads
// when not shared.
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

impl LiteRtEmbedder {
    /// Verify the model file against the manifest, load it into LiteRT, check its tensors against
    /// the manifest, compile it for the requested accelerator (or CPU, per the fallback policy).
    pub fn load(manifest: &ModelManifest, options: &EngineOptions) -> Result<Self, EngineError> {
        crate::backend::check_cpu_arithmetic(options, crate::Backend::Litert)?;
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
        let cache_state = match &options.weight_cache {
            // A warm start maps the packed weights from the cache; re-hashing the model file
            // would then cost more than loading it (docs/BENCHMARKS.md). The cache itself is
            // checked instead: it is what XNNPACK reads.
            Some(cache) => {
                let mut stamp = cache.clone().into_os_string();
                stamp.push(".verified");
                manifest.verify_model_with_stamp(&bytes, Path::new(&stamp))?;
                Some(weight_cache::prepare(cache))
            }
            None => {
                manifest.verify_model_bytes(&bytes)?;
                None
            }
        };
        let verified_s = started.elapsed().as_secs_f64();
        check_tflite(&model_path, &bytes)?;
        let runtime = LiteRtRuntime::locate(options)?;
        let at = |failed: CallFailed| failed.at(&model_path);
        let env =
            quietly(|| Environment::new(&runtime)).map_err(|failed| failed.at(runtime.path()))?;
        let model = Model::from_mapping(&runtime, bytes).map_err(at)?;

        let (signature_index, signature_key, signature) =
            find_signature(&model, &model_path, manifest)?;
        let (input, input_type) = tensor_details(&signature, &model_path, Side::Input, 0)?;
        let output_index = signature
            .names(Side::Output)
            .map_err(at)?
            .iter()
            .position(|o| o == &manifest.output.name)
            .unwrap_or(0);
        let (output, output_type) =
            tensor_details(&signature, &model_path, Side::Output, output_index)?;
        check_against_manifest(manifest, &model_path, &input, &output)?;
        let input_quant = match input.quantization {
            Quantization::PerTensor { scale, zero_point } => {
                Some(QuantParams { scale, zero_point })
            }
            _ => None,
        };
        let opened_s = started.elapsed().as_secs_f64();
        let cpu = CpuSettings {
            threads,
            weight_cache: options.weight_cache.clone(),
            arithmetic: options.cpu_arithmetic,
        };
        let build = |cpu: &CpuSettings| -> Result<Compiled, EngineError> {
            let (compiled, accelerator) =
                quietly(|| compile(&env, &model, &model_path, options, cpu))?;
            let input_buffer = compiled
                .create_buffer(&env, signature_index, Side::Input, 0, &input_type)
                .map_err(at)?;
            let output_buffer = compiled
                .create_buffer(
                    &env,
                    signature_index,
                    Side::Output,
                    output_index,
                    &output_type,
                )
                .map_err(at)?;
            Ok(Compiled {
                input_buffer,
                output_buffer,
                compiled,
                accelerator,
                arithmetic: cpu.arithmetic,
            })
        };
        // XNNPACK sets up its fp16 kernels at the first run, not at compile: a CPU without fp16
        // arithmetic (the Pi 4's Cortex-A72), or a graph it has none for (int8), fails there.
        // One run on zeros (not whatever a fresh buffer holds) finds out; compiling or that run
        // failing falls back to float32 or fails, as the policy says.
        let proven = |mut built: Compiled| -> Result<Compiled, EngineError> {
            let Compiled {
                compiled,
                input_buffer,
                output_buffer,
                ..
            } = &mut built;
            input_buffer
                .write()
                .map(|mut lock| lock.bytes().fill(0))
                .and_then(|()| {
                    quietly(|| compiled.run(signature_index, input_buffer, output_buffer))
                })
                .map_err(at)?;
            Ok(built)
        };
        let built = match cpu.arithmetic {
            CpuArithmetic::Fp32 => build(&cpu)?,
            CpuArithmetic::Fp16 => match build(&cpu).and_then(proven) {
                Ok(built) => built,
                Err(e) => {
                    fp16_unavailable(options.fallback, e)?;
                    build(&CpuSettings {
                        arithmetic: CpuArithmetic::Fp32,
                        ..cpu.clone()
                    })?
                }
            },
        };
        // Bound before its buffers, so that on an unwind they drop before it (locals drop in
        // reverse order).
        let Compiled {
            compiled,
            input_buffer,
            output_buffer,
            accelerator,
            arithmetic,
        } = built;
        if let (Some(cache), Some(CacheState::ToBuild)) = (&options.weight_cache, cache_state) {
            if accelerator == Accelerator::Cpu && cache.exists() {
                weight_cache::seal(cache);
            }
        }
        if accelerator == Accelerator::Cpu {
            if let Err(e) = model.release_resident_pages() {
                log::debug!("{}: cannot release its pages: {e}", model_path.display());
            }
        }
        let fully_accelerated = compiled.fully_accelerated();
        // Where start-up time goes: the checksum is proportional to the file, compiling to the
        // weights XNNPACK packs (or maps, with a weight cache).
        log::debug!(
            "{}: sha256 verified in {verified_s:.3} s, opened by {opened_s:.3} s, compiled by {:.3} s",
            model_path.display(),
            started.elapsed().as_secs_f64()
        );
        log::info!(
            "{}: {} {} on LiteRT {} ({}, {} threads{}); input {}; output {}",
            model_path.display(),
            manifest.model.id,
            manifest.model.precision.as_str(),
            runtime.version(),
            accelerator,
            threads,
            arithmetic_note(arithmetic),
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
            arithmetic,
            fully_accelerated,
            input_buffer,
            output_buffer,
            compiled,
            _model: model,
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

    /// The arithmetic float ops run in on the CPU (after any fallback).
    pub fn cpu_arithmetic(&self) -> CpuArithmetic {
        self.arithmetic
    }

    /// Whether LiteRT placed every op on the chosen accelerator, when it says.
    pub fn fully_accelerated(&self) -> Option<bool> {
        self.fully_accelerated
    }

    pub fn runtime(&self) -> &Arc<LiteRtRuntime> {
        self.env.runtime()
    }

    fn backend_error(&self, message: String) -> EmbedError {
        EmbedError::Backend {
            backend: self.backend(),
            message,
        }
    }

    fn runtime_error(&self, failed: CallFailed) -> EmbedError {
        call_error(self.accelerator, &self.model_path, failed)
    }

    /// Stage 1 of [`Embedder::embed`]: preprocess `image` straight into the input tensor.
    pub fn fill_input(&mut self, image: &RgbImage) -> Result<(), EmbedError> {
        let len = self.manifest.input_len();
        let needed = len * self.input.element_size();
        let available = self.input_buffer.size();
        if available < needed {
            return Err(self.backend_error(format!(
                "input buffer holds {available} bytes, {needed} needed"
            )));
        }
        let (accelerator, model_path) = (self.accelerator, &self.model_path);
        let mut lock = self
            .input_buffer
            .write()
            .map_err(|failed| call_error(accelerator, model_path, failed))?;
        let bytes = &mut lock.bytes()[..needed];
        let misaligned = || EmbedError::Backend {
            backend: format!("litert/{accelerator}"),
            message: "input buffer is misaligned".into(),
        };
        let target = match self.manifest.input.dtype {
            TensorDtype::Float32 => {
                InputBuffer::F32(bytemuck::try_cast_slice_mut(bytes).map_err(|_| misaligned())?)
            }
            TensorDtype::Uint8 => InputBuffer::U8(bytes),
            TensorDtype::Int8 => InputBuffer::I8(bytemuck::cast_slice_mut(bytes)),
        };
        self.preprocessor
            .run(image, target)
            .map_err(EmbedError::from)
    }

    /// Stage 3: the embedding, dequantised from the output tensor.
    pub fn read_output(&mut self) -> Result<Vec<f32>, EmbedError> {
        let dim = self.manifest.model.embedding_dim;
        let needed = dim * self.output.element_size();
        let (accelerator, model_path) = (self.accelerator, &self.model_path);
        let lock = self
            .output_buffer
            .read()
            .map_err(|failed| call_error(accelerator, model_path, failed))?;
        // check_against_manifest proved the output tensor holds exactly `dim` elements.
        let values = match lock.bytes().get(..needed) {
            Some(bytes) => self.output.dequantise(bytes),
            None => Vec::new(),
        };
        drop(lock);
        if values.len() != dim {
            return Err(self.backend_error(format!(
                "output buffer holds {} bytes of {}, {dim} elements expected",
                self.output_buffer.size(),
                self.output.dtype
            )));
        }
        Ok(values)
    }

    /// Stage 2: run the model on the input already filled.
    pub fn invoke(&mut self) -> Result<(), EmbedError> {
        let result = self.compiled.run(
            self.signature_index,
            &mut self.input_buffer,
            &mut self.output_buffer,
        );
        result.map_err(|failed| self.runtime_error(failed))
    }
}

impl Embedder for LiteRtEmbedder {
    fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// `litert/<accelerator>`, `+fp16` where float ops run in float16 on the CPU: what `embed`
    /// indexes and fidelity reports say made an embedding.
    fn backend(&self) -> String {
        let fp16 = match self.arithmetic {
            CpuArithmetic::Fp16 => "+fp16",
            CpuArithmetic::Fp32 => "",
        };
        format!("litert/{}{fp16}", self.accelerator)
    }

    fn runtime_description(&self) -> String {
        format!(
            "LiteRT {} {}, {} threads{}",
            self.env.runtime().version(),
            self.accelerator,
            self.threads,
            arithmetic_note(self.arithmetic)
        )
    }

    fn embed(&mut self, image: &RgbImage) -> Result<Embedding, EmbedError> {
        self.fill_input(image)?;
        self.invoke()?;
        let values = self.read_output()?;
        Ok(Embedding {
            model_id: self.manifest.model.id.clone(),
            precision: self.manifest.model.precision,
            values,
        })
    }
}

fn call_error(accelerator: Accelerator, model_path: &Path, failed: CallFailed) -> EmbedError {
    EmbedError::Backend {
        backend: format!("litert/{accelerator}"),
        message: format!("{}: {failed}", model_path.display()),
    }
}

/// The signature whose outputs include the manifest's output name.
fn find_signature<'m>(
    model: &'m Model,
    path: &Path,
    manifest: &ModelManifest,
) -> Result<(usize, String, Signature<'m>), EngineError> {
    let at = |failed: CallFailed| failed.at(path);
    let mut seen = Vec::new();
    for i in 0..model.signature_count().map_err(at)? {
        let signature = model.signature(i).map_err(at)?;
        let key = signature.key().map_err(at)?;
        let outputs = signature.names(Side::Output).map_err(at)?;
        if outputs.iter().any(|o| o == &manifest.output.name) {
            return Ok((i, key, signature));
        }
        seen.push(format!("{key} -> [{}]", outputs.join(", ")));
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

/// Details of one signature input or output, and the ranked type its runtime buffer is created with.
fn tensor_details(
    signature: &Signature<'_>,
    path: &Path,
    side: Side,
    index: usize,
) -> Result<(TensorDetails, ffi::RankedTensorType), EngineError> {
    let at = |failed: CallFailed| failed.at(path);
    if side == Side::Input {
        let n = signature.count(Side::Input).map_err(at)?;
        if n != 1 {
            return Err(EngineError::NotTflite {
                path: path.to_path_buf(),
                reason: format!("an embedding model takes one image input; this signature has {n}"),
            });
        }
    }
    let name = signature.name(side, index).map_err(at)?;
    let tensor = signature.tensor(side, index).map_err(at)?;
    let ranked = tensor.ranked_type().map_err(at)?;
    let quantization = match tensor.quantization().map_err(at)? {
        TensorQuantization::None => Quantization::None,
        TensorQuantization::PerTensor(q) => Quantization::PerTensor {
            scale: q.scale,
            zero_point: q.zero_point,
        },
        TensorQuantization::PerChannel {
            dimension,
            channels,
        } => Quantization::PerChannel {
            channels,
            dimension,
        },
        TensorQuantization::Other(code) => Quantization::Other { code },
    };
    let details = TensorDetails {
        name,
        dtype: element_type(ranked.element_type),
        shape: ranked.layout.dims().to_vec(),
        quantization,
    };
    Ok((details, ranked))
}

/// Compile for the requested accelerator; fall back to CPU (logged) or fail, per the options.
/// `, fp16 arithmetic` where float ops run in float16 on the CPU (fp16 is CPU-only:
/// `check_cpu_arithmetic`); nothing otherwise.
fn arithmetic_note(arithmetic: CpuArithmetic) -> &'static str {
    match arithmetic {
        CpuArithmetic::Fp16 => ", fp16 arithmetic",
        CpuArithmetic::Fp32 => "",
    }
}

/// A compiled model with its buffers; the buffers drop first, as LiteRT requires.
struct Compiled {
    input_buffer: TensorBuffer,
    output_buffer: TensorBuffer,
    compiled: CompiledModel,
    accelerator: Accelerator,
    arithmetic: CpuArithmetic,
}

/// fp16 arithmetic this CPU cannot run: an error under `Fallback::Fail`, else a warning and
/// `Ok` (the caller compiles for float32).
fn fp16_unavailable(fallback: Fallback, cause: EngineError) -> Result<(), EngineError> {
    let reason = format!("XNNPACK's fp16 arithmetic failed (this CPU or this graph): {cause}");
    match fallback {
        Fallback::Fail => Err(EngineError::InvalidOption {
            field: "cpu_arithmetic",
            message: reason,
        }),
        Fallback::Cpu => {
            log::warn!("{reason}; running float32 arithmetic instead");
            Ok(())
        }
    }
}

fn compile(
    env: &Environment,
    model: &Model,
    path: &Path,
    options: &EngineOptions,
    cpu: &CpuSettings,
) -> Result<(CompiledModel, Accelerator), EngineError> {
    let requested = options.accelerator;
    let on_cpu = || {
        Ok((
            compile_for(env, model, path, ffi::HW_CPU, cpu)?,
            Accelerator::Cpu,
        ))
    };
    let unavailable = |reason: String| -> Result<(CompiledModel, Accelerator), EngineError> {
        accelerator_unavailable(options.fallback, requested, reason)?;
        on_cpu()
    };
    let hw = match requested {
        Accelerator::Cpu => return on_cpu(),
        Accelerator::Gpu => ffi::HW_GPU,
        Accelerator::Npu => ffi::HW_NPU,
        Accelerator::EdgeTpu => {
            return unavailable("the Edge TPU is reached through libedgetpu's delegate on the classic TFLite API, not LiteRT".into())
        }
    };
    let registered = LiteRtRuntime::accelerators_in(env)?;
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
    match compile_for(env, model, path, hw | ffi::HW_CPU, cpu) {
        Ok(compiled) => Ok((compiled, requested)),
        Err(e) => unavailable(format!("compiling for {name} failed: {e}")),
    }
}

fn compile_for(
    env: &Environment,
    model: &Model,
    path: &Path,
    hardware: c_int,
    cpu: &CpuSettings,
) -> Result<CompiledModel, EngineError> {
    let at = |failed: CallFailed| failed.at(path);
    let mut options = Options::new(env.runtime()).map_err(at)?;
    options.set_hardware(hardware).map_err(at)?;
    options.add_cpu_settings(cpu).map_err(at)?;
    CompiledModel::new(env, model, &options).map_err(at)
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
    fn cpu_arithmetic(&self) -> CpuArithmetic {
        LiteRtEmbedder::cpu_arithmetic(self)
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
