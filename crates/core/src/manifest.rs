//! The model manifest: a TOML file next to each `.tflite` that says what the model is, how it was
//! made, and exactly which preprocessing its input expects.
//!
//! ```toml
//! [model]
//! id = "df-mini"            # embeddings and heads are bound to this id
//! version = "1"
//! file = "df-mini.fp32.tflite"   # relative to the manifest
//! sha256 = "…"              # of the .tflite; a mismatch is refused
//! precision = "fp32"        # fp32 | fp16 | int8 | int16x8 | dynamic-int8
//! embedding_dim = 6144
//!
//! [input]
//! width = 448
//! height = 448
//! channels = 3
//! layout = "nhwc"           # nhwc | nchw
//! color_order = "rgb"       # rgb | bgr
//! dtype = "float32"         # float32 | uint8 | int8: the model's input tensor type
//! resize_filter = "bilinear"  # TensorFlow's bilinear: half-pixel centres, no antialiasing
//! scale = 0.00392156862745098 # value = pixel (0–255) * scale + offset; -1000 to 1000, not 0
//! offset = 0.0              # -1000 to 1000
//! # [input.quantization]    # required when dtype is uint8/int8: must equal the model's
//! # scale = 0.0039215689    # more than 0, at most 1000
//! # zero_point = -128       # uint8: 0 to 255, int8: -128 to 127
//!
//! [output]
//! name = "embedding"
//! dtype = "float32"         # float32 | uint8 | int8 (quantised outputs are dequantised)
//! # [output.correction]     # optional per-dimension affine the engine applies to every output:
//! # file = "x.correction.npy"  # float32 [2, embedding_dim]: row 0 scale, row 1 offset
//! # sha256 = "…"            # of that file; a mismatch is refused
//!
//! # [classifier]            # optional: the model's own trained classifier on its embeddings
//! # file = "x.teacher.json" # dermedge-mlp-head/1, relative to the manifest
//! # sha256 = "…"            # of that file; a mismatch is refused
//!
//! [provenance]              # free-form strings: source, tool, notes, …
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bounds::{Bounds, OutOfBounds};

/// Largest input side a manifest may declare; larger inputs are a typo, not a model.
pub const MAX_INPUT_SIDE: u32 = 4096;

/// Allowed `model.embedding_dim`.
pub const EMBEDDING_DIM: Bounds<usize> = Bounds::new(1, 1 << 20);
/// Allowed `input.width` and `input.height`.
pub const INPUT_SIDE: Bounds<u32> = Bounds::new(1, MAX_INPUT_SIDE);
/// Allowed `input.scale` (0 excepted: every input would be the same) and `input.offset`, so
/// `pixel * scale + offset` stays finite.
pub const INPUT_SCALE: Bounds<f32> = Bounds::new(-1000.0, 1000.0);
pub const INPUT_OFFSET: Bounds<f32> = Bounds::new(-1000.0, 1000.0);
/// Allowed `input.quantization.scale`.
pub const QUANT_SCALE: Bounds<f32> = Bounds::above(0.0, 1000.0);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub model: ModelSection,
    pub input: InputSpec,
    pub output: OutputSpec,
    /// The model's own trained classifier, when its source carried one: the fidelity suite
    /// judges an export by it as well as by heads it trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier: Option<CompanionFile>,
    #[serde(default)]
    pub provenance: BTreeMap<String, String>,
    /// The fidelity suite's verdict on this export against its fp32 reference, when it was
    /// judged (`dermedge fidelity --record`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fidelity: Option<FidelityRecord>,
    /// Where the manifest was read from; model paths resolve relative to its directory.
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub id: String,
    pub version: String,
    pub file: PathBuf,
    pub sha256: String,
    pub precision: Precision,
    pub embedding_dim: usize,
}

