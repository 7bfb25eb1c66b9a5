//! Publishing a directory as a single-layer image: how the dev kernel, the far-init initrd and
//! the stand-in agent reach a registry (`far image push`).

use std::fs;
use std::io::Write;
use std::path::Path;

use oci_client::client::{Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};

use crate::registry::{Registries, RegistryConfig, classify};
use crate::{OciError, io_error};

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// The directory as a gzipped tar layer with fixed owners and times, so the same tree gives the
/// same digest; and the digest of the uncompressed tar (the config's `diff_id`).
fn layer(dir: &Path) -> Result<(Vec<u8>, String), OciError> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut pending = vec![dir.to_owned()];
    let mut entries = Vec::new();
    while let Some(at) = pending.pop() {
        let mut children = fs::read_dir(&at)
            .map_err(io_error(at.display().to_string()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_error(at.display().to_string()))?;
        children.sort();
        for child in children.into_iter().rev() {
            if child.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                pending.push(child.clone());
            }
            entries.push(child);
        }
    }
    entries.sort();
    for path in entries {
        let name = path.strip_prefix(dir).unwrap_or(&path);
        tar.append_path_with_name(&path, name)
            .map_err(io_error(path.display().to_string()))?;
    }
    let plain = tar.into_inner().map_err(io_error("writing the layer"))?;
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&plain)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&plain)
        .map_err(io_error("compressing the layer"))?;
    Ok((
        gz.finish().map_err(io_error("compressing the layer"))?,
        diff_id,
    ))
}

/// Pushes `dir` as a linux/amd64 image to `reference`; returns the manifest's digest.
///
/// # Errors
/// [`OciError`] from reading `dir` or from the registry.
pub async fn push_dir(
    dir: &Path,
    reference: &str,
    registry: RegistryConfig,
) -> Result<String, OciError> {
    let registries = Registries::new(registry);
    let target = registries.locate(reference)?;
    let dir = dir.to_owned();
    let (data, diff_id) = tokio::task::spawn_blocking(move || layer(&dir))
        .await
        .map_err(|e| io_error("building the layer")(std::io::Error::other(e)))??;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let client = registries.client(&target);
    client
        .push(
            &target,
            &[ImageLayer::new(data, LAYER_TYPE.to_owned(), None)],
            Config::new(
                config.to_string().into_bytes(),
                CONFIG_TYPE.to_owned(),
                None,
            ),
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .map_err(|e| classify(&target, e))?;
    client
        .fetch_manifest_digest(&target, &RegistryAuth::Anonymous)
        .await
        .map_err(|e| classify(&target, e))
}
