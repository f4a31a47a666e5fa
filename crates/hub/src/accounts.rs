//! Clinicians' accounts and sessions for the web page: Argon2id password hashes (PHC strings),
//! random session tokens kept only as their SHA-256 in the database, the per-session CSRF token
//! derived from the session token, and constant-time comparisons.
//!
//! A session token is 256 random bits (64 hex digits) in an `HttpOnly; SameSite=Strict` cookie;
//! the database holds `SHA-256("dermedge-session\0" || token)`, so a copy of it opens no session.
//! The CSRF token embedded in the page's forms is `SHA-256("dermedge-csrf\0" || token)`: it
//! cannot be computed without the cookie, and it needs no column of its own.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::HubError;

/// The shortest password an account may have, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// The longest password accepted, in bytes (hashing is bounded work).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// The longest account name, in characters.
pub const MAX_USER_NAME_CHARS: usize = 64;

/// Whether `name` can name an account: 1 to [`MAX_USER_NAME_CHARS`] characters, none of them a
/// control character or white space at either end.
pub fn check_user_name(name: &str) -> Result<(), HubError> {
    let n = name.chars().count();
    if n == 0
        || n > MAX_USER_NAME_CHARS
        || name.chars().any(char::is_control)
        || name.trim() != name
    {
        return Err(HubError::BadRequest(format!(
            "user name {name:?}: expected 1 to {MAX_USER_NAME_CHARS} printable characters, \
             without leading or trailing spaces"
        )));
    }
    Ok(())
}

/// Whether `password` may be set: at least [`MIN_PASSWORD_CHARS`] characters, at most
/// [`MAX_PASSWORD_BYTES`] bytes.
pub fn check_password(password: &str) -> Result<(), HubError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(HubError::BadRequest(format!(
            "the password is too short: at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(HubError::BadRequest(format!(
            "the password is too long: at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// `password` hashed with Argon2id (the crate's defaults: 19 MiB, 2 passes, 1 lane) and a random
/// salt, as a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
pub fn hash_password(password: &str) -> Result<String, HubError> {
    check_password(password)?;
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt)
        .map_err(|e| HubError::Crypto(format!("no random numbers for a salt: {e}")))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| HubError::Crypto(format!("salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HubError::Crypto(format!("cannot hash the password: {e}")))
}

/// Whether `password` matches the PHC string `hash` (a malformed hash matches nothing).
pub fn verify_password(hash: &str, password: &str) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(e) => {
            log::error!("hub: a stored password hash is malformed: {e}");
            false
        }
    }
}

/// Spend the time of one verification on a name that has no account, so that a wrong name
/// answers as slowly as a wrong password.
pub fn verify_nobody(password: &str) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let hash = DUMMY.get_or_init(|| {
        hash_password("a password that no account has").expect("a valid password hashes")
    });
    let _ = verify_password(hash, password);
}

/// A new session token: 256 random bits as 64 lowercase hex digits.
pub fn new_token() -> Result<String, HubError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| HubError::Crypto(format!("no random numbers for a token: {e}")))?;
    Ok(hex(&bytes))
}

/// Whether `token` has the form [`new_token`] gives (anything else is not looked up).
pub fn is_token(token: &str) -> bool {
    token.len() == 64
        && token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What the database keeps of a session token.
pub fn token_hash(token: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"dermedge-session\0");
    h.update(token.as_bytes());
    h.finalize().to_vec()
}

/// The CSRF token of the session whose token is `token`.
pub fn csrf_token(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"dermedge-csrf\0");
    h.update(token.as_bytes());
    hex(&h.finalize())
}

/// `a == b` in time that depends on their lengths only.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_to_argon2id_phc_strings_and_verify() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        assert!(verify_password(&hash, "correct horse battery"));
        assert!(!verify_password(&hash, "correct horse batterY"));
        assert!(!verify_password("not a hash", "correct horse battery"));
        // A new salt each time.
        assert_ne!(hash, hash_password("correct horse battery").unwrap());
    }

    #[test]
    fn short_long_and_odd_inputs_are_refused() {
        assert!(hash_password("short").is_err());
        assert!(check_password(&"x".repeat(MAX_PASSWORD_BYTES + 1)).is_err());
        assert!(check_password(&"é".repeat(MIN_PASSWORD_CHARS)).is_ok());
        assert!(check_user_name("dr.jones").is_ok());
        for bad in ["", " jones", "jo\nnes", &"x".repeat(65)] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_random_hex_and_their_hashes_differ_from_the_csrf_token() {
        let a = new_token().unwrap();
        assert!(is_token(&a), "{a}");
        assert_ne!(a, new_token().unwrap());
        assert!(!is_token(&a.to_uppercase()));
        assert!(!is_token(&a[1..]));
        assert_eq!(token_hash(&a).len(), 32);
        assert_ne!(hex(&token_hash(&a)), csrf_token(&a));
        assert_eq!(csrf_token(&a), csrf_token(&a));
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
