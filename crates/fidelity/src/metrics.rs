//! The comparison itself.

use std::collections::BTreeMap;

use dermedge_head::{Classifier, LinearHead};
use serde::Serialize;

use crate::stats::{
    bootstrap_percentiles, spearman, Interval, Summary, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED,
};
use crate::FidelityError;

/// Neighbourhood size for the nearest-neighbour overlap.
pub const NEIGHBOURS: usize = 10;
/// A head whose most frequent class covers more than this share of the images says little:
/// agreement on it is near-certain whatever the candidate does.
pub const DEGENERATE_HEAD_SHARE: f64 = 0.9;

/// How many images the report names as the worst by each head-view metric.
pub const WORST_IMAGES: usize = 5;

/// Per-image values, kept for plots and the JSON report. `image[i]` names image `i`.
#[derive(Debug, Clone, Serialize)]
pub struct PerImage {
    pub image: Vec<String>,
    pub cosine: Vec<f64>,
    /// Head-view centred cosine `cos(P(c), P(r))` (see [`Comparison::centred_cosine`]).
    pub centred_cosine: Vec<f64>,
    /// Head-view relative error `‖P(c) − P(r)‖ / ‖P(r)‖`.
    pub head_view_delta: Vec<f64>,
    /// Cosine of the un-normalised embeddings after subtracting the reference set's mean.
    pub raw_centred_cosine: Vec<f64>,
    pub sqnr_db: Vec<f64>,
    pub relative_l2: Vec<f64>,
    pub norm_ratio: Vec<f64>,
    pub top10_overlap: Vec<f64>,
    pub self_retrieved: Vec<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PerDimension {
    /// Mean of (candidate - reference) per dimension.
    pub bias: Vec<f64>,
    pub bias_abs_max: f64,
    /// Largest |bias| divided by that dimension's standard deviation across reference images.
    pub bias_over_std_max: f64,
    pub zero_fraction_reference: Vec<f64>,
    pub zero_fraction_candidate: Vec<f64>,
    pub zero_fraction_reference_mean: f64,
    pub zero_fraction_candidate_mean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeadAgreement {
    pub head: String,
    pub classes: usize,
    pub top1_agreement: f64,
    pub max_probability_change: f64,
    pub probability_change: Summary,
    /// Share of images the head puts in its most frequent class (on reference embeddings).
    pub reference_top_class_share: f64,
    pub degenerate: bool,
}

/// Top-1 agreements of several heads on the same images: k-means heads at several k and seeds
/// (and any trained head given), so one unlucky clustering cannot make or break the number.
#[derive(Debug, Clone, Serialize)]
pub struct HeadEnsemble {
    pub heads: Vec<HeadAgreement>,
    /// Over the heads that are not degenerate (NaN when all are).
    pub min_top1_agreement: f64,
    pub mean_top1_agreement: f64,
}

impl HeadEnsemble {
    pub fn new(heads: Vec<HeadAgreement>) -> Self {
        let useful: Vec<f64> = heads
            .iter()
            .filter(|h| !h.degenerate)
            .map(|h| h.top1_agreement)
            .collect();
        let (min, mean) = if useful.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (
                useful.iter().cloned().fold(f64::INFINITY, f64::min),
                useful.iter().sum::<f64>() / useful.len() as f64,
            )
        };
        Self {
            heads,
            min_top1_agreement: min,
            mean_top1_agreement: mean,
        }
    }
}

/// How far `head`'s answers on `candidate` embeddings follow its answers on `reference` ones.
pub fn head_agreement(
    reference: &[Vec<f32>],
    candidate: &[Vec<f32>],
    h: &dyn Classifier,
) -> HeadAgreement {
    let n = reference.len().max(1);
    let pr: Vec<Vec<f32>> = reference.iter().map(|v| h.predict(v)).collect();
    let pc: Vec<Vec<f32>> = candidate.iter().map(|v| h.predict(v)).collect();
    let agree = pr
        .iter()
        .zip(&pc)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count() as f64
        / n as f64;
    let change: Vec<f64> = pr
        .iter()
        .zip(&pc)
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() as f64)
                .fold(0.0, f64::max)
        })
        .collect();
    let mut counts = vec![0usize; h.classes().len()];
    for p in &pr {
        counts[argmax(p)] += 1;
    }
    let share = *counts.iter().max().unwrap_or(&0) as f64 / n as f64;
    HeadAgreement {
        head: h.name().to_string(),
        classes: h.classes().len(),
        top1_agreement: agree,
        max_probability_change: change.iter().cloned().fold(0.0, f64::max),
        probability_change: Summary::of(&change),
        reference_top_class_share: share,
        degenerate: share > DEGENERATE_HEAD_SHARE,
    }
}

