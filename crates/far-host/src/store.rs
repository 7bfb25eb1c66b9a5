//! VM records on disk: one JSON file per VM, written atomically, so a crash at any moment leaves
//! either the old record or the new one, never a torn one.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::record::{VmRecord, spec_decodes};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The directory of VM records.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// What loading found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Readable records.
    pub records: Vec<VmRecord>,
    /// Files that could not be read, moved aside as `<name>.corrupt` for an operator.
    pub corrupt: Vec<PathBuf>,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

impl Store {
    /// Opens (creating if needed) the record directory under `state_dir`.
    ///
    /// # Errors
    /// [`StoreError`] when the directory cannot be created.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("vms");
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        Ok(Self { dir })
    }

    fn path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.json"))
    }

    /// Saves a record atomically: temporary file, fsync, rename, fsync of the directory.
    ///
    /// # Errors
    /// [`StoreError`] naming the file when any step fails; the previous record is then intact.
    pub fn save(&self, record: &VmRecord) -> Result<(), StoreError> {
        let path = self.path(&record.uid);
        let tmp = self.dir.join(format!(".{}.json.tmp", record.uid));
        let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
        let mut file = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        file.write_all(&bytes).map_err(io("writing", &tmp))?;
        file.sync_all().map_err(io("syncing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("renaming into", &path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &self.dir))?;
        Ok(())
    }

    /// Removes a record; a missing one is not an error.
    ///
    /// # Errors
    /// [`StoreError`] when the file exists and cannot be removed.
    pub fn remove(&self, uid: &str) -> Result<(), StoreError> {
        let path = self.path(uid);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("removing", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Loads every record. Unreadable files are moved aside, not deleted; leftover temporary
    /// files from a crash mid-save are removed (the record they were replacing is intact).
    ///
    /// # Errors
    /// [`StoreError`] when the directory cannot be read.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded::default();
        for entry in fs::read_dir(&self.dir).map_err(io("reading", &self.dir))? {
            let path = entry.map_err(io("reading", &self.dir))?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with(".json.tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let record = fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<VmRecord>(&bytes).ok())
                .filter(|r| spec_decodes(r) && path.file_stem().is_some_and(|s| *s == *r.uid));
            match record {
                Some(record) => loaded.records.push(record),
                None => {
                    let aside = path.with_extension("json.corrupt");
                    fs::rename(&path, &aside).map_err(io("moving aside", &path))?;
                    loaded.corrupt.push(aside);
                }
            }
        }
        loaded.records.sort_by(|a, b| a.uid.cmp(&b.uid));
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flintlock_proto::types::MicroVmSpec;

    fn record(uid: &str) -> VmRecord {
        VmRecord::new(&MicroVmSpec {
            id: "vm".into(),
            uid: Some(uid.into()),
            ..Default::default()
        })
    }

    #[test]
    fn saved_records_load_back_and_removed_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&record("01A")).unwrap();
        let mut b = record("01B");
        store.save(&b).unwrap();
        b.version = 2;
        store.save(&b).unwrap();
        store.remove("01A").unwrap();
        store.remove("01A").unwrap();
        let loaded = Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(loaded.records, [b]);
        assert!(loaded.corrupt.is_empty());
    }

    #[test]
    fn a_torn_write_leaves_the_previous_record_and_garbage_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&record("01A")).unwrap();
        // A crash after writing the temporary file, before the rename.
        fs::write(dir.path().join("vms/.01A.json.tmp"), b"{\"uid\":").unwrap();
        fs::write(dir.path().join("vms/01Z.json"), b"not json").unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.records, [record("01A")]);
        assert_eq!(loaded.corrupt, [dir.path().join("vms/01Z.json.corrupt")]);
        assert!(!dir.path().join("vms/.01A.json.tmp").exists());
    }
}
