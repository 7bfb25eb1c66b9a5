//! Where far-host finds the files an image reference names.
//!
//! A reference resolves, in order, through:
//! 1. an alias given to far-host (`--image REF=DIR`): a directory laid out as an unpacked
//!    image, kernel and initrd files by their `filename` and a volume's filesystem prebuilt as
//!    `rootfs.ext4` (offline use, and the guest pieces `scripts/build-guest` makes);
//! 2. an absolute directory path, laid out the same way;
//! 3. the registry that serves it: pulled into far-host's image cache ([`far_oci`]), files
//!    taken from the unpacked image, volumes built from it as ext4.
//!
//! Checking (at CreateMicroVM) never downloads: it resolves a registry reference to its
//! manifest, and looks for files only in images already here. Preparing (when the VM starts)
//! pulls what is missing.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use far_oci::{ImageStore, Limits, OciError, RegistryConfig, Resolved};

/// The file holding a volume's filesystem inside an image directory.
pub const VOLUME_FILE: &str = "rootfs.ext4";

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference is neither an alias nor a local path, and this host pulls nothing.
    #[error(
        "image {0:?} is not available on this host: give --image {0}=DIR, or use an absolute directory path"
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
    /// Pulling from a registry failed.
    #[error(transparent)]
    Oci(#[from] OciError),
}

impl ImageError {
    /// Whether trying again later may succeed (the registry was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, ImageError::Oci(OciError::Unreachable { .. }))
    }
}

/// Where an image's contents are.
enum Source {
    Local(PathBuf),
    Pulled(Arc<ImageStore>, Box<Resolved>),
}

/// Image references and where they live on this host.
#[derive(Debug, Clone, Default)]
pub struct Images {
    aliases: BTreeMap<String, PathBuf>,
    store: Option<Arc<ImageStore>>,
}

/// Whether a use of an image may download it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Check only: resolve references, look into images already here.
    Check,
    /// Pull what is missing.
    Pull,
}

impl Images {
    /// With these `REF -> DIR` aliases, and no registry.
    pub fn new(aliases: BTreeMap<String, PathBuf>) -> Self {
        Self {
            aliases,
            store: None,
        }
    }

    /// Serves `reference` from `dir`.
    #[must_use]
    pub fn with_alias(mut self, reference: &str, dir: PathBuf) -> Self {
        self.aliases.insert(reference.to_owned(), dir);
        self
    }

    /// References that are neither aliases nor paths are pulled into `store`.
    #[must_use]
    pub fn with_store(mut self, store: Arc<ImageStore>) -> Self {
        self.store = Some(store);
        self
    }

    async fn source(&self, image: &str) -> Result<Source, ImageError> {
        if let Some(dir) = self.aliases.get(image) {
            return Ok(Source::Local(dir.clone()));
        }
        if image.starts_with('/') {
            return Ok(Source::Local(PathBuf::from(image)));
        }
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| ImageError::NotAvailable(image.to_owned()))?;
        Ok(Source::Pulled(
            Arc::clone(store),
            Box::new(store.resolve(image).await?),
        ))
    }

    /// The path of `filename` inside `image`; `None` when checking an image not yet pulled.
    ///
    /// # Errors
    /// [`ImageError`] naming the image and file.
    pub async fn file(
        &self,
        image: &str,
        filename: &str,
        fetch: Fetch,
    ) -> Result<Option<PathBuf>, ImageError> {
        let relative = Path::new(filename);
        if filename.is_empty()
            || relative.is_absolute()
            || relative
                .components()
                .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(ImageError::BadFilename(filename.to_owned()));
        }
        match self.source(image).await? {
            Source::Local(dir) => {
                let path = dir.join(relative);
                if !path.is_file() {
                    return Err(ImageError::MissingFile {
                        image: image.to_owned(),
                        filename: filename.to_owned(),
                        path: path.display().to_string(),
                    });
                }
                Ok(Some(path))
            }
            Source::Pulled(store, resolved) => {
                if fetch == Fetch::Check && !store.is_cached(&resolved) {
                    return Ok(None);
                }
                Ok(Some(store.file(&resolved, filename).await?))
            }
        }
    }

    /// The filesystem of a volume built from `image`; `None` when checking an image not yet
    /// pulled.
    ///
    /// # Errors
    /// [`ImageError`] naming the image.
    pub async fn volume(&self, image: &str, fetch: Fetch) -> Result<Option<PathBuf>, ImageError> {
        match self.source(image).await? {
            Source::Local(_) => self.file(image, VOLUME_FILE, fetch).await,
            Source::Pulled(..) if fetch == Fetch::Check => Ok(None),
            Source::Pulled(store, resolved) => Ok(Some(store.volume(&resolved).await?)),
        }
    }
}

