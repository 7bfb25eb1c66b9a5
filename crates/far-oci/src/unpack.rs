//! Applies image layers to a directory, safely.
//!
//! A layer is untrusted input. The rules, each enforced here and tested below:
//! - every path stays inside the root: a leading `/` is dropped, `..` refuses the layer;
//! - nothing is written through a symlink: a path whose parent is a symlink refuses the layer,
//!   and an existing entry at the path itself is replaced, never written through;
//! - whiteouts (`.wh.NAME`) delete what lower layers put there; an opaque whiteout
//!   (`.wh..wh..opq`) empties the directory of lower layers' entries, keeping this layer's;
//! - hard links point at entries inside the root;
//! - device nodes and FIFOs are skipped (the guest's devtmpfs provides devices);
//! - entries, bytes and path lengths are bounded ([`Limits`]).

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_PATH: usize = 4096;

/// Bounds on what an image may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest compressed layer, in bytes.
    pub layer_bytes: u64,
    /// Largest total of file contents over all layers, in bytes.
    pub unpacked_bytes: u64,
    /// Most entries over all layers.
    pub entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            layer_bytes: 8 << 30,
            unpacked_bytes: 16 << 30,
            entries: 1_000_000,
        }
    }
}

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry would leave the root or write through a symlink.
    #[error("layer entry {path:?} refused: {reason}")]
    Unsafe {
        /// The entry's path as the layer gives it.
        path: String,
        /// Why.
        reason: String,
    },
    /// The image exceeds a bound.
    #[error("image exceeds the {what} limit of {limit}")]
    TooLarge {
        /// Which bound.
        what: &'static str,
        /// Its value.
        limit: u64,
    },
    /// The archive is malformed or the disk failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> UnpackError {
    let context = context.into();
    move |source| UnpackError::Io { context, source }
}

/// What has been unpacked so far, checked against [`Limits`] across layers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Entries seen.
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// Device nodes and FIFOs skipped.
    pub skipped: u64,
}

