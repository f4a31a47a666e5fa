//! `dermedge head train|eval|predict`: linear heads from embeddings and a labels CSV.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dermedge_head::{eval, train, HeadKind, LinearHead, Targets, TrainOptions};
use indicatif::{ProgressBar, ProgressStyle};

use crate::embeddings_file::{self, EmbeddingSet};

#[derive(Subcommand)]
pub enum HeadCommand {
    /// Fit a head (L2-regularised logistic regression) to embeddings and labels.
    Train(TrainArgs),
    /// Score a head on labelled embeddings: accuracy, per-class ROC AUC, confusion matrix.
    Eval(EvalArgs),
    /// Print each embedding's top classes under one or more heads.
    Predict {
        /// Head files (JSON, `dermedge-head/1`).
        #[arg(long = "head", required = true)]
        heads: Vec<PathBuf>,
        /// Embeddings written by `dermedge embed` (.cbor, .npy + .npy.json, .jsonl).
        #[arg(long)]
        embeddings: PathBuf,
    },
}

#[derive(Args)]
pub struct TrainArgs {
    /// Embeddings written by `dermedge embed` (.cbor, .npy + .npy.json, .jsonl).
    #[arg(long)]
    embeddings: PathBuf,
    /// CSV with a header `file,label`; `file` matches the embedding's file (path or name).
    /// With --multi-label, `label` holds `;`-separated labels (may be empty).
    #[arg(long)]
    labels: PathBuf,
    /// Where to write the head (JSON).
    #[arg(long)]
    out: PathBuf,
    /// The head's name (default: the output file's stem).
    #[arg(long)]
    name: Option<String>,
    /// Independent labels (sigmoid) instead of one class per image (softmax).
    #[arg(long)]
    multi_label: bool,
    /// Class order (comma-separated); default: the labels sorted.
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// L2 regularisation strength.
    #[arg(long, default_value_t = TrainOptions::default().lambda)]
    lambda: f32,
    #[arg(long, default_value_t = TrainOptions::default().iterations)]
    iterations: usize,
    #[arg(long, default_value_t = TrainOptions::default().learning_rate)]
    learning_rate: f32,
    /// Use embeddings as they are instead of L2-normalising them first.
    #[arg(long)]
    no_l2_normalize: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    head: PathBuf,
    #[arg(long)]
    embeddings: PathBuf,
    #[arg(long)]
    labels: PathBuf,
    /// Print the scores as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(command: &HeadCommand) -> Result<()> {
    match command {
        HeadCommand::Train(args) => train_head(args),
        HeadCommand::Eval(args) => eval_head(args),
        HeadCommand::Predict { heads, embeddings } => predict(heads, embeddings),
    }
}

/// One labels-CSV row: line number, file, labels.
struct LabelRow {
    line: usize,
    file: String,
    labels: Vec<String>,
}

fn read_labels(path: &Path, multi_label: bool) -> Result<Vec<LabelRow>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read labels", path.display()))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.trim().eq_ignore_ascii_case("file,label") => {}
        other => bail!(
            "{}:1: expected the header `file,label`, found {:?}",
            path.display(),
            other.map(|(_, l)| l).unwrap_or("")
        ),
    }
    let mut rows = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let Some((file, label)) = line.rsplit_once(',') else {
            bail!(
                "{}:{}: expected `file,label`, found {line:?}",
                path.display(),
                i + 1
            );
        };
        let labels: Vec<String> = if multi_label {
            label
                .split(';')
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        } else {
            let label = label.trim();
            if label.is_empty() || label.contains(';') {
                bail!(
                    "{}:{}: expected exactly one label for a softmax head, found {label:?} \
                     (use --multi-label for several)",
                    path.display(),
                    i + 1
                );
            }
            vec![label.to_string()]
        };
        rows.push(LabelRow {
            line: i + 1,
            file: file.trim().to_string(),
            labels,
        });
    }
    if rows.is_empty() {
        bail!("{}: no labelled rows", path.display());
    }
    Ok(rows)
}

fn file_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// Pair each label row with its embedding row index (by exact path, else by unique file name).
fn match_rows(set: &EmbeddingSet, labels: &[LabelRow], labels_path: &Path) -> Result<Vec<usize>> {
    let exact: HashMap<&str, usize> = set
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.as_str(), i))
        .collect();
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, f) in set.files.iter().enumerate() {
        by_name.entry(file_name(f)).or_default().push(i);
    }
    labels
        .iter()
        .map(|row| {
            if let Some(&i) = exact.get(row.file.as_str()) {
                return Ok(i);
            }
            match by_name.get(file_name(&row.file)).map(Vec::as_slice) {
                Some([i]) => Ok(*i),
                Some(_) => bail!(
                    "{}:{}: file name {} matches several embeddings; give its path",
                    labels_path.display(),
                    row.line,
                    row.file
                ),
                None => bail!(
                    "{}:{}: no embedding for {}",
                    labels_path.display(),
                    row.line,
                    row.file
                ),
            }
        })
        .collect()
}

