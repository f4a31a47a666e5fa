//! Named thresholds on the comparison's metrics, read from TOML.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Comparison, FidelityError, Interval};

pub const DEFAULT_GATES: &str = include_str!("../gates/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    pub gates: BTreeMap<String, Gate>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub why: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateResult {
    pub gate: String,
    pub value: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub pass: bool,
    pub why: Option<String>,
    /// Bootstrap confidence interval of the value, for p1/p99 metrics.
    pub ci: Option<Interval>,
}

impl std::fmt::Display for GateResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bound = match (self.min, self.max) {
            (Some(lo), Some(hi)) => format!("in [{lo}, {hi}]"),
            (Some(lo), None) => format!(">= {lo}"),
            (None, Some(hi)) => format!("<= {hi}"),
            (None, None) => "(no bound)".into(),
        };
        let ci = self
            .ci
            .map(|ci| format!(" (95% CI {ci})"))
            .unwrap_or_default();
        write!(
            f,
            "{} {}: {:.4}{ci} (needs {bound})",
            if self.pass { "PASS" } else { "FAIL" },
            self.gate,
            self.value
        )
    }
}

impl Gates {
    pub fn default_gates() -> Gates {
        Self::parse(DEFAULT_GATES, "gates/default.toml").expect("the built-in gates are valid")
    }

