//! `dermedge keygen`, `dermedge queue add|status|list`, `dermedge sync`: the device's side of
//! getting records to the hub.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dermedge_core::preprocess::{decode_file, DecodeLimits};
use dermedge_core::ModelManifest;
use dermedge_device::{Outcome, Pipeline, PipelineOptions};
use dermedge_head::LinearHead;
use dermedge_queue::{Queue, QueueOptions};
use dermedge_record::{now_ms, DeviceKey, EmbeddingType, Envelope, HubPublic};
use dermedge_sync::{SyncClient, SyncConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{inputs, RuntimeArgs};

/// Which queue, and the key that opens it.
#[derive(Args, Clone, Debug)]
pub struct QueueArgs {
    /// The queue directory.
    #[arg(long)]
    queue: PathBuf,
    /// The device key file (64 hex digits; `dermedge keygen`).
    #[arg(long)]
    key_file: PathBuf,
    /// The device id (default: the one the queue was created for).
    #[arg(long)]
    device_id: Option<String>,
}

impl QueueArgs {
    pub fn open(&self) -> Result<(Queue, DeviceKey)> {
        let key = DeviceKey::load(&self.key_file)?;
        let device = match &self.device_id {
            Some(d) => d.clone(),
            None => Queue::stored_device_id(&self.queue).with_context(|| {
                format!(
                    "{}: no queue here yet; give --device-id to create one",
                    self.queue.display()
                )
            })?,
        };
        let queue = Queue::open(&self.queue, &key, &device, QueueOptions::default())?;
        report_recovery(&queue);
        Ok((queue, key))
    }
}

pub fn report_recovery(queue: &Queue) {
    let r = queue.recovery();
    for path in &r.rolled_back {
        eprintln!(
            "warning: {}: left by an interrupted update, removed",
            path.display()
        );
    }
    for (path, offset, bytes) in &r.torn_tails {
        eprintln!(
            "warning: {}: an interrupted append ({bytes} bytes at {offset}, never reported saved) was truncated",
            path.display()
        );
    }
    for (path, offset, bytes, reason) in &r.skipped {
        eprintln!(
            "error: {}: {bytes} damaged bytes at {offset} ({reason})",
            path.display()
        );
    }
    for copy in &r.quarantined {
        eprintln!("warning: the bytes are kept in {}", copy.display());
    }
    if r.state_rebuilt {
        eprintln!("error: the queue's recovery point was unreadable and was rebuilt");
    }
}

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Run image files through the device pipeline (quality gate, embedding, heads) into the queue.
    Add(AddArgs),
    /// Counts, sequence numbers and what recovery found.
    Status {
        #[command(flatten)]
        queue: QueueArgs,
        #[arg(long)]
        json: bool,
    },
    /// Print the records waiting for the hub.
    List {
        #[command(flatten)]
        queue: QueueArgs,
    },
}

#[derive(Args)]
pub struct AddArgs {
    #[command(flatten)]
    queue: QueueArgs,
    /// Image files or directories.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The model's manifest.
    #[arg(long, short)]
    model: PathBuf,
    /// Heads to run on each embedding (repeatable).
    #[arg(long = "head")]
    heads: Vec<PathBuf>,
    /// Store embeddings as f16.
    #[arg(long)]
    f16: bool,
    /// The clinic hub's public key (`hub.pub`): records are sealed to it.
    #[arg(long)]
    hub_public: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub fn run(command: &QueueCommand) -> Result<bool> {
    match command {
        QueueCommand::Add(args) => add(args),
        QueueCommand::Status { queue, json } => {
            let (q, _) = queue.open()?;
            let stats = q.stats();
            let unreported = q.unreported_gaps();
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "stats": stats,
                        "unreported_gaps": unreported,
                        "gaps": q.gaps(),
                        "recovery_found_damage": q.recovery().found_damage(),
                    }))?
                );
            } else {
                println!(
                    "{}: device {}, {} records waiting for the hub ({} bytes in {} segments); last {}, durable {}, acknowledged through {}",
                    q.dir().display(),
                    q.device_id(),
                    stats.pending_records,
                    stats.bytes,
                    stats.segments,
                    stats.last_seq,
                    stats.durable_seq,
                    stats.acked_seq
                );
            }
            for gap in &unreported {
                eprintln!(
                    "error: {gap}: lost on this device, not yet reported to the hub (gaps.log)"
                );
            }
            // Lost records make the status fail until the hub holds the record of the loss.
            Ok(!q.recovery().found_damage() && unreported.is_empty())
        }
        QueueCommand::List { queue } => {
            let (q, _) = queue.open()?;
            // Only what is not secret: the record itself is sealed to the hub.
            for s in q.unacknowledged(usize::MAX, usize::MAX)? {
                let e = &s.envelope;
                println!(
                    "{}\t{}\t{}\t{}\t{} bytes sealed",
                    s.seq,
                    e.id,
                    e.captured_at_ms,
                    e.device_id,
                    e.sealed.len()
                );
            }
            Ok(true)
        }
    }
}

pub fn load_heads(paths: &[PathBuf]) -> Result<Vec<LinearHead>> {
    paths
        .iter()
        .map(|p| LinearHead::load(p).map_err(anyhow::Error::from))
        .collect()
}