/// A fidelity verdict recorded in a manifest: what the export was judged against, on what, and
/// each gate's value and threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FidelityRecord {
    pub verdict: FidelityVerdict,
    /// The reference model (`id precision`, sha256 prefix).
    pub reference: String,
    /// The images it was judged on (directories, count).
    pub images: String,
    /// The gates file (or `built-in gates`).
    pub gates: String,
    /// Gate name → value and threshold.
    #[serde(default)]
    pub values: BTreeMap<String, GateValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FidelityVerdict {
    Pass,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateValue {
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    pub pass: bool,
}

/// `text` (a manifest) with its `[fidelity]` tables replaced by `record`; the rest of the text,
/// comments included, is kept as it is.
pub fn with_fidelity_record(text: &str, record: &FidelityRecord) -> String {
    let mut kept = String::new();
    let mut in_fidelity = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            let name = trimmed
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("");
            let name = name.trim();
            in_fidelity = name == "fidelity" || name.starts_with("fidelity.");
        }
        if !in_fidelity && line != FIDELITY_COMMENT {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    #[derive(Serialize)]
    struct Wrapper<'a> {
        fidelity: &'a FidelityRecord,
    }
    let table = toml::to_string(&Wrapper { fidelity: record }).expect("a record serialises");
    format!("{}\n{FIDELITY_COMMENT}\n{table}", kept.trim_end())
}

const FIDELITY_COMMENT: &str =
    "# The fidelity suite's verdict (dermedge fidelity --record); `config check` warns on fail.";

pub use dermedge_record::Precision;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub layout: Layout,
    pub color_order: ColorOrder,
    pub dtype: TensorDtype,
    pub resize_filter: ResizeFilter,
    pub scale: f32,
    pub offset: f32,
    #[serde(default)]
    pub quantization: Option<QuantSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSpec {
    pub scale: f32,
    pub zero_point: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
    pub dtype: TensorDtype,
    /// A per-dimension affine map, fitted so a quantised model's outputs land where the fp32
    /// reference's would (`y = x * scale + offset`); applied by the engine on every backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correction: Option<CompanionFile>,
}

/// A file that travels with the model (`[output.correction]`: a float32 `.npy` of shape
/// `[2, embedding_dim]`; `[classifier]`: a `dermedge-mlp-head/1` JSON), and its checksum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompanionFile {
    /// Relative to the manifest.
    pub file: PathBuf,
    pub sha256: String,
}

/// Which [`CompanionFile`] of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Companion {
    /// `[output.correction]`
    OutputCorrection,
    /// `[classifier]`
    Classifier,
}

impl Companion {
    /// The manifest table that names it.
    pub fn key(self) -> &'static str {
        match self {
            Self::OutputCorrection => "output.correction",
            Self::Classifier => "classifier",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Nhwc,
    Nchw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorOrder {
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    /// TensorFlow's `tf.image.resize(method="bilinear", antialias=False)`: half-pixel centres.
    Bilinear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDtype {
    Float32,
    Uint8,
    Int8,
}

impl TensorDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            TensorDtype::Float32 => "float32",
            TensorDtype::Uint8 => "uint8",
            TensorDtype::Int8 => "int8",
        }
    }
}

/// What is wrong with a manifest or the model file it names.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read manifest: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not a valid dermedge manifest: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
    #[error("{manifest}: model file {model} cannot be read: {cause}")]
    ModelMissing {
        manifest: PathBuf,
        model: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "{manifest}: model file {model} has sha256 {actual}, but the manifest expects {expected} \
         (the file is truncated, corrupt or a different model)"
    )]
    ChecksumMismatch {
        manifest: PathBuf,
        model: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{manifest}: {key}.file {file}: {message}")]
    Companion {
        manifest: PathBuf,
        key: &'static str,
        file: PathBuf,
        message: String,
    },
}

