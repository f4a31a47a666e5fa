//! The comparison itself.

use std::collections::BTreeMap;

use dermedge_head::LinearHead;
use serde::Serialize;

use crate::stats::{spearman, Summary};
use crate::FidelityError;

/// Neighbourhood size for the nearest-neighbour overlap.
pub const NEIGHBOURS: usize = 10;
/// A head whose most frequent class covers more than this share of the images says little:
/// agreement on it is near-certain whatever the candidate does.
pub const DEGENERATE_HEAD_SHARE: f64 = 0.9;

/// Per-image values, kept for plots and the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct PerImage {
    pub cosine: Vec<f64>,
    pub centred_cosine: Vec<f64>,
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

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub images: usize,
    pub dim: usize,
    pub cosine: Summary,
    pub centred_cosine: Summary,
    pub sqnr_db: Summary,
    pub relative_l2: Summary,
    pub norm_ratio: Summary,
    /// Cosine between different images under the reference: the scale raw cosine must beat.
    pub reference_inter_image_cosine: Summary,
    pub reference_inter_image_centred_cosine: Summary,
    pub self_retrieval: f64,
    pub top10_overlap: Summary,
    pub pairwise_similarity_spearman: f64,
    pub head: Option<HeadAgreement>,
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

/// Compare candidate embeddings with reference embeddings of the same images (same order).
pub fn compare(
    reference: &[Vec<f32>],
    candidate: &[Vec<f32>],
    head: Option<&LinearHead>,
) -> Result<Comparison, FidelityError> {
    let n = reference.len();
    if n != candidate.len() {
        return Err(FidelityError::CountMismatch {
            reference: n,
            candidate: candidate.len(),
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
    let mut mean = vec![0f64; dim];
    for row in &r {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x / n as f64;
        }
    }
    let centre = |v: &Vec<f64>| -> Vec<f64> { v.iter().zip(&mean).map(|(x, m)| x - m).collect() };
    let rc: Vec<Vec<f64>> = r.iter().map(centre).collect();
    let cc: Vec<Vec<f64>> = c.iter().map(centre).collect();

    let mut per = PerImage {
        cosine: Vec::with_capacity(n),
        centred_cosine: Vec::with_capacity(n),
        sqnr_db: Vec::with_capacity(n),
        relative_l2: Vec::with_capacity(n),
        norm_ratio: Vec::with_capacity(n),
        top10_overlap: Vec::with_capacity(n),
        self_retrieved: Vec::with_capacity(n),
    };
    for i in 0..n {
        let err: Vec<f64> = r[i].iter().zip(&c[i]).map(|(a, b)| a - b).collect();
        let (nr, ne) = (norm(&r[i]), norm(&err));
        per.cosine.push(cos(&r[i], &c[i]));
        per.centred_cosine.push(cos(&rc[i], &cc[i]));
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
    }

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
            inter_centred.push(sim_r[i][j]);
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

    let head = head.map(|h| {
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
        let mut counts = vec![0usize; h.classes.len()];
        for p in &pr {
            counts[argmax(p)] += 1;
        }
        let share = *counts.iter().max().unwrap_or(&0) as f64 / n as f64;
        HeadAgreement {
            head: h.name.clone(),
            classes: h.classes.len(),
            top1_agreement: agree,
            max_probability_change: change.iter().cloned().fold(0.0, f64::max),
            probability_change: Summary::of(&change),
            reference_top_class_share: share,
            degenerate: share > DEGENERATE_HEAD_SHARE,
        }
    });
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
        sqnr_db: Summary::of(&per.sqnr_db),
        relative_l2: Summary::of(&per.relative_l2),
        norm_ratio: Summary::of(&per.norm_ratio),
        reference_inter_image_cosine: Summary::of(&inter_raw),
        reference_inter_image_centred_cosine: Summary::of(&inter_centred),
        self_retrieval: per.self_retrieved.iter().filter(|&&b| b).count() as f64 / n as f64,
        top10_overlap: Summary::of(&per.top10_overlap),
        pairwise_similarity_spearman: spearman(&pairs_r, &pairs_c),
        head,
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

impl Comparison {
    /// Every scalar a gate may name, e.g. `centred_cosine_p1`, `sqnr_db_p1`, `self_retrieval`.
    pub fn metric_values(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for (name, s) in [
            ("cosine", &self.cosine),
            ("centred_cosine", &self.centred_cosine),
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
                ("max", s.max),
            ] {
                m.insert(format!("{name}_{stat}"), v);
            }
        }
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
    }
}
