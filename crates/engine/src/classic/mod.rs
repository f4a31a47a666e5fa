//! The classic TensorFlow Lite C API (`libtensorflowlite_c`) through tflitec: the runtime Coral
//! and many vendor board images ship. [`ClassicEmbedder`] runs a model on the CPU with tflitec's
//! interpreter, or on a Coral Edge TPU with libedgetpu's delegate ([`edgetpu`]), falling back to
//! the CPU (logged) or failing, per [`crate::Fallback`].
//!
//! tflitec links the library at build time: on a board, `TFLITEC_PREBUILT_PATH` names the board's
//! `libtensorflowlite_c.so`; in CI, tflitec's own TensorFlow 2.6 x86_64 build (see
//! `scripts/test-classic.sh`).

mod capi;
pub mod edgetpu;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dermedge_core::manifest::{ModelManifest, TensorDtype};
use dermedge_core::{
    EmbedError, Embedder, Embedding, InputBuffer, Preprocessor, QuantParams, RgbImage,
};
use tflitec::interpreter::{Interpreter, Options};
use tflitec::tensor::DataType;

use crate::backend::accelerator_unavailable;
use crate::check::{check_against_manifest, check_tflite_file};
use crate::{Accelerator, ElementType, EngineError, EngineOptions, Quantization, TensorDetails};
use capi::DelegatedInterpreter;
use edgetpu::{EdgeTpuError, EdgeTpuRuntime};

/// The TensorFlow Lite version of the linked `libtensorflowlite_c`.
pub fn runtime_version() -> String {
    capi::version()
}

/// Whether a TensorFlow Lite version's ADD/MUL kernels broadcast above rank 4: 2.6 aborts on it
/// (checked here); LiteRT, its successor, runs it.
fn broadcasts_above_rank_4(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) > (2, 6)
}

/// Where the model runs.
enum Runner {
    /// tflitec's interpreter on the CPU.
    Cpu(Interpreter),
    /// A classic interpreter with the Edge TPU delegate. Field order matters: the interpreter is
    /// dropped before the delegate it uses.
    EdgeTpu {
        interpreter: DelegatedInterpreter,
        _delegate: edgetpu::Delegate,
    },
}

/// A model loaded by the classic TensorFlow Lite runtime, checked against its manifest.
pub struct ClassicEmbedder {
    manifest: ModelManifest,
    model_path: PathBuf,
    preprocessor: Preprocessor,
    input: TensorDetails,
    output: TensorDetails,
    output_index: usize,
    threads: u32,
    accelerator: Accelerator,
    runner: Runner,
    /// Per-frame buffers, kept between frames so the loop does not allocate.
    input_f32: Vec<f32>,
    input_i8: Vec<i8>,
    input_bytes: Vec<u8>,
    output_bytes: Vec<u8>,
}

fn tflitec_dtype(dtype: DataType) -> ElementType {
    match dtype {
        DataType::Float32 => ElementType::Float32,
        DataType::Float16 => ElementType::Float16,
        DataType::Uint8 => ElementType::Uint8,
        DataType::Int16 => ElementType::Int16,
        DataType::Int32 => ElementType::Int32,
        DataType::Int64 => ElementType::Int64,
        DataType::Bool => ElementType::Other(6),
        DataType::Float64 => ElementType::Other(11),
    }
}

fn tflitec_details(tensor: &tflitec::tensor::Tensor) -> TensorDetails {
    TensorDetails {
        name: tensor.name().to_string(),
        dtype: tflitec_dtype(tensor.data_type()),
        shape: tensor
            .shape()
            .dimensions()
            .iter()
            .map(|&d| d as i32)
            .collect(),
        quantization: match tensor.quantization_parameters() {
            Some(q) => Quantization::PerTensor {
                scale: q.scale,
                zero_point: q.zero_point as i64,
            },
            None => Quantization::None,
        },
    }
}

