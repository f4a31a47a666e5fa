//! This process's memory as Linux reports it under `/proc/self`: for benchmarks and the tests
//! that check what stays resident. Elsewhere the functions report nothing (0, empty).

use std::collections::BTreeMap;

/// Peak resident set size (`VmHWM`), bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resident bytes by what is mapped (`/proc/self/smaps`): a file's path, `[heap]`, `[stack]`, or
/// `[anon]` for anonymous mappings.
pub fn resident_by_mapping() -> BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/self/smaps")
        .map(|smaps| parse_smaps(&smaps))
        .unwrap_or_default()
}

fn parse_smaps(smaps: &str) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    let mut current = String::from("[anon]");
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = fields.first() else {
            continue;
        };
        if is_mapping_header(first) {
            // address perms offset dev inode [path, which may hold spaces]
            current = if fields.len() > 5 {
                fields[5..].join(" ")
            } else {
                "[anon]".to_string()
            };
        } else if *first == "Rss:" {
            let kb: u64 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            *by.entry(current.clone()).or_default() += kb * 1024;
        }
    }
    by
}

/// `start-end` in hexadecimal: the first field of a mapping's header line.
fn is_mapping_header(field: &str) -> bool {
    field.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty() && !b.is_empty() && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_bytes_are_summed_per_mapping_and_paths_keep_their_spaces() {
        let smaps = "\
55d0c0a00000-55d0c0c00000 r--p 00000000 fd:01 1234 /opt/my models/m.tflite
Size:               2048 kB
Rss:                1024 kB
7f00a000-7f00b000 rw-p 00000000 00:00 0
Rss:                   8 kB
55d0c0c00000-55d0c0e00000 r--p 00200000 fd:01 1234 /opt/my models/m.tflite
Rss:                 512 kB
VmFlags: rd mr mw me
7f00c000-7f00d000 rw-p 00000000 00:00 0 [heap]
Rss:                  16 kB
";
        let by = parse_smaps(smaps);
        assert_eq!(by["/opt/my models/m.tflite"], 1536 * 1024);
        assert_eq!(by["[anon]"], 8 * 1024);
        assert_eq!(by["[heap]"], 16 * 1024);
        assert_eq!(by.len(), 3);
    }

    #[test]
    fn this_process_reports_what_it_touched() {
        let touched = vec![1u8; 32 << 20];
        assert_eq!(touched.iter().step_by(4096).count(), 8192);
        let total: u64 = resident_by_mapping().values().sum();
        assert!(total >= 32 << 20, "{total}");
        assert!(peak_rss_bytes() >= 32 << 20);
    }

    #[test]
    fn only_address_ranges_start_a_mapping() {
        assert!(is_mapping_header("7f00a000-7f00b000"));
        assert!(!is_mapping_header("Rss:"));
        assert!(!is_mapping_header("-"));
        assert!(!is_mapping_header("VmFlags:"));
    }
}
