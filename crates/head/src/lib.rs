//! dermedge-head: small linear classifiers on embeddings (condition, quality, body site, …).
//!
//! A head file binds the weights to the embedding model (`model_id`, `embedding_dim`): applying a
//! head to embeddings of another model is refused. Inputs may be L2-normalised, then centred and
//! scaled by constants stored in the file, so training and inference agree by construction.
//! Training is deterministic: multinomial logistic regression with L2 regularisation, full-batch
//! gradient descent from zeros; softmax for mutually exclusive classes, sigmoid for independent
//! labels. [`eval`] scores a head on labelled embeddings (accuracy, per-class ROC AUC, confusion).
//! [`kmeans`] gives deterministic cluster labels for unlabelled sets. [`mlp`] reads a model's own
//! trained classifier (a small perceptron the exporter writes beside the model); both kinds of
//! head answer through [`Classifier`].
//!
//! Depends on nothing else in dermedge.

pub mod eval;
pub mod kmeans;
pub mod mlp;
mod train;

pub use mlp::MlpHead;
pub use train::{train, train_softmax, Targets, TrainOptions};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "dermedge-head/1";
/// The longest name of a head the hub publishes.
pub const MAX_NAME_CHARS: usize = 64;

/// The name of a head the hub publishes, which a device also uses as a file name: 1 to
/// [`MAX_NAME_CHARS`] lower-case letters, digits, `-`, `_` or `.`, not starting with `.` (lower
/// case only, so that no two names share a file on a case-insensitive card).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.chars().count() <= MAX_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "head name {name:?}: expected 1 to {MAX_NAME_CHARS} lower-case letters, digits, '-', '_' or '.', \
             not starting with '.'"
        ))
    }
}

/// How class scores become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// Mutually exclusive classes.
    Softmax,
    /// Independent labels.
    Sigmoid,
}

/// What every head does with an embedding, whatever its inside: a linear head dermedge trained,
/// or a model's own classifier ([`MlpHead`]).
pub trait Classifier {
    fn name(&self) -> &str;
    fn classes(&self) -> &[String];
    /// Class probabilities for one embedding (of the head's `embedding_dim` values).
    fn predict(&self, embedding: &[f32]) -> Vec<f32>;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearHead {
    pub format: String,
    pub name: String,
    pub model_id: String,
    pub embedding_dim: usize,
    pub kind: HeadKind,
    pub classes: Vec<String>,
    pub l2_normalize: bool,
    /// Subtracted after normalisation (the training set's mean); empty for none.
    pub input_mean: Vec<f32>,
    /// Divides the centred input.
    pub input_scale: f32,
    /// One row of `embedding_dim` weights per class.
    pub weights: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
    /// The hub's publication number for a head it trained and signed; `None` for a head file
    /// trained by hand. A device replaces a head only by a higher version of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("{path}: cannot read head: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not a valid dermedge head: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "head `{head}` is bound to model {head_model} ({head_dim}-d), not to {model} ({dim}-d)"
    )]
    ModelMismatch {
        head: String,
        head_model: String,
        head_dim: usize,
        model: String,
        dim: usize,
    },
    #[error("training data: {0}")]
    Training(String),
}

impl LinearHead {
    pub fn load(path: &Path) -> Result<Self, HeadError> {
        read_json(path, Self::validate)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_json(self, path)
    }

    /// The checks every head passes before use: the format, and shapes that agree with
    /// `embedding_dim` and the classes.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {:?}, expected {FORMAT:?}", self.format));
        }
        let k = self.classes.len();
        if k == 0 || self.weights.len() != k || self.bias.len() != k {
            return Err(format!("{k} classes need {k} weight rows and {k} biases"));
        }
        if self.weights.iter().any(|w| w.len() != self.embedding_dim) {
            return Err(format!(
                "every weight row must have embedding_dim = {} values",
                self.embedding_dim
            ));
        }
        if !self.input_mean.is_empty() && self.input_mean.len() != self.embedding_dim {
            return Err("input_mean must be empty or embedding_dim long".into());
        }
        if !(self.input_scale.is_finite() && self.input_scale > 0.0) {
            return Err("input_scale must be a finite number > 0".into());
        }
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !(self.weights.iter().all(|w| finite(w))
            && finite(&self.bias)
            && finite(&self.input_mean))
        {
            return Err("weights, biases and input_mean must be finite numbers".into());
        }
        Ok(())
    }

    /// Refuse embeddings of another model.
    pub fn check_model(&self, model_id: &str, dim: usize) -> Result<(), HeadError> {
        check_binding(
            &self.name,
            &self.model_id,
            self.embedding_dim,
            model_id,
            dim,
        )
    }

    fn prepare(&self, embedding: &[f32]) -> Vec<f32> {
        prepare(
            embedding,
            self.l2_normalize,
            &self.input_mean,
            self.input_scale,
        )
    }

    /// `name`, or `name v<version>` for a head the hub published.
    pub fn label(&self) -> String {
        match self.version {
            Some(v) => format!("{} v{v}", self.name),
            None => self.name.clone(),
        }
    }

    /// Class probabilities for one embedding (of `embedding_dim` values).
    pub fn predict(&self, embedding: &[f32]) -> Vec<f32> {
        let x = self.prepare(embedding);
        let logits: Vec<f32> = self
            .weights
            .iter()
            .zip(&self.bias)
            .map(|(w, b)| dot(w, &x) + b)
            .collect();
        match self.kind {
            HeadKind::Softmax => softmax(&logits),
            HeadKind::Sigmoid => logits.iter().map(|&z| train::sigmoid(z)).collect(),
        }
    }
}

