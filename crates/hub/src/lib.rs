//! dermedge-hub: the other end of sync, for the clinic LAN.
//!
//! An HTTP server ([`server::HubServer`]) that opens each batch with the sending device's sync
//! key (refusing unknown devices, tampered bodies and replayed counters, each logged to the
//! `rejections` table), stores its records in SQLite in one transaction, deduplicated by record
//! id and in each device's sequence order ([`store::Store`]), and answers with a sealed
//! acknowledgement. [`export`] turns the database into CSV and `.npy`.

pub mod export;
pub mod server;
pub mod store;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{path}: database: {message}")]
    Database { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("{0}")]
    BadRequest(String),
}

#[cfg(test)]
mod tests;
