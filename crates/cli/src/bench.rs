//! `dermedge bench queue|sync`: throughput on this device's own storage and loopback, as
//! Markdown rows for docs/BENCHMARKS.md. Configurations run interleaved, several rounds each;
//! medians are reported, so a noisy machine affects every configuration alike.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use dermedge_fidelity::stats::percentile;
use dermedge_hub::server::HubServer;
use dermedge_hub::store::Store;
use dermedge_queue::{Durability, Queue, QueueOptions};
use dermedge_record::{
    new_record_id, DeviceKey, EmbeddingType, Envelope, HubKey, Record, StoredEmbedding,
    RECORD_FORMAT,
};
use dermedge_sync::{SyncClient, SyncConfig};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// StoredEmbedding speed and memory, per stage, like TFLite's benchmark_model: load, first
    /// embedding, warm-up, timed runs (median, p90, min), peak RSS; a --threads sweep.
    Embed(EmbedBenchArgs),
    /// One configuration of `bench embed`, in this process, as JSON (used by the sweep).
    #[command(hide = true)]
    EmbedOne(EmbedBenchArgs),
    /// Append throughput: fsync per record vs group commit (and f16 embeddings).
    Queue {
        /// Where to put the scratch queues (the storage to measure; default: a temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 300)]
        records: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// StoredEmbedding dimension of the synthetic records.
        #[arg(long, default_value_t = 6144)]
        dim: usize,
    },
    /// The hub under load and faults: many devices syncing at once over loopback while stalled,
    /// vanished and slow-drip clients hold connections; ingest rate, batch and health latency,
    /// peak RSS (docs/BENCHMARKS.md).
    Hub {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Simulated devices per round.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 100, 200])]
        devices: Vec<usize>,
        /// Records each device syncs.
        #[arg(long, default_value_t = 32)]
        records: usize,
        /// Clients that stall mid-request (half in their headers, half in their bodies), plus
        /// as many that vanish mid-body and a few slow drips.
        #[arg(long, default_value_t = 50)]
        stalled: usize,
        #[arg(long, default_value_t = 6144)]
        dim: usize,
        /// Also run every round against this PostgreSQL database (`postgres://…`), after SQLite.
        #[arg(long)]
        postgres: Option<String>,
    },
    /// Sync throughput to a hub on loopback (real server, real SQLite) for several batch sizes.
    Sync {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        records: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 6144)]
        dim: usize,
    },
}

pub(crate) fn record(i: usize, dim: usize, dtype: EmbeddingType) -> Record {
    let values: Vec<f32> = (0..dim)
        .map(|j| ((i * dim + j) as f32 * 0.001).sin())
        .collect();
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: i as i64,
        device_id: "bench".into(),
        model_id: "df-r101x3".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&values, dtype),
        heads: Vec::new(),
        quality: None,
        source: None,
        // The hub checks that a thumbnail is a JPEG (its first two bytes); the size is a real one's.
        thumbnail_jpeg: Some([&[0xFF, 0xD8][..], &[0x5a; 4094]].concat()),
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

pub(crate) fn scratch(dir: &Option<PathBuf>) -> Result<tempfile::TempDir> {
    Ok(match dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    })
}

pub fn run(command: &BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Embed(args) => bench_embed(args),
        BenchCommand::EmbedOne(args) => bench_embed_one(args),
        BenchCommand::Queue {
            dir,
            records,
            rounds,
            dim,
        } => bench_queue(dir, *records, *rounds, *dim),
        BenchCommand::Hub {
            dir,
            devices,
            records,
            stalled,
            dim,
            postgres,
        } => crate::bench_hub::run(dir, devices, *records, *stalled, *dim, postgres.as_deref()),
        BenchCommand::Sync {
            dir,
            records,
            rounds,
            dim,
        } => bench_sync(dir, *records, *rounds, *dim),
    }
}

