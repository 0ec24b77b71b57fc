//! Hyper-parameter checks shared by every algorithm's config, with
//! messages that name the field. Kept apart from the registry
//! ([`crate::config`]), which imports every algorithm: the algorithms
//! import only this.

use crate::{Result, StrategyError};

/// `value` must be finite and > 0.
pub(crate) fn positive(field: &str, value: f64) -> Result<()> {
    check(field, value, value.is_finite() && value > 0.0, "> 0")
}

/// `value` must be finite and >= 0.
pub(crate) fn non_negative(field: &str, value: f64) -> Result<()> {
    check(field, value, value.is_finite() && value >= 0.0, ">= 0")
}

/// `value` must be in [0, 1).
pub(crate) fn unit_interval(field: &str, value: f64) -> Result<()> {
    check(field, value, (0.0..1.0).contains(&value), "in [0, 1)")
}

/// `Ok` when `ok`, else a config error: `field` must be `rule`.
pub(crate) fn check(field: &str, value: f64, ok: bool, rule: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(StrategyError::Config {
            field: field.to_string(),
            reason: format!("must be {rule}, got {value}"),
        })
    }
}
