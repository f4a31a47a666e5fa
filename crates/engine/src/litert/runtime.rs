//! Finding, verifying and loading `libLiteRt.so`.
//!
//! Search order (first hit wins; an explicitly named path that is missing is an error):
//! 1. [`EngineOptions::runtime_path`](crate::EngineOptions) (a file or a directory);
//! 2. `DERMEDGE_LITERT_LIB` (a file or a directory);
//! 3. the install layouts next to the executable: `<exe dir>/lib/`, `<exe dir>/../lib/dermedge/`;
//! 4. in debug builds only, the repository cache `scripts/fetch-litert.py` fills:
//!    `.cache/litert/<version>/<target>/`. A release binary carries no path of the machine that
//!    built it; scripts that run one from the repository name the cache through
//!    `DERMEDGE_LITERT_LIB` (`scripts/litert-env.sh`).
//!
//! The library's sha256 must be the one `scripts/litert-runtime.lock` pins for the target this
//! binary was built for, unless an unpinned runtime is explicitly allowed.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_int, CString};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use dermedge_core::manifest::file_sha256;
use serde::Deserialize;

use super::ffi::{self, Api};
use super::handles::Environment;
use crate::{CpuArithmetic, EngineError, EngineOptions};

pub const LIBRARY_NAME: &str = "libLiteRt.so";
const LOCK_TEXT: &str = include_str!("../../../../scripts/litert-runtime.lock");
#[cfg(debug_assertions)]
const DEV_DIR: &str = env!("DERMEDGE_DEV_LITERT_DIR");
/// The target this binary was built for: the lock entry its runtime must match.
pub const TARGET: &str = env!("DERMEDGE_TARGET");

/// `scripts/litert-runtime.lock`, compiled in.
#[derive(Debug, Clone, Deserialize)]
pub struct RuntimeLock {
    pub package: String,
    pub version: String,
    pub targets: BTreeMap<String, LockTarget>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LockTarget {
    pub wheel: String,
    pub wheel_sha256: String,
    pub libraries: BTreeMap<String, String>,
}

impl RuntimeLock {
    pub fn embedded() -> &'static RuntimeLock {
        static LOCK: OnceLock<RuntimeLock> = OnceLock::new();
        LOCK.get_or_init(|| {
            toml::from_str(LOCK_TEXT).expect("scripts/litert-runtime.lock is valid TOML")
        })
    }

    /// The pinned sha256 of `libLiteRt.so` for this binary's target, if the target is pinned.
    pub fn expected_library_sha256(&self) -> Option<&str> {
        self.targets
            .get(TARGET)?
            .libraries
            .get(LIBRARY_NAME)
            .map(String::as_str)
    }
}

/// A loaded, verified LiteRT runtime library. Loaded once per path and kept for the process.
pub struct LiteRtRuntime {
    pub(crate) api: Api,
    path: PathBuf,
    sha256: String,
    pinned: bool,
}

/// One accelerator the runtime registered.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AcceleratorInfo {
    pub name: String,
    pub version: String,
    pub hardware: Vec<&'static str>,
}

/// What `dermedge doctor` prints about the runtime.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeReport {
    pub path: PathBuf,
    pub version: String,
    pub target: String,
    pub sha256: String,
    pub pinned: bool,
    pub accelerators: Vec<AcceleratorInfo>,
}

fn resolve_named(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(LIBRARY_NAME)
    } else {
        path.to_path_buf()
    }
}