fn bench_queue(dir: &Option<PathBuf>, n: usize, rounds: usize, dim: usize) -> Result<()> {
    let key = DeviceKey::generate();
    let hub = HubKey::generate().public();
    let configs: [(&str, Durability, EmbeddingType); 4] = [
        (
            "fsync per record, f32",
            Durability::PerRecord,
            EmbeddingType::F32,
        ),
        (
            "group commit (16 records / 50 ms), f32",
            Durability::Group {
                max_records: 16,
                max_delay_ms: 50,
            },
            EmbeddingType::F32,
        ),
        (
            "fsync per record, f16",
            Durability::PerRecord,
            EmbeddingType::F16,
        ),
        (
            "group commit (16 records / 50 ms), f16",
            Durability::Group {
                max_records: 16,
                max_delay_ms: 50,
            },
            EmbeddingType::F16,
        ),
    ];
    let mut rates = vec![Vec::new(); configs.len()];
    let mut sizes = vec![0u64; configs.len()];
    for round in 0..rounds {
        for (c, (_, durability, dtype)) in configs.iter().enumerate() {
            let tmp = scratch(dir)?;
            let options = QueueOptions {
                durability: *durability,
                ..QueueOptions::default()
            };
            let mut queue = Queue::open(tmp.path(), &key, "bench", options)?;
            // Sealed to the hub beforehand: this measures the queue alone.
            let batch: Vec<Envelope> = (0..n)
                .map(|i| Envelope::seal(&record(i, dim, *dtype), &hub))
                .collect();
            let started = Instant::now();
            for r in &batch {
                queue.append(r)?;
            }
            queue.commit()?;
            let secs = started.elapsed().as_secs_f64();
            rates[c].push(n as f64 / secs);
            sizes[c] = queue.stats().bytes / n as u64;
            log::info!(
                "round {round}: {}: {:.0} records/s",
                configs[c].0,
                n as f64 / secs
            );
        }
    }
    println!("| queue append ({n} records of {dim}-d + 4 KiB thumbnail, {rounds} rounds) | median records/s | bytes/record on disk | vs fsync per record |");
    println!("|---|---|---|---|");
    let base = median(rates[0].clone());
    for (c, (name, _, _)) in configs.iter().enumerate() {
        let m = median(rates[c].clone());
        println!("| {name} | {m:.0} | {} | {:.2}× |", sizes[c], m / base);
    }
    Ok(())
}

fn bench_sync(dir: &Option<PathBuf>, n: usize, rounds: usize, dim: usize) -> Result<()> {
    let key = DeviceKey::generate();
    let hub_key = HubKey::generate();
    let hub_public = hub_key.public();
    let batch_sizes = [16usize, 64, 256];
    let mut rates = vec![Vec::new(); batch_sizes.len()];
    for _ in 0..rounds {
        for (b, &batch) in batch_sizes.iter().enumerate() {
            let tmp = scratch(dir)?;
            let db = tmp.path().join("hub.sqlite");
            Store::open(&db)?.enroll("bench", &key.public())?;
            let hub = HubServer::start(&db, hub_key.clone(), "127.0.0.1:0", 2)?;
            let qdir = tmp.path().join("queue");
            let options = QueueOptions {
                durability: Durability::Group {
                    max_records: 64,
                    max_delay_ms: 1000,
                },
                ..QueueOptions::default()
            };
            let queue = Queue::open(&qdir, &key, "bench", options)?;
            let queue = Mutex::new(queue);
            for i in 0..n {
                queue.lock().expect("lock").append(&Envelope::seal(
                    &record(i, dim, EmbeddingType::F32),
                    &hub_public,
                ))?;
            }
            queue.lock().expect("lock").commit()?;
            let mut config = SyncConfig::new(&format!("http://{}", hub.addr()));
            config.batch_records = batch;
            config.batch_bytes = usize::MAX;
            let mut client = SyncClient::new(config, &key, hub_public, &qdir)?;
            let started = Instant::now();
            let report = client.drain(&queue, &AtomicBool::new(false), Some(0))?;
            let secs = started.elapsed().as_secs_f64();
            anyhow::ensure!(report.records == n, "synced {} of {n}", report.records);
            rates[b].push(n as f64 / secs);
            hub.shutdown();
        }
    }
    println!("| sync to a loopback hub ({n} records of {dim}-d, {rounds} rounds) | median records/s | median MB/s of embeddings |");
    println!("|---|---|---|");
    for (b, batch) in batch_sizes.iter().enumerate() {
        let m = median(rates[b].clone());
        println!(
            "| batches of {batch} | {m:.0} | {:.1} |",
            m * (dim * 4) as f64 / 1e6
        );
    }
    Ok(())
}

/// One configuration of `dermedge bench embed`, measured in its own process (clean RSS and
/// start-up numbers).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EmbedBench {
    pub model: String,
    pub precision: dermedge_core::Precision,
    pub model_bytes: u64,
    pub threads: u32,
    pub accelerator: String,
    pub weight_cache: bool,
    /// The arithmetic float ops ran in on the CPU (after any fallback).
    #[serde(default)]
    pub cpu_arithmetic: dermedge_engine::CpuArithmetic,
    /// Model load and compile, seconds.
    pub load_s: f64,
    /// The first embedding (preprocess + invoke + read), seconds.
    pub first_embed_s: f64,
    /// From process start to the first embedding, seconds.
    pub start_to_first_embedding_s: f64,
    pub runs: usize,
    /// Per stage: median, p90, min seconds over the timed runs.
    pub stages: Vec<(String, [f64; 3])>,
    pub peak_rss_bytes: u64,
    /// Resident bytes at the end, by what is mapped (file, `[heap]`, `[anon]`), largest first:
    /// where the peak goes.
    #[serde(default)]
    pub resident_by_mapping: Vec<(String, u64)>,
}

