//! The report: `report.json` (everything), `report.md` (the summary people read) and SVG plots of
//! the distributions (cosine, head-view centred cosine, head-view δ, raw centred cosine, SQNR
//! histograms; per-dimension bias).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::{Comparison, FidelityError, GateResult};

/// What a report is about.
#[derive(Debug, Clone, Serialize)]
pub struct Report<'a> {
    pub reference: String,
    pub candidate: String,
    pub images: Vec<String>,
    pub comparison: &'a Comparison,
    /// The reference against itself under another configuration (threads, runtime).
    pub noise_floor: Option<(&'a str, &'a Comparison)>,
    pub gates: &'a [GateResult],
    pub verdict: &'static str,
    pub warnings: Vec<String>,
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), FidelityError> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|cause| FidelityError::Write {
        path: path.display().to_string(),
        cause,
    })
}

pub fn write_report(dir: &Path, report: &Report<'_>) -> Result<(), FidelityError> {
    std::fs::create_dir_all(dir).map_err(|cause| FidelityError::Write {
        path: dir.display().to_string(),
        cause,
    })?;
    write(
        dir,
        "report.json",
        &serde_json::to_string_pretty(report).expect("serialisable"),
    )?;
    write(dir, "report.md", &markdown(report))?;
    let c = report.comparison;
    write(
        dir,
        "cosine.svg",
        &histogram("cosine (candidate vs reference)", &c.per_image.cosine, 30),
    )?;
    write(
        dir,
        "centred-cosine.svg",
        &histogram(
            "centred cosine (head view)",
            &c.per_image.centred_cosine,
            30,
        ),
    )?;
    let finite_delta: Vec<f64> = c
        .per_image
        .head_view_delta
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    write(
        dir,
        "head-view-delta.svg",
        &histogram("relative error δ (head view)", &finite_delta, 30),
    )?;
    write(
        dir,
        "raw-centred-cosine.svg",
        &histogram(
            "centred cosine (raw, un-normalised)",
            &c.per_image.raw_centred_cosine,
            30,
        ),
    )?;
    let finite: Vec<f64> = c
        .per_image
        .sqnr_db
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    write(dir, "sqnr.svg", &histogram("SQNR (dB, raw)", &finite, 30))?;
    write(
        dir,
        "bias.svg",
        &series("mean signed error per dimension", &c.per_dimension.bias),
    )?;
    Ok(())
}

fn row(name: &str, s: &crate::Summary) -> String {
    format!(
        "| {name} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
        s.median, s.p1, s.min, s.mean
    )
}

/// `value [lo, hi]` when the comparison holds an interval for `metric`.
fn with_ci(c: &Comparison, metric: &str, value: f64) -> String {
    match c.confidence_intervals.get(metric) {
        Some(ci) => format!("{value:.4} {ci}"),
        None => format!("{value:.4}"),
    }
}

/// A head-view row: median, p1 and p99 (with their intervals where `c` is given), min, max.
fn head_row(c: Option<&Comparison>, label: &str, metric: &str, s: &crate::Summary) -> String {
    let value = |stat: &str, v: f64| match c {
        Some(c) => with_ci(c, &format!("{metric}_{stat}"), v),
        None => format!("{v:.4}"),
    };
    format!(
        "| {label} | {:.4} | {} | {} | {:.4} | {:.4} |\n",
        s.median,
        value("p1", s.p1),
        value("p99", s.p99),
        s.min,
        s.max
    )
}

const HEAD_VIEW_TABLE: &str =
    "| metric | median | p1 | p99 | min | max |\n|---|---:|---:|---:|---:|---:|\n";

/// Head-view rows; with `intervals`, p1 and p99 carry their 95% bootstrap intervals.
fn head_view_table(c: &Comparison, intervals: bool) -> String {
    let ci = intervals.then_some(c);
    let mut md = String::from(HEAD_VIEW_TABLE);
    md += &head_row(
        ci,
        "centred cosine cos(P(c), P(r))",
        "centred_cosine",
        &c.centred_cosine,
    );
    md += &head_row(
        ci,
        "relative error δ = ‖P(c) − P(r)‖ / ‖P(r)‖",
        "head_view_delta",
        &c.head_view_delta,
    );
    if intervals {
        md += &head_row(
            None,
            "reference: centred cosine between different images",
            "",
            &c.reference_inter_image_centred_cosine,
        );
    }
    md
}

