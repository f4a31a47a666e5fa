//! The journal of sequence numbers the queue lost, and why: `gaps.log`, one JSON object a line,
//! each line synced before the loss it describes happens (eviction) or as soon as it is found
//! (damage, a missing segment). The sync client sends it to the hub, so that no loss is silent.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::storage::{Open, Storage};

/// Why a range of sequence numbers will never reach the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GapReason {
    /// Deleted to make room under [`crate::FullPolicy::EvictOldest`].
    Evicted,
    /// Durable once, found damaged on disk (kept in `quarantine/`).
    Damaged,
    /// Durable once, no longer on disk at all (a segment file vanished).
    Missing,
}

impl std::fmt::Display for GapReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Evicted => "evicted",
            Self::Damaged => "damaged",
            Self::Missing => "missing",
        })
    }
}

/// Records `from..=to` are lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    pub reason: GapReason,
    /// When the device found or caused the loss (device clock).
    pub at_ms: i64,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.from == self.to {
            write!(f, "record {} {}", self.from, self.reason)
        } else {
            write!(f, "records {}..={} {}", self.from, self.to, self.reason)
        }
    }
}

impl Gap {
    pub fn covers(&self, seq: u64) -> bool {
        (self.from..=self.to).contains(&seq)
    }
}

/// The gaps in a journal's bytes. A line cut short by a power cut, or damaged, is skipped
/// (logged): the loss it described is found again by the next recovery, or was an eviction whose
/// segment removal had not happened yet.
pub fn parse(bytes: &[u8], path: &Path) -> Vec<Gap> {
    let mut gaps = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        // A hole a power cut left (zeros) is not part of any line.
        let line = &line[line.iter().take_while(|&&b| b == 0).count()..];
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Gap>(line) {
            Ok(gap) if gap.from <= gap.to && gap.from > 0 => gaps.push(gap),
            _ => log::warn!(
                "{}: line {} is not a gap record; ignored",
                path.display(),
                i + 1
            ),
        }
    }
    gaps
}

/// Append `gaps` to the journal at `path` and sync it (and, when it is new, its directory).
pub fn append(storage: &dyn Storage, path: &Path, gaps: &[Gap]) -> io::Result<()> {
    if gaps.is_empty() {
        return Ok(());
    }
    let (mut file, created) = match storage.open(path, Open::Existing) {
        Ok(f) => (f, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            (storage.open(path, Open::CreateNew)?, true)
        }
        Err(e) => return Err(e),
    };
    let len = file.size()?;
    let mut text = Vec::new();
    if len > 0 {
        let mut last = [0u8];
        file.read_exact_at(&mut last, len - 1)?;
        if last[0] != b'\n' {
            text.push(b'\n');
        }
    }
    for gap in gaps {
        serde_json::to_writer(&mut text, gap).map_err(io::Error::other)?;
        text.push(b'\n');
    }
    if let Err(e) = file
        .write_all_at(&text, len)
        .and_then(|()| file.sync_data())
    {
        // Cut the unsaved lines back, so that a retry writes where they were and a page the
        // cache dropped cannot leave a hole in front of the retried line.
        let _ = file.set_len(len);
        return Err(e);
    }
    if created {
        if let Some(dir) = path.parent() {
            storage.sync_dir(dir)?;
        }
    }
    Ok(())
}

/// The ranges of `from..=to` not covered by `present` (sorted) or by `known` gaps.
pub fn uncovered(from: u64, to: u64, present: &[u64], known: &[Gap]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut covered: Vec<(u64, u64)> = present.iter().map(|&s| (s, s)).collect();
    covered.extend(known.iter().map(|g| (g.from, g.to)));
    covered.sort_unstable();
    let mut next = from;
    for (a, b) in covered {
        if next > to {
            break;
        }
        if b < next {
            continue;
        }
        if a > next {
            out.push((next, (a - 1).min(to)));
        }
        next = next.max(b.saturating_add(1));
    }
    if next <= to {
        out.push((next, to));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncovered_ranges_are_exact() {
        let known = [Gap {
            from: 10,
            to: 12,
            reason: GapReason::Evicted,
            at_ms: 0,
        }];
        assert_eq!(
            uncovered(1, 15, &[1, 2, 5, 6, 13], &known),
            [(3, 4), (7, 9), (14, 15)]
        );
        assert_eq!(uncovered(1, 3, &[1, 2, 3], &[]), []);
        assert_eq!(uncovered(4, 3, &[], &[]), []);
        assert_eq!(uncovered(1, 2, &[], &[]), [(1, 2)]);
    }

    #[test]
    fn a_torn_or_foreign_line_is_skipped() {
        let text =
            b"{\"from\":3,\"to\":4,\"reason\":\"damaged\",\"at_ms\":1}\nnot json\n{\"from\":9,\"to";
        let gaps = parse(text, Path::new("gaps.log"));
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].to_string(), "records 3..=4 damaged");
    }
}
