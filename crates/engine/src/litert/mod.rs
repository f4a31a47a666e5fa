//! The LiteRT 2.x backend: `libLiteRt.so` loaded at run time through its C API.

mod embedder;
mod ffi;
mod handles;
mod quiet;
mod runtime;
mod weight_cache;

pub use embedder::LiteRtEmbedder;
pub use runtime::{AcceleratorInfo, LiteRtRuntime, RuntimeLock, RuntimeReport};