impl Runner {
    fn input(&self) -> Result<TensorDetails, String> {
        match self {
            Runner::Cpu(i) => {
                if i.input_tensor_count() != 1 {
                    return Err("the model must have exactly one input".into());
                }
                // tflitec 0.5.2 knows no int8 tensors: such a model fails here, clearly.
                i.input(0)
                    .map(|t| tflitec_details(&t))
                    .map_err(|e| format!("input tensor: {e}"))
            }
            Runner::EdgeTpu { interpreter, .. } => interpreter.input(),
        }
    }

    fn outputs(&self) -> Result<Vec<TensorDetails>, String> {
        match self {
            Runner::Cpu(i) => (0..i.output_tensor_count())
                .map(|n| {
                    i.output(n)
                        .map(|t| tflitec_details(&t))
                        .map_err(|e| format!("output tensor {n}: {e}"))
                })
                .collect(),
            Runner::EdgeTpu { interpreter, .. } => Ok(interpreter.outputs()),
        }
    }

    fn write_input(&mut self, bytes: &[u8]) -> Result<(), String> {
        match self {
            Runner::Cpu(i) => i
                .input(0)
                .and_then(|t| t.set_data(bytes))
                .map_err(|e| e.to_string()),
            Runner::EdgeTpu { interpreter, .. } => interpreter.write_input(bytes),
        }
    }

    fn invoke(&mut self) -> Result<(), String> {
        match self {
            Runner::Cpu(i) => i.invoke().map_err(|e| format!("invoke failed: {e}")),
            Runner::EdgeTpu { interpreter, .. } => interpreter.invoke(),
        }
    }

    fn read_output(&self, index: usize, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Runner::Cpu(i) => {
                let tensor = i.output(index).map_err(|e| e.to_string())?;
                out.clear();
                out.extend_from_slice(tensor.data::<u8>());
                Ok(())
            }
            Runner::EdgeTpu { interpreter, .. } => interpreter.read_output(index, out),
        }
    }
}

