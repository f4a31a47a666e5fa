//! Fuzz targets for every decoder of untrusted bytes, on stable Rust (no libFuzzer, no nightly).
//!
//! Each test runs its seed corpus (`tests/fuzz/<target>/`, made by `tests/fuzz/generate_seeds.rs`)
//! and then a deterministic mutation loop: bit flips, byte inserts and deletes, truncations,
//! splices of two inputs, interesting integers written over length fields, dictionary tokens, and
//! for some targets mutations that know the format (queue frames and recovery points sealed again,
//! journal lines, records sealed again to the hub). Inputs that produce an outcome not seen before
//! join the corpus for the rest of the run. A panic is written to
//! `tests/fuzz/<target>/crash-<hash>` and fails the test naming that file; from then on it is a
//! regression seed. `DERMEDGE_FUZZ_ITERATIONS=N` runs N mutations per target instead of the short
//! smoke; `DERMEDGE_FUZZ_SEED` changes the mutation sequence. See docs/FUZZING.md.

#[path = "fuzz/generate_seeds.rs"]
mod generate_seeds;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use dermedge_queue::{Queue, QueueOptions, Stored};
use dermedge_record::{
    hex, DeviceKey, DevicePublic, Envelope, HeadResult, HubKey, HubPublic, QualityResult, Record,
    ENVELOPE_FORMAT, SIGNATURE_BYTES,
};
use dermedge_sync::wire::{self, Batch};
use sha2::Digest;

// ---------------------------------------------------------------------------------------------
// Shared by the targets and the seed generator.

/// The device every fuzzed queue, signed message and hub request belongs to.
pub const DEVICE: &str = "dev-fuzz";

/// The fixed device key of the fuzz inputs (seeds are signed and sealed with it, so it must not
/// change).
pub fn device_key() -> DeviceKey {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = 0x40 + i as u8;
    }
    DeviceKey::from_bytes(bytes)
}

/// The fixed hub key: the seeds' records are sealed to its public key, the fuzzed hub runs with
/// it, and the sync target's acks and conflicts are signed with it.
pub fn hub_key() -> HubKey {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = 0x80 + i as u8;
    }
    HubKey::from_bytes(bytes)
}

pub fn fuzz_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(target)
}

fn xchacha_seal(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], msg: &[u8]) -> Vec<u8> {
    XChaCha20Poly1305::new(key.into())
        .encrypt(XNonce::from_slice(nonce), Payload { msg, aad })
        .expect("sealing in memory cannot fail")
}

fn xchacha_open(key: &[u8; 32], nonce: &[u8], aad: &[u8], msg: &[u8]) -> Option<Vec<u8>> {
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg, aad })
        .ok()
}

