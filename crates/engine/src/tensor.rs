//! Tensor details a backend reports about a loaded model.

use std::fmt;

use serde::Serialize;

/// Element type of a model tensor (the subset of TFLite types dermedge meets, plus `other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementType {
    Float32,
    Float16,
    Int8,
    Uint8,
    Int16,
    Int32,
    Int64,
    Other(i32),
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElementType::Float32 => f.write_str("float32"),
            ElementType::Float16 => f.write_str("float16"),
            ElementType::Int8 => f.write_str("int8"),
            ElementType::Uint8 => f.write_str("uint8"),
            ElementType::Int16 => f.write_str("int16"),
            ElementType::Int32 => f.write_str("int32"),
            ElementType::Int64 => f.write_str("int64"),
            ElementType::Other(code) => write!(f, "type#{code}"),
        }
    }
}

/// Quantisation of a tensor.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Quantization {
    None,
    PerTensor { scale: f32, zero_point: i64 },
    PerChannel { channels: u64, dimension: i32 },
    Other { code: i32 },
}

/// Name, type, shape and quantisation of one model input or output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorDetails {
    pub name: String,
    pub dtype: ElementType,
    pub shape: Vec<i32>,
    pub quantization: Quantization,
}

impl TensorDetails {
    pub fn num_elements(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| (d >= 0).then(|| acc * d as usize))
    }
}

impl fmt::Display for TensorDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}{:?}", self.name, self.dtype, self.shape)?;
        match &self.quantization {
            Quantization::None => Ok(()),
            Quantization::PerTensor { scale, zero_point } => {
                write!(f, " quantised scale={scale} zero_point={zero_point}")
            }
            Quantization::PerChannel {
                channels,
                dimension,
            } => {
                write!(
                    f,
                    " quantised per-channel ({channels} channels on axis {dimension})"
                )
            }
            Quantization::Other { code } => write!(f, " quantisation#{code}"),
        }
    }
}
