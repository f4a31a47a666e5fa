//! Segment files and record frames, and the scan that recovers a segment after a crash.
//!
//! A segment is a 32-byte header (`DMQSEG01`, first sequence number, key check) followed by frames:
//!
//! ```text
//! "DMQR" | len: u32 | seq: u64 | nonce: [u8; 24] | ciphertext: [u8; len] | crc32: u32
//! ```
//!
//! The ciphertext is the record's CBOR sealed with XChaCha20-Poly1305 under the at-rest key, with
//! the sequence number as associated data (a frame cannot be moved to another position). The
//! CRC covers everything before it, so a frame cut short by power loss never verifies.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

pub const SEGMENT_MAGIC: &[u8; 8] = b"DMQSEG01";
pub const HEADER_LEN: usize = 32;
pub const FRAME_MAGIC: &[u8; 4] = b"DMQR";
const NONCE_LEN: usize = 24;
const PREFIX_LEN: usize = 4 + 4 + 8 + NONCE_LEN;
pub const TAG_LEN: usize = 16;
/// The highest sequence number a frame may carry: far beyond any device's life, and far enough
/// below `u64::MAX` that no arithmetic on sequence numbers can overflow.
pub const MAX_SEQ: u64 = 1 << 62;
/// Bytes a frame adds around its plaintext.
pub const FRAME_OVERHEAD: usize = PREFIX_LEN + TAG_LEN + 4;

pub fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.dlog")
}

pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".dlog")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub fn encode_header(first_seq: u64, key_check: &[u8; 16]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..16].copy_from_slice(&first_seq.to_le_bytes());
    h[16..].copy_from_slice(key_check);
    h
}

#[derive(Debug, PartialEq)]
pub enum HeaderState {
    Valid {
        first_seq: u64,
        key_check: [u8; 16],
    },
    /// Shorter than a header: the segment was being created when power went.
    Torn,
    /// Not a dermedge segment header.
    Foreign,
}

pub fn decode_header(bytes: &[u8]) -> HeaderState {
    if bytes.len() < HEADER_LEN {
        return if SEGMENT_MAGIC.starts_with(&bytes[..bytes.len().min(8)]) {
            HeaderState::Torn
        } else {
            HeaderState::Foreign
        };
    }
    if &bytes[..8] != SEGMENT_MAGIC {
        return HeaderState::Foreign;
    }
    HeaderState::Valid {
        first_seq: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
        key_check: bytes[16..32].try_into().expect("16 bytes"),
    }
}

/// Seals and opens record payloads with the at-rest key.
pub struct Cipher(XChaCha20Poly1305);

impl Cipher {
    pub fn new(key: &[u8; 32]) -> Self {
        Self(XChaCha20Poly1305::new(key.into()))
    }

    fn aad(seq: u64) -> [u8; 24] {
        let mut aad = [0u8; 24];
        aad[..16].copy_from_slice(b"dermedge-queue/1");
        aad[16..].copy_from_slice(&seq.to_le_bytes());
        aad
    }

    /// The whole frame for `plaintext` at `seq`.
    pub fn seal(&self, seq: u64, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).expect("the OS random source is available");
        let ciphertext = self
            .0
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &Self::aad(seq),
                },
            )
            .expect("sealing cannot fail for in-memory buffers");
        let mut frame = Vec::with_capacity(PREFIX_LEN + ciphertext.len() + 4);
        frame.extend_from_slice(FRAME_MAGIC);
        frame.extend_from_slice(&(ciphertext.len() as u32).to_le_bytes());
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(&nonce);
        frame.extend_from_slice(&ciphertext);
        let crc = crc32fast::hash(&frame);
        frame.extend_from_slice(&crc.to_le_bytes());
        frame
    }

    /// The plaintext of a frame that [`check_frame`] accepted; `None` if it does not authenticate.
    pub fn open(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let seq = u64::from_le_bytes(frame[8..16].try_into().ok()?);
        let nonce = &frame[16..PREFIX_LEN];
        let ciphertext = &frame[PREFIX_LEN..frame.len() - 4];
        self.0
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &Self::aad(seq),
                },
            )
            .ok()
    }
}