/// A deterministic 24-byte nonce (the real sealers draw random ones; the format does not care).
pub fn nonce_for(tag: &[u8]) -> [u8; 24] {
    let mut nonce = [0u8; 24];
    for (i, chunk) in nonce.chunks_mut(8).enumerate() {
        let mut h = fnv1a(tag) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h = splitmix(&mut h);
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    nonce
}

/// Stands in for the OS random source where a sealed box draws its ephemeral key, so that the
/// same plaintext is always sealed to the same bytes.
struct FixedRandom(u64);

impl crypto_box::aead::rand_core::RngCore for FixedRandom {
    fn next_u32(&mut self) -> u32 {
        splitmix(&mut self.0) as u32
    }

    fn next_u64(&mut self) -> u64 {
        splitmix(&mut self.0)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = splitmix(&mut self.0).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    fn try_fill_bytes(
        &mut self,
        dest: &mut [u8],
    ) -> Result<(), crypto_box::aead::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl crypto_box::aead::rand_core::CryptoRng for FixedRandom {}

/// `plaintext` in a sealed box to `hub`, as `HubPublic::seal` makes it, with an ephemeral key
/// derived from the plaintext instead of a random one.
pub fn seal_to_hub(hub: &HubPublic, plaintext: &[u8]) -> Vec<u8> {
    crypto_box::PublicKey::from(hub.seal)
        .seal(&mut FixedRandom(fnv1a(plaintext)), plaintext)
        .expect("sealing in memory cannot fail")
}

/// The envelope `Envelope::seal` makes of `record` (its outside copied from the record), sealed
/// deterministically.
pub fn envelope_of(record: &Record, hub: &HubPublic) -> Envelope {
    Envelope {
        format: ENVELOPE_FORMAT,
        id: record.id.clone(),
        captured_at_ms: record.captured_at_ms,
        device_id: record.device_id.clone(),
        sealed: seal_to_hub(hub, &record.to_cbor()),
    }
}

/// Queue segment layout (crates/queue/src/segment.rs): a 32-byte header, then frames
/// `"DMQR" | len u32 | seq u64 | nonce [24] | ciphertext [len] | crc32 u32`, the ciphertext being
/// an envelope's CBOR sealed with the at-rest key.
pub mod segment {
    use super::*;

    pub const HEADER_LEN: usize = 32;
    const PREFIX_LEN: usize = 40;

    pub fn header(first_seq: u64, key_check: &[u8; 16]) -> Vec<u8> {
        let mut h = b"DMQSEG01".to_vec();
        h.extend_from_slice(&first_seq.to_le_bytes());
        h.extend_from_slice(key_check);
        h
    }

    fn aad(seq: u64) -> Vec<u8> {
        let mut aad = b"dermedge-queue/1".to_vec();
        aad.extend_from_slice(&seq.to_le_bytes());
        aad
    }

    /// A frame exactly as `Queue::append` writes it, with the given nonce.
    pub fn frame(at_rest: &[u8; 32], seq: u64, nonce: &[u8; 24], plaintext: &[u8]) -> Vec<u8> {
        let ciphertext = xchacha_seal(at_rest, nonce, &aad(seq), plaintext);
        let mut frame = b"DMQR".to_vec();
        frame.extend_from_slice(&(ciphertext.len() as u32).to_le_bytes());
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(nonce);
        frame.extend_from_slice(&ciphertext);
        let crc = crc32fast::hash(&frame);
        frame.extend_from_slice(&crc.to_le_bytes());
        frame
    }

    /// The header's first sequence number, if the bytes start with a segment header.
    pub fn first_seq(buf: &[u8]) -> Option<u64> {
        (buf.len() >= 16 && &buf[..8] == b"DMQSEG01")
            .then(|| u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes")))
    }

    /// Every frame after the header that opens with `at_rest`: (seq, plaintext), in file order.
    pub fn authentic_frames(at_rest: &[u8; 32], buf: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = HEADER_LEN;
        while pos + PREFIX_LEN + 20 <= buf.len() {
            if &buf[pos..pos + 4] != b"DMQR" {
                pos += 1;
                continue;
            }
            let len = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().expect("4")) as usize;
            let end = pos + PREFIX_LEN + len;
            if end > buf.len() {
                pos += 1;
                continue;
            }
            let seq = u64::from_le_bytes(buf[pos + 8..pos + 16].try_into().expect("8"));
            match xchacha_open(
                at_rest,
                &buf[pos + 16..pos + PREFIX_LEN],
                &aad(seq),
                &buf[pos + PREFIX_LEN..end],
            ) {
                Some(plain) => {
                    out.push((seq, plain));
                    pos = end + 4;
                }
                None => pos += 1,
            }
        }
        out
    }
}

/// The queue's recovery point (crates/queue/src/state.rs): two 32-byte slots
/// `"DMQS" | crc32 of the rest | generation u64 | acked u64 | durable u64`.
pub mod state {
    pub const SLOT_LEN: usize = 32;

    pub fn slot(generation: u64, acked: u64, durable: u64) -> [u8; SLOT_LEN] {
        let mut slot = [0u8; SLOT_LEN];
        slot[..4].copy_from_slice(b"DMQS");
        slot[8..16].copy_from_slice(&generation.to_le_bytes());
        slot[16..24].copy_from_slice(&acked.to_le_bytes());
        slot[24..32].copy_from_slice(&durable.to_le_bytes());
        seal(&mut slot);
        slot
    }

    /// Write the slot's CRC, as only the queue would.
    pub fn seal(slot: &mut [u8; SLOT_LEN]) {
        let crc = crc32fast::hash(&slot[8..]);
        slot[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    /// A state file: the slots in file order.
    pub fn file(slots: &[[u8; SLOT_LEN]]) -> Vec<u8> {
        slots.concat()
    }
}

/// What the sync protocol signs (crates/sync/src/wire.rs):
/// `"dermedge-sync/2 <kind>\0" | device | 0 | counter (big-endian) | cbor`.
pub fn sync_message(kind: &str, device: &str, counter: u64, cbor: &[u8]) -> Vec<u8> {
    let mut m = format!("dermedge-sync/2 {kind}\0").into_bytes();
    m.extend_from_slice(device.as_bytes());
    m.push(0);
    m.extend_from_slice(&counter.to_be_bytes());
    m.extend_from_slice(cbor);
    m
}

/// A signed body: the signature over the message of `kind`, then `cbor`.
pub fn signed_body(signature: [u8; SIGNATURE_BYTES], cbor: &[u8]) -> Vec<u8> {
    let mut out = signature.to_vec();
    out.extend_from_slice(cbor);
    out
}

/// A request body for `cbor` as the device signs it.
pub fn sign_request(device: &str, counter: u64, cbor: &[u8]) -> Vec<u8> {
    let message = sync_message("request", device, counter, cbor);
    signed_body(device_key().sign(&message), cbor)
}

/// What a reply signs: the message of `kind` over the SHA-256 of the request it answers, then
/// its CBOR.
pub fn sync_reply_message(
    kind: &str,
    device: &str,
    counter: u64,
    request: &[u8],
    cbor: &[u8],
) -> Vec<u8> {
    let mut bound = sha2::Sha256::digest(request).to_vec();
    bound.extend_from_slice(cbor);
    sync_message(kind, device, counter, &bound)
}

/// A reply body (`ack`, `conflict`) for `cbor` as the hub signs it, answering `request`.
pub fn sign_reply(kind: &str, device: &str, counter: u64, request: &[u8], cbor: &[u8]) -> Vec<u8> {
    signed_body(
        hub_key().sign(&sync_reply_message(kind, device, counter, request, cbor)),
        cbor,
    )
}

/// A raw `POST /v2/batches` request.
pub fn batch_request(device: Option<&str>, counter: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut head = format!("POST {} HTTP/1.1\r\nHost: hub\r\n", wire::BATCH_PATH);
    if let Some(d) = device {
        head += &format!("{}: {d}\r\n", wire::DEVICE_HEADER);
    }
    if let Some(c) = counter {
        head += &format!("{}: {c}\r\n", wire::COUNTER_HEADER);
    }
    head += &format!(
        "Content-Type: {}\r\nContent-Length: {}\r\n\r\n",
        wire::CONTENT_TYPE,
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

fn to_cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("serialisable");
    out
}

// ---------------------------------------------------------------------------------------------
// The harness: PRNG, mutations, panic capture, the loop.

/// 64-bit FNV-1a: names crash files and seeds the per-target PRNG.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xorshift64*: tiny, fast, and the same sequence on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut s = seed;
        Self(splitmix(&mut s) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Values that break length fields, counters and sequence numbers.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    16,
    24,
    31,
    32,
    40,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x3ff,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    1 << 20,
    (1 << 20) + 16,
    64 << 20,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "3",
    "255",
    "256",
    "4096",
    "4097",
    "65535",
    "65536",
    "1048576",
    "1048577",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "0.0",
    "-0.0",
    "1e308",
    "1e309",
    "-1e309",
    "1e-320",
    "nan",
    "+nan",
    "-nan",
    "inf",
    "-inf",
    "0x7fffffff",
    "0o777",
    "0b1",
    "1_000",
    "3.4028236e38",
    "1979-05-27T07:32:00Z",
];

/// Says why an input must not be run (see [`Target::known_issue`]).
pub type KnownIssue = fn(&[u8]) -> Option<&'static str>;

/// A format-aware mutation: a new input from a corpus entry, or None to fall back to bytes.
pub type CustomMutator<'a> = &'a dyn Fn(&mut Rng, &[u8]) -> Option<Vec<u8>>;

/// Committed inputs: (file, bytes).
pub type Inputs = Vec<(PathBuf, Vec<u8>)>;

/// What a target needs from the loop.
pub struct Target {
    /// Directory under tests/fuzz/.
    pub name: &'static str,
    /// Mutations per run unless DERMEDGE_FUZZ_ITERATIONS says otherwise.
    pub smoke: usize,
    /// Tokens worth inserting (format syntax, field names).
    pub dict: &'static [&'static [u8]],
    /// The input is text: also mutate lines and numbers.
    pub text: bool,
    /// Longest input the mutator produces.
    pub max_len: usize,
    /// Recognises inputs that abort the whole process (not a panic) or hang, for a reason already
    /// reported with an input in pending/: they are not run unless DERMEDGE_FUZZ_PENDING=1.
    pub known_issue: Option<KnownIssue>,
}

fn write_int(data: &mut [u8], at: usize, value: u64, width: usize, big_endian: bool) {
    let bytes = value.to_le_bytes();
    for i in 0..width {
        if let Some(d) = data.get_mut(at + i) {
            *d = if big_endian {
                bytes[width - 1 - i]
            } else {
                bytes[i]
            };
        }
    }
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>], target: &Target) {
    let len = data.len();
    let ops = if target.text { 16 } else { 13 };
    match rng.below(ops) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xff, b'\n', b'"', 0x1b, 0x5b, 0x9f]);
        }
        2 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        3 if len > 0 => {
            let width = *rng.pick(&[1usize, 2, 4, 4, 4, 8, 8]);
            let value = *rng.pick(INTERESTING);
            let at = rng.below(len);
            write_int(data, at, value, width, rng.one_in(3));
        }
        4 if len > 0 => {
            // Arithmetic on a little-endian u32 (length fields are off by a few).
            let at = rng.below(len);
            let mut v = [0u8; 4];
            for (i, b) in v.iter_mut().enumerate() {
                *b = data.get(at + i).copied().unwrap_or(0);
            }
            let delta = rng.below(33) as i64 - 16;
            let n = (u32::from_le_bytes(v) as i64 + delta) as u32;
            write_int(data, at, n as u64, 4, false);
        }
        5 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes = rng.bytes(n);
            data.splice(at..at, bytes);
        }
        6 if !target.dict.is_empty() => {
            let at = rng.below(len + 1);
            let token = rng.pick(target.dict).to_vec();
            data.splice(at..at, token);
        }
        7 if !target.dict.is_empty() && len > 0 => {
            let at = rng.below(len);
            let token = rng.pick(target.dict);
            let end = (at + token.len()).min(len);
            data.splice(at..end, token.iter().copied());
        }
        8 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            data.drain(at..at + n);
        }
        9 if len > 0 => {
            data.truncate(rng.below(len));
        }
        10 if len > 0 => {
            // Copy a chunk somewhere else (duplicated fields, repeated frames).
            let from = rng.below(len);
            let n = 1 + rng.below((len - from).min(256));
            let chunk = data[from..from + n].to_vec();
            let at = rng.below(len + 1);
            if rng.one_in(2) {
                data.splice(at..at, chunk);
            } else {
                let end = (at + n).min(len);
                data.splice(at..end, chunk);
            }
        }
        11 | 12 if !corpus.is_empty() => {
            // Splice: the head of this input with the tail of another.
            let other = rng.pick(corpus);
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        13 => {
            // Lines: duplicate, delete or swap.
            let mut lines: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            let i = rng.below(lines.len());
            let j = rng.below(lines.len());
            match rng.below(3) {
                0 => {
                    let line = lines[i].clone();
                    lines.insert(j, line);
                }
                1 if lines.len() > 1 => {
                    lines.remove(i);
                }
                _ => lines.swap(i, j),
            }
            *data = lines.join(&b'\n');
        }
        14 | 15 => {
            // Replace a number (or a quoted value) with an interesting one.
            let starts: Vec<usize> = (0..len)
                .filter(|&i| {
                    data[i].is_ascii_digit() && (i == 0 || !data[i - 1].is_ascii_alphanumeric())
                        || data[i] == b'"'
                })
                .collect();
            let replacement = rng.pick(INTERESTING_NUMBERS).as_bytes().to_vec();
            if starts.is_empty() {
                let at = rng.below(len + 1);
                data.splice(at..at, replacement);
            } else {
                let at = *rng.pick(&starts);
                let end = if data[at] == b'"' {
                    data[at + 1..]
                        .iter()
                        .position(|&b| b == b'"')
                        .map_or(len, |p| at + p + 2)
                } else {
                    data[at..]
                        .iter()
                        .position(|b| !(b.is_ascii_alphanumeric() || b"._+-".contains(b)))
                        .map_or(len, |p| at + p)
                };
                data.splice(at..end, replacement);
            }
        }
        _ => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(4);
            let bytes = rng.bytes(n);
            data.splice(at..at, bytes);
        }
    }
}

/// A mutant of `input`: one to eight stacked mutations.
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], target: &Target) -> Vec<u8> {
    let mut data = input.to_vec();
    let rounds = 1 + rng.below(2) + if rng.one_in(4) { rng.below(6) } else { 0 };
    for _ in 0..rounds {
        mutate_once(rng, &mut data, corpus, target);
    }
    data.truncate(target.max_len);
    data
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PanicInfo {
    pub thread: String,
    pub message: String,
    pub location: String,
}

thread_local! {
    static FUZZING: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<PanicInfo>> = const { RefCell::new(None) };
}

/// Panics in threads the harness does not run (the hub's server threads and blocking workers).
static BACKGROUND_PANICS: Mutex<Vec<PanicInfo>> = Mutex::new(Vec::new());

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic payload)".into());
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            let current = std::thread::current();
            let thread = current.name().unwrap_or("<unnamed>").to_string();
            let panic = PanicInfo {
                thread: thread.clone(),
                message,
                location,
            };
            if FUZZING.with(Cell::get) {
                LAST_PANIC.with(|l| *l.borrow_mut() = Some(panic));
                return;
            }
            if current.name().is_none() || thread.starts_with("hub-") {
                BACKGROUND_PANICS.lock().unwrap().push(panic);
                return;
            }
            default(info);
        }));
    });
}

/// Run `f` under `catch_unwind`, with the panic hook quiet; the panic, if any.
fn catch<R>(f: impl FnOnce() -> R) -> Result<R, PanicInfo> {
    FUZZING.with(|c| c.set(true));
    LAST_PANIC.with(|l| l.borrow_mut().take());
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    FUZZING.with(|c| c.set(false));
    result.map_err(|_| {
        LAST_PANIC
            .with(|l| l.borrow_mut().take())
            .unwrap_or(PanicInfo {
                thread: "?".into(),
                message: "(panic without hook record)".into(),
                location: String::new(),
            })
    })
}

pub fn iterations(smoke: usize) -> usize {
    match std::env::var("DERMEDGE_FUZZ_ITERATIONS") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("DERMEDGE_FUZZ_ITERATIONS={v:?}: expected a count")),
        Err(_) => smoke,
    }
}