fn targets(
    rows: &[LabelRow],
    classes: &[String],
    kind: HeadKind,
    labels_path: &Path,
) -> Result<Targets> {
    let index: HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let lookup = |row: &LabelRow, label: &str| {
        index.get(label).copied().with_context(|| {
            format!(
                "{}:{}: label {label:?} is not one of the classes {}",
                labels_path.display(),
                row.line,
                classes.join(", ")
            )
        })
    };
    Ok(match kind {
        HeadKind::Softmax => Targets::Single(
            rows.iter()
                .map(|r| lookup(r, &r.labels[0]))
                .collect::<Result<_>>()?,
        ),
        HeadKind::Sigmoid => Targets::Multi(
            rows.iter()
                .map(|r| {
                    let mut flags = vec![false; classes.len()];
                    for l in &r.labels {
                        flags[lookup(r, l)?] = true;
                    }
                    Ok(flags)
                })
                .collect::<Result<_>>()?,
        ),
    })
}

fn train_head(args: &TrainArgs) -> Result<()> {
    let set = embeddings_file::read(&args.embeddings)?;
    let labels = read_labels(&args.labels, args.multi_label)?;
    let rows = match_rows(&set, &labels, &args.labels)?;
    let unlabelled = set.rows.len() - rows.iter().collect::<BTreeSet<_>>().len();
    if unlabelled > 0 {
        log::warn!(
            "{} of {} embeddings have no label in {} and are not used",
            unlabelled,
            set.rows.len(),
            args.labels.display()
        );
    }
    let classes: Vec<String> = match &args.classes {
        Some(c) => c.clone(),
        None => labels
            .iter()
            .flat_map(|r| r.labels.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let kind = if args.multi_label {
        HeadKind::Sigmoid
    } else {
        HeadKind::Softmax
    };
    let targets = targets(&labels, &classes, kind, &args.labels)?;
    let x: Vec<Vec<f32>> = rows.iter().map(|&i| set.rows[i].clone()).collect();
    let options = TrainOptions {
        l2_normalize: !args.no_l2_normalize,
        lambda: args.lambda,
        iterations: args.iterations,
        learning_rate: args.learning_rate,
    };
    let name = args.name.clone().unwrap_or_else(|| {
        args.out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "head".into())
    });
    let bar = ProgressBar::new(options.iterations as u64).with_style(
        ProgressStyle::with_template("training {bar:30} {pos}/{len} iterations, loss {msg}")
            .expect("template"),
    );
    let head = train(
        &name,
        &set.model_id,
        &x,
        &targets,
        classes,
        &options,
        &mut |_, loss| {
            bar.inc(1);
            bar.set_message(format!("{loss:.4}"));
        },
    )
    .with_context(|| format!("training on {}", args.embeddings.display()))?;
    bar.finish();
    head.save(&args.out)
        .with_context(|| format!("{}: cannot write the head", args.out.display()))?;
    let score = eval::evaluate(&head, &x, &targets)?;
    eprintln!(
        "wrote {} ({:?}, {} classes, model {} {}-d) from {} labelled embeddings; training accuracy {:.3}",
        args.out.display(),
        head.kind,
        head.classes.len(),
        head.model_id,
        head.embedding_dim,
        x.len(),
        score.accuracy
    );
    Ok(())
}

fn eval_head(args: &EvalArgs) -> Result<()> {
    let head = LinearHead::load(&args.head)?;
    let set = embeddings_file::read(&args.embeddings)?;
    head.check_model(&set.model_id, set.dim)
        .with_context(|| format!("{}", args.embeddings.display()))?;
    let labels = read_labels(&args.labels, head.kind == HeadKind::Sigmoid)?;
    let rows = match_rows(&set, &labels, &args.labels)?;
    let targets = targets(&labels, &head.classes, head.kind, &args.labels)?;
    let x: Vec<Vec<f32>> = rows.iter().map(|&i| set.rows[i].clone()).collect();
    let score = eval::evaluate(&head, &x, &targets)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&score)?);
    } else {
        print!("{score}");
    }
    Ok(())
}

fn predict(heads: &[PathBuf], embeddings: &Path) -> Result<()> {
    let set = embeddings_file::read(embeddings)?;
    let heads: Vec<LinearHead> = heads
        .iter()
        .map(|p| {
            let head = LinearHead::load(p)?;
            head.check_model(&set.model_id, set.dim)
                .with_context(|| format!("{}", p.display()))?;
            Ok(head)
        })
        .collect::<Result<_>>()?;
    for (file, row) in set.files.iter().zip(&set.rows) {
        let answers: Vec<String> = heads
            .iter()
            .map(|h| {
                let p = h.predict(row);
                let top = (0..p.len())
                    .max_by(|&a, &b| p[a].total_cmp(&p[b]))
                    .unwrap_or(0);
                format!("{}={} ({:.2})", h.name, h.classes[top], p[top])
            })
            .collect();
        println!("{file}\t{}", answers.join("\t"));
    }
    Ok(())
}
