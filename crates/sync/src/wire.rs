//! The sync protocol `dermedge-sync/2`, shared by the device and the hub.
//!
//! `POST /v2/batches` with headers `X-Dermedge-Device` and `X-Dermedge-Counter`; the body is the
//! device's Ed25519 signature (64 bytes) followed by the CBOR [`Batch`]. The signature covers a
//! domain-separated message: `"dermedge-sync/2 request\0" || device id || "\0" || counter (u64,
//! big-endian) || CBOR`, so a hub that verifies it with the device's enrolled public key knows
//! which device sent it, for which counter, and that nothing was changed. The records inside are
//! envelopes sealed to the hub's key on the device: the request carries nothing readable but the
//! record ids, capture times and the device id.
//!
//! The counter rises with every request (never reused, even for retries), so the hub rejects a
//! replayed request without trusting the device's clock. The hub answers `200` with an [`Ack`],
//! and `409` with a [`Conflict`], each signed with the hub's key over the same kind of message
//! (kinds `ack` and `conflict`): a device moves its cursor or counter only on the word of the hub
//! whose public key it pinned at enrollment. The hub's database holds public keys only, so a copy
//! of it cannot produce such a word.
//!
//! `POST /v2/heads` asks, with the same headers and a body signed the same way (kind `heads`),
//! for the heads the hub published for the device's model ([`HeadQuery`]); the hub answers `200`
//! with a [`HeadOffer`]. Each head in it is a publication the hub signed once, for every device:
//! `signature || CBOR head` over `"dermedge-sync/2 head\0" || "\0" || 0 (u64) || CBOR`, the
//! head's version inside the CBOR
//! ([`seal_head`], [`open_head`]). A device stores that blob as it came and checks it again at
//! every start, so a head on its disk is as trustworthy as the hub key it pinned. The query
//! changes nothing on the hub, so its counter is not checked against replay.

use dermedge_head::LinearHead;
use dermedge_queue::Gap;
use dermedge_record::{DeviceKey, DevicePublic, HubKey, HubPublic, SIGNATURE_BYTES};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const PROTOCOL: &str = "dermedge-sync/2";
pub const BATCH_PATH: &str = "/v2/batches";
pub const HEALTH_PATH: &str = "/v1/health";
pub const HEADS_PATH: &str = "/v2/heads";
pub const DEVICE_HEADER: &str = "X-Dermedge-Device";
pub const COUNTER_HEADER: &str = "X-Dermedge-Counter";
pub const CONTENT_TYPE: &str = "application/vnd.dermedge.batch";

/// Records `after_seq < seq`, in order, and the losses the device has not yet reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// The device's acknowledged cursor when it built the batch.
    pub after_seq: u64,
    pub records: Vec<BatchRecord>,
    /// Ranges of sequence numbers the device lost (evicted, damaged, missing) and has not yet
    /// had acknowledged: their records will never come.
    pub gaps: Vec<Gap>,
    /// Records the device still holds unacknowledged besides this batch's, when it built it:
    /// its queue depth for the hub's devices page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_after: Option<u64>,
}

impl Batch {
    /// The sequence number the hub acknowledges this batch through: its last record, the end of
    /// its last gap, or the cursor it follows, whichever is highest.
    pub fn last(&self) -> u64 {
        let records = self.records.iter().map(|r| r.seq).max().unwrap_or(0);
        let gaps = self.gaps.iter().map(|g| g.to).max().unwrap_or(0);
        records.max(gaps).max(self.after_seq)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRecord {
    pub seq: u64,
    /// The record's envelope CBOR exactly as queued.
    #[serde(with = "serde_bytes")]
    pub cbor: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The counter of the request this acknowledges.
    pub counter: u64,
    /// Every record of the device through this sequence number is stored, or reported lost.
    pub acked_through: u64,
    /// Records stored by this request; the rest of the batch were already there.
    pub stored: u32,
    pub duplicates: u32,
}

/// Returned with `409 Conflict`: a replayed counter, or a hub that holds fewer records than the
/// device believes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    pub error: String,
    pub hub_highest_seq: Option<u64>,
    pub hub_last_counter: Option<u64>,
}

/// The heads a device asks for: those published for its model, newer than the ones it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadQuery {
    pub model_id: String,
    pub embedding_dim: u64,
    /// The heads the device runs now, by name, with the hub's version (0 for a local file).
    pub have: Vec<HeldHead>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldHead {
    pub name: String,
    pub version: u64,
}

/// The hub's answer to a [`HeadQuery`]: signed head publications ([`seal_head`]), newest
/// version of each name, only those the device does not hold yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadOffer {
    pub heads: Vec<serde_bytes::ByteBuf>,
}