fn worst_list(md: &mut String, what: &str, worst: &[crate::WorstImage]) {
    let _ = writeln!(md, "\nWorst by {what}:\n");
    for w in worst {
        let _ = writeln!(md, "- `{}` (#{}): {:.4}", w.image, w.index, w.value);
    }
}

pub fn markdown(r: &Report<'_>) -> String {
    let c = r.comparison;
    let mut md = String::new();
    let _ = writeln!(md, "# Fidelity: {} vs {}\n", r.candidate, r.reference);
    let _ = writeln!(
        md,
        "**Verdict: {}** on {} images, {}-d embeddings.\n",
        r.verdict, c.images, c.dim
    );
    let _ = writeln!(
        md,
        "How hard the set is: median raw cosine between different reference images {:.4} \
         (near 1: the images are hard to tell apart, and raw cosine says little).\n",
        c.reference_inter_image_cosine.median
    );
    for w in &r.warnings {
        let _ = writeln!(md, "> warning: {w}\n");
    }
    let _ = writeln!(
        md,
        "## Gates\n\n| gate | value | 95% CI | needs | result |\n|---|---:|---|---|---|"
    );
    for g in r.gates {
        let needs = match (g.min, g.max) {
            (Some(lo), Some(hi)) => format!("in [{lo}, {hi}]"),
            (Some(lo), None) => format!(">= {lo}"),
            (None, Some(hi)) => format!("<= {hi}"),
            (None, None) => String::new(),
        };
        let ci = g.ci.map(|ci| ci.to_string()).unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {:.4} | {ci} | {needs} | {} |",
            g.gate,
            g.value,
            if g.pass { "pass" } else { "**FAIL**" }
        );
    }
    let _ = writeln!(
        md,
        "\nIntervals: percentile bootstrap over images, {} resamples, fixed seed.",
        crate::stats::BOOTSTRAP_RESAMPLES
    );
    let _ = writeln!(
        md,
        "\n## Head view\n\nWhat a linear head sees: P(x) = x/‖x‖ − m, m the mean of the \
         L2-normalised reference embeddings over this set. p1 and p99 with 95% intervals.\n"
    );
    md += &head_view_table(c, true);
    let _ = writeln!(
        md,
        "\nProbe SNR (set level, 10·log10(Σ‖P(r)‖² / Σ‖P(c) − P(r)‖²)): {:.2} dB",
        c.probe_snr_db
    );
    worst_list(
        &mut md,
        "head-view centred cosine (lowest first)",
        &c.worst_centred_cosine,
    );
    worst_list(
        &mut md,
        "head-view δ (largest first)",
        &c.worst_head_view_delta,
    );
    let _ = writeln!(
        md,
        "\n## Per image, un-normalised embeddings\n\n| metric | median | p1 | min | mean |\n|---|---:|---:|---:|---:|"
    );
    md += &row("cosine", &c.cosine);
    md += &row(
        "raw centred cosine (reference raw mean subtracted)",
        &c.raw_centred_cosine,
    );
    md += &row("SQNR (dB)", &c.sqnr_db);
    md += &row("relative L2 error", &c.relative_l2);
    md += &row("norm ratio", &c.norm_ratio);
    md += &row(
        "reference: cosine between different images",
        &c.reference_inter_image_cosine,
    );
    let _ = writeln!(
        md,
        "\n## Neighbourhoods (raw centred)\n\n- self-retrieval: {:.4}\n- top-10 neighbour overlap: mean {:.4} (chance {:.4}), min {:.4}\n- Spearman of pairwise similarities: {:.4}",
        c.self_retrieval,
        c.top10_overlap.mean,
        c.top10_overlap_chance,
        c.top10_overlap.min,
        c.pairwise_similarity_spearman
    );
    if let Some(h) = &c.head {
        let _ = writeln!(
            md,
            "\n## Downstream head `{}` ({} classes)\n\n- top-1 agreement: {:.4}\n- max probability change: {:.4} (median {:.4})\n- most frequent class covers {:.0}% of images{}",
            h.head,
            h.classes,
            h.top1_agreement,
            h.max_probability_change,
            h.probability_change.median,
            h.reference_top_class_share * 100.0,
            if h.degenerate { " — **degenerate head: agreement says little**" } else { "" }
        );
    }
    if let Some(e) = &c.head_ensemble {
        let _ = writeln!(
            md,
            "\n## Head ensemble ({} heads, reported, not gated)\n\nk-means heads at several k and seeds, a head given with `--head`, and the model's own trained classifier where the reference manifest has a `[classifier]`. Top-1 agreement over the heads that are not degenerate: min {:.4}, mean {:.4}.\n\n| head | classes | top-1 agreement | most frequent class |\n|---|---:|---:|---:|",
            e.heads.len(),
            e.min_top1_agreement,
            e.mean_top1_agreement
        );
        for h in &e.heads {
            let _ = writeln!(
                md,
                "| {} | {} | {:.4} | {:.0}%{} |",
                h.head,
                h.classes,
                h.top1_agreement,
                h.reference_top_class_share * 100.0,
                if h.degenerate { " (degenerate)" } else { "" }
            );
        }
    }
    let d = &c.per_dimension;
    let _ = writeln!(
        md,
        "\n## Per dimension\n\n- max |mean signed error|: {:.5} ({:.3} reference std)\n- exact zeros: reference {:.2}%, candidate {:.2}% of values",
        d.bias_abs_max,
        d.bias_over_std_max,
        d.zero_fraction_reference_mean * 100.0,
        d.zero_fraction_candidate_mean * 100.0
    );
    if let Some((what, nf)) = r.noise_floor {
        let _ = writeln!(
            md,
            "\n## Noise floor: reference vs itself ({what})\n\nHead view:\n"
        );
        md += &head_view_table(nf, false);
        let _ = writeln!(
            md,
            "\nUn-normalised:\n\n| metric | median | p1 | min | mean |\n|---|---:|---:|---:|---:|"
        );
        md += &row("cosine", &nf.cosine);
        md += &row("raw centred cosine", &nf.raw_centred_cosine);
        md += &row("SQNR (dB)", &nf.sqnr_db);
        let _ = writeln!(
            md,
            "\nprobe SNR {:.2} dB, self-retrieval {:.4}, top-10 overlap mean {:.4}",
            nf.probe_snr_db, nf.self_retrieval, nf.top10_overlap.mean
        );
    }
    md += "\nPlots: `cosine.svg`, `centred-cosine.svg` (head view), `head-view-delta.svg`, `raw-centred-cosine.svg`, `sqnr.svg`, `bias.svg`; all numbers, per-image values named by image: `report.json`.\n";
    md
}

