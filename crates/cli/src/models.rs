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
struct RegistryFile {
    sha256: Option<String>,
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
    toml::from_str(&text).with_context(|| format!("{}: not a valid registry", path.display()))
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
            let status = match file_sha256(&path) {
                Err(_) => Err("not built".to_string()),
                Ok(sha) => match &spec.sha256 {
                    Some(expected) if *expected != sha => {
                        Err(format!("sha256 {sha}, registry says {expected}"))
                    }
                    _ => Ok(sha),
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
            Ok(())
        }
    }
}