impl Classifier for LinearHead {
    fn name(&self) -> &str {
        &self.name
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn predict(&self, embedding: &[f32]) -> Vec<f32> {
        LinearHead::predict(self, embedding)
    }
}

/// A head bound to `head_model` (`head_dim` values) refuses embeddings of any other model.
pub(crate) fn check_binding(
    head: &str,
    head_model: &str,
    head_dim: usize,
    model: &str,
    dim: usize,
) -> Result<(), HeadError> {
    if head_model != model || head_dim != dim {
        return Err(HeadError::ModelMismatch {
            head: head.into(),
            head_model: head_model.into(),
            head_dim,
            model: model.into(),
            dim,
        });
    }
    Ok(())
}

/// Largest head file read (64 Mi weights as JSON text); a larger file is damaged or hostile,
/// not a head.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// A head file: a regular file of at most [`MAX_FILE_BYTES`], JSON of `T`, passing `validate`; every
/// failure names the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl Fn(&T) -> Result<(), String>,
) -> Result<T, HeadError> {
    use std::io::Read;
    let invalid = |message| invalid_file(path, message);
    let read = |cause| HeadError::Read {
        path: path.into(),
        cause,
    };
    // Checked before opening, so that a FIFO is refused rather than waited on, and again on what
    // was opened, in case the path was swapped in between.
    if !std::fs::metadata(path).map_err(read)?.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    let file = std::fs::File::open(path).map_err(read)?;
    if !file.metadata().map_err(read)?.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(invalid(format!(
            "larger than {MAX_FILE_BYTES} bytes, the most a head file may be"
        )));
    }
    parse_json(&bytes, path, validate)
}

/// A head file's bytes, already read from `path` (named in every error): JSON of `T` passing
/// `validate`.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    validate: impl Fn(&T) -> Result<(), String>,
) -> Result<T, HeadError> {
    let invalid = |message| invalid_file(path, message);
    let value: T = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    validate(&value).map_err(invalid)?;
    Ok(value)
}

fn invalid_file(path: &Path, message: String) -> HeadError {
    HeadError::Invalid {
        path: path.into(),
        message,
    }
}

