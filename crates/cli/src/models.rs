//! `dermedge models list|build`: the model registry (models/models.toml) and its build cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use dermedge_core::manifest::file_sha256;
use serde::Deserialize;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// List the registry's models and whether each is built and verified in the cache.
    List,
    /// Build a model (stand-in + export) into .cache/models/<name>/ and verify its checksums.
    Build {
        /// Registry name, e.g. df-mini, lesion-x448, df-r101x3.
        name: String,
    },
}

#[derive(Debug, Deserialize)]
struct Registry {
    models: BTreeMap<String, RegistryModel>,
}

#[derive(Debug, Deserialize)]
struct RegistryModel {
    description: String,
    files: BTreeMap<String, RegistryFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    /// The file's size (the same on every CPU family: only the last bits of weights differ).
    bytes: Option<u64>,
    sha256: Option<RecordedBuilds>,
}

/// `sha256 = "<hex>"` (one recorded build) or `sha256 = { <machine> = "<hex>", ... }` (one per CPU
/// family whose conversions differ in the last bits; models/models.toml says why).
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a sha256 hex digest or a table of machine = sha256 hex digest"
)]
enum RecordedBuilds {
    One(String),
    PerMachine(BTreeMap<String, String>),
}

impl RecordedBuilds {
    fn digests(&self) -> Vec<&str> {
        match self {
            Self::One(d) => vec![d.as_str()],
            Self::PerMachine(builds) => builds.values().map(String::as_str).collect(),
        }
    }

    fn matches(&self, sha: &str) -> bool {
        self.digests().contains(&sha)
    }

