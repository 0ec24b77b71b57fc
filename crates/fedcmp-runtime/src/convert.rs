//! The projector's parameters as candle variables (for training) and as a
//! `ParamSet` (what travels and what strategies aggregate).

use candle_core::{DType, Device, Tensor};
use fedcmp_core::{ParamSet, ParamTensor};
use fedcmp_model::projector::Projector;

use crate::Result;

/// A tensor's values as a `ParamTensor` (f32).
pub fn tensor_to_param(name: &str, t: &Tensor) -> Result<ParamTensor> {
    let data: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(ParamTensor::new(name, t.dims().to_vec(), data)?)
}

/// A `ParamTensor` as a candle tensor of `dtype`.
pub fn param_to_tensor(p: &ParamTensor, dtype: DType) -> Result<Tensor> {
    Ok(Tensor::from_vec(p.data.clone(), p.shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?)
}

/// The projector's current parameters.
pub fn projector_params(projector: &Projector) -> Result<ParamSet> {
    let entries = projector
        .named_params()
        .iter()
        .map(|(name, var)| Ok((name.clone(), tensor_to_param(name, var.as_tensor())?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(ParamSet::new(entries)?)
}

/// Overwrites the projector's parameters with `params` (same layout).
pub fn load_projector(projector: &Projector, params: &ParamSet) -> Result<()> {
    let dtype = projector
        .named_params()
        .first()
        .map(|(_, v)| v.dtype())
        .unwrap_or(DType::F32);
    let values = params
        .entries()
        .iter()
        .map(|(name, p)| Ok((name.clone(), param_to_tensor(p, dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    projector.load(&values)?;
    Ok(())
}

/// Tensors in `like`'s order and names, e.g. optimiser moments.
pub fn tensors_to_params(like: &ParamSet, tensors: &[Tensor]) -> Result<ParamSet> {
    let entries = like
        .entries()
        .iter()
        .zip(tensors)
        .map(|((name, _), t)| Ok((name.clone(), tensor_to_param(name, t)?)))
        .collect::<Result<Vec<_>>>()?;
    let set = ParamSet::new(entries)?;
    like.check_same_layout(&set)?;
    Ok(set)
}

/// A `ParamSet`'s tensors in order.
pub fn params_to_tensors(params: &ParamSet, dtype: DType) -> Result<Vec<Tensor>> {
    params
        .entries()
        .iter()
        .map(|(_, p)| param_to_tensor(p, dtype))
        .collect()
}

/// Writes `params` as a safetensors file (f32), atomically: a `.partial`
/// file renamed into place, so a crash never leaves a half-written file.
pub fn save_params_file(params: &ParamSet, path: &std::path::Path) -> Result<()> {
    let tensors = params
        .entries()
        .iter()
        .map(|(name, p)| Ok((name.clone(), param_to_tensor(p, DType::F32)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    let tmp = path.with_extension("partial");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(crate::io(path))?;
    Ok(())
}

/// Reads a file written by [`save_params_file`] back in `like`'s tensor
/// order, checking names and shapes.
pub fn read_params_file(path: &std::path::Path, like: &ParamSet) -> Result<ParamSet> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    let entries = like
        .entries()
        .iter()
        .map(|(name, _)| {
            let t = tensors.remove(name).ok_or_else(|| {
                crate::RuntimeError::Config(format!("{} has no tensor `{name}`", path.display()))
            })?;
            Ok((name.clone(), tensor_to_param(name, &t)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let set = ParamSet::new(entries)?;
    like.check_same_layout(&set)?;
    Ok(set)
}

/// Reads any file written by [`save_params_file`], tensors in name order
/// (for tools that have no projector at hand to take the order from).
pub fn load_params_file(path: &std::path::Path) -> Result<ParamSet> {
    let tensors: std::collections::BTreeMap<_, _> =
        candle_core::safetensors::load(path, &Device::Cpu)?
            .into_iter()
            .collect();
    let entries = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), tensor_to_param(name, t)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(ParamSet::new(entries)?)
}
