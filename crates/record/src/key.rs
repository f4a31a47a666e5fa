//! Keys, and who holds which (no single stolen thing is enough):
//!
//! - The **device key** (32 random bytes in a file on the device, hex): from it, with HKDF-SHA256,
//!   the device's Ed25519 signing key (its identity at the hub, which stores only the public
//!   half), the at-rest key that seals queue frames (integrity, and the metadata), and a key check.
//! - The **hub key** (32 random bytes in a file on the hub machine, never in its database): from
//!   it the hub's Ed25519 signing key (acknowledgements and every reply that changes device
//!   state) and the clinic's X25519 key that records are sealed to on the device.
//! - The **hub's public key** ([`HubPublic`], `hub.pub`) is pinned on the device at enrollment: it
//!   seals records so that the device cannot read what it queued, and verifies the hub's replies.
//!
//! Enrollment moves public keys only ([`DevicePublic`] to the hub, [`HubPublic`] to the device).

use std::fs;
use std::path::Path;

use crypto_box::aead::OsRng;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

use std::path::PathBuf;

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a key file: expected {expected}")]
    BadKeyFile {
        path: PathBuf,
        expected: &'static str,
    },
}

pub const KEY_BYTES: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
const DEVICE_PUBLIC_TAG: &str = "dermedge-device-public-1";
const HUB_PUBLIC_TAG: &str = "dermedge-hub-public-1";

fn derive(seed: &[u8; KEY_BYTES], info: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"dermedge"), seed)
        .expand(info.as_bytes(), &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.into(),
        source,
    }
}

/// 64 hex digits (surrounding whitespace allowed) as 32 bytes.
fn from_hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
}

/// Write a new secret file readable by its owner only, synced with its directory entry; never
/// overwrites.
fn save_secret(path: &Path, text: &str) -> Result<(), KeyError> {
    use std::io::Write;
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io_error(path))?;
    file.write_all(text.as_bytes()).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

fn load_seed(path: &Path, expected: &'static str) -> Result<[u8; KEY_BYTES], KeyError> {
    let mut text = fs::read_to_string(path).map_err(io_error(path))?;
    let seed = from_hex32(&text);
    text.zeroize();
    seed.ok_or_else(|| KeyError::BadKeyFile {
        path: path.into(),
        expected,
    })
}

fn random_seed() -> [u8; KEY_BYTES] {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::getrandom(&mut bytes).expect("the OS random source is available");
    bytes
}

/// A device's secret. Never logged, never written to the queue; zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DeviceKey([u8; KEY_BYTES]);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey(public {})", self.public())
    }
}

impl DeviceKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    pub fn generate() -> Self {
        Self(random_seed())
    }

    /// Parse 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(text: &str) -> Option<Self> {
        from_hex32(text).map(Self)
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        load_seed(
            path,
            "64 hex digits (32 bytes), as `dermedge keygen` writes",
        )
        .map(Self)
    }

    /// Write a new key file readable by its owner only; refuses to overwrite.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        save_secret(path, &format!("{}\n", self.to_hex()))
    }

    fn signing_key(&self) -> SigningKey {
        let mut seed = derive(&self.0, "dermedge device signing v1");
        let key = SigningKey::from_bytes(&seed);
        seed.zeroize();
        key
    }

    /// What the hub stores to recognise this device.
    pub fn public(&self) -> DevicePublic {
        DevicePublic(self.signing_key().verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
        self.signing_key().sign(message).to_bytes()
    }

    /// Seals queue frames on disk (integrity, and the metadata kept next to the sealed record).
    pub fn at_rest_key(&self) -> [u8; 32] {
        derive(&self.0, "dermedge queue at-rest v1")
    }

    /// Stored in the queue so that a wrong key is told apart from corruption.
    pub fn check(&self) -> [u8; 16] {
        let full = derive(&self.0, "dermedge queue key check v1");
        full[..16].try_into().expect("16 of 32 bytes")
    }
}

/// A device's public key: `dermedge-device-public-1 <64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevicePublic(pub [u8; 32]);

impl std::fmt::Display for DevicePublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{DEVICE_PUBLIC_TAG} {}", hex(&self.0))
    }
}

impl std::fmt::Debug for DevicePublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::str::FromStr for DevicePublic {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let expected = || format!("expected `{DEVICE_PUBLIC_TAG} <64 hex digits>`");
        let hex = text
            .trim()
            .strip_prefix(DEVICE_PUBLIC_TAG)
            .ok_or_else(expected)?;
        let bytes = from_hex32(hex).ok_or_else(expected)?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| "not an Ed25519 public key".to_string())?;
        Ok(Self(bytes))
    }
}

impl DevicePublic {
    /// Whether `signature` is this device's over `message` (strict Ed25519 verification).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        verify(&self.0, message, signature)
    }
}

fn verify(public: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let (Ok(key), Ok(signature)) = (
        VerifyingKey::from_bytes(public),
        ed25519_dalek::Signature::from_slice(signature),
    ) else {
        return false;
    };
    key.verify_strict(message, &signature).is_ok()
}

/// The hub's secret: signs its replies and opens the records devices sealed to it. Lives in its
/// own owner-only file on the hub machine, never in the hub's database; zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct HubKey([u8; KEY_BYTES]);

impl std::fmt::Debug for HubKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HubKey({})", self.public())
    }
}

