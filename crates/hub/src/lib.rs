//! dermedge-hub: the other end of sync, for the clinic LAN.
//!
//! An HTTP server ([`server::HubServer`]) that verifies each batch with the sending device's
//! enrolled public key (refusing unknown and revoked devices, bad signatures and replayed
//! counters, each logged to the bounded `rejections` table), opens its records with the hub key
//! (kept in its own file, never in the database), stores them and the losses the device
//! reported in one transaction (SQLite for a clinic, PostgreSQL for a regional hub that several
//! hub processes share), deduplicated by record id and in each device's sequence order
//! ([`store::Store`]), and answers with an acknowledgement signed by the hub key.
//! [`export`] turns the database into CSV and `.npy`. The same listener serves clinicians a web
//! page ([`web`]): records with their thumbnails, device health, labels and CSV export, behind
//! accounts with Argon2id passwords ([`accounts`]).

pub mod accounts;
pub mod export;
pub mod heads;
pub mod server;
pub mod store;
pub mod tls;
pub mod validate;
pub mod web;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// `db`: the SQLite file or the PostgreSQL URL, its password hidden.
    #[error("{db}: database: {message}")]
    Database { db: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("{0}")]
    BadRequest(String),
    /// Random numbers or password hashing failed.
    #[error("{0}")]
    Crypto(String),
    /// The TLS listener's certificate or key file.
    #[error("{path}: {message}")]
    Tls { path: PathBuf, message: String },
}

#[cfg(test)]
mod heads_tests;
#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod test_db;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
#[cfg(test)]
mod web_tests;
