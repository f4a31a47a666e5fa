//! `dermedge hub init|enroll|revoke|serve|export|user|head`: the clinic hub.
//!
//! `--db` is an SQLite file (one clinic, created if missing) or a PostgreSQL connection URL,
//! `postgres://user:password@host:port/database` (a health system's regional hub; several hubs
//! may serve one database). A URL's password is never printed.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use dermedge_hub::accounts::MIN_PASSWORD_CHARS;
use dermedge_hub::export::{export, gaps_csv_path, ExportFilter};
use dermedge_hub::server::{HubServer, Limits};
use dermedge_hub::store::{Enrolled, Location, Store};
use dermedge_hub::tls::TlsFiles;
use dermedge_record::{DevicePublic, HubKey};

#[derive(Subcommand)]
pub enum HubCommand {
    /// Create the hub key (owner-only file, never overwritten) and print its public line, which
    /// every device pins at enrollment.
    Init {
        /// Where to write the hub's secret key.
        #[arg(long)]
        key: PathBuf,
        /// Also write the public line to this file (for the devices).
        #[arg(long)]
        public: Option<PathBuf>,
    },
    /// Register a device by its public key (or replace a device's key: its sequence starts
    /// again in a new epoch) so that the hub accepts its batches.
    Enroll {
        /// The SQLite database file or a postgres:// URL.
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        device_id: String,
        /// The device's public key: a file holding it (`<key>.pub` from `dermedge keygen`) or
        /// the line itself, `dermedge-device-public-1 <hex>`.
        #[arg(long)]
        device_public: String,
    },
    /// Each enrolled device: epoch, highest sequence, records, gaps, revoked (on the hub machine).
    Status {
        /// The SQLite database file or a postgres:// URL.
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Refuse every further request from a device (its stored records stay).
    Revoke {
        /// The SQLite database file or a postgres:// URL.
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        device_id: String,
    },
    /// Receive batches over HTTP until SIGINT/SIGTERM.
    Serve {
        /// The SQLite database file (created if missing), or a PostgreSQL URL
        /// `postgres://user:password@host:port/database` (its schema created or migrated; other
        /// hubs may serve the same database).
        #[arg(long)]
        db: PathBuf,
        /// The hub key (`dermedge hub init`).
        #[arg(long)]
        key: PathBuf,
        /// host:port to listen on (port 0: any free port, printed on start).
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: String,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Store each record's `source` as the device wrote it; by default only its file name is
        /// kept (a full input path can carry a patient's name).
        #[arg(long)]
        keep_source_paths: bool,
        /// Connections open at once from one address (a regional hub behind which a clinic's
        /// devices share one NAT address may need more).
        #[arg(long, default_value_t = Limits::default().max_connections_per_address as u32,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_connections_per_address: u32,
        /// Serve HTTPS with this PEM certificate (chain); with --tls-key. Devices trust it
        /// through `sync.hub_ca` (a clinic LAN has no public CA).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's PEM private key.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Clinicians' accounts for the hub's web page (`http://<listen>/`).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Heads trained from the clinicians' labels, as on the page's `/heads` (for scripts).
    Head {
        #[command(subcommand)]
        command: HeadCommand,
    },
    /// Write the stored records as CSV (and the reported losses as <stem>.gaps.csv) and their
    /// embeddings as .npy (+ .npy.json index).
    Export {
        /// The SQLite database file or a postgres:// URL.
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

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create an account. The password is read from the environment variable
    /// DERMEDGE_HUB_PASSWORD if it is set, otherwise from standard input (typed twice, not shown,
    /// on a terminal; the first line otherwise).
    Add {
        /// The SQLite database file or a postgres:// URL.
        #[arg(long)]
        db: PathBuf,
        /// The name the clinician signs in with.
        #[arg(long)]
        name: String,
    },
    /// Every account: name, created, open sessions, locked.
    List {
        /// The SQLite database file or a postgres:// URL.
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Delete an account and end its sessions (the labels it wrote keep its name).
    Remove {
        /// The SQLite database file or a postgres:// URL.
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
pub enum HeadCommand {
    /// Every trained head: id, name, model, held-out accuracy, draft or published version.
    List {
        /// The SQLite database file or a postgres:// URL.
        #[arg(long)]
        db: PathBuf,
    },
    /// Train a head from one label set and keep it as a draft (printed: its held-out scores).
    Train {
        /// The SQLite database file or a postgres:// URL.
        #[arg(long)]
        db: PathBuf,
        /// The hub's secret key: the draft is signed as one this hub trained.
        #[arg(long)]
        key: PathBuf,
        /// The model whose records' labels train it.
        #[arg(long)]
        model: String,
        /// The labels of this head; without it, the labels of whole records.
        #[arg(long)]
        label_set: Option<String>,
        /// The head's name (what devices replace by it).
        #[arg(long)]
        name: String,
        /// Who trained it, as the page shows it.
        #[arg(long, default_value = "hub-cli")]
        by: String,
    },
    /// Sign a draft with the hub key and publish it: devices fetch it on their next sync.
    Publish {
        /// The SQLite database file or a postgres:// URL.
        #[arg(long)]
        db: PathBuf,
        /// The hub's secret key.
        #[arg(long)]
        key: PathBuf,
        /// The draft's id (`hub head list`).
        id: i64,
        #[arg(long, default_value = "hub-cli")]
        by: String,
    },
}

/// The environment variable `hub user add` takes the password from (for scripts).
pub const PASSWORD_VAR: &str = "DERMEDGE_HUB_PASSWORD";

/// Turn the terminal's echo off (`stty -echo`) until dropped.
struct NoEcho(bool);

impl NoEcho {
    fn new() -> Self {
        let off = std::process::Command::new("stty")
            .arg("-echo")
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success());
        NoEcho(off)
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::process::Command::new("stty")
                .arg("echo")
                .stdin(std::process::Stdio::inherit())
                .status();
        }
    }
}

fn read_line(stdin: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// The new account's password: from [`PASSWORD_VAR`], a terminal (twice, unechoed) or the first
/// line of standard input.
fn new_password() -> Result<String> {
    if let Ok(password) = std::env::var(PASSWORD_VAR) {
        return Ok(password);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return read_line(&mut stdin.lock());
    }
    let _no_echo = NoEcho::new();
    let mut lock = stdin.lock();
    eprint!("password (at least {MIN_PASSWORD_CHARS} characters): ");
    let first = read_line(&mut lock)?;
    eprint!("\nagain: ");
    let second = read_line(&mut lock)?;
    eprintln!();
    if first != second {
        bail!("the two passwords differ");
    }
    Ok(first)
}

/// A `--db` value: a postgres:// or postgresql:// URL, or an SQLite file.
fn location(db: &Path) -> Location {
    Location::parse(db.as_os_str())
}

/// A device public key given as the line itself or as a file holding it.
fn device_public(arg: &str) -> Result<DevicePublic> {
    let trimmed = arg.trim();
    if trimmed.starts_with("dermedge-device-public-") {
        return trimmed
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--device-public: {e}"));
    }
    let path = Path::new(arg);
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "--device-public {arg}: neither a readable file nor a `dermedge-device-public-1 <hex>` line"
        )
    })?;
    text.parse()
        .map_err(|e: String| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn run(command: &HubCommand) -> Result<()> {
    match command {
        HubCommand::Init { key, public } => {
            if key.exists() {
                bail!(
                    "{}: a hub key is already there; it is never overwritten (devices pin its public key)",
                    key.display()
                );
            }
            if let Some(public) = public.as_ref().filter(|p| p.exists()) {
                bail!("{}: already exists; not overwritten", public.display());
            }
            let hub_key = HubKey::generate();
            hub_key.save_new(key)?;
            let line = hub_key.public().to_string();
            if let Some(path) = public {
                std::fs::write(path, format!("{line}\n"))
                    .with_context(|| format!("{}: cannot write the public key", path.display()))?;
                eprintln!(
                    "hub key in {} (keep it private); public key in {}",
                    key.display(),
                    path.display()
                );
            } else {
                eprintln!("hub key in {} (keep it private)", key.display());
            }
            println!("{line}");
        }
        HubCommand::Enroll {
            db,
            device_id,
            device_public: public,
        } => {
            let public = device_public(public)?;
            let db = location(db);
            match Store::connect(&db)?.enroll(device_id, &public)? {
                Enrolled::New => println!("enrolled {device_id} in {db}"),
                Enrolled::Unchanged => {
                    println!("{device_id} is already enrolled with this key in {db}")
                }
                Enrolled::Migrated => println!(
                    "enrolled {device_id}'s public key in {db}; its sequence continues from before the migration"
                ),
                Enrolled::Replaced { epoch } => println!(
                    "replaced the key of {device_id} in {db}: its sequence starts again (epoch {epoch}); \
                     earlier records are kept"
                ),
            }
        }
        HubCommand::Status { db, json } => {
            let devices = Store::connect_existing(&location(db))?.summaries()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                for d in &devices {
                    println!(
                        "{}\tepoch {}\tthrough {}\t{} records\t{} gaps{}{}",
                        d.device_id,
                        d.epoch,
                        d.highest_seq,
                        d.records,
                        d.gaps,
                        if d.revoked { "\trevoked" } else { "" },
                        if d.needs_enrollment {
                            "\tmust be enrolled again"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        HubCommand::Revoke { db, device_id } => {
            let db = location(db);
            Store::connect_existing(&db)?.revoke(device_id)?;
            println!("revoked {device_id} in {db}: its requests are refused from now on");
        }
        HubCommand::Serve {
            db,
            key,
            listen,
            workers,
            keep_source_paths,
            max_connections_per_address,
            tls_cert,
            tls_key,
        } => {
            let hub_key = HubKey::load(key)?;
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, stop.clone())?;
            }
            let limits = Limits {
                keep_source_paths: *keep_source_paths,
                max_connections_per_address: *max_connections_per_address as usize,
                ..Limits::default()
            };
            let (server, scheme) = match (tls_cert, tls_key) {
                (Some(certificate), Some(key)) => {
                    let files = TlsFiles {
                        certificate: certificate.clone(),
                        key: key.clone(),
                    };
                    let server = HubServer::start_tls(
                        location(db),
                        hub_key,
                        listen,
                        *workers,
                        limits,
                        &files,
                    )?;
                    (server, "https")
                }
                _ => (
                    HubServer::start_with(location(db), hub_key, listen, *workers, limits)?,
                    "http",
                ),
            };
            println!("listening on {scheme}://{}", server.addr());
            eprintln!(
                "the web page for clinicians is at {scheme}://{}/ (accounts: `dermedge hub user add`)",
                server.addr()
            );
            std::io::stdout().flush()?;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            eprintln!("hub: shutting down");
            server.shutdown();
        }
        HubCommand::User { command } => user(command)?,
        HubCommand::Head { command } => head(command)?,
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
            let store = Store::connect_existing(&location(db))?;
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
            if out.skipped > 0 {
                eprintln!(
                    "warning: {} records left out of the .npy: their stored embeddings are damaged (named in the log with -v)",
                    out.skipped
                );
            }
            if let (Some(csv), true) = (csv, out.gaps > 0) {
                println!(
                    "{} reported losses in {}",
                    out.gaps,
                    gaps_csv_path(csv).display()
                );
            }
        }
    }
    Ok(())
}

fn head(command: &HeadCommand) -> Result<()> {
    use dermedge_hub::heads;
    match command {
        HeadCommand::List { db } => {
            for h in Store::connect_existing(&location(db))?.heads()? {
                let accuracy = heads::evaluation(&h)
                    .map_or("?".to_string(), |e| format!("{:.3}", e.heldout.accuracy));
                println!(
                    "{}	{}	{} ({}-d)	held-out accuracy {accuracy} on {}	{}",
                    h.id,
                    h.name,
                    h.model_id,
                    h.embedding_dim,
                    h.heldout_records,
                    h.version
                        .map_or("draft".to_string(), |v| format!("published v{v}"))
                );
            }
        }
        HeadCommand::Train {
            db,
            key,
            model,
            label_set,
            name,
            by,
        } => {
            let hub_key = HubKey::load(key)?;
            let store = Store::connect_existing(&location(db))?;
            let request = heads::TrainRequest {
                name: name.clone(),
                model_id: model.clone(),
                label_set: label_set.clone(),
            };
            let (id, evaluation) = heads::train_from_labels(
                &store,
                &hub_key,
                &request,
                by,
                dermedge_record::now_ms(),
            )?;
            let h = &evaluation.heldout;
            println!(
                "head {id} {name:?} for {model}: {} classes; held out {} records, accuracy {:.3}, \
                 macro ROC AUC {}",
                evaluation.classes.len(),
                h.count,
                h.accuracy,
                h.macro_roc_auc.map_or("-".into(), |a| format!("{a:.3}"))
            );
            for (i, c) in h.classes.iter().enumerate() {
                println!(
                    "  {}	trained on {}	held out {}	ROC AUC {}",
                    c.class,
                    evaluation.train_counts[i],
                    evaluation.heldout_counts[i],
                    c.roc_auc.map_or("-".into(), |a| format!("{a:.3}"))
                );
            }
            for (label, n) in &evaluation.left_out {
                println!("  left out: {label:?} ({n} labelled records)");
            }
            println!(
                "a draft: `dermedge hub head publish --db … --key … {id}` sends it to devices"
            );
        }
        HeadCommand::Publish { db, key, id, by } => {
            let hub_key = HubKey::load(key)?;
            let store = Store::connect_existing(&location(db))?;
            let version = heads::publish(&store, &hub_key, *id, by, dermedge_record::now_ms())?;
            println!(
                "head {id} published as version {version}: devices fetch it on their next sync"
            );
        }
    }
    Ok(())
}

fn user(command: &UserCommand) -> Result<()> {
    match command {
        UserCommand::Add { db, name } => {
            let db = location(db);
            // Check the name and the database before asking for a password.
            dermedge_hub::accounts::check_user_name(name)?;
            let store = Store::connect(&db)?;
            let password = new_password()?;
            store.add_user(name, &password)?;
            println!("account {name} created in {db}");
        }
        UserCommand::List { db, json } => {
            let users = Store::connect_existing(&location(db))?.users()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                let now = dermedge_record::now_ms();
                for u in &users {
                    println!(
                        "{}\tcreated {} UTC\t{} sessions{}",
                        u.name,
                        dermedge_hub::web::utc_time(u.created_at_ms),
                        u.sessions,
                        match u.locked_until_ms {
                            Some(until) if until > now =>
                                format!("\tlocked for {} s", (until - now) / 1000),
                            _ => String::new(),
                        }
                    );
                }
            }
        }
        UserCommand::Remove { db, name } => {
            let db = location(db);
            Store::connect_existing(&db)?.remove_user(name)?;
            println!("account {name} removed from {db}; its sessions are ended");
        }
    }
    Ok(())
}