fn run_seed() -> u64 {
    match std::env::var("DERMEDGE_FUZZ_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("DERMEDGE_FUZZ_SEED={v:?}: expected a number")),
        Err(_) => 0x00de_12ed_6e00_0001,
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn read_inputs(dir: &Path) -> Inputs {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let bytes = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

/// A target's committed inputs: seeds and fixed crashes, and `pending/` (crashes not fixed yet).
pub fn load_corpus(target: &str) -> (Inputs, Inputs) {
    let dir = fuzz_dir(target);
    (read_inputs(&dir), read_inputs(&dir.join("pending")))
}

/// Outcome signatures: digits folded, long messages cut, so that "a new kind of answer" is cheap
/// to tell apart from "the same answer for another offset".
pub fn signature(text: &str) -> String {
    let mut out = String::new();
    let mut digit = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !digit {
                out.push('#');
            }
            digit = true;
        } else {
            digit = false;
            out.push(c);
        }
        if out.len() >= 120 {
            break;
        }
    }
    out
}

/// Where the input being run is kept while it runs (`target/tmp/fuzz-current-<target>`).
pub fn current_input_path(target: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-current-{target}"))
}

struct Crash {
    file: PathBuf,
    panic: PanicInfo,
}

fn crash_key(panic: &PanicInfo) -> String {
    format!("{}|{}", panic.location, signature(&panic.message))
}

/// The input being run, rewritten in place: truncating and rewriting the file for every input
/// is slow (ext4 starts writing a truncated file back when it is closed).
struct CurrentInput(Option<fs::File>);

impl CurrentInput {
    fn open(path: &Path) -> Self {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .ok();
        Self(file)
    }

    fn set(&mut self, input: &[u8]) {
        use std::os::unix::fs::FileExt;
        if let Some(f) = &self.0 {
            let _ = f
                .write_all_at(input, 0)
                .and_then(|()| f.set_len(input.len() as u64));
        }
    }
}

/// Seeds, then mutations; panics become crash files. `run` returns an outcome signature.
pub fn fuzz(target: &Target, custom: Option<CustomMutator>, mut run: impl FnMut(&[u8]) -> String) {
    install_panic_hook();
    let started = Instant::now();
    let (seeds, pending) = load_corpus(target.name);
    assert!(
        !seeds.is_empty(),
        "{}: no seeds (run DERMEDGE_FUZZ_REGENERATE=1 cargo test -p dermedge-e2e --test fuzz generate_seeds)",
        fuzz_dir(target.name).display()
    );
    let pending_mode = env_flag("DERMEDGE_FUZZ_PENDING");
    let known_issue = |input: &[u8]| match target.known_issue {
        Some(f) if !pending_mode => f(input),
        _ => None,
    };
    let mut crashes: Vec<Crash> = Vec::new();
    let mut seen = HashSet::new();
    // Panics of the inputs in pending/: reported, not fixed yet; found again, they are counted.
    let mut known = HashSet::new();
    let (mut known_hits, mut skipped) = (0usize, 0usize);
    let mut outcomes = HashSet::new();
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());

    // An abort (allocation failure, stack overflow) ends the process before a crash file can be
    // written: the input being run is always in target/tmp/fuzz-current-<target>.
    let current_path = current_input_path(target.name);
    let mut current = CurrentInput::open(&current_path);
    let mut execute = |input: &[u8], label: &str, run: &mut dyn FnMut(&[u8]) -> String| {
        current.set(input);
        let t = Instant::now();
        let result = catch(|| run(input));
        let took = t.elapsed();
        if took > slowest.0 {
            slowest = (took, label.to_string());
        }
        result
    };

    for (path, bytes) in &pending {
        if let Some(why) = known_issue(bytes) {
            eprintln!("fuzz {}: {} not run: {why}", target.name, path.display());
            continue;
        }
        match execute(bytes, &path.display().to_string(), &mut run) {
            Err(panic) if pending_mode => {
                seen.insert(crash_key(&panic));
                crashes.push(Crash {
                    file: path.clone(),
                    panic,
                });
            }
            Err(panic) => {
                known.insert(crash_key(&panic));
            }
            Ok(_) => eprintln!(
                "fuzz {}: {} no longer crashes: move it out of pending/ (it becomes a regression seed)",
                target.name,
                path.display()
            ),
        }
    }
    for (path, bytes) in &seeds {
        match execute(bytes, &path.display().to_string(), &mut run) {
            Ok(outcome) => {
                outcomes.insert(outcome);
            }
            Err(panic) => {
                seen.insert(crash_key(&panic));
                crashes.push(Crash {
                    file: path.clone(),
                    panic,
                });
            }
        }
        corpus.push(bytes.clone());
    }
    let seed_count = corpus.len();

    let n = iterations(target.smoke);
    let mut rng = Rng::new(run_seed() ^ fnv1a(target.name.as_bytes()));
    for i in 0..n {
        let base = corpus[rng.below(corpus.len())].clone();
        let input = match custom {
            Some(custom) if rng.one_in(2) => {
                custom(&mut rng, &base).unwrap_or_else(|| mutate(&mut rng, &base, &corpus, target))
            }
            _ => mutate(&mut rng, &base, &corpus, target),
        };
        if known_issue(&input).is_some() {
            skipped += 1;
            continue;
        }
        match execute(&input, &format!("mutation {i}"), &mut run) {
            Ok(outcome) => {
                if outcomes.insert(outcome) && corpus.len() < seed_count + 512 {
                    corpus.push(input);
                }
            }
            Err(panic) => {
                let key = crash_key(&panic);
                if known.contains(&key) {
                    known_hits += 1;
                    continue;
                }
                if !seen.insert(key) {
                    continue;
                }
                let file = fuzz_dir(target.name).join(format!("crash-{:016x}", fnv1a(&input)));
                fs::write(&file, &input).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                crashes.push(Crash { file, panic });
                if crashes.len() >= 5 {
                    break;
                }
            }
        }
    }
    drop(current);
    let _ = fs::remove_file(&current_path);
    eprintln!(
        "fuzz {}: {} seeds, {} pending, {} mutations ({} skipped as known issues, {} hit known pending crashes), \
         {} distinct outcomes, corpus {}, {:.1}s (slowest input {:.0} ms: {})",
        target.name,
        seed_count,
        pending.len(),
        n,
        skipped,
        known_hits,
        outcomes.len(),
        corpus.len(),
        started.elapsed().as_secs_f64(),
        slowest.0.as_secs_f64() * 1e3,
        slowest.1
    );
    if !crashes.is_empty() {
        let list: Vec<String> = crashes
            .iter()
            .map(|c| {
                format!(
                    "  {}\n    panicked at {} (thread {}): {}",
                    c.file.display(),
                    c.panic.location,
                    c.panic.thread,
                    c.panic.message
                )
            })
            .collect();
        panic!(
            "fuzz {}: {} crashing input(s):\n{}\nre-run them with: cargo test -p dermedge-e2e --test fuzz {} \
             (DERMEDGE_FUZZ_ITERATIONS=0 runs only the committed inputs; see docs/FUZZING.md)",
            target.name,
            crashes.len(),
            list.join("\n"),
            target.name.replace('-', "_")
        );
    }
}

/// A scratch directory, in memory where the machine has /dev/shm (the queue and hub fsync).
pub fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix("dermedge-fuzz-").clone();
    if shm.is_dir() {
        if let Ok(dir) = builder.tempdir_in(shm) {
            return dir;
        }
    }
    builder.tempdir().expect("a temporary directory")
}

// ---------------------------------------------------------------------------------------------
// Dictionaries.