impl HubKey {
    pub fn generate() -> Self {
        Self(random_seed())
    }

    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        load_seed(
            path,
            "64 hex digits (32 bytes), as `dermedge hub init` writes",
        )
        .map(Self)
    }

    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        save_secret(path, &format!("{}\n", hex(&self.0)))
    }

    fn signing_key(&self) -> SigningKey {
        let mut seed = derive(&self.0, "dermedge hub signing v1");
        let key = SigningKey::from_bytes(&seed);
        seed.zeroize();
        key
    }

    fn sealing_key(&self) -> crypto_box::SecretKey {
        let mut seed = derive(&self.0, "dermedge hub record sealing v1");
        let key = crypto_box::SecretKey::from(seed);
        seed.zeroize();
        key
    }

    pub fn public(&self) -> HubPublic {
        HubPublic {
            sign: self.signing_key().verifying_key().to_bytes(),
            seal: *self.sealing_key().public_key().as_bytes(),
        }
    }

    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
        self.signing_key().sign(message).to_bytes()
    }

    /// The plaintext of a box sealed to this hub; `None` if it was not, or was changed.
    pub fn unseal(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        self.sealing_key().unseal(sealed).ok()
    }
}

/// The hub's public keys, pinned on the device at enrollment:
/// `dermedge-hub-public-1 <signing key, 64 hex> <sealing key, 64 hex>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HubPublic {
    /// Ed25519: the hub's signatures on acknowledgements and conflicts.
    pub sign: [u8; 32],
    /// X25519: what records are sealed to.
    pub seal: [u8; 32],
}

impl std::fmt::Display for HubPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{HUB_PUBLIC_TAG} {} {}",
            hex(&self.sign),
            hex(&self.seal)
        )
    }
}

impl std::fmt::Debug for HubPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::str::FromStr for HubPublic {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let expected = || format!("expected `{HUB_PUBLIC_TAG} <64 hex digits> <64 hex digits>`");
        let mut words = text
            .trim()
            .strip_prefix(HUB_PUBLIC_TAG)
            .ok_or_else(expected)?
            .split_whitespace();
        let sign = words.next().and_then(from_hex32).ok_or_else(expected)?;
        let seal = words.next().and_then(from_hex32).ok_or_else(expected)?;
        if words.next().is_some() {
            return Err(expected());
        }
        VerifyingKey::from_bytes(&sign)
            .map_err(|_| "the signing key is not an Ed25519 public key".to_string())?;
        Ok(Self { sign, seal })
    }
}

impl HubPublic {
    /// Read a `hub.pub` file (as `dermedge hub init` writes it).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = fs::read_to_string(path).map_err(io_error(path))?;
        text.parse().map_err(|_| KeyError::BadKeyFile {
            path: path.into(),
            expected: "`dermedge-hub-public-1 <signing key> <sealing key>`, as `dermedge hub init` writes",
        })
    }

    /// Whether `signature` is the hub's over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        verify(&self.sign, message, signature)
    }

    /// Seal `plaintext` to the hub (an anonymous X25519 sealed box, libsodium's format): only the
    /// hub key opens it.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        crypto_box::PublicKey::from(self.seal)
            .seal(&mut OsRng, plaintext)
            .expect("sealing an in-memory buffer cannot fail")
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
        assert_eq!(again.public(), key.public());
        assert_ne!(key.at_rest_key(), key.public().0);
        assert!(DeviceKey::from_hex("abc").is_none());
        assert!(DeviceKey::from_hex(&"zz".repeat(32)).is_none());
        assert!(!format!("{key:?}").contains(&key.to_hex()));
    }

    #[test]
    fn signatures_verify_only_for_their_key_and_message() {
        let key = DeviceKey::generate();
        let sig = key.sign(b"batch");
        assert!(key.public().verify(b"batch", &sig));
        assert!(!key.public().verify(b"batch!", &sig));
        assert!(!DeviceKey::generate().public().verify(b"batch", &sig));
        assert!(!key.public().verify(b"batch", &sig[..63]));
        let hub = HubKey::generate();
        let sig = hub.sign(b"ack");
        assert!(hub.public().verify(b"ack", &sig));
        assert!(!HubKey::generate().public().verify(b"ack", &sig));
    }

    #[test]
    fn only_the_hub_key_opens_what_is_sealed_to_it() {
        let hub = HubKey::generate();
        let sealed = hub.public().seal(b"patient record");
        assert!(!sealed.windows(7).any(|w| w == b"patient"));
        assert_eq!(hub.unseal(&sealed).unwrap(), b"patient record");
        assert!(HubKey::generate().unseal(&sealed).is_none());
        let mut tampered = sealed.clone();
        tampered[40] ^= 1;
        assert!(hub.unseal(&tampered).is_none());
    }

    #[test]
    fn public_keys_print_and_parse() {
        let hub = HubKey::generate().public();
        assert_eq!(hub.to_string().parse::<HubPublic>().unwrap(), hub);
        let device = DeviceKey::generate().public();
        assert_eq!(device.to_string().parse::<DevicePublic>().unwrap(), device);
        assert!("dermedge-hub-public-1 00".parse::<HubPublic>().is_err());
        assert!(device.to_string().parse::<HubPublic>().is_err());
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        let key = DeviceKey::generate();
        key.save_new(&path).unwrap();
        assert!(key.save_new(&path).is_err());
        assert_eq!(DeviceKey::load(&path).unwrap().to_hex(), key.to_hex());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(dir.path().join("bad.key"), "not a key").unwrap();
        let err = DeviceKey::load(&dir.path().join("bad.key"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.key") && err.contains("64 hex"), "{err}");
    }
}