/// One image named in a worst-images list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorstImage {
    pub index: usize,
    pub image: String,
    pub value: f64,
}

/// The comparison of a candidate's embeddings with a reference's.
///
/// **Head view.** Every dermedge linear head L2-normalises an embedding and subtracts a mean
/// before its weights see it, so the directional metrics are taken in that view:
/// `P(x) = x/‖x‖ − m`, where `m` is the mean over the evaluation set of the L2-normalised
/// *reference* embeddings (`P(0) = −m`). A pure gain `c = g·r` (`g > 0`) leaves `P(c) = P(r)`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub images: usize,
    pub dim: usize,
    /// Raw cosine `cos(c, r)`.
    pub cosine: Summary,
    /// Head-view centred cosine `cos(P(c), P(r))` (gate `centred_cosine_p1`).
    pub centred_cosine: Summary,
    /// Head-view relative error `δ = ‖P(c) − P(r)‖ / ‖P(r)‖` (gate `head_view_delta_p99`).
    pub head_view_delta: Summary,
    /// Set-level probe SNR in dB: `10·log10(Σ‖P(r)‖² / Σ‖P(c) − P(r)‖²)`; for ranking candidates.
    pub probe_snr_db: f64,
    /// Cosine of the un-normalised embeddings, both centred on the reference set's raw mean. A
    /// gain change moves it; reported, not gated.
    pub raw_centred_cosine: Summary,
    /// SQNR of the un-normalised embeddings, `20·log10(‖r‖ / ‖r − c‖)`.
    pub sqnr_db: Summary,
    pub relative_l2: Summary,
    pub norm_ratio: Summary,
    /// Cosine between different images under the reference: the scale raw cosine must beat, and
    /// how hard the set is (median near 1: images hard to tell apart).
    pub reference_inter_image_cosine: Summary,
    /// Head-view centred cosine between different images under the reference.
    pub reference_inter_image_centred_cosine: Summary,
    pub self_retrieval: f64,
    pub top10_overlap: Summary,
    /// Expected top-10 overlap of a candidate unrelated to the reference: k/(n − 1).
    pub top10_overlap_chance: f64,
    pub pairwise_similarity_spearman: f64,
    pub head: Option<HeadAgreement>,
    /// Several heads' agreements, reported beside the gated `head` (set by the caller that
    /// trains them; `None` from [`compare`]).
    pub head_ensemble: Option<HeadEnsemble>,
    /// Percentile-bootstrap confidence intervals ([`crate::stats::bootstrap_percentile`]) of every
    /// per-image distribution's p1 and p99, keyed like the gates: `centred_cosine_p1`,
    /// `head_view_delta_p99`, `sqnr_db_p1`, ...
    pub confidence_intervals: BTreeMap<String, Interval>,
    /// The [`WORST_IMAGES`] images with the lowest head-view centred cosine, worst first.
    pub worst_centred_cosine: Vec<WorstImage>,
    /// The [`WORST_IMAGES`] images with the largest head-view δ, worst first.
    pub worst_head_view_delta: Vec<WorstImage>,
    pub per_dimension: PerDimension,
    pub per_image: PerImage,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

fn cos(a: &[f64], b: &[f64]) -> f64 {
    let d = norm(a) * norm(b);
    if d == 0.0 {
        0.0
    } else {
        dot(a, b) / d
    }
}

