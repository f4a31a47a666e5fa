//! Distribution summaries and their bootstrap confidence intervals.

use serde::Serialize;

/// Resamples of the percentile bootstrap behind every confidence interval.
pub const BOOTSTRAP_RESAMPLES: usize = 1000;
/// Seed of the bootstrap's resampling: the same inputs always give the same interval.
pub const BOOTSTRAP_SEED: u64 = 0x5eed_f1de_1172;
/// Coverage of the reported confidence intervals.
pub const CONFIDENCE_LEVEL: f64 = 0.95;

/// Median, p1 and minimum (plus mean, p99 and max) of a set of values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p1: f64,
    pub median: f64,
    pub mean: f64,
    pub p99: f64,
    pub max: f64,
}

/// A confidence interval `[lo, hi]` for a statistic.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    pub fn contains(&self, v: f64) -> bool {
        self.lo <= v && v <= self.hi
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:.4}, {:.4}]", self.lo, self.hi)
    }
}

impl Summary {
    pub fn of(values: &[f64]) -> Summary {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Summary {
                n: 0,
                min: f64::NAN,
                p1: f64::NAN,
                median: f64::NAN,
                mean: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        Summary {
            n: v.len(),
            min: v[0],
            p1: percentile(&v, 0.01),
            median: percentile(&v, 0.5),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p99: percentile(&v, 0.99),
            max: v[v.len() - 1],
        }
    }
}

/// Linear-interpolated percentile of sorted values (NumPy's default).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    if sorted[lo] == sorted[hi] {
        return sorted[lo]; // also for infinities, where interpolation would give NaN
    }
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Spearman rank correlation (average ranks for ties).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma).powi(2);
        vb += (y - mb).powi(2);
    }
    if va == 0.0 || vb == 0.0 {
        return 0.0;
    }
    cov / (va.sqrt() * vb.sqrt())
}

/// SplitMix64: a small, fixed pseudo-random sequence, so that resampling is reproducible.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Linear-interpolated percentile of unsorted values, reordering them (O(n) selection).
fn percentile_unsorted(v: &mut [f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let (_, &mut a, rest) = v.select_nth_unstable_by(lo, f64::total_cmp);
    if pos == lo as f64 || rest.is_empty() {
        return a;
    }
    let b = rest.iter().copied().fold(f64::INFINITY, f64::min);
    if a == b {
        return a;
    }
    a + (b - a) * (pos - lo as f64)
}

/// Percentile-bootstrap confidence interval (level [`CONFIDENCE_LEVEL`]) of the `q`-quantile of
/// `values` (NaNs left out, as [`Summary::of`] does): `resamples` resamples of the values with
/// replacement drawn by [`SplitMix64`] from `seed`; the interval is the (1 − level)/2 and
/// (1 + level)/2 quantiles of the resampled statistic. `None` for fewer than two values.
pub fn bootstrap_percentile(
    values: &[f64],
    q: f64,
    resamples: usize,
    seed: u64,
) -> Option<Interval> {
    bootstrap_percentiles(values, &[q], resamples, seed).map(|v| v[0])
}

/// [`bootstrap_percentile`] for several quantiles from the same resamples: `out[i]` is the
/// interval of quantile `qs[i]`.
pub fn bootstrap_percentiles(
    values: &[f64],
    qs: &[f64],
    resamples: usize,
    seed: u64,
) -> Option<Vec<Interval>> {
    let v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.len() < 2 || resamples == 0 {
        return None;
    }
    let mut rng = SplitMix64::new(seed);
    let mut sample = vec![0f64; v.len()];
    let mut stats = vec![Vec::with_capacity(resamples); qs.len()];
    for _ in 0..resamples {
        for s in sample.iter_mut() {
            *s = v[rng.below(v.len())];
        }
        for (st, &q) in stats.iter_mut().zip(qs) {
            st.push(percentile_unsorted(&mut sample, q));
        }
    }
    let tail = (1.0 - CONFIDENCE_LEVEL) / 2.0;
    Some(
        stats
            .into_iter()
            .map(|mut st| {
                st.sort_by(f64::total_cmp);
                Interval {
                    lo: percentile(&st, tail),
                    hi: percentile(&st, 1.0 - tail),
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_matches_numpy_percentiles() {
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        let s = Summary::of(&v);
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 51.0, 101.0, 101));
        assert!((s.p1 - 2.0).abs() < 1e-12);
        assert!((s.p99 - 100.0).abs() < 1e-12);
        let s = Summary::of(&[0.0, 10.0]);
        assert!((s.p1 - 0.1).abs() < 1e-12 && (s.p99 - 9.9).abs() < 1e-12);
    }

    #[test]
    fn unsorted_percentile_matches_sorted() {
        let mut rng = SplitMix64::new(7);
        let v: Vec<f64> = (0..97).map(|_| rng.unit() * 10.0 - 5.0).collect();
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.025, 0.5, 0.975, 0.99, 1.0] {
            let mut w = v.clone();
            assert!((percentile_unsorted(&mut w, q) - percentile(&sorted, q)).abs() < 1e-12);
        }
    }

    #[test]
    fn bootstrap_interval_is_seeded_covers_the_estimate_and_narrows_with_more_data() {
        let mut rng = SplitMix64::new(11);
        let big: Vec<f64> = (0..2000).map(|_| rng.unit()).collect();
        let small = &big[..200];
        let a = bootstrap_percentile(small, 0.01, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED).unwrap();
        let b = bootstrap_percentile(small, 0.01, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED).unwrap();
        assert_eq!(a, b, "same seed, same interval");
        let p1 = Summary::of(small).p1;
        assert!(a.lo <= p1 && p1 <= a.hi && a.lo < a.hi, "{a:?} vs p1 {p1}");
        // Uniform on [0, 1): p1 is 0.01, and the interval covers it.
        assert!(a.contains(0.01), "{a:?}");
        let wide = bootstrap_percentile(&big, 0.01, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED).unwrap();
        assert!(wide.hi - wide.lo < a.hi - a.lo, "{wide:?} vs {a:?}");
        assert!(wide.contains(0.01) && wide.hi - wide.lo < 0.02, "{wide:?}");
        let both = bootstrap_percentiles(&big, &[0.01, 0.99], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
            .unwrap();
        assert_eq!(
            both[0], wide,
            "p1 from shared resamples is the same interval"
        );
        assert!(both[1].contains(0.99) && both[1].lo > 0.97, "{:?}", both[1]);
        // Constant data: a point interval; too little data: none.
        let c = bootstrap_percentile(&[2.5; 50], 0.01, 100, 1).unwrap();
        assert_eq!((c.lo, c.hi), (2.5, 2.5));
        assert!(bootstrap_percentile(&[1.0, f64::NAN], 0.01, 100, 1).is_none());
    }

    #[test]
    fn identical_runs_have_infinite_not_nan_sqnr() {
        let s = Summary::of(&[f64::INFINITY; 5]);
        assert!(s.p1.is_infinite() && s.median.is_infinite());
    }

    #[test]
    fn spearman_is_rank_based() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&a, &[10.0, 20.0, 300.0, 4000.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }
}
