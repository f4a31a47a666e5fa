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

impl TensorDetails {
    /// Bytes per element for the types an embedding output may have (0 for any other).
    pub fn element_size(&self) -> usize {
        match self.dtype {
            ElementType::Float32 => 4,
            ElementType::Uint8 | ElementType::Int8 => 1,
            _ => 0,
        }
    }

    /// This tensor's raw bytes (native endianness) as floats: float32 as is, uint8/int8 through
    /// its per-tensor quantisation. Empty for any other element type.
    pub fn dequantise(&self, bytes: &[u8]) -> Vec<f32> {
        let (scale, zero_point) = match self.quantization {
            Quantization::PerTensor { scale, zero_point } => (scale, zero_point as f32),
            _ => (1.0, 0.0),
        };
        match self.dtype {
            ElementType::Float32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            ElementType::Uint8 => bytes
                .iter()
                .map(|&q| scale * (q as f32 - zero_point))
                .collect(),
            ElementType::Int8 => bytes
                .iter()
                .map(|&q| scale * (q as i8 as f32 - zero_point))
                .collect(),
            _ => Vec::new(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn output(dtype: ElementType, quantization: Quantization) -> TensorDetails {
        TensorDetails {
            name: "embedding".into(),
            dtype,
            shape: vec![1, 3],
            quantization,
        }
    }

    #[test]
    fn dequantises_each_output_type() {
        let f = output(ElementType::Float32, Quantization::None);
        let bytes: Vec<u8> = [1.5f32, -2.0, 0.25]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        assert_eq!(f.element_size(), 4);
        assert_eq!(f.dequantise(&bytes), [1.5, -2.0, 0.25]);
        let q = Quantization::PerTensor {
            scale: 0.5,
            zero_point: 10,
        };
        let u8_out = output(ElementType::Uint8, q.clone());
        assert_eq!(u8_out.dequantise(&[10, 14, 0]), [0.0, 2.0, -5.0]);
        let i8_out = output(ElementType::Int8, q);
        assert_eq!(i8_out.dequantise(&[(-6i8) as u8, 12, 10]), [-8.0, 1.0, 0.0]);
        let other = output(ElementType::Int32, Quantization::None);
        assert_eq!(other.element_size(), 0);
        assert!(other.dequantise(&[0; 12]).is_empty());
    }
}
