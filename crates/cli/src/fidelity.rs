//! `dermedge fidelity`: embed the same images with a reference and a candidate model, compare,
//! check the gates, and write the report.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use dermedge_core::manifest::with_fidelity_record;
use dermedge_core::preprocess::{decode_file, DecodeLimits};
use dermedge_core::{
    Companion, Embedder, FidelityRecord, FidelityVerdict, GateValue, ModelManifest,
};
use dermedge_fidelity::report::{write_report, Report};
use dermedge_fidelity::{compare_named, Gates};
use dermedge_head::{kmeans::kmeans, train_softmax, Classifier, LinearHead, MlpHead, TrainOptions};
use indicatif::{ProgressBar, ProgressStyle};

use dermedge_engine::{Backend, LoadedModel};

use crate::{inputs, load, RuntimeArgs};

#[derive(Args, Debug)]
pub struct FidelityArgs {
    /// Manifest of the reference model (usually fp32).
    #[arg(long)]
    reference: PathBuf,
    /// Manifest of the candidate model (int8, another export, ...).
    #[arg(long)]
    candidate: PathBuf,
    /// Evaluation images (files or directories); never the calibration images.
    #[arg(long, required = true, num_args = 1..)]
    images: Vec<PathBuf>,
    /// A separately reported, ungated hard case (e.g. upscaled 32 px patches).
    #[arg(long, num_args = 1..)]
    hard_images: Vec<PathBuf>,
    /// Linear head trained on reference embeddings; default: one trained on k-means clusters.
    #[arg(long)]
    head: Option<PathBuf>,
    /// Gates (TOML); default: the built-in gates (docs/FIDELITY.md).
    #[arg(long)]
    gates: Option<PathBuf>,
    /// Write the verdict and every gate's value into the candidate's manifest (`[fidelity]`),
    /// where `config check` reads it.
    #[arg(long)]
    record: bool,
    /// Where report.json, report.md and the SVG plots go.
    #[arg(long)]
    report: PathBuf,
    /// Threads for the noise-floor run of the reference (default: 1, or 2 when --threads is 1).
    #[arg(long)]
    noise_threads: Option<u32>,
    /// Images the noise-floor run embeds again, spread evenly over the sorted list: a count of at
    /// least 3, or `all`. It is the slowest of the three runs (fewer threads).
    #[arg(long, default_value = "32", value_parser = parse_noise_images)]
    noise_images: NoiseImages,
    /// Backend for the candidate (default: --backend): compare LiteRT against classic
    /// TensorFlow Lite on the same model, say.
    #[arg(long)]
    candidate_backend: Option<Backend>,
    /// Arithmetic of the candidate's float ops on the CPU (default: --cpu-arithmetic): judge
    /// XNNPACK's fp16 arithmetic against the same file in fp32, say.
    #[arg(long)]
    candidate_cpu_arithmetic: Option<dermedge_engine::CpuArithmetic>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// How many images the noise-floor run embeds again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoiseImages {
    All,
    /// At least 3 (the fewest a comparison takes).
    Count(usize),
}

fn parse_noise_images(text: &str) -> Result<NoiseImages, String> {
    if text == "all" {
        return Ok(NoiseImages::All);
    }
    match text.parse::<usize>() {
        Ok(n) if n >= 3 => Ok(NoiseImages::Count(n)),
        _ => Err(format!(
            "expected `all` or a count of at least 3 images, got `{text}`"
        )),
    }
}

impl NoiseImages {
    /// Which of `n` images: `k` indices spread evenly from the first, so that a list sorted by
    /// name (by kind, here) is sampled across its kinds.
    fn pick(self, n: usize) -> Vec<usize> {
        match self {
            NoiseImages::Count(k) if k < n => (0..k).map(|j| j * n / k).collect(),
            _ => (0..n).collect(),
        }
    }
}

/// Embeddings of the same images by several models: `sets[model][image]`.
type EmbeddingSets = Vec<Vec<Vec<f32>>>;

