//! Every runtime backend on the committed df-mini fixture: golden embeddings, determinism, threads,
//! quantised models, accelerator fallback, and the manifest/model disagreements it must refuse.
//! The tests every backend must pass are one body each, instantiated per backend by
//! `embedder_suite!`: LiteRT always, the classic TensorFlow Lite backend with `--features classic`.

use std::fs;
use std::path::{Path, PathBuf};

use dermedge_core::preprocess::{decode_file, DecodeLimits};
use dermedge_core::{embedding::cosine, Embedder, ModelManifest};
use dermedge_engine::{
    litert::LiteRtEmbedder, Accelerator, CpuArithmetic, EngineError, EngineOptions, Fallback,
    Quantization,
};

/// fp32 TFLite vs the TensorFlow graph: the gate the foundation issue sets.
const FP32_MIN_COSINE: f64 = 0.99999;
const FP32_MAX_ABS_PER_NORM: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn manifest(precision: &str) -> ModelManifest {
    ModelManifest::load(fixtures().join(format!("df-mini/df-mini.{precision}.toml"))).unwrap()
}

fn options(threads: u32) -> EngineOptions {
    EngineOptions {
        threads: Some(threads),
        ..Default::default()
    }
}

fn fixture_images() -> Vec<String> {
    let index: String = fs::read_to_string(fixtures().join("reference/index.json")).unwrap();
    let start = index.find("\"images\": [").unwrap();
    let list = &index[start + 11..];
    let list = &list[..list.find(']').unwrap()];
    list.split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// golden.df-mini.npy: float32 [n, 6144], C order.
fn golden() -> Vec<Vec<f32>> {
    let npy = fs::read(fixtures().join("reference/golden.df-mini.npy")).unwrap();
    let (shape, values) = dermedge_core::npy::read_f32(&npy).unwrap();
    values.chunks(shape[1]).map(<[f32]>::to_vec).collect()
}

fn embed_all(embedder: &mut impl Embedder) -> Vec<Vec<f32>> {
    fixture_images()
        .iter()
        .map(|name| {
            let image = decode_file(
                &fixtures().join("images").join(name),
                &DecodeLimits::default(),
            )
            .unwrap();
            embedder.embed(&image).unwrap().values
        })
        .collect()
}

fn copy_fixture(dir: &Path, precision: &str) -> PathBuf {
    for ext in ["toml", "tflite"] {
        let name = format!("df-mini.{precision}.{ext}");
        fs::copy(fixtures().join("df-mini").join(&name), dir.join(&name)).unwrap();
    }
    dir.join(format!("df-mini.{precision}.toml"))
}

/// The tests every backend must pass, in a module named after the backend.
macro_rules! embedder_suite {
    ($module:ident, $embedder:ty, $small_model:expr) => {
        mod $module {
            use super::*;
            type E = $embedder;

            fn load_err(manifest_path: &Path) -> String {
                let manifest = ModelManifest::load(manifest_path).map_err(|e| e.to_string());
                match manifest {
                    Err(e) => e,
                    Ok(m) => E::load(&m, &options(1))
                        .err()
                        .expect("load must fail")
                        .to_string(),
                }
            }

            #[test]
            fn bad_models_and_manifests_are_refused_with_clear_errors() {
                let dir = tempfile::tempdir().unwrap();
                let toml = copy_fixture(dir.path(), "fp32");
                let tflite = dir.path().join("df-mini.fp32.tflite");
                let text = fs::read_to_string(&toml).unwrap();

                // Wrong embedding dimension.
                fs::write(
                    &toml,
                    text.replace("embedding_dim = 6144", "embedding_dim = 2048"),
                )
                .unwrap();
                let err = load_err(&toml);
                assert!(
                    err.contains("embedding_dim") && err.contains("6144"),
                    "{err}"
                );

                // Wrong input size.
                fs::write(&toml, text.replace("width = 448", "width = 224")).unwrap();
                let err = load_err(&toml);
                assert!(
                    err.contains("[1, 448, 448, 3]") && err.contains("224"),
                    "{err}"
                );

                // Wrong output name.
                fs::write(
                    &toml,
                    text.replace("name = \"embedding\"", "name = \"logits\""),
                )
                .unwrap();
                let err = load_err(&toml);
                assert!(err.contains("logits") && err.contains("embedding"), "{err}");

                // Wrong input dtype.
                fs::write(
                    &toml,
                    text.replace("dtype = \"float32\"\nresize", "dtype = \"uint8\"\nresize")
                        .replace(
                            "offset = 0.0",
                            "offset = 0.0\n[input.quantization]\nscale = 0.0039215689\nzero_point = 0",
                        ),
                )
                .unwrap();
                let err = load_err(&toml);
                assert!(err.contains("float32") && err.contains("uint8"), "{err}");

                // sha256 that does not match the file.
                fs::write(&toml, &text).unwrap();
                let bytes = fs::read(&tflite).unwrap();
                fs::write(&tflite, &bytes[..bytes.len() / 3]).unwrap();
                let err = load_err(&toml);
                assert!(
                    err.contains("sha256") && err.contains("df-mini.fp32.tflite"),
                    "{err}"
                );

                // A truncated model whose manifest was (wrongly) regenerated: the runtime must refuse it too.
                let truncated_sha = dermedge_core::manifest::sha256_hex(&bytes[..bytes.len() / 3]);
                let sha_line = text.lines().find(|l| l.starts_with("sha256")).unwrap();
                fs::write(
                    &toml,
                    text.replace(sha_line, &format!("sha256 = \"{truncated_sha}\"")),
                )
                .unwrap();
                let err = load_err(&toml);
                assert!(err.contains("df-mini.fp32.tflite"), "{err}");

                // A text file named .tflite.
                let junk = b"this is not a model at all, just some text that happens to be long enough........";
                fs::write(&tflite, junk).unwrap();
                let junk_sha = dermedge_core::manifest::sha256_hex(junk);
                fs::write(
                    &toml,
                    text.replace(sha_line, &format!("sha256 = \"{junk_sha}\"")),
                )
                .unwrap();
                let err = load_err(&toml);
                assert!(err.contains("not a TFLite model"), "{err}");

                // Missing model file.
                fs::remove_file(&tflite).unwrap();
                let err = load_err(&toml);
                assert!(err.contains("cannot be read"), "{err}");
            }

            #[test]
            fn edge_tpu_without_a_coral_falls_back_to_cpu_or_fails_as_asked() {
                let requested = EngineOptions {
                    accelerator: Accelerator::EdgeTpu,
                    ..options(1)
                };
                let model = $small_model;
                let mut embedder = E::load(&model, &requested).unwrap();
                assert_eq!(embedder.accelerator(), Accelerator::Cpu);
                let image = decode_file(
                    &fixtures().join("images/astronaut-480.png"),
                    &DecodeLimits::default(),
                )
                .unwrap();
                assert_eq!(
                    embedder.embed(&image).unwrap().dim(),
                    model.model.embedding_dim
                );
                let strict = EngineOptions {
                    fallback: Fallback::Fail,
                    ..requested
                };
                let err = E::load(&model, &strict)
                    .err()
                    .expect("must fail");
                assert!(
                    matches!(err, EngineError::AcceleratorUnavailable { .. }),
                    "{err}"
                );
            }
        }
    };
}

embedder_suite!(litert_backend, LiteRtEmbedder, manifest("fp32"));
// TensorFlow Lite 2.6 (the classic library CI links) cannot run df-mini's rank-5 GroupNorm
// broadcasts, so its run uses the one-op Edge TPU fixture; tests/classic.rs has the rest.
#[cfg(feature = "classic")]
embedder_suite!(
    classic_backend,
    dermedge_engine::classic::ClassicEmbedder,
    ModelManifest::load(fixtures().join("edgetpu/patch.toml")).unwrap()
);

// LiteRT only: golden embeddings, determinism, int8, signatures, and the GPU/NPU accelerators.

#[test]
fn fp32_matches_the_tensorflow_golden_embeddings() {
    let mut embedder = LiteRtEmbedder::load(&manifest("fp32"), &options(2)).unwrap();
    assert_eq!(embedder.accelerator(), Accelerator::Cpu);
    let ours = embed_all(&mut embedder);
    let golden = golden();
    assert_eq!(ours.len(), golden.len());
    for (name, (a, g)) in fixture_images().iter().zip(ours.iter().zip(&golden)) {
        assert_eq!(a.len(), 6144);
        let cos = cosine(a, g);
        let norm = g.iter().map(|v| v * v).sum::<f32>().sqrt();
        let max_abs = a
            .iter()
            .zip(g)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(cos >= FP32_MIN_COSINE, "{name}: cosine {cos}");
        assert!(
            max_abs <= FP32_MAX_ABS_PER_NORM * norm,
            "{name}: max abs {max_abs} vs norm {norm}"
        );
    }
}

#[test]
fn same_threads_give_bit_identical_embeddings() {
    for threads in [1, 2] {
        let mut first = LiteRtEmbedder::load(&manifest("fp32"), &options(threads)).unwrap();
        let a = embed_all(&mut first);
        let b = embed_all(&mut first);
        drop(first);
        let mut second = LiteRtEmbedder::load(&manifest("fp32"), &options(threads)).unwrap();
        let c = embed_all(&mut second);
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            assert!(
                x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{threads} threads: run 2 differs"
            );
            assert!(
                x.iter().zip(z).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{threads} threads: reload differs"
            );
        }
    }
}

