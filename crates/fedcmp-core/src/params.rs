//! Named f32 tensors in a fixed order: a projector's parameters, a delta
//! between two of them, a control variate or an optimiser moment. This is
//! what travels between clients and server, so it is plain data (serde),
//! independent of any tensor library.
//!
//! Arithmetic lives in the strategy crate's `ops` module; here are only
//! construction, access and the layout checks every operation relies on.

use serde::{Deserialize, Serialize};

use crate::{CoreError, Result};

/// One tensor: row-major values and a shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl ParamTensor {
    /// Checks that `data` fills `shape`.
    pub fn new(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        // A shape from a site or a file may multiply past usize: that is a
        // shape no data fills, not a number to wrap around.
        let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if n != Some(data.len()) {
            return Err(CoreError::BadTensor {
                name: name.to_string(),
                shape,
                len: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    /// A weight matrix (2-D) as opposed to a bias or gain (1-D).
    pub fn is_matrix(&self) -> bool {
        self.shape.len() == 2
    }

    /// Rows and columns of a matrix.
    pub fn matrix_dims(&self) -> Option<(usize, usize)> {
        match self.shape.as_slice() {
            [r, c] => Some((*r, *c)),
            _ => None,
        }
    }
}

/// Named tensors in a fixed order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ParamSet {
    entries: Vec<(String, ParamTensor)>,
}

impl ParamSet {
    /// Builds a set; names must be unique.
    pub fn new(entries: Vec<(String, ParamTensor)>) -> Result<Self> {
        // A set, not a scan of the names before: a site's message may carry
        // any number of arrays, and the pairwise scan took 31 s on 150,000.
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        for (name, _) in &entries {
            if !seen.insert(name.as_str()) {
                return Err(CoreError::Invalid(format!("duplicate parameter `{name}`")));
            }
        }
        Ok(Self { entries })
    }

    /// All zeros with `template`'s layout.
    pub fn zeros_like(template: &ParamSet) -> Self {
        Self {
            entries: template
                .entries
                .iter()
                .map(|(n, t)| {
                    (
                        n.clone(),
                        ParamTensor {
                            shape: t.shape.clone(),
                            data: vec![0.0; t.data.len()],
                        },
                    )
                })
                .collect(),
        }
    }

    /// Entries in order.
    pub fn entries(&self) -> &[(String, ParamTensor)] {
        &self.entries
    }

    /// Mutable entries in order (names and shapes must not change).
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut ParamTensor> {
        self.entries.iter_mut().map(|(_, t)| t)
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&ParamTensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of scalars.
    pub fn num_values(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.data.len()).sum()
    }

    /// Checks that `other` has the same names, order and shapes.
    pub fn check_same_layout(&self, other: &ParamSet) -> Result<()> {
        if self.entries.len() != other.entries.len() {
            return Err(CoreError::LengthMismatch {
                expected: self.entries.len(),
                got: other.entries.len(),
            });
        }
        for (position, ((a, ta), (b, tb))) in self.entries.iter().zip(&other.entries).enumerate() {
            if a != b {
                return Err(CoreError::NameMismatch {
                    position,
                    expected: a.clone(),
                    got: b.clone(),
                });
            }
            if ta.shape != tb.shape {
                return Err(CoreError::ShapeMismatch {
                    name: a.clone(),
                    expected: ta.shape.clone(),
                    got: tb.shape.clone(),
                });
            }
        }
        Ok(())
    }

    /// All values, concatenated in order (for norms and cosines).
    pub fn flat(&self) -> impl Iterator<Item = f32> + '_ {
        self.entries
            .iter()
            .flat_map(|(_, t)| t.data.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[(&str, Vec<usize>)]) -> Result<ParamSet> {
        ParamSet::new(
            names
                .iter()
                .map(|(n, s)| {
                    let len = s.iter().product();
                    Ok((
                        n.to_string(),
                        ParamTensor::new(n, s.clone(), vec![1.0; len])?,
                    ))
                })
                .collect::<Result<_>>()?,
        )
    }

    /// A shape whose element count overflows is refused, not wrapped
    /// (found by fuzzing the wire decoder: it panicked in debug builds and
    /// wrapped to an empty tensor in release ones).
    #[test]
    fn a_shape_past_usize_fills_no_data() {
        let huge = vec![1usize << 32, 1 << 32];
        assert!(ParamTensor::new("w", huge, vec![]).is_err());
        let wraps_to_one = vec![usize::MAX, usize::MAX];
        assert!(ParamTensor::new("w", wraps_to_one, vec![0.0]).is_err());
    }

    #[test]
    fn duplicate_names_are_refused_wherever_they_are() -> Result<()> {
        let mut entries: Vec<(String, ParamTensor)> = (0..1000)
            .map(|i| Ok((format!("p{i}"), ParamTensor::new("t", vec![1], vec![0.0])?)))
            .collect::<Result<_>>()?;
        assert!(ParamSet::new(entries.clone()).is_ok());
        entries.push(("p517".into(), ParamTensor::new("t", vec![1], vec![0.0])?));
        assert!(ParamSet::new(entries).is_err());
        Ok(())
    }

    #[test]
    fn layout_checks_name_the_difference() -> Result<()> {
        let a = set(&[("w", vec![2, 3]), ("b", vec![2])])?;
        assert!(a.check_same_layout(&ParamSet::zeros_like(&a)).is_ok());
        let b = set(&[("w", vec![3, 2]), ("b", vec![2])])?;
        assert!(matches!(
            a.check_same_layout(&b),
            Err(CoreError::ShapeMismatch { ref name, .. }) if name == "w"
        ));
        let c = set(&[("b", vec![2]), ("w", vec![2, 3])])?;
        assert!(matches!(
            a.check_same_layout(&c),
            Err(CoreError::NameMismatch { position: 0, .. })
        ));
        assert!(ParamTensor::new("x", vec![2, 2], vec![0.0; 3]).is_err());
        assert!(set(&[("w", vec![1]), ("w", vec![1])]).is_err());
        assert_eq!(a.num_values(), 8);
        Ok(())
    }
}