struct Embedded {
    files: Vec<String>,
    reference: Vec<Vec<f32>>,
    candidate: Vec<Vec<f32>>,
    /// The noise-floor run covers a sample of the images: these, their reference embeddings
    /// and the reference's second run.
    noise_files: Vec<String>,
    noise_reference: Vec<Vec<f32>>,
    noise: Vec<Vec<f32>>,
}

/// Every readable file embedded by every model; also which of `files` were read (an unreadable
/// one is skipped with a warning).
fn embed_all(
    files: &[PathBuf],
    models: &mut [&mut Box<dyn LoadedModel>],
    what: &str,
) -> Result<(Vec<usize>, EmbeddingSets)> {
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} {{elapsed}} eta {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut kept = Vec::new();
    let mut out = vec![Vec::new(); models.len()];
    for (index, file) in files.iter().enumerate() {
        match decode_file(file, &DecodeLimits::default()) {
            Ok(image) => {
                for (m, o) in models.iter_mut().zip(out.iter_mut()) {
                    o.push(
                        m.embed(&image)
                            .with_context(|| format!("{}: embedding failed", file.display()))?
                            .values,
                    );
                }
                kept.push(index);
            }
            Err(e) => bar.suspend(|| eprintln!("warning: skipped {e}")),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((kept, out))
}

/// Linear heads trained on k-means clusters of one model's reference embeddings.
struct KmeansHeads<'a> {
    model_id: &'a str,
    reference: &'a [Vec<f32>],
    /// The reference embeddings L2-normalised and centred, where clusters are sought: the
    /// shared component would dominate them otherwise.
    centred: Vec<Vec<f32>>,
}

impl<'a> KmeansHeads<'a> {
    fn new(model_id: &'a str, reference: &'a [Vec<f32>]) -> Self {
        let n = reference.len();
        let normed: Vec<Vec<f32>> = reference
            .iter()
            .map(|v| {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter().map(|x| x / norm).collect()
            })
            .collect();
        let dim = normed[0].len();
        let mean: Vec<f32> = (0..dim)
            .map(|d| normed.iter().map(|v| v[d]).sum::<f32>() / n as f32)
            .collect();
        let centred = normed
            .iter()
            .map(|v| v.iter().zip(&mean).map(|(a, m)| a - m).collect())
            .collect();
        Self {
            model_id,
            reference,
            centred,
        }
    }

    /// The gated head: k = n/8 (2 to 8), one seed.
    fn gated(&self) -> Result<LinearHead> {
        let k = (self.reference.len() / 8).clamp(2, 8);
        self.head(k, 0x5eed)
    }

    /// k = 2, 4, 8 (as far as n/4 allows), three seeds each, plus `given` (a trained head, the
    /// model's own classifier): the reported ensemble agreement against `candidate`.
    fn ensemble(
        &self,
        candidate: &[Vec<f32>],
        given: &[&dyn Classifier],
    ) -> Result<dermedge_fidelity::HeadEnsemble> {
        let agreement = |head: &dyn Classifier| {
            dermedge_fidelity::head_agreement(self.reference, candidate, head)
        };
        let mut heads = Vec::new();
        for k in [2, 4, 8]
            .into_iter()
            .filter(|&k| k * 4 <= self.reference.len())
        {
            for seed in [1u64, 2, 3] {
                heads.push(agreement(&self.head(k, seed)?));
            }
        }
        heads.extend(given.iter().map(|&head| agreement(head)));
        Ok(dermedge_fidelity::HeadEnsemble::new(heads))
    }

    fn head(&self, k: usize, seed: u64) -> Result<LinearHead> {
        let labels = kmeans(&self.centred, k, seed, 100);
        let classes = (0..k).map(|c| format!("cluster-{c}")).collect();
        let name = if seed == 0x5eed {
            format!("kmeans-{k}")
        } else {
            format!("kmeans-{k}-seed-{seed}")
        };
        Ok(train_softmax(
            &name,
            self.model_id,
            self.reference,
            &labels,
            classes,
            &TrainOptions::default(),
            |_, _| {},
        )?)
    }
}

/// The reference manifest's `[classifier]`, checked against its checksum and bound to the model.
fn own_classifier(manifest: &ModelManifest) -> Result<Option<MlpHead>> {
    let Some((path, bytes)) =
        manifest.read_companion(Companion::Classifier, dermedge_head::MAX_FILE_BYTES)?
    else {
        return Ok(None);
    };
    let head = MlpHead::from_json(&bytes, &path)?;
    head.check_model(&manifest.model.id, manifest.model.embedding_dim)?;
    Ok(Some(head))
}

pub fn run(args: &FidelityArgs) -> Result<bool> {
    let reference = ModelManifest::load(&args.reference)?;
    let candidate = ModelManifest::load(&args.candidate)?;
    if reference.model.embedding_dim != candidate.model.embedding_dim {
        bail!(
            "reference {} is {}-d and candidate {} is {}-d: fidelity compares models of the same embedding",
            args.reference.display(),
            reference.model.embedding_dim,
            args.candidate.display(),
            candidate.model.embedding_dim
        );
    }
    let gates = match &args.gates {
        Some(path) => Gates::load(path)?,
        None => Gates::default_gates(),
    };
    let gates_name = args
        .gates
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in gates".into());
    let head = match &args.head {
        Some(path) => {
            let head = LinearHead::load(path)?;
            head.check_model(&reference.model.id, reference.model.embedding_dim)?;
            Some(head)
        }
        None => None,
    };
    let own = own_classifier(&reference)?;
    let options = args.runtime.engine_options();
    let candidate_arithmetic = args
        .candidate_cpu_arithmetic
        .unwrap_or(options.cpu_arithmetic);
    let fp32 = dermedge_engine::CpuArithmetic::Fp32;
    if args.record && (candidate_arithmetic != fp32 || options.cpu_arithmetic != fp32) {
        // A manifest's verdict is about its file as every device runs it by default.
        bail!(
            "--record stores the verdict in {}, which is about the file in fp32 arithmetic \
             against an fp32 reference; a verdict with fp16 arithmetic on either side is \
             reported, not recorded",
            args.candidate.display()
        );
    }
    let files = inputs::expand(&args.images)?;
    let mut ref_model = args.runtime.load(&reference)?;
    let candidate_backend = args.candidate_backend.unwrap_or(args.runtime.backend);
    let candidate_options = dermedge_engine::EngineOptions {
        backend: candidate_backend,
        cpu_arithmetic: candidate_arithmetic,
        ..options.clone()
    };
    let mut cand_model = load(&candidate, &candidate_options)?;
    // A comparison of what was not asked for would report a verdict about something else.
    for (side, model, asked) in [
        ("reference", &ref_model, options.cpu_arithmetic),
        ("candidate", &cand_model, candidate_arithmetic),
    ] {
        if model.cpu_arithmetic() != asked {
            bail!(
                "the {side} was asked for {asked} arithmetic but runs {} (this CPU fell back): \
                 nothing to judge",
                model.cpu_arithmetic()
            );
        }
    }
    let threads = options.resolved_threads()?;
    let noise_threads = args
        .noise_threads
        .unwrap_or(if threads == 1 { 2 } else { 1 });
    let noise_options = dermedge_engine::EngineOptions {
        threads: Some(noise_threads),
        ..options.clone()
    };
    let mut noise_model = load(&reference, &noise_options)?;

    let (kept, mut sets) = embed_all(&files, &mut [&mut ref_model, &mut cand_model], "embedding")?;
    if kept.len() < 3 {
        bail!(
            "only {} readable images in {:?}; fidelity needs at least 3 (better: hundreds)",
            kept.len(),
            args.images
        );
    }
    let (candidate_set, reference_set) = (sets.pop().unwrap(), sets.pop().unwrap());
    let picked = args.noise_images.pick(kept.len());
    let noise_files: Vec<PathBuf> = picked.iter().map(|&i| files[kept[i]].clone()).collect();
    let (noise_kept, mut noise_sets) =
        embed_all(&noise_files, &mut [&mut noise_model], "noise floor")?;
    let noise_picked: Vec<usize> = noise_kept.iter().map(|&j| picked[j]).collect();
    let names: Vec<String> = kept
        .iter()
        .map(|&i| files[i].display().to_string())
        .collect();
    let embedded = Embedded {
        noise_reference: noise_picked
            .iter()
            .map(|&i| reference_set[i].clone())
            .collect(),
        noise_files: noise_picked.iter().map(|&i| names[i].clone()).collect(),
        files: names,
        noise: noise_sets.pop().unwrap(),
        candidate: candidate_set,
        reference: reference_set,
    };
    let kmeans_heads = KmeansHeads::new(&reference.model.id, &embedded.reference);
    let given = head.is_some();
    let head = match head {
        Some(h) => h,
        None => kmeans_heads.gated()?,
    };
    let mut comparison = compare_named(
        &embedded.reference,
        &embedded.candidate,
        &embedded.files,
        Some(&head),
    )?;
    let mut extra: Vec<&dyn Classifier> = Vec::new();
    if given {
        extra.push(&head);
    }
    if let Some(own) = &own {
        extra.push(own);
    }
    comparison.head_ensemble = Some(kmeans_heads.ensemble(&embedded.candidate, &extra)?);
    let noise = compare_named(
        &embedded.noise_reference,
        &embedded.noise,
        &embedded.noise_files,
        Some(&head),
    )?;
    let results = gates.evaluate(&comparison, &gates_name)?;
    let noise_results = gates.evaluate(&noise, &gates_name)?;
    let mut warnings = Vec::new();
    if let Some(h) = comparison.head.as_ref().filter(|h| h.degenerate) {
        warnings.push(format!(
            "head `{}` puts {:.0}% of images in one class; its agreement is nearly meaningless",
            h.head,
            h.reference_top_class_share * 100.0
        ));
    }
    for g in noise_results.iter().filter(|g| !g.pass) {
        warnings.push(format!("gate `{}` fails even for the reference against itself ({:.4}): it is below the noise floor", g.gate, g.value));
    }
    let pass = results.iter().all(|g| g.pass);
    let noise_label = format!(
        "{threads} vs {noise_threads} threads, {} of {} images",
        embedded.noise_files.len(),
        embedded.files.len()
    );
    let describe = |m: &ModelManifest, p: &Path, backend: String| {
        format!(
            "{} {} ({}, {backend})",
            m.model.id,
            m.model.precision.as_str(),
            p.display()
        )
    };
    let report = Report {
        reference: describe(&reference, &args.reference, ref_model.backend()),
        candidate: describe(&candidate, &args.candidate, cand_model.backend()),
        images: embedded.files.clone(),
        comparison: &comparison,
        noise_floor: Some((&noise_label, &noise)),
        gates: &results,
        verdict: if pass { "PASS" } else { "FAIL" },
        warnings: warnings.clone(),
    };
    write_report(&args.report, &report)?;

    if !args.hard_images.is_empty() {
        let hard_files = inputs::expand(&args.hard_images)?;
        let (kept, mut sets) = embed_all(
            &hard_files,
            &mut [&mut ref_model, &mut cand_model],
            "hard case",
        )?;
        let kept: Vec<String> = kept
            .iter()
            .map(|&i| hard_files[i].display().to_string())
            .collect();
        let (cand, refs) = (sets.pop().unwrap(), sets.pop().unwrap());
        let hard = compare_named(&refs, &cand, &kept, Some(&head))?;
        let hard_results = gates.evaluate(&hard, &gates_name)?;
        let hard_report = Report {
            images: kept,
            comparison: &hard,
            noise_floor: None,
            gates: &hard_results,
            verdict: "NOT GATED (hard case, reported separately)",
            warnings: Vec::new(),
            ..report.clone()
        };
        write_report(&args.report.join("hard-case"), &hard_report)?;
        println!(
            "hard case ({} images, not gated): centred cosine p1 {:.4} (head view), δ p99 {:.4}, SQNR p1 {:.2} dB",
            hard.images, hard.centred_cosine.p1, hard.head_view_delta.p99, hard.sqnr_db.p1
        );
    }

    for w in &warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "{} vs {} on {} images: centred cosine p1 {:.4} (head view), δ p99 {:.4}, probe SNR {:.2} dB; raw cosine p1 {:.4} (different images {:.4}), SQNR p1 {:.2} dB, top-10 overlap {:.3} (chance {:.3}), self-retrieval {:.3}",
        report.candidate,
        report.reference,
        comparison.images,
        comparison.centred_cosine.p1,
        comparison.head_view_delta.p99,
        comparison.probe_snr_db,
        comparison.cosine.p1,
        comparison.reference_inter_image_cosine.median,
        comparison.sqnr_db.p1,
        comparison.top10_overlap.mean,
        comparison.top10_overlap_chance,
        comparison.self_retrieval
    );
    if let Some(e) = &comparison.head_ensemble {
        println!(
            "  head ensemble ({} heads, not gated): top-1 agreement min {:.3}, mean {:.3}",
            e.heads.len(),
            e.min_top1_agreement,
            e.mean_top1_agreement
        );
        if let Some(h) = own
            .as_ref()
            .and_then(|own| e.heads.iter().find(|h| h.head == own.name))
        {
            println!(
                "  the model's own classifier `{}` ({} classes): top-1 agreement {:.3}, largest probability change {:.3}",
                h.head, h.classes, h.top1_agreement, h.max_probability_change
            );
        }
    }
    for w in &comparison.worst_centred_cosine {
        println!("  worst centred cosine: {:.4} {}", w.value, w.image);
    }
    for g in &results {
        println!("  {g}");
    }
    println!(
        "verdict: {} (report in {})",
        report.verdict,
        args.report.display()
    );
    if args.record {
        let record = FidelityRecord {
            verdict: if pass {
                FidelityVerdict::Pass
            } else {
                FidelityVerdict::Fail
            },
            reference: format!(
                "{} {} (sha256 {})",
                reference.model.id,
                reference.model.precision.as_str(),
                &reference.model.sha256[..reference.model.sha256.len().min(12)]
            ),
            images: format!(
                "{} images from {}",
                comparison.images,
                args.images
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            gates: gates_name.clone(),
            values: results
                .iter()
                .map(|g| {
                    let value = GateValue {
                        value: g.value,
                        min: g.min,
                        max: g.max,
                        pass: g.pass,
                    };
                    (g.gate.clone(), value)
                })
                .collect(),
        };
        let text = std::fs::read_to_string(&args.candidate)
            .with_context(|| format!("reading {}", args.candidate.display()))?;
        let updated = with_fidelity_record(&text, &record);
        // The updated manifest must still load as one.
        ModelManifest::parse(&updated, &args.candidate)?;
        let tmp = args.candidate.with_extension("toml.tmp");
        std::fs::write(&tmp, updated).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &args.candidate)
            .with_context(|| format!("replacing {}", args.candidate.display()))?;
        println!("recorded the verdict in {}", args.candidate.display());
    }
    if !pass {
        let failed: Vec<String> = results
            .iter()
            .filter(|g| !g.pass)
            .map(|g| g.to_string())
            .collect();
        eprintln!("error: fidelity gates failed: {}", failed.join("; "));
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_noise_sample_spreads_over_the_list_and_is_never_larger_than_it() {
        assert_eq!(NoiseImages::Count(4).pick(10), vec![0, 2, 5, 7]);
        assert_eq!(NoiseImages::Count(32).pick(10), (0..10).collect::<Vec<_>>());
        assert_eq!(NoiseImages::All.pick(5), (0..5).collect::<Vec<_>>());
        let picked = NoiseImages::Count(32).pick(306);
        assert_eq!(picked.len(), 32);
        assert!(picked.windows(2).all(|w| (9..=10).contains(&(w[1] - w[0]))));
        assert_eq!((picked[0], picked[31]), (0, 296));
    }

    #[test]
    fn a_noise_sample_is_a_count_of_at_least_three_or_all() {
        assert_eq!(parse_noise_images("all"), Ok(NoiseImages::All));
        assert_eq!(parse_noise_images("3"), Ok(NoiseImages::Count(3)));
        for bad in ["2", "0", "-1", "ALL", "", "3.5"] {
            let err = parse_noise_images(bad).unwrap_err();
            assert!(err.contains("at least 3") && err.contains(bad), "{err}");
        }
    }
}
