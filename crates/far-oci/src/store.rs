//! The image cache: pulled images by manifest digest, unpacked once, their ext4 volume built once.
//!
//! Layout under the store's root:
//! - `images/sha256/<hex>/manifest.json` and `tree/`: an image, complete or absent (it is built
//!   in `tmp/` and renamed into place, so a crash leaves no half image behind);
//! - `images/sha256/<hex>/rootfs.ext4`: its volume, also renamed into place when complete;
//! - `tmp/`: work in progress, emptied when the store opens.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use oci_client::Reference;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::info;

use crate::registry::{Registries, RegistryConfig, classify};
use crate::unpack::{Limits, Totals, apply_layer};
use crate::{OciError, ext4, io_error};

/// An image reference resolved to the manifest it names now.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The reference as asked for.
    pub reference: String,
    /// The manifest's digest (`sha256:...`): the image's identity in the cache.
    pub digest: String,
    source: Reference,
    manifest: OciImageManifest,
}

/// Pulled images on this host.
pub struct ImageStore {
    root: PathBuf,
    limits: Limits,
    registries: Registries,
    /// One pull or build per image at a time; others wait and then find it cached.
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

const LAYER_TYPES: [&str; 6] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

impl ImageStore {
    /// Opens (creating) the store at `root`, discarding unfinished work.
    ///
    /// # Errors
    /// When the directories cannot be made.
    pub fn open(root: &Path, registry: RegistryConfig, limits: Limits) -> Result<Self, OciError> {
        let tmp = root.join("tmp");
        match fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("emptying {}", tmp.display()))(e)),
        }
        for dir in [tmp, root.join("images/sha256")] {
            fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        }
        Ok(Self {
            root: root.to_owned(),
            limits,
            registries: Registries::new(registry),
            busy: Mutex::default(),
        })
    }

    fn image_dir(&self, digest: &str) -> PathBuf {
        self.root
            .join("images/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn scratch(&self) -> PathBuf {
        self.root.join("tmp").join(ulid::Ulid::new().to_string())
    }

    fn lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(busy.entry(digest.to_owned()).or_default())
    }

    /// Resolves `reference` to a manifest. A reference pinned by digest whose image is cached
    /// resolves without the network; a tag is always asked of its registry.
    ///
    /// # Errors
    /// [`OciError`]: a bad reference, an unreachable registry, an unknown image, a layer type
    /// far-host cannot unpack.
    pub async fn resolve(&self, reference: &str) -> Result<Resolved, OciError> {
        let source = self.registries.locate(reference)?;
        if let Some(digest) = source.digest() {
            let cached = self.image_dir(digest).join("manifest.json");
            if let Ok(bytes) = fs::read(&cached)
                && let Ok(manifest) = serde_json::from_slice(&bytes)
            {
                return Ok(Resolved {
                    reference: reference.to_owned(),
                    digest: digest.to_owned(),
                    source,
                    manifest,
                });
            }
        }
        let client = self.registries.client(&source);
        let (manifest, digest) = client
            .pull_image_manifest(&source, &RegistryAuth::Anonymous)
            .await
            .map_err(|e| classify(&source, e))?;
        if let Some(layer) = manifest
            .layers
            .iter()
            .find(|l| !LAYER_TYPES.contains(&l.media_type.as_str()))
        {
            return Err(OciError::UnsupportedLayer {
                image: reference.to_owned(),
                media_type: layer.media_type.clone(),
            });
        }
        Ok(Resolved {
            reference: reference.to_owned(),
            digest,
            source,
            manifest,
        })
    }

    /// The unpacked filesystem of an image, pulled and unpacked on first use.
    ///
    /// # Errors
    /// [`OciError`] from the registry, the bounds or the disk.
    pub async fn tree(&self, image: &Resolved) -> Result<PathBuf, OciError> {
        let dir = self.image_dir(&image.digest);
        let tree = dir.join("tree");
        if tree.is_dir() {
            return Ok(tree);
        }
        let lock = self.lock(&image.digest);
        let _pulling = lock.lock().await;
        if tree.is_dir() {
            return Ok(tree);
        }
        let started = Instant::now();
        let work = self.scratch();
        let result = self.pull_into(image, &work).await;
        let result = result.and_then(|totals| {
            fs::rename(&work, &dir).map_err(io_error(format!("storing {}", dir.display())))?;
            Ok(totals)
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&work);
        }
        let totals = result?;
        info!(
            image = %image.reference,
            digest = %image.digest,
            layers = image.manifest.layers.len(),
            entries = totals.entries,
            bytes = totals.bytes,
            skipped_devices = totals.skipped,
            seconds = started.elapsed().as_secs_f64(),
            "image pulled and unpacked"
        );
        Ok(tree)
    }

    async fn pull_into(&self, image: &Resolved, work: &Path) -> Result<Totals, OciError> {
        let tree = work.join("tree");
        fs::create_dir_all(&tree).map_err(io_error(format!("creating {}", tree.display())))?;
        let mut totals = Totals::default();
        for (index, layer) in image.manifest.layers.iter().enumerate() {
            let blob = work.join(format!("layer-{index}"));
            self.download(image, layer, &blob).await?;
            let limits = self.limits;
            let (tree, gzip) = (tree.clone(), layer.media_type.ends_with("gzip"));
            totals = tokio::task::spawn_blocking(move || {
                let file = fs::File::open(&blob).map_err(io_error(blob.display().to_string()))?;
                let reader = BufReader::new(file);
                let mut totals = totals;
                if gzip {
                    apply_layer(
                        &tree,
                        flate2::read::GzDecoder::new(reader),
                        &limits,
                        &mut totals,
                    )?;
                } else {
                    apply_layer(&tree, reader, &limits, &mut totals)?;
                }
                fs::remove_file(&blob).map_err(io_error(blob.display().to_string()))?;
                Ok::<_, OciError>(totals)
            })
            .await
            .map_err(|e| OciError::Io {
                context: "unpacking a layer".into(),
                source: io::Error::other(e),
            })??;
        }
        let manifest = serde_json::to_vec_pretty(&image.manifest).map_err(|e| OciError::Io {
            context: "encoding the manifest".into(),
            source: e.into(),
        })?;
        fs::write(work.join("manifest.json"), manifest)
            .map_err(io_error("writing manifest.json"))?;
        Ok(totals)
    }

    /// Streams a blob to `path`, checking its size as it comes and its digest at the end.
    async fn download(
        &self,
        image: &Resolved,
        layer: &OciDescriptor,
        path: &Path,
    ) -> Result<(), OciError> {
        let declared = u64::try_from(layer.size).unwrap_or(u64::MAX);
        if declared > self.limits.layer_bytes {
            return Err(OciError::TooLarge {
                image: image.reference.clone(),
                what: format!("layer {} of {declared} bytes", layer.digest),
                limit: self.limits.layer_bytes,
            });
        }
        let client = self.registries.client(&image.source);
        let mut stream = client
            .pull_blob_stream(&image.source, layer)
            .await
            .map_err(|e| classify(&image.source, e))?;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(io_error(path.display().to_string()))?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| OciError::Registry {
                image: image.reference.clone(),
                reason: format!("downloading layer {}: {e}", layer.digest),
            })?;
            received += chunk.len() as u64;
            if received > declared {
                return Err(OciError::Registry {
                    image: image.reference.clone(),
                    reason: format!(
                        "layer {} is larger than its manifest says ({declared} bytes)",
                        layer.digest
                    ),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(io_error(path.display().to_string()))?;
        }
        file.flush()
            .await
            .map_err(io_error(path.display().to_string()))?;
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != layer.digest || received != declared {
            return Err(OciError::Registry {
                image: image.reference.clone(),
                reason: format!(
                    "layer {} arrived as {actual} ({received} of {declared} bytes)",
                    layer.digest
                ),
            });
        }
        Ok(())
    }

    /// The image as an ext4 filesystem (for a root or data volume), built on first use.
    ///
    /// # Errors
    /// [`OciError`] from pulling, or from `mkfs.ext4`.
    pub async fn volume(&self, image: &Resolved) -> Result<PathBuf, OciError> {
        let tree = self.tree(image).await?;
        let volume = self.image_dir(&image.digest).join("rootfs.ext4");
        if volume.is_file() {
            return Ok(volume);
        }
        let lock = self.lock(&image.digest);
        let _building = lock.lock().await;
        if volume.is_file() {
            return Ok(volume);
        }
        let work = self.scratch().with_extension("ext4");
        let built = ext4::build(&tree, &work).await.and_then(|size| {
            fs::rename(&work, &volume)
                .map_err(io_error(format!("storing {}", volume.display())))?;
            Ok(size)
        });
        if built.is_err() {
            let _ = fs::remove_file(&work);
        }
        info!(image = %image.reference, bytes = built.as_ref().ok(), "ext4 volume built");
        built.map(|_| volume)
    }

    /// A file of an image, by its path inside the image.
    ///
    /// # Errors
    /// [`OciError::MissingFile`] when the image has no such regular file.
    pub async fn file(&self, image: &Resolved, filename: &str) -> Result<PathBuf, OciError> {
        let tree = self.tree(image).await?;
        let path = tree.join(filename.trim_start_matches('/'));
        // The image's own symlinks are followed only while they stay inside it.
        let inside = match (path.canonicalize(), tree.canonicalize()) {
            (Ok(real), Ok(tree)) => real.starts_with(tree) && real.is_file(),
            _ => false,
        };
        if inside {
            Ok(path)
        } else {
            Err(OciError::MissingFile {
                image: image.reference.clone(),
                filename: filename.to_owned(),
            })
        }
    }

    /// Whether the image's files are already here (no pull needed).
    pub fn is_cached(&self, image: &Resolved) -> bool {
        self.image_dir(&image.digest).join("tree").is_dir()
    }
}
