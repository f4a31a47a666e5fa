//! A model of a disk behind a page cache, for crash tests (SQLite's crash VFS is the pattern).
//!
//! Every file has the bytes a reader sees and the bytes on stable storage; every directory has
//! the entries a reader sees and the durable entries. A file's writes become durable at
//! `sync_data`, a directory's creates, renames and removals at `sync_dir`. At a simulated power
//! cut ([`SimDisk::power_cut`]) each unsynced write independently reaches the disk, is lost, or is
//! torn (only a prefix lands); unsynced directory changes land as an ordered prefix (a metadata
//! journal). Faults: the n-th I/O call fails with ENOSPC or EIO ([`SimDisk::fail_call`]); a
//! failed `sync_data` reports once and forgets what it did not write (fsyncgate); a capacity makes
//! writes that grow the disk fail with ENOSPC.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::storage::{Entry, LockGuard, Open, Storage, StorageFile};

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

/// A deterministic xorshift generator: a failing case replays from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<Change>,
}

fn apply(data: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write { offset, bytes } => {
            let end = *offset as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*offset as usize..end].copy_from_slice(bytes);
        }
        Change::SetLen(len) => data.resize(*len as usize, 0),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

#[derive(Debug, Clone)]
enum DirChange {
    Link(PathBuf, Node),
    Unlink(PathBuf),
}

#[derive(Debug, Default)]
struct State {
    inodes: BTreeMap<u64, Inode>,
    next_inode: u64,
    /// What readers see: every path (files and directories) under the root.
    current: BTreeMap<PathBuf, Node>,
    durable: BTreeMap<PathBuf, Node>,
    /// Unsynced entry changes, per directory, in order.
    unsynced_dirs: BTreeMap<PathBuf, Vec<DirChange>>,
    locks: BTreeSet<PathBuf>,
    calls: u64,
    fail_at: Option<(u64, i32)>,
    capacity: Option<u64>,
}

impl State {
    /// Count an I/O call; the errno of the fault set for it, if any.
    fn take_fault(&mut self) -> Option<i32> {
        self.calls += 1;
        match self.fail_at {
            Some((n, errno)) if n == self.calls => {
                self.fail_at = None;
                Some(errno)
            }
            _ => None,
        }
    }

