//! `dermedge fidelity` end to end on the trained stand-in `lesion-x448` and its evaluation images
//! (built by `dermedge models build`; calibration images are never used here):
//! the noise-floor pair passes the gates, a deliberately broken int8 model fails them naming the
//! gates, the plain int8 export's verdict is written as measured, and bad inputs are clear errors.

use std::fs;
use std::path::{Path, PathBuf};

mod binary;

use binary::dermedge;
use dermedge_e2e::{root, text};
use serde_json::Value;

fn built(name: &str) -> Option<PathBuf> {
    let dir = root().join(".cache/models").join(name);
    if dir.join("BUILT").is_file() {
        return Some(dir);
    }
    let required = std::env::var("DERMEDGE_REQUIRE_MODELS").unwrap_or_default();
    assert!(
        !required.split(',').any(|m| m.trim() == name),
        "{name} is required but not built"
    );
    eprintln!("skipping: {name} not built (dermedge models build {name})");
    None
}

fn evaluation_images() -> String {
    root()
        .join(".cache/models/images/evaluation")
        .display()
        .to_string()
}

/// Every `step`-th evaluation image in name order (mosaics and photos alike): for a verdict far
/// from every gate, which fewer images show as well as all of them.
fn evaluation_sample(step: usize) -> Vec<String> {
    let mut files: Vec<PathBuf> = fs::read_dir(evaluation_images())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .step_by(step)
        .map(|p| p.display().to_string())
        .collect()
}

