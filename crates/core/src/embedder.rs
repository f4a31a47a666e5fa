//! The contract between the device loop and a runtime backend.

use crate::{manifest::ModelManifest, preprocess::DecodeError, Embedding, RgbImage};

/// Turns an image into an embedding. Implemented by each runtime backend in `dermedge-engine`.
pub trait Embedder {
    /// The manifest the model was loaded with.
    fn manifest(&self) -> &ModelManifest;

    /// Short name of the backend and accelerator actually in use, e.g. `litert/cpu`.
    fn backend(&self) -> String;

    /// The runtime, its version, the accelerator and threads in use, for records and reports,
    /// e.g. `LiteRT 2.1.4 cpu, 2 threads`.
    fn runtime_description(&self) -> String {
        self.backend()
    }

    /// Preprocess `image` (any size) as the manifest says and run the model on it.
    fn embed(&mut self, image: &RgbImage) -> Result<Embedding, EmbedError>;
}

/// Why an embedding could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("{backend}: {message}")]
    Backend { backend: String, message: String },
}