/// If a complete frame with a valid CRC starts at `buf[pos..]`: its (seq, length).
pub fn check_frame(buf: &[u8], pos: usize, max_ciphertext: usize) -> Option<(u64, usize)> {
    let rest = buf.get(pos..)?;
    if rest.len() < PREFIX_LEN + TAG_LEN + 4 || &rest[..4] != FRAME_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(rest[4..8].try_into().ok()?) as usize;
    if !(TAG_LEN..=max_ciphertext).contains(&len) {
        return None;
    }
    let total = PREFIX_LEN + len + 4;
    if rest.len() < total {
        return None;
    }
    let crc = u32::from_le_bytes(rest[total - 4..total].try_into().ok()?);
    if crc32fast::hash(&rest[..total - 4]) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(rest[8..16].try_into().ok()?);
    Some((seq, total))
}

/// A frame found by the scan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameRef {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
}

/// Bytes the scan could not accept.
#[derive(Debug, Clone, PartialEq)]
pub struct Damage {
    pub offset: u64,
    pub bytes: u64,
    /// True when nothing valid follows in the last segment: an interrupted append.
    pub torn_tail: bool,
    pub reason: String,
}

pub struct Scan {
    pub frames: Vec<FrameRef>,
    pub damage: Vec<Damage>,
}

