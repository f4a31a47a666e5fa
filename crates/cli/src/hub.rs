//! `dermedge hub enroll|serve|export`: the clinic hub.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Subcommand;
use dermedge_hub::export::{export, ExportFilter};
use dermedge_hub::server::HubServer;
use dermedge_hub::store::Store;
use dermedge_queue::DeviceKey;

#[derive(Subcommand)]
pub enum HubCommand {
    /// Register a device (or replace its key) so that the hub accepts its batches.
    Enroll {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        device_id: String,
        /// The device's key file.
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Receive batches over HTTP until SIGINT/SIGTERM.
    Serve {
        /// The SQLite database (created if missing).
        #[arg(long)]
        db: PathBuf,
        /// host:port to listen on (port 0: any free port, printed on start).
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: String,
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
    /// Write the stored records as CSV and their embeddings as .npy (+ .npy.json index).
    Export {
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        csv: Option<PathBuf>,
        #[arg(long)]
        npy: Option<PathBuf>,
        /// Only this device's records.
        #[arg(long)]
        device: Option<String>,
        /// Only this model's records (needed for .npy when several models are stored).
        #[arg(long)]
        model: Option<String>,
    },
}

pub fn run(command: &HubCommand) -> Result<()> {
    match command {
        HubCommand::Enroll {
            db,
            device_id,
            key_file,
        } => {
            let key = DeviceKey::load(key_file)?;
            Store::open(db)?.enroll(device_id, &key)?;
            println!("enrolled {device_id} in {}", db.display());
        }
        HubCommand::Serve {
            db,
            listen,
            workers,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, stop.clone())?;
            }
            let server = HubServer::start(db, listen, *workers)?;
            println!("listening on http://{}", server.addr());
            std::io::stdout().flush()?;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            eprintln!("hub: shutting down");
            server.shutdown();
        }
        HubCommand::Export {
            db,
            csv,
            npy,
            device,
            model,
        } => {
            if csv.is_none() && npy.is_none() {
                bail!("nothing to write: give --csv and/or --npy");
            }
            if !db.is_file() {
                bail!("{}: no hub database here", db.display());
            }
            let store = Store::open(db)?;
            let filter = ExportFilter {
                device_id: device.clone(),
                model_id: model.clone(),
            };
            let out = export(&store, &filter, csv.as_deref(), npy.as_deref())?;
            println!(
                "exported {} records{}",
                out.rows,
                out.dim
                    .map_or(String::new(), |d| format!(" ({d}-d embeddings)"))
            );
        }
    }
    Ok(())
}
