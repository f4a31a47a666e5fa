//! A model's own trained classifier, carried beside it: a small multi-layer perceptron on the raw
//! embedding (dense layers with ReLU between them; batch normalisation and constant inputs folded
//! into the weights by the exporter). Read-only here: dermedge trains linear heads, not these.
//!
//! ```json
//! {"format": "dermedge-mlp-head/1", "name": "lesion-x448-teacher", "model_id": "lesion-x448",
//!  "embedding_dim": 2048, "kind": "softmax", "classes": ["akiec", …],
//!  "layers": [{"activation": "relu", "weights": [[…2048…], …264 rows…], "bias": […264…]}, …]}
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    check_binding, check_name, dot, parse_json, read_json, softmax, write_json, Classifier,
    HeadError, HeadKind,
};

pub const MLP_FORMAT: &str = "dermedge-mlp-head/1";
/// Most layers a classifier file may have.
pub const MAX_LAYERS: usize = 16;
/// Widest layer (outputs) a classifier file may have.
pub const MAX_WIDTH: usize = 1 << 16;

/// What a dense layer applies to its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Identity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dense {
    pub activation: Activation,
    /// One row of input weights per output.
    pub weights: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpHead {
    pub format: String,
    pub name: String,
    pub model_id: String,
    pub embedding_dim: usize,
    /// How the last layer's outputs become probabilities.
    pub kind: HeadKind,
    pub classes: Vec<String>,
    pub layers: Vec<Dense>,
}

impl MlpHead {
    pub fn load(path: &Path) -> Result<Self, HeadError> {
        read_json(path, Self::validate)
    }

    /// A head from bytes already read (and checked) from `path`, which errors name.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self, HeadError> {
        parse_json(bytes, path, Self::validate)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_json(self, path)
    }

    /// The format, a usable name, and layer shapes that chain from `embedding_dim` to the classes.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != MLP_FORMAT {
            return Err(format!("format {:?}, expected {MLP_FORMAT:?}", self.format));
        }
        check_name(&self.name)?;
        if self.classes.is_empty() {
            return Err("classes: expected at least one class".into());
        }
        if self.layers.is_empty() || self.layers.len() > MAX_LAYERS {
            return Err(format!(
                "layers: {} layers, expected 1 to {MAX_LAYERS}",
                self.layers.len()
            ));
        }
        let mut inputs = self.embedding_dim;
        if inputs == 0 {
            return Err("embedding_dim: expected at least 1".into());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let outputs = layer.weights.len();
            if outputs == 0 || outputs > MAX_WIDTH {
                return Err(format!(
                    "layers[{i}]: {outputs} weight rows, expected 1 to {MAX_WIDTH}"
                ));
            }
            if layer.bias.len() != outputs {
                return Err(format!(
                    "layers[{i}]: {outputs} weight rows need {outputs} biases, not {}",
                    layer.bias.len()
                ));
            }
            if let Some(r) = layer.weights.iter().position(|w| w.len() != inputs) {
                return Err(format!(
                    "layers[{i}].weights[{r}]: {} values, expected {inputs} (the {})",
                    layer.weights[r].len(),
                    if i == 0 {
                        "embedding_dim".to_string()
                    } else {
                        format!("outputs of layers[{}]", i - 1)
                    }
                ));
            }
            let finite = layer.weights.iter().flatten().all(|v| v.is_finite())
                && layer.bias.iter().all(|v| v.is_finite());
            if !finite {
                return Err(format!(
                    "layers[{i}]: weights and biases must be finite numbers"
                ));
            }
            inputs = outputs;
        }
        if inputs != self.classes.len() {
            return Err(format!(
                "the last layer has {inputs} outputs for {} classes",
                self.classes.len()
            ));
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
}

