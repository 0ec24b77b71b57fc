//! The methods a comparison can run: every strategy of the registry, the
//! candidate rules (presets of registry strategies, see [`super::grid`]), then
//! the references (centralized, local-only, the untrained projector).

use fedcmp_strategy::config::NAMES;

use super::grid::CANDIDATES;

use crate::{ExperimentError, Result};

/// One row of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// A federated strategy, by its registry or candidate name.
    Strategy(&'static str),
    Centralized,
    LocalOnly,
    /// The untrained projector.
    Init,
}

impl Method {
    /// The default methods in report order: the strategies as the registry
    /// lists them, then the references (the candidates run when named).
    pub fn all() -> Vec<Method> {
        NAMES
            .iter()
            .map(|n| Method::Strategy(n))
            .chain([Method::Centralized, Method::LocalOnly, Method::Init])
            .collect()
    }

    /// Every method a comparison can run: [`Method::all`] and the
    /// candidates.
    pub fn known() -> Vec<Method> {
        Self::all()
            .into_iter()
            .chain(CANDIDATES.iter().map(|n| Method::Strategy(n)))
            .collect()
    }

    /// The method called `name`.
    pub fn parse(name: &str) -> Result<Method> {
        Self::known()
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                ExperimentError::Invalid(format!(
                    "unknown method {name:?}; known: {}",
                    Self::known()
                        .iter()
                        .map(|m| m.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::Strategy(name) => name,
            Method::Centralized => "centralized",
            Method::LocalOnly => "local-only",
            Method::Init => "init",
        }
    }

    /// True for the references (never tuned, never "best").
    pub fn is_reference(&self) -> bool {
        !matches!(self, Method::Strategy(_))
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
