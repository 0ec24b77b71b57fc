//! Image preprocessing for a frozen vision encoder: resize the shorter side,
//! center crop to a square, scale to [0, 1], normalise per channel, and lay
//! out as CHW f32. Grayscale becomes RGB by repeating the channel, as
//! torchvision's and Hugging Face's processors do.

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};

/// How to turn an image into encoder input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    /// Side of the square output.
    pub size: usize,
    /// Shorter side after resizing, before the crop (>= size). torchvision's
    /// ImageNet recipe uses 256 for 224; CLIP/SigLIP resize to the crop size.
    pub resize_to: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// Resize to exactly the crop size (CLIP, SigLIP, and small images).
    pub fn square(size: usize, mean: [f32; 3], std: [f32; 3]) -> Self {
        Self {
            size,
            resize_to: size,
            mean,
            std,
        }
    }

    /// CHW f32 values (3 * size * size) of `img`.
    pub fn apply(&self, img: &DynamicImage) -> Vec<f32> {
        let rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        let short = w.min(h).max(1) as f64;
        let scale = self.resize_to.max(self.size) as f64 / short;
        let nw = ((w as f64 * scale).round() as u32).max(self.size as u32);
        let nh = ((h as f64 * scale).round() as u32).max(self.size as u32);
        let resized = image::imageops::resize(&rgb, nw, nh, FilterType::Triangle);
        let left = (nw - self.size as u32) / 2;
        let top = (nh - self.size as u32) / 2;
        let cropped: RgbImage =
            image::imageops::crop_imm(&resized, left, top, self.size as u32, self.size as u32)
                .to_image();
        let plane = self.size * self.size;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in cropped.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// The same for a raw grayscale buffer (IDX images).
    pub fn apply_gray(&self, pixels: &[u8], rows: usize, cols: usize) -> Option<Vec<f32>> {
        let img = GrayImage::from_raw(cols as u32, rows as u32, pixels.to_vec())?;
        Some(self.apply(&DynamicImage::ImageLuma8(img)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_gray_image_normalises_per_channel() {
        let p = Preprocess::square(4, [0.5, 0.25, 0.0], [0.5, 0.25, 1.0]);
        let out = p.apply_gray(&[255u8; 28 * 28], 28, 28).unwrap_or_default();
        assert_eq!(out.len(), 3 * 16);
        for (c, expected) in [(0, 1.0f32), (1, 3.0), (2, 1.0)] {
            assert!(out[c * 16..(c + 1) * 16]
                .iter()
                .all(|v| (v - expected).abs() < 1e-6));
        }
    }

    #[test]
    fn center_crop_keeps_the_middle_of_a_wide_image() {
        // 6x2 image: left third black, middle white, right third black.
        let mut img = RgbImage::new(6, 2);
        for (x, _, px) in img.enumerate_pixels_mut() {
            *px = if (2..4).contains(&x) {
                image::Rgb([255, 255, 255])
            } else {
                image::Rgb([0, 0, 0])
            };
        }
        let p = Preprocess::square(2, [0.0; 3], [1.0; 3]);
        let out = p.apply(&DynamicImage::ImageRgb8(img));
        assert!(out.iter().all(|v| *v > 0.99), "{out:?}");
    }
}
