//! The model crate's integration tests, in one binary (one link instead of
//! four): alignment gradients and loaders, MobileNetV2 and the torch pickle
//! reader, the CLIP/SigLIP towers, and the opt-in real-asset checks.

mod alignment;
mod mobilenet;
mod real_assets;
mod vit;