    fn describe(&self) -> String {
        match self {
            Self::One(d) => d.clone(),
            Self::PerMachine(builds) => builds
                .iter()
                .map(|(machine, d)| format!("{machine} {d}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// The repository holding models/models.toml: the current directory or one above it.
fn repository_root() -> Result<PathBuf> {
    let start = std::env::current_dir()?;
    start
        .ancestors()
        .find(|d| d.join("models/models.toml").is_file())
        .map(Path::to_path_buf)
        .with_context(|| {
            format!(
                "no models/models.toml in {} or above it; run from the dermedge repository",
                start.display()
            )
        })
}

fn load(root: &Path) -> Result<Registry> {
    let path = root.join("models/models.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let registry: Registry = toml::from_str(&text)
        .with_context(|| format!("{}: not a valid registry", path.display()))?;
    registry
        .check()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(registry)
}

impl Registry {
    /// File names that stay inside the model's cache directory, and digests that are digests.
    fn check(&self) -> std::result::Result<(), String> {
        for (model, spec) in &self.models {
            for (file, recorded) in &spec.files {
                let key = format!("[models.{model}.files] \"{file}\"");
                if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
                    return Err(format!("{key}: expected a file name, not a path"));
                }
                let digests = recorded.sha256.as_ref().map(|r| r.digests());
                if digests.as_ref().is_some_and(Vec::is_empty) {
                    return Err(format!("{key}: sha256 is an empty table"));
                }
                if let Some(bad) = digests.iter().flatten().find(|d| !is_digest(d)) {
                    return Err(format!(
                        "{key}: sha256 {bad:?}: expected 64 lower-case hexadecimal digits"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn is_digest(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Per file: Ok(sha) when present and matching (or not yet recorded), Err(reason) otherwise.
fn verify(
    dir: &Path,
    model: &RegistryModel,
) -> BTreeMap<String, std::result::Result<String, String>> {
    model
        .files
        .iter()
        .map(|(name, spec)| {
            let path = dir.join(name);
            // Only a regular file is hashed: a FIFO or a device there could block or never end.
            let status = match std::fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("not built".to_string()),
                Err(e) => Err(format!("cannot read: {e}")),
                Ok(m) if !m.is_file() => Err("not a regular file".to_string()),
                Ok(m) => match file_sha256(&path) {
                    Err(e) => Err(format!("cannot read: {e}")),
                    // The digest decides; the size names what a mismatch is (a truncated copy,
                    // say) and checks a file that has no digest recorded.
                    Ok(sha) => {
                        let recorded = spec.sha256.as_ref();
                        let matches = recorded.is_some_and(|r| r.matches(&sha));
                        match (spec.bytes, recorded) {
                            (Some(size), _) if size != m.len() && !matches => {
                                Err(format!("{} bytes, registry records {size}", m.len()))
                            }
                            (_, Some(r)) if !matches => {
                                Err(format!("sha256 {sha}, registry records {}", r.describe()))
                            }
                            _ => Ok(sha),
                        }
                    }
                },
            };
            (name.clone(), status)
        })
        .collect()
}

pub fn run(command: &ModelsCommand) -> Result<()> {
    let root = repository_root()?;
    let registry = load(&root)?;
    let cache = root.join(".cache/models");
    match command {
        ModelsCommand::List => {
            for (name, model) in &registry.models {
                let status = verify(&cache.join(name), model);
                let built = status.values().all(|s| s.is_ok());
                println!(
                    "{name:<14} {:<9} {}",
                    if built { "built" } else { "not built" },
                    model.description
                );
                for (file, s) in status {
                    match s {
                        Ok(sha) => println!("    {file}  {sha}"),
                        Err(why) => println!("    {file}  ({why})"),
                    }
                }
            }
            Ok(())
        }
        ModelsCommand::Build { name } => {
            let Some(model) = registry.models.get(name) else {
                bail!(
                    "models/models.toml has no model {name:?}; it lists: {}",
                    registry
                        .models
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            let tool = root.join("models/export/dermedge-export");
            let status = Command::new(&tool)
                .args(["build", name])
                .current_dir(&root)
                .status()
                .with_context(|| format!("cannot run {}", tool.display()))?;
            if !status.success() {
                bail!("{} build {name} failed ({status})", tool.display());
            }
            let dir = cache.join(name);
            for (file, s) in verify(&dir, model) {
                match s {
                    Ok(sha) => println!("verified {}  {sha}", dir.join(&file).display()),
                    Err(why) => bail!("{}: {why}", dir.join(file).display()),
                }
            }
            for file in model.files.keys().filter(|f| f.ends_with(FAITHFUL_SUFFIX)) {
                let manifest = dir.join(file.replace(".tflite", ".toml"));
                record_fidelity(&cache, &dir.join(format!("{name}.fp32.toml")), &manifest)?;
            }
            Ok(())
        }
    }
}

/// The export a registry model ships to devices: `<name>.<precision>-faithful.tflite`.
const FAITHFUL_SUFFIX: &str = "-faithful.tflite";
/// How `dermedge fidelity` names the default gates in a recorded verdict.
const BUILT_IN_GATES: &str = "built-in gates";

/// Judge a faithful export against its fp32 reference on the wide evaluation set and record the
/// verdict in its manifest (`dermedge fidelity --record`), unless a pass is recorded already. A
/// failing verdict fails the build: that export is what devices would be told to ship.
fn record_fidelity(cache: &Path, reference: &Path, candidate: &Path) -> Result<()> {
    let manifest = dermedge_core::ModelManifest::load(candidate)?;
    let images = cache.join("images/evaluation-wide");
    // A pass counts only as this build would record it: the default gates, the wide set.
    if manifest.fidelity.as_ref().is_some_and(|f| {
        f.verdict == dermedge_core::FidelityVerdict::Pass
            && f.gates == BUILT_IN_GATES
            && f.images.ends_with(&images.display().to_string())
    }) {
        println!("{}: fidelity pass already recorded", candidate.display());
        return Ok(());
    }
    let report = candidate.with_extension("fidelity");
    let exe = std::env::current_exe().context("cannot find the running dermedge binary")?;
    let status = Command::new(&exe)
        .arg("fidelity")
        .arg("--reference")
        .arg(reference)
        .arg("--candidate")
        .arg(candidate)
        .arg("--images")
        .arg(&images)
        .arg("--report")
        .arg(&report)
        .arg("--record")
        .status()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(1) => bail!(
            "{}: the faithful export fails the fidelity gates on {} (report in {}); \
             it must not be shipped",
            candidate.display(),
            images.display(),
            report.display()
        ),
        _ => bail!(
            "{}: could not be judged on {} ({status}; the error is above)",
            candidate.display(),
            images.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_parses_and_a_build_matching_any_recorded_machine_verifies() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        assert!(!load(&root).unwrap().models.is_empty());

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.tflite"), b"model").unwrap();
        let sha = dermedge_core::sha256_hex(b"model");
        let other = "0".repeat(64);
        let registry = |files: &str| -> RegistryModel {
            toml::from_str(&format!("description = \"d\"\n[files]\n{files}")).unwrap()
        };
        for files in [
            format!("\"m.tflite\" = {{ sha256 = \"{sha}\" }}"),
            format!("\"m.tflite\" = {{ sha256 = {{ xeon-avx512 = \"{other}\", epyc-avx2 = \"{sha}\" }} }}"),
            "\"m.tflite\" = { bytes = 5 }".to_string(),
        ] {
            let status = verify(dir.path(), &registry(&files));
            assert_eq!(status["m.tflite"], Ok(sha.clone()), "{files}");
        }
        let status = verify(
            dir.path(),
            &registry(&format!(
                "\"m.tflite\" = {{ sha256 = {{ xeon-avx512 = \"{other}\" }} }}\n\"gone.tflite\" = {{ sha256 = \"{sha}\" }}"
            )),
        );
        assert_eq!(
            status["m.tflite"],
            Err(format!(
                "sha256 {sha}, registry records xeon-avx512 {other}"
            ))
        );
        assert_eq!(status["gone.tflite"], Err("not built".to_string()));
        // The size checks a file without a digest and names what a digest mismatch is; the
        // digest decides.
        for files in [
            "\"m.tflite\" = { bytes = 6 }".to_string(),
            format!("\"m.tflite\" = {{ bytes = 6, sha256 = \"{other}\" }}"),
        ] {
            let status = verify(dir.path(), &registry(&files));
            assert_eq!(
                status["m.tflite"],
                Err("5 bytes, registry records 6".to_string()),
                "{files}"
            );
        }
        let files = format!("\"m.tflite\" = {{ bytes = 6, sha256 = \"{sha}\" }}");
        assert_eq!(
            verify(dir.path(), &registry(&files))["m.tflite"],
            Ok(sha.clone())
        );
        std::fs::create_dir(dir.path().join("dir.tflite")).unwrap();
        let status = verify(dir.path(), &registry("\"dir.tflite\" = { bytes = 5 }"));
        assert_eq!(status["dir.tflite"], Err("not a regular file".to_string()));
    }

    #[test]
    fn a_registry_with_a_bad_digest_or_file_name_is_refused_naming_the_entry() {
        let digest = "a".repeat(64);
        let check = |files: &str| -> String {
            let text = format!("[models.m]\ndescription = \"d\"\n[models.m.files]\n{files}");
            match toml::from_str::<Registry>(&text) {
                Err(e) => e.to_string(),
                Ok(registry) => registry.check().unwrap_err(),
            }
        };
        for (files, expected) in [
            (
                format!("\"m.tflite\" = {{ sha256 = \"{}\" }}", "A".repeat(64)),
                "[models.m.files] \"m.tflite\": sha256 \"AAAA",
            ),
            (
                "\"m.tflite\" = { sha256 = \"\" }".to_string(),
                "expected 64 lower-case hexadecimal digits",
            ),
            (
                "\"m.tflite\" = { sha256 = {} }".to_string(),
                "sha256 is an empty table",
            ),
            (
                format!("\"../m.tflite\" = {{ sha256 = \"{digest}\" }}"),
                "expected a file name, not a path",
            ),
            (
                "\"m.tflite\" = { sha256 = 7 }".to_string(),
                "a sha256 hex digest or a table of machine = sha256 hex digest",
            ),
            (
                format!("\"m.tflite\" = {{ sha265 = \"{digest}\" }}"),
                "unknown field `sha265`",
            ),
            (
                "\"m.tflite\" = { bytes = -5 }".to_string(),
                "invalid value: integer `-5`",
            ),
        ] {
            let message = check(&files);
            assert!(message.contains(expected), "{files}: {message}");
        }
        let good = format!("[models.m]\ndescription = \"d\"\n[models.m.files]\n\"m.tflite\" = {{ sha256 = {{ x = \"{digest}\" }} }}");
        toml::from_str::<Registry>(&good).unwrap().check().unwrap();
    }
}
