//! Helpers shared by the test modules (the fixtures themselves come from
//! `fedcmp-testkit`).

pub use fedcmp_testkit::{grey_record, tiny_backbones};

/// A parameter set's exact identity: the sha256 of its names, shapes and
/// little-endian f32 bytes, with its sum and norm (to tell a rounding-level
/// change from a real one when the digest differs).
pub fn fingerprint(params: &fedcmp_core::ParamSet) -> serde_json::Value {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (name, tensor) in params.entries() {
        hash.update(name.as_bytes());
        for d in &tensor.shape {
            hash.update((*d as u64).to_le_bytes());
        }
        for v in &tensor.data {
            hash.update(v.to_le_bytes());
        }
    }
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let sum: f64 = params.flat().map(f64::from).sum();
    let norm: f64 = params
        .flat()
        .map(|v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt();
    serde_json::json!({ "sha256": digest, "sum": sum, "norm": norm })
}
