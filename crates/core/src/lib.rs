//! dermedge-core: the small contract every other dermedge crate builds on.
//!
//! It holds the domain types ([`Embedding`]), the [`Embedder`] trait that runtime backends
//! implement, the model [`manifest`] that describes a `.tflite` file and the preprocessing its
//! input needs, the [`preprocess`] code that turns image files into model input tensors, frames and
//! the [`FrameSource`] trait, the image-[`quality`] gate, and the range checks ([`bounds`]) for
//! numbers read from files.
//!
//! It depends on no runtime, camera or storage crate; it does no I/O beyond reading the files it
//! is asked to read.

pub mod bounds;
pub mod embedder;
pub mod embedding;
pub mod frame;
pub mod manifest;
pub mod memory;
pub mod npy;
pub mod preprocess;
pub mod quality;
pub mod runtime;

pub use bounds::{Bounds, OutOfBounds, Ranged, RangedFloat};
pub use embedder::{EmbedError, Embedder};
pub use embedding::Embedding;
pub use frame::{Frame, FrameSource, SourceError};
pub use manifest::{
    sha256_hex, Companion, CompanionFile, FidelityRecord, FidelityVerdict, GateValue,
    ManifestError, ModelManifest, Precision, TensorDtype,
};
pub use preprocess::{DecodeError, DecodeLimits, InputBuffer, Preprocessor, QuantParams};
pub use quality::{QualityIssue, QualityThresholds, QualityVerdict};
pub use runtime::{Accelerator, Backend, CpuArithmetic, Fallback};

/// RGB8 image, any size: what frame sources produce and preprocessing consumes.
pub type RgbImage = image::RgbImage;