const W: f64 = 640.0;
const H: f64 = 320.0;
const PAD: f64 = 48.0;

fn svg_frame(title: &str, body: &str, x_min: f64, x_max: f64, y_label: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}</text>\
<line x1=\"{PAD}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\
<line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{}\" stroke=\"black\"/>\
<text x=\"{PAD}\" y=\"{}\" text-anchor=\"start\">{x_min:.4}</text>\
<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{x_max:.4}</text>\
<text x=\"12\" y=\"{}\" transform=\"rotate(-90 12 {})\" text-anchor=\"middle\">{y_label}</text>{body}</svg>\n",
        W / 2.0,
        escape(title),
        H - PAD,
        W - PAD,
        H - PAD,
        H - PAD,
        H - PAD + 16.0,
        W - PAD,
        H - PAD + 16.0,
        H / 2.0,
        H / 2.0
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A histogram of `values` as SVG.
pub fn histogram(title: &str, values: &[f64], bins: usize) -> String {
    if values.is_empty() {
        return svg_frame(title, "", 0.0, 0.0, "images");
    }
    let lo = values.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let width = if hi > lo {
        (hi - lo) / bins as f64
    } else {
        1.0
    };
    let mut counts = vec![0usize; bins];
    for v in values {
        counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
    }
    let top = *counts.iter().max().unwrap_or(&1) as f64;
    let bar_w = (W - 2.0 * PAD) / bins as f64;
    let mut body = String::new();
    for (i, &n) in counts.iter().enumerate() {
        let h = (H - 2.0 * PAD) * n as f64 / top;
        let _ = write!(
            body,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#4a7ab0\"><title>{n}</title></rect>",
            PAD + i as f64 * bar_w,
            H - PAD - h,
            (bar_w - 1.0).max(0.5)
        );
    }
    let _ = write!(
        body,
        "<text x=\"{}\" y=\"{}\">max {top}</text>",
        PAD + 4.0,
        PAD - 4.0
    );
    svg_frame(title, &body, lo, hi, "images")
}

