//! How an embedder is set up: threads, accelerator, fallback and which runtime library to use.

use std::path::PathBuf;

use crate::{Accelerator, Backend, CpuArithmetic, EngineError, Fallback};

/// Options for loading a model.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    /// Which runtime runs the model.
    pub backend: Backend,
    /// CPU threads for inference; `None` uses every available core.
    pub threads: Option<u32>,
    pub accelerator: Accelerator,
    pub fallback: Fallback,
    /// Runtime library (file or directory) to use instead of the search path.
    pub runtime_path: Option<PathBuf>,
    /// Accept a runtime library whose sha256 is not the pinned one (logged as a warning).
    pub allow_unpinned_runtime: bool,
    /// XNNPACK weight cache file: packed weights are written on the first start and mapped on
    /// later ones, so a restart skips repacking (CPU only).
    pub weight_cache: Option<PathBuf>,
    /// The arithmetic of float ops on the CPU (LiteRT's XNNPACK only).
    pub cpu_arithmetic: CpuArithmetic,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            threads: None,
            accelerator: Accelerator::Cpu,
            fallback: Fallback::Cpu,
            runtime_path: None,
            allow_unpinned_runtime: false,
            weight_cache: None,
            cpu_arithmetic: CpuArithmetic::Fp32,
        }
    }
}

/// Most threads accepted; more is a configuration mistake on any device dermedge targets.
pub const MAX_THREADS: u32 = 256;

impl EngineOptions {
    /// The thread count to use, validated.
    pub fn resolved_threads(&self) -> Result<u32, EngineError> {
        match self.threads {
            Some(0) => Err(EngineError::InvalidOption {
                field: "threads",
                message: format!("0 is not a thread count; expected 1 to {MAX_THREADS}"),
            }),
            Some(n) if n > MAX_THREADS => Err(EngineError::InvalidOption {
                field: "threads",
                message: format!("{n} is too many; expected 1 to {MAX_THREADS}"),
            }),
            Some(n) => Ok(n),
            None => Ok(std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_are_validated() {
        let mut o = EngineOptions {
            threads: Some(0),
            ..Default::default()
        };
        assert!(o
            .resolved_threads()
            .unwrap_err()
            .to_string()
            .contains("threads"));
        o.threads = Some(100_000);
        assert!(o.resolved_threads().is_err());
        o.threads = Some(2);
        assert_eq!(o.resolved_threads().unwrap(), 2);
        o.threads = None;
        assert!(o.resolved_threads().unwrap() >= 1);
    }
}
