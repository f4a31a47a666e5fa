//! The XNNPACK weight cache, checked for bit rot without hashing the model on every start.
//!
//! On a warm start XNNPACK maps its packed weights from the cache instead of the model file, so
//! the cache is what must be intact. Once LiteRT has written it, a CRC-32 of the whole file is
//! recorded next to it (`<cache>.crc32`). Each later start reads the cache through once
//! (CRC-32 runs at memory speed, well below the sha256 the model's manifest pins) and compares:
//! a mismatch, or a cache without its record (a crash while it was written, or an earlier
//! release), removes the cache so LiteRT packs the weights afresh from the verified model.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What [`prepare`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheState {
    /// Checked: LiteRT will map it.
    Intact,
    /// None there (or removed): LiteRT will write one, to be sealed with [`seal`].
    ToBuild,
}

fn record_path(cache: &Path) -> PathBuf {
    let mut path = cache.as_os_str().to_owned();
    path.push(".crc32");
    PathBuf::from(path)
}

/// CRC-32 and length of a file, read in large chunks. (Not mapped: another process rebuilding
/// the cache could truncate it under a mapping, which would kill this one with SIGBUS; a read
/// only sees a mismatch.)
fn checksum(path: &Path) -> std::io::Result<(u32, u64)> {
    let mut file = fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 8 << 20];
    let mut length = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        length += n as u64;
    }
    Ok((hasher.finalize(), length))
}

fn record_text(crc: u32, length: u64) -> String {
    format!("crc32={crc:08x} bytes={length}\n")
}

fn remove(cache: &Path, why: &str) {
    log::warn!(
        "{}: {why}; removing it, the weights are packed again from the verified model",
        cache.display()
    );
    for path in [cache.to_path_buf(), record_path(cache)] {
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("{}: cannot remove: {e}", path.display());
            }
        }
    }
}

/// Check the cache before LiteRT maps it; remove it when it is not provably intact.
pub(crate) fn prepare(cache: &Path) -> CacheState {
    if !cache.exists() {
        return CacheState::ToBuild;
    }
    let Ok(recorded) = fs::read_to_string(record_path(cache)) else {
        remove(cache, "weight cache without its checksum record");
        return CacheState::ToBuild;
    };
    match checksum(cache) {
        Ok((crc, length)) if record_text(crc, length) == recorded => {
            log::debug!("{}: weight cache checksum verified", cache.display());
            CacheState::Intact
        }
        Ok((crc, length)) => {
            remove(
                cache,
                &format!(
                    "weight cache damaged: {} expected, {} found",
                    recorded.trim(),
                    record_text(crc, length).trim()
                ),
            );
            CacheState::ToBuild
        }
        Err(e) => {
            remove(cache, &format!("weight cache unreadable ({e})"));
            CacheState::ToBuild
        }
    }
}

/// Record the checksum of a cache LiteRT has just written (atomically: a torn record reads as
/// a mismatch, which only costs one rebuild).
pub(crate) fn seal(cache: &Path) {
    let record = record_path(cache);
    let result = checksum(cache).and_then(|(crc, length)| {
        let mut temporary = record.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        fs::write(&temporary, record_text(crc, length))?;
        fs::rename(&temporary, &record)
    });
    match result {
        Ok(()) => log::debug!("{}: weight cache sealed", cache.display()),
        // Without the record the next start rebuilds the cache: slower, never wrong.
        Err(e) => log::warn!(
            "{}: cannot record the weight cache's checksum: {e}",
            cache.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_cache_is_used_and_any_flipped_bit_or_missing_record_rebuilds_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("model.xnnpack_cache");
        assert_eq!(prepare(&cache), CacheState::ToBuild);

        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&cache, &bytes).unwrap();
        assert_eq!(
            prepare(&cache),
            CacheState::ToBuild,
            "no record: not trusted"
        );
        assert!(!cache.exists(), "an unrecorded cache is removed");

        fs::write(&cache, &bytes).unwrap();
        seal(&cache);
        assert_eq!(prepare(&cache), CacheState::Intact);
        assert_eq!(
            prepare(&cache),
            CacheState::Intact,
            "checking changes nothing"
        );

        for offset in [0, 1234, bytes.len() - 1] {
            let mut rotten = bytes.clone();
            rotten[offset] ^= 0x10;
            fs::write(&cache, &rotten).unwrap();
            fs::write(record_path(&cache), {
                let (crc, len) = (crc32fast::hash(&bytes), bytes.len() as u64);
                record_text(crc, len)
            })
            .unwrap();
            assert_eq!(prepare(&cache), CacheState::ToBuild, "bit {offset}");
            assert!(!cache.exists() && !record_path(&cache).exists());
        }

        // A truncated cache is damage too.
        fs::write(&cache, &bytes[..1000]).unwrap();
        fs::write(
            record_path(&cache),
            record_text(crc32fast::hash(&bytes), bytes.len() as u64),
        )
        .unwrap();
        assert_eq!(prepare(&cache), CacheState::ToBuild);
    }
}