    fn count_call(&mut self) -> io::Result<()> {
        match self.take_fault() {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    fn used(&self) -> u64 {
        self.inodes.values().map(|i| i.current.len() as u64).sum()
    }

    fn file(&self, path: &Path) -> io::Result<u64> {
        match self.current.get(path) {
            Some(Node::File(ino)) => Ok(*ino),
            Some(Node::Dir) => Err(io::Error::other(format!(
                "{}: is a directory",
                path.display()
            ))),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn parent_exists(&self, path: &Path) -> io::Result<PathBuf> {
        let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        if parent == Path::new("/") || self.current.get(&parent) == Some(&Node::Dir) {
            Ok(parent)
        } else {
            Err(io::Error::from(io::ErrorKind::NotFound))
        }
    }

    fn link(&mut self, path: &Path, node: Node) -> io::Result<()> {
        let parent = self.parent_exists(path)?;
        self.current.insert(path.to_path_buf(), node);
        self.unsynced_dirs
            .entry(parent)
            .or_default()
            .push(DirChange::Link(path.to_path_buf(), node));
        Ok(())
    }

    fn unlink(&mut self, path: &Path) {
        let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        self.current.remove(path);
        self.unsynced_dirs
            .entry(parent)
            .or_default()
            .push(DirChange::Unlink(path.to_path_buf()));
    }

    fn new_inode(&mut self) -> u64 {
        self.next_inode += 1;
        self.inodes.insert(self.next_inode, Inode::default());
        self.next_inode
    }
}

/// The simulated disk; clones share it.
#[derive(Debug, Clone, Default)]
pub struct SimDisk(Arc<Mutex<State>>);

impl SimDisk {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("sim disk lock")
    }

    /// Make the `n`-th I/O call from now (1 = the next) fail with ENOSPC (`no_space`) or EIO.
    pub fn fail_call(&self, n: u64, no_space: bool) {
        let mut s = self.state();
        s.fail_at = Some((s.calls + n, if no_space { ENOSPC } else { EIO }));
    }

    /// Whether a fault set by [`SimDisk::fail_call`] has yet to fire.
    pub fn fault_pending(&self) -> bool {
        self.state().fail_at.is_some()
    }

    pub fn clear_fault(&self) {
        self.state().fail_at = None;
    }

    /// Writes that would grow the disk beyond its current use plus `headroom` fail with ENOSPC;
    /// `None` lifts the limit.
    pub fn fill(&self, headroom: Option<u64>) {
        let mut s = self.state();
        s.capacity = headroom.map(|h| s.used() + h);
    }

    /// Power fails: unsynced writes land, vanish or tear, unsynced entries land as an ordered
    /// prefix per directory; then the machine boots with what the disk holds. Locks are released.
    pub fn power_cut(&self, rng: &mut Rng) {
        let mut s = self.state();
        let dirs: Vec<PathBuf> = s.unsynced_dirs.keys().cloned().collect();
        for dir in dirs {
            let changes = s.unsynced_dirs.remove(&dir).unwrap_or_default();
            let keep = rng.below(changes.len() as u64 + 1) as usize;
            for change in &changes[..keep] {
                match change {
                    DirChange::Link(path, node) => {
                        s.durable.insert(path.clone(), *node);
                    }
                    DirChange::Unlink(path) => {
                        s.durable.remove(path);
                    }
                }
            }
        }
        // A durable entry under a directory whose own entry did not survive is unreachable.
        let durable = s.durable.clone();
        s.durable.retain(|path, _| {
            path.ancestors()
                .skip(1)
                .take_while(|a| *a != Path::new("/") && !a.as_os_str().is_empty())
                .all(|a| durable.get(a) == Some(&Node::Dir))
        });
        for inode in s.inodes.values_mut() {
            for change in std::mem::take(&mut inode.unsynced) {
                match rng.below(3) {
                    0 => {}
                    1 => apply(&mut inode.durable, &change),
                    _ => {
                        let torn = match change {
                            Change::Write { offset, bytes } => {
                                let keep = rng.below(bytes.len() as u64 + 1) as usize;
                                Change::Write {
                                    offset,
                                    bytes: bytes[..keep].to_vec(),
                                }
                            }
                            other => other,
                        };
                        apply(&mut inode.durable, &torn);
                    }
                }
            }
            inode.current = inode.durable.clone();
        }
        s.current = s.durable.clone();
        let live: BTreeSet<u64> = s
            .current
            .values()
            .filter_map(|n| match n {
                Node::File(i) => Some(*i),
                Node::Dir => None,
            })
            .collect();
        s.inodes.retain(|i, _| live.contains(i));
        s.locks.clear();
        s.fail_at = None;
    }

    /// Change bytes on stable storage and in the cache alike (bit rot, a careless copy).
    pub fn corrupt(&self, path: &Path, offset: u64, xor: u8) -> bool {
        let mut s = self.state();
        let Ok(ino) = s.file(path) else { return false };
        let inode = s.inodes.get_mut(&ino).expect("inode");
        let at = offset as usize;
        if at >= inode.current.len() {
            return false;
        }
        inode.current[at] ^= xor;
        if at < inode.durable.len() {
            inode.durable[at] ^= xor;
        }
        true
    }

    /// Remove a file from the cache and the disk alike (an operator's `rm`).
    pub fn delete(&self, path: &Path) {
        let mut s = self.state();
        s.current.remove(path);
        s.durable.remove(path);
    }

    /// Paths of the files directly in `dir`.
    pub fn files_in(&self, dir: &Path) -> Vec<PathBuf> {
        self.state()
            .current
            .iter()
            .filter(|(p, n)| p.parent() == Some(dir) && matches!(n, Node::File(_)))
            .map(|(p, _)| p.clone())
            .collect()
    }
}

struct SimFile {
    disk: SimDisk,
    path: PathBuf,
    inode: u64,
}

impl Storage for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.count_call()?;
        let mut missing: Vec<&Path> = dir
            .ancestors()
            .take_while(|a| *a != Path::new("/") && !a.as_os_str().is_empty())
            .filter(|a| !s.current.contains_key(*a))
            .collect();
        missing.reverse();
        for a in missing {
            s.link(a, Node::Dir)?;
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<Entry>> {
        let s = self.state();
        if s.current.get(dir) != Some(&Node::Dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(s.current
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, n)| Entry {
                name: p.file_name().unwrap().to_string_lossy().into_owned(),
                is_dir: *n == Node::Dir,
            })
            .collect())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut s = self.state();
        s.count_call()?;
        let ino = s.file(path)?;
        Ok(s.inodes[&ino].current.clone())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.state().current.contains_key(path))
    }

    fn open(&self, path: &Path, how: Open) -> io::Result<Box<dyn StorageFile>> {
        let mut s = self.state();
        s.count_call()?;
        let inode = match (s.file(path), how) {
            (Ok(_), Open::CreateNew) => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
            (Ok(ino), Open::Truncate) => {
                let inode = s.inodes.get_mut(&ino).expect("inode");
                inode.current.clear();
                inode.unsynced.push(Change::SetLen(0));
                ino
            }
            (Ok(ino), Open::Existing) => ino,
            (Err(e), Open::Existing) => return Err(e),
            (Err(e), _) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            (Err(_), _) => {
                let ino = s.new_inode();
                s.link(path, Node::File(ino))?;
                ino
            }
        };
        Ok(Box::new(SimFile {
            disk: self.clone(),
            path: path.to_path_buf(),
            inode,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.count_call()?;
        let ino = s.file(from)?;
        s.unlink(from);
        s.link(to, Node::File(ino))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.count_call()?;
        s.file(path)?;
        s.unlink(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.count_call()?;
        if s.current.get(dir) != Some(&Node::Dir) && dir != Path::new("/") {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        for change in s.unsynced_dirs.remove(dir).unwrap_or_default() {
            match change {
                DirChange::Link(path, node) => {
                    s.durable.insert(path, node);
                }
                DirChange::Unlink(path) => {
                    s.durable.remove(&path);
                }
            }
        }
        Ok(())
    }

    fn lock(&self, path: &Path) -> io::Result<Option<LockGuard>> {
        let mut s = self.state();
        s.count_call()?;
        if !s.locks.insert(path.to_path_buf()) {
            return Ok(None);
        }
        if s.file(path).is_err() {
            let ino = s.new_inode();
            s.link(path, Node::File(ino))?;
        }
        Ok(Some(Box::new(SimLock {
            disk: self.clone(),
            path: path.to_path_buf(),
        })))
    }
}

struct SimLock {
    disk: SimDisk,
    path: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.disk.state().locks.remove(&self.path);
    }
}

impl SimFile {
    /// The inode, unless the file was lost to a power cut since it was opened.
    fn with<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.disk.state();
        s.count_call()?;
        if !s.inodes.contains_key(&self.inode) {
            return Err(io::Error::other(format!(
                "{}: stale handle",
                self.path.display()
            )));
        }
        f(&mut s, self.inode)
    }
}

impl StorageFile for SimFile {
    fn size(&self) -> io::Result<u64> {
        self.with(|s, ino| Ok(s.inodes[&ino].current.len() as u64))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|s, ino| {
            let data = &s.inodes[&ino].current;
            let end = offset as usize + buf.len();
            if end > data.len() {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            buf.copy_from_slice(&data[offset as usize..end]);
            Ok(())
        })
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let disk = self.disk.clone();
        let mut s = disk.state();
        let injected = s.take_fault();
        if !s.inodes.contains_key(&self.inode) {
            return Err(io::Error::other("stale handle"));
        }
        let len = s.inodes[&self.inode].current.len() as u64;
        let growth = (offset + buf.len() as u64).saturating_sub(len);
        let over = s.capacity.is_some_and(|c| s.used() + growth > c);
        // A failing write may have written part of the buffer (a short write, then the error).
        let keep = match (injected, over) {
            (Some(_), _) | (None, true) => (s.calls % (buf.len() as u64 + 1)) as usize,
            (None, false) => buf.len(),
        };
        let keep = if over {
            // Never beyond the capacity.
            let room =
                s.capacity.unwrap_or(0).saturating_sub(s.used()) + (len.saturating_sub(offset));
            keep.min(room as usize)
        } else {
            keep
        };
        let change = Change::Write {
            offset,
            bytes: buf[..keep].to_vec(),
        };
        let inode = s.inodes.get_mut(&self.inode).expect("inode");
        apply(&mut inode.current, &change);
        inode.unsynced.push(change);
        match (injected, over) {
            (Some(errno), _) => Err(io::Error::from_raw_os_error(errno)),
            (None, true) => Err(io::Error::from_raw_os_error(ENOSPC)),
            (None, false) => Ok(()),
        }
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.with(|s, ino| {
            let inode = s.inodes.get_mut(&ino).expect("inode");
            let change = Change::SetLen(len);
            apply(&mut inode.current, &change);
            inode.unsynced.push(change);
            Ok(())
        })
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let disk = self.disk.clone();
        let mut s = disk.state();
        let injected = s.take_fault();
        let Some(inode) = s.inodes.get_mut(&self.inode) else {
            return Err(io::Error::other("stale handle"));
        };
        let changes = std::mem::take(&mut inode.unsynced);
        match injected {
            None => {
                for c in &changes {
                    apply(&mut inode.durable, c);
                }
                Ok(())
            }
            Some(errno) => {
                // The writeback failed part-way; the cache marks the pages clean anyway, so the
                // lost writes are forgotten and a later sync reports success (fsyncgate).
                let keep = changes.len() / 2;
                for c in &changes[..keep] {
                    apply(&mut inode.durable, c);
                }
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }
}