    pub fn load(path: &Path) -> Result<Gates, FidelityError> {
        let text = std::fs::read_to_string(path).map_err(|e| FidelityError::Gates {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<Gates, FidelityError> {
        let gates: Gates = toml::from_str(text).map_err(|e| FidelityError::Gates {
            path: path.into(),
            message: e.to_string().replace('\n', " "),
        })?;
        if let Some((name, _)) = gates
            .gates
            .iter()
            .find(|(_, g)| g.min.is_none() && g.max.is_none())
        {
            return Err(FidelityError::Gates {
                path: path.into(),
                message: format!("gate `{name}` has neither min nor max"),
            });
        }
        Ok(gates)
    }

    /// Check every gate against the comparison; an unknown metric name is an error. A gate holds
    /// when its value is not NaN, is `>= min` (if set) and `<= max` (if set).
    pub fn evaluate(
        &self,
        comparison: &Comparison,
        path: &str,
    ) -> Result<Vec<GateResult>, FidelityError> {
        let values = comparison.metric_values();
        self.gates
            .iter()
            .map(|(name, gate)| {
                let value = *values.get(name).ok_or_else(|| FidelityError::Gates {
                    path: path.into(),
                    message: format!(
                        "gate `{name}` names no metric; available: {}",
                        values.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                })?;
                let pass = !value.is_nan()
                    && gate.min.is_none_or(|lo| value >= lo)
                    && gate.max.is_none_or(|hi| value <= hi);
                Ok(GateResult {
                    gate: name.clone(),
                    value,
                    min: gate.min,
                    max: gate.max,
                    pass,
                    why: gate.why.clone(),
                    ci: comparison.confidence_intervals.get(name).copied(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare;

    fn sets() -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let r: Vec<Vec<f32>> = (0..12)
            .map(|i| (0..16).map(|d| ((i * 7 + d * 3) as f32).sin()).collect())
            .collect();
        let c: Vec<Vec<f32>> = r
            .iter()
            .map(|v| v.iter().map(|x| x * 1.001).collect())
            .collect();
        (r, c)
    }

    #[test]
    fn default_gates_pass_a_faithful_candidate_and_fail_a_broken_one() {
        let (r, c) = sets();
        let gates = Gates::parse(
            &DEFAULT_GATES.replace(
                "[gates.head_agreement]\nmin = 0.99",
                "[gates.norm_ratio_min]\nmin = 0.99",
            ),
            "t",
        )
        .unwrap();
        let results = gates
            .evaluate(&compare(&r, &c, None).unwrap(), "t")
            .unwrap();
        assert!(results.iter().all(|g| g.pass), "{results:?}");
        let broken: Vec<Vec<f32>> = r.iter().rev().cloned().collect();
        let results = gates
            .evaluate(&compare(&r, &broken, None).unwrap(), "t")
            .unwrap();
        let failed: Vec<_> = results
            .iter()
            .filter(|g| !g.pass)
            .map(|g| g.gate.as_str())
            .collect();
        assert!(
            failed.contains(&"self_retrieval") && failed.contains(&"sqnr_db_p1"),
            "{failed:?}"
        );
        assert!(results
            .iter()
            .find(|g| !g.pass)
            .unwrap()
            .to_string()
            .starts_with("FAIL"));
    }

    #[test]
    fn unknown_metrics_and_empty_gates_are_errors() {
        let (r, c) = sets();
        let gates = Gates::parse("[gates.centred_cosine_p2]\nmin = 0.9\n", "g.toml").unwrap();
        let err = gates
            .evaluate(&compare(&r, &c, None).unwrap(), "g.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("centred_cosine_p2") && err.contains("centred_cosine_p1"),
            "{err}"
        );
        assert!(Gates::parse("[gates.x]\nwhy = \"\"\n", "g.toml").is_err());
        assert!(Gates::parse("[gates.x]\nminimum = 1\n", "g.toml")
            .unwrap_err()
            .to_string()
            .contains("minimum"));
    }

    #[test]
    fn default_gates_hold_their_thresholds() {
        let gates = Gates::default_gates();
        let bound = |name: &str| {
            let g = &gates.gates[name];
            (g.min, g.max)
        };
        assert_eq!(bound("centred_cosine_p1"), (Some(0.95), None));
        assert_eq!(bound("head_view_delta_p99"), (None, Some(0.33)));
        assert_eq!(bound("sqnr_db_p1"), (Some(20.0), None));
        assert_eq!(bound("top10_overlap_mean"), (Some(0.9), None));
        assert_eq!(bound("self_retrieval"), (Some(0.98), None));
        assert_eq!(bound("head_agreement"), (Some(0.99), None));
        assert_eq!(gates.gates.len(), 6);
        // An orthogonal head-view error of 0.33 is a cosine of 0.95: the two gates agree.
        assert!((1.0 / (1.0f64 + 0.33 * 0.33).sqrt() - 0.95).abs() < 0.002);
    }

    #[test]
    fn a_gate_can_bound_from_above_or_from_both_sides() {
        let (r, c) = sets();
        let cmp = compare(&r, &c, None).unwrap();
        let gates = Gates::parse(
            "[gates.head_view_delta_p99]\nmax = 0.33\n\
             [gates.norm_ratio_median]\nmin = 1.0\nmax = 1.002\n\
             [gates.norm_ratio_max]\nmax = 1.0\n\
             [gates.relative_l2_p1]\nmin = 0.0\nmax = 0.0005\n",
            "g.toml",
        )
        .unwrap();
        let results = gates.evaluate(&cmp, "g.toml").unwrap();
        let get = |name: &str| results.iter().find(|g| g.gate == name).unwrap();
        // c = 1.001·r: no head-view error, norm ratio 1.001, relative error 0.001.
        let delta = get("head_view_delta_p99");
        assert!(delta.pass && delta.value < 1e-5, "{delta:?}");
        assert!(delta.to_string().contains("(needs <= 0.33)"), "{delta}");
        let median = get("norm_ratio_median");
        assert!(
            median.pass && (median.value - 1.001).abs() < 1e-5,
            "{median:?}"
        );
        assert!(median.to_string().contains("in [1, 1.002]"), "{median}");
        let max = get("norm_ratio_max");
        assert!(!max.pass && max.to_string().starts_with("FAIL norm_ratio_max: 1.0010"));
        let rel = get("relative_l2_p1");
        assert!(!rel.pass && (rel.value - 0.001).abs() < 1e-5, "{rel:?}");
        // A broken candidate exceeds the head-view bound.
        let broken: Vec<Vec<f32>> = r.iter().rev().cloned().collect();
        let results = gates
            .evaluate(&compare(&r, &broken, None).unwrap(), "g.toml")
            .unwrap();
        let delta = results
            .iter()
            .find(|g| g.gate == "head_view_delta_p99")
            .unwrap();
        assert!(!delta.pass && delta.value > 1.0, "{delta:?}");
    }

    #[test]
    fn percentile_gates_carry_their_bootstrap_interval() {
        let (r, _) = sets();
        let c: Vec<Vec<f32>> = r
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.iter()
                    .map(|x| x + 0.01 * (i as f32 * 0.37).sin())
                    .collect()
            })
            .collect();
        let cmp = compare(&r, &c, None).unwrap();
        let gates = Gates::parse(
            "[gates.centred_cosine_p1]\nmin = 0.95\n[gates.head_view_delta_p99]\nmax = 0.33\n\
             [gates.self_retrieval]\nmin = 0.98\n",
            "t",
        )
        .unwrap();
        let results = gates.evaluate(&cmp, "t").unwrap();
        for g in &results {
            match g.gate.as_str() {
                "self_retrieval" => assert!(g.ci.is_none()),
                _ => {
                    let ci = g.ci.unwrap_or_else(|| panic!("{} has no interval", g.gate));
                    assert!(ci.contains(g.value), "{g:?}");
                    assert!(g.to_string().contains("(95% CI ["), "{g}");
                }
            }
        }
    }
}