/// Indices of the `k` most similar rows to row `i` (excluding `i`).
fn neighbours(sim: &[Vec<f64>], i: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..sim.len()).filter(|&j| j != i).collect();
    idx.sort_by(|&a, &b| sim[i][b].total_cmp(&sim[i][a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn similarity(rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let norms: Vec<f64> = rows.iter().map(|r| norm(r)).collect();
    rows.iter()
        .enumerate()
        .map(|(i, a)| {
            rows.iter()
                .enumerate()
                .map(|(j, b)| dot(a, b) / (norms[i] * norms[j]).max(1e-300))
                .collect()
        })
        .collect()
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// L2-normalised copy of `v`; the zero vector stays zero.
fn normalised(v: &[f64]) -> Vec<f64> {
    let n = norm(v);
    if n == 0.0 {
        v.to_vec()
    } else {
        v.iter().map(|x| x / n).collect()
    }
}

/// The [`WORST_IMAGES`] images with the lowest (or highest) values, worst first, ties by index;
/// NaNs left out.
fn worst(values: &[f64], names: &[String], lowest: bool) -> Vec<WorstImage> {
    let mut idx: Vec<usize> = (0..values.len()).filter(|&i| !values[i].is_nan()).collect();
    idx.sort_by(|&a, &b| {
        let o = values[a].total_cmp(&values[b]);
        if lowest { o } else { o.reverse() }.then(a.cmp(&b))
    });
    idx.truncate(WORST_IMAGES);
    idx.into_iter()
        .map(|i| WorstImage {
            index: i,
            image: names[i].clone(),
            value: values[i],
        })
        .collect()
}

/// Compare candidate embeddings with reference embeddings of the same images (same order).
/// Images are named by their index (`#0`, `#1`, ...); [`compare_named`] takes their names.
pub fn compare(
    reference: &[Vec<f32>],
    candidate: &[Vec<f32>],
    head: Option<&LinearHead>,
) -> Result<Comparison, FidelityError> {
    let names: Vec<String> = (0..reference.len()).map(|i| format!("#{i}")).collect();
    compare_named(reference, candidate, &names, head)
}

/// [`compare`], with `names[i]` (a file path, say) naming image `i` in the per-image records and
/// the worst-images lists.
pub fn compare_named(
    reference: &[Vec<f32>],
    candidate: &[Vec<f32>],
    names: &[String],
    head: Option<&LinearHead>,
) -> Result<Comparison, FidelityError> {
    let n = reference.len();
    if n != candidate.len() {
        return Err(FidelityError::CountMismatch {
            reference: n,
            candidate: candidate.len(),
        });
    }
    if names.len() != n {
        return Err(FidelityError::NameCountMismatch {
            images: n,
            names: names.len(),
        });
    }
    if n < 3 {
        return Err(FidelityError::TooFewImages { needed: 3, got: n });
    }
    let dim = reference[0].len();
    if let Some(c) = candidate.iter().chain(reference).find(|c| c.len() != dim) {
        return Err(FidelityError::DimensionMismatch {
            reference: dim,
            candidate: c.len(),
        });
    }
    let r: Vec<Vec<f64>> = reference
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect();
    let c: Vec<Vec<f64>> = candidate
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect();
    let mean_of = |rows: &[Vec<f64>]| -> Vec<f64> {
        let mut mean = vec![0f64; dim];
        for row in rows {
            for (m, x) in mean.iter_mut().zip(row) {
                *m += x / n as f64;
            }
        }
        mean
    };
    let centre = |v: &Vec<f64>, mean: &[f64]| -> Vec<f64> {
        v.iter().zip(mean).map(|(x, m)| x - m).collect()
    };
    // Raw centring: un-normalised embeddings minus the reference set's raw mean.
    let mean = mean_of(&r);
    let rc: Vec<Vec<f64>> = r.iter().map(|v| centre(v, &mean)).collect();
    let cc: Vec<Vec<f64>> = c.iter().map(|v| centre(v, &mean)).collect();
    // Head view: P(x) = x/|x| - m, m the mean of the L2-normalised reference embeddings.
    let rn: Vec<Vec<f64>> = r.iter().map(|v| normalised(v)).collect();
    let head_mean = mean_of(&rn);
    let rp: Vec<Vec<f64>> = rn.iter().map(|v| centre(v, &head_mean)).collect();
    let cp: Vec<Vec<f64>> = c
        .iter()
        .map(|v| centre(&normalised(v), &head_mean))
        .collect();

    let mut per = PerImage {
        image: names.to_vec(),
        cosine: Vec::with_capacity(n),
        centred_cosine: Vec::with_capacity(n),
        head_view_delta: Vec::with_capacity(n),
        raw_centred_cosine: Vec::with_capacity(n),
        sqnr_db: Vec::with_capacity(n),
        relative_l2: Vec::with_capacity(n),
        norm_ratio: Vec::with_capacity(n),
        top10_overlap: Vec::with_capacity(n),
        self_retrieved: Vec::with_capacity(n),
    };
    let (mut probe_signal, mut probe_error) = (0f64, 0f64);
    for i in 0..n {
        let err: Vec<f64> = r[i].iter().zip(&c[i]).map(|(a, b)| a - b).collect();
        let (nr, ne) = (norm(&r[i]), norm(&err));
        per.cosine.push(cos(&r[i], &c[i]));
        per.raw_centred_cosine.push(cos(&rc[i], &cc[i]));
        per.sqnr_db.push(if ne == 0.0 {
            f64::INFINITY
        } else {
            20.0 * (nr / ne).log10()
        });
        per.relative_l2
            .push(if nr == 0.0 { f64::NAN } else { ne / nr });
        per.norm_ratio.push(if nr == 0.0 {
            f64::NAN
        } else {
            norm(&c[i]) / nr
        });
        let probe_err: Vec<f64> = cp[i].iter().zip(&rp[i]).map(|(a, b)| a - b).collect();
        let (signal, error) = (dot(&rp[i], &rp[i]), dot(&probe_err, &probe_err));
        probe_signal += signal;
        probe_error += error;
        per.centred_cosine.push(cos(&cp[i], &rp[i]));
        per.head_view_delta.push(if signal == 0.0 {
            f64::NAN
        } else {
            (error / signal).sqrt()
        });
    }
    let probe_snr_db = if probe_error == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (probe_signal / probe_error).log10()
    };

    let sim_r = similarity(&rc);
    let sim_c = similarity(&cc);
    let k = NEIGHBOURS.min(n - 1);
    let mut inter_raw = Vec::new();
    let mut inter_centred = Vec::new();
    let mut pairs_r = Vec::new();
    let mut pairs_c = Vec::new();
    for i in 0..n {
        let nr = neighbours(&sim_r, i, k);
        let nc = neighbours(&sim_c, i, k);
        per.top10_overlap
            .push(nr.iter().filter(|j| nc.contains(j)).count() as f64 / k as f64);
        // Nearest reference embedding to candidate i (centred cosine).
        let best = (0..n)
            .max_by(|&a, &b| {
                cos(&cc[i], &rc[a])
                    .total_cmp(&cos(&cc[i], &rc[b]))
                    .then(b.cmp(&a))
            })
            .unwrap_or(0);
        per.self_retrieved.push(best == i);
        for j in i + 1..n {
            inter_raw.push(cos(&r[i], &r[j]));
            inter_centred.push(cos(&rp[i], &rp[j]));
            pairs_r.push(sim_r[i][j]);
            pairs_c.push(sim_c[i][j]);
        }
    }

    let mut bias = vec![0f64; dim];
    let mut var = vec![0f64; dim];
    let mut zr = vec![0f64; dim];
    let mut zc = vec![0f64; dim];
    for i in 0..n {
        for d in 0..dim {
            bias[d] += (c[i][d] - r[i][d]) / n as f64;
            var[d] += rc[i][d].powi(2) / n as f64;
            zr[d] += (r[i][d] == 0.0) as u8 as f64 / n as f64;
            zc[d] += (c[i][d] == 0.0) as u8 as f64 / n as f64;
        }
    }
    let bias_abs_max = bias.iter().fold(0f64, |m, b| m.max(b.abs()));
    let bias_over_std_max = bias
        .iter()
        .zip(&var)
        .filter(|(_, v)| **v > 0.0)
        .fold(0f64, |m, (b, v)| m.max(b.abs() / v.sqrt()));

    let head = head.map(|h| head_agreement(reference, candidate, h));
    if let Some(h) = &head {
        if h.degenerate {
            log::warn!(
                "head `{}` puts {:.0}% of the images in one class: its agreement says little about fidelity",
                h.head,
                h.reference_top_class_share * 100.0
            );
        }
    }

    Ok(Comparison {
        images: n,
        dim,
        cosine: Summary::of(&per.cosine),
        centred_cosine: Summary::of(&per.centred_cosine),
        head_view_delta: Summary::of(&per.head_view_delta),
        probe_snr_db,
        raw_centred_cosine: Summary::of(&per.raw_centred_cosine),
        sqnr_db: Summary::of(&per.sqnr_db),
        relative_l2: Summary::of(&per.relative_l2),
        norm_ratio: Summary::of(&per.norm_ratio),
        reference_inter_image_cosine: Summary::of(&inter_raw),
        reference_inter_image_centred_cosine: Summary::of(&inter_centred),
        self_retrieval: per.self_retrieved.iter().filter(|&&b| b).count() as f64 / n as f64,
        top10_overlap: Summary::of(&per.top10_overlap),
        top10_overlap_chance: k as f64 / (n - 1) as f64,
        pairwise_similarity_spearman: spearman(&pairs_r, &pairs_c),
        head,
        head_ensemble: None,
        confidence_intervals: confidence_intervals(&per),
        worst_centred_cosine: worst(&per.centred_cosine, names, true),
        worst_head_view_delta: worst(&per.head_view_delta, names, false),
        per_dimension: PerDimension {
            bias_abs_max,
            bias_over_std_max,
            zero_fraction_reference_mean: zr.iter().sum::<f64>() / dim as f64,
            zero_fraction_candidate_mean: zc.iter().sum::<f64>() / dim as f64,
            bias,
            zero_fraction_reference: zr,
            zero_fraction_candidate: zc,
        },
        per_image: per,
    })
}

/// The per-image distributions, by the name their gate metrics start with.
fn distributions(per: &PerImage) -> [(&'static str, &[f64]); 8] {
    [
        ("cosine", &per.cosine),
        ("centred_cosine", &per.centred_cosine),
        ("head_view_delta", &per.head_view_delta),
        ("raw_centred_cosine", &per.raw_centred_cosine),
        ("sqnr_db", &per.sqnr_db),
        ("relative_l2", &per.relative_l2),
        ("norm_ratio", &per.norm_ratio),
        ("top10_overlap", &per.top10_overlap),
    ]
}

fn confidence_intervals(per: &PerImage) -> BTreeMap<String, Interval> {
    let mut out = BTreeMap::new();
    for (name, values) in distributions(per) {
        let cis = bootstrap_percentiles(values, &[0.01, 0.99], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED);
        for (stat, ci) in ["p1", "p99"].into_iter().zip(cis.into_iter().flatten()) {
            out.insert(format!("{name}_{stat}"), ci);
        }
    }
    out
}

impl Comparison {
    /// Every scalar a gate may name, e.g. `centred_cosine_p1`, `head_view_delta_p99`,
    /// `sqnr_db_p1`, `self_retrieval`.
    pub fn metric_values(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for (name, s) in [
            ("cosine", &self.cosine),
            ("centred_cosine", &self.centred_cosine),
            ("head_view_delta", &self.head_view_delta),
            ("raw_centred_cosine", &self.raw_centred_cosine),
            ("sqnr_db", &self.sqnr_db),
            ("relative_l2", &self.relative_l2),
            ("norm_ratio", &self.norm_ratio),
            ("top10_overlap", &self.top10_overlap),
        ] {
            for (stat, v) in [
                ("min", s.min),
                ("p1", s.p1),
                ("median", s.median),
                ("mean", s.mean),
                ("p99", s.p99),
                ("max", s.max),
            ] {
                m.insert(format!("{name}_{stat}"), v);
            }
        }
        m.insert("probe_snr_db".into(), self.probe_snr_db);
        m.insert("self_retrieval".into(), self.self_retrieval);
        m.insert(
            "pairwise_similarity_spearman".into(),
            self.pairwise_similarity_spearman,
        );
        m.insert(
            "bias_over_std_max".into(),
            self.per_dimension.bias_over_std_max,
        );
        if let Some(h) = &self.head {
            m.insert("head_agreement".into(), h.top1_agreement);
            m.insert(
                "head_max_probability_change".into(),
                h.max_probability_change,
            );
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::SplitMix64;

    fn embeddings(n: usize, dim: usize, seed: u32) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                (0..dim)
                    .map(|d| 1.0 + ((i * 131 + d * 17 + seed as usize) as f32 * 0.618).sin() * 0.3)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn identical_sets_are_perfect() {
        let r = embeddings(20, 32, 1);
        let c = compare(&r, &r, None).unwrap();
        assert!((c.cosine.min - 1.0).abs() < 1e-12 && (c.centred_cosine.min - 1.0).abs() < 1e-9);
        assert!((c.raw_centred_cosine.min - 1.0).abs() < 1e-9);
        assert_eq!(c.head_view_delta.max, 0.0);
        assert!(c.probe_snr_db.is_infinite() && c.probe_snr_db > 0.0);
        assert!(c.sqnr_db.min.is_infinite());
        assert_eq!(c.self_retrieval, 1.0);
        assert_eq!(c.top10_overlap.min, 1.0);
        assert!((c.pairwise_similarity_spearman - 1.0).abs() < 1e-12);
    }

    #[test]
    fn sqnr_and_centred_cosine_expose_what_raw_cosine_hides() {
        let r = embeddings(30, 64, 2);
        // A candidate that keeps the shared component but carries another image's specific part.
        let c: Vec<Vec<f32>> = (0..30).map(|i| r[(i + 7) % 30].clone()).collect();
        let cmp = compare(&r, &c, None).unwrap();
        assert!(
            cmp.cosine.median > 0.9,
            "raw cosine looks fine: {}",
            cmp.cosine.median
        );
        assert!(
            cmp.centred_cosine.median < 0.5,
            "centred cosine does not: {}",
            cmp.centred_cosine.median
        );
        assert!(cmp.sqnr_db.median < 20.0);
        assert!(cmp.self_retrieval < 0.5);
    }

    #[test]
    fn known_sqnr_for_known_noise() {
        let r = vec![vec![3.0f32, 4.0], vec![0.0, 5.0], vec![5.0, 0.0]];
        let c = vec![vec![3.0f32, 4.5], vec![0.0, 5.5], vec![5.5, 0.0]];
        let cmp = compare(&r, &c, None).unwrap();
        // |r| = 5, |r - c| = 0.5 -> 20 dB for every image.
        assert!((cmp.sqnr_db.median - 20.0).abs() < 1e-9);
        assert!((cmp.per_dimension.bias[1] - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let r = embeddings(5, 8, 1);
        assert!(matches!(
            compare(&r, &r[..4], None),
            Err(FidelityError::CountMismatch { .. })
        ));
        let c = embeddings(5, 9, 1);
        assert!(matches!(
            compare(&r, &c, None),
            Err(FidelityError::DimensionMismatch { .. })
        ));
        assert!(matches!(
            compare(&r[..2], &r[..2], None),
            Err(FidelityError::TooFewImages { .. })
        ));
        assert!(matches!(
            compare_named(&r, &r, &["a".to_string()], None),
            Err(FidelityError::NameCountMismatch {
                images: 5,
                names: 1
            })
        ));
    }

    /// Worked by hand in 2-d: m = (0, 1/3); image 0's candidate is (5, 5), a new direction at
    /// another length; the others are exact.
    #[test]
    fn head_view_values_by_hand() {
        let r = vec![vec![1.0f32, 0.0], vec![0.0, 1.0], vec![-1.0, 0.0]];
        let mut c = r.clone();
        c[0] = vec![5.0, 5.0];
        let cmp = compare(&r, &c, None).unwrap();
        let s = std::f64::consts::FRAC_1_SQRT_2;
        // P(r0) = (1, -1/3), P(c0) = (s, s - 1/3), |P(c0) - P(r0)|^2 = (s - 1)^2 + s^2 = 2 - 2s.
        let pr2 = 10.0 / 9.0;
        let pc2 = 10.0 / 9.0 - 2.0 * s / 3.0;
        let dot = 2.0 * s / 3.0 + 1.0 / 9.0;
        let per = &cmp.per_image;
        assert!((per.centred_cosine[0] - dot / (pr2 * pc2).sqrt()).abs() < 1e-6);
        assert!((per.head_view_delta[0] - ((2.0 - 2.0 * s) / pr2).sqrt()).abs() < 1e-6);
        assert_eq!(&per.head_view_delta[1..], &[0.0, 0.0]);
        // sum |P(r)|^2 = 10/9 + 4/9 + 10/9 = 8/3.
        let probe = 10.0 * ((8.0 / 3.0) / (2.0 - 2.0 * s)).log10();
        assert!(
            (cmp.probe_snr_db - probe).abs() < 1e-5,
            "{}",
            cmp.probe_snr_db
        );
        assert_eq!(cmp.worst_centred_cosine[0].image, "#0");
        assert_eq!(cmp.worst_head_view_delta[0].index, 0);
        assert_eq!(cmp.top10_overlap_chance, 1.0);
    }

    /// Deterministic stand-ins for real embeddings: a large common component shared by every
    /// image (~99 % of the energy, raw cosine between different images ~0.99), an image-specific
    /// part, and a per-image length.
    struct Synthetic {
        reference: Vec<Vec<f32>>,
        rng: SplitMix64,
    }

    fn gaussian(rng: &mut SplitMix64) -> f64 {
        let u = 1.0 - rng.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * rng.unit()).cos()
    }

    fn synthetic() -> Synthetic {
        let (n, dim) = (200, 64);
        let mut rng = SplitMix64::new(0xde7e);
        let common: Vec<f64> = (0..dim).map(|_| 1.0 + 0.5 * rng.unit()).collect();
        let reference = (0..n)
            .map(|_| {
                let gain = 0.8 + 0.45 * rng.unit();
                common
                    .iter()
                    .map(|m| (gain * (m + 0.12 * gaussian(&mut rng))) as f32)
                    .collect()
            })
            .collect();
        Synthetic { reference, rng }
    }

    fn head_view_gates() -> crate::Gates {
        let mut gates = crate::Gates::default_gates();
        gates
            .gates
            .retain(|name, _| name == "centred_cosine_p1" || name == "head_view_delta_p99");
        assert_eq!(
            gates.gates.len(),
            2,
            "both head-view gates are default gates"
        );
        gates
    }

    /// (centred_cosine_p1 passes, head_view_delta_p99 passes) under the default thresholds.
    fn head_view_verdict(cmp: &Comparison) -> (bool, bool) {
        let results = head_view_gates().evaluate(cmp, "default").unwrap();
        let pass = |name: &str| results.iter().find(|g| g.gate == name).unwrap().pass;
        (pass("centred_cosine_p1"), pass("head_view_delta_p99"))
    }

    fn norm32(v: &[f32]) -> f64 {
        v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn synthetic_set_looks_like_real_embeddings() {
        let s = synthetic();
        let cmp = compare(&s.reference, &s.reference, None).unwrap();
        let inter = cmp.reference_inter_image_cosine.median;
        assert!(inter > 0.98 && inter < 0.995, "{inter}");
        assert!(cmp.reference_inter_image_centred_cosine.median.abs() < 0.05);
        assert!((cmp.top10_overlap_chance - 10.0 / 199.0).abs() < 1e-12);
    }

    #[test]
    fn pure_gain_passes_the_head_view_gates() {
        let s = synthetic();
        let c: Vec<Vec<f32>> = s
            .reference
            .iter()
            .map(|v| v.iter().map(|x| x * 0.86).collect())
            .collect();
        let cmp = compare(&s.reference, &c, None).unwrap();
        assert_eq!(head_view_verdict(&cmp), (true, true));
        assert!(cmp.centred_cosine.min > 0.99999, "{:?}", cmp.centred_cosine);
        assert!(cmp.head_view_delta.max < 1e-4, "{:?}", cmp.head_view_delta);
        assert!(cmp.probe_snr_db > 80.0, "{}", cmp.probe_snr_db);
        // The un-normalised view calls the same gain a direction change and a 17 dB error.
        assert!(
            cmp.raw_centred_cosine.p1 < 0.8,
            "{:?}",
            cmp.raw_centred_cosine
        );
        assert!((cmp.sqnr_db.median - 20.0 * (1.0f64 / 0.14).log10()).abs() < 1e-3);
        assert!((cmp.norm_ratio.median - 0.86).abs() < 1e-6);
    }

    #[test]
    fn common_offset_fails_the_head_view_gates() {
        let mut s = synthetic();
        let dim = s.reference[0].len();
        let mut offset: Vec<f64> = (0..dim).map(|_| gaussian(&mut s.rng)).collect();
        // As large as 26 dB noise on an image of median length.
        let mut lengths: Vec<f64> = s.reference.iter().map(|v| norm32(v)).collect();
        lengths.sort_by(f64::total_cmp);
        let scale = lengths[lengths.len() / 2] * 10f64.powf(-26.0 / 20.0) / norm(&offset);
        offset.iter_mut().for_each(|o| *o *= scale);
        let c: Vec<Vec<f32>> = s
            .reference
            .iter()
            .map(|v| v.iter().zip(&offset).map(|(x, o)| x + *o as f32).collect())
            .collect();
        let cmp = compare(&s.reference, &c, None).unwrap();
        assert_eq!(head_view_verdict(&cmp), (false, false));
        assert!(cmp.centred_cosine.p1 < 0.9, "{:?}", cmp.centred_cosine);
        assert!(cmp.head_view_delta.p99 > 0.5, "{:?}", cmp.head_view_delta);
        // SQNR alone would let it through.
        assert!(cmp.sqnr_db.p1 > 20.0, "{:?}", cmp.sqnr_db);
    }

    #[test]
    fn isotropic_noise_at_26_db_fails_the_head_view_gates() {
        let mut s = synthetic();
        let c: Vec<Vec<f32>> = s
            .reference
            .iter()
            .map(|v| {
                let noise: Vec<f64> = v.iter().map(|_| gaussian(&mut s.rng)).collect();
                let scale = norm32(v) * 10f64.powf(-26.0 / 20.0) / norm(&noise);
                v.iter()
                    .zip(&noise)
                    .map(|(x, e)| x + (e * scale) as f32)
                    .collect()
            })
            .collect();
        let cmp = compare(&s.reference, &c, None).unwrap();
        assert!(
            (cmp.sqnr_db.median - 26.0).abs() < 0.01,
            "{:?}",
            cmp.sqnr_db
        );
        assert!(
            cmp.sqnr_db.p1 > 25.9,
            "passes the raw SQNR gate: {:?}",
            cmp.sqnr_db
        );
        assert_eq!(head_view_verdict(&cmp), (false, false));
        assert!(cmp.centred_cosine.p1 < 0.9, "{:?}", cmp.centred_cosine);
        assert!(cmp.head_view_delta.p99 > 0.5, "{:?}", cmp.head_view_delta);
        assert!(cmp.probe_snr_db < 10.0, "{}", cmp.probe_snr_db);
    }

    #[test]
    fn shrunken_image_specific_part_fails_the_head_view_gates() {
        let s = synthetic();
        let n = s.reference.len() as f64;
        let dim = s.reference[0].len();
        let mean: Vec<f64> = (0..dim)
            .map(|d| s.reference.iter().map(|v| v[d] as f64).sum::<f64>() / n)
            .collect();
        let c: Vec<Vec<f32>> = s
            .reference
            .iter()
            .map(|v| {
                v.iter()
                    .zip(&mean)
                    .map(|(&x, m)| (m + 0.5 * (x as f64 - m)) as f32)
                    .collect()
            })
            .collect();
        let cmp = compare(&s.reference, &c, None).unwrap();
        // The direction survives, its size does not: only δ sees it.
        assert!(
            cmp.raw_centred_cosine.min > 0.9999,
            "{:?}",
            cmp.raw_centred_cosine
        );
        assert!(
            (cmp.head_view_delta.median - 0.5).abs() < 0.05,
            "{:?}",
            cmp.head_view_delta
        );
        assert!(cmp.head_view_delta.p99 > 0.45, "{:?}", cmp.head_view_delta);
        assert!(!head_view_verdict(&cmp).1);
        assert!(
            (cmp.probe_snr_db - 20.0 * 2f64.log10()).abs() < 0.5,
            "{}",
            cmp.probe_snr_db
        );
    }

    #[test]
    fn worst_images_are_named_and_intervals_bracket_the_gated_values() {
        let mut s = synthetic();
        let names: Vec<String> = (0..s.reference.len())
            .map(|i| format!("evaluation/img-{i:03}.png"))
            .collect();
        let mut c = s.reference.clone();
        // Image 17 loses its image-specific part entirely, image 3 half of it, image 120 a bit.
        let dim = c[0].len();
        let mean: Vec<f32> = (0..dim)
            .map(|d| s.reference.iter().map(|v| v[d]).sum::<f32>() / s.reference.len() as f32)
            .collect();
        for (i, keep) in [(17, 0.0f32), (3, 0.5), (120, 0.8)] {
            c[i] = c[i]
                .iter()
                .zip(&mean)
                .map(|(x, m)| m + keep * (x - m))
                .collect();
        }
        // Image 42 turns towards another image.
        c[42] = s.reference[43].clone();
        for v in c.iter_mut() {
            for x in v.iter_mut() {
                *x += 1e-4 * gaussian(&mut s.rng) as f32;
            }
        }
        let cmp = compare_named(&s.reference, &c, &names, None).unwrap();
        assert_eq!(cmp.per_image.image[17], "evaluation/img-017.png");
        let by_cos: Vec<usize> = cmp.worst_centred_cosine.iter().map(|w| w.index).collect();
        // Both lost their direction (cosine near 0); which is lower is up to the added noise.
        let mut first_two = by_cos[..2].to_vec();
        first_two.sort();
        assert_eq!(first_two, [17, 42], "{:?}", cmp.worst_centred_cosine);
        assert!(cmp.worst_centred_cosine[1].value < 0.1);
        assert!(cmp
            .worst_centred_cosine
            .windows(2)
            .all(|w| w[0].value <= w[1].value));
        let by_delta: Vec<&str> = cmp
            .worst_head_view_delta
            .iter()
            .map(|w| w.image.as_str())
            .collect();
        assert_eq!(by_delta.len(), WORST_IMAGES);
        assert_eq!(
            &by_delta[..4],
            &[
                "evaluation/img-042.png",
                "evaluation/img-017.png",
                "evaluation/img-003.png",
                "evaluation/img-120.png"
            ],
            "{:?}",
            cmp.worst_head_view_delta
        );
        let w = &cmp.worst_head_view_delta[2];
        assert_eq!(w.value, cmp.per_image.head_view_delta[3]);
        assert!((w.value - 0.5).abs() < 0.05, "{w:?}");
        for (name, value) in [
            ("centred_cosine_p1", cmp.centred_cosine.p1),
            ("head_view_delta_p99", cmp.head_view_delta.p99),
            ("sqnr_db_p1", cmp.sqnr_db.p1),
        ] {
            let ci = cmp.confidence_intervals[name];
            assert!(
                ci.contains(value) && ci.lo < ci.hi,
                "{name}: {value} {ci:?}"
            );
        }
        // The same inputs give the same intervals.
        let again = compare_named(&s.reference, &c, &names, None).unwrap();
        assert_eq!(again.confidence_intervals, cmp.confidence_intervals);
    }

    #[test]
    fn the_head_ensemble_leaves_degenerate_heads_out_of_its_min_and_mean() {
        let agreement = |top1: f64, degenerate: bool| HeadAgreement {
            head: format!("h{top1}"),
            classes: 2,
            top1_agreement: top1,
            max_probability_change: 0.0,
            probability_change: Summary::of(&[0.0]),
            reference_top_class_share: if degenerate { 0.95 } else { 0.5 },
            degenerate,
        };
        let e = HeadEnsemble::new(vec![
            agreement(0.9, false),
            agreement(0.7, false),
            agreement(0.1, true),
        ]);
        assert_eq!(e.heads.len(), 3);
        assert_eq!(e.min_top1_agreement, 0.7);
        assert!((e.mean_top1_agreement - 0.8).abs() < 1e-12);
        assert!(HeadEnsemble::new(vec![agreement(0.5, true)])
            .mean_top1_agreement
            .is_nan());
    }
}