const CBOR_DICT: &[&[u8]] = &[
    &[0x1b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0x1a, 0xff, 0xff, 0xff, 0xff],
    &[0x3b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0x5b, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00],
    &[0x5a, 0xff, 0xff, 0xff, 0xff],
    &[0x7b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0x9a, 0x7f, 0xff, 0xff, 0xff],
    &[0x5f, 0x41, 0x00, 0xff],
    &[0x7f, 0x61, 0x61, 0xff],
    &[0x9f],
    &[0xbf],
    &[0xff],
    &[0xf4],
    &[0xf5],
    &[0xf6],
    &[0xf7],
    &[0xf9, 0x7e, 0x00],
    &[0xf9, 0x7c, 0x00],
    &[0xfa, 0x7f, 0xc0, 0x00, 0x00],
    &[0xfb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0],
    &[0xc2, 0x49, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    &[0xc3, 0x41, 0x01],
    &[0xd8, 0x40],
    &[0x62, 0xc3, 0x28],
    &[0x61, 0x00],
    &[0x80],
    &[0xa0],
    &[0x40],
    &[0x60],
    b"\x66format",
    b"\x62id",
    b"\x69embedding",
    b"\x65dtype",
    b"\x63f16",
    b"\x63dim",
    b"\x64data",
    b"\x65heads",
    b"\x67quality",
    b"\x66source",
    b"\x6ethumbnail_jpeg",
    b"\x69after_seq",
    b"\x67records",
    b"\x63seq",
    b"\x64cbor",
    b"\x67counter",
    b"\x6dacked_through",
    b"\x66stored",
    b"\x6aduplicates",
    b"\x66sealed",
    b"\x6ecaptured_at_ms",
    b"\x69device_id",
    b"\x64gaps",
    b"\x64from",
    b"\x62to",
    b"\x66reason",
    b"\x65at_ms",
    b"\x67evicted",
    b"\x67damaged",
    b"\x67missing",
    b"\x65error",
    b"\x6fhub_highest_seq",
    b"\x70hub_last_counter",
];

const SEGMENT_DICT: &[&[u8]] = &[
    b"DMQR",
    b"DMQSEG01",
    b"DMQRDMQR",
    &[0x10, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff],
    &[0x10, 0, 0x10, 0],
    &[0, 0, 0, 0, 0, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[1, 0, 0, 0, 0, 0, 0, 0],
];

const HTTP_DICT: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b": ",
    b" ",
    b"\0",
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"/v2/batches",
    b"/v2/heads",
    b"/heads",
    b"/v1/health",
    b"/v2/batches?x=1",
    b"/v1/batches",
    b"/v2/batches/",
    b"HTTP/1.0",
    b"HTTP/1.1",
    b"HTTP/2.0",
    b"HTTP/9.9",
    b"Content-Length: 0\r\n",
    b"Content-Length: 18446744073709551615\r\n",
    b"Content-Length: 67108865\r\n",
    b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"Connection: upgrade\r\nUpgrade: websocket\r\n",
    b"X-Dermedge-Device: ",
    b"X-Dermedge-Device: dev-fuzz\r\n",
    b"x-dermedge-device: dev-fuzz\r\n",
    b"X-Dermedge-Counter: ",
    b"X-Dermedge-Counter: 18446744073709551615\r\n",
    b"X-Dermedge-Counter: 18446744073709551616\r\n",
    b"X-Dermedge-Counter: 9223372036854775808\r\n",
    b"X-Dermedge-Counter: -1\r\n",
    b"X-Dermedge-Counter: +2\r\n",
    b"ffffffffffffffff\r\n",
    b"0\r\n\r\n",
    b"\xff\xfe",
    b"\xc3\x28",
];

const STATE_DICT: &[&[u8]] = &[
    b"DMQS",
    &[0, 0, 0, 0, 0, 0, 0, 0],
    &[1, 0, 0, 0, 0, 0, 0, 0],
    &[6, 0, 0, 0, 0, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0, 0, 0, 0, 0, 0, 0, 0x40],
    &[1, 0, 0, 0, 0, 0, 0, 0x40],
];

const GAPS_DICT: &[&[u8]] = &[
    b"\n",
    b"\r\n",
    b"\0",
    b"{",
    b"}",
    b",",
    b":",
    b"\"",
    b"\"from\":",
    b"\"to\":",
    b"\"reason\":",
    b"\"at_ms\":",
    b"\"evicted\"",
    b"\"damaged\"",
    b"\"missing\"",
    b"\"Evicted\"",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b"\"extra\":1",
    b"4611686018427387904",
    b"4611686018427387905",
    b"18446744073709551615",
    b"-9223372036854775808",
    b"1e3",
    b"{\"from\":1,\"to\":3,\"reason\":\"evicted\",\"at_ms\":0}\n",
    b"{\"from\":4,\"to\":4,\"reason\":\"missing\",\"at_ms\":0}\n",
    b"{\"from\":1,\"to\":18446744073709551615,\"reason\":\"damaged\",\"at_ms\":0}\n",
    b"\xef\xbb\xbf",
    b"\xc3\x28",
];

const KEY_DICT: &[&[u8]] = &[
    b"dermedge-device-public-1",
    b"dermedge-hub-public-1",
    b"dermedge-device-public-1 ",
    b"dermedge-hub-public-1 ",
    b" ",
    b"\t",
    b"\n",
    b"\r\n",
    b"\0",
    b"+",
    b"-",
    b"0x",
    b"00",
    b"ff",
    b"FF",
    b"7f",
    b"80",
    b"0000000000000000000000000000000000000000000000000000000000000000",
    b"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    b"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    b"0100000000000000000000000000000000000000000000000000000000000000",
    b"\xc3\xa9",
    b"\xe2\x80\x8b",
    b"\xef\xbc\x90",
    b"\xf0\x9f\x94\x91",
    b"\xc3\x28",
];

const TOML_DICT: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"=",
    b" = ",
    b"\"",
    b"'",
    b"'''",
    b"\"\"\"",
    b"\n",
    b"\r\n",
    b"{",
    b"}",
    b"{}",
    b"[]",
    b",",
    b".",
    b"#",
    b"\\",
    b"\\u0000",
    b"\\uD800",
    b"\\U0010FFFF",
    b"\t",
    b"\x00",
    b"\xef\xbb\xbf",
    b"\xc3\x28",
    b"true",
    b"false",
    b"a.b.c",
    b"\"\".\"\"",
    b"1979-05-27T07:32:00Z",
    b"07:32:00",
    b"x = 1\n",
    b"[model]\n",
    b"[input]\n",
    b"[input.quantization]\n",
    b"[output]\n",
    b"[provenance]\n",
    b"[device]\n",
    b"hub_public = \"stub/hub.pub\"\n",
    b"local_hub = { db = \"x\", key = \"y\" }\n",
    b"[camera]\n",
    b"[capture]\n",
    b"[quality]\n",
    b"[display]\n",
    b"[queue]\n",
    b"[sync]\n",
    b"[sync.local_hub]\n",
    b"[health]\n",
    b"[run]\n",
    b"[[heads]]\n",
    b"heads = [\"stub/head.json\"]\n",
    b"quantization = { scale = 0.5, zero_point = -128 }\n",
    b"dtype = \"uint8\"\n",
    b"dtype = \"int8\"\n",
    b"layout = \"nchw\"\n",
    b"source = \"uvc\"\n",
    b"source = \"synthetic\"\n",
    b"trigger = \"gpio\"\n",
    b"target = \"framebuffer\"\n",
    b"size = \"0x0\"\n",
    b"size = \"x\"\n",
    b"size = \"4096X4096\"\n",
    b"hub = \"http://\"\n",
    b"hub = \"https:///\"\n",
    b"enabled = true\n",
    b"threads = 0\n",
    b"fps = nan\n",
    b"stillness = nan\n",
    b"local_hub = { db = \"x\" }\n",
    b"/../../../../",
    b"\xe2\x80\xae",
];

const TFLITE_DICT: &[&[u8]] = &[
    b"TFL3",
    &[0, 0, 0, 0],
    &[4, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0x7f],
    &[0x00, 0x00, 0x00, 0x80],
    &[0xfc, 0xff, 0xff, 0xff],
    &[0xff, 0xff, 0xff, 0xff],
    &[0x04, 0x00, 0x04, 0x00],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0x02, 0, 0, 0, 0, 0, 0, 0],
    b"edgetpu-custom-op\0",
    b"serving_default\0",
];

// ---------------------------------------------------------------------------------------------
// Targets.

#[test]
fn record_cbor() {
    let target = Target {
        name: "record-cbor",
        smoke: 40000,
        dict: CBOR_DICT,
        text: false,
        max_len: 16 << 10,
        known_issue: None,
    };
    fuzz(&target, None, |input| match Record::from_cbor(input) {
        Ok(record) => {
            let _ = record.embedding.to_f32();
            let again = Record::from_cbor(&record.to_cbor());
            assert!(
                again.is_ok(),
                "a decoded record does not re-decode: {again:?}"
            );
            "ok".into()
        }
        Err(e) => signature(&e),
    });
}

/// The mutator's settings for a record's CBOR inside a seal.
const RECORD_PLAINTEXT: Target = Target {
    name: "record-cbor",
    smoke: 0,
    dict: CBOR_DICT,
    text: false,
    max_len: 8 << 10,
    known_issue: None,
};

/// Strings worth putting in a record's text fields.
const ODD_STRINGS: &[&str] = &[
    "",
    "0",
    DEVICE,
    "dev-other",
    "dev-fuzz\0",
    "ffffffffffffffffffffffffffffffff",
    "'; DROP TABLE records; --",
    "\u{202e}ü\u{0}\u{ffff}",
    "NaN",
];

/// A change to a record that keeps it decodable: what a faulty or forged device could seal.
fn mutate_record(rng: &mut Rng, r: &mut Record) {
    let odd = |rng: &mut Rng| {
        let s = rng.pick(ODD_STRINGS).to_string();
        if rng.one_in(8) {
            s.repeat(1 + rng.below(300))
        } else {
            s
        }
    };
    let float = |rng: &mut Rng| {
        *rng.pick(&[
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
        ])
    };
    match rng.below(10) {
        0 => r.id = odd(rng),
        1 => r.captured_at_ms = *rng.pick(INTERESTING) as i64,
        2 => r.device_id = odd(rng),
        3 => r.embedding.dim = *rng.pick(INTERESTING) as u32,
        4 => {
            let n = rng.below(r.embedding.data.len() + 9);
            r.embedding.data.resize(n, 0x7f);
        }
        5 => {
            let classes = (0..rng.below(4)).map(|_| odd(rng)).collect();
            let probabilities = (0..rng.below(4)).map(|_| float(rng)).collect();
            r.heads.push(HeadResult {
                head: odd(rng),
                classes,
                probabilities,
                version: None,
            });
        }
        6 => {
            let metrics = (0..rng.below(4)).map(|_| (odd(rng), float(rng))).collect();
            r.quality = Some(QualityResult {
                acceptable: rng.one_in(2),
                reasons: (0..rng.below(3)).map(|_| odd(rng)).collect(),
                metrics,
            });
        }
        7 => {
            r.thumbnail_jpeg = if rng.one_in(3) {
                None
            } else {
                let n = rng.below(600);
                Some(rng.bytes(n))
            }
        }
        8 => r.source = Some(odd(rng)),
        _ => {
            r.model_id = odd(rng);
            // A precision outside the enum is the byte mutations' to make.
            r.precision = *rng.pick(&dermedge_record::Precision::ALL);
        }
    }
}