#[test]
fn int8_model_runs_and_stays_close_to_fp32() {
    let mut int8 = LiteRtEmbedder::load(&manifest("int8"), &options(2)).unwrap();
    assert!(
        matches!(int8.input_details().quantization, Quantization::None),
        "float-in model"
    );
    let q = embed_all(&mut int8);
    for (name, (a, g)) in fixture_images().iter().zip(q.iter().zip(&golden())) {
        let cos = cosine(a, g);
        // A seeded, untrained network quantised with 24 calibration patches: loose, but a broken
        // dequantisation or wrong input mapping lands far below this.
        assert!(cos > 0.98, "{name}: int8 vs fp32 cosine {cos}");
    }
}

#[test]
fn tensor_details_are_exposed() {
    let embedder = LiteRtEmbedder::load(&manifest("fp32"), &options(1)).unwrap();
    assert_eq!(embedder.input_details().shape, vec![1, 448, 448, 3]);
    assert_eq!(embedder.output_details().shape, vec![1, 6144]);
    assert_eq!(embedder.output_details().name, "embedding");
    assert_eq!(embedder.signature_key(), "serving_default");
}

#[test]
fn unavailable_accelerators_fall_back_to_cpu_or_fail_as_asked() {
    for requested in [Accelerator::Gpu, Accelerator::Npu] {
        let fallback = EngineOptions {
            accelerator: requested,
            ..options(1)
        };
        let mut embedder = LiteRtEmbedder::load(&manifest("fp32"), &fallback).unwrap();
        let image = decode_file(
            &fixtures().join("images/astronaut-480.png"),
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(embedder.embed(&image).unwrap().dim(), 6144);
        if embedder.accelerator() == Accelerator::Cpu {
            let strict = EngineOptions {
                fallback: Fallback::Fail,
                ..fallback
            };
            let err = LiteRtEmbedder::load(&manifest("fp32"), &strict)
                .err()
                .expect("must fail");
            assert!(
                matches!(err, EngineError::AcceleratorUnavailable { .. }),
                "{err}"
            );
        }
    }
}

/// `[output.correction]` is applied by `dermedge_engine::load` to whatever the backend returns:
/// every value becomes `x * scale + offset` of the uncorrected model's, and a damaged correction
/// is refused before the model loads. `toml` is a manifest in `dir`, loaded with `options`.
fn check_output_correction(dir: &Path, toml: &Path, options: &EngineOptions) {
    let plain = ModelManifest::load(toml).unwrap();
    let dim = plain.model.embedding_dim;
    let scale: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
    let offset: Vec<f32> = (0..dim).map(|i| (i % 5) as f32 - 2.0).collect();
    let mut npy = Vec::new();
    dermedge_core::npy::write_f32_rows(&mut npy, dim, [&scale[..], &offset[..]].into_iter())
        .unwrap();
    fs::write(dir.join("c.npy"), &npy).unwrap();
    let section = format!(
        "[output.correction]\nfile = \"c.npy\"\nsha256 = \"{}\"\n",
        dermedge_core::sha256_hex(&npy)
    );
    let text = fs::read_to_string(toml).unwrap();
    let corrected_toml = dir.join("corrected.toml");
    fs::write(
        &corrected_toml,
        text.replace("[provenance]", &format!("{section}\n[provenance]")),
    )
    .unwrap();
    let corrected = ModelManifest::load(&corrected_toml).unwrap();

    let image = decode_file(
        &fixtures().join("images/astronaut-480.png"),
        &DecodeLimits::default(),
    )
    .unwrap();
    let x = dermedge_engine::load(&plain, options)
        .unwrap()
        .embed(&image)
        .unwrap()
        .values;
    let mut model = dermedge_engine::load(&corrected, options).unwrap();
    let y = model.embed(&image).unwrap().values;
    for i in 0..dim {
        assert_eq!(y[i], x[i] * scale[i] + offset[i], "value {i}");
    }
    // The staged path (benchmarks) is corrected too.
    model.fill_input(&image).unwrap();
    model.invoke().unwrap();
    assert_eq!(model.read_output().unwrap(), y);
    assert!(model.runtime_description().contains("output corrected"));

    // One flipped byte in the correction file: refused, naming it and the checksum.
    npy[200] ^= 1;
    fs::write(dir.join("c.npy"), &npy).unwrap();
    let err = dermedge_engine::load(&corrected, options)
        .err()
        .expect("a damaged correction must be refused")
        .to_string();
    assert!(err.contains("c.npy") && err.contains("sha256"), "{err}");
}

#[test]
fn an_output_correction_is_applied_to_every_value() {
    let dir = tempfile::tempdir().unwrap();
    let toml = copy_fixture(dir.path(), "int8");
    check_output_correction(dir.path(), &toml, &options(1));
}

/// The correction wraps whichever backend runs the model: the classic one too, on the one-op
/// fixture TensorFlow Lite 2.6 can run.
#[cfg(feature = "classic")]
#[test]
fn an_output_correction_is_applied_on_the_classic_backend_too() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["patch.toml", "patch.tflite"] {
        fs::copy(fixtures().join("edgetpu").join(name), dir.path().join(name)).unwrap();
    }
    let classic = EngineOptions {
        backend: dermedge_engine::Backend::Classic,
        ..options(1)
    };
    check_output_correction(dir.path(), &dir.path().join("patch.toml"), &classic);
}

