//! dermedge-engine: [`dermedge_core::Embedder`] implementations over TFLite runtimes.
//!
//! [`load`] is the one way to load a model: it picks the backend [`EngineOptions::backend`]
//! names, refuses one this build lacks (naming the cargo feature), and applies the accelerator
//! and fallback policy. One module per runtime backend, each behind a cargo feature:
//! - `litert` (default): Google's LiteRT 2.x (`libLiteRt.so`, the successor of TensorFlow Lite,
//!   same `.tflite` format), loaded with `dlopen` at run time and verified against the pinned
//!   runtime lock, so a missing or wrong library is a clear error rather than a loader failure.
//!
//! A manifest's `[output.correction]` (a per-dimension affine map fitted by the exporter) is
//! applied here too, once for every backend.
//!
//! Accelerators are values ([`Accelerator`]) with an explicit [`Fallback`]: a requested
//! accelerator that cannot be used falls back to CPU with a logged warning, unless the caller
//! asked for a hard failure.
//!
//! Depends on `dermedge-core` only.

#[cfg(not(any(feature = "litert", feature = "classic")))]
compile_error!("dermedge-engine needs a runtime backend: enable the `litert` or `classic` feature");

mod backend;
mod check;
#[cfg(feature = "classic")]
pub mod classic;
mod correction;
mod error;
pub mod flatbuffer;
#[cfg(feature = "litert")]
pub mod litert;
mod options;
mod tensor;

pub use backend::{check_options, is_built, load, LoadedModel};
pub use correction::OutputCorrection;
pub use dermedge_core::runtime::{Accelerator, Backend, CpuArithmetic, Fallback};
pub use error::EngineError;
pub use options::EngineOptions;
pub use tensor::{ElementType, Quantization, TensorDetails};
