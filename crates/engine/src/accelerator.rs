//! Where inference runs, and what happens when that place is not available.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A compute device a backend may run the model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accelerator {
    /// The CPU (XNNPACK kernels in LiteRT). Always available.
    Cpu,
    /// A GPU through the runtime's GPU accelerator (Jetson-class boards).
    Gpu,
    /// A vendor NPU through the runtime's NPU dispatch.
    Npu,
    /// A Coral Edge TPU through `libedgetpu`'s delegate (classic TFLite API).
    EdgeTpu,
}

impl Accelerator {
    pub const ALL: [Accelerator; 4] = [
        Accelerator::Cpu,
        Accelerator::Gpu,
        Accelerator::Npu,
        Accelerator::EdgeTpu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Accelerator::Cpu => "cpu",
            Accelerator::Gpu => "gpu",
            Accelerator::Npu => "npu",
            Accelerator::EdgeTpu => "edge-tpu",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Accelerator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Accelerator::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                format!("unknown accelerator {s:?}; expected one of cpu, gpu, npu, edge-tpu")
            })
    }
}

/// What to do when the requested accelerator cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Run on the CPU instead and log a warning saying why (the default).
    #[default]
    Cpu,
    /// Fail with [`crate::EngineError::AcceleratorUnavailable`].
    Fail,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Accelerator::ALL {
            assert_eq!(a.name().parse::<Accelerator>().unwrap(), a);
        }
        assert!("tpu"
            .parse::<Accelerator>()
            .unwrap_err()
            .contains("edge-tpu"));
    }
}
