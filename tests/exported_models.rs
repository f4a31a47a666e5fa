//! The registry's exported models (built by `dermedge models build`) through the Rust side:
//! dermedge's preprocessing + LiteRT on the exported fp32 file must reproduce the SavedModel's own
//! `serving_default` (tf.Example with PNG bytes) on the same images, and every exported file must
//! run with its manifest.
//!
//! Models not built are reported and skipped, except those named in DERMEDGE_REQUIRE_MODELS
//! (comma-separated; scripts/test.sh builds and requires the CI models), which must be there.

use std::fs;
use std::path::Path;

mod binary;

use binary::dermedge;
use dermedge_e2e::{cosine, read_npy_rows, root, text};
use dermedge_fidelity::stats::percentile;
use serde_json::Value;

/// fp32 TFLite through Rust preprocessing vs the SavedModel serving path on PNG bytes.
const FP32_VS_SAVEDMODEL_MIN_COSINE: f64 = 0.9999;
/// Every how many evaluation images the int8 export embeds (16 of lesion-x448's 112).
const INT8_SAMPLE_STEP: usize = 7;

fn required() -> Vec<String> {
    std::env::var("DERMEDGE_REQUIRE_MODELS")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[test]
fn exported_models_reproduce_their_savedmodel_through_rust_preprocessing() {
    let registry: toml::Value =
        toml::from_str(&fs::read_to_string(root().join("models/models.toml")).unwrap()).unwrap();
    let required = required();
    let mut checked = Vec::new();
    for name in registry["models"].as_table().unwrap().keys() {
        let dir = root().join(".cache/models").join(name);
        if !dir.join("BUILT").is_file() {
            assert!(
                !required.contains(name),
                "{name} is required but not built: run `dermedge models build {name}`"
            );
            eprintln!("skipping {name}: not built (dermedge models build {name})");
            continue;
        }
        let report: Value = serde_json::from_str(
            &fs::read_to_string(dir.join(format!("{name}.export-report.json"))).unwrap(),
        )
        .unwrap();
        let images: Vec<String> = report["evaluation_images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let reference = read_npy_rows(&dir.join(format!("{name}.savedmodel-embeddings.npy")));
        assert_eq!(reference.len(), images.len());
        let tmp = tempfile::tempdir().unwrap();
        let mut outputs = Vec::new();
        // fp32 on every image (it must reproduce the SavedModel); int8 on a spread sample, only
        // to show it runs and points the same way (its fidelity is the fidelity suite's).
        let int8_images: Vec<&String> = images.iter().step_by(INT8_SAMPLE_STEP).collect();
        for precision in ["fp32", "int8"] {
            let manifest = dir.join(format!("{name}.{precision}.toml"));
            let info = dermedge(&[
                "model",
                "info",
                manifest.to_str().unwrap(),
                "--threads",
                "2",
            ]);
            assert!(
                info.status.success(),
                "{name} {precision}: model info failed: {}",
                text(&info.stderr)
            );
            let out = tmp.path().join(format!("{precision}.npy"));
            let mut args = vec![
                "embed",
                "--model",
                manifest.to_str().unwrap(),
                "--threads",
                "2",
                "--out",
                out.to_str().unwrap(),
            ];
            if precision == "fp32" {
                args.extend(images.iter().map(String::as_str));
            } else {
                args.extend(int8_images.iter().map(|s| s.as_str()));
            }
            let run = dermedge(&args);
            assert!(
                run.status.success(),
                "{name} {precision}: {}",
                text(&run.stderr)
            );
            outputs.push(read_npy_rows(&out));
        }
        let (fp32, int8) = (&outputs[0], &outputs[1]);
        let dim = fp32[0].len();
        assert_eq!(
            fp32[0].len(),
            reference[0].len(),
            "{name}: embedding dimension"
        );
        for ((image, ours), theirs) in images.iter().zip(fp32).zip(&reference) {
            let c = cosine(ours, theirs);
            assert!(
                c >= FP32_VS_SAVEDMODEL_MIN_COSINE,
                "{name}: {image}: fp32 TFLite (Rust preprocessing) vs SavedModel cosine {c}"
            );
        }
        assert_eq!(int8.len(), int8_images.len(), "{name}: int8 embeddings");
        let mut cos: Vec<f64> = fp32
            .iter()
            .step_by(INT8_SAMPLE_STEP)
            .zip(int8)
            .map(|(a, b)| cosine(a, b))
            .collect();
        cos.sort_by(f64::total_cmp);
        eprintln!(
            "{name} ({dim}-d): int8 vs fp32 cosine over {} of the evaluation images: min {:.4}, median {:.4}",
            cos.len(),
            cos[0],
            percentile(&cos, 0.5)
        );
        assert!(
            cos[0] > 0.0,
            "{name}: an int8 embedding points away from its fp32 one"
        );
        let teacher = dir.join(format!("{name}.teacher-labels.csv"));
        if teacher.is_file() {
            head_learns_the_teacher(name, &tmp.path().join("fp32.npy"), &teacher, tmp.path());
            own_classifier_reproduces_the_teacher(
                &dir.join(format!("{name}.fp32.toml")),
                &reference,
                fp32,
                &teacher,
            );
        }
        checked.push(name.clone());
    }
    for name in &required {
        assert!(
            checked.contains(name),
            "required model {name} is not in models/models.toml"
        );
    }
}

/// The classifier the exporter folded out of the SavedModel (`[classifier]` in the fp32 manifest),
/// run by Rust on the SavedModel's embeddings, gives every image the label the SavedModel's own
/// `teacher` signature gave it; on the fp32 TFLite embeddings it agrees as far as they do.
fn own_classifier_reproduces_the_teacher(
    manifest: &Path,
    savedmodel: &[Vec<f32>],
    fp32: &[Vec<f32>],
    teacher: &Path,
) {
    use dermedge_head::Classifier;
    let manifest = dermedge_core::ModelManifest::load(manifest).unwrap();
    let (path, bytes) = manifest
        .read_companion(
            dermedge_core::Companion::Classifier,
            dermedge_head::MAX_FILE_BYTES,
        )
        .unwrap()
        .unwrap_or_else(|| panic!("{}: no [classifier]", manifest.path.display()));
    let head = dermedge_head::MlpHead::from_json(&bytes, &path).unwrap();
    head.check_model(&manifest.model.id, manifest.model.embedding_dim)
        .unwrap();
    let labels: Vec<String> = fs::read_to_string(teacher)
        .unwrap()
        .lines()
        .skip(1)
        .map(|row| row.rsplit(',').next().unwrap().to_string())
        .collect();
    assert_eq!(labels.len(), savedmodel.len());
    let top = |embedding: &[f32]| {
        let p = head.predict(embedding);
        let best = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
        head.classes()[best].clone()
    };
    for (i, (embedding, label)) in savedmodel.iter().zip(&labels).enumerate() {
        assert_eq!(&top(embedding), label, "{}: image {i}", head.name);
    }
    let same = fp32
        .iter()
        .zip(&labels)
        .filter(|(e, label)| &top(e) == *label)
        .count();
    eprintln!(
        "{}: the SavedModel's labels on {} images; on fp32 TFLite embeddings {same}/{}",
        head.name,
        labels.len(),
        fp32.len()
    );
    assert!(
        same as f64 >= 0.95 * fp32.len() as f64,
        "{}: {same}/{} on fp32 TFLite embeddings",
        head.name,
        fp32.len()
    );
}

/// A head trained with `dermedge head train` on half of the real embeddings, labelled by the
/// model's own trained classifier, predicts the other half's labels (`dermedge head eval`).
fn head_learns_the_teacher(name: &str, embeddings: &Path, teacher: &Path, tmp: &Path) {
    let rows: Vec<String> = fs::read_to_string(teacher)
        .unwrap()
        .lines()
        .skip(1)
        .map(String::from)
        .collect();
    let split = |parity: usize| {
        let path = tmp.join(format!("labels-{parity}.csv"));
        let body: Vec<&str> = rows
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == parity)
            .map(|(_, r)| r.as_str())
            .collect();
        fs::write(&path, format!("file,label\n{}\n", body.join("\n"))).unwrap();
        path
    };
    let (train, test) = (split(0), split(1));
    let head = tmp.join("teacher-head.json");
    let classes = "akiec,bcc,bkl,df,mel,nv,vasc";
    let run = dermedge(&[
        "head",
        "train",
        "--embeddings",
        embeddings.to_str().unwrap(),
        "--labels",
        train.to_str().unwrap(),
        "--out",
        head.to_str().unwrap(),
        "--classes",
        classes,
    ]);
    assert!(
        run.status.success(),
        "{name}: head train: {}",
        text(&run.stderr)
    );
    let run = dermedge(&[
        "head",
        "eval",
        "--head",
        head.to_str().unwrap(),
        "--embeddings",
        embeddings.to_str().unwrap(),
        "--labels",
        test.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{name}: head eval: {}",
        text(&run.stderr)
    );
    let score: Value = serde_json::from_slice(&run.stdout).unwrap();
    eprintln!("{name}: head trained on teacher labels, held-out half: {score}");
    let majority = {
        let mut counts = std::collections::HashMap::new();
        let held_out: Vec<&String> = rows.iter().skip(1).step_by(2).collect();
        for r in &held_out {
            *counts
                .entry(r.rsplit(',').next().unwrap())
                .or_insert(0usize) += 1;
        }
        *counts.values().max().unwrap() as f64 / held_out.len() as f64
    };
    let accuracy = score["accuracy"].as_f64().unwrap();
    assert!(
        accuracy >= majority,
        "{name}: held-out accuracy {accuracy} is below the majority-class rate {majority}"
    );
    let auc = score["macro_roc_auc"].as_f64().unwrap();
    assert!(auc >= 0.8, "{name}: held-out macro ROC AUC {auc}");
    // A head bound to this model is refused on another model's embeddings.
    let other = tmp.join("other.json");
    let mut foreign: Value = serde_json::from_str(&fs::read_to_string(&head).unwrap()).unwrap();
    foreign["model_id"] = Value::from("df-mini");
    fs::write(&other, foreign.to_string()).unwrap();
    let run = dermedge(&[
        "head",
        "eval",
        "--head",
        other.to_str().unwrap(),
        "--embeddings",
        embeddings.to_str().unwrap(),
        "--labels",
        test.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr).contains("df-mini"),
        "{}",
        text(&run.stderr)
    );
}
