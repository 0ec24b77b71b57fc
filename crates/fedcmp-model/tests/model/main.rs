//! The model crate's integration tests, in one binary (one link instead of
//! five): alignment gradients and loaders, the fused decoder kernels,
//! MobileNetV2 and the torch pickle reader, the CLIP/SigLIP towers, and the
//! opt-in real-asset checks.

mod alignment;
mod kernels;
mod mobilenet;
mod real_assets;
mod vit;