/// Why a signed message was refused.
#[derive(Debug, PartialEq)]
pub enum OpenError {
    /// Wrong key, tampered body, header values that are not the ones signed, or a body too short
    /// to hold a signature.
    Unauthenticated,
    /// Authentic, but not a valid message.
    Malformed(String),
}

/// What is signed: `"dermedge-sync/2 <kind>\0" || device || "\0" || counter (BE) || cbor`.
fn message(kind: &str, device: &str, counter: u64, cbor: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(PROTOCOL.len() + kind.len() + device.len() + 11 + cbor.len());
    m.extend_from_slice(PROTOCOL.as_bytes());
    m.push(b' ');
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(device.as_bytes());
    m.push(0);
    m.extend_from_slice(&counter.to_be_bytes());
    m.extend_from_slice(cbor);
    m
}

/// What a reply signs: its kind's message over the SHA-256 of the request it answers, then its
/// CBOR. A reply recorded for one request (another device's with the same id and counter, or this
/// device's before its counter state was lost) therefore verifies for no other.
fn reply_message(kind: &str, device: &str, counter: u64, request: &[u8], cbor: &[u8]) -> Vec<u8> {
    let mut bound = Sha256::digest(request).to_vec();
    bound.extend_from_slice(cbor);
    message(kind, device, counter, &bound)
}

fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("serialisable");
    out
}

/// `signature || cbor`.
fn signed(signature: [u8; SIGNATURE_BYTES], cbor: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE_BYTES + cbor.len());
    out.extend_from_slice(&signature);
    out.extend(cbor);
    out
}

/// The CBOR of a signed body, if `verify` accepts its signature over the message of `kind`.
fn verified(
    signed_message: impl FnOnce(&[u8]) -> Vec<u8>,
    body: &[u8],
    verify: impl FnOnce(&[u8], &[u8]) -> bool,
) -> Result<&[u8], OpenError> {
    if body.len() < SIGNATURE_BYTES {
        return Err(OpenError::Unauthenticated);
    }
    let (signature, cbor) = body.split_at(SIGNATURE_BYTES);
    if !verify(&signed_message(cbor), signature) {
        return Err(OpenError::Unauthenticated);
    }
    Ok(cbor)
}

fn decode<T: serde::de::DeserializeOwned>(cbor: &[u8]) -> Result<T, OpenError> {
    ciborium::from_reader(cbor).map_err(|e| OpenError::Malformed(e.to_string()))
}

/// A request body: the device's signature, then the batch's CBOR.
pub fn seal_batch(key: &DeviceKey, device: &str, counter: u64, batch: &Batch) -> Vec<u8> {
    let cbor = to_cbor(batch);
    signed(key.sign(&message("request", device, counter, &cbor)), cbor)
}

pub fn open_batch(
    public: &DevicePublic,
    device: &str,
    counter: u64,
    body: &[u8],
) -> Result<Batch, OpenError> {
    decode(verified(
        |cbor| message("request", device, counter, cbor),
        body,
        |m, s| public.verify(m, s),
    )?)
}