fn fidelity(args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["fidelity", "--threads", "2"];
    all.extend_from_slice(args);
    let out = dermedge(&all);
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn noise_floor_pair_passes_and_a_broken_model_fails_naming_the_gates() {
    let Some(dir) = built("lesion-x448") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let fp32 = dir.join("lesion-x448.fp32.toml");
    let images = evaluation_images();

    // fp32 against itself under another thread count: the noise floor passes every gate.
    let out = tmp.path().join("noise");
    let (ok, stdout, stderr) = fidelity(&[
        "--reference",
        fp32.to_str().unwrap(),
        "--candidate",
        fp32.to_str().unwrap(),
        "--noise-threads",
        "1",
        "--images",
        &images,
        "--report",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let noise_report = report(&out);
    assert_eq!(noise_report["verdict"], "PASS");
    // The noise floor's own run covers a sample (--noise-images, default 32) and says so.
    let evaluated = noise_report["images"].as_array().unwrap().len();
    let floor = &noise_report["noise_floor"];
    assert_eq!(floor[1]["images"], 32, "{floor}");
    assert_eq!(
        floor[0].as_str().unwrap(),
        format!("2 vs 1 threads, 32 of {evaluated} images")
    );
    for file in [
        "report.json",
        "report.md",
        "cosine.svg",
        "centred-cosine.svg",
        "sqnr.svg",
        "bias.svg",
    ] {
        assert!(out.join(file).is_file(), "missing {file}");
    }

    // A broken int8 model: the right file, preprocessed with a wrong input scale.
    let broken = tmp.path().join("broken.int8.toml");
    let manifest = fs::read_to_string(dir.join("lesion-x448.int8.toml")).unwrap();
    let manifest = manifest
        .replace(
            "file = \"lesion-x448.int8.tflite\"",
            &format!(
                "file = \"{}\"",
                dir.join("lesion-x448.int8.tflite").display()
            ),
        )
        .replace("scale = 1.0\n", "scale = 0.5\n");
    assert!(manifest.contains("scale = 0.5"), "{manifest}");
    fs::write(&broken, manifest).unwrap();
    let out = tmp.path().join("broken");
    let sample = evaluation_sample(5);
    let mut args = vec![
        "--reference",
        fp32.to_str().unwrap(),
        "--candidate",
        broken.to_str().unwrap(),
        "--report",
        out.to_str().unwrap(),
        "--images",
    ];
    args.extend(sample.iter().map(String::as_str));
    let (ok, stdout, stderr) = fidelity(&args);
    assert!(!ok, "a broken model passed:\n{stdout}");
    assert!(
        stderr.contains("fidelity gates failed")
            && stderr.contains("sqnr_db_p1")
            && stderr.contains("centred_cosine_p1"),
        "{stderr}"
    );
    assert_eq!(report(&out)["verdict"], "FAIL");
}

#[test]
fn plain_int8_export_verdict_is_reported_as_measured() {
    let Some(dir) = built("lesion-x448") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int8");
    let (ok, stdout, _) = fidelity(&[
        "--reference",
        dir.join("lesion-x448.fp32.toml").to_str().unwrap(),
        "--candidate",
        dir.join("lesion-x448.int8.toml").to_str().unwrap(),
        "--images",
        &evaluation_images(),
        "--hard-images",
        root()
            .join(".cache/models/images/evaluation-upscaled")
            .to_str()
            .unwrap(),
        "--report",
        out.to_str().unwrap(),
    ]);
    let r = report(&out);
    let verdict = r["verdict"].as_str().unwrap();
    assert_eq!(ok, verdict == "PASS");
    let c = &r["comparison"];
    eprintln!(
        "lesion-x448 plain int8 vs fp32: verdict {verdict}; centred cosine p1 {:.4}, SQNR p1 {:.2} dB, top-10 overlap {:.3}, self-retrieval {:.3}, head agreement {:.3}",
        c["centred_cosine"]["p1"], c["sqnr_db"]["p1"], c["top10_overlap"]["mean"], c["self_retrieval"], c["head"]["top1_agreement"]
    );
    assert!(stdout.contains("verdict"));
    assert!(out.join("hard-case/report.md").is_file());
    // The head must spread over the images, or its agreement would mean nothing.
    assert!(
        c["head"]["reference_top_class_share"].as_f64().unwrap() < 0.9,
        "degenerate head: {}",
        c["head"]
    );
    // The model's own seven-class classifier (the fp32 manifest's [classifier]) is in the
    // ensemble beside the k-means heads, and the summary line names it.
    let heads = c["head_ensemble"]["heads"].as_array().unwrap();
    let own = heads
        .iter()
        .find(|h| h["head"] == "lesion-x448-teacher")
        .unwrap_or_else(|| panic!("no lesion-x448-teacher in {heads:?}"));
    assert_eq!(own["classes"], 7);
    let agreement = own["top1_agreement"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&agreement), "{own}");
    assert!(
        stdout.contains("the model's own classifier `lesion-x448-teacher` (7 classes)"),
        "{stdout}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (Some(lesion), Some(mini)) = (built("lesion-x448"), built("df-mini")) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let report_dir = tmp.path().join("r");
    let lesion_fp32 = lesion.join("lesion-x448.fp32.toml");
    let images = evaluation_images();

    // Different embedding dimensions.
    let (ok, _, stderr) = fidelity(&[
        "--reference",
        lesion_fp32.to_str().unwrap(),
        "--candidate",
        mini.join("df-mini.int8.toml").to_str().unwrap(),
        "--images",
        &images,
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("2048") && stderr.contains("6144"),
        "{stderr}"
    );

    // An empty image directory.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let (ok, _, stderr) = fidelity(&[
        "--reference",
        lesion_fp32.to_str().unwrap(),
        "--candidate",
        lesion_fp32.to_str().unwrap(),
        "--images",
        empty.to_str().unwrap(),
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("no images"), "{stderr}");

    // A head bound to another model.
    let head = tmp.path().join("head.json");
    fs::write(
        &head,
        r#"{"format":"dermedge-head/1","name":"mini-head","model_id":"df-mini","embedding_dim":6144,"kind":"softmax",
            "classes":["a"],"l2_normalize":true,"input_mean":[],"input_scale":1.0,"weights":[[]],"bias":[0.0]}"#
            .replace("[[]]", &format!("[[{}]]", vec!["0.0"; 6144].join(","))),
    )
    .unwrap();
    let (ok, _, stderr) = fidelity(&[
        "--reference",
        lesion_fp32.to_str().unwrap(),
        "--candidate",
        lesion_fp32.to_str().unwrap(),
        "--images",
        &images,
        "--head",
        head.to_str().unwrap(),
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("df-mini") && stderr.contains("lesion-x448"),
        "{stderr}"
    );

    // A classifier file that is not the one the manifest's checksum names.
    let manifest_text = fs::read_to_string(&lesion_fp32).unwrap();
    let teacher = lesion.join("lesion-x448.teacher.json");
    let tampered = tmp.path().join("teacher.json");
    let mut bytes = fs::read(&teacher).unwrap();
    let last = bytes.len() - 2;
    bytes[last] = if bytes[last] == b'1' { b'2' } else { b'1' };
    fs::write(&tampered, bytes).unwrap();
    let tampered_manifest = tmp.path().join("tampered.toml");
    fs::write(
        &tampered_manifest,
        manifest_text
            .replace(
                "file = \"lesion-x448.fp32.tflite\"",
                &format!("file = {:?}", lesion.join("lesion-x448.fp32.tflite")),
            )
            .replace(
                "file = \"lesion-x448.teacher.json\"",
                &format!("file = {tampered:?}"),
            ),
    )
    .unwrap();
    let (ok, _, stderr) = fidelity(&[
        "--reference",
        tampered_manifest.to_str().unwrap(),
        "--candidate",
        lesion_fp32.to_str().unwrap(),
        "--images",
        &images,
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("classifier.sha256") && stderr.contains("teacher.json"),
        "{stderr}"
    );

    // A verdict for fp16 arithmetic recorded against the file (which devices run in fp32), on
    // the candidate's side or the reference's.
    for arithmetic in [["fp32", "fp16"], ["fp16", "fp32"]] {
        let (ok, _, stderr) = fidelity(&[
            "--reference",
            lesion_fp32.to_str().unwrap(),
            "--candidate",
            lesion_fp32.to_str().unwrap(),
            "--cpu-arithmetic",
            arithmetic[0],
            "--candidate-cpu-arithmetic",
            arithmetic[1],
            "--record",
            "--images",
            &images,
            "--report",
            report_dir.to_str().unwrap(),
        ]);
        assert!(
            !ok && stderr.contains("--record") && stderr.contains("either side"),
            "{stderr}"
        );
    }
    assert!(
        !fs::read_to_string(&lesion_fp32)
            .unwrap()
            .contains("[fidelity]"),
        "nothing recorded"
    );
}

/// The committed baseline (crates/fidelity/baselines/lesion-x448.int8.json, measured on the
/// evaluation images) and the bands within which the same comparison on images the suite has
/// never seen must land.
#[test]
fn unseen_images_give_numbers_consistent_with_the_committed_baseline() {
    let Some(dir) = built("lesion-x448") else {
        return;
    };
    let unseen = root().join(".cache/models/images/unseen");
    assert!(
        unseen.is_dir(),
        "{}: rebuild the image sets (dermedge models build lesion-x448)",
        unseen.display()
    );
    let baseline: Value = serde_json::from_str(
        &fs::read_to_string(root().join("crates/fidelity/baselines/lesion-x448.int8.json"))
            .unwrap(),
    )
    .unwrap();
    let bands: toml::Table =
        fs::read_to_string(root().join("crates/fidelity/baselines/bands.toml"))
            .unwrap()
            .parse()
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("unseen");
    let (ok, _, _) = fidelity(&[
        "--reference",
        dir.join("lesion-x448.fp32.toml").to_str().unwrap(),
        "--candidate",
        dir.join("lesion-x448.int8.toml").to_str().unwrap(),
        "--images",
        unseen.to_str().unwrap(),
        "--report",
        out.to_str().unwrap(),
    ]);
    let r = report(&out);
    let c = &r["comparison"];
    let measured = [
        (
            "centred_cosine_median",
            c["centred_cosine"]["median"].as_f64().unwrap(),
        ),
        ("sqnr_db_median", c["sqnr_db"]["median"].as_f64().unwrap()),
        (
            "top10_overlap_mean",
            c["top10_overlap"]["mean"].as_f64().unwrap(),
        ),
        (
            "spearman",
            c["pairwise_similarity_spearman"].as_f64().unwrap(),
        ),
    ];
    let mut report_lines = Vec::new();
    for (name, value) in measured {
        let base = baseline[name].as_f64().unwrap();
        let band = bands[name].as_float().unwrap();
        report_lines.push(format!(
            "{name}: unseen {value:.4}, baseline {base:.4}, band ±{band}"
        ));
        assert!(
            (value - base).abs() <= band,
            "{name} on unseen images is {value:.4}, the committed baseline {base:.4} ± {band}"
        );
    }
    eprintln!("unseen vs baseline:\n  {}", report_lines.join("\n  "));
    assert_eq!(
        r["verdict"].as_str().unwrap(),
        baseline["verdict"].as_str().unwrap(),
        "the verdict on unseen images differs from the baseline's"
    );
    assert_eq!(ok, r["verdict"] == "PASS");
}

#[test]
fn the_verdict_is_recorded_in_the_manifest_and_config_check_warns_on_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fixtures = root().join("tests/fixtures");
    for file in [
        "df-mini.fp32.toml",
        "df-mini.fp32.tflite",
        "df-mini.int8.toml",
        "df-mini.int8.tflite",
    ] {
        fs::copy(fixtures.join("df-mini").join(file), dir.join(file)).unwrap();
    }
    let candidate = dir.join("df-mini.int8.toml");
    let before = fs::read_to_string(&candidate).unwrap();
    // Four images are enough to record a verdict (the suite needs three).
    let images: Vec<String> = [
        "astronaut-480.png",
        "coffee-300x400.png",
        "dermoscopy-patch1354a.bmp",
        "dermoscopy-patch1840b.bmp",
    ]
    .iter()
    .map(|f| fixtures.join("images").join(f).display().to_string())
    .collect();
    // Gates no export can meet, so that the recorded verdict is a failure.
    let gates = dir.join("strict.toml");
    fs::write(
        &gates,
        "[gates.centred_cosine_p1]\nmin = 1.1\nwhy = \"impossible\"\n",
    )
    .unwrap();
    let (passed, stdout, stderr) = fidelity(&[
        "--reference",
        &dir.join("df-mini.fp32.toml").display().to_string(),
        "--candidate",
        &candidate.display().to_string(),
        "--images",
        &images[0],
        &images[1],
        &images[2],
        &images[3],
        "--gates",
        &gates.display().to_string(),
        "--report",
        &dir.join("report").display().to_string(),
        "--record",
    ]);
    assert!(!passed, "{stdout}{stderr}");
    assert!(stdout.contains("recorded the verdict"), "{stdout}");
    let after = fs::read_to_string(&candidate).unwrap();
    // The rest of the manifest, comments included, is as it was.
    assert!(after.starts_with(before.trim_end()), "{after}");
    let manifest = dermedge_core::ModelManifest::load(&candidate).unwrap();
    let record = manifest.fidelity.expect("a recorded verdict");
    assert_eq!(record.verdict, dermedge_core::FidelityVerdict::Fail);
    let gate = &record.values["centred_cosine_p1"];
    assert_eq!((gate.min, gate.pass), (Some(1.1), false));
    // A device configured with it is told, and still validates.
    let config = fs::read_to_string(root().join("firmware-config/x86-dev.toml"))
        .unwrap()
        .replace(
            "heads = [\"../out/x86-dev/heads/image-kind.json\"]",
            "heads = []",
        )
        .replace(
            "../tests/fixtures/df-mini/df-mini.int8.toml",
            &candidate.display().to_string(),
        )
        .replace("../tests/fixtures", &fixtures.display().to_string())
        .replace("../out/x86-dev", &dir.join("out").display().to_string());
    let config_path = dir.join("device.toml");
    fs::write(&config_path, config).unwrap();
    let out = dermedge(&["config", "check", &config_path.display().to_string()]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("FAILED the fidelity gates") && err.contains("centred_cosine_p1"),
        "{err}"
    );
}

/// The export the registry ships for lesion-x448 (`<name>.<precision>-faithful.toml`, built by
/// `dermedge models build lesion-x448` from the registry's `faithful_recipe` and judged there on
/// the wide evaluation set) passes the unchanged default gates on images the recipe search never
/// saw, and its report shows the head-view metrics and names the worst images.
#[test]
fn the_faithful_export_passes_the_default_gates_on_unseen_images() {
    let Some(dir) = built("lesion-x448") else {
        return;
    };
    let faithful: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-faithful.toml"))
        .collect();
    assert_eq!(
        faithful.len(),
        1,
        "one faithful export in {}",
        dir.display()
    );
    let candidate = &faithful[0];
    let recorded = fs::read_to_string(candidate).unwrap();
    assert!(
        recorded.contains("[fidelity]") && recorded.contains("verdict = \"pass\""),
        "the build records a pass in {}:\n{recorded}",
        candidate.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("faithful");
    let unseen = root().join(".cache/models/images/unseen");
    let (ok, stdout, stderr) = fidelity(&[
        "--reference",
        dir.join("lesion-x448.fp32.toml").to_str().unwrap(),
        "--candidate",
        candidate.to_str().unwrap(),
        "--images",
        unseen.to_str().unwrap(),
        "--report",
        out.to_str().unwrap(),
    ]);
    let r = report(&out);
    assert!(ok && r["verdict"] == "PASS", "{stdout}\n{stderr}");
    let gates: Vec<&str> = r["gates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["gate"].as_str().unwrap())
        .collect();
    assert!(
        gates.contains(&"centred_cosine_p1") && gates.contains(&"head_view_delta_p99"),
        "{gates:?}"
    );
    let md = fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("head_view_delta"), "{md}");
    let worst = r["comparison"]["worst_centred_cosine"].as_array().unwrap();
    assert_eq!(worst.len(), 5, "{worst:?}");
    assert!(worst[0]["image"].as_str().unwrap().ends_with(".png"));
    // k-means heads at k = 2, 4, 8 and three seeds each, plus the model's own trained classifier
    // (named by the reference manifest's `[classifier]`), reported beside the gated head.
    let ensemble = &r["comparison"]["head_ensemble"];
    let heads = ensemble["heads"].as_array().unwrap();
    assert_eq!(heads.len(), 10, "{ensemble}");
    let kmeans = heads
        .iter()
        .filter(|h| h["head"].as_str().unwrap().starts_with("kmeans-"))
        .count();
    assert_eq!(kmeans, 9, "{ensemble}");
    assert!(
        heads
            .iter()
            .any(|h| h["head"] == "lesion-x448-teacher" && h["classes"] == 7),
        "{ensemble}"
    );
    assert!(md.contains("## Head ensemble"), "{md}");
}
