//! What one capture leaves behind: the record the device queues and the hub stores.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::key::{HubKey, HubPublic};
use crate::Precision;

pub const RECORD_FORMAT: u32 = 1;
pub const ENVELOPE_FORMAT: u32 = 2;

/// What the device queues and sends: the record sealed to the hub's public key (the device
/// cannot read it back, and neither can whoever finds the device), with what is not secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// [`ENVELOPE_FORMAT`].
    pub format: u32,
    /// The record's id (the hub's dedup key).
    pub id: String,
    pub captured_at_ms: i64,
    pub device_id: String,
    /// The record's CBOR in an X25519 sealed box to the hub.
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

impl Envelope {
    pub fn seal(record: &Record, hub: &HubPublic) -> Self {
        Self {
            format: ENVELOPE_FORMAT,
            id: record.id.clone(),
            captured_at_ms: record.captured_at_ms,
            device_id: record.device_id.clone(),
            sealed: hub.seal(&record.to_cbor()),
        }
    }

    /// The record, if this envelope was sealed to `hub` and its outside matches its inside; the
    /// error reads after "the sealed record …".
    pub fn open(&self, hub: &HubKey) -> Result<Record, String> {
        let cbor = hub
            .unseal(&self.sealed)
            .ok_or("is not sealed to this hub's key, or was changed")?;
        let record = Record::from_cbor(&cbor).map_err(|e| format!("does not decode: {e}"))?;
        if (&record.id, record.captured_at_ms, &record.device_id)
            != (&self.id, self.captured_at_ms, &self.device_id)
        {
            return Err(format!(
                "is record {} of {}, the envelope says {} of {}",
                record.id, record.device_id, self.id, self.device_id
            ));
        }
        Ok(record)
    }

    pub fn to_cbor(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("an envelope always serialises");
        out
    }

    pub fn from_cbor(bytes: &[u8]) -> Result<Self, String> {
        let envelope: Envelope = ciborium::from_reader(bytes).map_err(|e| e.to_string())?;
        if envelope.format != ENVELOPE_FORMAT {
            return Err(format!(
                "envelope format {}, expected {ENVELOPE_FORMAT}",
                envelope.format
            ));
        }
        Ok(envelope)
    }
}

/// One capture: who, when, which model, the embedding and what the device made of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Record format version ([`RECORD_FORMAT`]).
    pub format: u32,
    /// 128 random bits, hex: unique across devices, the hub's dedup key.
    pub id: String,
    /// Capture time, milliseconds since the Unix epoch (device clock).
    pub captured_at_ms: i64,
    pub device_id: String,
    pub model_id: String,
    /// Which export of the model produced the embedding (`fp32`, `int8`, … on the wire).
    pub precision: Precision,
    pub embedding: StoredEmbedding,
    pub heads: Vec<HeadResult>,
    pub quality: Option<QualityResult>,
    /// Where the frame came from (file name, camera).
    pub source: Option<String>,
    #[serde(with = "serde_bytes")]
    pub thumbnail_jpeg: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingType {
    F32,
    F16,
}

/// An embedding as a record stores it: little-endian bytes of `dtype` (the model's output,
/// `dermedge_core::Embedding`, is f32 values with the model that made them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredEmbedding {
    pub dtype: EmbeddingType,
    pub dim: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl StoredEmbedding {
    pub fn new(values: &[f32], dtype: EmbeddingType) -> Self {
        let data = match dtype {
            EmbeddingType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            EmbeddingType::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        Self {
            dtype,
            dim: values.len() as u32,
            data,
        }
    }

    /// The values as f32; `None` when the byte length does not match `dim` and `dtype`.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let width = match self.dtype {
            EmbeddingType::F32 => 4,
            EmbeddingType::F16 => 2,
        };
        if self.data.len() != self.dim as usize * width {
            return None;
        }
        Some(match self.dtype {
            EmbeddingType::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            EmbeddingType::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }
}

/// One head's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadResult {
    pub head: String,
    pub classes: Vec<String>,
    pub probabilities: Vec<f32>,
    /// The hub's publication number of the head that answered; `None` for a local head file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

impl HeadResult {
    /// The head's name, with ` v<version>` for a head the hub published.
    pub fn label(&self) -> String {
        match self.version {
            Some(v) => format!("{} v{v}", self.head),
            None => self.head.clone(),
        }
    }
}

/// The image-quality gate's verdict on the frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityResult {
    pub acceptable: bool,
    pub reasons: Vec<String>,
    pub metrics: BTreeMap<String, f32>,
}

/// Milliseconds since the Unix epoch on the device clock (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A fresh record id: 128 random bits as hex.
pub fn new_record_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Record {
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).expect("a record always serialises");
        out
    }

    pub fn from_cbor(bytes: &[u8]) -> Result<Self, String> {
        let record: Record = ciborium::from_reader(bytes).map_err(cbor_error)?;
        if record.format != RECORD_FORMAT {
            return Err(format!(
                "record format {}, expected {RECORD_FORMAT}",
                record.format
            ));
        }
        Ok(record)
    }
}

/// A decoding error as a reader wants it: a field's own message without the decoder's wrapping.
fn cbor_error(e: ciborium::de::Error<std::io::Error>) -> String {
    match e {
        ciborium::de::Error::Semantic(_, message) => message,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_round_trip_in_both_widths() {
        let values = [0.5f32, -1.25, 3.0e-3, 1024.0];
        let e = StoredEmbedding::new(&values, EmbeddingType::F32);
        assert_eq!(e.data.len(), 16);
        assert_eq!(e.to_f32().unwrap(), values);
        let h = StoredEmbedding::new(&values, EmbeddingType::F16);
        assert_eq!(h.data.len(), 8);
        let back = h.to_f32().unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() * 1e-3, "{a} vs {b}");
        }
        let broken = StoredEmbedding { dim: 5, ..e };
        assert!(broken.to_f32().is_none());
    }

    #[test]
    fn ids_are_unique_hex() {
        let a = new_record_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_record_id());
    }
}