/// A `200` body: the hub's signature, then the ack's CBOR, bound to the request (`request`: its
/// body as received) and its counter.
pub fn seal_ack(hub: &HubKey, device: &str, request: &[u8], ack: &Ack) -> Vec<u8> {
    let cbor = to_cbor(ack);
    signed(
        hub.sign(&reply_message("ack", device, ack.counter, request, &cbor)),
        cbor,
    )
}

/// The ack in `body`, if the pinned hub signed it for `request` (the body this device sent).
pub fn open_ack(
    hub: &HubPublic,
    device: &str,
    counter: u64,
    request: &[u8],
    body: &[u8],
) -> Result<Ack, OpenError> {
    let ack: Ack = decode(verified(
        |cbor| reply_message("ack", device, counter, request, cbor),
        body,
        |m, s| hub.verify(m, s),
    )?)?;
    if ack.counter != counter {
        return Err(OpenError::Malformed(format!(
            "acknowledges request {}, not {counter}",
            ack.counter
        )));
    }
    Ok(ack)
}

/// A `409 Conflict` body, signed like an [`Ack`] for the request it answers: a device moves its
/// counter or explains its cursor only on the word of its pinned hub.
pub fn seal_conflict(
    hub: &HubKey,
    device: &str,
    counter: u64,
    request: &[u8],
    conflict: &Conflict,
) -> Vec<u8> {
    let cbor = to_cbor(conflict);
    signed(
        hub.sign(&reply_message("conflict", device, counter, request, &cbor)),
        cbor,
    )
}

pub fn open_conflict(
    hub: &HubPublic,
    device: &str,
    counter: u64,
    request: &[u8],
    body: &[u8],
) -> Result<Conflict, OpenError> {
    decode(verified(
        |cbor| reply_message("conflict", device, counter, request, cbor),
        body,
        |m, s| hub.verify(m, s),
    )?)
}

/// A head query body: the device's signature, then the query's CBOR.
pub fn seal_head_query(key: &DeviceKey, device: &str, counter: u64, query: &HeadQuery) -> Vec<u8> {
    let cbor = to_cbor(query);
    signed(key.sign(&message("heads", device, counter, &cbor)), cbor)
}

pub fn open_head_query(
    public: &DevicePublic,
    device: &str,
    counter: u64,
    body: &[u8],
) -> Result<HeadQuery, OpenError> {
    decode(verified(
        |cbor| message("heads", device, counter, cbor),
        body,
        |m, s| public.verify(m, s),
    )?)
}

/// A head publication: the hub's signature, then the head's CBOR (its version inside).
///
/// # Panics
/// If `head.version` is `None`: only a numbered head is published.
pub fn seal_head(hub: &HubKey, head: &LinearHead) -> Vec<u8> {
    assert!(head.version.is_some(), "a published head has a version");
    let cbor = to_cbor(head);
    signed(hub.sign(&message("head", "", 0, &cbor)), cbor)
}

/// The hub's signature over a draft head it trained (`head_json` as it stores it), so that
/// publishing signs only what the hub itself trained, not what a database writer put there.
pub fn sign_draft(hub: &HubKey, head_json: &str) -> [u8; SIGNATURE_BYTES] {
    hub.sign(&message("draft", "", 0, head_json.as_bytes()))
}

pub fn verify_draft(hub: &HubPublic, head_json: &str, signature: &[u8]) -> bool {
    hub.verify(&message("draft", "", 0, head_json.as_bytes()), signature)
}