/// Resident bytes of `path`'s mappings in this process.
fn resident_bytes_of(path: &Path) -> u64 {
    dermedge_core::memory::resident_by_mapping()
        .get(&*path.to_string_lossy())
        .copied()
        .unwrap_or(0)
}

/// Once compiled for the CPU, XNNPACK runs from its packed weights, so the model file's pages
/// are released from the resident set. A fully delegated model (fp32) does not touch them again
/// while embedding; ops left to TFLite's own kernels (df-mini int8's float islands) read theirs
/// back.
#[test]
fn the_model_file_is_not_kept_resident_once_compiled() {
    let dir = tempfile::tempdir().unwrap();
    let image = decode_file(
        &fixtures().join("images/astronaut-480.png"),
        &DecodeLimits::default(),
    )
    .unwrap();
    for precision in ["fp32", "int8"] {
        let toml = copy_fixture(dir.path(), precision);
        let manifest = ModelManifest::load(&toml).unwrap();
        let model_path = manifest.model_path();
        let bytes = fs::metadata(&model_path).unwrap().len();
        let mut model = dermedge_engine::load(&manifest, &options(1)).unwrap();
        let after_load = resident_bytes_of(&model_path);
        assert!(
            after_load * 10 <= bytes,
            "{precision}: {after_load} of {bytes} bytes still resident after loading"
        );
        for _ in 0..2 {
            model.embed(&image).unwrap();
        }
        let after_embedding = resident_bytes_of(&model_path);
        if precision == "fp32" {
            assert!(
                after_embedding * 10 <= bytes,
                "fp32: {after_embedding} of {bytes} bytes resident after embedding"
            );
        }
        assert!(
            after_embedding < bytes / 2,
            "{precision}: {after_embedding} of {bytes}"
        );
    }
}

