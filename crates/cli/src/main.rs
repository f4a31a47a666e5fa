//! `dermedge`: the device-side command line. The only crate that picks runtime features, reads
//! configuration and sets up logging; everything it does is built from the library crates.

#[cfg(feature = "tools")]
mod bench;
#[cfg(feature = "tools")]
mod bench_hub;
mod device;
mod embed;
#[cfg(feature = "tools")]
mod embeddings_file;
#[cfg(feature = "tools")]
mod fidelity;
#[cfg(feature = "tools")]
mod head;
#[cfg(feature = "hub")]
mod hub;
mod inputs;
#[cfg(feature = "tools")]
mod models;
mod output;
mod queue;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use dermedge_core::{Embedder, ModelManifest};
use dermedge_engine::{Accelerator, Backend, CpuArithmetic, EngineOptions, Fallback, LoadedModel};

#[derive(Parser)]
#[command(
    name = "dermedge",
    version,
    about = "Derm Foundation embeddings on the device, offline"
)]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed image files (or every image in directories) with a model.
    Embed(embed::EmbedArgs),
    #[cfg(feature = "tools")]
    /// Compare a candidate model's embeddings with a reference model's; gates and report.
    Fidelity(fidelity::FidelityArgs),
    /// Model files: inspect.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Report the TFLite runtime found, its version and the accelerators it offers.
    Doctor(RuntimeArgs),
    /// List cameras (USB dermatoscopes) with their formats, resolutions and frame rates.
    Devices,
    /// Judge image files with the image-quality gate (exposure, sharpness, colour cast).
    Quality {
        /// Image files or directories.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// The device application: camera, quality gate, model, heads, screen, queue and sync, as
    /// a firmware config describes them. SIGINT/SIGTERM stop it after the record in hand.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Device configuration files (firmware-config/*.toml).
    #[command(subcommand)]
    Config(ConfigCommand),
    #[cfg(feature = "tools")]
    /// Measure this device: embedding per stage, queue appends, sync throughput (Markdown for
    /// docs/BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Make a new device key (32 random bytes, owner-only file).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// The device's record queue: add images through the pipeline, inspect.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Push the queue's records to the hub until none wait.
    Sync(queue::SyncArgs),
    #[cfg(feature = "hub")]
    /// The clinic hub: enroll devices, receive batches, export.
    #[command(subcommand)]
    Hub(hub::HubCommand),
    #[cfg(feature = "tools")]
    /// Linear heads on embeddings: train, evaluate, predict.
    #[command(subcommand)]
    Head(head::HeadCommand),
    #[cfg(feature = "tools")]
    /// The model registry (models/models.toml): list and build models into .cache/models/.
    #[command(subcommand)]
    Models(models::ModelsCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration: every key, range and file, and that the model and heads agree.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Print a model's manifest, verify its checksum and show its tensors.
    Info {
        /// The model's manifest (.toml next to the .tflite).
        manifest: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The default backend: LiteRT where it is built in, else the classic API.
fn built_backend() -> Backend {
    if cfg!(feature = "litert") {
        Backend::Litert
    } else {
        Backend::Classic
    }
}

/// Options shared by every command that runs a model.
#[derive(Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// Runtime backend: litert (CPU, GPU, NPU) or classic (CPU, Edge TPU; cargo feature
    /// `classic`).
    #[arg(long, default_value_t = built_backend())]
    backend: Backend,
    /// Inference threads (default: every core).
    #[arg(long)]
    threads: Option<u32>,
    /// Accelerator: cpu, gpu, npu or edge-tpu. Unavailable ones fall back to CPU with a warning.
    #[arg(long, default_value = "cpu")]
    accelerator: Accelerator,
    /// Fail instead of falling back to CPU when the accelerator is unavailable.
    #[arg(long)]
    require_accelerator: bool,
    /// The LiteRT runtime library (file or directory) to use instead of the search path.
    #[arg(long, value_name = "PATH")]
    runtime: Option<PathBuf>,
    /// Accept a runtime library whose checksum is not the pinned one.
    #[arg(long)]
    allow_unpinned_runtime: bool,
    /// XNNPACK weight cache file: written on the first start, mapped on later ones (faster start).
    #[arg(long, value_name = "FILE")]
    weight_cache: Option<PathBuf>,
    /// Arithmetic of float ops on the CPU: fp32, or fp16 (XNNPACK's float16 arithmetic, native
    /// on Cortex-A76/A78AE and AVX512-FP16; where XNNPACK cannot run it, falls back to fp32 with
    /// a warning, or fails with --require-accelerator).
    #[arg(long, default_value = "fp32")]
    cpu_arithmetic: CpuArithmetic,
}

impl RuntimeArgs {
    /// Load `manifest`'s model with the chosen backend.
    pub fn load(&self, manifest: &ModelManifest) -> Result<Box<dyn LoadedModel>> {
        load(manifest, &self.engine_options())
    }

    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            backend: self.backend,
            threads: self.threads,
            accelerator: self.accelerator,
            fallback: if self.require_accelerator {
                Fallback::Fail
            } else {
                Fallback::Cpu
            },
            runtime_path: self.runtime.clone(),
            allow_unpinned_runtime: self.allow_unpinned_runtime,
            weight_cache: self.weight_cache.clone(),
            cpu_arithmetic: self.cpu_arithmetic,
        }
    }
}