/// The head in a publication, if the pinned hub signed it and it is a well-formed, numbered head.
/// Whether it fits the device's model is the caller's check ([`LinearHead::check_model`]).
pub fn open_head(hub: &HubPublic, blob: &[u8]) -> Result<LinearHead, OpenError> {
    let head: LinearHead = decode(verified(
        |cbor| message("head", "", 0, cbor),
        blob,
        |m, s| hub.verify(m, s),
    )?)?;
    if head.version.is_none() {
        return Err(OpenError::Malformed("the head has no version".into()));
    }
    dermedge_head::check_name(&head.name).map_err(OpenError::Malformed)?;
    head.validate().map_err(OpenError::Malformed)?;
    Ok(head)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The request the replies in these tests answer.
    const REQ: &[u8] = b"the request body";

    #[test]
    fn a_reply_verifies_only_for_the_request_it_answers() {
        let hub = HubKey::generate();
        let ack = Ack {
            counter: 3,
            acked_through: 9,
            stored: 1,
            duplicates: 0,
        };
        let body = seal_ack(&hub, "dev-1", b"request A", &ack);
        assert!(open_ack(&hub.public(), "dev-1", 3, b"request A", &body).is_ok());
        assert_eq!(
            open_ack(&hub.public(), "dev-1", 3, b"request B", &body),
            Err(OpenError::Unauthenticated),
            "an ack recorded for another request (same device id and counter) is refused"
        );
        let conflict = Conflict {
            error: "x".into(),
            hub_highest_seq: None,
            hub_last_counter: Some(1 << 59),
        };
        let body = seal_conflict(&hub, "dev-1", 3, b"request A", &conflict);
        assert!(open_conflict(&hub.public(), "dev-1", 3, b"request B", &body).is_err());
    }
    use dermedge_queue::GapReason;

    /// A small 2-d head of df-mini named `diagnosis`.
    pub(crate) fn head(version: Option<u64>) -> LinearHead {
        LinearHead {
            format: dermedge_head::FORMAT.into(),
            name: "diagnosis".into(),
            model_id: "df-mini".into(),
            embedding_dim: 2,
            kind: dermedge_head::HeadKind::Softmax,
            classes: vec!["a".into(), "b".into()],
            l2_normalize: true,
            input_mean: Vec::new(),
            input_scale: 1.0,
            weights: vec![vec![1.0, -1.0], vec![-1.0, 1.0]],
            bias: vec![0.0, 0.5],
            version,
        }
    }

    /// `signature || cbor` of `value`, signed by `hub` as a head publication.
    fn sign_as_head<T: Serialize>(hub: &HubKey, value: &T) -> Vec<u8> {
        let cbor = to_cbor(value);
        signed(hub.sign(&message("head", "", 0, &cbor)), cbor)
    }

    #[test]
    fn a_head_publication_opens_only_with_the_hub_key_and_unchanged() {
        let hub = HubKey::generate();
        let blob = seal_head(&hub, &head(Some(3)));
        assert_eq!(open_head(&hub.public(), &blob).unwrap(), head(Some(3)));
        assert_eq!(
            open_head(&HubKey::generate().public(), &blob),
            Err(OpenError::Unauthenticated)
        );
        for i in [0, SIGNATURE_BYTES, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert_eq!(
                open_head(&hub.public(), &bad),
                Err(OpenError::Unauthenticated),
                "byte {i}"
            );
        }
        assert_eq!(
            open_head(&hub.public(), &blob[..10]),
            Err(OpenError::Unauthenticated)
        );
        // Signed, but not a publishable head: no version, a name that is no file name, a shape
        // that does not fit, another message kind.
        assert!(matches!(
            open_head(&hub.public(), &sign_as_head(&hub, &head(None))),
            Err(OpenError::Malformed(_))
        ));
        let mut named = head(Some(1));
        named.name = "../../queue".into();
        assert!(matches!(
            open_head(&hub.public(), &sign_as_head(&hub, &named)),
            Err(OpenError::Malformed(_))
        ));
        let mut short = head(Some(1));
        short.weights[1].pop();
        assert!(matches!(
            open_head(&hub.public(), &sign_as_head(&hub, &short)),
            Err(OpenError::Malformed(_))
        ));
        let as_ack = seal_ack(&hub, "", b"", &ack());
        assert_eq!(
            open_head(&hub.public(), &as_ack),
            Err(OpenError::Unauthenticated)
        );
    }

    #[test]
    fn head_queries_open_only_for_their_device_and_counter() {
        let key = DeviceKey::generate();
        let query = HeadQuery {
            model_id: "df-mini".into(),
            embedding_dim: 16,
            have: vec![HeldHead {
                name: "diagnosis".into(),
                version: 2,
            }],
        };
        let body = seal_head_query(&key, "dev-1", 9, &query);
        assert_eq!(
            open_head_query(&key.public(), "dev-1", 9, &body).unwrap(),
            query
        );
        assert!(open_head_query(&key.public(), "dev-1", 10, &body).is_err());
        assert!(open_head_query(&key.public(), "dev-2", 9, &body).is_err());
        // A batch signature does not make a head query, nor the other way round.
        let batch_body = seal_batch(&key, "dev-1", 9, &batch());
        assert!(open_head_query(&key.public(), "dev-1", 9, &batch_body).is_err());
        assert!(open_batch(&key.public(), "dev-1", 9, &body).is_err());
    }

    fn batch() -> Batch {
        Batch {
            after_seq: 3,
            records: vec![BatchRecord {
                seq: 4,
                cbor: b"record".to_vec(),
            }],
            gaps: vec![Gap {
                from: 5,
                to: 6,
                reason: GapReason::Evicted,
                at_ms: 1,
            }],
            queued_after: Some(12),
        }
    }

    fn ack() -> Ack {
        Ack {
            counter: 7,
            acked_through: 6,
            stored: 1,
            duplicates: 0,
        }
    }

    #[test]
    fn signed_batches_open_only_with_the_same_key_device_and_counter() {
        let key = DeviceKey::generate();
        let public = key.public();
        let body = seal_batch(&key, "dev-1", 7, &batch());
        assert_eq!(open_batch(&public, "dev-1", 7, &body).unwrap(), batch());
        assert_eq!(batch().last(), 6);
        let other = DeviceKey::generate().public();
        assert_eq!(
            open_batch(&other, "dev-1", 7, &body),
            Err(OpenError::Unauthenticated),
            "another device's key"
        );
        assert_eq!(
            open_batch(&public, "dev-2", 7, &body),
            Err(OpenError::Unauthenticated)
        );
        assert_eq!(
            open_batch(&public, "dev-1", 8, &body),
            Err(OpenError::Unauthenticated),
            "counter mismatch"
        );
        let signed_by_other = seal_batch(&DeviceKey::generate(), "dev-1", 7, &batch());
        assert_eq!(
            open_batch(&public, "dev-1", 7, &signed_by_other),
            Err(OpenError::Unauthenticated)
        );
    }

    #[test]
    fn a_tampered_or_short_body_is_unauthenticated() {
        let key = DeviceKey::generate();
        let public = key.public();
        let body = seal_batch(&key, "dev-1", 7, &batch());
        for at in [0, SIGNATURE_BYTES - 1, SIGNATURE_BYTES, body.len() - 1] {
            let mut tampered = body.clone();
            tampered[at] ^= 1;
            assert_eq!(
                open_batch(&public, "dev-1", 7, &tampered),
                Err(OpenError::Unauthenticated),
                "byte {at} flipped"
            );
        }
        let mut extended = body.clone();
        extended.push(0);
        assert_eq!(
            open_batch(&public, "dev-1", 7, &extended),
            Err(OpenError::Unauthenticated)
        );
        for len in [0, 5, SIGNATURE_BYTES - 1] {
            assert_eq!(
                open_batch(&public, "dev-1", 7, &body[..len]),
                Err(OpenError::Unauthenticated),
                "{len} bytes"
            );
        }
        let hub = HubKey::generate();
        let ack_body = seal_ack(&hub, "dev-1", REQ, &ack());
        assert_eq!(
            open_ack(
                &hub.public(),
                "dev-1",
                7,
                REQ,
                &ack_body[..SIGNATURE_BYTES - 1]
            ),
            Err(OpenError::Unauthenticated)
        );
    }

    #[test]
    fn an_authentic_body_that_is_not_a_batch_is_malformed() {
        let key = DeviceKey::generate();
        let cbor = b"\xa1\x61x\x01".to_vec();
        let body = signed(key.sign(&message("request", "dev-1", 7, &cbor)), cbor);
        assert!(matches!(
            open_batch(&key.public(), "dev-1", 7, &body),
            Err(OpenError::Malformed(_))
        ));
    }

    #[test]
    fn acks_are_bound_to_their_request_and_hub() {
        let hub = HubKey::generate();
        let body = seal_ack(&hub, "dev-1", REQ, &ack());
        assert_eq!(
            open_ack(&hub.public(), "dev-1", 7, REQ, &body).unwrap(),
            ack()
        );
        assert_eq!(
            open_ack(&hub.public(), "dev-1", 6, REQ, &body),
            Err(OpenError::Unauthenticated),
            "counter mismatch"
        );
        assert_eq!(
            open_ack(&hub.public(), "dev-2", 7, REQ, &body),
            Err(OpenError::Unauthenticated)
        );
        assert_eq!(
            open_ack(&HubKey::generate().public(), "dev-1", 7, REQ, &body),
            Err(OpenError::Unauthenticated),
            "another hub's key"
        );
        let mut tampered = body.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            open_ack(&hub.public(), "dev-1", 7, REQ, &tampered),
            Err(OpenError::Unauthenticated)
        );
        // Signed for counter 7, but saying 8 inside: authentic, and refused.
        let lying = Ack {
            counter: 8,
            ..ack()
        };
        let cbor = to_cbor(&lying);
        let body = signed(
            hub.sign(&reply_message("ack", "dev-1", 7, REQ, &cbor)),
            cbor,
        );
        assert!(matches!(
            open_ack(&hub.public(), "dev-1", 7, REQ, &body),
            Err(OpenError::Malformed(m)) if m.contains("not 7")
        ));
    }

    #[test]
    fn kinds_do_not_stand_in_for_each_other() {
        let hub = HubKey::generate();
        let conflict = Conflict {
            error: "replayed".into(),
            hub_highest_seq: None,
            hub_last_counter: Some(9),
        };
        let body = seal_conflict(&hub, "dev-1", 7, REQ, &conflict);
        assert_eq!(
            open_conflict(&hub.public(), "dev-1", 7, REQ, &body).unwrap(),
            conflict
        );
        assert_eq!(
            open_conflict(&hub.public(), "dev-1", 8, REQ, &body),
            Err(OpenError::Unauthenticated)
        );
        assert_eq!(
            open_conflict(&HubKey::generate().public(), "dev-1", 7, REQ, &body),
            Err(OpenError::Unauthenticated)
        );
        assert_eq!(
            open_ack(&hub.public(), "dev-1", 7, REQ, &body),
            Err(OpenError::Unauthenticated)
        );
        let ack_body = seal_ack(&hub, "dev-1", REQ, &ack());
        assert_eq!(
            open_conflict(&hub.public(), "dev-1", 7, REQ, &ack_body),
            Err(OpenError::Unauthenticated)
        );
    }

    #[test]
    fn unknown_batch_fields_are_refused() {
        #[derive(Serialize)]
        struct Extra {
            after_seq: u64,
            records: Vec<BatchRecord>,
            gaps: Vec<Gap>,
            extra: u8,
        }
        let key = DeviceKey::generate();
        let cbor = to_cbor(&Extra {
            after_seq: 0,
            records: Vec::new(),
            gaps: Vec::new(),
            extra: 1,
        });
        let body = signed(key.sign(&message("request", "d", 1, &cbor)), cbor);
        assert!(matches!(
            open_batch(&key.public(), "d", 1, &body),
            Err(OpenError::Malformed(_))
        ));
    }
}