/// A new envelope from `envelope`: the record inside changed (its bytes or its fields) and sealed
/// again to the fuzz hub, as only a device holding the hub's public key could; or the outside
/// changed.
fn reseal_envelope(rng: &mut Rng, envelope: &Envelope) -> Envelope {
    let hub = hub_key();
    let mut out = envelope.clone();
    let inside = hub.unseal(&envelope.sealed);
    match (rng.below(5), inside) {
        (0, Some(plain)) => {
            let mutated = mutate(rng, &plain, &[], &RECORD_PLAINTEXT);
            out.sealed = seal_to_hub(&hub.public(), &mutated);
        }
        (1..=3, Some(plain)) => {
            if let Ok(mut record) = Record::from_cbor(&plain) {
                for _ in 0..1 + rng.below(2) {
                    mutate_record(rng, &mut record);
                }
                out.sealed = seal_to_hub(&hub.public(), &record.to_cbor());
                // Mostly an honest outside, so that the hub goes on to store the record.
                if !rng.one_in(4) {
                    out.id = record.id;
                    out.captured_at_ms = record.captured_at_ms;
                    out.device_id = record.device_id;
                }
            }
        }
        _ => match rng.below(4) {
            0 => out.id = rng.pick(ODD_STRINGS).to_string(),
            1 => out.captured_at_ms = *rng.pick(INTERESTING) as i64,
            2 => out.device_id = rng.pick(ODD_STRINGS).to_string(),
            _ => out.format = *rng.pick(INTERESTING) as u32,
        },
    }
    out
}

fn reseal_envelope_input(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let envelope = Envelope::from_cbor(input).ok()?;
    Some(reseal_envelope(rng, &envelope).to_cbor())
}

#[test]
fn envelope_cbor() {
    let target = Target {
        name: "envelope-cbor",
        smoke: 8000,
        dict: CBOR_DICT,
        text: false,
        max_len: 16 << 10,
        known_issue: None,
    };
    let hub = hub_key();
    let mut opened = 0usize;
    fuzz(
        &target,
        Some(&reseal_envelope_input),
        |input| match Envelope::from_cbor(input) {
            Ok(envelope) => {
                let again = Envelope::from_cbor(&envelope.to_cbor());
                assert_eq!(
                    again,
                    Ok(envelope.clone()),
                    "a decoded envelope does not re-decode the same"
                );
                match envelope.open(&hub) {
                    Ok(record) => {
                        opened += 1;
                        assert_eq!(
                            (&record.id, record.captured_at_ms, &record.device_id),
                            (&envelope.id, envelope.captured_at_ms, &envelope.device_id),
                            "an envelope opened whose outside is not its record's"
                        );
                        let _ = record.embedding.to_f32();
                        assert!(
                            Record::from_cbor(&record.to_cbor()).is_ok(),
                            "an opened record does not re-decode"
                        );
                        "opened".into()
                    }
                    Err(e) => format!("not opened: {}", signature(&e)),
                }
            }
            Err(e) => signature(&e),
        },
    );
    assert!(
        opened > 0,
        "no envelope opened with the hub key: the harness's sealing no longer matches the queue's"
    );
}

#[test]
fn public_key() {
    let target = Target {
        name: "public-key",
        smoke: 20000,
        dict: KEY_DICT,
        text: true,
        max_len: 1 << 10,
        known_issue: None,
    };
    let some_signature = [0x5a; SIGNATURE_BYTES];
    fuzz(&target, None, |input| {
        let text = String::from_utf8_lossy(input);
        let device = text.parse::<DevicePublic>();
        let hub = text.parse::<HubPublic>();
        // What a parsed key is used for: verifying (both) and sealing records (the hub's).
        if let Ok(d) = &device {
            assert_eq!(
                d.to_string().parse::<DevicePublic>().as_ref(),
                Ok(d),
                "a parsed device key does not print and parse again"
            );
            assert!(!d.verify(b"batch", &some_signature));
        }
        if let Ok(h) = &hub {
            assert_eq!(
                h.to_string().parse::<HubPublic>().as_ref(),
                Ok(h),
                "a parsed hub key does not print and parse again"
            );
            assert!(!h.verify(b"ack", &some_signature));
            assert!(!h.seal(b"record").is_empty());
        }
        let name = |r: Result<(), String>| match r {
            Ok(()) => "ok".to_string(),
            Err(e) => signature(&e),
        };
        format!(
            "device {} | hub {}",
            name(device.map(|_| ())),
            name(hub.map(|_| ()))
        )
    });
}

/// How the fuzzed segment sits in the queue directory.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// The only segment of a queue without a recovery point (the scan is trusted).
    Alone,
    /// The last segment, after a valid one.
    AfterValid,
    /// The first segment, before a valid one (damage is skipped, never truncated).
    BeforeValid,
    /// Appended (without its segment header) to the last segment of a valid queue that was
    /// opened and closed, so its recovery point marks the valid records durable.
    AppendedToValid,
    /// Written over the middle of that valid queue's last segment.
    SplicedIntoValid,
}

const LAYOUTS: [Layout; 5] = [
    Layout::Alone,
    Layout::AfterValid,
    Layout::BeforeValid,
    Layout::AppendedToValid,
    Layout::SplicedIntoValid,
];

/// Records in the valid segment the fuzzed bytes are appended to or spliced into.
const VALID_RECORDS: u64 = 3;

/// `queue.json` of a queue of `DEVICE` under `key`.
fn queue_meta(key: &DeviceKey) -> String {
    format!(
        "{{\"format\": \"dermedge-queue/1\", \"device_id\": \"{DEVICE}\", \"key_check\": \"{}\"}}",
        hex(&key.check())
    )
}

/// The envelope CBOR of `generate_seeds::record(seq, Small)`, sealed to the fuzz hub.
fn valid_envelope(seq: u64) -> Vec<u8> {
    let record = generate_seeds::record(seq, generate_seeds::Shape::Small);
    envelope_of(&record, &hub_key().public()).to_cbor()
}