impl ModelManifest {
    /// Read and validate a manifest. Does not touch the model file; see [`Self::verify_model_file`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ManifestError> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|cause| ManifestError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let mut manifest = Self::parse(&text, path)?;
        manifest.path = path.to_path_buf();
        Ok(manifest)
    }

    /// Parse and validate manifest text; `path` is used in error messages and to resolve the model.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let mut manifest: ModelManifest =
            toml::from_str(text).map_err(|e| ManifestError::Parse {
                path: path.to_path_buf(),
                message: e.to_string().trim_end().replace('\n', " "),
            })?;
        manifest.path = path.to_path_buf();
        manifest.validate()?;
        Ok(manifest)
    }

    fn invalid(&self, field: &'static str, message: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            path: self.path.clone(),
            field,
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let out_of_bounds = |e: OutOfBounds| self.invalid(e.key, e.message);
        let m = &self.model;
        if m.id.trim().is_empty() || m.id.chars().any(char::is_whitespace) {
            return Err(self.invalid("model.id", "expected a non-empty id without whitespace"));
        }
        if !is_sha256_hex(&m.sha256) {
            return Err(self.invalid("model.sha256", "expected 64 hexadecimal digits"));
        }
        EMBEDDING_DIM
            .check("model.embedding_dim", m.embedding_dim)
            .map_err(out_of_bounds)?;
        let i = &self.input;
        for (field, v) in [("input.width", i.width), ("input.height", i.height)] {
            INPUT_SIDE.check(field, v).map_err(out_of_bounds)?;
        }
        if i.channels != 3 {
            return Err(self.invalid(
                "input.channels",
                format!("{} is not supported; expected 3", i.channels),
            ));
        }
        INPUT_SCALE
            .check("input.scale", i.scale)
            .map_err(out_of_bounds)?;
        if i.scale == 0.0 {
            return Err(self.invalid(
                "input.scale",
                format!("0 is not allowed (every input would be the same); the allowed range is {INPUT_SCALE} except 0"),
            ));
        }
        INPUT_OFFSET
            .check("input.offset", i.offset)
            .map_err(out_of_bounds)?;
        match (i.dtype, &i.quantization) {
            (TensorDtype::Float32, None) => {}
            (TensorDtype::Float32, Some(_)) => {
                return Err(self.invalid(
                    "input.quantization",
                    "only allowed when input.dtype is uint8 or int8",
                ))
            }
            (TensorDtype::Uint8 | TensorDtype::Int8, None) => {
                return Err(self.invalid(
                    "input.quantization",
                    "required when input.dtype is uint8 or int8",
                ))
            }
            (dtype, Some(q)) => {
                QUANT_SCALE
                    .check("input.quantization.scale", q.scale)
                    .map_err(out_of_bounds)?;
                let zero_points = if dtype == TensorDtype::Uint8 {
                    Bounds::new(0, 255)
                } else {
                    Bounds::new(-128, 127)
                };
                zero_points
                    .check("input.quantization.zero_point", q.zero_point)
                    .map_err(|e| {
                        self.invalid(e.key, format!("{} for {}", e.message, dtype.as_str()))
                    })?;
            }
        }
        for (key, companion) in [
            ("output.correction.sha256", &self.output.correction),
            ("classifier.sha256", &self.classifier),
        ] {
            if companion
                .as_ref()
                .is_some_and(|c| !is_sha256_hex(&c.sha256))
            {
                return Err(self.invalid(key, "expected 64 hexadecimal digits"));
            }
        }
        if self.output.name.trim().is_empty() {
            return Err(self.invalid(
                "output.name",
                "expected the name of the embedding output tensor",
            ));
        }
        Ok(())
    }

    /// The model file, resolved relative to the manifest's directory.
    pub fn model_path(&self) -> PathBuf {
        self.resolve(&self.model.file)
    }

    /// The output correction's file, resolved relative to the manifest's directory.
    pub fn correction_path(&self) -> Option<PathBuf> {
        self.output
            .correction
            .as_ref()
            .map(|c| self.resolve(&c.file))
    }

    /// The classifier's file, resolved relative to the manifest's directory.
    pub fn classifier_path(&self) -> Option<PathBuf> {
        self.classifier.as_ref().map(|c| self.resolve(&c.file))
    }

    /// The companion file `which`, as its path and bytes, or `None` when the manifest names none.
    /// It must be a regular file (a FIFO or a device could block or never end) of at most `limit`
    /// bytes whose sha256 is the manifest's; the bytes returned are the bytes hashed, so a file
    /// replaced after the check is never the one used.
    pub fn read_companion(
        &self,
        which: Companion,
        limit: u64,
    ) -> Result<Option<(PathBuf, Vec<u8>)>, ManifestError> {
        let spec = match which {
            Companion::OutputCorrection => self.output.correction.as_ref(),
            Companion::Classifier => self.classifier.as_ref(),
        };
        let Some(spec) = spec else {
            return Ok(None);
        };
        let file = self.resolve(&spec.file);
        let key = which.key();
        let invalid = |message: String| ManifestError::Companion {
            manifest: self.path.clone(),
            key,
            file: file.clone(),
            message,
        };
        let too_large = || {
            invalid(format!(
                "larger than {limit} bytes, the most accepted for {key}"
            ))
        };
        let handle =
            open_without_blocking(&file).map_err(|e| invalid(format!("cannot open: {e}")))?;
        // The type and size of what was opened, not of whatever the path names by now.
        let kind = handle
            .metadata()
            .map_err(|e| invalid(format!("cannot open: {e}")))?;
        if !kind.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        if kind.len() > limit {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        handle
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| invalid(format!("cannot read: {e}")))?;
        if bytes.len() as u64 > limit {
            return Err(too_large());
        }
        let actual = sha256_hex(&bytes);
        if !actual.eq_ignore_ascii_case(&spec.sha256) {
            return Err(invalid(format!(
                "sha256 {actual}, but {key}.sha256 is {} (the file is corrupt or not the one the manifest names)",
                spec.sha256.to_ascii_lowercase()
            )));
        }
        Ok(Some((file, bytes)))
    }

    fn resolve(&self, file: &Path) -> PathBuf {
        if file.is_absolute() {
            return file.to_path_buf();
        }
        self.path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(file)
    }

    /// Check the model file against `model.sha256`, reading it in chunks (models can be GBs).
    pub fn verify_model_file(&self) -> Result<(), ManifestError> {
        let model = self.model_path();
        let missing = |cause| ManifestError::ModelMissing {
            manifest: self.path.clone(),
            model: model.clone(),
            cause,
        };
        let actual = file_sha256(&model).map_err(missing)?;
        self.expect_sha256(actual)
    }

    /// Check `bytes`, the model file as read or mapped, against `model.sha256`: what is checked is
    /// then exactly what the runtime is given.
    pub fn verify_model_bytes(&self, bytes: &[u8]) -> Result<(), ManifestError> {
        self.expect_sha256(sha256_hex(bytes))
    }

    fn expect_sha256(&self, actual: String) -> Result<(), ManifestError> {
        let model = self.model_path();
        if !actual.eq_ignore_ascii_case(&self.model.sha256) {
            return Err(ManifestError::ChecksumMismatch {
                manifest: self.path.clone(),
                model,
                expected: self.model.sha256.to_ascii_lowercase(),
                actual,
            });
        }
        Ok(())
    }

    /// [`Self::verify_model_bytes`] on `bytes` (the model file as mapped for the runtime),
    /// remembered in `stamp`: when the stamp records this manifest's sha256 for the very same
    /// file (device, inode, size, modification and change times), it is not hashed again. Hashing a Derm-Foundation-size int8 file takes longer than
    /// loading it from a weight cache; the stamp lives next to that cache and is trusted as
    /// far as the cache is. Any change to the file changes its change time (which no user tool
    /// can set back), so a replaced or edited model is hashed, and refused if it differs.
    /// Returns whether the stamp was used.
    pub fn verify_model_with_stamp(
        &self,
        bytes: &[u8],
        stamp: &Path,
    ) -> Result<bool, ManifestError> {
        let model = self.model_path();
        let expected = self.model.sha256.to_ascii_lowercase();
        let identity = file_identity(&model).map(|id| format!("{expected} {id}\n"));
        if let (Some(identity), Ok(recorded)) = (&identity, fs::read_to_string(stamp)) {
            if *identity == recorded {
                log::debug!(
                    "{}: sha256 verified earlier for this very file ({})",
                    model.display(),
                    stamp.display()
                );
                return Ok(true);
            }
        }
        self.verify_model_bytes(bytes)?;
        if let Some(identity) = identity {
            if let Err(e) = fs::write(stamp, identity) {
                log::warn!(
                    "{}: cannot record the verified checksum ({e}); it will be hashed again next start",
                    stamp.display()
                );
            }
        }
        Ok(false)
    }

    /// Number of values in one input tensor (batch 1).
    pub fn input_len(&self) -> usize {
        (self.input.width * self.input.height * self.input.channels) as usize
    }
}

