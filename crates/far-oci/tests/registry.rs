//! far-oci against a real registry (Debian's docker-registry on loopback): push, resolve, pull,
//! unpack, build ext4, the cache, mirrors, and each failure's message.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use far_oci::push::push_dir;
use far_oci::{ImageStore, Limits, OciError, RegistryConfig};
use far_testkit::registry::Registry;

fn plain_http() -> RegistryConfig {
    RegistryConfig {
        plain_http_loopback: true,
        ..RegistryConfig::default()
    }
}

/// A small root filesystem: an executable, a nested file, a symlink.
fn sample_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::write(root.join("usr/local/bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        root.join("usr/local/bin/hello"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(root.join("boot/vmlinuz"), vec![0x4b; 100_000]).unwrap();
    std::os::unix::fs::symlink("usr/local/bin", root.join("bin")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("escape")).unwrap();
    dir
}

fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test]
async fn a_pushed_directory_comes_back_as_files_and_an_ext4_volume_and_stays_cached() {
    let registry = Registry::start();
    let tree = sample_tree();
    let reference = format!("{}/far/sample:1", registry.addr());
    let digest = push_dir(tree.path(), &reference, plain_http())
        .await
        .unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    // The same tree pushes to the same digest: the layer is deterministic.
    let again = push_dir(
        tree.path(),
        &format!("{}/far/sample:2", registry.addr()),
        plain_http(),
    )
    .await
    .unwrap();
    assert_eq!(again, digest);

    let cache = tempfile::tempdir().unwrap();
    let store = ImageStore::open(cache.path(), plain_http(), Limits::default()).unwrap();
    let image = store.resolve(&reference).await.unwrap();
    assert_eq!(image.digest, digest);
    assert!(!store.is_cached(&image));

    let kernel = store.file(&image, "boot/vmlinuz").await.unwrap();
    assert_eq!(std::fs::read(&kernel).unwrap().len(), 100_000);
    assert!(store.is_cached(&image));
    let missing = store.file(&image, "boot/initrd.img").await.unwrap_err();
    assert_eq!(
        missing.to_string(),
        format!("image {reference} has no file \"boot/initrd.img\"")
    );
    // The image's symlinks are followed inside it, never out of it.
    assert!(store.file(&image, "bin/hello").await.is_ok());
    assert!(matches!(
        store.file(&image, "escape").await,
        Err(OciError::MissingFile { .. })
    ));

    let volume = store.volume(&image).await.unwrap();
    assert_eq!(
        debugfs_cat(&volume, "/usr/local/bin/hello"),
        b"#!/bin/sh\necho hi\n"
    );
    assert_eq!(store.volume(&image).await.unwrap(), volume);

    // Gone registry: a digest-pinned reference still resolves from the cache; a tag cannot.
    let addr = registry.addr().to_owned();
    drop(registry);
    let pinned = store
        .resolve(&format!("{addr}/far/sample@{digest}"))
        .await
        .unwrap();
    assert_eq!(store.volume(&pinned).await.unwrap(), volume);
    let err = store.resolve(&reference).await.unwrap_err();
    assert!(matches!(err, OciError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("registry {addr} is unreachable")),
        "{err}"
    );
    // Nothing left in the work area.
    assert_eq!(
        std::fs::read_dir(cache.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn concurrent_pulls_of_one_image_share_one_download() {
    let registry = Registry::start();
    let tree = sample_tree();
    let reference = format!("{}/far/shared:1", registry.addr());
    push_dir(tree.path(), &reference, plain_http())
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let store = ImageStore::open(cache.path(), plain_http(), Limits::default()).unwrap();
    let image = store.resolve(&reference).await.unwrap();
    let volumes = futures::future::join_all((0..8).map(|_| store.volume(&image))).await;
    let first = volumes[0].as_ref().unwrap();
    assert!(volumes.iter().all(|v| v.as_ref().unwrap() == first));
    assert_eq!(
        std::fs::read_dir(cache.path().join("images/sha256"))
            .unwrap()
            .count(),
        1
    );
}

#[tokio::test]
async fn a_mirror_serves_another_registrys_references() {
    let registry = Registry::start();
    let tree = sample_tree();
    let local = format!("{}/microscaler/tiffany-vm:v0.3.1", registry.addr());
    let digest = push_dir(tree.path(), &local, plain_http()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let config = RegistryConfig {
        mirrors: [("ghcr.io".to_owned(), registry.addr().to_owned())].into(),
        ..plain_http()
    };
    let store = ImageStore::open(cache.path(), config, Limits::default()).unwrap();
    let image = store
        .resolve("ghcr.io/microscaler/tiffany-vm:v0.3.1")
        .await
        .unwrap();
    assert_eq!(image.digest, digest);
    assert!(store.file(&image, "usr/local/bin/hello").await.is_ok());
}

#[tokio::test]
async fn failures_name_their_cause() {
    let registry = Registry::start();
    let cache = tempfile::tempdir().unwrap();
    let store = ImageStore::open(cache.path(), plain_http(), Limits::default()).unwrap();

    let unknown = format!("{}/far/nothing:1", registry.addr());
    let err = store.resolve(&unknown).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("image {unknown} not found in its registry")
    );

    let err = store.resolve("ghcr.io/Bad Name:1").await.unwrap_err();
    assert!(matches!(err, OciError::BadReference { .. }), "{err:?}");

    // Plain HTTP is for loopback only, and only when asked for.
    let https_only = ImageStore::open(
        &cache.path().join("strict"),
        RegistryConfig::default(),
        Limits::default(),
    )
    .unwrap();
    let tree = sample_tree();
    let reference = format!("{}/far/sample:1", registry.addr());
    push_dir(tree.path(), &reference, plain_http())
        .await
        .unwrap();
    assert!(https_only.resolve(&reference).await.is_err());

    // Bounds: a layer larger than allowed is refused before it is downloaded.
    let small = ImageStore::open(
        &cache.path().join("small"),
        plain_http(),
        Limits {
            layer_bytes: 100,
            ..Limits::default()
        },
    )
    .unwrap();
    let image = small.resolve(&reference).await.unwrap();
    let err = small.tree(&image).await.unwrap_err();
    assert!(
        err.to_string().ends_with("exceeds the limit of 100 bytes"),
        "{err}"
    );
}