/// Every file of the queue directory but `LOCK`, by name.
fn queue_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file() && e.file_name() != "LOCK")
        .map(|e| {
            let bytes = fs::read(e.path()).unwrap();
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    files.sort();
    files
}

struct QueueBench {
    _dir: tempfile::TempDir,
    qdir: PathBuf,
    /// A valid queue (three records, opened once): the files, by name.
    valid_queue: Vec<(String, Vec<u8>)>,
    valid_last_segment: String,
    key: DeviceKey,
    at_rest: [u8; 32],
    meta: String,
    /// The envelopes of the valid records.
    envelopes: Vec<Vec<u8>>,
}

impl QueueBench {
    fn new() -> Self {
        let dir = scratch();
        let key = device_key();
        let mut bench = Self {
            qdir: dir.path().join("queue"),
            _dir: dir,
            at_rest: key.at_rest_key(),
            meta: queue_meta(&key),
            key,
            valid_queue: Vec::new(),
            valid_last_segment: String::new(),
            envelopes: (1..=VALID_RECORDS).map(valid_envelope).collect(),
        };
        bench.fresh_dir();
        let name = format!("seg-{:020}.dlog", 1);
        fs::write(
            bench.qdir.join(&name),
            bench.valid_segment(1, VALID_RECORDS),
        )
        .unwrap();
        let q = Queue::open(&bench.qdir, &bench.key, DEVICE, QueueOptions::default())
            .expect("the valid queue opens");
        let read = q.unacknowledged(usize::MAX, usize::MAX).unwrap();
        assert_eq!(
            read.len() as u64,
            VALID_RECORDS,
            "the valid queue's records"
        );
        drop(q);
        let files = queue_files(&bench.qdir);
        bench.valid_last_segment = files
            .iter()
            .filter(|(n, _)| n.starts_with("seg-"))
            .map(|(n, _)| n.clone())
            .next_back()
            .expect("a segment");
        bench.valid_queue = files;
        bench
    }

    fn fresh_dir(&self) {
        let _ = fs::remove_dir_all(&self.qdir);
        fs::create_dir_all(&self.qdir).unwrap();
        fs::write(self.qdir.join("queue.json"), &self.meta).unwrap();
    }

    /// A valid segment starting at `first` with `records` records.
    fn valid_segment(&self, first: u64, records: u64) -> Vec<u8> {
        let mut seg = segment::header(first, &self.key.check());
        for i in 0..records {
            let seq = first.max(1).wrapping_add(i);
            let plain = &self.envelopes[i as usize % self.envelopes.len()];
            seg.extend(segment::frame(
                &self.at_rest,
                seq,
                &nonce_for(&seq.to_le_bytes()),
                plain,
            ));
        }
        seg
    }

    /// Lay the input out in a queue directory; false when the layout does not apply.
    fn prepare(&self, input: &[u8], layout: Layout) -> bool {
        self.fresh_dir();
        let first = segment::first_seq(input).unwrap_or(1);
        let name = |seq: u64| self.qdir.join(format!("seg-{seq:020}.dlog"));
        let body = if segment::first_seq(input).is_some() {
            &input[input.len().min(segment::HEADER_LEN)..]
        } else {
            input
        };
        match layout {
            Layout::Alone => fs::write(name(first), input).unwrap(),
            Layout::AfterValid => {
                let Some(before) = first.checked_sub(1) else {
                    return false;
                };
                fs::write(name(before), self.valid_segment(before, 1)).unwrap();
                fs::write(name(first), input).unwrap();
            }
            Layout::BeforeValid => {
                let Some(after) = first.checked_add(1_000_000) else {
                    return false;
                };
                fs::write(name(first), input).unwrap();
                fs::write(name(after), self.valid_segment(after, 1)).unwrap();
            }
            Layout::AppendedToValid | Layout::SplicedIntoValid => {
                for (file, bytes) in &self.valid_queue {
                    let mut bytes = bytes.clone();
                    if *file == self.valid_last_segment {
                        if layout == Layout::AppendedToValid {
                            bytes.extend_from_slice(body);
                        } else {
                            let span = bytes.len() - segment::HEADER_LEN;
                            let at = segment::HEADER_LEN + (fnv1a(input) % span as u64) as usize;
                            let end = (at + body.len()).min(bytes.len());
                            bytes.splice(at..end, body.iter().copied());
                        }
                    }
                    fs::write(self.qdir.join(file), bytes).unwrap();
                }
            }
        }
        true
    }

    /// Open the queue twice and read everything: the outcome and how many records were read,
    /// or a panic on a broken invariant.
    fn run(&self, input: &[u8], layout: Layout) -> (String, usize) {
        if !self.prepare(input, layout) {
            return ("skipped".into(), 0);
        }
        let read = |q: &Queue| -> Result<Vec<(u64, Vec<u8>)>, String> {
            let _ = q.stats();
            let _ = q.unreported_gaps();
            q.unacknowledged(usize::MAX, usize::MAX)
                .map(records_of)
                .map_err(|e| e.to_string())
        };
        let options = QueueOptions::default();
        let (first, report) = match Queue::open(&self.qdir, &self.key, DEVICE, options.clone()) {
            Ok(q) => {
                let r = read(&q);
                let report = q.recovery();
                let report = (
                    report.torn_tails.len(),
                    report.skipped.len().min(3),
                    report.quarantined.len().min(3),
                );
                (r, report)
            }
            Err(e) => {
                let outcome = format!("{layout:?} open: {}", signature(&strip(&e, &self.qdir)));
                return (outcome, 0);
            }
        };
        // Recovery is idempotent: opening again finds the same records.
        let second = Queue::open(&self.qdir, &self.key, DEVICE, options)
            .map_err(|e| e.to_string())
            .and_then(|q| read(&q));
        assert_same_records(&first, &second);
        let count = first.as_ref().map_or(0, Vec::len);
        let outcome = format!(
            "{layout:?} {} torn/skipped/quarantined {report:?}",
            match &first {
                Ok(seqs) => format!("ok {}", seqs.len().min(4)),
                Err(e) => signature(&strip(e, &self.qdir)),
            },
        );
        (outcome, count)
    }
}

fn strip(error: &dyn std::fmt::Display, dir: &Path) -> String {
    error
        .to_string()
        .replace(&dir.display().to_string(), "<dir>")
}

/// The records read, for comparing two opens: (seq, envelope CBOR).
fn records_of(records: Vec<Stored>) -> Vec<(u64, Vec<u8>)> {
    records.into_iter().map(|s| (s.seq, s.cbor)).collect()
}

/// Recovery is idempotent: a second open reads exactly what the first read, and does not fail
/// where the first read everything.
fn assert_same_records(
    first: &Result<Vec<(u64, Vec<u8>)>, String>,
    second: &Result<Vec<(u64, Vec<u8>)>, String>,
) {
    let seqs = |r: &[(u64, Vec<u8>)]| r.iter().map(|(s, _)| *s).collect::<Vec<u64>>();
    match (first, second) {
        (Ok(a), Ok(b)) => assert!(
            a == b,
            "the second open reads other records than the first: {:?}, then {:?}",
            seqs(a),
            seqs(b)
        ),
        (Ok(_), Err(e)) => panic!("the first open read every record, the second fails: {e}"),
        _ => {}
    }
}

/// Re-seal a segment after changing what only the key holder could: sequence numbers, envelope
/// plaintexts, frame order; also torn tails and header fields, with every frame authentic.
fn reseal_segment(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let key = device_key();
    let at_rest = key.at_rest_key();
    let mut frames = segment::authentic_frames(&at_rest, input);
    if frames.is_empty() {
        return None;
    }
    for _ in 0..1 + rng.below(3) {
        let i = rng.below(frames.len());
        match rng.below(7) {
            0 => frames[i].0 = *rng.pick(INTERESTING),
            1 => {
                frames[i].0 = frames[i]
                    .0
                    .wrapping_add(rng.below(5) as u64)
                    .wrapping_sub(2)
            }
            2 => {
                let plain = frames[i].1.clone();
                frames[i].1 = mutate(rng, &plain, &[], &RECORD_PLAINTEXT);
            }
            3 => {
                let f = frames[i].clone();
                frames.insert(rng.below(frames.len() + 1), f);
            }
            4 if frames.len() > 1 => {
                frames.remove(i);
            }
            5 => {
                let j = rng.below(frames.len());
                frames.swap(i, j);
            }
            _ => frames[i].1 = Vec::new(),
        }
    }
    let first = match rng.below(4) {
        0 => *rng.pick(INTERESTING),
        1 => frames[0].0,
        _ => segment::first_seq(input).unwrap_or(1),
    };
    let mut out = segment::header(first, &key.check());
    for (n, (seq, plain)) in frames.iter().enumerate() {
        out.extend(segment::frame(
            &at_rest,
            *seq,
            &nonce_for(&[plain.as_slice(), &n.to_le_bytes()].concat()),
            plain,
        ));
    }
    if rng.one_in(4) && out.len() > segment::HEADER_LEN {
        // Power lost in the middle of the last append.
        let cut = segment::HEADER_LEN + rng.below(out.len() - segment::HEADER_LEN);
        out.truncate(cut);
    }
    Some(out)
}

#[test]
fn queue_segment() {
    let target = Target {
        name: "queue-segment",
        smoke: 1500,
        dict: SEGMENT_DICT,
        text: false,
        max_len: 64 << 10,
        known_issue: None,
    };
    let bench = QueueBench::new();
    let mut records_read = false;
    fuzz(&target, Some(&reseal_segment), |input| {
        let mut outcomes = Vec::new();
        for layout in LAYOUTS {
            let (outcome, read) = bench.run(input, layout);
            records_read |= matches!(layout, Layout::Alone) && read > 0;
            outcomes.push(outcome);
        }
        outcomes.join("; ")
    });
    // Without this the seeds (or the harness's frame format) no longer match the queue's, and
    // the target only tests the CRC check.
    assert!(records_read, "no input yielded a readable record");
}

/// A valid queue whose `state` or `gaps.log` the fuzzed bytes replace: records 1 to 3 in one
/// segment, 5 and 6 in the next (4 journalled as missing), record 1 acknowledged.
struct RecoveryBench {
    _dir: tempfile::TempDir,
    qdir: PathBuf,
    files: Vec<(String, Vec<u8>)>,
    key: DeviceKey,
}

/// The valid queue's segments: (first sequence number, records).
const RECOVERY_SEGMENTS: [(u64, &[u64]); 2] = [(1, &[1, 2, 3]), (5, &[5, 6])];

impl RecoveryBench {
    fn new() -> Self {
        let dir = scratch();
        let qdir = dir.path().join("queue");
        let key = device_key();
        fs::create_dir_all(&qdir).unwrap();
        fs::write(qdir.join("queue.json"), queue_meta(&key)).unwrap();
        for (first, seqs) in RECOVERY_SEGMENTS {
            let mut seg = segment::header(first, &key.check());
            for &seq in seqs {
                seg.extend(segment::frame(
                    &key.at_rest_key(),
                    seq,
                    &nonce_for(&seq.to_le_bytes()),
                    &valid_envelope(seq),
                ));
            }
            fs::write(qdir.join(format!("seg-{first:020}.dlog")), seg).unwrap();
        }
        let mut q = Queue::open(&qdir, &key, DEVICE, QueueOptions::default())
            .expect("the valid queue opens");
        q.acknowledge(1).expect("record 1 acknowledged");
        let read = q.unacknowledged(usize::MAX, usize::MAX).unwrap();
        assert_eq!(read.len(), 4, "the valid queue's records");
        assert_eq!(
            q.gaps().len(),
            1,
            "the valid queue's journal: {:?}",
            q.gaps()
        );
        drop(q);
        let files = queue_files(&qdir);
        for name in ["state", "gaps.log"] {
            assert!(
                files.iter().any(|(n, _)| n == name),
                "the valid queue has no {name}"
            );
        }
        Self {
            _dir: dir,
            qdir,
            files,
            key,
        }
    }

    /// Lay out the valid queue with `input` as its file `name`, open it twice and read
    /// everything: the outcome, or a panic on a broken invariant.
    fn run(&self, name: &str, input: &[u8]) -> String {
        let _ = fs::remove_dir_all(&self.qdir);
        fs::create_dir_all(&self.qdir).unwrap();
        for (file, bytes) in &self.files {
            if file != name {
                fs::write(self.qdir.join(file), bytes).unwrap();
            }
        }
        fs::write(self.qdir.join(name), input).unwrap();
        let mut summary = String::new();
        let open = |summary: &mut String| -> Result<Vec<(u64, Vec<u8>)>, String> {
            let q = Queue::open(&self.qdir, &self.key, DEVICE, QueueOptions::default())
                .map_err(|e| format!("open: {e}"))?;
            let stats = q.stats();
            let report = q.recovery();
            let unreported = q.unreported_gaps();
            *summary = format!(
                "acked {} last {} durable {} pending {} segments {} gaps {}/{} new {} \
                 rebuilt {} reclaimed {} torn {} skipped {}",
                stats.acked_seq.min(8),
                stats.last_seq.min(8),
                stats.durable_seq.min(8),
                stats.pending_records.min(8),
                stats.segments,
                q.gaps().len().min(4),
                unreported.len().min(4),
                report.gaps.len().min(4),
                report.state_rebuilt,
                report.reclaimed.len(),
                report.torn_tails.len(),
                report.skipped.len(),
            );
            q.unacknowledged(usize::MAX, usize::MAX)
                .map(records_of)
                .map_err(|e| format!("read: {e}"))
        };
        let first = open(&mut summary);
        let first_summary = std::mem::take(&mut summary);
        let second = open(&mut summary);
        assert_same_records(&first, &second);
        match first {
            Ok(records) => format!("ok {} {first_summary}", records.len().min(8)),
            Err(e) => signature(&strip(&e, &self.qdir)),
        }
    }
}

/// A recovery point changed as only the queue could write it (the slots' CRCs made valid):
/// generations, the acknowledged cursor and the high-water mark, around the valid queue's.
fn reseal_state(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut out = input.to_vec();
    if out.len() < 2 * state::SLOT_LEN {
        out.resize(2 * state::SLOT_LEN, 0);
    }
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(2) * state::SLOT_LEN + 8 * (1 + rng.below(3));
        let current = u64::from_le_bytes(out[at..at + 8].try_into().expect("8 bytes"));
        let value = match rng.below(3) {
            0 => *rng.pick(INTERESTING),
            1 => current.wrapping_add(rng.below(9) as u64).wrapping_sub(4),
            _ => rng.below(10) as u64,
        };
        out[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
    for start in [0, state::SLOT_LEN] {
        if rng.one_in(8) {
            out[start..start + 4].copy_from_slice(b"DMQS");
        }
        if !rng.one_in(8) {
            let slot: &mut [u8; state::SLOT_LEN] = (&mut out[start..start + state::SLOT_LEN])
                .try_into()
                .expect("a slot");
            state::seal(slot);
        }
    }
    if rng.one_in(8) {
        let n = rng.below(out.len() + 1);
        out.truncate(n);
    }
    Some(out)
}

#[test]
fn queue_state() {
    let target = Target {
        name: "queue-state",
        smoke: 1000,
        dict: STATE_DICT,
        text: false,
        max_len: 256,
        known_issue: None,
    };
    let bench = RecoveryBench::new();
    fuzz(&target, Some(&reseal_state), |input| {
        bench.run("state", input)
    });
}

/// Well-formed journal lines with values chosen around the valid queue's and at the limits, so
/// that the mutations get past the JSON parser to what recovery does with a journalled loss.
fn journal_lines(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let value = |rng: &mut Rng| match rng.below(3) {
        0 => *rng.pick(INTERESTING),
        _ => rng.below(9) as u64,
    };
    let mut lines: Vec<Vec<u8>> = input.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    for _ in 0..1 + rng.below(3) {
        let from = value(rng);
        let to = if rng.one_in(2) {
            from.saturating_add(rng.below(4) as u64)
        } else {
            value(rng)
        };
        let reason = rng.pick(&["evicted", "damaged", "missing"]);
        let at_ms = *rng.pick(INTERESTING) as i64;
        let line =
            format!("{{\"from\":{from},\"to\":{to},\"reason\":\"{reason}\",\"at_ms\":{at_ms}}}");
        let at = rng.below(lines.len() + 1);
        lines.insert(at, line.into_bytes());
    }
    Some(lines.join(&b'\n'))
}

#[test]
fn queue_gaps() {
    let target = Target {
        name: "queue-gaps",
        smoke: 800,
        dict: GAPS_DICT,
        text: true,
        max_len: 4 << 10,
        known_issue: None,
    };
    let bench = RecoveryBench::new();
    fuzz(&target, Some(&journal_lines), |input| {
        bench.run("gaps.log", input)
    });
}

#[test]
fn sync_wire() {
    let target = Target {
        name: "sync-wire",
        smoke: 6000,
        dict: CBOR_DICT,
        text: false,
        max_len: 16 << 10,
        known_issue: None,
    };
    let (device, hub) = (device_key(), hub_key());
    let (device_public, hub_public) = (device.public(), hub.public());
    let mut authentic = 0usize;
    fuzz(&target, None, |input| {
        let counter = 7;
        // As received: almost always unauthenticated, never a panic.
        let raw_batch = wire::open_batch(&device_public, DEVICE, counter, input);
        let request = b"the request these replies answer";
        let raw_ack = wire::open_ack(&hub_public, DEVICE, counter, request, input);
        let raw_conflict = wire::open_conflict(&hub_public, DEVICE, counter, request, input);
        // Signed with the right keys: the decoders behind the signatures.
        let sign = |kind: &str| {
            let message = match kind {
                "request" => sync_message(kind, DEVICE, counter, input),
                _ => sync_reply_message(kind, DEVICE, counter, request, input),
            };
            let signature = match kind {
                "request" => device.sign(&message),
                _ => hub.sign(&message),
            };
            signed_body(signature, input)
        };
        let batch = wire::open_batch(&device_public, DEVICE, counter, &sign("request"));
        // The head loop: a device's query as the hub opens it, a publication as the device opens
        // it, and a hub's offer (unsigned around signed heads) as the device reads it.
        let query = wire::open_head_query(
            &device_public,
            DEVICE,
            counter,
            &signed_body(
                device.sign(&sync_message("heads", DEVICE, counter, input)),
                input,
            ),
        );
        let head = wire::open_head(
            &hub_public,
            &signed_body(hub.sign(&sync_message("head", "", 0, input)), input),
        );
        let raw_head = wire::open_head(&hub_public, input);
        let offered = match ciborium::from_reader::<wire::HeadOffer, _>(input) {
            Ok(offer) => {
                let want = wire::HeadQuery {
                    model_id: "df-mini".into(),
                    embedding_dim: 4,
                    have: Vec::new(),
                };
                offer
                    .heads
                    .iter()
                    .map(|blob| dermedge_sync::check_head(&hub_public, &want, blob).is_ok())
                    .filter(|ok| *ok)
                    .count()
                    .to_string()
            }
            Err(_) => "-".into(),
        };
        let ack = wire::open_ack(&hub_public, DEVICE, counter, request, &sign("ack"));
        // A 409's body, as the sync client reads it.
        let conflict =
            wire::open_conflict(&hub_public, DEVICE, counter, request, &sign("conflict"));
        if let Ok(b) = &batch {
            let _ = b.last();
        }
        if batch.is_ok() || ack.is_ok() || conflict.is_ok() || query.is_ok() || head.is_ok() {
            authentic += 1;
        }
        let name = |r: Result<(), wire::OpenError>| match r {
            Ok(()) => "ok".to_string(),
            Err(wire::OpenError::Unauthenticated) => "unauthenticated".into(),
            Err(wire::OpenError::Malformed(m)) => signature(&m),
        };
        format!(
            "raw {} {} {} {} | batch {} | ack {} | conflict {} | query {} | head {} | offer {offered}",
            raw_batch.is_ok(),
            raw_ack.is_ok(),
            raw_conflict.is_ok(),
            raw_head.is_ok(),
            name(batch.map(|_| ())),
            name(ack.map(|_| ())),
            name(conflict.map(|_| ())),
            name(query.map(|_| ())),
            name(head.map(|_| ())),
        )
    });
    assert!(
        authentic > 0,
        "no signed input opened: the harness's signing no longer matches crates/sync/src/wire.rs"
    );
}

/// An in-process hub holding the fuzz hub key, with `DEVICE` enrolled by its public key.
struct HubBench {
    _dir: tempfile::TempDir,
    db: PathBuf,
    hub: Option<dermedge_hub::server::HubServer>,
    store: dermedge_hub::store::Store,
}

impl HubBench {
    fn new() -> Self {
        let dir = scratch();
        let db = dir.path().join("hub.sqlite");
        let store = dermedge_hub::store::Store::open(&db).unwrap();
        store.enroll(DEVICE, &device_key().public()).unwrap();
        let mut bench = Self {
            _dir: dir,
            db,
            hub: None,
            store,
        };
        bench.start();
        bench
    }

    fn start(&mut self) {
        if let Some(hub) = self.hub.take() {
            hub.shutdown();
        }
        // The hub answers a request only once it is done with it, so the health check after each
        // input meets a hub at rest.
        self.hub = Some(
            dermedge_hub::server::HubServer::start(&self.db, hub_key(), "127.0.0.1:0", 1).unwrap(),
        );
    }

    fn addr(&self) -> SocketAddr {
        self.hub.as_ref().expect("started").addr()
    }

    /// Every input meets the same hub: no records, gaps or rejections, the device's counter and
    /// sequence at zero.
    fn reset(&self) {
        self.store
            .connection()
            .execute_batch(
                "DELETE FROM labels; DELETE FROM record_heads; DELETE FROM records;
                 DELETE FROM gaps; DELETE FROM rejections;
                 UPDATE devices SET last_counter = 0, highest_seq = 0;",
            )
            .unwrap();
    }

    /// Send raw request bytes; the answer, or None when the hub closed without one.
    fn send(&self, request: &[u8]) -> Result<Option<Answer>, String> {
        let timeout = Duration::from_secs(5);
        let mut s = TcpStream::connect_timeout(&self.addr(), timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout)).unwrap();
        s.set_write_timeout(Some(timeout)).unwrap();
        // The hub may answer (and close) before reading everything: that is not a failure.
        let _ = s.write_all(request);
        let _ = s.shutdown(Shutdown::Write);
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    response.extend_from_slice(&buf[..n]);
                    if response_complete(&response) {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!(
                        "no complete answer within {timeout:?} (got {} bytes)",
                        response.len()
                    ))
                }
                Err(_) => break,
            }
        }
        Ok(parse_answer(&response))
    }

    /// The hub answers its health check and none of its threads panicked; otherwise the hub is
    /// restarted and this panics with what happened.
    fn assert_up(&mut self) {
        let health = self.send(b"GET /v1/health HTTP/1.1\r\nHost: hub\r\n\r\n");
        let panics: Vec<PanicInfo> = std::mem::take(&mut *BACKGROUND_PANICS.lock().unwrap());
        if let Some(p) = panics.first() {
            self.start();
            panic!(
                "hub thread {} panicked at {}: {}",
                p.thread, p.location, p.message
            );
        }
        if !matches!(health, Ok(Some(Answer { status: 200, .. }))) {
            self.start();
            panic!("the hub stopped answering its health check: {health:?}");
        }
    }
}

