//! `dermedge bench queue|sync`: throughput on this device's own storage and loopback, as
//! Markdown rows for docs/BENCHMARKS.md. Configurations run interleaved, several rounds each;
//! medians are reported, so a noisy machine affects every configuration alike.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use dermedge_hub::server::HubServer;
use dermedge_hub::store::Store;
use dermedge_queue::{
    new_record_id, DeviceKey, Durability, Embedding, EmbeddingType, Queue, QueueOptions, Record,
    RECORD_FORMAT,
};
use dermedge_sync::{SyncClient, SyncConfig};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Append throughput: fsync per record vs group commit (and f16 embeddings).
    Queue {
        /// Where to put the scratch queues (the storage to measure; default: a temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 300)]
        records: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Embedding dimension of the synthetic records.
        #[arg(long, default_value_t = 6144)]
        dim: usize,
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

fn record(i: usize, dim: usize, dtype: EmbeddingType) -> Record {
    let values: Vec<f32> = (0..dim)
        .map(|j| ((i * dim + j) as f32 * 0.001).sin())
        .collect();
    Record {
        format: RECORD_FORMAT,
        id: new_record_id(),
        captured_at_ms: i as i64,
        device_id: "bench".into(),
        model_id: "df-r101x3".into(),
        precision: "int8".into(),
        embedding: Embedding::new(&values, dtype),
        heads: Vec::new(),
        quality: None,
        source: None,
        thumbnail_jpeg: Some(vec![0x5a; 4096]),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn scratch(dir: &Option<PathBuf>) -> Result<tempfile::TempDir> {
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
        BenchCommand::Queue {
            dir,
            records,
            rounds,
            dim,
        } => bench_queue(dir, *records, *rounds, *dim),
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
            let batch: Vec<Record> = (0..n).map(|i| record(i, dim, *dtype)).collect();
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
    let batch_sizes = [16usize, 64, 256];
    let mut rates = vec![Vec::new(); batch_sizes.len()];
    for _ in 0..rounds {
        for (b, &batch) in batch_sizes.iter().enumerate() {
            let tmp = scratch(dir)?;
            let db = tmp.path().join("hub.sqlite");
            Store::open(&db)?.enroll("bench", &key)?;
            let hub = HubServer::start(&db, "127.0.0.1:0", 2)?;
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
                queue
                    .lock()
                    .expect("lock")
                    .append(&record(i, dim, EmbeddingType::F32))?;
            }
            queue.lock().expect("lock").commit()?;
            let mut config = SyncConfig::new(&format!("http://{}", hub.addr()));
            config.batch_records = batch;
            config.batch_bytes = usize::MAX;
            let mut client = SyncClient::new(config, &key, &qdir)?;
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