/// Walk the frames after the header. Frames must verify (CRC and AEAD) and carry increasing
/// sequence numbers above `after_seq`; anything else is damage, and the scan resynchronises on
/// the next frame that verifies.
pub fn scan(
    buf: &[u8],
    cipher: &Cipher,
    after_seq: u64,
    max_ciphertext: usize,
    last: bool,
) -> Scan {
    let mut frames = Vec::new();
    let mut damage = Vec::new();
    let mut prev = after_seq;
    let mut pos = HEADER_LEN;
    let accept = |pos: usize, prev: u64| -> Result<(u64, usize), String> {
        let (seq, len) =
            check_frame(buf, pos, max_ciphertext).ok_or("no frame with a valid CRC")?;
        if seq <= prev {
            return Err(format!("sequence {seq} does not follow {prev}"));
        }
        if seq > MAX_SEQ {
            return Err(format!("sequence {seq} is beyond {MAX_SEQ}"));
        }
        let Some(plain) = cipher.open(&buf[pos..pos + len]) else {
            return Err(format!(
                "frame {seq} does not authenticate (tampered, or sealed with another key)"
            ));
        };
        // A frame that would stop sync for ever (its record cannot be read) is damage too. A
        // record queued before records were sealed to the hub is still a record.
        if let Err(e) = dermedge_record::Envelope::from_cbor(&plain) {
            if dermedge_record::Record::from_cbor(&plain).is_err() {
                return Err(format!("frame {seq} holds no readable record: {e}"));
            }
        }
        Ok((seq, len))
    };
    while pos < buf.len() {
        match accept(pos, prev) {
            Ok((seq, len)) => {
                frames.push(FrameRef {
                    seq,
                    offset: pos as u64,
                    len: len as u32,
                });
                prev = seq;
                pos += len;
            }
            Err(reason) => {
                let next = (pos + 1..buf.len())
                    .filter(|&p| buf[p..].starts_with(FRAME_MAGIC))
                    .find(|&p| accept(p, prev).is_ok());
                let end = next.unwrap_or(buf.len());
                damage.push(Damage {
                    offset: pos as u64,
                    bytes: (end - pos) as u64,
                    torn_tail: last && next.is_none(),
                    reason,
                });
                pos = end;
            }
        }
    }
    Scan { frames, damage }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment of records whose `source` is each of `names`; the end offset of each frame.
    fn segment(cipher: &Cipher, names: &[&str]) -> (Vec<u8>, Vec<usize>) {
        let mut buf = encode_header(1, &[7; 16]).to_vec();
        let mut ends = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let record = dermedge_record::Record {
                format: dermedge_record::RECORD_FORMAT,
                id: dermedge_record::new_record_id(),
                captured_at_ms: 0,
                device_id: "d".into(),
                model_id: "m".into(),
                precision: dermedge_record::Precision::Int8,
                embedding: dermedge_record::StoredEmbedding::new(
                    &[1.0],
                    dermedge_record::EmbeddingType::F32,
                ),
                heads: Vec::new(),
                quality: None,
                source: Some(name.to_string()),
                thumbnail_jpeg: None,
            };
            let hub = dermedge_record::HubKey::from_bytes([9; 32]).public();
            let envelope = dermedge_record::Envelope::seal(&record, &hub);
            buf.extend(cipher.seal(i as u64 + 1, &envelope.to_cbor()));
            ends.push(buf.len());
        }
        (buf, ends)
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("seg-42.dlog"), None);
        assert_eq!(parse_segment_name("notes.txt"), None);
    }

    #[test]
    fn frames_seal_and_open() {
        let cipher = Cipher::new(&[1; 32]);
        let frame = cipher.seal(5, b"hello");
        assert_eq!(frame.len(), 5 + FRAME_OVERHEAD);
        assert_eq!(check_frame(&frame, 0, 1 << 20), Some((5, frame.len())));
        assert_eq!(cipher.open(&frame).unwrap(), b"hello");
        assert!(Cipher::new(&[2; 32]).open(&frame).is_none());
        assert!(!frame.windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn a_corrupt_middle_frame_is_skipped_and_reported() {
        let cipher = Cipher::new(&[1; 32]);
        let (mut buf, ends) = segment(&cipher, &["one", "two", "three"]);
        let second = ends[0];
        buf[second + 50] ^= 0xff;
        let scan = scan(&buf, &cipher, 0, 1 << 20, true);
        let seqs: Vec<u64> = scan.frames.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(scan.damage.len(), 1);
        assert!(!scan.damage[0].torn_tail);
        assert_eq!(scan.damage[0].offset, second as u64);
    }

    #[test]
    fn a_torn_tail_is_reported_as_such() {
        let cipher = Cipher::new(&[1; 32]);
        let (buf, ends) = segment(&cipher, &["one", "two"]);
        let cut = &buf[..buf.len() - 3];
        let scan = scan(cut, &cipher, 0, 1 << 20, true);
        assert_eq!(scan.frames.len(), 1);
        assert!(scan.damage[0].torn_tail);
        assert_eq!(
            scan.frames[0].offset + u64::from(scan.frames[0].len),
            ends[0] as u64
        );
    }

    #[test]
    fn an_authentic_frame_without_a_record_or_beyond_the_last_seq_is_damage() {
        let cipher = Cipher::new(&[1; 32]);
        let mut buf = encode_header(1, &[7; 16]).to_vec();
        buf.extend(cipher.seal(1, b"not cbor"));
        let scan1 = scan(&buf, &cipher, 0, 1 << 20, true);
        assert!(scan1.frames.is_empty());
        assert!(scan1.damage[0].reason.contains("no readable record"));
        let (good, _) = segment(&cipher, &["a"]);
        let frame = &good[HEADER_LEN..];
        let mut far = encode_header(1, &[7; 16]).to_vec();
        let mut sealed = cipher.seal(u64::MAX, &cipher.open(frame).unwrap());
        far.append(&mut sealed);
        let scan2 = scan(&far, &cipher, 0, 1 << 20, false);
        assert!(scan2.frames.is_empty());
        assert!(scan2.damage[0].reason.contains("beyond"));
    }
}