impl Drop for HubBench {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.take() {
            hub.shutdown();
        }
    }
}

fn response_complete(response: &[u8]) -> bool {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    length.is_some_and(|n| response.len() >= end + 4 + n)
}

/// An HTTP answer: the status and the body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    /// The body as the outcome sees it: text with its numbers folded, or `<binary>` (the hub's
    /// signed acks and conflicts).
    fn text(&self) -> String {
        match std::str::from_utf8(&self.body) {
            Ok(text) => signature(text),
            Err(_) => "<binary>".into(),
        }
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.status,
            String::from_utf8_lossy(&self.body).escape_debug()
        )
    }
}

fn parse_answer(response: &[u8]) -> Option<Answer> {
    let line = response.split(|&b| b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    let status = parts.next()?.parse().ok()?;
    let body = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|end| response[end + 4..].to_vec())
        .unwrap_or_default();
    Some(Answer { status, body })
}

#[test]
fn hub_request() {
    let target = Target {
        name: "hub-request",
        smoke: 4000,
        dict: HTTP_DICT,
        text: true,
        max_len: 16 << 10,
        known_issue: None,
    };
    let mut bench = HubBench::new();
    fuzz(&target, None, |input| {
        bench.reset();
        let answer = bench.send(input);
        bench.assert_up();
        match answer {
            Err(e) => panic!("request not answered: {e}"),
            // Closing the connection on bytes that are not an HTTP request is fine, as long as
            // the hub stays up (checked above).
            Ok(None) => "closed".into(),
            Ok(Some(answer)) => {
                assert!(
                    answer.status < 500 || answer.status == 505,
                    "the hub answered a malformed request: {answer:?}"
                );
                format!("{} {}", answer.status, answer.text())
            }
        }
    });
    bench.assert_up();
}