/// What identifies one version of a file without reading it: device, inode, size, and the
/// modification and change times to the nanosecond. None where the platform has no such record.
fn file_identity(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(format!(
            "dev={} ino={} size={} mtime={}.{:09} ctime={}.{:09}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Open `path` for reading without waiting on it: a FIFO with no writer would otherwise block
/// the open itself, before its type could be checked. The flag does not change reads of a
/// regular file.
fn open_without_blocking(path: &Path) -> std::io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)
}

/// Lower-case hexadecimal sha256 of a file, read in chunks (models can be GBs).
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit())
}

/// Lower-case hexadecimal sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_fidelity_record_replaces_the_previous_one_and_keeps_the_rest() {
        let text = "# a comment\n[model]\nid = \"m\"\n\n[fidelity]\nverdict = \"pass\"\n\n[fidelity.values.x]\nvalue = 1.0\npass = true\n\n[provenance]\nsource = \"s\"\n";
        let record = FidelityRecord {
            verdict: FidelityVerdict::Fail,
            reference: "m fp32".into(),
            images: "3 images".into(),
            gates: "built-in gates".into(),
            values: [(
                "centred_cosine_p1".to_string(),
                GateValue {
                    value: 0.5,
                    min: Some(0.95),
                    max: None,
                    pass: false,
                },
            )]
            .into(),
        };
        let once = with_fidelity_record(text, &record);
        let twice = with_fidelity_record(&once, &record);
        assert_eq!(once, twice);
        assert!(
            once.starts_with("# a comment\n[model]\nid = \"m\"\n\n[provenance]\nsource = \"s\"\n"),
            "{once}"
        );
        assert_eq!(once.matches("[fidelity]").count(), 1, "{once}");
        assert!(!once.contains("[fidelity.values.x]"), "{once}");
        #[derive(serde::Deserialize)]
        struct Only {
            fidelity: FidelityRecord,
        }
        #[derive(serde::Deserialize)]
        struct Doc {
            #[serde(flatten)]
            only: Only,
        }
        let parsed: Doc = toml::from_str(&once[once.find("[fidelity]").unwrap()..]).unwrap();
        assert_eq!(parsed.only.fidelity, record);
    }

    use super::*;

    const GOOD: &str = r#"
