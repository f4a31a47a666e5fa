//! `dermedge embed`: files and directories in, embeddings out; bad files are reported and skipped.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use dermedge_core::preprocess::{decode_file, DecodeLimits};
use dermedge_core::ModelManifest;
use indicatif::{ProgressBar, ProgressStyle};

use crate::output::{self, Failure, Format, ModelRef, Record};
use crate::{inputs, RuntimeArgs};

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Image files, or directories searched recursively for images.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The model's manifest (.toml next to the .tflite).
    #[arg(long, short)]
    model: PathBuf,
    /// Write embeddings here (.cbor, .npy + .npy.json index, or .jsonl); without it, print a summary.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Output format, when the extension does not say.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Largest image side accepted, in pixels; larger images are refused before decoding.
    #[arg(long, default_value_t = DecodeLimits::default().max_side)]
    max_side: u32,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Returns Ok(true) when every file was embedded, Ok(false) when some were refused.
pub fn run(args: &EmbedArgs) -> Result<bool> {
    let manifest = ModelManifest::load(&args.model)?;
    let files = inputs::expand(&args.inputs)?;
    let started = Instant::now();
    let mut embedder = args.runtime.load(&manifest)?;
    log::info!(
        "model ready in {:.2?}: {}",
        started.elapsed(),
        embedder.backend()
    );
    let limits = DecodeLimits {
        max_side: args.max_side,
        ..DecodeLimits::default()
    };

    let progress = if files.len() > 1 {
        ProgressBar::new(files.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} embedding [{bar:30}] {pos}/{len} {elapsed} eta {eta} {wide_msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut records = Vec::new();
    let mut failures = Vec::new();
    for file in &files {
        progress.set_message(
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let result = decode_file(file, &limits)
            .map_err(anyhow::Error::from)
            .and_then(|image| {
                embedder
                    .embed(&image)
                    .with_context(|| format!("{}: embedding failed", file.display()))
            });
        match result {
            Ok(embedding) => records.push(Record {
                file: file.display().to_string(),
                embedding: embedding.values,
            }),
            Err(e) => {
                progress.suspend(|| eprintln!("error: {e:#}"));
                failures.push(Failure {
                    file: file.display().to_string(),
                    error: format!("{e:#}"),
                });
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    let elapsed = started.elapsed();

    let model = ModelRef {
        id: manifest.model.id.clone(),
        version: manifest.model.version.clone(),
        precision: manifest.model.precision,
        sha256: manifest.model.sha256.clone(),
        embedding_dim: manifest.model.embedding_dim,
        runtime: embedder.runtime_description(),
    };
    match &args.out {
        Some(path) => {
            let format = Format::resolve(args.format, path);
            output::write(path, format, &model, &records, &failures)?;
            println!(
                "wrote {} embeddings ({}-d, {} {}) to {} [{:?}]",
                records.len(),
                model.embedding_dim,
                model.id,
                model.precision.as_str(),
                path.display(),
                format
            );
        }
        None => {
            for r in &records {
                let norm = r.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
                let head: Vec<String> = r
                    .embedding
                    .iter()
                    .take(4)
                    .map(|v| format!("{v:.5}"))
                    .collect();
                println!(
                    "{}\t{}-d\t|e|={norm:.4}\t[{}, …]",
                    r.file,
                    r.embedding.len(),
                    head.join(", ")
                );
            }
        }
    }
    eprintln!(
        "{} embedded, {} failed, {} images in {:.2?} ({})",
        records.len(),
        failures.len(),
        files.len(),
        elapsed,
        model.runtime
    );
    Ok(failures.is_empty())
}