impl LiteRtRuntime {
    /// Candidate library paths in search order for the given options.
    pub fn candidates(options: &EngineOptions) -> (Vec<PathBuf>, bool) {
        if let Some(p) = &options.runtime_path {
            return (vec![resolve_named(p)], true);
        }
        if let Some(p) = std::env::var_os("DERMEDGE_LITERT_LIB").filter(|p| !p.is_empty()) {
            return (vec![resolve_named(Path::new(&p))], true);
        }
        let mut paths = Vec::new();
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            paths.push(dir.join("lib").join(LIBRARY_NAME));
            paths.push(dir.join("../lib/dermedge").join(LIBRARY_NAME));
        }
        #[cfg(debug_assertions)]
        paths.push(Path::new(DEV_DIR).join(LIBRARY_NAME));
        (paths, false)
    }

    /// Find, verify and load the runtime (cached: each path is loaded once per process).
    pub fn locate(options: &EngineOptions) -> Result<Arc<LiteRtRuntime>, EngineError> {
        let lock = RuntimeLock::embedded();
        let (candidates, explicit) = Self::candidates(options);
        let found = candidates.iter().find(|p| p.is_file()).cloned();
        let Some(path) = found else {
            let searched = candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(EngineError::RuntimeNotFound {
                version: lock.version.clone(),
                searched: if explicit {
                    format!("{searched} (named explicitly)")
                } else {
                    searched
                },
            });
        };
        static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<LiteRtRuntime>>>> = OnceLock::new();
        let key = path.canonicalize().unwrap_or_else(|_| path.clone());
        let mut loaded = LOADED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(runtime) = loaded.get(&key) {
            return Ok(runtime.clone());
        }
        let runtime = Arc::new(Self::load(&path, options.allow_unpinned_runtime)?);
        loaded.insert(key, runtime.clone());
        Ok(runtime)
    }

    fn load(path: &Path, allow_unpinned: bool) -> Result<LiteRtRuntime, EngineError> {
        let lock = RuntimeLock::embedded();
        let load_error = |message: String| EngineError::RuntimeLoad {
            path: path.to_path_buf(),
            expected_version: lock.version.clone(),
            message,
        };
        let sha256 = file_sha256(path).map_err(|e| load_error(e.to_string()))?;
        let expected = lock.expected_library_sha256();
        let pinned = expected == Some(sha256.as_str());
        if !pinned {
            if !allow_unpinned {
                return Err(EngineError::RuntimeMismatch {
                    path: path.to_path_buf(),
                    target: TARGET.to_string(),
                    expected_version: lock.version.clone(),
                    expected: expected.unwrap_or("(target not pinned)").to_string(),
                    actual: sha256,
                });
            }
            log::warn!(
                "{}: unpinned LiteRT runtime (sha256 {sha256}); dermedge was tested against {} {}",
                path.display(),
                lock.package,
                lock.version
            );
        }
        // SAFETY: loading runs the library's initialisers; it is the verified LiteRT runtime (or one
        // the user explicitly allowed), whose initialisers have no preconditions.
        let library =
            unsafe { libloading::Library::new(path) }.map_err(|e| load_error(e.to_string()))?;
        // SAFETY: the declarations in `ffi` mirror the LiteRT 2.1 C headers.
        let api = unsafe { Api::resolve(library) }.map_err(load_error)?;
        log::info!(
            "loaded LiteRT {} runtime from {}",
            lock.version,
            path.display()
        );
        Ok(LiteRtRuntime {
            api,
            path: path.to_path_buf(),
            sha256,
            pinned,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> &str {
        &RuntimeLock::embedded().version
    }

    /// The accelerators LiteRT registers on this machine, read from a fresh environment.
    pub(crate) fn accelerators_in(env: &Environment) -> Result<Vec<AcceleratorInfo>, EngineError> {
        let runtime = env.runtime();
        Ok(env
            .accelerators()
            .map_err(|failed| failed.at(&runtime.path))?
            .into_iter()
            .map(|a| AcceleratorInfo {
                name: if a.name.is_empty() {
                    "?".into()
                } else {
                    a.name
                },
                version: a.version.map_or_else(
                    || "unknown".into(),
                    |v| format!("{}.{}.{}", v.major, v.minor, v.patch),
                ),
                hardware: a.hardware.map(hardware_names).unwrap_or_default(),
            })
            .collect())
    }

    /// Library, version and the accelerators it registers on this machine.
    pub fn report(self: &Arc<Self>) -> Result<RuntimeReport, EngineError> {
        let env = super::quiet::quietly(|| Environment::new(self))
            .map_err(|failed| failed.at(&self.path))?;
        let accelerators = Self::accelerators_in(&env)?;
        Ok(RuntimeReport {
            path: self.path.clone(),
            version: self.version().to_string(),
            target: TARGET.to_string(),
            sha256: self.sha256.clone(),
            pinned: self.pinned,
            accelerators,
        })
    }
}

pub(crate) fn hardware_names(bits: c_int) -> Vec<&'static str> {
    [
        (ffi::HW_CPU, "cpu"),
        (ffi::HW_GPU, "gpu"),
        (ffi::HW_NPU, "npu"),
    ]
    .into_iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

impl CpuSettings {
    /// The flags to set, or `None` to leave the delegate's defaults.
    pub(crate) fn xnnpack_flags(&self) -> Option<u32> {
        match self.arithmetic {
            CpuArithmetic::Fp32 => None,
            CpuArithmetic::Fp16 => {
                Some(xnnpack_flag::QS8 | xnnpack_flag::QU8 | xnnpack_flag::FORCE_FP16)
            }
        }
    }

    /// The CPU accelerator's options as LiteRT's opaque-options entry: identifier `xnnpack` and
    /// a TOML payload, the format LiteRT's own CPU-options helpers produce (those helpers are not
    /// exported by the runtime library, so dermedge builds the entry itself).
    pub(crate) fn opaque_entry(&self) -> (CString, CString) {
        let mut toml = format!("num_threads = {}\n", self.threads);
        if let Some(flags) = self.xnnpack_flags() {
            toml.push_str(&format!("flags = {flags}\n"));
        }
        if let Some(cache) = &self.weight_cache {
            // A TOML basic string, control characters (NUL included) escaped by the toml crate.
            let path = toml::Value::String(cache.to_string_lossy().into_owned());
            toml.push_str(&format!("weight_cache_file_path = {path}\n"));
        }
        (
            CString::new("xnnpack").expect("literal without NUL"),
            CString::new(toml).expect("TOML text escapes every control character"),
        )
    }
}

/// What the CPU (XNNPACK) accelerator is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpuSettings {
    pub threads: u32,
    /// XNNPACK packs weights into this file once; later starts map it instead of repacking.
    pub weight_cache: Option<std::path::PathBuf>,
    pub arithmetic: CpuArithmetic,
}

/// XNNPACK delegate flags (`TFLITE_XNNPACK_DELEGATE_FLAG_*` in TensorFlow Lite's
/// `xnnpack_delegate.h`). Flags given replace the delegate's defaults, so they restate them.
mod xnnpack_flag {
    /// Signed 8-bit quantised operators (the default).
    pub const QS8: u32 = 0x1;
    /// Unsigned 8-bit quantised operators (the default).
    pub const QU8: u32 = 0x2;
    /// float16 arithmetic for float operators.
    pub const FORCE_FP16: u32 = 0x4;
}

/// Destructor LiteRT calls for a payload made by `CString::into_raw`.
pub(crate) unsafe extern "C" fn free_cstring_payload(payload: *mut std::ffi::c_void) {
    if !payload.is_null() {
        // SAFETY: the payload was created by CString::into_raw in this crate.
        drop(unsafe { CString::from_raw(payload.cast()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_arithmetic_sets_xnnpack_flags_that_keep_the_int8_defaults() {
        let settings = |arithmetic| CpuSettings {
            threads: 2,
            weight_cache: None,
            arithmetic,
        };
        let payload = |arithmetic| {
            let (id, payload) = settings(arithmetic).opaque_entry();
            assert_eq!(id.to_str().unwrap(), "xnnpack");
            payload.into_string().unwrap()
        };
        assert_eq!(payload(CpuArithmetic::Fp32), "num_threads = 2\n");
        // QS8 | QU8 (the delegate's defaults, which given flags replace) | FORCE_FP16.
        assert_eq!(payload(CpuArithmetic::Fp16), "num_threads = 2\nflags = 7\n");
    }

    #[test]
    fn the_embedded_lock_pins_this_target() {
        let lock = RuntimeLock::embedded();
        assert_eq!(lock.version, "2.1.4");
        assert_eq!(
            lock.expected_library_sha256().map(str::len),
            Some(64),
            "target {TARGET} is not pinned"
        );
    }

    #[test]
    fn a_missing_explicit_library_is_named_in_the_error() {
        let options = EngineOptions {
            runtime_path: Some("/nonexistent/dir/libLiteRt.so".into()),
            ..Default::default()
        };
        let err = LiteRtRuntime::locate(&options)
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            err.contains("/nonexistent/dir/libLiteRt.so") && err.contains("2.1.4"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_library_is_refused_with_the_expected_version() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join(LIBRARY_NAME);
        std::fs::write(&fake, b"\x7fELF not really").unwrap();
        let options = EngineOptions {
            runtime_path: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let err = LiteRtRuntime::locate(&options).err().expect("must fail");
        assert!(matches!(err, EngineError::RuntimeMismatch { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&fake.display().to_string()) && text.contains("2.1.4"),
            "{text}"
        );

        // Allowed explicitly, it still fails to load, naming the path.
        let options = EngineOptions {
            allow_unpinned_runtime: true,
            ..options
        };
        let err = LiteRtRuntime::locate(&options)
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            err.contains("cannot load") && err.contains(&fake.display().to_string()),
            "{err}"
        );
    }
}
