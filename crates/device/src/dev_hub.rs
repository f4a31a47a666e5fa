//! `sync.local_hub`: a hub in the device's own process, for development machines only (cargo
//! feature `dev-hub`). A firmware build leaves it out, and with it the HTTP server and SQLite.

use dermedge_record::{DeviceKey, HubPublic};

use crate::config::LocalHubSection;
use crate::run::RunError;

#[cfg(feature = "dev-hub")]
pub use enabled::{start, LocalHub};

#[cfg(feature = "dev-hub")]
mod enabled {
    use std::net::SocketAddr;
    use std::path::Path;

    use dermedge_hub::server::HubServer;
    use dermedge_hub::store::Store;
    use dermedge_record::HubKey;

    use super::*;

    pub struct LocalHub(HubServer);

    impl LocalHub {
        pub fn addr(&self) -> SocketAddr {
            self.0.addr()
        }

        pub fn shutdown(self) {
            self.0.shutdown();
        }
    }

    /// The hub's public key, and the hub itself when sync is on: its key made on first start,
    /// this device enrolled with its public key.
    pub fn start(
        section: &LocalHubSection,
        sync_enabled: bool,
        device_id: &str,
        device_key: &DeviceKey,
    ) -> Result<(Option<LocalHub>, HubPublic), RunError> {
        let hub_key = load_or_create_hub_key(&section.key)?;
        let hub_public = hub_key.public();
        if !sync_enabled {
            return Ok((None, hub_public));
        }
        create_parent(&section.db)?;
        Store::open(&section.db)?.enroll(device_id, &device_key.public())?;
        let server = HubServer::start(&section.db, hub_key, &section.listen, 2)?;
        Ok((Some(LocalHub(server)), hub_public))
    }

    fn create_parent(path: &Path) -> Result<(), RunError> {
        match path.parent() {
            Some(dir) => std::fs::create_dir_all(dir)
                .map_err(|e| RunError::Setup(format!("{}: {e}", dir.display()))),
            None => Ok(()),
        }
    }

    /// The development hub's key (`sync.local_hub.key`), made on first start.
    fn load_or_create_hub_key(path: &Path) -> Result<HubKey, RunError> {
        if !path.exists() {
            create_parent(path)?;
            HubKey::generate().save_new(path)?;
            log::warn!(
                "created a new hub key in {} (development hub)",
                path.display()
            );
        }
        Ok(HubKey::load(path)?)
    }
}

/// Without the `dev-hub` feature there is no local hub to start.
#[cfg(not(feature = "dev-hub"))]
pub enum LocalHub {}

#[cfg(not(feature = "dev-hub"))]
impl LocalHub {
    pub fn addr(&self) -> std::net::SocketAddr {
        match *self {}
    }

    pub fn shutdown(self) {
        match self {}
    }
}

#[cfg(not(feature = "dev-hub"))]
pub fn start(
    _section: &LocalHubSection,
    _sync_enabled: bool,
    _device_id: &str,
    _device_key: &DeviceKey,
) -> Result<(Option<LocalHub>, HubPublic), RunError> {
    Err(RunError::Setup(NOT_BUILT.into()))
}

/// Whether this build can honour a `sync.local_hub` section.
pub const BUILT: bool = cfg!(feature = "dev-hub");

/// Why a `sync.local_hub` section cannot be used by this build.
pub const NOT_BUILT: &str = "sync.local_hub: this build has no development hub \
    (cargo feature `dev-hub`); firmware builds sync to the clinic hub at sync.hub";
