//! Which export of a model made an embedding.

use serde::{Deserialize, Deserializer, Serialize};

/// The numeric precision of a model export: in its manifest, and in every record it embedded.
///
/// Read from text by [`FromStr`](std::str::FromStr), and so by serde: an unknown value is
/// refused naming the field and what it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    Fp32,
    Fp16,
    Int8,
    Int16x8,
    DynamicInt8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Precision {
    pub const ALL: [Precision; 5] = [
        Precision::Fp32,
        Precision::Fp16,
        Precision::Int8,
        Precision::Int16x8,
        Precision::DynamicInt8,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
            Precision::Int16x8 => "int16x8",
            Precision::DynamicInt8 => "dynamic-int8",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| {
                // The text may come from a device: shown cut short.
                let shown: String = text.chars().take(32).collect();
                let cut = if shown.len() < text.len() { "…" } else { "" };
                format!(
                    "precision {shown:?}{cut}: expected one of {}",
                    Precision::ALL.map(Precision::as_str).join(", ")
                )
            })
    }
}

impl<'de> Deserialize<'de> for Precision {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_precision_reads_back_and_others_are_named() {
        for p in Precision::ALL {
            assert_eq!(p.as_str().parse::<Precision>(), Ok(p));
            let json = serde_json_like(p);
            assert_eq!(json, p.as_str());
        }
        let err = "int8,extra".parse::<Precision>().unwrap_err();
        assert_eq!(
            err,
            "precision \"int8,extra\": expected one of fp32, fp16, int8, int16x8, dynamic-int8"
        );
    }

    /// The text serde writes for `p`, through CBOR.
    fn serde_json_like(p: Precision) -> String {
        let mut out = Vec::new();
        ciborium::into_writer(&p, &mut out).unwrap();
        let back: Precision = ciborium::from_reader(out.as_slice()).unwrap();
        assert_eq!(back, p);
        let value: ciborium::Value = ciborium::from_reader(out.as_slice()).unwrap();
        value.into_text().unwrap()
    }
}
