//! The device key: 32 random bytes in a file (hex), from which the at-rest key, the sync key and
//! a key check are derived with HKDF-SHA256, so each use has its own key.

use std::fs;
use std::path::Path;

use hkdf::Hkdf;
use sha2::Sha256;

use crate::QueueError;

pub const KEY_BYTES: usize = 32;

/// A device's secret. Never logged, never written to the queue.
#[derive(Clone)]
pub struct DeviceKey([u8; KEY_BYTES]);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey(check {})", hex(&self.check()))
    }
}

impl DeviceKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        getrandom::getrandom(&mut bytes).expect("the OS random source is available");
        Self(bytes)
    }

    /// Parse 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != KEY_BYTES * 2 {
            return None;
        }
        let mut bytes = [0u8; KEY_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn load(path: &Path) -> Result<Self, QueueError> {
        let text = fs::read_to_string(path).map_err(|source| QueueError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_hex(&text).ok_or_else(|| QueueError::BadKeyFile {
            path: path.into(),
            expected: "64 hex digits (32 bytes), as `dermedge keygen` writes",
        })
    }

    /// Write a new key file readable by its owner only; refuses to overwrite.
    pub fn save_new(&self, path: &Path) -> Result<(), QueueError> {
        use std::io::Write;
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let io = |source| QueueError::Io {
            path: path.into(),
            source,
        };
        let mut file = options.open(path).map_err(io)?;
        file.write_all(format!("{}\n", self.to_hex()).as_bytes())
            .map_err(io)?;
        file.sync_all().map_err(io)
    }

    fn derive(&self, info: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        Hkdf::<Sha256>::new(Some(b"dermedge"), &self.0)
            .expand(info.as_bytes(), &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }

    /// Encrypts queue records on disk.
    pub fn at_rest_key(&self) -> [u8; 32] {
        self.derive("dermedge queue at-rest v1")
    }

    /// Shared with the hub: seals sync requests and acknowledgements.
    pub fn sync_key(&self) -> [u8; 32] {
        self.derive("dermedge sync v1")
    }

    /// Stored in the queue so that a wrong key is told apart from corruption.
    pub fn check(&self) -> [u8; 16] {
        let full = self.derive("dermedge queue key check v1");
        full[..16].try_into().expect("16 of 32 bytes")
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_derive_distinct_subkeys() {
        let key = DeviceKey::generate();
        let again = DeviceKey::from_hex(&format!("  {}\n", key.to_hex())).unwrap();
        assert_eq!(again.at_rest_key(), key.at_rest_key());
        assert_ne!(key.at_rest_key(), key.sync_key());
        assert!(DeviceKey::from_hex("abc").is_none());
        assert!(DeviceKey::from_hex(&"zz".repeat(32)).is_none());
        assert!(!format!("{key:?}").contains(&key.to_hex()));
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        let key = DeviceKey::generate();
        key.save_new(&path).unwrap();
        assert!(key.save_new(&path).is_err());
        assert_eq!(DeviceKey::load(&path).unwrap().to_hex(), key.to_hex());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::write(dir.path().join("bad.key"), "not a key").unwrap();
        let err = DeviceKey::load(&dir.path().join("bad.key"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.key") && err.contains("64 hex"), "{err}");
    }
}
