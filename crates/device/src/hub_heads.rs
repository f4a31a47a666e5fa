//! Heads the hub published, kept on the device as the signed publications they came as
//! (`<queue dir>-heads/<name>.head`, beside the queue rather than in it, so that an older firmware
//! still opens the queue) and checked again at every start: signed by the pinned hub key, bound
//! to the running model, well formed. One that fails is refused with a log line and the head the
//! device had is kept.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use dermedge_head::LinearHead;
use dermedge_record::HubPublic;
use dermedge_sync::wire::{HeadQuery, HeldHead};
use dermedge_sync::{check_head, FetchedHead};

const SUFFIX: &str = "head";

/// Where the heads of the queue in `queue_dir` are kept: `<queue dir>-heads`.
pub fn heads_dir(queue_dir: &Path) -> PathBuf {
    let mut name = queue_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "queue".into());
    name.push("-heads");
    queue_dir.with_file_name(name)
}

pub struct HubHeads {
    dir: PathBuf,
    hub: HubPublic,
}

impl HubHeads {
    pub fn new(queue_dir: &Path, hub: HubPublic) -> Self {
        Self {
            dir: heads_dir(queue_dir),
            hub,
        }
    }

    /// The published heads kept on the device that pass every check for `model_id` at `dim`,
    /// by name. A file that fails is named in a log line and left where it is.
    pub fn load(&self, model_id: &str, dim: usize) -> Vec<LinearHead> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                log::error!("{}: cannot list published heads: {e}", self.dir.display());
                return Vec::new();
            }
        };
        let query = HeadQuery {
            model_id: model_id.into(),
            embedding_dim: dim as u64,
            have: Vec::new(),
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == SUFFIX))
            .collect();
        paths.sort();
        let mut heads = Vec::new();
        for path in paths {
            let checked = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|blob| check_head(&self.hub, &query, &blob));
            match checked {
                Ok(head) if path.file_stem().is_some_and(|s| *s == *head.name) => {
                    log::info!("head {} (published by the hub) loaded", head.label());
                    heads.push(head);
                }
                Ok(head) => log::error!(
                    "{}: holds head {:?}, not the head its name says; refused",
                    path.display(),
                    head.name
                ),
                Err(why) => log::error!("{}: published head refused: {why}", path.display()),
            }
        }
        heads
    }

    /// Keep a fetched head, replacing the one of its name: written aside, synced, renamed over
    /// the old one, and the directory synced, so a power cut leaves the old head or the new.
    pub fn save(&self, fetched: &FetchedHead) -> std::io::Result<PathBuf> {
        dermedge_head::check_name(&fetched.head.name)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        if !self.dir.is_dir() {
            fs::create_dir_all(&self.dir)?;
            if let Some(parent) = self.dir.parent() {
                fs::File::open(parent)?.sync_all()?;
            }
        }
        let path = self.dir.join(format!("{}.{SUFFIX}", fetched.head.name));
        let tmp = self.dir.join(format!("{}.{SUFFIX}.tmp", fetched.head.name));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&fetched.signed)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }
}

/// What the device asks the hub for: heads for its model newer than the ones it runs.
pub fn query(model_id: &str, dim: usize, running: &[LinearHead]) -> HeadQuery {
    HeadQuery {
        model_id: model_id.into(),
        embedding_dim: dim as u64,
        have: running
            .iter()
            .map(|h| HeldHead {
                name: h.name.clone(),
                version: h.version.unwrap_or(0),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dermedge_head::{HeadKind, FORMAT};
    use dermedge_record::HubKey;
    use dermedge_sync::wire::seal_head;

    fn head(name: &str, model: &str, version: u64) -> LinearHead {
        LinearHead {
            format: FORMAT.into(),
            name: name.into(),
            model_id: model.into(),
            embedding_dim: 2,
            kind: HeadKind::Softmax,
            classes: vec!["a".into(), "b".into()],
            l2_normalize: false,
            input_mean: Vec::new(),
            input_scale: 1.0,
            weights: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
            bias: vec![0.0, 0.0],
            version: Some(version),
        }
    }

    fn fetched(hub: &HubKey, h: LinearHead) -> FetchedHead {
        FetchedHead {
            signed: seal_head(hub, &h),
            head: h,
        }
    }

    #[test]
    fn saved_heads_load_again_and_bad_ones_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let queue = tmp.path().join("queue");
        let hub = HubKey::generate();
        let heads = HubHeads::new(&queue, hub.public());
        assert!(heads.load("m", 2).is_empty(), "no directory yet");
        heads
            .save(&fetched(&hub, head("diagnosis", "m", 1)))
            .unwrap();
        heads
            .save(&fetched(&hub, head("diagnosis", "m", 2)))
            .unwrap();
        let loaded = heads.load("m", 2);
        assert_eq!(loaded.len(), 1);
        assert_eq!(
            loaded[0].version,
            Some(2),
            "the newer one replaced the older"
        );
        // Another model's run refuses it.
        assert!(heads.load("other", 2).is_empty());
        assert!(heads.load("m", 3).is_empty());
        // A head signed by another key, a flipped byte, a file named for another head.
        let stranger = HubKey::generate();
        heads
            .save(&fetched(&stranger, head("site", "m", 1)))
            .unwrap();
        let path = heads.save(&fetched(&hub, head("quality", "m", 1))).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        let good = heads.save(&fetched(&hub, head("body", "m", 1))).unwrap();
        assert_eq!(good.parent().unwrap(), tmp.path().join("queue-heads"));
        fs::copy(&good, good.with_file_name("renamed.head")).unwrap();
        let names: Vec<String> = heads.load("m", 2).into_iter().map(|h| h.name).collect();
        assert_eq!(names, ["body", "diagnosis"]);
    }

    #[test]
    fn the_query_names_what_runs() {
        let mut local = head("site", "m", 0);
        local.version = None;
        let q = query("m", 2, &[local, head("diagnosis", "m", 4)]);
        assert_eq!(q.have[0].version, 0);
        assert_eq!(q.have[1].version, 4);
    }
}
