//! Helpers shared by the end-to-end tests: the `dermedge` binary, the fixtures, golden files.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// The `dermedge` binary of this build profile, built on first use if `cargo test` has not.
pub fn dermedge_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps/..");
        let bin = profile_dir.join("dermedge");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut build = Command::new(env!("CARGO"));
        build.current_dir(root()).args([
            "build",
            "--quiet",
            "-p",
            "dermedge-cli",
            "--bin",
            "dermedge",
        ]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building dermedge failed");
        bin
    })
    .clone()
}

/// Run `dermedge` with `args`; returns its output.
pub fn dermedge(args: &[&str]) -> Output {
    Command::new(dermedge_bin())
        .args(args)
        .current_dir(root())
        .output()
        .expect("run dermedge")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// golden.df-mini.npy: the TensorFlow graph's fp32 embeddings of the fixture images, in
/// reference/index.json order.
pub fn golden() -> Vec<Vec<f32>> {
    let npy = std::fs::read(fixtures().join("reference/golden.df-mini.npy")).expect("golden file");
    let header_len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    npy[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect::<Vec<_>>()
        .chunks(6144)
        .map(<[f32]>::to_vec)
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A float32 C-order `.npy` file as rows of `dim` values.
pub fn read_npy_rows(path: &Path) -> Vec<Vec<f32>> {
    let npy = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (shape, values) =
        dermedge_core::npy::read_f32(&npy).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dim = *shape.last().expect("shape");
    values.chunks(dim.max(1)).map(<[f32]>::to_vec).collect()
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
