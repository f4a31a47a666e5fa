//! dermedge-engine: [`dermedge_core::Embedder`] implementations over TFLite runtimes.
//!
//! One module per runtime backend, each behind a cargo feature that only the binary chooses:
//! - `litert` (default): Google's LiteRT 2.x (`libLiteRt.so`, the successor of TensorFlow Lite,
//!   same `.tflite` format), loaded with `dlopen` at run time and verified against the pinned
//!   runtime lock, so a missing or wrong library is a clear error rather than a loader failure.
//!
//! Accelerators are values ([`Accelerator`]) with an explicit [`Fallback`]: a requested
//! accelerator that cannot be used falls back to CPU with a logged warning, unless the caller
//! asked for a hard failure.
//!
//! Depends on `dermedge-core` only.

mod accelerator;
mod check;
#[cfg(feature = "classic")]
pub mod classic;
mod error;
pub mod flatbuffer;
#[cfg(feature = "litert")]
pub mod litert;
mod options;
mod tensor;

pub use accelerator::{Accelerator, Fallback};
pub use error::EngineError;
pub use options::EngineOptions;
pub use tensor::{ElementType, Quantization, TensorDetails};

/// Load the model a manifest names with the runtime backend compiled in.
#[cfg(feature = "litert")]
pub fn load(
    manifest: &dermedge_core::ModelManifest,
    options: &EngineOptions,
) -> Result<litert::LiteRtEmbedder, EngineError> {
    litert::LiteRtEmbedder::load(manifest, options)
}
