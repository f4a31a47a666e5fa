//! dermedge-fidelity: is a candidate model (int8, another runtime, another thread count) faithful
//! to a reference model? Compares two sets of embeddings of the same images and reports:
//!
//! - per image: cosine, SQNR (dB), relative L2 error, norm ratio; and the cosine **after centring**
//!   on the reference set's mean, next to the cosine between *different* images under the
//!   reference (raw cosine alone misleads when all embeddings share a large common component);
//! - per dimension: mean signed error (bias) and the fraction of exact zeros in each model;
//! - neighbourhoods: self-retrieval, top-10 nearest-neighbour overlap, Spearman correlation of
//!   pairwise similarities (all on centred embeddings);
//! - downstream: top-1 agreement and probability change of a linear head trained on the reference.
//!
//! Every distribution is summarised by median, p1 and minimum, never only a mean. [`gates`] holds
//! the named thresholds; [`report`] writes JSON, Markdown and SVG plots.
//!
//! Depends on `dermedge-head`.

pub mod gates;
pub mod metrics;
pub mod report;
pub mod stats;

pub use gates::{GateResult, Gates};
pub use metrics::{compare, Comparison, HeadAgreement};
pub use stats::Summary;

#[derive(Debug, thiserror::Error)]
pub enum FidelityError {
    #[error("reference has {reference} embeddings and candidate {candidate}; both must embed the same images")]
    CountMismatch { reference: usize, candidate: usize },
    #[error("reference embeddings are {reference}-d and candidate {candidate}-d; compare models of the same embedding dimension")]
    DimensionMismatch { reference: usize, candidate: usize },
    #[error("need at least {needed} images to compare neighbourhoods; got {got}")]
    TooFewImages { needed: usize, got: usize },
    #[error("{path}: {message}")]
    Gates { path: String, message: String },
    #[error(transparent)]
    Head(#[from] dermedge_head::HeadError),
    #[error("{path}: cannot write report: {cause}")]
    Write { path: String, cause: std::io::Error },
}