/// A batch changed as only its device could: records opened, changed and sealed again to the
/// hub (see [`reseal_envelope`]), sequence numbers, the cursor, records added, repeated or
/// removed, and gaps. The harness signs whatever comes out.
fn reseal_batch(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let mut batch: Batch = ciborium::from_reader(input).ok()?;
    let seq = |rng: &mut Rng, current: u64| match rng.below(3) {
        0 => *rng.pick(INTERESTING),
        1 => current.wrapping_add(rng.below(5) as u64).wrapping_sub(2),
        _ => rng.below(10) as u64,
    };
    for _ in 0..1 + rng.below(2) {
        let n = batch.records.len();
        let i = rng.below(n);
        match rng.below(9) {
            0..=3 if n > 0 => {
                let envelope = Envelope::from_cbor(&batch.records[i].cbor).ok()?;
                batch.records[i].cbor = reseal_envelope(rng, &envelope).to_cbor();
            }
            4 if n > 0 => batch.records[i].seq = seq(rng, batch.records[i].seq),
            5 => batch.after_seq = seq(rng, batch.after_seq),
            6 if n > 0 => {
                let mut copy = batch.records[i].clone();
                if rng.one_in(2) {
                    copy.seq = batch.records[n - 1].seq.wrapping_add(1);
                }
                let at = rng.below(n + 1);
                batch.records.insert(at, copy);
            }
            7 if n > 0 => {
                batch.records.remove(i);
            }
            _ => {
                let from = seq(rng, batch.after_seq);
                let to = if rng.one_in(2) {
                    from.saturating_add(rng.below(3) as u64)
                } else {
                    seq(rng, from)
                };
                let reason = *rng.pick(&[
                    dermedge_queue::GapReason::Evicted,
                    dermedge_queue::GapReason::Damaged,
                    dermedge_queue::GapReason::Missing,
                ]);
                let gap = dermedge_queue::Gap {
                    from,
                    to,
                    reason,
                    at_ms: *rng.pick(INTERESTING) as i64,
                };
                if !batch.gaps.is_empty() && rng.one_in(3) {
                    let j = rng.below(batch.gaps.len());
                    batch.gaps[j] = gap;
                } else {
                    batch.gaps.push(gap);
                }
            }
        }
    }
    Some(to_cbor(&batch))
}

/// A hub's `200` carries an ack and its `409` a conflict, signed with the hub key for the
/// request's counter.
fn assert_signed_reply(hub: &HubPublic, counter: u64, request: &[u8], answer: &Answer) {
    match answer.status {
        200 => {
            let ack = wire::open_ack(hub, DEVICE, counter, request, &answer.body);
            assert!(ack.is_ok(), "a 200 without a valid ack: {ack:?}");
        }
        409 => {
            let conflict = wire::open_conflict(hub, DEVICE, counter, request, &answer.body);
            assert!(
                conflict.is_ok(),
                "a 409 without a valid conflict: {conflict:?}"
            );
        }
        _ => {}
    }
}

#[test]
fn hub_batch() {
    let target = Target {
        name: "hub-batch",
        smoke: 3000,
        dict: CBOR_DICT,
        text: false,
        max_len: 16 << 10,
        known_issue: None,
    };
    let mut bench = HubBench::new();
    let device = device_key();
    let hub_public = hub_key().public();
    let mut stored = false;
    fuzz(&target, Some(&reseal_batch), |plain| {
        bench.reset();
        let request = |counter: u64| {
            let message = sync_message("request", DEVICE, counter, plain);
            signed_body(device.sign(&message), plain)
        };
        let post = |bench: &HubBench, counter: u64| {
            bench.send(&batch_request(
                Some(DEVICE),
                Some(&counter.to_string()),
                &request(counter),
            ))
        };
        let first = post(&bench, 1);
        bench.assert_up();
        let answer = match first {
            Ok(Some(answer)) => answer,
            other => panic!("a signed batch was not answered: {other:?}"),
        };
        assert!(
            matches!(answer.status, 200 | 400 | 409),
            "the hub answered a signed batch with {answer:?}"
        );
        assert_signed_reply(&hub_public, 1, &request(1), &answer);
        // The batch decoder is sync-wire's target: here one outcome for each kind of CBOR error,
        // so that the corpus holds batches that decode and the mutations go behind them.
        let text = answer.text();
        let text = match text.strip_prefix("malformed batch: ") {
            Some(error) => error.split('(').next().unwrap_or_default().to_string(),
            None => text,
        };
        let mut outcome = format!("{} {text}", answer.status);
        if answer.status == 200 {
            stored = true;
            // The same request again is a replay; the same batch under a new counter is stored
            // once (duplicates) or refused, never an error.
            let replay = post(&bench, 1);
            assert!(
                matches!(replay, Ok(Some(Answer { status: 409, .. }))),
                "a replayed batch: {replay:?}"
            );
            if let Ok(Some(replay)) = &replay {
                assert_signed_reply(&hub_public, 1, &request(1), replay);
            }
            let again = post(&bench, 2);
            let Ok(Some(again)) = again else {
                panic!("the same batch under a new counter was not answered: {again:?}");
            };
            assert!(
                matches!(again.status, 200 | 400 | 409),
                "the same batch under a new counter: {again:?}"
            );
            assert_signed_reply(&hub_public, 2, &request(2), &again);
            outcome += &format!(" again {}", again.status);
        }
        outcome
    });
    bench.assert_up();
    assert!(
        stored,
        "no seed batch was stored: the harness's signing or sealing no longer matches the hub"
    );
}

#[test]
fn model_manifest() {
    let target = Target {
        name: "model-manifest",
        smoke: 30000,
        dict: TOML_DICT,
        text: true,
        max_len: 16 << 10,
        known_issue: None,
    };
    fuzz(&target, None, |input| {
        let text = String::from_utf8_lossy(input);
        match dermedge_core::ModelManifest::parse(&text, Path::new("/fuzz/model.toml")) {
            Ok(m) => {
                let _ = m.model_path();
                let _ = m.input_len();
                "ok".into()
            }
            Err(e) => signature(&e.to_string()),
        }
    });
}

#[test]
fn device_config() {
    let target = Target {
        name: "device-config",
        smoke: 20000,
        dict: TOML_DICT,
        text: true,
        max_len: 16 << 10,
        known_issue: None,
    };
    let dir = scratch();
    let stub = dir.path().join("stub");
    fs::create_dir_all(stub.join("frames")).unwrap();
    for f in [
        "model.toml",
        "head.json",
        "libLiteRt.so",
        "gpio",
        "device.key",
        "hub.pub",
    ] {
        fs::write(stub.join(f), b"stub").unwrap();
    }
    let path = dir.path().join("device.toml");
    let root = dir.path().to_path_buf();
    fuzz(&target, None, |input| {
        fs::write(&path, input).unwrap();
        match dermedge_device::config::LoadedConfig::load(&path) {
            Ok(c) => format!("ok {:?}", c.display_size),
            Err(e) => signature(&strip(&e, &root)),
        }
    });
}

#[test]
fn model_check() {
    let target = Target {
        name: "model-check",
        smoke: 40000,
        dict: TFLITE_DICT,
        text: false,
        max_len: 16 << 10,
        known_issue: None,
    };
    use dermedge_engine::flatbuffer;
    fuzz(&target, None, |input| {
        let checked = flatbuffer::check_tflite(input);
        // Meant to run after the check, but they take any bytes: none may panic.
        let ops = flatbuffer::custom_op_codes(input);
        let names = flatbuffer::output_names(input);
        let rank = flatbuffer::max_add_mul_rank(input);
        match checked {
            Ok(()) => format!(
                "ok {} {} {}",
                ops.is_ok(),
                names.map_or(0, |n| n.len().min(3)),
                rank.is_ok()
            ),
            Err(m) => signature(&m.what),
        }
    });
}
