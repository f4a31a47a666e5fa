//! Makes the seed corpora in `tests/fuzz/<target>/seed-*` (deterministic: the same bytes on every
//! run). Runs only when asked:
//!
//! ```sh
//! DERMEDGE_FUZZ_REGENERATE=1 cargo test -p dermedge-e2e --test fuzz generate_seeds
//! ```
//!
//! It replaces every `seed-*` file and leaves crash inputs (`crash-*`, `pending/`) alone.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use dermedge_queue::{Gap, GapReason};
use dermedge_record::{
    DeviceKey, EmbeddingType, Envelope, HeadResult, HubKey, HubPublic, QualityResult, Record,
    StoredEmbedding, RECORD_FORMAT,
};
use dermedge_sync::wire::{Ack, Batch, BatchRecord, Conflict, HeadOffer, HeadQuery, HeldHead};

use super::{
    batch_request, device_key, envelope_of, fuzz_dir, hub_key, segment, sign_reply, sign_request,
    state, to_cbor as cbor, DEVICE,
};

#[derive(Clone, Copy)]
pub enum Shape {
    /// Three values, nothing optional.
    Small,
    /// A head, the quality verdict, a source.
    Full,
    /// f16 embedding and a thumbnail.
    F16Thumbnail,
}

/// A record of `DEVICE` with a deterministic id.
pub fn record(seq: u64, shape: Shape) -> Record {
    let values: Vec<f32> = (0..8)
        .map(|i| (seq as f32 + i as f32) * 0.25 - 1.0)
        .collect();
    let mut r = Record {
        format: RECORD_FORMAT,
        id: format!("{:016x}{:016x}", super::fnv1a(&seq.to_le_bytes()), seq),
        captured_at_ms: 1_790_000_000_000i64.wrapping_add(seq as i64),
        device_id: DEVICE.into(),
        model_id: "df-mini".into(),
        precision: dermedge_record::Precision::Int8,
        embedding: StoredEmbedding::new(&values[..3], EmbeddingType::F32),
        heads: Vec::new(),
        quality: None,
        source: None,
        thumbnail_jpeg: None,
    };
    match shape {
        Shape::Small => {}
        Shape::Full => {
            r.embedding = StoredEmbedding::new(&values, EmbeddingType::F32);
            r.heads = vec![HeadResult {
                head: "image-kind".into(),
                classes: vec!["dermoscopy".into(), "photo".into()],
                probabilities: vec![0.875, 0.125],
                version: None,
            }];
            r.quality = Some(QualityResult {
                acceptable: true,
                reasons: vec![],
                metrics: BTreeMap::from([
                    ("mean_luminance".to_string(), 121.5f32),
                    ("sharpness".to_string(), 14.25),
                ]),
            });
            r.source = Some(format!("patch-{seq}.png"));
        }
        Shape::F16Thumbnail => {
            r.embedding = StoredEmbedding::new(&values, EmbeddingType::F16);
            r.precision = dermedge_record::Precision::Fp32;
            // The first bytes of a JPEG: SOI, APP0 JFIF, EOI.
            r.thumbnail_jpeg = Some(
                [
                    &[0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10][..],
                    b"JFIF\0",
                    &[1, 1, 0, 0, 1, 0, 1, 0, 0, 0xff, 0xd9],
                ]
                .concat(),
            );
            r.source = Some("uvc:0 Dermatoscope ü".into());
        }
    }
    r
}

/// The envelope CBOR of `record(seq, shape)`, sealed to the fuzz hub.
fn sealed(seq: u64, shape: Shape) -> (u64, Vec<u8>) {
    (seq, envelope_of(&record(seq, shape), &hub()).to_cbor())
}

fn hub() -> HubPublic {
    hub_key().public()
}

/// A hub key the fuzzed hub does not hold.
fn other_hub() -> HubPublic {
    HubKey::from_bytes([0x33; 32]).public()
}

fn gap(from: u64, to: u64, reason: GapReason) -> Gap {
    Gap {
        from,
        to,
        reason,
        at_ms: 1_790_000_000_000,
    }
}