impl Classifier for MlpHead {
    fn name(&self) -> &str {
        &self.name
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn predict(&self, embedding: &[f32]) -> Vec<f32> {
        let mut x = embedding.to_vec();
        for layer in &self.layers {
            x = layer
                .weights
                .iter()
                .zip(&layer.bias)
                .map(|(w, b)| {
                    let y = dot(w, &x) + b;
                    match layer.activation {
                        Activation::Relu => y.max(0.0),
                        Activation::Identity => y,
                    }
                })
                .collect();
        }
        match self.kind {
            HeadKind::Softmax => softmax(&x),
            HeadKind::Sigmoid => x.into_iter().map(crate::train::sigmoid).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two inputs, a ReLU layer of two, three classes.
    fn small() -> MlpHead {
        MlpHead {
            format: MLP_FORMAT.into(),
            name: "toy-teacher".into(),
            model_id: "m".into(),
            embedding_dim: 2,
            kind: HeadKind::Softmax,
            classes: vec!["a".into(), "b".into(), "c".into()],
            layers: vec![
                Dense {
                    activation: Activation::Relu,
                    weights: vec![vec![1.0, 0.0], vec![0.0, -1.0]],
                    bias: vec![0.0, 0.5],
                },
                Dense {
                    activation: Activation::Identity,
                    weights: vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![-1.0, -1.0]],
                    bias: vec![0.0, 0.0, 0.25],
                },
            ],
        }
    }

    #[test]
    fn predicts_through_relu_and_softmax() {
        let head = small();
        head.validate().unwrap();
        // Hidden: relu(3) = 3, relu(-2 + 0.5) = 0; logits 3, 0, -2.75.
        let p = head.predict(&[3.0, 2.0]);
        let expected = softmax(&[3.0, 0.0, -2.75]);
        for (a, b) in p.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{p:?} vs {expected:?}");
        }
        // The ReLU matters: without it the second hidden unit would be -1.5 and class c would win.
        let p = head.predict(&[-3.0, 2.0]);
        assert_eq!(
            p.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0,
            2
        );
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("teacher.json");
        small().save(&path).unwrap();
        assert_eq!(MlpHead::load(&path).unwrap(), small());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(MlpHead::from_json(&bytes, &path).unwrap(), small());
    }

    #[test]
    fn shapes_that_do_not_chain_are_refused_naming_the_layer() {
        type Damage = Box<dyn Fn(&mut MlpHead)>;
        let cases: Vec<(Damage, &str)> = vec![
            (
                Box::new(|h| h.layers[1].weights[2].push(0.0)),
                "layers[1].weights[2]: 3 values, expected 2 (the outputs of layers[0])",
            ),
            (
                Box::new(|h| h.layers[0].weights[0].pop().map(drop).unwrap_or(())),
                "layers[0].weights[0]: 1 values, expected 2 (the embedding_dim)",
            ),
            (
                Box::new(|h| h.layers[0].bias.push(1.0)),
                "layers[0]: 2 weight rows need 2 biases, not 3",
            ),
            (
                Box::new(|h| h.classes.pop().map(drop).unwrap_or(())),
                "the last layer has 3 outputs for 2 classes",
            ),
            (
                Box::new(|h| h.layers.clear()),
                "layers: 0 layers, expected 1 to 16",
            ),
            (
                Box::new(|h| h.layers[1].bias[0] = f32::NAN),
                "layers[1]: weights and biases must be finite",
            ),
            (
                Box::new(|h| h.layers[0].weights.clear()),
                "layers[0]: 0 weight rows",
            ),
            (
                Box::new(|h| h.format = "dermedge-head/1".into()),
                "expected \"dermedge-mlp-head/1\"",
            ),
            (Box::new(|h| h.name = "../x".into()), "head name \"../x\""),
            (
                Box::new(|h| h.classes.clear()),
                "expected at least one class",
            ),
        ];
        for (damage, expected) in cases {
            let mut head = small();
            damage(&mut head);
            let error = head.validate().unwrap_err();
            assert!(
                error.contains(expected),
                "{error:?} should say {expected:?}"
            );
        }
    }

    #[test]
    fn damaged_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("teacher.json");
        let good = serde_json::to_string(&small()).unwrap();
        for text in [
            String::new(),
            good[..good.len() / 2].to_string(),
            good.replace("\"relu\"", "\"gelu\""),
            good.replace("\"kind\"", "\"extra\":1,\"kind\""),
            good.replace("[1.0,0.0]", "[1e999,0.0]"),
        ] {
            std::fs::write(&path, &text).unwrap();
            match MlpHead::load(&path) {
                Err(HeadError::Invalid { path: p, .. }) => assert_eq!(p, path),
                other => panic!("{text:?} gave {other:?}"),
            }
            // Bytes read elsewhere (a manifest's checked companion) fail the same way.
            match MlpHead::from_json(text.as_bytes(), &path) {
                Err(HeadError::Invalid { path: p, .. }) => assert_eq!(p, path),
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        assert!(matches!(
            MlpHead::load(dir.path()),
            Err(HeadError::Invalid { .. })
        ));
        assert!(matches!(
            MlpHead::load(&dir.path().join("missing.json")),
            Err(HeadError::Read { .. })
        ));
    }

    #[test]
    fn embeddings_of_another_model_are_refused() {
        let head = small();
        assert!(head.check_model("m", 2).is_ok());
        assert!(matches!(
            head.check_model("m", 3),
            Err(HeadError::ModelMismatch { .. })
        ));
        assert!(matches!(
            head.check_model("other", 2),
            Err(HeadError::ModelMismatch { .. })
        ));
    }
}
