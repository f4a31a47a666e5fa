//! `dermedge run --config` (the device application) and `dermedge config check`.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use dermedge_core::{FidelityVerdict, ModelManifest, Precision};
use dermedge_device::config::LoadedConfig;
use dermedge_engine::{EngineError, EngineOptions};

use crate::queue::load_heads;

/// How the configuration's `[model]` section asks for the model to be run.
fn engine_options(config: &LoadedConfig) -> EngineOptions {
    let m = &config.config.model;
    EngineOptions {
        backend: m.backend,
        threads: m.threads.map(dermedge_core::Ranged::get_u32),
        accelerator: m.accelerator,
        fallback: m.fallback,
        runtime_path: m.runtime.clone(),
        allow_unpinned_runtime: false,
        weight_cache: m.weight_cache.clone(),
        cpu_arithmetic: m.cpu_arithmetic,
    }
}

/// The configuration key an engine option error is about.
fn config_key(e: &EngineError) -> &'static str {
    match e {
        EngineError::AcceleratorNotOffered { .. } => "model.accelerator",
        EngineError::InvalidOption {
            field: "cpu_arithmetic",
            ..
        } => "model.cpu_arithmetic",
        EngineError::InvalidOption { .. } => "model.threads",
        _ => "model.backend",
    }
}

/// Whether this build can run `config`: the backend compiled in, an accelerator that backend
/// reaches, a development hub only where one is built in.
fn buildable(config: &LoadedConfig) -> Result<EngineOptions> {
    let path = config.path.display();
    let options = engine_options(config);
    if let Err(e) = dermedge_engine::check_options(&options) {
        anyhow::bail!("{path}: {}: {e}", config_key(&e));
    }
    if config.config.sync.local_hub.is_some() && !dermedge_device::dev_hub::BUILT {
        anyhow::bail!("{path}: {}", dermedge_device::dev_hub::NOT_BUILT);
    }
    Ok(options)
}

pub fn check(path: &Path) -> Result<()> {
    let config = LoadedConfig::load(path)?;
    let c = &config.config;
    // What this build can run: the backend compiled in, an accelerator that backend reaches.
    if let Err(e) = dermedge_engine::check_options(&engine_options(&config)) {
        anyhow::bail!("{}: {}: {e}", path.display(), config_key(&e));
    }
    if c.sync.local_hub.is_some() && !dermedge_device::dev_hub::BUILT {
        anyhow::bail!(
            "{}: {}",
            path.display(),
            dermedge_device::dev_hub::NOT_BUILT
        );
    }
    // The model and heads must load and agree, not just exist.
    let manifest = ModelManifest::load(&c.model.manifest)?;
    fidelity_warning(path, &manifest, true);
    if c.model.cpu_arithmetic == dermedge_engine::CpuArithmetic::Fp16 {
        // No manifest verdict covers it (`fidelity --record` refuses fp16), and records carry the
        // model's id and precision only: the hub cannot tell these embeddings from fp32's.
        eprintln!(
            "warning: {}: model.cpu_arithmetic = \"fp16\": embeddings differ from the file's fp32 \
             ones and records do not say so; judge it on this device first \
             (dermedge fidelity --candidate-cpu-arithmetic fp16) and train heads on embeddings \
             made the same way",
            path.display()
        );
    }
    for head in load_heads(&c.heads)? {
        head.check_model(&manifest.model.id, manifest.model.embedding_dim)?;
    }
    if !c.device.key_file.exists() && !c.device.create_key {
        eprintln!(
            "warning: {}: device.key_file {} does not exist yet; provision it before `dermedge run`",
            path.display(),
            c.device.key_file.display()
        );
    }
    println!(
        "{}: ok — device {}, model {} {} ({} on {}), {} head(s), camera {:?}, trigger {:?}, display {:?} {}x{}, queue {}, sync {}",
        path.display(),
        c.device.id,
        manifest.model.id,
        manifest.model.precision.as_str(),
        c.model.backend,
        c.model.accelerator,
        c.heads.len(),
        c.camera.source,
        c.capture.trigger,
        c.display.target,
        config.display_size.0,
        config.display_size.1,
        c.queue.dir.display(),
        if c.sync.enabled {
            c.sync.hub.clone().unwrap_or_else(|| "local hub".into())
        } else {
            "off".into()
        }
    );
    Ok(())
}

/// A warning when the configured export failed the fidelity suite, or was never judged while
/// being quantised (its embeddings may not be the reference model's).
fn fidelity_warning(path: &Path, manifest: &ModelManifest, unjudged_warning: bool) {
    let model = manifest.path.display();
    match &manifest.fidelity {
        Some(record) if record.verdict == FidelityVerdict::Fail => {
            let failed: Vec<String> = record
                .values
                .iter()
                .filter(|(_, g)| !g.pass)
                .map(|(name, g)| format!("{name} {:.4}", g.value))
                .collect();
            eprintln!(
                "warning: {}: model.manifest {model} FAILED the fidelity gates against {} ({}): \
                 its embeddings are not faithful to the reference; ship a passing export",
                path.display(),
                record.reference,
                failed.join(", ")
            );
        }
        Some(_) => {}
        None if unjudged_warning && manifest.model.precision != Precision::Fp32 => eprintln!(
            "warning: {}: model.manifest {model} ({}) has no recorded fidelity verdict \
             (dermedge fidelity --record)",
            path.display(),
            manifest.model.precision.as_str()
        ),
        None => {}
    }
}

pub fn run(path: &Path) -> Result<bool> {
    let config = LoadedConfig::load(path)?;
    let c = &config.config;
    let options = buildable(&config)?;
    let manifest = ModelManifest::load(&c.model.manifest)?;
    // The device warns only on a recorded failure; `config check` also on a missing verdict.
    fidelity_warning(path, &manifest, false);
    let heads = load_heads(&c.heads)?;
    let embedder =
        crate::load(&manifest, &options).map_err(|e| match e.downcast_ref::<EngineError>() {
            // Named as the configuration key it comes from, as `config check` names it.
            Some(engine @ EngineError::InvalidOption { .. }) => {
                anyhow::anyhow!("{}: {}: {engine}", path.display(), config_key(engine))
            }
            _ => e,
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let summary = dermedge_device::run::run(&config, embedder, heads, stop)?;
    println!(
        "{}: {} frames, {} accepted, {} refused by the quality gate, {} failed; queue: {} waiting, acknowledged through {}; synced {} records{} ({}, {:.1} s)",
        summary.device_id,
        summary.frames,
        summary.accepted,
        summary.refused,
        summary.failed,
        summary.queue.pending_records,
        summary.queue.acked_seq,
        summary.synced_records,
        summary.hub.as_deref().map(|h| format!(" to {h}")).unwrap_or_default(),
        summary.stopped_by,
        summary.seconds
    );
    if let Some(e) = &summary.last_sync_error {
        eprintln!("warning: last sync attempt failed: {e}");
    }
    Ok(summary.failed == 0)
}