fn stat(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| percentile(&v, q);
    [at(0.5), at(0.9), v[0]]
}

/// Seconds since this process started (/proc/self/stat field 22 against /proc/uptime).
fn process_age() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let start_ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let hz = clock_ticks_per_second();
    Some(uptime - start_ticks / hz)
}

fn clock_ticks_per_second() -> f64 {
    // _SC_CLK_TCK is 100 on every Linux dermedge targets; read it from getconf where available.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The `top` largest resident mappings of this process, largest first.
fn resident_by_mapping(top: usize) -> Vec<(String, u64)> {
    let mut list: Vec<(String, u64)> = dermedge_core::memory::resident_by_mapping()
        .into_iter()
        .filter(|(_, b)| *b > 0)
        .collect();
    list.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    list.truncate(top);
    list
}

pub use dermedge_core::memory::peak_rss_bytes;

#[derive(clap::Args, Debug, Clone)]
pub struct EmbedBenchArgs {
    /// The model's manifest.
    #[arg(long, short)]
    pub model: PathBuf,
    /// Images to cycle through (files or directories).
    #[arg(long, default_value = "tests/fixtures/images")]
    pub images: Vec<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Thread counts to sweep, each in its own process.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pub threads: Vec<u32>,
    /// cpu, gpu, npu or edge-tpu.
    #[arg(long, default_value = "cpu")]
    pub accelerator: dermedge_engine::Accelerator,
    /// XNNPACK weight cache file (made on the first start, mapped on later ones).
    #[arg(long)]
    pub weight_cache: Option<PathBuf>,
    /// Arithmetic of float ops on the CPU: fp32 or fp16 (XNNPACK's float16).
    #[arg(long, default_value = "fp32")]
    pub cpu_arithmetic: dermedge_engine::CpuArithmetic,
    /// Heads to time (default: a 7-class head with random weights bound to the model).
    #[arg(long = "head")]
    pub heads: Vec<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Run each thread count in a child process and print a table (and JSON).
pub fn bench_embed(args: &EmbedBenchArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for &threads in &args.threads {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "embed-one", "--model"])
            .arg(&args.model)
            .args([
                "--runs",
                &args.runs.to_string(),
                "--warmup",
                &args.warmup.to_string(),
            ])
            .args([
                "--threads",
                &threads.to_string(),
                "--accelerator",
                &args.accelerator.to_string(),
            ]);
        for i in &args.images {
            cmd.arg("--images").arg(i);
        }
        for h in &args.heads {
            cmd.arg("--head").arg(h);
        }
        if let Some(c) = &args.weight_cache {
            cmd.arg("--weight-cache").arg(c);
        }
        cmd.args(["--cpu-arithmetic", args.cpu_arithmetic.name()]);
        let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
        anyhow::ensure!(
            out.status.success(),
            "benchmark with {threads} threads failed"
        );
        let r: EmbedBench = serde_json::from_slice(&out.stdout)?;
        results.push(r);
    }
    println!("| {} {} ({} MB), {} runs after {} warm-up | threads | load s | first embed s | start→first s | invoke median / p90 / min s | decode | preprocess | read | heads | enqueue | pre+post ÷ invoke | peak RSS MB | RSS ÷ file |",
        results[0].model, results[0].precision, results[0].model_bytes / 1_000_000, args.runs, args.warmup);
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let get = |name: &str| {
            r.stages
                .iter()
                .find(|(n, _)| n == name)
                .map_or([0.0; 3], |s| s.1)
        };
        let invoke = get("invoke");
        let overhead = (get("preprocess")[0] + get("read")[0] + get("heads")[0]) / invoke[0];
        println!(
            "| {}{} | {} | {:.3} | {:.3} | {:.3} | {:.4} / {:.4} / {:.4} | {:.4} | {:.4} | {:.5} | {:.5} | {:.4} | {:.1} % | {:.0} | {:.2} |",
            r.accelerator,
            match (r.weight_cache, r.cpu_arithmetic) {
                (true, _) => ", weight cache",
                (false, dermedge_engine::CpuArithmetic::Fp16) => ", fp16 arithmetic",
                (false, dermedge_engine::CpuArithmetic::Fp32) => "",
            },
            r.threads,
            r.load_s,
            r.first_embed_s,
            r.start_to_first_embedding_s,
            invoke[0],
            invoke[1],
            invoke[2],
            get("decode")[0],
            get("preprocess")[0],
            get("read")[0],
            get("heads")[0],
            get("enqueue")[0],
            overhead * 100.0,
            r.peak_rss_bytes as f64 / 1e6,
            r.peak_rss_bytes as f64 / r.model_bytes as f64
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}

/// One configuration, measured in this process; prints JSON.
pub fn bench_embed_one(args: &EmbedBenchArgs) -> Result<()> {
    use dermedge_core::preprocess::{decode_file, DecodeLimits};
    use dermedge_core::ModelManifest;
    use dermedge_engine::{EngineOptions, Fallback};

    let manifest = ModelManifest::load(&args.model)?;
    let files = crate::inputs::expand(&args.images)?;
    anyhow::ensure!(!files.is_empty(), "no images to benchmark with");
    let threads = args.threads[0];
    let options = EngineOptions {
        threads: Some(threads),
        accelerator: args.accelerator,
        fallback: Fallback::Cpu,
        weight_cache: args.weight_cache.clone(),
        cpu_arithmetic: args.cpu_arithmetic,
        ..EngineOptions::default()
    };
    let started = Instant::now();
    let mut embedder = dermedge_engine::load(&manifest, &options)?;
    let load_s = started.elapsed().as_secs_f64();
    let dim = manifest.model.embedding_dim;
    let heads = if args.heads.is_empty() {
        // Timing only: a 7-class head of the model's shape.
        let x: Vec<Vec<f32>> = (0..14)
            .map(|i| {
                (0..dim)
                    .map(|j| ((i * dim + j) as f32 * 0.7).sin())
                    .collect()
            })
            .collect();
        let y: Vec<usize> = (0..14).map(|i| i % 7).collect();
        let classes = (0..7).map(|c| format!("class{c}")).collect();
        let options = dermedge_head::TrainOptions {
            iterations: 1,
            ..Default::default()
        };
        vec![dermedge_head::train_softmax(
            "bench",
            &manifest.model.id,
            &x,
            &y,
            classes,
            &options,
            |_, _| {},
        )?]
    } else {
        crate::queue::load_heads(&args.heads)?
    };
    let tmp = tempfile::tempdir()?;
    let key = DeviceKey::generate();
    let hub = HubKey::generate().public();
    let mut queue = Queue::open(tmp.path(), &key, "bench", QueueOptions::default())?;

    let first_image = decode_file(&files[0], &DecodeLimits::default())?;
    let t = Instant::now();
    embedder.fill_input(&first_image)?;
    embedder.invoke()?;
    embedder.read_output()?;
    let first_embed_s = t.elapsed().as_secs_f64();
    let start_to_first_embedding_s = process_age().unwrap_or(f64::NAN);

    for i in 0..args.warmup {
        let image = decode_file(&files[i % files.len()], &DecodeLimits::default())?;
        embedder.fill_input(&image)?;
        embedder.invoke()?;
        embedder.read_output()?;
    }
    let names = ["decode", "preprocess", "invoke", "read", "heads", "enqueue"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for i in 0..args.runs {
        let file = &files[i % files.len()];
        let mut lap = Instant::now();
        let mut split = |k: usize, times: &mut Vec<Vec<f64>>| {
            times[k].push(lap.elapsed().as_secs_f64());
            lap = Instant::now();
        };
        let image = decode_file(file, &DecodeLimits::default())?;
        split(0, &mut times);
        embedder.fill_input(&image)?;
        split(1, &mut times);
        embedder.invoke()?;
        split(2, &mut times);
        let embedding = embedder.read_output()?;
        split(3, &mut times);
        let answers: Vec<dermedge_record::HeadResult> = heads
            .iter()
            .map(|h| dermedge_record::HeadResult {
                head: h.name.clone(),
                classes: h.classes.clone(),
                probabilities: h.predict(&embedding),
                version: None,
            })
            .collect();
        split(4, &mut times);
        let mut record = record(i, 0, EmbeddingType::F32);
        record.embedding = StoredEmbedding::new(&embedding, EmbeddingType::F32);
        record.heads = answers;
        // Sealed to the hub, as the device does before it queues a record.
        queue.append(&Envelope::seal(&record, &hub))?;
        split(5, &mut times);
    }
    let result = EmbedBench {
        model: manifest.model.id.clone(),
        precision: manifest.model.precision,
        model_bytes: std::fs::metadata(manifest.model_path())?.len(),
        threads: embedder.threads(),
        accelerator: embedder.accelerator().to_string(),
        weight_cache: args.weight_cache.is_some(),
        cpu_arithmetic: embedder.cpu_arithmetic(),
        load_s,
        first_embed_s,
        start_to_first_embedding_s,
        runs: args.runs,
        stages: names
            .iter()
            .zip(times)
            .map(|(n, t)| (n.to_string(), stat(t)))
            .collect(),
        peak_rss_bytes: peak_rss_bytes(),
        resident_by_mapping: resident_by_mapping(6),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
