//! The IDX format (LeCun's MNIST files, also Fashion-MNIST): a big-endian
//! header `0x00 0x00 type ndim`, `ndim` u32 dimensions, then the data.
//! Files may be gzip-compressed (detected by the gzip magic, not the name).

use std::io::Read;
use std::path::Path;

use crate::{DataError, Result};

/// Grayscale images stored row-major, one byte per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// Pixels of image `i` (rows * cols bytes).
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let n = self.rows * self.cols;
        self.pixels.get(i * n..(i + 1) * n)
    }
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Malformed {
                path: path.to_path_buf(),
                message: format!("corrupt gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses the header; returns the dimensions and the data that follows,
/// which must be exactly as long as they say.
fn parse(path: &Path, bytes: &[u8], want_ndim: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |message: String| DataError::Malformed {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic)".to_string()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "element type 0x{:02x} is not unsigned bytes (0x08)",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    if ndim != want_ndim {
        return Err(bad(format!("{ndim} dimensions, expected {want_ndim}")));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad("truncated header".to_string()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let data = &bytes[header..];
    if expected != Some(data.len()) {
        return Err(bad(format!(
            "header promises {} bytes of data ({dims:?}), file holds {}",
            expected.map_or("more than 2^64".to_string(), |n| n.to_string()),
            data.len()
        )));
    }
    Ok((dims, data.to_vec()))
}

/// Reads an IDX3 image file.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    let (dims, pixels) = parse(path, &read_all(path)?, 3)?;
    Ok(IdxImages {
        count: dims[0],
        rows: dims[1],
        cols: dims[2],
        pixels,
    })
}

/// Reads an IDX1 label file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    Ok(parse(path, &read_all(path)?, 1)?.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        v
    }

    #[test]
    fn reads_raw_and_gzip_images_and_labels() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let raw = dir.path().join("img");
        std::fs::write(
            &raw,
            idx(&[2, 2, 3], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        )?;
        let imgs = read_images(&raw)?;
        assert_eq!((imgs.count, imgs.rows, imgs.cols), (2, 2, 3));
        assert_eq!(imgs.image(1), Some(&[6u8, 7, 8, 9, 10, 11][..]));
        assert_eq!(imgs.image(2), None);

        let gz = dir.path().join("labels.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&idx(&[3], &[7, 0, 9]))?;
        std::fs::write(&gz, enc.finish()?)?;
        assert_eq!(read_labels(&gz)?, vec![7, 0, 9]);
        Ok(())
    }

    #[test]
    fn malformed_files_are_clear_errors() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("short");
        std::fs::write(&p, idx(&[2, 2, 2], &[1, 2, 3]))?;
        let msg = read_images(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("promises 8 bytes") && msg.contains("short"),
            "{msg}"
        );
        std::fs::write(&p, b"PK\x03\x04")?;
        assert!(read_labels(&p).is_err());
        std::fs::write(&p, idx(&[3], &[1, 2, 3]))?;
        assert!(
            read_images(&p).is_err(),
            "a label file is not an image file"
        );
        Ok(())
    }
}
