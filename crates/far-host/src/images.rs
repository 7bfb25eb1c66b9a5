//! Where far-host finds the files an image reference names.
//!
//! An image is a directory laid out as an unpacked image: kernel and initrd files by their
//! `filename`, and a volume's filesystem as `rootfs.ext4`. A reference resolves through an alias
//! given to far-host (`--image REF=DIR`, e.g. the agent image the mission's example names), or
//! is itself an absolute directory path (offline use).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// The file holding a volume's filesystem inside an image directory.
pub const VOLUME_FILE: &str = "rootfs.ext4";

/// Why an image could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The reference is neither an alias nor a local path.
    #[error(
        "image {0:?} is not available on this host: give far-host --image {0}=DIR, or use an absolute directory path"
    )]
    NotAvailable(String),
    /// The image has no such file.
    #[error("image {image:?} has no file {filename:?} (looked for {path})")]
    MissingFile {
        /// The reference.
        image: String,
        /// The file asked for.
        filename: String,
        /// Where it was looked for.
        path: String,
    },
    /// A filename that would leave the image.
    #[error("filename {0:?} must be relative, without '..'")]
    BadFilename(String),
}

/// Image references and where they live on this host.
#[derive(Debug, Clone, Default)]
pub struct Images {
    aliases: BTreeMap<String, PathBuf>,
}

impl Images {
    /// With these `REF -> DIR` aliases.
    pub fn new(aliases: BTreeMap<String, PathBuf>) -> Self {
        Self { aliases }
    }

    fn dir(&self, image: &str) -> Result<PathBuf, ImageError> {
        if let Some(dir) = self.aliases.get(image) {
            return Ok(dir.clone());
        }
        if image.starts_with('/') {
            return Ok(PathBuf::from(image));
        }
        Err(ImageError::NotAvailable(image.to_owned()))
    }

    /// The path of `filename` inside `image`.
    ///
    /// # Errors
    /// [`ImageError`] naming the image and file.
    pub fn file(&self, image: &str, filename: &str) -> Result<PathBuf, ImageError> {
        let relative = Path::new(filename);
        if filename.is_empty()
            || relative.is_absolute()
            || relative
                .components()
                .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(ImageError::BadFilename(filename.to_owned()));
        }
        let path = self.dir(image)?.join(relative);
        if !path.is_file() {
            return Err(ImageError::MissingFile {
                image: image.to_owned(),
                filename: filename.to_owned(),
                path: path.display().to_string(),
            });
        }
        Ok(path)
    }

    /// The filesystem of a volume built from `image`.
    ///
    /// # Errors
    /// [`ImageError`] naming the image.
    pub fn volume(&self, image: &str) -> Result<PathBuf, ImageError> {
        self.file(image, VOLUME_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_through_aliases_and_absolute_paths_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.path().join(VOLUME_FILE), b"fs").unwrap();
        let images = Images::new([("ghcr.io/x/kernel:1".to_owned(), dir.path().to_owned())].into());
        assert_eq!(
            images.file("ghcr.io/x/kernel:1", "vmlinuz").unwrap(),
            dir.path().join("vmlinuz")
        );
        let local = dir.path().to_str().unwrap();
        assert_eq!(images.volume(local).unwrap(), dir.path().join(VOLUME_FILE));

        assert_eq!(
            images
                .file("docker.io/library/busybox:1", "vmlinuz")
                .unwrap_err()
                .to_string(),
            "image \"docker.io/library/busybox:1\" is not available on this host: give far-host --image docker.io/library/busybox:1=DIR, or use an absolute directory path"
        );
        assert!(matches!(
            images.file(local, "boot/vmlinux"),
            Err(ImageError::MissingFile { .. })
        ));
        assert_eq!(
            images.file(local, "../etc/passwd"),
            Err(ImageError::BadFilename("../etc/passwd".into()))
        );
    }
}
