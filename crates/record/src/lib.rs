//! dermedge-record: what one capture leaves behind and who may read and sign it — the domain
//! types every other crate passes around.
//!
//! [`Record`] (the capture: model, [`Precision`], [`StoredEmbedding`], head and quality results,
//! thumbnail) and its [`Envelope`] sealed to the hub; the keys ([`DeviceKey`], [`HubKey`] and
//! their public halves) that sign, seal and verify. The queue stores envelopes, the sync protocol
//! carries them, the hub opens them: none of those crates owns these types.

mod key;
mod precision;
mod record;

pub use key::{
    hex, DeviceKey, DevicePublic, HubKey, HubPublic, KeyError, KEY_BYTES, SIGNATURE_BYTES,
};
pub use precision::Precision;
pub use record::{
    new_record_id, now_ms, EmbeddingType, Envelope, HeadResult, QualityResult, Record,
    StoredEmbedding, ENVELOPE_FORMAT, RECORD_FORMAT,
};
