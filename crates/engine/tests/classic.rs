//! The classic TensorFlow Lite backend: the Coral Edge TPU path through a libedgetpu built by
//! this test from `fake_edgetpu/fake_edgetpu.c` (the real dlopen, delegate and interpreter
//! path; only the chip is missing), models the linked runtime cannot run, and LiteRT vs classic
//! on the trained stand-in.
#![cfg(feature = "classic")]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use dermedge_core::preprocess::{decode_file, DecodeLimits};
use dermedge_core::{embedding::cosine, Embedder, ModelManifest, RgbImage};
use dermedge_engine::classic::ClassicEmbedder;
use dermedge_engine::litert::LiteRtEmbedder;
use dermedge_engine::{Accelerator, EngineError, EngineOptions, Fallback};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn image(name: &str) -> RgbImage {
    decode_file(
        &fixtures().join("images").join(name),
        &DecodeLimits::default(),
    )
    .unwrap()
}

/// Build the fake libedgetpu in `mode` into `dir`.
fn fake_edgetpu(dir: &Path, mode: &str) -> PathBuf {
    let out = dir.join(format!("libedgetpu-{mode}.so.1"));
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_edgetpu/fake_edgetpu.c");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror"])
        .arg(format!("-DFAKE_EDGETPU_MODE=\"{mode}\""))
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("a C compiler (cc)");
    assert!(status.success(), "building {}", out.display());
    out
}

/// The Edge TPU fixture, copied so each test can add or leave out the compiled file.
fn patch_model(dir: &Path, with_compiled: Option<&str>) -> ModelManifest {
    let src = fixtures().join("edgetpu");
    for name in ["patch.toml", "patch.tflite"] {
        fs::copy(src.join(name), dir.join(name)).unwrap();
    }
    if let Some(name) = with_compiled {
        fs::copy(src.join(name), dir.join("patch_edgetpu.tflite")).unwrap();
    }
    ModelManifest::load(dir.join("patch.toml")).unwrap()
}

fn edge_tpu(fallback: Fallback) -> EngineOptions {
    EngineOptions {
        threads: Some(1),
        accelerator: Accelerator::EdgeTpu,
        fallback,
        ..Default::default()
    }
}

fn load(
    manifest: &ModelManifest,
    fallback: Fallback,
    library: &Path,
) -> Result<ClassicEmbedder, EngineError> {
    ClassicEmbedder::load_with_edgetpu_library(manifest, &edge_tpu(fallback), Some(library))
}

#[test]
fn a_working_edge_tpu_runs_the_compiled_model_and_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let library = fake_edgetpu(dir.path(), "ok");
    let manifest = patch_model(dir.path(), Some("patch_edgetpu.tflite"));
    let mut tpu = load(&manifest, Fallback::Fail, &library).unwrap();
    assert_eq!(tpu.accelerator(), Accelerator::EdgeTpu);
    assert_eq!(tpu.backend(), "tflite-classic/edge-tpu");
    let mut cpu = ClassicEmbedder::load(&manifest, &EngineOptions::default()).unwrap();
    for name in ["astronaut-480.png", "dermoscopy-patch1354a.bmp"] {
        let on_tpu = tpu.embed(&image(name)).unwrap().values;
        let on_cpu = cpu.embed(&image(name)).unwrap().values;
        assert_eq!(on_tpu.len(), 192);
        // The compiled op (run by the delegate) and RESHAPE (on the CPU) move the same bytes.
        assert_eq!(on_tpu, on_cpu, "{name}");
        assert!(on_tpu.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(on_tpu.iter().any(|&v| v > 0.0));
    }
}

#[test]
fn a_missing_runtime_library_falls_back_to_cpu_or_fails_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = patch_model(dir.path(), Some("patch_edgetpu.tflite"));
    let missing = dir.path().join("no-such/libedgetpu.so.1");
    let mut embedder = load(&manifest, Fallback::Cpu, &missing).unwrap();
    assert_eq!(embedder.accelerator(), Accelerator::Cpu);
    assert_eq!(
        embedder.embed(&image("chelsea-gray.png")).unwrap().dim(),
        192
    );
    let err = load(&manifest, Fallback::Fail, &missing).err().unwrap();
    let text = err.to_string();
    assert!(
        matches!(err, EngineError::AcceleratorUnavailable { .. })
            && text.contains("no-such/libedgetpu.so.1")
            && text.contains("libedgetpu1-std"),
        "{text}"
    );
    // A library that is not libedgetpu.
    let not_edgetpu = dir.path().join("libnot.so");
    let source = dir.path().join("not.c");
    fs::write(&source, "int unrelated(void) { return 1; }\n").unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC"])
        .arg(&source)
        .arg("-o")
        .arg(&not_edgetpu)
        .status()
        .unwrap();
    assert!(status.success());
    let err = load(&manifest, Fallback::Fail, &not_edgetpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("edgetpu_list_devices"), "{err}");
}

