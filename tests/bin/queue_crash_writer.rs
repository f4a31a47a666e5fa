//! Appends records to a queue until killed, printing `accepted <seq> <id>` for each record once
//! it is durable. The crash test kills it with SIGKILL and checks every accepted record survived.
//!
//! usage: queue-crash-writer <dir> <key-hex> <device-id> <per-record|group>

use std::io::Write;

use dermedge_queue::{Durability, Queue, QueueOptions};
use dermedge_record::{
    new_record_id, DeviceKey, EmbeddingType, Envelope, HubKey, Record, StoredEmbedding,
    RECORD_FORMAT,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, key, device, durability] = args.as_slice() else {
        eprintln!("usage: queue-crash-writer <dir> <key-hex> <device-id> <per-record|group>");
        std::process::exit(2);
    };
    let key = DeviceKey::from_hex(key).expect("a 64-hex-digit key");
    let options = QueueOptions {
        segment_bytes: 256 << 10,
        durability: match durability.as_str() {
            "group" => Durability::Group {
                max_records: 4,
                max_delay_ms: 5,
            },
            _ => Durability::PerRecord,
        },
        ..QueueOptions::default()
    };
    let mut queue = Queue::open(dir.as_ref(), &key, device, options).expect("open the queue");
    let stdout = std::io::stdout();
    let mut pending: Vec<(u64, String)> = Vec::new();
    let values: Vec<f32> = (0..6144).map(|i| (i as f32 * 0.01).sin()).collect();
    // Records are sealed to a hub; which one does not matter to the crash test.
    let hub = HubKey::from_bytes([3; 32]).public();
    for n in 0..100_000u64 {
        let record = Record {
            format: RECORD_FORMAT,
            id: new_record_id(),
            captured_at_ms: n as i64,
            device_id: device.clone(),
            model_id: "df-mini".into(),
            precision: dermedge_record::Precision::Int8,
            embedding: StoredEmbedding::new(&values, EmbeddingType::F32),
            heads: Vec::new(),
            quality: None,
            source: Some(format!("crash-{n}")),
            thumbnail_jpeg: None,
        };
        let receipt = queue
            .append(&Envelope::seal(&record, &hub))
            .expect("append");
        pending.push((receipt.seq, record.id));
        let durable = queue.durable_seq();
        let mut out = stdout.lock();
        pending.retain(|(seq, id)| {
            if *seq <= durable {
                let _ = writeln!(out, "accepted {seq} {id}");
                false
            } else {
                true
            }
        });
        let _ = out.flush();
    }
}
