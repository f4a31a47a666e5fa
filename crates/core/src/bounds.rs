//! Allowed ranges for numbers read from files (device configuration, quality thresholds, model
//! manifests), checked the same way everywhere.
//!
//! Comparisons with NaN are false, so a check written as `value < min || value > max` lets NaN
//! through. [`Bounds::contains`] asks the opposite question (is the value inside?), so NaN, and
//! infinities outside a finite range, are refused.

use std::cmp::Ordering;
use std::fmt;

/// The allowed values of one numeric setting: `min` to `max` inclusive, or with `min` itself
/// excluded ([`Bounds::above`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds<T> {
    pub min: T,
    pub max: T,
    pub min_excluded: bool,
}

impl<T> Bounds<T> {
    /// `min` to `max`, both allowed.
    pub const fn new(min: T, max: T) -> Self {
        Self {
            min,
            max,
            min_excluded: false,
        }
    }

    /// More than `min`, at most `max`.
    pub const fn above(min: T, max: T) -> Self {
        Self {
            min,
            max,
            min_excluded: true,
        }
    }
}

/// A value outside its [`Bounds`]: the key it was read from and a message naming the value and
/// the allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct OutOfBounds {
    pub key: &'static str,
    pub message: String,
}

impl<T: Copy + PartialOrd + fmt::Display> Bounds<T> {
    /// Whether `value` is allowed. NaN never is.
    pub fn contains(&self, value: T) -> bool {
        let above_min = match value.partial_cmp(&self.min) {
            Some(Ordering::Greater) => true,
            Some(Ordering::Equal) => !self.min_excluded,
            Some(Ordering::Less) | None => false,
        };
        above_min
            && matches!(
                value.partial_cmp(&self.max),
                Some(Ordering::Less | Ordering::Equal)
            )
    }

    /// `value` if it is allowed, else an error naming `key`, the value and the allowed range.
    pub fn check(&self, key: &'static str, value: T) -> Result<T, OutOfBounds> {
        if self.contains(value) {
            Ok(value)
        } else {
            Err(OutOfBounds {
                key,
                message: format!("{value} is outside the allowed range {self}"),
            })
        }
    }
}

impl<T: fmt::Display> fmt::Display for Bounds<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min_excluded {
            write!(f, "({}, {}]", self.min, self.max)
        } else {
            write!(f, "{} to {}", self.min, self.max)
        }
    }
}

/// An integer setting whose allowed range, `MIN` to `MAX` inclusive, is part of its type: a value
/// outside it is refused while the file is parsed, where the parser knows the key and the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Ranged<const MIN: u64, const MAX: u64>(u64);

impl<const MIN: u64, const MAX: u64> Ranged<MIN, MAX> {
    pub const BOUNDS: Bounds<u64> = Bounds::new(MIN, MAX);

    /// `value`, or a message naming it and the allowed range.
    pub fn new(value: u64) -> Result<Self, String> {
        if Self::BOUNDS.contains(value) {
            Ok(Self(value))
        } else {
            Err(format!(
                "{value} is outside the allowed range {}",
                Self::range()
            ))
        }
    }

    /// A value written in code (a default). Panics when outside the range, which a unit test of
    /// the defaults catches.
    pub const fn of(value: u64) -> Self {
        assert!(MIN <= value && value <= MAX, "a default outside its range");
        Self(value)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The value as a `u32`; a range reaching past `u32::MAX` does not compile.
    pub const fn get_u32(self) -> u32 {
        const { assert!(MAX <= u32::MAX as u64, "the range does not fit a u32") };
        self.0 as u32
    }

    /// The value as a `usize`; a range reaching past `u32::MAX` does not compile.
    pub const fn get_usize(self) -> usize {
        self.get_u32() as usize
    }

    fn range() -> String {
        Self::BOUNDS.to_string()
    }
}

impl<'de, const MIN: u64, const MAX: u64> serde::Deserialize<'de> for Ranged<MIN, MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        u64::try_from(value)
            .map_err(|_| format!("{value} is outside the allowed range {}", Self::range()))
            .and_then(Self::new)
            .map_err(serde::de::Error::custom)
    }
}

/// A decimal setting whose allowed range is part of its type, given in thousandths (const
/// generics take no floats): `MIN_MILLI / 1000` to `MAX_MILLI / 1000` inclusive. NaN and
/// infinities are never in range.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, serde::Serialize)]
#[serde(transparent)]
pub struct RangedFloat<const MIN_MILLI: u64, const MAX_MILLI: u64>(f64);

impl<const MIN_MILLI: u64, const MAX_MILLI: u64> RangedFloat<MIN_MILLI, MAX_MILLI> {
    pub const BOUNDS: Bounds<f64> =
        Bounds::new(MIN_MILLI as f64 / 1000.0, MAX_MILLI as f64 / 1000.0);

