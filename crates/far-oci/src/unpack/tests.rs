use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

enum Item<'a> {
    File(&'a str, &'a [u8], u32),
    Dir(&'a str, u32),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    Fifo(&'a str),
}

/// A tar layer with names written raw, so hostile paths (`..`) can be expressed.
fn layer(items: &[Item<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for item in items {
        let mut header = tar::Header::new_gnu();
        let (name, kind, data, link, mode): (&str, EntryType, &[u8], Option<&str>, u32) =
            match *item {
                Item::File(n, d, m) => (n, EntryType::Regular, d, None, m),
                Item::Dir(n, m) => (n, EntryType::Directory, b"", None, m),
                Item::Symlink(n, t) => (n, EntryType::Symlink, b"", Some(t), 0o777),
                Item::HardLink(n, t) => (n, EntryType::Link, b"", Some(t), 0o644),
                Item::Fifo(n) => (n, EntryType::Fifo, b"", None, 0o644),
            };
        let raw = &mut header.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_uid(1000);
        header.set_gid(1000);
        header.set_mtime(0);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn apply(root: &Path, items: &[Item<'_>]) -> Result<Totals, UnpackError> {
    let mut totals = Totals::default();
    apply_layer(root, &layer(items)[..], &Limits::default(), &mut totals)?;
    Ok(totals)
}

#[test]
fn files_directories_links_and_modes_land_inside_the_root() {
    let root = tempfile::tempdir().unwrap();
    let totals = apply(
        root.path(),
        &[
            Item::Dir("./usr/", 0o755),
            Item::File("usr/bin/tool", b"#!/bin/sh\n", 0o4755),
            Item::Symlink("bin", "usr/bin"),
            Item::HardLink("usr/bin/tool2", "usr/bin/tool"),
            Item::File("/etc/hostname", b"agent\n", 0o644),
            Item::Fifo("run/fifo"),
        ],
    )
    .unwrap();
    let r = root.path();
    assert_eq!(fs::read(r.join("usr/bin/tool")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(
        fs::metadata(r.join("usr/bin/tool"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o4755
    );
    if rustix::process::geteuid().is_root() {
        assert_eq!(fs::symlink_metadata(r.join("bin")).unwrap().uid(), 1000);
        assert_eq!(fs::metadata(r.join("usr/bin/tool")).unwrap().gid(), 1000);
    }
    assert_eq!(fs::read_link(r.join("bin")).unwrap(), Path::new("usr/bin"));
    assert_eq!(
        fs::metadata(r.join("usr/bin/tool2")).unwrap().ino(),
        fs::metadata(r.join("usr/bin/tool")).unwrap().ino()
    );
    assert_eq!(fs::read(r.join("etc/hostname")).unwrap(), b"agent\n");
    assert!(!r.join("run/fifo").exists());
    assert_eq!(
        totals,
        Totals {
            entries: 6,
            bytes: 16,
            skipped: 1
        }
    );
}

#[test]
fn parent_dir_components_refuse_the_layer() {
    let root = tempfile::tempdir().unwrap();
    let outside = root.path().join("escaped");
    let inner = root.path().join("root");
    fs::create_dir(&inner).unwrap();
    let err = apply(&inner, &[Item::File("a/../../escaped", b"x", 0o644)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "layer entry \"a/../../escaped\" refused: '..' would leave the image root"
    );
    assert!(!outside.exists());
    let err = apply(&inner, &[Item::HardLink("h", "../escaped")]).unwrap_err();
    assert!(matches!(err, UnpackError::Unsafe { .. }), "{err}");
}

#[test]
fn nothing_is_written_through_a_symlink() {
    let root = tempfile::tempdir().unwrap();
    let inner = root.path().join("root");
    let outside = root.path().join("outside");
    fs::create_dir_all(&inner).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("victim"), b"safe").unwrap();

    // A symlink to the outside, then a file under it: refused.
    let err = apply(
        &inner,
        &[
            Item::Symlink("evil", outside.to_str().unwrap()),
            Item::File("evil/victim", b"owned", 0o644),
        ],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "layer entry \"evil/victim\" refused: its parent evil is a symlink, which is never followed"
    );
    // A symlink at the path itself, then a file of the same name: the symlink is replaced.
    apply(
        &inner,
        &[
            Item::Symlink("link", outside.join("victim").to_str().unwrap()),
            Item::File("link", b"new", 0o644),
        ],
    )
    .unwrap();
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"safe");
    assert_eq!(fs::read(inner.join("link")).unwrap(), b"new");
    assert!(
        !fs::symlink_metadata(inner.join("link"))
            .unwrap()
            .is_symlink()
    );
    // A whiteout under a symlink is refused too: it would delete outside.
    let err = apply(&inner, &[Item::Symlink("out", outside.to_str().unwrap())])
        .and_then(|_| apply(&inner, &[Item::File("out/.wh.victim", b"", 0o644)]))
        .unwrap_err();
    assert!(matches!(err, UnpackError::Unsafe { .. }), "{err}");
    assert!(outside.join("victim").exists());
}

#[test]
fn whiteouts_delete_lower_layers_and_opaque_directories_keep_only_this_layer() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    apply(
        r,
        &[
            Item::File("etc/a", b"1", 0o644),
            Item::File("etc/b", b"1", 0o644),
            Item::File("opt/old/x", b"1", 0o644),
            Item::File("opt/keep", b"1", 0o644),
        ],
    )
    .unwrap();
    apply(
        r,
        &[
            Item::File("etc/.wh.a", b"", 0o644),
            Item::File("opt/new/y", b"2", 0o644),
            Item::File("opt/.wh..wh..opq", b"", 0o644),
        ],
    )
    .unwrap();
    assert!(!r.join("etc/a").exists());
    assert!(r.join("etc/b").exists());
    assert!(!r.join("etc/.wh.a").exists());
    assert!(!r.join("opt/old").exists());
    assert!(!r.join("opt/keep").exists());
    assert_eq!(fs::read(r.join("opt/new/y")).unwrap(), b"2");
    assert!(!r.join("opt/.wh..wh..opq").exists());
}

#[test]
fn a_later_layer_replaces_a_directory_with_a_file_and_back() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    apply(r, &[Item::File("x/inner", b"1", 0o644)]).unwrap();
    apply(r, &[Item::File("x", b"file", 0o600)]).unwrap();
    assert_eq!(fs::read(r.join("x")).unwrap(), b"file");
    apply(r, &[Item::Dir("x", 0o700)]).unwrap();
    assert!(fs::metadata(r.join("x")).unwrap().is_dir());
    assert_eq!(
        fs::metadata(r.join("x")).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn bounds_refuse_oversized_images() {
    let root = tempfile::tempdir().unwrap();
    let limits = Limits {
        layer_bytes: 1 << 20,
        unpacked_bytes: 10,
        entries: 3,
    };
    let mut totals = Totals::default();
    let err = apply_layer(
        root.path(),
        &layer(&[Item::File("big", &[0; 11], 0o644)])[..],
        &limits,
        &mut totals,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "image exceeds the unpacked bytes limit of 10"
    );

    // The bound holds across layers.
    let mut totals = Totals::default();
    let two = layer(&[Item::Dir("a", 0o755), Item::Dir("b", 0o755)]);
    apply_layer(root.path(), &two[..], &limits, &mut totals).unwrap();
    let err = apply_layer(root.path(), &two[..], &limits, &mut totals).unwrap_err();
    assert_eq!(err.to_string(), "image exceeds the entries limit of 3");

    let long = "d/".repeat(2100) + "f";
    let err = apply_layer(
        root.path(),
        &long_name_layer(&long)[..],
        &Limits::default(),
        &mut Totals::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().ends_with("path longer than 4096 bytes"),
        "{err}"
    );
}

/// A GNU long-name entry, for paths beyond the header's 100 bytes.
fn long_name_layer(name: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_size(1);
    header.set_mode(0o644);
    builder.append_data(&mut header, name, &b"x"[..]).unwrap();
    builder.into_inner().unwrap()
}

#[test]
fn a_truncated_layer_is_an_error_not_a_short_file() {
    let root = tempfile::tempdir().unwrap();
    let mut bytes = layer(&[Item::File("f", &[7; 2000], 0o644)]);
    bytes.truncate(1024);
    let err = apply_layer(
        root.path(),
        &bytes[..],
        &Limits::default(),
        &mut Totals::default(),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::Io { .. }), "{err}");
}