/// How a far-host finds images: the command-line flags `far-host` and `far run` share.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ImageArgs {
    /// An image reference served from a local directory instead of a registry (files by
    /// name, volumes prebuilt as rootfs.ext4), e.g.
    /// ghcr.io/microscaler/tiffany-vm:v0.3.1=target/guest/images/tiffany. Repeatable.
    #[arg(long = "image", value_name = "REF=DIR", value_parser = parse_alias)]
    pub aliases: Vec<(String, PathBuf)>,
    /// Pull a registry's images from another registry, keeping repository and tag, e.g.
    /// ghcr.io=127.0.0.1:5000. Repeatable.
    #[arg(long = "registry-mirror", value_name = "HOST=MIRROR", value_parser = parse_mirror)]
    pub mirrors: Vec<(String, String)>,
    /// Talk plain HTTP to registries on loopback addresses (a local registry). Registries
    /// elsewhere are always HTTPS.
    #[arg(long)]
    pub plain_http_loopback: bool,
    /// Where pulled images are cached (by manifest digest).
    #[arg(long, env = "FAR_IMAGE_CACHE", value_name = "DIR")]
    pub image_cache: Option<PathBuf>,
}

fn parse_alias(text: &str) -> Result<(String, PathBuf), String> {
    let (reference, dir) = text
        .split_once('=')
        .ok_or_else(|| format!("--image {text:?}: use REF=DIR"))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| format!("--image {text:?}: {dir}: {e}"))?;
    Ok((reference.to_owned(), dir))
}

fn parse_mirror(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((host, mirror)) if !host.is_empty() && !mirror.is_empty() && !mirror.contains('/') => {
            Ok((host.to_owned(), mirror.to_owned()))
        }
        _ => Err(format!(
            "--registry-mirror {text:?}: use HOST=MIRROR, e.g. ghcr.io=127.0.0.1:5000"
        )),
    }
}

impl ImageArgs {
    /// The images these flags describe, caching pulls in `--image-cache` or else `default_cache`.
    ///
    /// # Errors
    /// When the cache cannot be opened.
    pub fn images(&self, default_cache: &Path) -> Result<Images, OciError> {
        let store = ImageStore::open(
            self.image_cache.as_deref().unwrap_or(default_cache),
            RegistryConfig {
                mirrors: self.mirrors.iter().cloned().collect(),
                plain_http_loopback: self.plain_http_loopback,
                timeout: None,
            },
            Limits::default(),
        )?;
        Ok(Images::new(self.aliases.iter().cloned().collect()).with_store(Arc::new(store)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn references_resolve_through_aliases_and_absolute_paths_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.path().join(VOLUME_FILE), b"fs").unwrap();
        let images = Images::new([("ghcr.io/x/kernel:1".to_owned(), dir.path().to_owned())].into());
        assert_eq!(
            images
                .file("ghcr.io/x/kernel:1", "vmlinuz", Fetch::Check)
                .await
                .unwrap(),
            Some(dir.path().join("vmlinuz"))
        );
        let local = dir.path().to_str().unwrap();
        assert_eq!(
            images.volume(local, Fetch::Pull).await.unwrap(),
            Some(dir.path().join(VOLUME_FILE))
        );

        assert_eq!(
            images
                .file("docker.io/library/busybox:1", "vmlinuz", Fetch::Pull)
                .await
                .unwrap_err()
                .to_string(),
            "image \"docker.io/library/busybox:1\" is not available on this host: give --image docker.io/library/busybox:1=DIR, or use an absolute directory path"
        );
        assert!(matches!(
            images.file(local, "boot/vmlinux", Fetch::Check).await,
            Err(ImageError::MissingFile { .. })
        ));
        assert!(matches!(
            images.file(local, "../etc/passwd", Fetch::Check).await,
            Err(ImageError::BadFilename(f)) if f == "../etc/passwd"
        ));
    }
}