fn batch(after_seq: u64, records: &[(u64, Vec<u8>)], gaps: &[Gap]) -> Vec<u8> {
    cbor(&Batch {
        after_seq,
        records: records
            .iter()
            .map(|(seq, cbor)| BatchRecord {
                seq: *seq,
                cbor: cbor.clone(),
            })
            .collect(),
        gaps: gaps.to_vec(),
        queued_after: None,
    })
}

/// A small published head of `version` for df-mini's 4 first dimensions.
pub fn head(version: Option<u64>) -> dermedge_head::LinearHead {
    dermedge_head::LinearHead {
        format: dermedge_head::FORMAT.into(),
        name: "diagnosis".into(),
        model_id: "df-mini".into(),
        embedding_dim: 4,
        kind: dermedge_head::HeadKind::Softmax,
        classes: vec!["melanoma".into(), "naevus".into()],
        l2_normalize: true,
        input_mean: vec![0.1, 0.2, 0.3, 0.4],
        input_scale: 0.5,
        weights: vec![vec![1.0, -1.0, 0.5, 0.0], vec![-1.0, 1.0, -0.5, 0.25]],
        bias: vec![0.0, 0.5],
        version,
    }
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn record_seeds() -> Seeds {
    let mut wrong_format = record(3, Shape::Small);
    wrong_format.format = 2;
    vec![
        ("seed-01-small.cbor", record(1, Shape::Small).to_cbor()),
        ("seed-02-full.cbor", record(2, Shape::Full).to_cbor()),
        (
            "seed-03-f16-thumbnail.cbor",
            record(3, Shape::F16Thumbnail).to_cbor(),
        ),
        ("seed-04-format-2.cbor", wrong_format.to_cbor()),
        // An Ack where a Record belongs: valid CBOR, wrong shape.
        (
            "seed-05-not-a-record.cbor",
            cbor(&Ack {
                counter: 1,
                acked_through: 2,
                stored: 3,
                duplicates: 0,
            }),
        ),
    ]
}

fn segment_seeds() -> Seeds {
    let key = device_key();
    let (at_rest, check) = (key.at_rest_key(), key.check());
    let frames = |first: u64, shapes: &[Shape]| -> Vec<u8> {
        let mut seg = segment::header(first, &check);
        for (i, shape) in shapes.iter().enumerate() {
            let (seq, plain) = sealed(first + i as u64, *shape);
            seg.extend(segment::frame(
                &at_rest,
                seq,
                &super::nonce_for(&[&seq.to_le_bytes()[..], &plain].concat()),
                &plain,
            ));
        }
        seg
    };
    let three = frames(1, &[Shape::Small, Shape::Full, Shape::F16Thumbnail]);
    let first_len = frames(1, &[Shape::Small]).len();
    let mut damaged = three.clone();
    damaged[first_len + 60] ^= 0x20;
    let mut garbage_tail = frames(1, &[Shape::Small, Shape::Small]);
    garbage_tail.extend_from_slice(b"DMQR\xff\xff\xff\xff not a frame");
    // Authentic frames whose plaintext is not an envelope: a record (the format before
    // envelopes), then bytes that are not CBOR.
    let mut not_envelopes = segment::header(1, &check);
    for (seq, plain) in [
        (1u64, record(1, Shape::Small).to_cbor()),
        (2, b"not cbor".to_vec()),
    ] {
        not_envelopes.extend(segment::frame(
            &at_rest,
            seq,
            &super::nonce_for(&plain),
            &plain,
        ));
    }
    vec![
        ("seed-01-header-only.dlog", segment::header(1, &check)),
        ("seed-02-one-record.dlog", frames(1, &[Shape::Small])),
        ("seed-03-three-records.dlog", three.clone()),
        ("seed-04-torn-tail.dlog", three[..three.len() - 7].to_vec()),
        ("seed-05-damaged-middle.dlog", damaged),
        ("seed-06-torn-header.dlog", b"DMQSEG01\x01\0\0".to_vec()),
        (
            "seed-07-starts-at-41.dlog",
            frames(41, &[Shape::Full, Shape::Small]),
        ),
        ("seed-08-garbage-tail.dlog", garbage_tail),
        ("seed-09-not-envelopes.dlog", not_envelopes),
    ]
}

/// The valid queue of the state and journal targets (`RecoveryBench`): records 1 to 6 but 4,
/// record 1 acknowledged.
fn state_seeds() -> Seeds {
    use state::{file, slot};
    let torn = {
        let mut s = slot(3, 1, 6);
        s[20..].fill(0);
        s
    };
    let mut bad_crc = slot(3, 1, 6);
    bad_crc[30] ^= 1;
    vec![
        // As the queue leaves it: the acknowledgement in the newer slot.
        (
            "seed-01-acked-1.state",
            file(&[slot(1, 0, 6), slot(2, 1, 6)]),
        ),
        ("seed-02-fresh.state", file(&[slot(1, 0, 6), slot(0, 0, 6)])),
        ("seed-03-newer-torn.state", file(&[slot(2, 1, 6), torn])),
        ("seed-04-both-damaged.state", file(&[bad_crc, torn])),
        ("seed-05-short.state", slot(2, 1, 6)[..20].to_vec()),
        ("seed-06-empty.state", Vec::new()),
        (
            "seed-07-durable-beyond.state",
            file(&[slot(4, 1, 40), slot(3, 1, 6)]),
        ),
        (
            "seed-08-durable-below.state",
            file(&[slot(2, 0, 2), slot(1, 0, 2)]),
        ),
        (
            "seed-09-all-acked.state",
            file(&[slot(2, 6, 6), slot(1, 3, 6)]),
        ),
        (
            "seed-10-acked-beyond.state",
            file(&[slot(5, 9, 6), slot(4, 1, 6)]),
        ),
        (
            "seed-11-generation-wrap.state",
            file(&[slot(0, 1, 6), slot(u64::MAX, 0, 6)]),
        ),
    ]
}

fn gaps_line(from: u64, to: u64, reason: &str) -> String {
    format!("{{\"from\":{from},\"to\":{to},\"reason\":\"{reason}\",\"at_ms\":1790000000000}}\n")
}

fn gaps_seeds() -> Seeds {
    let every = [
        gaps_line(4, 4, "missing"),
        gaps_line(7, 9, "evicted"),
        gaps_line(2, 2, "damaged"),
    ]
    .concat();
    let torn = [gaps_line(4, 4, "missing"), gaps_line(7, 7, "damaged")].concat();
    let mut zero_hole = vec![0u8; 40];
    zero_hole.extend_from_slice(gaps_line(4, 4, "missing").as_bytes());
    vec![
        // As the queue leaves it.
        (
            "seed-01-missing.log",
            gaps_line(4, 4, "missing").into_bytes(),
        ),
        ("seed-02-every-reason.log", every.into_bytes()),
        (
            "seed-03-torn-line.log",
            torn.as_bytes()[..torn.len() - 12].to_vec(),
        ),
        ("seed-04-zero-hole.log", zero_hole),
        (
            "seed-05-evicted-first-segment.log",
            [gaps_line(1, 3, "evicted"), gaps_line(4, 4, "missing")]
                .concat()
                .into_bytes(),
        ),
        (
            "seed-06-wide.log",
            [
                gaps_line(1, 4611686018427387904, "damaged"),
                gaps_line(5, u64::MAX, "evicted"),
            ]
            .concat()
            .into_bytes(),
        ),
        (
            "seed-07-not-gaps.log",
            b"not json\n{}\n[]\n{\"from\":0,\"to\":1,\"reason\":\"missing\",\"at_ms\":0}\n\
              {\"from\":3,\"to\":2,\"reason\":\"missing\",\"at_ms\":0}\n"
                .to_vec(),
        ),
        (
            "seed-08-crlf.log",
            gaps_line(4, 4, "missing")
                .replace('\n', "\r\n")
                .into_bytes(),
        ),
    ]
}

fn envelope_seeds() -> Seeds {
    let envelope = |seq, shape| envelope_of(&record(seq, shape), &hub());
    let other_outside = Envelope {
        id: "0000000000000000ffffffffffffffff".into(),
        ..envelope(5, Shape::Small)
    };
    let format_1 = Envelope {
        format: 1,
        ..envelope(6, Shape::Small)
    };
    let not_a_record = Envelope {
        sealed: super::seal_to_hub(&hub(), b"\xa1\x62id\x01"),
        ..envelope(8, Shape::Small)
    };
    vec![
        ("seed-01-small.cbor", envelope(1, Shape::Small).to_cbor()),
        ("seed-02-full.cbor", envelope(2, Shape::Full).to_cbor()),
        (
            "seed-03-f16-thumbnail.cbor",
            envelope(3, Shape::F16Thumbnail).to_cbor(),
        ),
        (
            "seed-04-other-hub.cbor",
            envelope_of(&record(4, Shape::Small), &other_hub()).to_cbor(),
        ),
        ("seed-05-other-outside.cbor", other_outside.to_cbor()),
        ("seed-06-format-1.cbor", format_1.to_cbor()),
        ("seed-07-a-record.cbor", record(7, Shape::Small).to_cbor()),
        ("seed-08-sealed-not-a-record.cbor", not_a_record.to_cbor()),
    ]
}

/// The first 32 bytes, counting up from zero, that are not an Ed25519 public key.
fn not_a_point() -> [u8; 32] {
    (0u8..=255)
        .map(|b| {
            let mut bytes = [0u8; 32];
            bytes[0] = b;
            bytes[31] = 0x11;
            bytes
        })
        .find(|bytes| {
            format!("dermedge-device-public-1 {}", dermedge_record::hex(bytes))
                .parse::<dermedge_record::DevicePublic>()
                .is_err()
        })
        .expect("one of them is off the curve")
}

fn public_key_seeds() -> Seeds {
    let device = device_key().public().to_string();
    let hub = hub().to_string();
    let not_a_point = format!(
        "dermedge-device-public-1 {}",
        dermedge_record::hex(&not_a_point())
    );
    let mut multibyte = device.clone();
    multibyte.replace_range(device.len() - 2.., "é");
    vec![
        ("seed-01-device.pub", format!("{device}\n").into_bytes()),
        ("seed-02-hub.pub", format!("{hub}\n").into_bytes()),
        (
            "seed-03-device-uppercase.pub",
            device
                .to_uppercase()
                .replace("DERMEDGE-DEVICE-PUBLIC-1", "dermedge-device-public-1")
                .into_bytes(),
        ),
        (
            "seed-04-hub-extra-word.pub",
            format!("{hub} {}\n", &hub[22..86]).into_bytes(),
        ),
        ("seed-05-not-a-point.pub", not_a_point.into_bytes()),
        (
            "seed-06-other-device.pub",
            format!("  {}\r\n", DeviceKey::from_bytes([0x21; 32]).public()).into_bytes(),
        ),
        ("seed-07-multibyte.pub", multibyte.into_bytes()),
    ]
}

fn sync_wire_seeds() -> Seeds {
    vec![
        (
            "seed-01-batch-one.cbor",
            batch(0, &[sealed(1, Shape::Small)], &[]),
        ),
        (
            "seed-02-batch-three.cbor",
            batch(
                4,
                &[
                    sealed(5, Shape::Small),
                    sealed(6, Shape::Full),
                    sealed(8, Shape::F16Thumbnail),
                ],
                &[gap(7, 7, GapReason::Damaged)],
            ),
        ),
        ("seed-03-batch-empty.cbor", batch(0, &[], &[])),
        (
            "seed-04-ack.cbor",
            cbor(&Ack {
                counter: 7,
                acked_through: 12,
                stored: 3,
                duplicates: 1,
            }),
        ),
        (
            "seed-05-ack-other-counter.cbor",
            cbor(&Ack {
                counter: 8,
                acked_through: 0,
                stored: 0,
                duplicates: 0,
            }),
        ),
        (
            "seed-06-conflict.cbor",
            cbor(&Conflict {
                error: "replayed request".into(),
                hub_highest_seq: Some(12),
                hub_last_counter: Some(7),
            }),
        ),
        (
            "seed-07-batch-gaps-only.cbor",
            batch(
                3,
                &[],
                &[
                    gap(4, 9, GapReason::Evicted),
                    gap(12, 12, GapReason::Missing),
                ],
            ),
        ),
        (
            "seed-08-head-query.cbor",
            cbor(&HeadQuery {
                model_id: "df-mini".into(),
                embedding_dim: 4,
                have: vec![HeldHead {
                    name: "diagnosis".into(),
                    version: 1,
                }],
            }),
        ),
        ("seed-09-head.cbor", cbor(&head(Some(2)))),
        (
            "seed-10-head-offer.cbor",
            cbor(&HeadOffer {
                heads: vec![serde_bytes::ByteBuf::from(dermedge_sync::wire::seal_head(
                    &hub_key(),
                    &head(Some(3)),
                ))],
            }),
        ),
    ]
}

fn hub_batch_seeds() -> Seeds {
    let mut stranger = record(1, Shape::Small);
    stranger.device_id = "dev-other".into();
    let other_outside = Envelope {
        id: "0000000000000000ffffffffffffffff".into(),
        ..envelope_of(&record(1, Shape::Small), &hub())
    };
    vec![
        (
            "seed-01-one.cbor",
            batch(0, &[sealed(1, Shape::Small)], &[]),
        ),
        (
            "seed-02-three.cbor",
            batch(
                0,
                &[
                    sealed(1, Shape::Full),
                    sealed(2, Shape::F16Thumbnail),
                    sealed(4, Shape::Small),
                ],
                &[],
            ),
        ),
        ("seed-03-empty.cbor", batch(0, &[], &[])),
        (
            "seed-04-other-device.cbor",
            batch(0, &[(1, envelope_of(&stranger, &hub()).to_cbor())], &[]),
        ),
        (
            "seed-05-not-rising.cbor",
            batch(0, &[sealed(2, Shape::Small), sealed(2, Shape::Small)], &[]),
        ),
        (
            "seed-06-bad-record.cbor",
            batch(0, &[(1, b"\xa1\x62id\x01".to_vec())], &[]),
        ),
        (
            "seed-07-behind.cbor",
            batch(5, &[sealed(6, Shape::Small)], &[]),
        ),
        (
            "seed-08-gaps-only.cbor",
            batch(0, &[], &[gap(1, 3, GapReason::Evicted)]),
        ),
        (
            "seed-09-records-and-gaps.cbor",
            batch(
                0,
                &[sealed(1, Shape::Small), sealed(5, Shape::Full)],
                &[gap(2, 4, GapReason::Damaged), gap(6, 6, GapReason::Missing)],
            ),
        ),
        (
            "seed-10-other-hub.cbor",
            batch(
                0,
                &[(
                    1,
                    envelope_of(&record(1, Shape::Small), &other_hub()).to_cbor(),
                )],
                &[],
            ),
        ),
        (
            "seed-11-other-outside.cbor",
            batch(0, &[(1, other_outside.to_cbor())], &[]),
        ),
    ]
}

fn hub_request_seeds() -> Seeds {
    let plain = batch(0, &[sealed(1, Shape::Small)], &[]);
    let signed = |counter: u64| sign_request(DEVICE, counter, &plain);
    let chunked = {
        let body = signed(1);
        let mut r = format!(
            "POST /v2/batches HTTP/1.1\r\nHost: hub\r\nX-Dermedge-Device: {DEVICE}\r\n\
             X-Dermedge-Counter: 1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(&body);
        r.extend_from_slice(b"\r\n0\r\n\r\n");
        r
    };
    let short_body = {
        let mut r = batch_request(Some(DEVICE), Some("3"), &signed(3));
        r.truncate(r.len() - 10);
        r
    };
    let v1 = {
        let mut r = batch_request(Some(DEVICE), Some("1"), &signed(1));
        let at = r.windows(3).position(|w| w == b"/v2").expect("the path");
        r[at + 2] = b'1';
        r
    };
    // An ack where a batch belongs: signed by the hub, not by the device.
    let hub_signed = batch_request(
        Some(DEVICE),
        Some("1"),
        &sign_reply(
            "ack",
            DEVICE,
            1,
            b"",
            &cbor(&Ack {
                counter: 1,
                acked_through: 1,
                stored: 1,
                duplicates: 0,
            }),
        ),
    );
    vec![
        ("seed-01-batch.http", batch_request(Some(DEVICE), Some("1"), &signed(1))),
        ("seed-02-health.http", b"GET /v1/health HTTP/1.1\r\nHost: hub\r\n\r\n".to_vec()),
        ("seed-03-unknown-device.http", batch_request(Some("stranger"), Some("1"), &signed(1))),
        ("seed-04-no-counter.http", batch_request(Some(DEVICE), None, &signed(1))),
        ("seed-05-chunked.http", chunked),
        ("seed-06-short-body.http", short_body),
        (
            "seed-07-wrong-method.http",
            b"PUT /v2/batches HTTP/1.1\r\nHost: hub\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        ),
        (
            "seed-08-http10.http",
            b"POST /v2/batches HTTP/1.0\r\nX-Dermedge-Device: dev-fuzz\r\nX-Dermedge-Counter: 9\r\n\
              Connection: keep-alive\r\nContent-Length: 5\r\n\r\nhello"
                .to_vec(),
        ),
        ("seed-09-v1-path.http", v1),
        ("seed-10-signed-by-hub.http", hub_signed),
    ]
}

fn fixture(path: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const MANIFEST_INT8_INPUT: &str = r#"# uint8 input with its quantisation, NCHW, BGR
[model]
id = "q-model"
version = "2"
file = "/models/q.tflite"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
precision = "int8"
embedding_dim = 1

[input]
width = 4096
height = 1
channels = 3
layout = "nchw"
color_order = "bgr"
dtype = "uint8"
resize_filter = "bilinear"
scale = 1.0
offset = -0.5
quantization = { scale = 0.0039215689, zero_point = 255 }

[output]
name = "StatefulPartitionedCall:0"
dtype = "int8"

[provenance]
"quoted key" = 'literal'
notes = """
multi-line"""
"#;

fn manifest_seeds() -> Seeds {
    vec![
        (
            "seed-01-df-mini-fp32.toml",
            fixture("fixtures/df-mini/df-mini.fp32.toml"),
        ),
        (
            "seed-02-df-mini-int8.toml",
            fixture("fixtures/df-mini/df-mini.int8.toml"),
        ),
        (
            "seed-03-edgetpu-patch.toml",
            fixture("fixtures/edgetpu/patch.toml"),
        ),
        (
            "seed-04-uint8-nchw.toml",
            MANIFEST_INT8_INPUT.as_bytes().to_vec(),
        ),
    ]
}

/// Every path the configuration names points at the stub files the fuzz test creates, so that
/// validation goes past the existence checks.
fn stub_paths(text: &str) -> Vec<u8> {
    let mut value: toml::Table = toml::from_str(text).expect("a firmware configuration");
    let set = |value: &mut toml::Table, section: &str, key: &str, to: &str| {
        if let Some(t) = value.get_mut(section).and_then(|s| s.as_table_mut()) {
            if t.contains_key(key) {
                t.insert(key.into(), toml::Value::String(to.into()));
            }
        }
    };
    value.insert(
        "heads".into(),
        toml::Value::Array(vec!["stub/head.json".into()]),
    );
    set(&mut value, "device", "key_file", "stub/device.key");
    set(&mut value, "device", "hub_public", "stub/hub.pub");
    set(&mut value, "model", "manifest", "stub/model.toml");
    set(&mut value, "model", "runtime", "stub/libLiteRt.so");
    set(&mut value, "camera", "path", "stub/frames");
    set(&mut value, "capture", "gpio_value_file", "stub/gpio");
    set(&mut value, "display", "dir", "out/screens");
    set(&mut value, "queue", "dir", "out/queue");
    set(&mut value, "run", "summary", "out/summary.json");
    if let Some(h) = value
        .get_mut("sync")
        .and_then(|s| s.get_mut("local_hub"))
        .and_then(|h| h.as_table_mut())
    {
        h.insert("db".into(), "out/hub.sqlite".into());
        if h.contains_key("key") {
            h.insert("key".into(), "out/hub.key".into());
        }
    }
    toml::to_string(&value).expect("serialisable").into_bytes()
}

const CONFIG_SYNTHETIC: &str = r#"# synthetic frames, no display, every optional section
[device]
id = "kiosk-07"
key_file = "stub/device.key"
hub_public = "stub/hub.pub"

[model]
manifest = "stub/model.toml"
accelerator = "edge-tpu"
fallback = "fail"
weight_cache = "out/cache.bin"

[camera]
source = "synthetic"
fps = 120

[capture]
trigger = "key"
max_captures = 9223372036854775807

[quality]
min_mean_luminance = 0.0
max_mean_luminance = 255.0

[display]
target = "none"
size = "800x480"

[queue]
dir = "out/queue"
durability = "group"
group_max_records = 100000
full_policy = "evict-oldest"
thumbnail_side = 0

[sync]
enabled = true
hub = "https://hub.example:8787/"
batch_records = 10000
final_sync_seconds = 0

[health]
interval_seconds = 86400
"#;

fn config_seeds() -> Seeds {
    let firmware = |name: &str| {
        let text = String::from_utf8(fixture(&format!("../firmware-config/{name}"))).unwrap();
        stub_paths(&text)
    };
    vec![
        ("seed-01-x86-dev.toml", firmware("x86-dev.toml")),
        ("seed-02-pi5-handheld.toml", firmware("pi5-handheld.toml")),
        (
            "seed-03-jetson-orin-kiosk.toml",
            firmware("jetson-orin-kiosk.toml"),
        ),
        (
            "seed-04-synthetic.toml",
            CONFIG_SYNTHETIC.as_bytes().to_vec(),
        ),
    ]
}

fn model_check_seeds() -> Seeds {
    let plain = fixture("fixtures/edgetpu/patch.tflite");
    let mut header_only = plain[..16].to_vec();
    header_only[..4].copy_from_slice(&8u32.to_le_bytes());
    vec![
        ("seed-01-patch.tflite", plain),
        (
            "seed-02-patch-edgetpu.tflite",
            fixture("fixtures/edgetpu/patch_edgetpu.tflite"),
        ),
        ("seed-03-header-only.tflite", header_only),
    ]
}

/// Every target's seeds.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("record-cbor", record_seeds()),
        ("envelope-cbor", envelope_seeds()),
        ("public-key", public_key_seeds()),
        ("queue-segment", segment_seeds()),
        ("queue-state", state_seeds()),
        ("queue-gaps", gaps_seeds()),
        ("sync-wire", sync_wire_seeds()),
        ("hub-request", hub_request_seeds()),
        ("hub-batch", hub_batch_seeds()),
        ("model-manifest", manifest_seeds()),
        ("device-config", config_seeds()),
        ("model-check", model_check_seeds()),
    ]
}

#[test]
fn generate_seeds() {
    if std::env::var("DERMEDGE_FUZZ_REGENERATE").as_deref() != Ok("1") {
        return;
    }
    for (target, seeds) in all() {
        let dir = fuzz_dir(target);
        fs::create_dir_all(&dir).unwrap();
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_file() && name.starts_with("seed-") {
                fs::remove_file(&path).unwrap();
            }
        }
        for (name, bytes) in seeds {
            assert!(
                bytes.len() <= 8 << 10,
                "{target}/{name}: {} bytes",
                bytes.len()
            );
            fs::write(dir.join(name), bytes).unwrap();
        }
    }
}