/// Applies one uncompressed layer (a tar stream) on top of `root`.
///
/// # Errors
/// [`UnpackError`] naming the entry; `root` is then partly written and must be discarded.
pub fn apply_layer(
    root: &Path,
    layer: impl Read,
    limits: &Limits,
    totals: &mut Totals,
) -> Result<(), UnpackError> {
    let privileged = rustix::process::geteuid().is_root();
    let mut archive = tar::Archive::new(layer);
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries().map_err(io_err("reading layer"))? {
        let mut entry = entry.map_err(io_err("reading layer"))?;
        totals.entries += 1;
        if totals.entries > limits.entries {
            return Err(UnpackError::TooLarge {
                what: "entries",
                limit: limits.entries,
            });
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let unsafe_entry = |reason: &str| UnpackError::Unsafe {
            path: shown.clone(),
            reason: reason.to_owned(),
        };
        let relative = relative_path(&raw).map_err(&unsafe_entry)?;
        let Some(name) = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            continue; // The root itself.
        };
        let parent = relative.parent().unwrap_or(Path::new(""));
        ensure_dirs(root, parent).map_err(|r| unsafe_entry(&r))?;

        if name == OPAQUE {
            empty_dir_keeping(root, parent, &written).map_err(io_err(format!("opaque {shown}")))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if !hidden.starts_with(WHITEOUT) {
                remove(&root.join(parent).join(hidden))
                    .map_err(io_err(format!("whiteout {shown}")))?;
            }
            continue;
        }

        let target = root.join(&relative);
        let mode = entry.header().mode().map_err(io_err(&shown))? & 0o7777;
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        remove(&target).map_err(io_err(&shown))?;
                        fs::create_dir(&target).map_err(io_err(&shown))?;
                    }
                    Err(_) => fs::create_dir(&target).map_err(io_err(&shown))?,
                }
                dir_modes.push((target.clone(), mode));
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.header().size().map_err(io_err(&shown))?;
                totals.bytes += size;
                if totals.bytes > limits.unpacked_bytes {
                    return Err(UnpackError::TooLarge {
                        what: "unpacked bytes",
                        limit: limits.unpacked_bytes,
                    });
                }
                remove(&target).map_err(io_err(&shown))?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(&target)
                    .map_err(io_err(&shown))?;
                let copied =
                    io::copy(&mut (&mut entry).take(size), &mut file).map_err(io_err(&shown))?;
                if copied != size {
                    return Err(io_err(&shown)(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "layer ends inside the file",
                    )));
                }
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("symlink without a target"))?;
                remove(&target).map_err(io_err(&shown))?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&link), &target)
                    .map_err(io_err(&shown))?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("hard link without a target"))?;
                let source = relative_path(&link).map_err(&unsafe_entry)?;
                if let Some(dir) = source.parent() {
                    ensure_dirs_exist(root, dir).map_err(|r| unsafe_entry(&r))?;
                }
                let source = root.join(source);
                match fs::symlink_metadata(&source) {
                    Ok(meta) if !meta.is_dir() => {}
                    _ => return Err(unsafe_entry("hard link to a missing entry or a directory")),
                }
                remove(&target).map_err(io_err(&shown))?;
                fs::hard_link(&source, &target).map_err(io_err(&shown))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                totals.skipped += 1;
                continue;
            }
            // Metadata entries (PAX, GNU long names) are folded into the next entry by `tar`.
            _ => continue,
        }
        // A hard link shares its source's inode, owner and mode included.
        if privileged && kind != EntryType::Link {
            let uid = entry.header().uid().map_err(io_err(&shown))?;
            let gid = entry.header().gid().map_err(io_err(&shown))?;
            std::os::unix::fs::lchown(&target, Some(uid as u32), Some(gid as u32))
                .map_err(io_err(&shown))?;
        }
        // After the chown, which clears set-user-ID bits.
        if matches!(kind, EntryType::Regular | EntryType::Continuous) {
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(io_err(&shown))?;
        }
        // Ancestors count as written too: an opaque whiteout keeps this layer's whole paths.
        for path in relative.ancestors() {
            if !written.insert(path.to_path_buf()) {
                break;
            }
        }
    }
    // Directory modes last, deepest first, so a read-only directory does not stop its children.
    dir_modes.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
    for (path, mode) in dir_modes {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(io_err(path.display().to_string()))?;
    }
    Ok(())
}

/// A layer path as a relative path with normal components only.
fn relative_path(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.len() > MAX_PATH {
        return Err("path longer than 4096 bytes");
    }
    let path = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("'..' would leave the image root"),
            Component::Prefix(_) => return Err("not a Unix path"),
        }
    }
    Ok(out)
}

/// Creates the directories of `relative` under `root`, refusing to pass through a symlink or a
/// non-directory.
fn ensure_dirs(root: &Path, relative: &Path) -> Result<(), String> {
    let mut at = root.to_path_buf();
    for part in relative.components() {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.is_symlink() => {
                return Err(format!(
                    "its parent {} is a symlink, which is never followed",
                    at.strip_prefix(root).unwrap_or(&at).display()
                ));
            }
            Ok(_) => {
                return Err(format!(
                    "its parent {} is not a directory",
                    at.strip_prefix(root).unwrap_or(&at).display()
                ));
            }
            Err(_) => fs::create_dir(&at).map_err(|e| format!("creating {}: {e}", at.display()))?,
        }
    }
    Ok(())
}

/// Like [`ensure_dirs`] but creates nothing.
fn ensure_dirs_exist(root: &Path, relative: &Path) -> Result<(), String> {
    let mut at = root.to_path_buf();
    for part in relative.components() {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            _ => return Err("hard link through a missing directory or a symlink".into()),
        }
    }
    Ok(())
}

/// Removes whatever is at `path` (a symlink itself, never its target). Absent is fine.
fn remove(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes from `dir` everything this layer did not write.
fn empty_dir_keeping(root: &Path, dir: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    for child in fs::read_dir(root.join(dir))? {
        let child = child?;
        let relative = dir.join(child.file_name());
        if !written.contains(&relative) {
            remove(&child.path())?;
        } else if child.file_type()?.is_dir() {
            empty_dir_keeping(root, &relative, written)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
