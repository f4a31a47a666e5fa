//! Which runtime backend runs a model, where inference runs, and what happens when that place
//! is not available: the choices a device configuration makes, shared by the engine and the
//! device application.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A compute device a backend may run the model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accelerator {
    /// The CPU (XNNPACK kernels in LiteRT). Always available.
    #[default]
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

/// The arithmetic the CPU (XNNPACK) runs a model's float ops in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuArithmetic {
    /// As the file says: float32 for float ops (fp16 weights are unpacked to float32 at load).
    #[default]
    Fp32,
    /// float16 arithmetic for float ops (XNNPACK's force-fp16): native on ARMv8.2 cores
    /// (Cortex-A76, A78AE) and on x86 with AVX512-FP16, about twice float32's throughput there;
    /// other x86 CPUs may emulate it, slowly. Integer ops are unchanged. Where XNNPACK cannot run
    /// it (Cortex-A72), one run at load finds out and the engine falls back to float32 (logged)
    /// or fails, as the fallback policy says. CPU accelerator, LiteRT backend only.
    Fp16,
}

impl CpuArithmetic {
    pub const ALL: [CpuArithmetic; 2] = [CpuArithmetic::Fp32, CpuArithmetic::Fp16];

    pub fn name(self) -> &'static str {
        match self {
            CpuArithmetic::Fp32 => "fp32",
            CpuArithmetic::Fp16 => "fp16",
        }
    }
}

impl fmt::Display for CpuArithmetic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuArithmetic {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuArithmetic::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| format!("unknown CPU arithmetic {s:?}; expected fp32 or fp16"))
    }
}

/// What to do when the requested accelerator cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Run on the CPU instead and log a warning saying why (the default).
    #[default]
    Cpu,
    /// Fail with the engine's "accelerator unavailable" error.
    Fail,
}

/// A TFLite runtime backend. Each is a cargo feature of this crate; only the ones built in can
/// be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// LiteRT 2.x (`libLiteRt.so`, loaded at run time): CPU (XNNPACK), GPU, NPU.
    #[default]
    Litert,
    /// The classic TensorFlow Lite C API (`libtensorflowlite_c`, linked): CPU and the Coral
    /// Edge TPU.
    Classic,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Litert, Backend::Classic];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Litert => "litert",
            Backend::Classic => "classic",
        }
    }

    /// The cargo feature (of `dermedge-engine`, and of the `dermedge` binary) that builds it in;
    /// `dermedge_engine::is_built` says whether this build has it.
    pub fn feature(self) -> &'static str {
        self.name()
    }

    /// The accelerators the backend can reach (the CPU always).
    pub fn accelerators(self) -> &'static [Accelerator] {
        match self {
            Backend::Litert => &[Accelerator::Cpu, Accelerator::Gpu, Accelerator::Npu],
            Backend::Classic => &[Accelerator::Cpu, Accelerator::EdgeTpu],
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown backend {s:?}; expected litert or classic"))
    }
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
        for a in CpuArithmetic::ALL {
            assert_eq!(a.name().parse::<CpuArithmetic>().unwrap(), a);
        }
        assert!("half"
            .parse::<CpuArithmetic>()
            .unwrap_err()
            .contains("fp16"));
    }
}