/// What this CPU's fp16 arithmetic must do: `Some(true)` where it is native and must run
/// (AVX512-FP16 on x86, FEAT_FP16 on aarch64), `Some(false)` where it cannot (aarch64 without
/// FEAT_FP16), `None` where XNNPACK may emulate it or not (x86 with F16C only).
fn cpu_has_fp16() -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        let info = fs::read_to_string("/proc/cpuinfo").ok()?;
        info.split_whitespace()
            .any(|flag| flag == "avx512_fp16")
            .then_some(true)
    }
    #[cfg(target_arch = "aarch64")]
    {
        Some(std::arch::is_aarch64_feature_detected!("fp16"))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        None
    }
}

#[test]
fn fp16_arithmetic_runs_where_the_cpu_has_it_and_falls_back_to_fp32_where_not() {
    let fp32 = embed_all(&mut LiteRtEmbedder::load(&manifest("fp32"), &options(1)).unwrap());
    let fp16_options = EngineOptions {
        cpu_arithmetic: CpuArithmetic::Fp16,
        ..options(1)
    };
    let mut embedder = LiteRtEmbedder::load(&manifest("fp32"), &fp16_options).unwrap();
    let ran = embedder.cpu_arithmetic();
    if let Some(has) = cpu_has_fp16() {
        let expected = if has {
            CpuArithmetic::Fp16
        } else {
            CpuArithmetic::Fp32
        };
        assert_eq!(ran, expected, "this CPU has fp16 arithmetic: {has}");
    }
    let fp16 = embed_all(&mut embedder);
    for (name, (h, f)) in fixture_images().iter().zip(fp16.iter().zip(&fp32)) {
        let identical = h.iter().zip(f).all(|(a, b)| a.to_bits() == b.to_bits());
        match ran {
            CpuArithmetic::Fp32 => assert!(identical, "{name}: the fp32 fallback must be fp32"),
            CpuArithmetic::Fp16 => {
                assert!(
                    !identical,
                    "{name}: fp16 arithmetic left every value bit-identical"
                );
                let cos = cosine(h, f);
                assert!(cos > 0.999, "{name}: fp16 vs fp32 cosine {cos}");
            }
        }
    }
    if ran == CpuArithmetic::Fp16 {
        assert_eq!(embedder.backend(), "litert/cpu+fp16");
    }
}
