//! The one loader: it picks the backend, checks that this build has it, and loads the model.

use crate::correction::{Corrected, OutputCorrection};
use crate::{Accelerator, Backend, CpuArithmetic, EngineError, EngineOptions, TensorDetails};
use dermedge_core::{EmbedError, Embedder, ModelManifest};

/// Whether this build carries `backend`.
pub fn is_built(backend: Backend) -> bool {
    match backend {
        Backend::Litert => cfg!(feature = "litert"),
        Backend::Classic => cfg!(feature = "classic"),
    }
}

/// A model loaded by a backend: an [`Embedder`] that also says what it runs on.
pub trait LoadedModel: Embedder + Send {
    fn signature_key(&self) -> &str;
    fn input_details(&self) -> &TensorDetails;
    fn output_details(&self) -> &TensorDetails;
    /// The accelerator the model actually runs on (after any fallback).
    fn accelerator(&self) -> Accelerator;
    fn threads(&self) -> u32;
    /// The arithmetic float ops run in on the CPU (after any fallback).
    fn cpu_arithmetic(&self) -> CpuArithmetic;
    /// The three stages of [`Embedder::embed`], for benchmarks that time each: preprocess
    /// `image` into the input tensor, run the model, read the output as `f32`.
    fn fill_input(&mut self, image: &dermedge_core::RgbImage) -> Result<(), EmbedError>;
    fn invoke(&mut self) -> Result<(), EmbedError>;
    fn read_output(&mut self) -> Result<Vec<f32>, EmbedError>;
}

impl Embedder for Box<dyn LoadedModel> {
    fn manifest(&self) -> &ModelManifest {
        (**self).manifest()
    }
    fn backend(&self) -> String {
        (**self).backend()
    }
    fn runtime_description(&self) -> String {
        (**self).runtime_description()
    }
    fn embed(
        &mut self,
        image: &dermedge_core::RgbImage,
    ) -> Result<dermedge_core::Embedding, dermedge_core::EmbedError> {
        (**self).embed(image)
    }
}

/// A requested accelerator this machine cannot give: an error under `Fallback::Fail`, else a
/// warning and `Ok` (the backend then runs on the CPU). One wording for every backend.
pub(crate) fn accelerator_unavailable(
    fallback: crate::Fallback,
    requested: Accelerator,
    reason: String,
) -> Result<(), EngineError> {
    match fallback {
        crate::Fallback::Fail => Err(EngineError::AcceleratorUnavailable {
            requested: requested.to_string(),
            reason,
        }),
        crate::Fallback::Cpu => {
            log::warn!("accelerator {requested} unavailable ({reason}); falling back to CPU");
            Ok(())
        }
    }
}

/// Whether this build can honour `options`: the backend built in, and the accelerator one the
/// backend can reach. `config check` and [`load`] both ask.
pub fn check_options(options: &EngineOptions) -> Result<(), EngineError> {
    let backend = options.backend;
    if !is_built(backend) {
        return Err(EngineError::BackendNotBuilt {
            backend: backend.name(),
            feature: backend.feature(),
        });
    }
    let accelerator = options.accelerator;
    if !backend.accelerators().contains(&accelerator) {
        let offering = Backend::ALL
            .into_iter()
            .find(|b| b.accelerators().contains(&accelerator))
            .unwrap_or(Backend::Litert);
        return Err(EngineError::AcceleratorNotOffered {
            backend: backend.name(),
            accelerator: accelerator.name(),
            other: offering.name(),
            feature: offering.feature(),
        });
    }
    check_cpu_arithmetic(options, backend)?;
    options.resolved_threads().map(|_| ())
}

/// fp16 arithmetic is XNNPACK's on the CPU: the LiteRT backend, the CPU accelerator, and no
/// weight cache (which packs one arithmetic's weights).
pub(crate) fn check_cpu_arithmetic(
    options: &EngineOptions,
    backend: Backend,
) -> Result<(), EngineError> {
    if options.cpu_arithmetic == CpuArithmetic::Fp32 {
        return Ok(());
    }
    let refused = |message: String| {
        Err(EngineError::InvalidOption {
            field: "cpu_arithmetic",
            message,
        })
    };
    if backend != Backend::Litert {
        return refused(format!(
            "fp16 is XNNPACK's, which the {} backend does not run; use litert or fp32",
            backend.name()
        ));
    }
    if options.accelerator != Accelerator::Cpu {
        return refused(format!(
            "fp16 is the CPU's (XNNPACK's) arithmetic; the {} accelerator has its own",
            options.accelerator
        ));
    }
    if options.weight_cache.is_some() {
        // The cache holds weights packed for one arithmetic; one file must not serve both.
        return refused(
            "fp16 with a weight cache is not supported: the cache packs float32 weights; \
             drop one of them"
                .into(),
        );
    }
    Ok(())
}

