//! aarch64 (under QEMU) vs x86_64 embeddings of the fixture images, written by
//! `cross/test-aarch64.sh` into DERMEDGE_CROSS_DIR (`x86_64.<precision>.npy` and one
//! `aarch64-<qemu cpu>.<precision>.npy` per emulated core, and the fp32 model asked for fp16
//! arithmetic: `aarch64-<qemu cpu>.fp32-fp16-arithmetic.npy`); that script runs these ignored tests.

use std::path::PathBuf;

use dermedge_e2e::{cosine, read_npy_rows};

/// fp32: the same gate as TFLite vs TensorFlow.
const FP32_MIN_COSINE: f64 = 0.99999;
const FP32_MAX_ABS_PER_NORM: f32 = 1e-4;
/// int8: integer kernels may round requantisation differently per ISA.
const INT8_MIN_COSINE: f64 = 0.999;
/// The emulated cores of the target boards, as `cross/test-aarch64.sh` names them.
const CPUS: [&str; 2] = ["cortex-a76", "neoverse-n1"];

#[test]
#[ignore = "needs the aarch64 embeddings cross/test-aarch64.sh produces"]
fn aarch64_embeddings_match_x86_64() {
    let dir = PathBuf::from(
        std::env::var_os("DERMEDGE_CROSS_DIR")
            .expect("DERMEDGE_CROSS_DIR: run cross/test-aarch64.sh"),
    );
    for (precision, cpu) in ["fp32", "int8"]
        .into_iter()
        .flat_map(|p| CPUS.map(|c| (p, c)))
    {
        let x86 = read_npy_rows(&dir.join(format!("x86_64.{precision}.npy")));
        let arm = read_npy_rows(&dir.join(format!("aarch64-{cpu}.{precision}.npy")));
        assert_eq!(x86.len(), arm.len());
        assert!(!x86.is_empty(), "{precision}: no embeddings");
        let mut worst = 1.0f64;
        for (a, b) in x86.iter().zip(&arm) {
            let c = cosine(a, b);
            worst = worst.min(c);
            let norm = a.iter().map(|v| v * v).sum::<f32>().sqrt();
            let max_abs = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            if precision == "fp32" {
                assert!(
                    c >= FP32_MIN_COSINE && max_abs <= FP32_MAX_ABS_PER_NORM * norm,
                    "fp32 on {cpu}: cosine {c}, max abs {max_abs}"
                );
            } else {
                assert!(c >= INT8_MIN_COSINE, "int8 on {cpu}: cosine {c}");
            }
        }
        eprintln!(
            "{precision}: aarch64 ({cpu}) vs x86_64, minimum cosine over {} images: {worst:.7}",
            x86.len()
        );
    }
}

/// What the embeddings' index (`<file>.npy.json`) says ran them.
fn runtime_of(path: &std::path::Path) -> String {
    let index = std::fs::read_to_string(format!("{}.json", path.display())).unwrap();
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    index["model"]["runtime"].as_str().unwrap().to_string()
}

#[test]
#[ignore = "needs the aarch64 embeddings cross/test-aarch64.sh produces"]
fn fp16_arithmetic_runs_on_the_cortex_a76_and_falls_back_on_the_a72() {
    let dir = PathBuf::from(
        std::env::var_os("DERMEDGE_CROSS_DIR")
            .expect("DERMEDGE_CROSS_DIR: run cross/test-aarch64.sh"),
    );
    let x86 = read_npy_rows(&dir.join("x86_64.fp32.npy"));
    let a76_fp32 = read_npy_rows(&dir.join("aarch64-cortex-a76.fp32.npy"));
    for (cpu, native) in [("cortex-a76", true), ("cortex-a72", false)] {
        let path = dir.join(format!("aarch64-{cpu}.fp32-fp16-arithmetic.npy"));
        let runtime = runtime_of(&path);
        assert_eq!(
            runtime.contains("fp16 arithmetic"),
            native,
            "{cpu}: the index says {runtime:?}"
        );
        let rows = read_npy_rows(&path);
        assert!(
            !rows.is_empty() && rows.len() <= x86.len(),
            "{cpu}: {} rows",
            rows.len()
        );
        let mut worst = 1.0f64;
        for ((h, f), x) in rows.iter().zip(&a76_fp32).zip(&x86) {
            let c = cosine(h, x);
            worst = worst.min(c);
            if native {
                // float16 rounding of every activation: close to fp32, never identical to it.
                assert!(
                    c >= 0.999,
                    "fp16 arithmetic on {cpu}: cosine {c} to x86_64 fp32"
                );
                assert!(
                    h.iter().zip(f).any(|(a, b)| a.to_bits() != b.to_bits()),
                    "fp16 arithmetic on {cpu} gave the fp32 embedding bit for bit"
                );
            } else {
                assert!(
                    c >= FP32_MIN_COSINE,
                    "the fp32 fallback on {cpu}: cosine {c} to x86_64 fp32"
                );
            }
        }
        eprintln!("fp32 model, fp16 asked, on {cpu} ({runtime}): minimum cosine to x86_64 fp32 {worst:.7}");
    }
}