fn cpu_runner(path: &Path, threads: u32) -> Result<Runner, EngineError> {
    let failed = |e: tflitec::Error| EngineError::Classic {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let path_str = path.to_str().ok_or_else(|| EngineError::NotTflite {
        path: path.to_path_buf(),
        reason: "path is not UTF-8".into(),
    })?;
    let model = tflitec::model::Model::new(path_str).map_err(failed)?;
    // The C interpreter keeps its own reference to the model: `model` may be dropped after this.
    let interpreter = Interpreter::new(
        &model,
        Some(Options {
            thread_count: threads as i32,
        }),
    )
    .map_err(failed)?;
    interpreter.allocate_tensors().map_err(failed)?;
    Ok(Runner::Cpu(interpreter))
}

/// The Edge TPU runner: the compiled model next to the manifest's, with libedgetpu's delegate.
fn edge_tpu_runner(
    model_path: &Path,
    threads: u32,
    library: Option<&Path>,
) -> Result<Runner, EdgeTpuError> {
    let compiled = edgetpu::compiled_path(model_path);
    let not_compiled = |reason: String| EdgeTpuError::NotCompiled {
        path: compiled.clone(),
        reason,
    };
    let map = check_tflite_file(&compiled).map_err(|e| not_compiled(e.to_string()))?;
    let custom = crate::flatbuffer::custom_op_codes(&map).map_err(|m| not_compiled(m.what))?;
    if !custom.iter().any(|c| c == edgetpu::CUSTOM_OP) {
        return Err(not_compiled(format!("it has no {}", edgetpu::CUSTOM_OP)));
    }
    let runtime = Arc::new(EdgeTpuRuntime::load(library)?);
    let delegate = runtime.delegate()?;
    let interpreter = DelegatedInterpreter::new(&compiled, threads, delegate.as_ptr())
        .map_err(|reason| not_compiled(format!("the delegate did not take it: {reason}")))?;
    log::info!(
        "{}: on Edge TPU {} {} ({})",
        compiled.display(),
        delegate.device().kind,
        delegate.device().path,
        runtime.version()
    );
    Ok(Runner::EdgeTpu {
        interpreter,
        _delegate: delegate,
    })
}

impl ClassicEmbedder {
    /// Verify the model against the manifest and load it for the requested accelerator: the
    /// Edge TPU (with the compiled `<name>_edgetpu.tflite` next to the model) or the CPU.
    pub fn load(manifest: &ModelManifest, options: &EngineOptions) -> Result<Self, EngineError> {
        Self::load_with_edgetpu_library(manifest, options, None)
    }

    /// [`Self::load`], with libedgetpu taken from `library` instead of the loader's search path.
    pub fn load_with_edgetpu_library(
        manifest: &ModelManifest,
        options: &EngineOptions,
        library: Option<&Path>,
    ) -> Result<Self, EngineError> {
        let threads = options.resolved_threads()?;
        let model_path = manifest.model_path();
        manifest.verify_model_file()?;
        let map = check_tflite_file(&model_path)?;
        let known = crate::flatbuffer::output_names(&map).map_err(|m| EngineError::NotTflite {
            path: model_path.clone(),
            reason: m.what,
        })?;
        let rank =
            crate::flatbuffer::max_add_mul_rank(&map).map_err(|m| EngineError::NotTflite {
                path: model_path.clone(),
                reason: m.what,
            })?;
        drop(map);
        let requested = options.accelerator;
        let unavailable = |reason: String| -> Result<(Runner, Accelerator), EngineError> {
            accelerator_unavailable(options.fallback, requested, reason)?;
            Ok((cpu_runner(&model_path, threads)?, Accelerator::Cpu))
        };
        let (runner, accelerator) = match requested {
            Accelerator::Cpu => (cpu_runner(&model_path, threads)?, Accelerator::Cpu),
            Accelerator::EdgeTpu => match edge_tpu_runner(&model_path, threads, library) {
                Ok(runner) => (runner, Accelerator::EdgeTpu),
                Err(e) => unavailable(e.to_string())?,
            },
            Accelerator::Gpu | Accelerator::Npu => unavailable(format!(
                "the classic TensorFlow Lite backend runs {requested} only through a delegate \
                 dermedge does not load; use the LiteRT backend"
            ))?,
        };
        let mismatch = |message: String| EngineError::TensorMismatch {
            manifest: manifest.path.clone(),
            model: model_path.clone(),
            message,
        };
        let input = runner.input().map_err(mismatch)?;
        let outputs = runner.outputs().map_err(mismatch)?;
        // tflitec names outputs by tensor; the manifest may use the signature's name for it.
        let output_index = known
            .iter()
            .position(|names| names.contains(&manifest.output.name))
            .filter(|&i| i < outputs.len())
            .ok_or_else(|| {
                mismatch(format!(
                    "no output named `{}` (the manifest's output.name); outputs: {known:?}",
                    manifest.output.name
                ))
            })?;
        let output = outputs[output_index].clone();
        check_against_manifest(manifest, &model_path, &input, &output)?;
        let version = runtime_version();
        if rank > 4 && !broadcasts_above_rank_4(&version) {
            // TensorFlow Lite 2.6 aborts the process inside Invoke on these; refuse up front.
            return Err(EngineError::Classic {
                path: model_path.clone(),
                message: format!(
                    "TensorFlow Lite {version} cannot run ADD/MUL with rank-{rank} broadcasting \
                     (GroupNorm layers export that way); use a libtensorflowlite_c newer than \
                     2.6, or the LiteRT backend"
                ),
            });
        }
        let input_quant = match input.quantization {
            Quantization::PerTensor { scale, zero_point } => {
                Some(QuantParams { scale, zero_point })
            }
            _ => None,
        };
        log::info!(
            "{}: {} {} on TensorFlow Lite {} (classic, {}, {} threads); input {}; output {}",
            model_path.display(),
            manifest.model.id,
            manifest.model.precision.as_str(),
            runtime_version(),
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
            output_index,
            threads,
            accelerator,
            runner,
            input_f32: Vec::new(),
            input_i8: Vec::new(),
            input_bytes: Vec::new(),
            output_bytes: Vec::new(),
        })
    }

    pub fn threads(&self) -> u32 {
        self.threads
    }

    /// The accelerator the model actually runs on (after any fallback).
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    pub fn input_details(&self) -> &TensorDetails {
        &self.input
    }

    pub fn output_details(&self) -> &TensorDetails {
        &self.output
    }

    fn error(&self, message: String) -> EmbedError {
        EmbedError::Backend {
            backend: self.backend(),
            message: format!("{}: {message}", self.model_path.display()),
        }
    }

    fn fill_input(&mut self, image: &RgbImage) -> Result<(), EmbedError> {
        let len = self.manifest.input_len();
        let bytes = &mut self.input_bytes;
        match self.manifest.input.dtype {
            TensorDtype::Float32 => {
                let values = &mut self.input_f32;
                values.resize(len, 0.0);
                self.preprocessor.run(image, InputBuffer::F32(values))?;
                bytes.clear();
                bytes.extend(values.iter().flat_map(|v| v.to_ne_bytes()));
            }
            TensorDtype::Uint8 => {
                bytes.resize(len, 0);
                self.preprocessor.run(image, InputBuffer::U8(bytes))?;
            }
            TensorDtype::Int8 => {
                let values = &mut self.input_i8;
                values.resize(len, 0);
                self.preprocessor.run(image, InputBuffer::I8(values))?;
                bytes.clear();
                bytes.extend(values.iter().map(|&v| v as u8));
            }
        }
        let bytes = std::mem::take(&mut self.input_bytes);
        let result = self.runner.write_input(&bytes);
        self.input_bytes = bytes;
        result.map_err(|m| self.error(m))
    }

    fn invoke(&mut self) -> Result<(), EmbedError> {
        self.runner.invoke().map_err(|m| self.error(m))
    }

    fn read_output(&mut self) -> Result<Vec<f32>, EmbedError> {
        let mut bytes = std::mem::take(&mut self.output_bytes);
        let result = self.runner.read_output(self.output_index, &mut bytes);
        let dim = self.manifest.model.embedding_dim;
        let values = self.output.dequantise(&bytes);
        self.output_bytes = bytes;
        result.map_err(|m| self.error(m))?;
        if values.len() != dim {
            return Err(self.error(format!(
                "output `{}` ({}) gave {} values, {dim} expected",
                self.output.name,
                self.output.dtype,
                values.len()
            )));
        }
        Ok(values)
    }
}

