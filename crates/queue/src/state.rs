//! The queue's recovery point: the highest durable sequence number and the hub's acknowledged
//! cursor, in a fixed file of two alternating slots 4 KiB apart (a torn sector or flash page
//! cannot take both), overwritten in place.
//!
//! ```text
//! slot = "DMQS" | crc32 of the rest | generation: u64 | acked: u64 | durable: u64 (little-endian)
//! ```
//!
//! Each update writes the slot the current one is not in and syncs it, so a write torn by a power
//! cut leaves the other slot whole; the valid slot with the higher generation wins. Overwriting
//! allocated blocks needs no free space, so the cursor can advance (and segments be freed) on a
//! full disk.

use std::io;

use crate::storage::StorageFile;

pub const SLOT_LEN: usize = 32;
/// The second slot starts a page away from the first: a write torn at sector or flash-page
/// granularity cannot damage both.
pub const SLOT_STRIDE: usize = 4096;
pub const FILE_LEN: usize = SLOT_STRIDE + SLOT_LEN;
const MAGIC: &[u8; 4] = b"DMQS";
/// Far beyond any number of updates a device makes.
const MAX_GENERATION: u64 = 1 << 62;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecoveryPoint {
    pub generation: u64,
    /// The hub holds every record through this sequence number.
    pub acked: u64,
    /// Every record through this sequence number was synced to disk (the high-water mark).
    pub durable: u64,
}

impl RecoveryPoint {
    pub fn encode(&self) -> [u8; SLOT_LEN] {
        let mut slot = [0u8; SLOT_LEN];
        slot[..4].copy_from_slice(MAGIC);
        slot[8..16].copy_from_slice(&self.generation.to_le_bytes());
        slot[16..24].copy_from_slice(&self.acked.to_le_bytes());
        slot[24..32].copy_from_slice(&self.durable.to_le_bytes());
        let crc = crc32fast::hash(&slot[8..]);
        slot[4..8].copy_from_slice(&crc.to_le_bytes());
        slot
    }

    pub fn decode(slot: &[u8]) -> Option<Self> {
        if slot.len() != SLOT_LEN || &slot[..4] != MAGIC {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(slot[4..8].try_into().expect("4 bytes"))
            != crc32fast::hash(&slot[8..])
        {
            return None;
        }
        let point = Self {
            generation: word(8),
            acked: word(16),
            durable: word(24),
        };
        // A slot that passes its CRC but cannot have been written (a forged or corrupted file)
        // counts as unreadable: no later arithmetic on it can overflow.
        let sane = point.generation < MAX_GENERATION
            && point.acked <= point.durable
            && point.durable <= crate::segment::MAX_SEQ;
        sane.then_some(point)
    }

    /// The newest valid slot of a state file's bytes; `None` when neither slot is valid.
    pub fn newest(bytes: &[u8]) -> Option<Self> {
        [0, SLOT_STRIDE]
            .iter()
            .filter_map(|&at| bytes.get(at..at + SLOT_LEN))
            .filter_map(Self::decode)
            .max_by_key(|p| p.generation)
    }

    /// The whole file for a fresh queue: both slots, so that either may be overwritten next.
    pub fn initial_file(&self) -> Vec<u8> {
        let mut file = vec![0u8; FILE_LEN];
        file[..SLOT_LEN].copy_from_slice(&self.encode());
        let older = Self {
            generation: self.generation.saturating_sub(1),
            ..*self
        };
        file[SLOT_STRIDE..].copy_from_slice(&older.encode());
        file
    }

    /// Write the next point (the following generation) into the slot the current one is not in.
    ///
    /// On failure the new slot may still be in the page cache, where a reopen would read it,
    /// though it may never reach the disk: the current point is written over it (with the new
    /// generation), so that the disk and the cache agree on the old one.
    pub fn store(
        &mut self,
        file: &mut dyn StorageFile,
        acked: u64,
        durable: u64,
    ) -> io::Result<()> {
        let generation = self.generation + 1;
        let next = Self {
            generation,
            acked,
            durable,
        };
        let offset = (generation % 2) * SLOT_STRIDE as u64;
        let write = |file: &mut dyn StorageFile, point: &Self| {
            file.write_all_at(&point.encode(), offset)
                .and_then(|()| file.sync_data())
        };
        match write(file, &next) {
            Ok(()) => {
                *self = next;
                Ok(())
            }
            Err(e) => {
                let back = Self {
                    generation,
                    ..*self
                };
                if write(file, &back).is_ok() {
                    *self = back;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_slot_is_ignored() {
        let a = RecoveryPoint {
            generation: 7,
            acked: 3,
            durable: 9,
        };
        let b = RecoveryPoint {
            generation: 8,
            acked: 4,
            durable: 11,
        };
        let mut file = vec![0u8; FILE_LEN];
        file[..SLOT_LEN].copy_from_slice(&b.encode());
        file[SLOT_STRIDE..].copy_from_slice(&a.encode());
        assert_eq!(RecoveryPoint::newest(&file), Some(b));
        file[20] ^= 1;
        assert_eq!(RecoveryPoint::newest(&file), Some(a));
        file[SLOT_STRIDE + 3] = 0;
        assert_eq!(RecoveryPoint::newest(&file), None);
        assert_eq!(RecoveryPoint::newest(&[]), None);
    }

    #[test]
    fn impossible_slots_are_unreadable() {
        let ok = RecoveryPoint {
            generation: 3,
            acked: 2,
            durable: 5,
        };
        assert!(RecoveryPoint::decode(&ok.encode()).is_some());
        for bad in [
            RecoveryPoint {
                generation: u64::MAX,
                ..ok
            },
            RecoveryPoint { acked: 6, ..ok },
            RecoveryPoint {
                acked: u64::MAX,
                durable: u64::MAX,
                ..ok
            },
        ] {
            assert_eq!(RecoveryPoint::decode(&bad.encode()), None, "{bad:?}");
        }
    }

    #[test]
    fn a_fresh_file_holds_two_valid_slots() {
        let p = RecoveryPoint {
            generation: 1,
            acked: 0,
            durable: 5,
        };
        let file = p.initial_file();
        assert_eq!(RecoveryPoint::newest(&file), Some(p));
        assert!(RecoveryPoint::decode(&file[SLOT_STRIDE..]).is_some());
    }
}
