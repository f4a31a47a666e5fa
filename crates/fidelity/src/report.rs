//! The report: `report.json` (everything), `report.md` (the summary people read) and SVG plots of
//! the distributions (cosine, centred cosine, SQNR histograms; per-dimension bias).

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
        &histogram("centred cosine", &c.per_image.centred_cosine, 30),
    )?;
    let finite: Vec<f64> = c
        .per_image
        .sqnr_db
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    write(dir, "sqnr.svg", &histogram("SQNR (dB)", &finite, 30))?;
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

pub fn markdown(r: &Report<'_>) -> String {
    let c = r.comparison;
    let mut md = String::new();
    let _ = writeln!(md, "# Fidelity: {} vs {}\n", r.candidate, r.reference);
    let _ = writeln!(
        md,
        "**Verdict: {}** on {} images, {}-d embeddings.\n",
        r.verdict, c.images, c.dim
    );
    for w in &r.warnings {
        let _ = writeln!(md, "> warning: {w}\n");
    }
    let _ = writeln!(
        md,
        "## Gates\n\n| gate | value | needs | result |\n|---|---:|---|---|"
    );
    for g in r.gates {
        let needs = match (g.min, g.max) {
            (Some(lo), _) => format!(">= {lo}"),
            (None, Some(hi)) => format!("<= {hi}"),
            _ => String::new(),
        };
        let _ = writeln!(
            md,
            "| {} | {:.4} | {needs} | {} |",
            g.gate,
            g.value,
            if g.pass { "pass" } else { "**FAIL**" }
        );
    }
    let _ = writeln!(
        md,
        "\n## Per image\n\n| metric | median | p1 | min | mean |\n|---|---:|---:|---:|---:|"
    );
    md += &row("cosine", &c.cosine);
    md += &row("centred cosine", &c.centred_cosine);
    md += &row("SQNR (dB)", &c.sqnr_db);
    md += &row("relative L2 error", &c.relative_l2);
    md += &row("norm ratio", &c.norm_ratio);
    md += &row(
        "reference: cosine between different images",
        &c.reference_inter_image_cosine,
    );
    md += &row(
        "reference: centred cosine between different images",
        &c.reference_inter_image_centred_cosine,
    );
    let _ = writeln!(
        md,
        "\n## Neighbourhoods (centred)\n\n- self-retrieval: {:.4}\n- top-10 neighbour overlap: mean {:.4}, min {:.4}\n- Spearman of pairwise similarities: {:.4}",
        c.self_retrieval, c.top10_overlap.mean, c.top10_overlap.min, c.pairwise_similarity_spearman
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
            "\n## Noise floor: reference vs itself ({what})\n\n| metric | median | p1 | min | mean |\n|---|---:|---:|---:|---:|"
        );
        md += &row("cosine", &nf.cosine);
        md += &row("centred cosine", &nf.centred_cosine);
        md += &row("SQNR (dB)", &nf.sqnr_db);
        let _ = writeln!(
            md,
            "\nself-retrieval {:.4}, top-10 overlap mean {:.4}",
            nf.self_retrieval, nf.top10_overlap.mean
        );
    }
    md += "\nPlots: `cosine.svg`, `centred-cosine.svg`, `sqnr.svg`, `bias.svg`; all numbers: `report.json`.\n";
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
}
