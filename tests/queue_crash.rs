//! Crash safety of the queue under SIGKILL: a writer process killed at random moments never
//! loses a record it reported accepted, and never leaves a damaged one in the middle.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use dermedge_queue::{Queue, QueueOptions};
use dermedge_record::DeviceKey;

/// A deterministic pseudo-random sequence (xorshift), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn no_accepted_record_is_lost_when_the_writer_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let queue_dir = dir.path().join("queue");
    let key = DeviceKey::generate();
    let mut rng = Rng(0x5eed_2026);
    let mut total_accepted = 0usize;
    for run in 0..200 {
        let durability = if run % 2 == 0 { "per-record" } else { "group" };
        let mut child = Command::new(env!("CARGO_BIN_EXE_queue-crash-writer"))
            .args([
                queue_dir.to_str().unwrap(),
                &key.to_hex(),
                "dev-crash",
                durability,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill it at a random moment once it is appending (not while it starts up).
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut accepted = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut parts = line.split_whitespace().skip(1);
                if let (Some(seq), Some(id)) = (parts.next(), parts.next()) {
                    accepted.push((seq.parse::<u64>().unwrap(), id.to_string()));
                    let _ = tx.send(());
                }
            }
            accepted
        });
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("run {run}: the writer accepted nothing"));
        std::thread::sleep(Duration::from_micros(rng.next() % 30_000));
        child.kill().unwrap();
        child.wait().unwrap();
        let accepted = reader.join().unwrap();
        total_accepted += accepted.len();

        let mut queue = Queue::open(&queue_dir, &key, "dev-crash", QueueOptions::default())
            .unwrap_or_else(|e| panic!("run {run}: reopening after SIGKILL: {e}"));
        assert!(
            queue.recovery().skipped.is_empty(),
            "run {run}: a record in the middle was damaged: {:?}",
            queue.recovery()
        );
        // Every record returned decodes and verifies (read_after checks CRC, AEAD and CBOR).
        let stored = queue
            .unacknowledged(usize::MAX, usize::MAX)
            .unwrap_or_else(|e| panic!("run {run}: {e}"));
        let ids: Vec<(u64, String)> = stored
            .iter()
            .map(|s| (s.seq, s.envelope.id.clone()))
            .collect();
        for a in &accepted {
            assert!(
                ids.contains(a),
                "run {run}: accepted record {a:?} is missing"
            );
        }
        assert!(
            ids.windows(2).all(|w| w[0].0 < w[1].0),
            "run {run}: out of order"
        );
        if let Some(last) = ids.last() {
            queue.acknowledge(last.0).unwrap();
        }
    }
    assert!(
        total_accepted > 200,
        "the writer should have accepted records: {total_accepted}"
    );
    eprintln!("crash test: 200 SIGKILLs, {total_accepted} accepted records, none lost");
}
