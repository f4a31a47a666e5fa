//! Deterministic L2-regularised logistic regression: full-batch gradient descent from zeros.

use crate::{dot, prepare, softmax, HeadError, HeadKind, LinearHead, FORMAT};

/// Training settings. The defaults suit a few hundred embeddings.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub l2_normalize: bool,
    /// L2 regularisation strength on the weights.
    pub lambda: f32,
    pub iterations: usize,
    pub learning_rate: f32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            l2_normalize: true,
            lambda: 1e-3,
            iterations: 400,
            learning_rate: 0.5,
        }
    }
}

/// What each training embedding is labelled with.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// One class index per embedding (softmax head).
    Single(Vec<usize>),
    /// A set of labels per embedding, one flag per class (sigmoid head).
    Multi(Vec<Vec<bool>>),
}

impl Targets {
    fn len(&self) -> usize {
        match self {
            Targets::Single(y) => y.len(),
            Targets::Multi(y) => y.len(),
        }
    }

    fn kind(&self) -> HeadKind {
        match self {
            Targets::Single(_) => HeadKind::Softmax,
            Targets::Multi(_) => HeadKind::Sigmoid,
        }
    }

    /// The 0/1 target of class `c` for embedding `i`.
    fn target(&self, i: usize, c: usize) -> f32 {
        let hit = match self {
            Targets::Single(y) => y[i] == c,
            Targets::Multi(y) => y[i][c],
        };
        if hit {
            1.0
        } else {
            0.0
        }
    }

    fn check(&self, k: usize) -> Result<(), HeadError> {
        match self {
            Targets::Single(y) => match y.iter().find(|&&c| c >= k) {
                Some(bad) => Err(HeadError::Training(format!(
                    "label {bad} but only {k} classes"
                ))),
                None => Ok(()),
            },
            Targets::Multi(y) => match y.iter().position(|row| row.len() != k) {
                Some(i) => Err(HeadError::Training(format!(
                    "embedding {i} has {} label flags, expected {k}",
                    y[i].len()
                ))),
                None => Ok(()),
            },
        }
    }
}

/// Fit a softmax head to embeddings `x` with labels `y` (indices into `classes`).
pub fn train_softmax(
    name: &str,
    model_id: &str,
    x: &[Vec<f32>],
    y: &[usize],
    classes: Vec<String>,
    options: &TrainOptions,
    mut progress: impl FnMut(usize, f32),
) -> Result<LinearHead, HeadError> {
    train(
        name,
        model_id,
        x,
        &Targets::Single(y.to_vec()),
        classes,
        options,
        &mut progress,
    )
}

/// Fit a head to embeddings `x`: softmax for [`Targets::Single`], sigmoid for [`Targets::Multi`].
/// `progress` is called with (iteration, loss) after each step. (A `dyn` callback rather than a
/// generic one: generic code is compiled in the calling crate, at that crate's optimisation
/// level, and this loop is where a head's training time goes.)
pub fn train(
    name: &str,
    model_id: &str,
    x: &[Vec<f32>],
    targets: &Targets,
    classes: Vec<String>,
    options: &TrainOptions,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<LinearHead, HeadError> {
    let (n, k) = (x.len(), classes.len());
    if n == 0 || n != targets.len() {
        return Err(HeadError::Training(format!(
            "{n} embeddings and {} labels",
            targets.len()
        )));
    }
    if k == 0 {
        return Err(HeadError::Training("no classes".into()));
    }
    let d = x[0].len();
    if let Some(i) = x.iter().position(|v| v.len() != d) {
        return Err(HeadError::Training(format!(
            "embedding {i} has {} values, the first has {d}",
            x[i].len()
        )));
    }
    if let Some(i) = x.iter().position(|v| v.iter().any(|a| !a.is_finite())) {
        return Err(HeadError::Training(format!(
            "embedding {i} holds a NaN or infinite value"
        )));
    }
    targets.check(k)?;
    if !(options.lambda >= 0.0 && options.learning_rate > 0.0) {
        return Err(HeadError::Training(
            "lambda must be >= 0 and the learning rate > 0".into(),
        ));
    }
    let kind = targets.kind();

    // Normalise, centre on the training mean, and scale to unit mean norm: fixed, stored constants.
    let normalised: Vec<Vec<f32>> = x
        .iter()
        .map(|v| prepare(v, options.l2_normalize, &[], 1.0))
        .collect();
    let mut mean = vec![0f32; d];
    for v in &normalised {
        for (m, a) in mean.iter_mut().zip(v) {
            *m += a / n as f32;
        }
    }
    let centred: Vec<Vec<f32>> = normalised
        .iter()
        .map(|v| v.iter().zip(&mean).map(|(a, m)| a - m).collect())
        .collect();
    let scale = (centred.iter().map(|v| dot(v, v).sqrt()).sum::<f32>() / n as f32).max(1e-12);
    let inputs: Vec<Vec<f32>> = centred
        .iter()
        .map(|v| v.iter().map(|a| a / scale).collect())
        .collect();

    let mut w = vec![vec![0f32; d]; k];
    let mut b = vec![0f32; k];
    for it in 0..options.iterations {
        let mut gw = vec![vec![0f32; d]; k];
        let mut gb = vec![0f32; k];
        let mut loss = 0f32;
        for (i, xi) in inputs.iter().enumerate() {
            let logits: Vec<f32> = w.iter().zip(&b).map(|(wc, bc)| dot(wc, xi) + bc).collect();
            let p = match kind {
                HeadKind::Softmax => softmax(&logits),
                HeadKind::Sigmoid => logits.iter().map(|&z| sigmoid(z)).collect(),
            };
            for c in 0..k {
                let t = targets.target(i, c);
                loss -= match kind {
                    HeadKind::Softmax => t * p[c].max(1e-12).ln(),
                    HeadKind::Sigmoid => {
                        t * p[c].max(1e-12).ln() + (1.0 - t) * (1.0 - p[c]).max(1e-12).ln()
                    }
                } / n as f32;
                // Both losses have the same gradient in the logits: p - t.
                let g = (p[c] - t) / n as f32;
                gb[c] += g;
                for (gwj, xj) in gw[c].iter_mut().zip(xi) {
                    *gwj += g * xj;
                }
            }
        }
        for c in 0..k {
            loss += 0.5 * options.lambda * dot(&w[c], &w[c]);
            for (wj, gj) in w[c].iter_mut().zip(&gw[c]) {
                *wj -= options.learning_rate * (gj + options.lambda * *wj);
            }
            b[c] -= options.learning_rate * gb[c];
        }
        progress(it, loss);
    }
    Ok(LinearHead {
        format: FORMAT.into(),
        name: name.into(),
        model_id: model_id.into(),
        embedding_dim: d,
        kind,
        classes,
        l2_normalize: options.l2_normalize,
        input_mean: mean,
        input_scale: scale,
        weights: w,
        bias: b,
        version: None,
    })
}

pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}