impl Embedder for ClassicEmbedder {
    fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    fn backend(&self) -> String {
        format!("tflite-classic/{}", self.accelerator)
    }

    fn runtime_description(&self) -> String {
        format!(
            "TensorFlow Lite {} (classic) {}, {} threads",
            runtime_version(),
            self.accelerator,
            self.threads
        )
    }

    fn embed(&mut self, image: &RgbImage) -> Result<Embedding, EmbedError> {
        self.fill_input(image)?;
        ClassicEmbedder::invoke(self)?;
        let values = self.read_output()?;
        Ok(Embedding {
            model_id: self.manifest.model.id.clone(),
            precision: self.manifest.model.precision,
            values,
        })
    }
}

impl crate::LoadedModel for ClassicEmbedder {
    /// The classic API runs the primary subgraph; it has no signature runner.
    fn signature_key(&self) -> &str {
        "(primary subgraph)"
    }
    fn input_details(&self) -> &TensorDetails {
        ClassicEmbedder::input_details(self)
    }
    fn output_details(&self) -> &TensorDetails {
        ClassicEmbedder::output_details(self)
    }
    fn accelerator(&self) -> Accelerator {
        ClassicEmbedder::accelerator(self)
    }
    fn threads(&self) -> u32 {
        ClassicEmbedder::threads(self)
    }
    fn cpu_arithmetic(&self) -> crate::CpuArithmetic {
        // The classic API runs TFLite's own kernels; check_options refuses fp16 for it.
        crate::CpuArithmetic::Fp32
    }
    fn fill_input(&mut self, image: &RgbImage) -> Result<(), EmbedError> {
        ClassicEmbedder::fill_input(self, image)
    }
    fn invoke(&mut self) -> Result<(), EmbedError> {
        ClassicEmbedder::invoke(self)
    }
    fn read_output(&mut self) -> Result<Vec<f32>, EmbedError> {
        ClassicEmbedder::read_output(self)
    }
}
