//! The methods a comparison can run: every strategy of the registry, then
//! the references (centralized, local-only, the untrained projector).

use fedcmp_strategy::config::NAMES;

use crate::{ExperimentError, Result};

/// One row of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// A federated strategy, by its registry name.
    Strategy(&'static str),
    Centralized,
    LocalOnly,
    /// The untrained projector.
    Init,
}

impl Method {
    /// Every method in report order: the strategies as the registry lists
    /// them, then the references.
    pub fn all() -> Vec<Method> {
        NAMES
            .iter()
            .map(|n| Method::Strategy(n))
            .chain([Method::Centralized, Method::LocalOnly, Method::Init])
            .collect()
    }

    /// The method called `name`.
    pub fn parse(name: &str) -> Result<Method> {
        Self::all()
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                ExperimentError::Invalid(format!(
                    "unknown method {name:?}; known: {}",
                    Self::all()
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
