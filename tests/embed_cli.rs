//! End to end: the `dermedge` binary on the committed fixtures, every output format, and the
//! bad inputs the foundation must refuse cleanly.

use std::fs;
use std::path::Path;

mod binary;

use binary::dermedge;
use dermedge_e2e::{cosine, fixtures, golden, text};
use serde_json::Value;

const FP32: &str = "tests/fixtures/df-mini/df-mini.fp32.toml";
const INT8: &str = "tests/fixtures/df-mini/df-mini.int8.toml";

fn fixture_names() -> Vec<String> {
    let index: Value =
        serde_json::from_str(&fs::read_to_string(fixtures().join("reference/index.json")).unwrap())
            .unwrap();
    index["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Embed the fixture images (in golden order) and return the vectors from a CBOR output.
fn embed_fixture_images(manifest: &str, out: &Path) -> Vec<Vec<f32>> {
    let files: Vec<String> = fixture_names()
        .iter()
        .map(|n| format!("tests/fixtures/images/{n}"))
        .collect();
    let mut args = vec![
        "embed",
        "--model",
        manifest,
        "--threads",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(files.iter().map(String::as_str));
    let run = dermedge(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let doc: ciborium::Value = ciborium::from_reader(fs::File::open(out).unwrap()).unwrap();
    let json: Value = serde_json::to_value(&doc).unwrap();
    assert_eq!(json["format"], "dermedge-embeddings/1");
    assert_eq!(json["model"]["embedding_dim"], 6144);
    assert_eq!(json["failures"].as_array().unwrap().len(), 0);
    json["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

#[test]
fn embed_writes_cbor_that_matches_the_tensorflow_golden_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let ours = embed_fixture_images(FP32, &dir.path().join("fp32.cbor"));
    let golden = golden();
    assert_eq!(ours.len(), golden.len());
    for (name, (a, g)) in fixture_names().iter().zip(ours.iter().zip(&golden)) {
        assert_eq!(a.len(), 6144);
        let cos = cosine(a, g);
        let norm = g.iter().map(|v| v * v).sum::<f32>().sqrt();
        let max_abs = a
            .iter()
            .zip(g)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(cos >= 0.99999, "{name}: cosine {cos}");
        assert!(
            max_abs <= 1e-4 * norm,
            "{name}: max abs error {max_abs}, norm {norm}"
        );
    }
}

#[test]
fn int8_embeddings_are_reported_against_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let fp32 = embed_fixture_images(FP32, &dir.path().join("fp32.cbor"));
    let int8 = embed_fixture_images(INT8, &dir.path().join("int8.cbor"));
    let cosines: Vec<f64> = fp32.iter().zip(&int8).map(|(a, b)| cosine(a, b)).collect();
    let min = cosines.iter().cloned().fold(f64::INFINITY, f64::min);
    eprintln!("df-mini int8 vs fp32 cosine per fixture image: {cosines:.5?} (min {min:.5})");
    assert!(min > 0.98, "int8 vs fp32 cosine {min}");
}

#[test]
fn two_runs_with_the_same_threads_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let a = embed_fixture_images(FP32, &dir.path().join("a.cbor"));
    let b = embed_fixture_images(FP32, &dir.path().join("b.cbor"));
    assert_eq!(
        fs::read(dir.path().join("a.cbor")).unwrap(),
        fs::read(dir.path().join("b.cbor")).unwrap()
    );
    assert_eq!(a, b);
}

#[test]
fn npy_and_jsonl_outputs_hold_the_same_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("e.npy");
    let jsonl = dir.path().join("e.jsonl");
    for out in [&npy, &jsonl] {
        let run = dermedge(&[
            "embed",
            "tests/fixtures/images",
            "--model",
            FP32,
            "--threads",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(run.status.success(), "{}", text(&run.stderr));
    }
    let (shape, values) = dermedge_core::npy::read_f32(&fs::read(&npy).unwrap()).unwrap();
    assert_eq!(shape, [8, 6144]);
    let index: Value =
        serde_json::from_str(&fs::read_to_string(dir.path().join("e.npy.json")).unwrap()).unwrap();
    let rows = index["rows"].as_array().unwrap();
    let lines: Vec<Value> = fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 8);
    assert_eq!(lines.len(), 8);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["file"], rows[i]);
        assert_eq!(line["model_id"], "df-mini");
        let from_npy = values[i * 6144..(i + 1) * 6144].to_vec();
        let from_json: Vec<f32> = line["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(from_npy, from_json);
    }
}

#[test]
fn model_info_and_doctor_describe_model_and_runtime() {
    let run = dermedge(&["model", "info", INT8, "--threads", "1"]);
    let out = text(&run.stdout);
    assert!(run.status.success(), "{}", text(&run.stderr));
    for expected in [
        "df-mini",
        "int8",
        "serving_default",
        "[1, 448, 448, 3]",
        "[1, 6144]",
        "LiteRT 2.1.4",
        "verified",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    let run = dermedge(&["model", "info", FP32, "--json"]);
    let json: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(json["output_tensor"]["shape"], serde_json::json!([1, 6144]));

    let run = dermedge(&["doctor"]);
    let out = text(&run.stdout);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(
        out.contains("LiteRT 2.1.4") && out.contains("pinned") && out.contains("cpu"),
        "{out}"
    );
}

/// Each bad input: non-zero exit, a message naming the file and what was wrong, no panic.
fn assert_clean_failure(args: &[&str], expected: &[&str]) -> String {
    let run = dermedge(args);
    let stderr = text(&run.stderr);
    assert!(!run.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "{args:?}: missing {e:?} in:\n{stderr}");
    }
    stderr
}

#[test]
fn bad_models_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = "tests/fixtures/images/astronaut-480.png";
    // Missing model manifest.
    assert_clean_failure(
        &["embed", img, "--model", "models/nope.toml"],
        &["models/nope.toml", "cannot read"],
    );

    // Truncated .tflite next to its manifest.
    for f in ["df-mini.fp32.toml", "df-mini.fp32.tflite"] {
        fs::copy(fixtures().join("df-mini").join(f), dir.path().join(f)).unwrap();
    }
    let tflite = dir.path().join("df-mini.fp32.tflite");
    let bytes = fs::read(&tflite).unwrap();
    fs::write(&tflite, &bytes[..bytes.len() / 2]).unwrap();
    let manifest = dir.path().join("df-mini.fp32.toml");
    let m = manifest.to_str().unwrap();
    assert_clean_failure(
        &["embed", img, "--model", m],
        &["df-mini.fp32.tflite", "sha256", "truncated"],
    );

    // Manifest whose dimensions disagree with the model.
    fs::write(&tflite, &bytes).unwrap();
    let text_manifest = fs::read_to_string(&manifest).unwrap();
    fs::write(
        &manifest,
        text_manifest.replace("embedding_dim = 6144", "embedding_dim = 768"),
    )
    .unwrap();
    assert_clean_failure(
        &["embed", img, "--model", m],
        &["embedding_dim", "6144", "768"],
    );
    fs::write(
        &manifest,
        text_manifest.replace("height = 448", "height = 512"),
    )
    .unwrap();
    assert_clean_failure(&["embed", img, "--model", m], &["[1, 448, 448, 3]", "512"]);

    // Invalid thread count.
    assert_clean_failure(
        &["embed", img, "--model", FP32, "--threads", "0"],
        &["threads"],
    );
}

#[test]
fn bad_images_are_reported_and_the_good_ones_still_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::copy(
        fixtures().join("images/astronaut-480.png"),
        d.join("a-good.png"),
    )
    .unwrap();
    fs::copy(
        fixtures().join("images/dermoscopy-patch1354a.bmp"),
        d.join("b-good.bmp"),
    )
    .unwrap();
    fs::write(
        d.join("c-notes.png"),
        "patient notes, typed into the wrong file\n",
    )
    .unwrap();
    fs::write(d.join("d-empty.jpg"), b"").unwrap();
    let mut one = Vec::new();
    png::Encoder::new(&mut one, 1, 1)
        .write_header()
        .unwrap()
        .write_image_data(&[0])
        .unwrap();
    fs::write(d.join("e-dot.png"), &one).unwrap();

    // A 20000×20000 PNG: refused from its header, memory stays bounded.
    {
        let file = fs::File::create(d.join("f-huge.png")).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 20_000, 20_000);
        enc.set_color(png::ColorType::Rgb);
        enc.set_compression(png::Compression::Fastest);
        let mut w = enc.write_header().unwrap().into_stream_writer().unwrap();
        let row = vec![0u8; 60_000];
        for _ in 0..20_000 {
            std::io::Write::write_all(&mut w, &row).unwrap();
        }
        w.finish().unwrap();
    }

    let out = d.join("out.cbor");
    let stderr = assert_clean_failure(
        &[
            "embed",
            d.to_str().unwrap(),
            "--model",
            FP32,
            "--threads",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
        &[
            "c-notes.png",
            "not a recognised image",
            "d-empty.jpg",
            "empty file",
            "e-dot.png",
            "1×1",
            "f-huge.png",
            "20000×20000",
            "2 embedded, 4 failed",
        ],
    );
    let doc: ciborium::Value = ciborium::from_reader(fs::File::open(&out).unwrap()).unwrap();
    let json: Value = serde_json::to_value(&doc).unwrap();
    let files: Vec<&str> = json["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["file"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 2, "{stderr}");
    assert!(files[0].ends_with("a-good.png") && files[1].ends_with("b-good.bmp"));
    assert_eq!(json["failures"].as_array().unwrap().len(), 4);

    // Each bad file given alone.
    for (name, what) in [
        ("c-notes.png", "not a recognised image"),
        ("d-empty.jpg", "empty"),
        ("e-dot.png", "at least"),
    ] {
        let path = d.join(name);
        assert_clean_failure(
            &["embed", path.to_str().unwrap(), "--model", FP32],
            &[name, what],
        );
    }
}

/// The smallest gap between distinct values of a dequantised vector: its quantisation step.
fn quantisation_step(values: &[f32]) -> f32 {
    let mut v: Vec<f32> = values.to_vec();
    v.sort_by(f32::total_cmp);
    v.dedup();
    v.windows(2)
        .map(|w| w[1] - w[0])
        .filter(|d| *d > 0.0)
        .fold(f32::INFINITY, f32::min)
}

#[test]
fn int8_embeddings_match_this_runtimes_golden_file_under_each_configuration() {
    let name = format!(
        "reference/golden.df-mini.int8.litert-2.1.4-{}.npy",
        std::env::consts::ARCH
    );
    let golden_path = fixtures().join(&name);
    assert!(
        golden_path.is_file(),
        "{name} missing: run tests/fixtures/reference/generate-runtime-golden.sh on this architecture"
    );
    let golden = dermedge_e2e::read_npy_rows(&golden_path);
    let dir = tempfile::tempdir().unwrap();
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("int8-{threads}.npy"));
        let mut args = vec![
            "embed".to_string(),
            "--model".into(),
            INT8.into(),
            "--threads".into(),
            threads.into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ];
        args.extend(
            fixture_names()
                .iter()
                .map(|n| format!("tests/fixtures/images/{n}")),
        );
        let run = dermedge(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(run.status.success(), "{}", text(&run.stderr));
        let ours = dermedge_e2e::read_npy_rows(&out);
        for (i, (a, g)) in ours.iter().zip(&golden).enumerate() {
            let step = quantisation_step(g);
            let worst = a
                .iter()
                .zip(g)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 3.0 * step,
                "{threads} threads, image {i}: max difference {worst} is more than 3 quantisation steps ({step})"
            );
            assert!(cosine(a, g) > 0.9999, "{threads} threads, image {i}");
        }
    }
}
