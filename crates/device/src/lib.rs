//! dermedge-device: what the device does with a frame, and (with the configuration) when.
//!
//! [`pipeline::Pipeline`] turns one frame into a queued [`dermedge_record::Record`]: quality gate,
//! embedding, every configured head, a small JPEG thumbnail. It knows the model only through the
//! [`dermedge_core::Embedder`] contract, so any backend plugs in.
//!
//! [`config`] is the per-device TOML (`firmware-config/`), [`run::run`] the capture loop: an
//! explicit state machine over a frame source ([`source`]), a trigger ([`trigger`]), the pipeline,
//! the queue, background sync and a screen output ([`screens`]).

pub mod config;
pub mod dev_hub;
pub mod hub_heads;
pub mod pipeline;
pub mod run;
pub mod screens;
pub mod source;
pub mod trigger;

pub use pipeline::{Outcome, Pipeline, PipelineError, PipelineOptions};
