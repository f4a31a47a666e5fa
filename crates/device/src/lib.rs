//! dermedge-device: what the device does with a frame, and (with the configuration) when.
//!
//! [`pipeline::Pipeline`] turns one frame into a queued [`dermedge_queue::Record`]: quality gate,
//! embedding, every configured head, a small JPEG thumbnail. It knows the model only through the
//! [`dermedge_core::Embedder`] contract, so any backend (and any test double) plugs in.

pub mod pipeline;

pub use pipeline::{Outcome, Pipeline, PipelineError, PipelineOptions};