#[test]
fn no_device_and_a_refusing_delegate_fall_back_or_fail_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = patch_model(dir.path(), Some("patch_edgetpu.tflite"));
    for (mode, reason) in [
        ("no-device", "no Edge TPU device found"),
        ("fail", "could not be created"),
    ] {
        let library = fake_edgetpu(dir.path(), mode);
        let mut embedder = load(&manifest, Fallback::Cpu, &library).unwrap();
        assert_eq!(embedder.accelerator(), Accelerator::Cpu, "{mode}");
        assert_eq!(
            embedder.embed(&image("coffee-300x400.png")).unwrap().dim(),
            192
        );
        let err = load(&manifest, Fallback::Fail, &library)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(reason), "{mode}: {err}");
    }
}

#[test]
fn a_model_not_compiled_for_the_edge_tpu_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let library = fake_edgetpu(dir.path(), "ok");
    // No <name>_edgetpu.tflite next to the model.
    let manifest = patch_model(dir.path(), None);
    let err = load(&manifest, Fallback::Fail, &library)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("patch_edgetpu.tflite") && err.contains("edgetpu_compiler"),
        "{err}"
    );
    // A file by that name that is the plain model: no edgetpu-custom-op in it.
    let manifest = patch_model(dir.path(), Some("patch.tflite"));
    let err = load(&manifest, Fallback::Fail, &library)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no edgetpu-custom-op"), "{err}");
    // The fallback still runs the plain model on the CPU.
    let mut embedder = load(&manifest, Fallback::Cpu, &library).unwrap();
    assert_eq!(embedder.accelerator(), Accelerator::Cpu);
    assert_eq!(
        embedder.embed(&image("rocket-rgba.png")).unwrap().dim(),
        192
    );
}

#[test]
fn a_graph_the_linked_runtime_would_abort_on_is_refused_at_load() {
    let manifest = ModelManifest::load(fixtures().join("df-mini/df-mini.fp32.toml")).unwrap();
    let err = ClassicEmbedder::load(&manifest, &EngineOptions::default())
        .err()
        .expect("TensorFlow Lite 2.6 cannot run df-mini")
        .to_string();
    assert!(
        err.contains("rank-5") && err.contains("df-mini.fp32.tflite"),
        "{err}"
    );
}

/// The trained stand-in, when `dermedge models build lesion-x448` has built it.
fn lesion(precision: &str) -> Option<ModelManifest> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../../.cache/models/lesion-x448/lesion-x448.{precision}.toml"
    ));
    let required = std::env::var("DERMEDGE_REQUIRE_MODELS")
        .is_ok_and(|v| v.split(',').any(|m| m == "lesion-x448"));
    match ModelManifest::load(&path) {
        Ok(m) => Some(m),
        Err(e) if required => panic!("lesion-x448 is required: {e}"),
        Err(e) => {
            eprintln!("skipping: {e} (build it with `dermedge models build lesion-x448`)");
            None
        }
    }
}

#[test]
fn classic_and_litert_agree_on_the_trained_stand_in() {
    let names = [
        "dermoscopy-patch1354a.bmp",
        "dermoscopy-patch1840b.bmp",
        "astronaut-480.png",
    ];
    for (precision, min_cosine) in [("fp32", 0.9999), ("int8", 0.95)] {
        let Some(manifest) = lesion(precision) else {
            return;
        };
        let options = EngineOptions {
            threads: Some(2),
            ..Default::default()
        };
        let mut classic = ClassicEmbedder::load(&manifest, &options).unwrap();
        let mut litert = LiteRtEmbedder::load(&manifest, &options).unwrap();
        for name in names {
            let a = classic.embed(&image(name)).unwrap().values;
            let b = litert.embed(&image(name)).unwrap().values;
            let c = cosine(&a, &b);
            eprintln!("lesion-x448 {precision} {name}: classic vs LiteRT cosine {c:.6}");
            assert!(c >= min_cosine, "{precision} {name}: cosine {c}");
        }
    }
}
