//! Deterministic k-means (k-means++ seeding from a fixed seed) for labelling unlabelled embeddings.

/// SplitMix64: a tiny, fixed pseudo-random sequence so results never depend on a crate version.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
}

/// Cluster `points` into `k` groups; returns each point's cluster index.
pub fn kmeans(points: &[Vec<f32>], k: usize, seed: u64, iterations: usize) -> Vec<usize> {
    let n = points.len();
    let k = k.min(n).max(1);
    let mut rng = SplitMix(seed);
    let mut centres = vec![points[(rng.next() % n as u64) as usize].clone()];
    while centres.len() < k {
        let d: Vec<f64> = points
            .iter()
            .map(|p| {
                centres
                    .iter()
                    .map(|c| dist2(p, c))
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let total: f64 = d.iter().sum();
        let mut target = rng.unit() * total;
        let mut chosen = n - 1;
        for (i, di) in d.iter().enumerate() {
            target -= di;
            if target <= 0.0 {
                chosen = i;
                break;
            }
        }
        centres.push(points[chosen].clone());
    }
    let mut labels = vec![0usize; n];
    for _ in 0..iterations {
        let mut changed = false;
        for (i, p) in points.iter().enumerate() {
            let best = (0..k)
                .min_by(|&a, &b| dist2(p, &centres[a]).total_cmp(&dist2(p, &centres[b])))
                .unwrap();
            if labels[i] != best {
                labels[i] = best;
                changed = true;
            }
        }
        for (c, centre) in centres.iter_mut().enumerate() {
            let members: Vec<&Vec<f32>> = points
                .iter()
                .zip(&labels)
                .filter(|(_, &l)| l == c)
                .map(|(p, _)| p)
                .collect();
            if members.is_empty() {
                continue;
            }
            for (j, v) in centre.iter_mut().enumerate() {
                *v = members.iter().map(|m| m[j]).sum::<f32>() / members.len() as f32;
            }
        }
        if !changed {
            break;
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_separated_groups_deterministically() {
        let points: Vec<Vec<f32>> = (0..40)
            .map(|i| vec![(i / 10) as f32 * 10.0 + (i % 10) as f32 * 0.1, 1.0])
            .collect();
        let a = kmeans(&points, 4, 7, 50);
        assert_eq!(a, kmeans(&points, 4, 7, 50));
        for g in 0..4 {
            let first = a[g * 10];
            assert!(a[g * 10..g * 10 + 10].iter().all(|&l| l == first));
        }
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), 4);
    }
}