/// A line through `values` in index order (per-dimension plots).
pub fn series(title: &str, values: &[f64]) -> String {
    if values.is_empty() {
        return svg_frame(title, "", 0.0, 0.0, "value");
    }
    let lo = values
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .min(0.0);
    let hi = values
        .iter()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max)
        .max(0.0);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let y = |v: f64| H - PAD - (H - 2.0 * PAD) * (v - lo) / span;
    let step = (values.len() / 2000).max(1);
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .step_by(step)
        .map(|(i, &v)| {
            format!(
                "{:.1},{:.1}",
                PAD + (W - 2.0 * PAD) * i as f64 / values.len() as f64,
                y(v)
            )
        })
        .collect();
    let body = format!(
        "<line x1=\"{PAD}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#999\"/><polyline fill=\"none\" stroke=\"#b04a4a\" points=\"{2}\"/>\
<text x=\"{3}\" y=\"{4}\">{hi:.4}</text><text x=\"{3}\" y=\"{5}\">{lo:.4}</text>",
        y(0.0),
        W - PAD,
        points.join(" "),
        PAD + 4.0,
        PAD + 12.0,
        H - PAD - 4.0
    );
    svg_frame(title, &body, 0.0, values.len() as f64, "mean signed error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_plots_are_well_formed() {
        let h = histogram("a <b>", &[0.9, 0.95, 0.99, 1.0], 10);
        assert!(
            h.starts_with("<svg") && h.trim_end().ends_with("</svg>") && h.contains("a &lt;b&gt;")
        );
        assert_eq!(h.matches("<rect x=").count(), 10);
        let s = series("bias", &[0.1, -0.2, 0.05]);
        assert!(s.contains("<polyline"));
    }

    #[test]
    fn markdown_shows_head_view_intervals_worst_images_and_chance() {
        let r: Vec<Vec<f32>> = (0..30)
            .map(|i| {
                (0..16)
                    .map(|d| 2.0 + ((i * 7 + d * 3) as f32).sin() * 0.2)
                    .collect()
            })
            .collect();
        let mut c: Vec<Vec<f32>> = r
            .iter()
            .map(|v| v.iter().map(|x| x * 0.86).collect())
            .collect();
        c[4] = r[5].clone();
        let names: Vec<String> = (0..30).map(|i| format!("img-{i}.png")).collect();
        let cmp = crate::compare_named(&r, &c, &names, None).unwrap();
        let gates = crate::Gates::parse(
            "[gates.centred_cosine_p1]\nmin = 0.95\n[gates.head_view_delta_p99]\nmax = 0.33\n",
            "t",
        )
        .unwrap()
        .evaluate(&cmp, "t")
        .unwrap();
        let report = Report {
            reference: "ref".into(),
            candidate: "cand".into(),
            images: names.clone(),
            comparison: &cmp,
            noise_floor: Some(("1 vs 2 threads", &cmp)),
            gates: &gates,
            verdict: "FAIL",
            warnings: Vec::new(),
        };
        let md = markdown(&report);
        let ci = cmp.confidence_intervals["centred_cosine_p1"];
        assert!(
            md.contains(&format!(
                "| centred_cosine_p1 | {:.4} | {ci} | >= 0.95 | **FAIL** |",
                cmp.centred_cosine.p1
            )),
            "{md}"
        );
        assert!(md.contains("| head_view_delta_p99 |") && md.contains("| <= 0.33 |"));
        assert!(
            md.contains(&format!(
                "- `img-4.png` (#4): {:.4}",
                cmp.per_image.centred_cosine[4]
            )),
            "{md}"
        );
        assert!(md.contains(&format!("(chance {:.4})", 10.0 / 29.0)), "{md}");
        assert!(md.contains(&format!(
            "between different reference images {:.4}",
            cmp.reference_inter_image_cosine.median
        )));
        assert!(md.contains("Probe SNR") && md.contains("raw centred cosine"));
        let dir = tempfile::tempdir().unwrap();
        write_report(dir.path(), &report).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
                .unwrap();
        let comparison = &json["comparison"];
        assert_eq!(comparison["per_image"]["image"][4], "img-4.png");
        assert_eq!(comparison["worst_centred_cosine"][0]["image"], "img-4.png");
        assert!(comparison["confidence_intervals"]["head_view_delta_p99"]["hi"].is_number());
        assert!(dir.path().join("head-view-delta.svg").is_file());
    }
}