/// Load `manifest`'s model as `options` say, with the model's path in the error.
pub fn load(manifest: &ModelManifest, options: &EngineOptions) -> Result<Box<dyn LoadedModel>> {
    dermedge_engine::load(manifest, options)
        .with_context(|| format!("loading model {}", manifest.model_path().display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        // The device loop's health lines and captures are its normal output; LiteRT's own
        // lines (target `litert`) only when -v asks for them.
        0 if matches!(cli.command, Command::Run { .. }) => "info,litert=warn",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
    let result = match cli.command {
        Command::Embed(args) => embed::run(&args),
        #[cfg(feature = "tools")]
        Command::Fidelity(args) => fidelity::run(&args),
        Command::Model(ModelCommand::Info {
            manifest,
            runtime,
            json,
        }) => model_info(&manifest, &runtime, json).map(|_| true),
        Command::Doctor(runtime) => doctor(&runtime).map(|_| true),
        Command::Run { config } => device::run(&config),
        Command::Config(ConfigCommand::Check { file }) => device::check(&file).map(|_| true),
        #[cfg(feature = "tools")]
        Command::Bench(command) => bench::run(&command).map(|_| true),
        Command::Keygen { out } => queue::keygen(&out).map(|_| true),
        Command::Queue(command) => queue::run(&command),
        Command::Sync(args) => queue::sync(&args).map(|_| true),
        #[cfg(feature = "hub")]
        Command::Hub(command) => hub::run(&command).map(|_| true),
        #[cfg(feature = "tools")]
        Command::Head(command) => head::run(&command).map(|_| true),
        #[cfg(feature = "tools")]
        Command::Models(command) => models::run(&command).map(|_| true),
        Command::Devices => devices().map(|_| true),
        Command::Quality { inputs } => quality(&inputs),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn model_info(manifest_path: &std::path::Path, runtime: &RuntimeArgs, json: bool) -> Result<()> {
    let manifest = ModelManifest::load(manifest_path)?;
    let embedder = runtime.load(&manifest)?;
    let size = std::fs::metadata(manifest.model_path())
        .map(|m| m.len())
        .unwrap_or(0);
    if json {
        let value = serde_json::json!({
            "manifest": manifest_path,
            "model": manifest.model,
            "input": manifest.input,
            "output": manifest.output,
            "provenance": manifest.provenance,
            "file_bytes": size,
            "sha256_verified": true,
            "signature": embedder.signature_key(),
            "input_tensor": embedder.input_details(),
            "output_tensor": embedder.output_details(),
            "runtime": embedder.runtime_description(),
            "accelerator": embedder.accelerator().name(),
            "threads": embedder.threads(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let m = &manifest.model;
    let i = &manifest.input;
    println!("manifest      {}", manifest_path.display());
    println!(
        "model         {} v{} ({})",
        m.id,
        m.version,
        m.precision.as_str()
    );
    println!(
        "file          {} ({size} bytes, sha256 {} verified)",
        manifest.model_path().display(),
        m.sha256
    );
    println!(
        "embedding     {} values from output `{}`",
        m.embedding_dim, manifest.output.name
    );
    println!(
        "preprocessing {}×{} {:?} {:?}, {:?} resize, value = pixel × {} + {}",
        i.width, i.height, i.layout, i.color_order, i.resize_filter, i.scale, i.offset
    );
    println!("signature     {}", embedder.signature_key());
    println!("input tensor  {}", embedder.input_details());
    println!("output tensor {}", embedder.output_details());
    println!(
        "runtime       {} ({} on {} threads)",
        embedder.runtime_description(),
        embedder.accelerator(),
        embedder.threads()
    );
    for (k, v) in &manifest.provenance {
        println!("provenance    {k}: {v}");
    }
    Ok(())
}

fn devices() -> Result<()> {
    let devices = dermedge_camera::list_devices()?;
    if devices.is_empty() {
        println!(
            "no cameras found (no V4L2 video devices on this machine{})",
            if cfg!(feature = "uvc") {
                ""
            } else {
                "; built without the `uvc` feature"
            }
        );
        return Ok(());
    }
    for d in devices {
        println!("{}  {}  {}", d.index, d.name, d.description);
        for (format, w, h, fps) in d.formats {
            println!("    {format:<6} {w}×{h} @ {fps} fps");
        }
    }
    Ok(())
}

fn quality(inputs: &[PathBuf]) -> Result<bool> {
    let gate = dermedge_core::QualityThresholds::default();
    let mut all_ok = true;
    for file in inputs::expand(inputs)? {
        match dermedge_core::preprocess::decode_file(&file, &dermedge_core::DecodeLimits::default())
        {
            Ok(image) => {
                let v = gate.judge(&image);
                let m = v.measures;
                let verdict = if v.accepted {
                    "accepted".to_string()
                } else {
                    v.issues
                        .iter()
                        .map(|i| i.message())
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                println!(
                    "{}	mean {:.0}  dark {:.2}  bright {:.2}  sharpness {:.1}  cast {:.1}	{verdict}",
                    file.display(),
                    m.mean_luminance,
                    m.clipped_dark,
                    m.clipped_bright,
                    m.sharpness,
                    m.colour_cast
                );
            }
            Err(e) => {
                eprintln!("error: {e}");
                all_ok = false;
            }
        }
    }
    Ok(all_ok)
}

fn doctor(runtime: &RuntimeArgs) -> Result<()> {
    litert_doctor(runtime)?;
    classic_doctor();
    Ok(())
}

#[cfg(not(feature = "litert"))]
fn litert_doctor(_runtime: &RuntimeArgs) -> Result<()> {
    println!("litert       not built in (cargo feature `litert`)");
    Ok(())
}

#[cfg(feature = "litert")]
fn litert_doctor(runtime: &RuntimeArgs) -> Result<()> {
    use dermedge_engine::litert::LiteRtRuntime;
    let options = runtime.engine_options();
    let (candidates, _) = LiteRtRuntime::candidates(&options);
    println!("LiteRT search path:");
    for c in &candidates {
        println!(
            "  {} {}",
            if c.is_file() { "found  " } else { "missing" },
            c.display()
        );
    }
    let rt = LiteRtRuntime::locate(&options)?;
    let report = rt.report()?;
    println!("runtime      LiteRT {} ({})", report.version, report.target);
    println!("library      {}", report.path.display());
    println!(
        "sha256       {} ({})",
        report.sha256,
        if report.pinned {
            "pinned"
        } else {
            "NOT the pinned build"
        }
    );
    println!("accelerators registered by the runtime:");
    for a in &report.accelerators {
        println!(
            "  {:<20} v{:<8} hardware: {}",
            a.name,
            a.version,
            a.hardware.join(", ")
        );
    }
    let offered: Vec<&str> = report
        .accelerators
        .iter()
        .flat_map(|a| a.hardware.iter().copied())
        .collect();
    for wanted in [Accelerator::Gpu, Accelerator::Npu, Accelerator::EdgeTpu] {
        if !offered.contains(&wanted.name()) {
            println!(
                "  {:<20} not available here (requests fall back to CPU)",
                wanted.name()
            );
        }
    }
    Ok(())
}

#[cfg(feature = "classic")]
fn classic_doctor() {
    use dermedge_engine::classic::{edgetpu::EdgeTpuRuntime, runtime_version};
    println!(
        "classic      TensorFlow Lite {} (libtensorflowlite_c, linked)",
        runtime_version()
    );
    match EdgeTpuRuntime::load(None) {
        Ok(tpu) => {
            let devices = tpu.devices();
            println!("edge-tpu     {} ({})", tpu.path(), tpu.version());
            if devices.is_empty() {
                println!("  no Edge TPU device found (requests fall back to CPU)");
            }
            for d in devices {
                println!("  device     {} {}", d.kind, d.path);
            }
        }
        Err(e) => println!("edge-tpu     unavailable: {e}"),
    }
}

#[cfg(not(feature = "classic"))]
fn classic_doctor() {
    println!("classic      not built in (cargo feature `classic`): no Edge TPU path");
}
