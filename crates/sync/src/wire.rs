//! The sync protocol, shared by the device and the hub.
//!
//! `POST /v1/batches` with headers `X-Dermedge-Device` and `X-Dermedge-Counter`; the body is a
//! 24-byte nonce followed by the CBOR [`Batch`] sealed with XChaCha20-Poly1305 under the device's
//! sync key, with the protocol tag, device id and counter as associated data. The seal is the
//! request's signature: a hub that opens it knows which device sent it and that nothing was
//! changed. The counter rises with every request (never reused, even for retries), so the hub
//! rejects a replayed request without trusting the device's clock. The hub answers `200` with an
//! [`Ack`] sealed the same way under the same key, so a device only deletes data on the word of
//! the hub that holds its key.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

pub const BATCH_PATH: &str = "/v1/batches";
pub const HEALTH_PATH: &str = "/v1/health";
pub const DEVICE_HEADER: &str = "X-Dermedge-Device";
pub const COUNTER_HEADER: &str = "X-Dermedge-Counter";
pub const CONTENT_TYPE: &str = "application/vnd.dermedge.batch";
const NONCE_LEN: usize = 24;

/// Records `after_seq < seq`, in order; gaps are records the device lost (evicted, damaged) and
/// says so by sending the batch this way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// The device's acknowledged cursor when it built the batch.
    pub after_seq: u64,
    pub records: Vec<BatchRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRecord {
    pub seq: u64,
    /// The record's CBOR exactly as queued.
    #[serde(with = "serde_bytes")]
    pub cbor: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The counter of the request this acknowledges.
    pub counter: u64,
    /// Every record of the device through this sequence number is stored.
    pub acked_through: u64,
    /// Records stored by this request; the rest of the batch were already there.
    pub stored: u32,
    pub duplicates: u32,
}

/// Returned with `409 Conflict` when the hub holds fewer records than the device believes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    pub error: String,
    pub hub_highest_seq: Option<u64>,
    pub hub_last_counter: Option<u64>,
}

fn aad(kind: &str, device: &str, counter: u64) -> Vec<u8> {
    let mut aad = format!("dermedge-sync/1 {kind} ").into_bytes();
    aad.extend_from_slice(device.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&counter.to_be_bytes());
    aad
}

fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut nonce).expect("the OS random source is available");
    let sealed = XChaCha20Poly1305::new(key.into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("sealing cannot fail for in-memory buffers");
    let mut out = nonce.to_vec();
    out.extend(sealed);
    out
}

fn open(key: &[u8; 32], aad: &[u8], body: &[u8]) -> Option<Vec<u8>> {
    if body.len() < NONCE_LEN {
        return None;
    }
    XChaCha20Poly1305::new(key.into())
        .decrypt(
            XNonce::from_slice(&body[..NONCE_LEN]),
            Payload {
                msg: &body[NONCE_LEN..],
                aad,
            },
        )
        .ok()
}

fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("serialisable");
    out
}

pub fn seal_batch(key: &[u8; 32], device: &str, counter: u64, batch: &Batch) -> Vec<u8> {
    seal(key, &aad("request", device, counter), &to_cbor(batch))
}

/// Why a sealed message was refused.
#[derive(Debug, PartialEq)]
pub enum OpenError {
    /// Wrong key, tampered body, or header values that are not the ones sealed.
    Unauthenticated,
    /// Authentic, but not a valid message.
    Malformed(String),
}

pub fn open_batch(
    key: &[u8; 32],
    device: &str,
    counter: u64,
    body: &[u8],
) -> Result<Batch, OpenError> {
    let plain =
        open(key, &aad("request", device, counter), body).ok_or(OpenError::Unauthenticated)?;
    ciborium::from_reader(plain.as_slice()).map_err(|e| OpenError::Malformed(e.to_string()))
}

pub fn seal_ack(key: &[u8; 32], device: &str, ack: &Ack) -> Vec<u8> {
    seal(key, &aad("ack", device, ack.counter), &to_cbor(ack))
}

pub fn open_ack(key: &[u8; 32], device: &str, counter: u64, body: &[u8]) -> Result<Ack, OpenError> {
    let plain = open(key, &aad("ack", device, counter), body).ok_or(OpenError::Unauthenticated)?;
    let ack: Ack =
        ciborium::from_reader(plain.as_slice()).map_err(|e| OpenError::Malformed(e.to_string()))?;
    if ack.counter != counter {
        return Err(OpenError::Malformed(format!(
            "acknowledges request {}, not {counter}",
            ack.counter
        )));
    }
    Ok(ack)
}

/// A `409 Conflict` body, sealed like an [`Ack`] for the request it answers: a device moves its
/// counter or cursor only on the word of the hub that holds its key.
pub fn seal_conflict(key: &[u8; 32], device: &str, counter: u64, conflict: &Conflict) -> Vec<u8> {
    seal(key, &aad("conflict", device, counter), &to_cbor(conflict))
}

pub fn open_conflict(
    key: &[u8; 32],
    device: &str,
    counter: u64,
    body: &[u8],
) -> Result<Conflict, OpenError> {
    let plain =
        open(key, &aad("conflict", device, counter), body).ok_or(OpenError::Unauthenticated)?;
    ciborium::from_reader(plain.as_slice()).map_err(|e| OpenError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            after_seq: 3,
            records: vec![BatchRecord {
                seq: 4,
                cbor: b"record".to_vec(),
            }],
        }
    }

    #[test]
    fn sealed_batches_open_only_with_the_same_key_device_and_counter() {
        let key = [9u8; 32];
        let body = seal_batch(&key, "dev-1", 7, &batch());
        assert_eq!(open_batch(&key, "dev-1", 7, &body).unwrap(), batch());
        assert_eq!(
            open_batch(&[8; 32], "dev-1", 7, &body),
            Err(OpenError::Unauthenticated)
        );
        assert_eq!(
            open_batch(&key, "dev-2", 7, &body),
            Err(OpenError::Unauthenticated)
        );
        assert_eq!(
            open_batch(&key, "dev-1", 8, &body),
            Err(OpenError::Unauthenticated)
        );
        let mut tampered = body.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            open_batch(&key, "dev-1", 7, &tampered),
            Err(OpenError::Unauthenticated)
        );
        assert_eq!(
            open_batch(&key, "dev-1", 7, b"short"),
            Err(OpenError::Unauthenticated)
        );
    }

    #[test]
    fn acks_are_bound_to_their_request() {
        let key = [9u8; 32];
        let ack = Ack {
            counter: 7,
            acked_through: 4,
            stored: 1,
            duplicates: 0,
        };
        let body = seal_ack(&key, "dev-1", &ack);
        assert_eq!(open_ack(&key, "dev-1", 7, &body).unwrap(), ack);
        assert!(open_ack(&key, "dev-1", 6, &body).is_err());
        assert!(open_ack(&[1; 32], "dev-1", 7, &body).is_err());
    }
}
