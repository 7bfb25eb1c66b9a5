//! OCI layer unpacking: whatever the layer bytes (tar, or gzip-wrapped tar when the first byte
//! is odd), nothing is written outside the image root, and the bounds hold against
//! decompression bombs.
#![no_main]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use far_oci::unpack::{Limits, Totals, apply_layer};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    layer_bytes: 1 << 20,
    unpacked_bytes: 4 << 20,
    entries: 2_000,
};

/// Every path under `dir`, without following symlinks.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path.clone());
            }
            out.push(path.display().to_string());
        }
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, layer)) = data.split_first() else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let outside = scratch.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"untouched").unwrap();
    let before = listing(&outside);

    // The layer may name the outside directory by absolute path (via symlinks it plants).
    let mut totals = Totals::default();
    let reader: Box<dyn Read> = if mode & 1 == 1 {
        Box::new(flate2::read::GzDecoder::new(layer))
    } else {
        Box::new(layer)
    };
    let _ = apply_layer(&root, reader, &LIMITS, &mut totals);
    // A second layer on top: whiteouts and replacements meet what the first left.
    let _ = apply_layer(&root, layer, &LIMITS, &mut totals);

    let written: u64 = listing(&root)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    assert!(written <= LIMITS.unpacked_bytes, "{written} bytes unpacked");
    assert_eq!(listing(&outside), before, "a layer wrote outside the root");
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"untouched");
    let top = std::fs::read_dir(scratch.path()).unwrap().count();
    assert_eq!(top, 2, "a layer created something beside the root");
    // Writable again for the temporary directory's removal (layers may set 0 modes).
    for path in listing(&root) {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700));
        }
    }
});
