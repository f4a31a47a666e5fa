//! dermedge-fidelity: is a candidate model (int8, another runtime, another thread count) faithful
//! to a reference model? Compares two sets of embeddings of the same images and reports:
//!
//! - per image, in the **head view** `P(x) = x/‖x‖ − m` (`m`: mean of the L2-normalised reference
//!   embeddings), which is what a dermedge linear head sees: the centred cosine `cos(P(c), P(r))`
//!   and the relative error `δ = ‖P(c) − P(r)‖ / ‖P(r)‖`, next to the same cosine between
//!   *different* images under the reference (raw cosine alone misleads when all embeddings share a
//!   large common component, and a pure gain change is invisible to a head);
//! - per image on the un-normalised embeddings: cosine, centred cosine, SQNR (dB), relative L2
//!   error, norm ratio;
//! - per set: the probe SNR `10·log10(Σ‖P(r)‖² / Σ‖P(c) − P(r)‖²)` for ranking candidates, and
//!   the five worst images by head-view centred cosine and by `δ`;
//! - per dimension: mean signed error (bias) and the fraction of exact zeros in each model;
//! - neighbourhoods: self-retrieval, top-10 nearest-neighbour overlap, Spearman correlation of
//!   pairwise similarities (all on centred embeddings);
//! - downstream: top-1 agreement and probability change of a linear head trained on the reference.
//!
//! Every distribution is summarised by median, p1, p99 and minimum, never only a mean; p1 and p99
//! come with seeded percentile-bootstrap confidence intervals. [`gates`] holds the named
//! thresholds (`min` and/or `max`); [`report`] writes JSON, Markdown and SVG plots.
//!
//! Depends on `dermedge-head`.

pub mod gates;
pub mod metrics;
pub mod report;
pub mod stats;

pub use gates::{GateResult, Gates};
pub use metrics::{
    compare, compare_named, head_agreement, Comparison, HeadAgreement, HeadEnsemble, WorstImage,
};
pub use stats::{Interval, Summary};

#[derive(Debug, thiserror::Error)]
pub enum FidelityError {
    #[error("reference has {reference} embeddings and candidate {candidate}; both must embed the same images")]
    CountMismatch { reference: usize, candidate: usize },
    #[error("reference embeddings are {reference}-d and candidate {candidate}-d; compare models of the same embedding dimension")]
    DimensionMismatch { reference: usize, candidate: usize },
    #[error("{images} images but {names} names; name every image once")]
    NameCountMismatch { images: usize, names: usize },
    #[error("need at least {needed} images to compare neighbourhoods; got {got}")]
    TooFewImages { needed: usize, got: usize },
    #[error("{path}: {message}")]
    Gates { path: String, message: String },
    #[error(transparent)]
    Head(#[from] dermedge_head::HeadError),
    #[error("{path}: cannot write report: {cause}")]
    Write { path: String, cause: std::io::Error },
}
