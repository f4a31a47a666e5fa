//! Scoring a head on labelled embeddings: accuracy, per-class ROC AUC, confusion matrix.

use serde::{Deserialize, Serialize};

use crate::{HeadError, HeadKind, LinearHead, Targets};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub class: String,
    /// Embeddings labelled with this class.
    pub positives: usize,
    /// One-vs-rest ROC AUC of this class's probability; `None` when the set holds only
    /// positives or only negatives for it.
    pub roc_auc: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub head: String,
    pub kind: HeadKind,
    pub count: usize,
    /// Softmax: top class equals the label. Sigmoid: each label decided right at 0.5, averaged.
    pub accuracy: f64,
    /// Sigmoid only: every label of an embedding decided right.
    pub exact_match: Option<f64>,
    pub classes: Vec<ClassScore>,
    /// Softmax only: `confusion[true][predicted]` counts.
    pub confusion: Option<Vec<Vec<usize>>>,
    /// Mean of the defined per-class AUCs.
    pub macro_roc_auc: Option<f64>,
}

/// Score `head` on embeddings `x` with `targets`.
pub fn evaluate(
    head: &LinearHead,
    x: &[Vec<f32>],
    targets: &Targets,
) -> Result<Evaluation, HeadError> {
    let k = head.classes.len();
    let n = x.len();
    let (labels, expected_kind): (Vec<Vec<bool>>, HeadKind) = match targets {
        Targets::Single(y) => (
            y.iter()
                .map(|&c| (0..k).map(|j| j == c).collect())
                .collect(),
            HeadKind::Softmax,
        ),
        Targets::Multi(y) => (y.clone(), HeadKind::Sigmoid),
    };
    if expected_kind != head.kind {
        return Err(HeadError::Training(format!(
            "head `{}` is a {:?} head but the labels are for a {:?} head",
            head.name, head.kind, expected_kind
        )));
    }
    if n == 0 || labels.len() != n {
        return Err(HeadError::Training(format!(
            "{n} embeddings and {} labels",
            labels.len()
        )));
    }
    if let Some(i) = labels.iter().position(|l| l.len() != k) {
        return Err(HeadError::Training(format!(
            "embedding {i}: label outside the head's {k} classes"
        )));
    }
    if let Some(i) = x.iter().position(|v| v.len() != head.embedding_dim) {
        return Err(HeadError::Training(format!(
            "embedding {i} has {} values, the head expects {}",
            x[i].len(),
            head.embedding_dim
        )));
    }
    let probabilities: Vec<Vec<f32>> = x.iter().map(|v| head.predict(v)).collect();
    let decided: Vec<Vec<bool>> = probabilities
        .iter()
        .map(|p| match head.kind {
            HeadKind::Softmax => {
                let top = argmax(p);
                (0..k).map(|j| j == top).collect()
            }
            HeadKind::Sigmoid => p.iter().map(|&q| q >= 0.5).collect(),
        })
        .collect();

    let classes: Vec<ClassScore> = (0..k)
        .map(|c| {
            let truth: Vec<bool> = labels.iter().map(|l| l[c]).collect();
            let scores: Vec<f32> = probabilities.iter().map(|p| p[c]).collect();
            let tp = (0..n).filter(|&i| truth[i] && decided[i][c]).count();
            let predicted = (0..n).filter(|&i| decided[i][c]).count();
            let positives = truth.iter().filter(|&&t| t).count();
            ClassScore {
                class: head.classes[c].clone(),
                positives,
                roc_auc: roc_auc(&scores, &truth),
                precision: ratio(tp, predicted),
                recall: ratio(tp, positives),
            }
        })
        .collect();
    let defined: Vec<f64> = classes.iter().filter_map(|c| c.roc_auc).collect();
    let macro_roc_auc =
        (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);

    let (accuracy, exact_match, confusion) = match head.kind {
        HeadKind::Softmax => {
            let mut confusion = vec![vec![0usize; k]; k];
            let mut right = 0;
            for i in 0..n {
                let truth = labels[i].iter().position(|&t| t).unwrap_or(0);
                let predicted = argmax(&probabilities[i]);
                confusion[truth][predicted] += 1;
                right += usize::from(truth == predicted);
            }
            (right as f64 / n as f64, None, Some(confusion))
        }
        HeadKind::Sigmoid => {
            let right: usize = (0..n)
                .map(|i| (0..k).filter(|&c| labels[i][c] == decided[i][c]).count())
                .sum();
            let exact = (0..n).filter(|&i| labels[i] == decided[i]).count();
            (
                right as f64 / (n * k) as f64,
                Some(exact as f64 / n as f64),
                None,
            )
        }
    };
    Ok(Evaluation {
        head: head.name.clone(),
        kind: head.kind,
        count: n,
        accuracy,
        exact_match,
        classes,
        confusion,
        macro_roc_auc,
    })
}

fn ratio(a: usize, b: usize) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// ROC AUC as the Mann-Whitney statistic: the chance a positive outscores a negative, ties half.
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut i) = (0f64, 0);
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Tied scores share the mean of their 1-based ranks.
        let rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += rank * order[i..=j].iter().filter(|&&o| positive[o]).count() as f64;
        i = j + 1;
    }
    let p = positive.iter().filter(|&&t| t).count() as f64;
    let q = scores.len() as f64 - p;
    (p > 0.0 && q > 0.0).then(|| (rank_sum - p * (p + 1.0) / 2.0) / (p * q))
}

impl std::fmt::Display for Evaluation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        writeln!(
            f,
            "head `{}` ({:?}) on {} embeddings: accuracy {:.3}{}, macro ROC AUC {}",
            self.head,
            self.kind,
            self.count,
            self.accuracy,
            self.exact_match
                .map_or(String::new(), |e| format!(", exact match {e:.3}")),
            opt(self.macro_roc_auc)
        )?;
        writeln!(f, "class\tpositives\troc_auc\tprecision\trecall")?;
        for c in &self.classes {
            writeln!(
                f,
                "{}\t{}\t{}\t{}\t{}",
                c.class,
                c.positives,
                opt(c.roc_auc),
                opt(c.precision),
                opt(c.recall)
            )?;
        }
        if let Some(confusion) = &self.confusion {
            writeln!(f, "confusion (rows: label, columns: predicted)")?;
            let names: Vec<&str> = self.classes.iter().map(|c| c.class.as_str()).collect();
            writeln!(f, "\t{}", names.join("\t"))?;
            for (name, row) in names.iter().zip(confusion) {
                let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
                writeln!(f, "{name}\t{}", cells.join("\t"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_matches_hand_counts() {
        assert_eq!(
            roc_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]),
            Some(0.75)
        );
        assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, false]), None);
        assert_eq!(roc_auc(&[0.1, 0.9, 0.2], &[false, true, false]), Some(1.0));
    }
}
