//! Running the `dermedge` binary cargo built for this test target (`CARGO_BIN_EXE_dermedge`):
//! included as `mod binary;` by the end-to-end tests of `dermedge-cli` that live in `tests/`.
#![allow(dead_code)] // each test target uses its own subset

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dermedge_e2e::{fixtures, root, text};

/// The binary under test, built by cargo before the tests run.
pub fn dermedge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dermedge"))
}

/// Run `dermedge` with `args` in the repository root; returns its output.
pub fn dermedge(args: &[&str]) -> Output {
    Command::new(dermedge_bin())
        .args(args)
        .current_dir(root())
        .output()
        .expect("run dermedge")
}

/// A `dermedge hub serve` process on a free port.
pub struct HubProcess {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl HubProcess {
    /// A hub on `db`, holding the hub key in `key` (`HubKey::save_new` or `dermedge hub init`).
    pub fn start(db: &Path, key: &Path) -> Self {
        let mut child = Command::new(dermedge_bin())
            .args([
                "hub",
                "serve",
                "--db",
                db.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("hub printed {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ok(args: &[&str]) {
    let out = dermedge(args);
    assert!(
        out.status.success(),
        "dermedge {args:?}: {}",
        text(&out.stderr)
    );
}

/// The image-kind head (dermoscopy patch or photo) that scripts/run.sh trains: the fixture images
/// embedded with df-mini int8 into `dir/training.npy`, labelled by file name, trained into
/// `dir/image-kind.json` (returned).
pub fn train_image_kind_head(dir: &Path) -> PathBuf {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let npy = dir.join("training.npy");
    ok(&[
        "embed",
        "--model",
        &s(&fixtures().join("df-mini/df-mini.int8.toml")),
        "--threads",
        "2",
        &s(&fixtures().join("images")),
        "--out",
        &s(&npy),
    ]);
    let mut labels = String::from("file,label\n");
    for entry in std::fs::read_dir(fixtures().join("images")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let label = if name.starts_with("dermoscopy") {
            "dermoscopy"
        } else {
            "photo"
        };
        labels += &format!("{name},{label}\n");
    }
    std::fs::write(dir.join("labels.csv"), labels).unwrap();
    let head = dir.join("image-kind.json");
    ok(&[
        "head",
        "train",
        "--embeddings",
        &s(&npy),
        "--labels",
        &s(&dir.join("labels.csv")),
        "--out",
        &s(&head),
    ]);
    head
}