[model]
id = "df-mini"
version = "1"
file = "m.tflite"
sha256 = "bfbd7251e59942aa05fef9c574a79fa89d91542283cda75b55a0bebb63c0ff47"
precision = "fp32"
embedding_dim = 6144

[input]
width = 448
height = 448
channels = 3
layout = "nhwc"
color_order = "rgb"
dtype = "float32"
resize_filter = "bilinear"
scale = 0.00392156862745098
offset = 0.0

[output]
name = "embedding"
dtype = "float32"
"#;

    fn parse(text: &str) -> Result<ModelManifest, ManifestError> {
        ModelManifest::parse(text, Path::new("/models/m.toml"))
    }

    #[test]
    fn parses_a_good_manifest_and_resolves_the_model_next_to_it() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.model.embedding_dim, 6144);
        assert_eq!(m.model.precision, Precision::Fp32);
        assert_eq!(m.model_path(), PathBuf::from("/models/m.tflite"));
        assert_eq!(m.input_len(), 448 * 448 * 3);
    }

    #[test]
    fn a_classifier_resolves_next_to_the_manifest_and_its_checksum_is_checked() {
        let sha = "3558a50dd98020bc8872623cb5a91c09c755edfcb7de1e7b5d9a5cdc07e328df";
        let with = format!("{GOOD}\n[classifier]\nfile = \"m.teacher.json\"\nsha256 = \"{sha}\"\n");
        let m = parse(&with).unwrap();
        assert_eq!(
            m.classifier_path(),
            Some(PathBuf::from("/models/m.teacher.json"))
        );
        assert_eq!(m.classifier.as_ref().unwrap().sha256, sha);
        assert_eq!(parse(GOOD).unwrap().classifier_path(), None);
        let (field, message) = field_error(&with.replace(sha, "not-a-checksum"));
        assert_eq!(field, "classifier.sha256", "{message}");
        let (field, message) = field_error(&with.replace("file = \"m.teacher.json\"\n", ""));
        assert_eq!(field, "<parse>");
        assert!(message.contains("file"), "{message}");
    }

    #[test]
    fn a_companion_is_read_once_bounded_and_checked_naming_its_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"{\"weights\": []}";
        let with = |sha: &str| {
            let text =
                format!("{GOOD}\n[classifier]\nfile = \"m.teacher.json\"\nsha256 = \"{sha}\"\n");
            ModelManifest::parse(&text, &dir.path().join("m.toml")).unwrap()
        };
        let m = with(&sha256_hex(body));
        let file = dir.path().join("m.teacher.json");
        let error = |m: &ModelManifest, limit| {
            m.read_companion(Companion::Classifier, limit)
                .unwrap_err()
                .to_string()
        };

        let message = error(&m, 1024);
        assert!(
            message.contains("classifier.file") && message.contains("cannot open"),
            "{message}"
        );
        std::fs::write(&file, body).unwrap();
        let (path, bytes) = m
            .read_companion(Companion::Classifier, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(
            (path.as_path(), bytes.as_slice()),
            (file.as_path(), &body[..])
        );
        assert_eq!(
            m.read_companion(Companion::OutputCorrection, 1024).unwrap(),
            None
        );

        // Exactly the limit is accepted; one byte more is refused before hashing.
        assert!(m
            .read_companion(Companion::Classifier, body.len() as u64)
            .is_ok());
        let message = error(&m, body.len() as u64 - 1);
        assert!(message.contains("larger than"), "{message}");
        assert!(m.read_companion(Companion::Classifier, u64::MAX).is_ok());

        let message = error(&with(&"A".repeat(64)), 1024);
        assert!(
            message.contains("classifier.sha256 is aaaa") && message.contains("m.teacher.json"),
            "{message}"
        );

        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        let message = error(&m, 1024);
        assert!(message.contains("not a regular file"), "{message}");

        // A FIFO with no writer is refused at once rather than waited on.
        #[cfg(unix)]
        {
            std::fs::remove_dir(&file).unwrap();
            let made = std::process::Command::new("mkfifo").arg(&file).status();
            if made.is_ok_and(|s| s.success()) {
                let message = error(&m, 1024);
                assert!(message.contains("not a regular file"), "{message}");
            }
        }
    }

    fn field_error(text: &str) -> (String, String) {
        match parse(text).unwrap_err() {
            ManifestError::Invalid { field, message, .. } => (field.to_string(), message),
            ManifestError::Parse { message, .. } => ("<parse>".into(), message),
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn rejects_unknown_keys_naming_them() {
        let (field, message) =
            field_error(&GOOD.replace("offset = 0.0", "offset = 0.0\nofset = 1"));
        assert_eq!(field, "<parse>");
        assert!(message.contains("ofset"), "{message}");
    }

    #[test]
    fn rejects_impossible_values_naming_the_field() {
        let cases = [
            (GOOD.replace("width = 448", "width = 0"), "input.width"),
            (
                GOOD.replace("height = 448", "height = 100000"),
                "input.height",
            ),
            (
                GOOD.replace("channels = 3", "channels = 4"),
                "input.channels",
            ),
            (
                GOOD.replace("embedding_dim = 6144", "embedding_dim = 0"),
                "model.embedding_dim",
            ),
            (
                GOOD.replace("sha256 = \"bf", "sha256 = \"zz"),
                "model.sha256",
            ),
            (
                GOOD.replace("scale = 0.00392156862745098", "scale = 0.0"),
                "input.scale",
            ),
            (
                GOOD.replace("dtype = \"float32\"\nresize", "dtype = \"uint8\"\nresize"),
                "input.quantization",
            ),
            (GOOD.replace("id = \"df-mini\"", "id = \"\""), "model.id"),
        ];
        for (text, expected) in cases {
            let (field, message) = field_error(&text);
            assert_eq!(field, expected, "{message}");
            assert!(!message.is_empty());
        }
    }

    #[test]
    fn rejects_nan_infinite_and_huge_numbers_naming_the_field_and_range() {
        let quantised = GOOD
            .replace("dtype = \"float32\"\nresize", "dtype = \"int8\"\nresize")
            .replace(
                "offset = 0.0\n",
                "offset = 0.0\n[input.quantization]\nscale = 0.0039215689\nzero_point = -128\n",
            );
        parse(&quantised).unwrap();
        let scale = "scale = 0.00392156862745098";
        let mut cases = Vec::new();
        for bad in ["nan", "inf", "-inf", "1e30", "-1e30"] {
            cases.push((
                GOOD.replace(scale, &format!("scale = {bad}")),
                "input.scale",
                "-1000 to 1000",
            ));
            cases.push((
                GOOD.replace("offset = 0.0", &format!("offset = {bad}")),
                "input.offset",
                "-1000 to 1000",
            ));
            cases.push((
                quantised.replace("scale = 0.0039215689", &format!("scale = {bad}")),
                "input.quantization.scale",
                "(0, 1000]",
            ));
        }
        cases.push((
            quantised.replace("zero_point = -128", "zero_point = 128"),
            "input.quantization.zero_point",
            "-128 to 127",
        ));
        cases.push((
            GOOD.replace("embedding_dim = 6144", "embedding_dim = 1048577"),
            "model.embedding_dim",
            "1 to 1048576",
        ));
        for (text, expected, range) in cases {
            let (field, message) = field_error(&text);
            assert_eq!(field, expected, "{message}");
            assert!(message.contains(range), "{field}: {message}");
        }
    }

    #[test]
    fn rejects_unsupported_enum_values() {
        let (field, message) = field_error(&GOOD.replace("\"bilinear\"", "\"lanczos\""));
        assert_eq!(field, "<parse>");
        assert!(
            message.contains("lanczos") && message.contains("bilinear"),
            "{message}"
        );
    }

    #[test]
    fn checksum_mismatch_and_missing_model_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let manifest_path = dir.path().join("m.toml");
        std::fs::write(&manifest_path, GOOD).unwrap();
        let m = ModelManifest::load(&manifest_path).unwrap();
        let err = m.verify_model_file().unwrap_err().to_string();
        assert!(
            err.contains("m.tflite") && err.contains("cannot be read"),
            "{err}"
        );

        std::fs::write(dir.path().join("m.tflite"), b"TFL3 but not the model").unwrap();
        let err = m.verify_model_file().unwrap_err();
        assert!(
            matches!(err, ManifestError::ChecksumMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("bfbd7251"), "{err}");
    }

    #[test]
    fn a_stamp_skips_the_hash_only_for_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.tflite");
        std::fs::write(&model, b"TFL3 model bytes").unwrap();
        let sha = file_sha256(&model).unwrap();
        let manifest_path = dir.path().join("m.toml");
        std::fs::write(
            &manifest_path,
            GOOD.replace(
                "bfbd7251e59942aa05fef9c574a79fa89d91542283cda75b55a0bebb63c0ff47",
                &sha,
            ),
        )
        .unwrap();
        let m = ModelManifest::load(&manifest_path).unwrap();
        let stamp = dir.path().join("cache.verified");

        assert!(
            !m.verify_model_with_stamp(&std::fs::read(&model).unwrap(), &stamp)
                .unwrap(),
            "first start hashes"
        );
        assert!(stamp.is_file());
        assert!(
            m.verify_model_with_stamp(&std::fs::read(&model).unwrap(), &stamp)
                .unwrap(),
            "second start uses the stamp"
        );

        // Same length, different bytes, written in place: the change time moves, so it is hashed
        // again and refused.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&model, b"TFL3 model BYTES").unwrap();
        let err = m
            .verify_model_with_stamp(&std::fs::read(&model).unwrap(), &stamp)
            .unwrap_err();
        assert!(
            matches!(err, ManifestError::ChecksumMismatch { .. }),
            "{err}"
        );

        // A stamp for another manifest's checksum does not vouch for this one.
        std::fs::write(&model, b"TFL3 model bytes").unwrap();
        assert!(!m
            .verify_model_with_stamp(&std::fs::read(&model).unwrap(), &stamp)
            .unwrap());
        let other = std::fs::read_to_string(&stamp)
            .unwrap()
            .replacen(&sha, &"0".repeat(64), 1);
        std::fs::write(&stamp, other).unwrap();
        assert!(!m
            .verify_model_with_stamp(&std::fs::read(&model).unwrap(), &stamp)
            .unwrap());
    }
}