/// Load the model `manifest` names with the backend `options` choose. A backend that is not
/// built in, or an accelerator the backend cannot reach, is an error here; an accelerator the
/// backend can reach but this machine lacks falls back to the CPU with a logged warning unless
/// `options.fallback` is `fail`.
pub fn load(
    manifest: &ModelManifest,
    options: &EngineOptions,
) -> Result<Box<dyn LoadedModel>, EngineError> {
    check_options(options)?;
    log::info!(
        "loading {} with the {} backend ({} requested)",
        manifest.model_path().display(),
        options.backend,
        options.accelerator
    );
    // Checked before the model loads: a damaged correction should not cost a model load.
    let correction = OutputCorrection::for_manifest(manifest)?;
    let model: Box<dyn LoadedModel> = match options.backend {
        #[cfg(feature = "litert")]
        Backend::Litert => Box::new(crate::litert::LiteRtEmbedder::load(manifest, options)?),
        #[cfg(feature = "classic")]
        Backend::Classic => Box::new(crate::classic::ClassicEmbedder::load(manifest, options)?),
        #[allow(unreachable_patterns)]
        other => {
            return Err(EngineError::BackendNotBuilt {
                backend: other.name(),
                feature: other.feature(),
            })
        }
    };
    Ok(match correction {
        Some(correction) => Box::new(Corrected {
            inner: model,
            correction,
            file: manifest.correction_path().unwrap_or_default(),
        }),
        None => model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for b in Backend::ALL {
            assert_eq!(b.name().parse::<Backend>().unwrap(), b);
        }
        assert!("tflite".parse::<Backend>().unwrap_err().contains("litert"));
    }

    #[test]
    fn an_accelerator_the_backend_cannot_reach_names_the_one_that_can() {
        let options = EngineOptions {
            backend: Backend::Litert,
            accelerator: Accelerator::EdgeTpu,
            ..EngineOptions::default()
        };
        let message = check_options(&options).unwrap_err().to_string();
        if is_built(Backend::Litert) {
            assert!(message.contains("edge-tpu"), "{message}");
            assert!(message.contains("classic"), "{message}");
        }
    }

    #[test]
    fn a_backend_not_built_names_its_feature() {
        for backend in Backend::ALL.into_iter().filter(|b| !is_built(*b)) {
            let options = EngineOptions {
                backend,
                ..EngineOptions::default()
            };
            let message = check_options(&options).unwrap_err().to_string();
            assert!(
                message.contains(&format!("cargo feature `{}`", backend.feature())),
                "{message}"
            );
        }
    }

    #[test]
    fn fp16_arithmetic_needs_litert_built_in_and_no_weight_cache() {
        let fp16 = |backend, weight_cache: Option<&str>| EngineOptions {
            backend,
            cpu_arithmetic: CpuArithmetic::Fp16,
            weight_cache: weight_cache.map(Into::into),
            ..EngineOptions::default()
        };
        for backend in Backend::ALL.into_iter().filter(|b| is_built(*b)) {
            let plain = check_options(&fp16(backend, None));
            match backend {
                Backend::Litert => assert!(plain.is_ok(), "{plain:?}"),
                Backend::Classic => {
                    let message = plain.unwrap_err().to_string();
                    assert!(message.contains("cpu_arithmetic"), "{message}");
                    assert!(message.contains("litert"), "{message}");
                }
            }
        }
        if is_built(Backend::Litert) {
            let message = check_options(&fp16(Backend::Litert, Some("w.cache")))
                .unwrap_err()
                .to_string();
            assert!(message.contains("weight cache"), "{message}");
            let on_gpu = EngineOptions {
                accelerator: Accelerator::Gpu,
                ..fp16(Backend::Litert, None)
            };
            let message = check_options(&on_gpu).unwrap_err().to_string();
            assert!(message.contains("gpu"), "{message}");
        }
        // The classic backend refuses it whether or not it is built in.
        let message = check_cpu_arithmetic(&fp16(Backend::Classic, None), Backend::Classic)
            .unwrap_err()
            .to_string();
        assert!(message.contains("litert"), "{message}");
    }
}
