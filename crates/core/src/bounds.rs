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
}