fn add(args: &AddArgs) -> Result<bool> {
    let files = inputs::expand(&args.inputs)?;
    let manifest = ModelManifest::load(&args.model)?;
    let heads = load_heads(&args.heads)?;
    let embedder = dermedge_engine::load(&manifest, &args.runtime.engine_options())
        .with_context(|| format!("loading model {}", manifest.model_path().display()))?;
    let hub_public = HubPublic::load(&args.hub_public)?;
    let (mut queue, _) = args.queue.open()?;
    let mut options = PipelineOptions::new(queue.device_id());
    if args.f16 {
        options.embedding_type = EmbeddingType::F16;
    }
    let mut pipeline = Pipeline::new(embedder, heads, options)?;
    let bar = if files.len() > 1 {
        ProgressBar::new(files.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} queueing [{bar:30}] {pos}/{len} {elapsed} {wide_msg}",
        )
        .expect("valid template"),
    );
    let (mut queued, mut refused, mut failed) = (0, 0, 0);
    for file in &files {
        bar.set_message(file.display().to_string());
        let outcome = decode_file(file, &DecodeLimits::default())
            .map_err(anyhow::Error::from)
            .and_then(|image| {
                Ok(pipeline.process(&image, now_ms(), Some(file.display().to_string()))?)
            });
        match outcome {
            Ok(Outcome::Accepted { record, .. }) => {
                let receipt = queue.append(&Envelope::seal(&record, &hub_public))?;
                log::info!(
                    "{}: queued as record {} ({})",
                    file.display(),
                    receipt.seq,
                    record.id
                );
                queued += 1;
            }
            Ok(Outcome::Refused(verdict)) => {
                let reasons: Vec<&str> = verdict.issues.iter().map(|i| i.message()).collect();
                bar.suspend(|| eprintln!("refused: {}: {}", file.display(), reasons.join("; ")));
                refused += 1;
            }
            Err(e) => {
                bar.suspend(|| eprintln!("error: {}: {e:#}", file.display()));
                failed += 1;
            }
        }
        bar.inc(1);
    }
    queue.commit()?;
    bar.finish_and_clear();
    let stats = queue.stats();
    eprintln!(
        "{queued} queued, {refused} refused by the quality gate, {failed} failed; {} records wait for the hub",
        stats.pending_records
    );
    Ok(refused == 0 && failed == 0)
}

fn parse_timeout(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if (0.1..=3600.0).contains(&t) => Ok(t),
        _ => Err(format!("{text:?}: expected seconds from 0.1 to 3600")),
    }
}

/// A new device key (owner-only), and its public key next to it (`<out>.pub`) for enrollment:
/// the only thing that leaves the device.
pub fn keygen(out: &Path) -> Result<()> {
    if out.exists() {
        bail!(
            "{}: exists; a device key is never overwritten",
            out.display()
        );
    }
    let key = DeviceKey::generate();
    key.save_new(out)?;
    let public = key.public().to_string();
    let mut public_path = out.as_os_str().to_owned();
    public_path.push(".pub");
    let public_path = PathBuf::from(public_path);
    std::fs::write(&public_path, format!("{public}\n"))
        .with_context(|| format!("writing {}", public_path.display()))?;
    println!(
        "wrote a new device key to {} (owner-only) and its public key to {}:\n{public}\nenroll it with `dermedge hub enroll --device-public {}`",
        out.display(),
        public_path.display(),
        public_path.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct SyncArgs {
    #[command(flatten)]
    queue: QueueArgs,
    /// The hub, e.g. http://hub.local:8787
    #[arg(long)]
    hub: String,
    /// The hub's public key (`hub.pub`), pinned at enrollment: only replies it signed count.
    #[arg(long)]
    hub_public: PathBuf,
    /// For an https:// hub: PEM certificate(s) to trust (the hub's own or the clinic's CA).
    #[arg(long)]
    hub_ca: Option<PathBuf>,
    /// Records per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Give up after this many consecutive failed attempts (default: keep trying).
    #[arg(long)]
    max_retries: Option<u32>,
    /// Seconds per request (0.1–3600).
    #[arg(long, default_value_t = 30.0, value_parser = parse_timeout)]
    timeout: f64,
}

/// Push everything waiting to the hub; SIGINT/SIGTERM stop after the batch in flight.
pub fn sync(args: &SyncArgs) -> Result<()> {
    let (mut queue, key) = args.queue.open()?;
    let hub = HubPublic::load(&args.hub_public)?;
    queue.seal_earlier_records_to(hub);
    let dir = queue.dir().to_path_buf();
    let mut config = SyncConfig::new(&args.hub);
    config.batch_records = args.batch;
    config.timeout = std::time::Duration::from_secs_f64(args.timeout);
    config.trust = args.hub_ca.clone();
    let mut client = SyncClient::new(config, &key, hub, &dir)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let queue = Mutex::new(queue);
    let report = client.drain(&queue, &stop, args.max_retries)?;
    let stats = queue.lock().expect("queue lock").stats();
    println!(
        "synced {} records in {} batches ({} retries); acknowledged through {}, {} still waiting",
        report.records, report.batches, report.retries, stats.acked_seq, stats.pending_records
    );
    Ok(())
}