    /// `value`, or a message naming it and the allowed range.
    pub fn new(value: f64) -> Result<Self, String> {
        if Self::BOUNDS.contains(value) {
            Ok(Self(value))
        } else {
            Err(format!(
                "{value} is outside the allowed range {}",
                Self::BOUNDS
            ))
        }
    }

    /// A value written in code (a default), in thousandths. Panics when outside the range.
    pub const fn of_milli(milli: u64) -> Self {
        assert!(
            MIN_MILLI <= milli && milli <= MAX_MILLI,
            "a default outside its range"
        );
        Self(milli as f64 / 1000.0)
    }

    pub const fn get(self) -> f64 {
        self.0
    }

    /// The value as a duration, for settings in seconds (finite and non-negative by type).
    pub fn seconds(self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.0)
    }
}

impl<'de, const MIN_MILLI: u64, const MAX_MILLI: u64> serde::Deserialize<'de>
    for RangedFloat<MIN_MILLI, MAX_MILLI>
{
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(f64::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_and_infinities_are_outside_every_finite_range() {
        let b = Bounds::new(0.0f64, 1e6);
        for v in [f64::NAN, -f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(!b.contains(v), "{v}");
        }
        let b = Bounds::above(0.0f32, 120.0);
        for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(!b.contains(v), "{v}");
        }
    }

    #[test]
    fn ends_are_inclusive_unless_excluded() {
        let b = Bounds::new(1i64, 64);
        assert!(b.contains(1) && b.contains(64));
        assert!(!b.contains(0) && !b.contains(65) && !b.contains(i64::MIN));
        let b = Bounds::above(0.0f64, 120.0);
        assert!(!b.contains(0.0) && !b.contains(-0.0));
        assert!(b.contains(f64::MIN_POSITIVE) && b.contains(120.0));
        assert!(!b.contains(120.000_000_000_1));
    }

    #[test]
    fn the_error_names_the_key_the_value_and_the_range() {
        let e = Bounds::new(1i64, 64)
            .check("model.threads", -2)
            .unwrap_err();
        assert_eq!(e.key, "model.threads");
        assert_eq!(e.message, "-2 is outside the allowed range 1 to 64");
        let e = Bounds::new(0.0f32, 1e6)
            .check("min_sharpness", f32::NAN)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "min_sharpness: NaN is outside the allowed range 0 to 1000000"
        );
        let e = Bounds::above(0.0f64, 120.0)
            .check("camera.fps", f64::INFINITY)
            .unwrap_err();
        assert_eq!(e.message, "inf is outside the allowed range (0, 120]");
        assert_eq!(Bounds::new(0.5f64, 2.0).check("k", 0.5), Ok(0.5));
    }

    #[derive(Debug, serde::Deserialize)]
    struct Settings {
        threads: Ranged<1, 64>,
        #[serde(default)]
        limit: Option<Ranged<1, { i64::MAX as u64 }>>,
        seconds: RangedFloat<100, 600_000>,
    }

    fn parse(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn typed_ranges_refuse_values_outside_them_at_parse_time_with_the_key() {
        let ok = parse("threads = 4\nseconds = 2.5\nlimit = 9").unwrap();
        assert_eq!(
            (
                ok.threads.get(),
                ok.seconds.get(),
                ok.limit.map(Ranged::get)
            ),
            (4, 2.5, Some(9))
        );
        assert_eq!(ok.seconds.seconds(), std::time::Duration::from_millis(2500));
        for (text, key, said) in [
            (
                "threads = 0\nseconds = 1.0",
                "threads",
                "0 is outside the allowed range 1 to 64",
            ),
            ("threads = -3\nseconds = 1.0", "threads", "-3 is outside"),
            ("threads = 65\nseconds = 1.0", "threads", "65 is outside"),
            (
                "threads = 1\nseconds = nan",
                "seconds",
                "NaN is outside the allowed range 0.1 to 600",
            ),
            ("threads = 1\nseconds = inf", "seconds", "inf is outside"),
            ("threads = 1\nseconds = 0.05", "seconds", "0.05 is outside"),
            (
                "threads = 1\nseconds = 1.0\nlimit = 0",
                "limit",
                "0 is outside the allowed range 1 to 9223372036854775807",
            ),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(said) && err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn defaults_in_code_are_checked() {
        assert_eq!(Ranged::<1, 64>::of(64).get(), 64);
        assert_eq!(RangedFloat::<0, 60_000>::of_milli(2000).get(), 2.0);
        assert!(std::panic::catch_unwind(|| Ranged::<1, 64>::of(0)).is_err());
    }
}
