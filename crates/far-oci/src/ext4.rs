//! An ext4 filesystem from a directory tree, with `mkfs.ext4 -d` (e2fsprogs): no loop device,
//! no privileges.

use std::fs;
use std::io;
use std::path::Path;

use tokio::process::Command;

use crate::OciError;

const BLOCK: u64 = 4096;

/// Room for the tree: its blocks, an inode each, and slack for ext4's own structures.
fn size_for(tree: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut pending = vec![tree.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            inodes += 1;
            bytes += meta.len().div_ceil(BLOCK) * BLOCK;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    let size = bytes + bytes / 10 + inodes * 512 + (16 << 20);
    Ok((size, inodes + 1024))
}

/// Builds `out` from `tree`; returns its size in bytes.
///
/// # Errors
/// [`OciError::Mkfs`] with what mkfs.ext4 printed.
pub async fn build(tree: &Path, out: &Path) -> Result<u64, OciError> {
    let (size, inodes) = size_for(tree).map_err(crate::io_error(tree.display().to_string()))?;
    let output = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "far-root",
            "-m",
            "0",
            "-E",
            "root_owner=0:0",
        ])
        .args(["-N", &inodes.to_string(), "-d"])
        .arg(tree)
        .arg(out)
        .arg(format!("{}k", size / 1024))
        .output()
        .await
        .map_err(|e| OciError::Mkfs {
            reason: format!("cannot run mkfs.ext4 (install e2fsprogs): {e}"),
        })?;
    if !output.status.success() {
        return Err(OciError::Mkfs {
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(size)
}
