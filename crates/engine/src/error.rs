//! Errors of the engine: runtime library problems, model/manifest disagreements, runtime calls.

use std::path::PathBuf;

use dermedge_core::ManifestError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "LiteRT {version} runtime (libLiteRt.so) not found; searched: {searched}. \
         Fetch it with `scripts/fetch-litert.py`, or point DERMEDGE_LITERT_LIB at the library"
    )]
    RuntimeNotFound { version: String, searched: String },
    #[error(
        "{path}: not the pinned LiteRT {expected_version} runtime for {target}: sha256 {actual}, \
         expected {expected}. Re-fetch it with `scripts/fetch-litert.py`, or allow an unpinned \
         runtime explicitly"
    )]
    RuntimeMismatch {
        path: PathBuf,
        target: String,
        expected_version: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: cannot load as the LiteRT {expected_version} runtime: {message}")]
    RuntimeLoad {
        path: PathBuf,
        expected_version: String,
        message: String,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{manifest}: output.correction.file {file}: {message}")]
    Correction {
        manifest: PathBuf,
        file: PathBuf,
        message: String,
    },
    #[error("{path}: not a TFLite model: {reason}")]
    NotTflite { path: PathBuf, reason: String },
    #[error("{path}: LiteRT {call} failed: {message} (status {status})")]
    Runtime {
        path: PathBuf,
        call: &'static str,
        status: i32,
        message: String,
    },
    #[error("{path}: TensorFlow Lite (classic) failed: {message}")]
    Classic { path: PathBuf, message: String },
    #[error("{manifest}: the manifest disagrees with model {model}: {message}")]
    TensorMismatch {
        manifest: PathBuf,
        model: PathBuf,
        message: String,
    },
    #[error("accelerator {requested} unavailable: {reason} (fallback policy is `fail`)")]
    AcceleratorUnavailable { requested: String, reason: String },
    #[error(
        "backend {backend} is not built into this dermedge: rebuild with cargo feature `{feature}` \
         (see docs/ACCELERATORS.md)"
    )]
    BackendNotBuilt {
        backend: &'static str,
        feature: &'static str,
    },
    #[error(
        "backend {backend} cannot reach accelerator {accelerator}: use backend = \"{other}\" \
         (cargo feature `{feature}`)"
    )]
    AcceleratorNotOffered {
        backend: &'static str,
        accelerator: &'static str,
        other: &'static str,
        feature: &'static str,
    },
    #[error("option `{field}`: {message}")]
    InvalidOption {
        field: &'static str,
        message: String,
    },
}
