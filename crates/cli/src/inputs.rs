//! Expanding the command line's files and directories into the list of images to process.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// File extensions picked up when a directory is given.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"];

/// Files named explicitly are kept as given (a bad one is reported when decoded); directories
/// are searched recursively for image extensions, in sorted order.
pub fn expand(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta =
            fs::metadata(input).with_context(|| format!("{}: cannot read", input.display()))?;
        if meta.is_dir() {
            let before = files.len();
            walk(input, &mut files)?;
            if files.len() == before {
                log::warn!(
                    "{}: no images ({}) found",
                    input.display(),
                    IMAGE_EXTENSIONS.join(", ")
                );
            }
        } else {
            files.push(input.clone());
        }
    }
    if files.is_empty() {
        bail!(
            "no images to embed in {}",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}