pub(crate) fn write_json<T: Serialize>(value: &T, path: &Path) -> std::io::Result<()> {
    std::fs::write(path, serde_json::to_string(value).expect("serialisable"))
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub(crate) fn prepare(embedding: &[f32], l2: bool, mean: &[f32], scale: f32) -> Vec<f32> {
    let norm = if l2 {
        embedding
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt()
            .max(1e-12)
    } else {
        1.0
    };
    embedding
        .iter()
        .enumerate()
        .map(|(i, v)| (v / norm - mean.get(i).copied().unwrap_or(0.0)) / scale)
        .collect()
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|z| (z - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> (Vec<Vec<f32>>, Vec<usize>) {
        // Three well-separated directions plus a large shared component, like real embeddings.
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..30 {
            let c = i % 3;
            let mut v = vec![5.0f32; 16];
            v[c] += 1.0 + (i as f32 * 0.37).sin() * 0.2;
            v[8 + (i % 5)] += 0.1;
            x.push(v);
            y.push(c);
        }
        (x, y)
    }

    #[test]
    fn published_names_are_short_and_plain() {
        assert!(check_name("diagnosis-v2.clinic_7").is_ok());
        for bad in [
            "",
            "a b",
            "x\n",
            "é",
            &"n".repeat(65),
            "../etc",
            "..",
            ".hidden",
            "Diagnosis",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn trains_deterministically_and_separates_classes() {
        let (x, y) = blobs();
        let classes = vec!["a".into(), "b".into(), "c".into()];
        let opts = TrainOptions::default();
        let h1 = train_softmax("t", "m", &x, &y, classes.clone(), &opts, |_, _| {}).unwrap();
        let h2 = train_softmax("t", "m", &x, &y, classes, &opts, |_, _| {}).unwrap();
        assert_eq!(h1, h2);
        let correct = x.iter().zip(&y).filter(|(v, &c)| {
            let p = h1.predict(v);
            p.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
                == c
        });
        assert_eq!(correct.count(), 30);
    }

    #[test]
    fn files_round_trip_and_bind_to_their_model() {
        let (x, y) = blobs();
        let head = train_softmax(
            "t",
            "df-mini",
            &x,
            &y,
            vec!["a".into(), "b".into(), "c".into()],
            &TrainOptions::default(),
            |_, _| {},
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.json");
        head.save(&path).unwrap();
        let loaded = LinearHead::load(&path).unwrap();
        assert_eq!(loaded, head);
        assert!(loaded.check_model("df-mini", 16).is_ok());
        let err = loaded
            .check_model("lesion-x448", 2048)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("df-mini") && err.contains("lesion-x448"),
            "{err}"
        );
        std::fs::write(&path, "{\"format\": \"something else\"}").unwrap();
        assert!(LinearHead::load(&path)
            .unwrap_err()
            .to_string()
            .contains("h.json"));
        let err = LinearHead::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        #[cfg(unix)]
        {
            // A FIFO is refused before it is opened: opening one would wait for a writer.
            let fifo = dir.path().join("fifo.json");
            let status = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap();
            assert!(status.success());
            let err = LinearHead::load(&fifo).unwrap_err().to_string();
            assert!(
                err.contains("fifo.json") && err.contains("not a regular file"),
                "{err}"
            );
        }
    }

    #[test]
    fn sigmoid_heads_learn_independent_labels() {
        // Label 0: first coordinate high; label 1: second coordinate high; both may hold.
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..40 {
            let (a, b) = (i % 2 == 0, i % 3 == 0);
            let mut v = vec![3.0f32; 8];
            v[0] += if a { 1.0 } else { -1.0 };
            v[1] += if b { 1.0 } else { -1.0 };
            v[4] += (i as f32 * 0.7).sin() * 0.1;
            x.push(v);
            y.push(vec![a, b]);
        }
        let targets = Targets::Multi(y);
        let options = TrainOptions {
            iterations: 600,
            ..TrainOptions::default()
        };
        let head = train(
            "m",
            "m",
            &x,
            &targets,
            vec!["a".into(), "b".into()],
            &options,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(head.kind, HeadKind::Sigmoid);
        let score = eval::evaluate(&head, &x, &targets).unwrap();
        assert_eq!(score.exact_match, Some(1.0), "{score}");
        assert!(score.classes.iter().all(|c| c.roc_auc == Some(1.0)));
        // Labels for a softmax head do not score a sigmoid head.
        assert!(eval::evaluate(&head, &x, &Targets::Single(vec![0; 40])).is_err());
    }

    #[test]
    fn evaluation_counts_a_confusion_matrix() {
        let (x, y) = blobs();
        let classes = vec!["a".into(), "b".into(), "c".into()];
        let head = train_softmax(
            "t",
            "m",
            &x,
            &y,
            classes,
            &TrainOptions::default(),
            |_, _| {},
        )
        .unwrap();
        let mut wrong = y.clone();
        wrong[0] = (wrong[0] + 1) % 3;
        let score = eval::evaluate(&head, &x, &Targets::Single(wrong)).unwrap();
        let confusion = score.confusion.clone().unwrap();
        assert_eq!(confusion.iter().flatten().sum::<usize>(), 30);
        assert_eq!((0..3).map(|c| confusion[c][c]).sum::<usize>(), 29);
        assert!((score.accuracy - 29.0 / 30.0).abs() < 1e-9);
        assert!(score.to_string().contains("confusion"));
    }

    #[test]
    fn bad_training_data_is_an_error() {
        let err = train_softmax(
            "t",
            "m",
            &[vec![1.0], vec![1.0, 2.0]],
            &[0, 0],
            vec!["a".into()],
            &TrainOptions::default(),
            |_, _| {},
        );
        assert!(err.is_err());
        let err = train_softmax(
            "t",
            "m",
            &[vec![1.0]],
            &[3],
            vec!["a".into()],
            &TrainOptions::default(),
            |_, _| {},
        );
        assert!(err.unwrap_err().to_string().contains("label 3"));
    }
}
