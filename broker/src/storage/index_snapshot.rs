//! Parquet snapshots of the cohort engine's index, so that a start does not read every
//! patient's index rows back out of SQLite.
//!
//! SQLite stays the record: each patient's current index version is a row of
//! `index_person` under a number (`index_id`) that is never reused, and a version's rows
//! never change. A snapshot is the engine's tables at some moment, as Parquet files; at
//! start the broker loads it, retires the versions it holds that are no longer current,
//! and reads from SQLite only the current versions it lacks (see
//! `Broker::build_engine`). A stale snapshot is therefore never wrong, only slower.
//!
//! Layout under `DATA_DIR/index/`:
//!
//! ```text
//! CURRENT          {"format":2,"snapshot":"snap-…","persons":N,"content_hash":"…"}
//! snap-<id>/       person.parquet condition.parquet measurement.parquet drug.parquet procedure.parquet
//!                  observation_period.parquet
//! ```
//!
//! A snapshot is written whole into a new directory, synced, and only then named by
//! replacing `CURRENT` (write, sync, rename); older directories are removed after. A crash
//! at any point leaves the previous snapshot current. A snapshot whose tables do not hash
//! to the manifest's `content_hash` is refused, and the engine is built from SQLite.
//!
//! The files hold what `index_person`, `index_event` and `index_period` hold (searchable
//! fields under the engine's numbers), so they are owner-only like the database.

use std::path::{Path, PathBuf};

use cohort_query::IndexTables;
use pre_kms::private_fs::{FILE_MODE, private_dir, write_private};
use serde::{Deserialize, Serialize};

// Format 2 added `observation_period.parquet`.
const FORMAT: u32 = 2;
const MANIFEST: &str = "CURRENT";

/// Why a snapshot could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("index snapshot {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("index snapshot manifest {path} is not valid: {message}")]
    Manifest { path: String, message: String },
    #[error("index snapshot {0}: {1}")]
    Tables(String, cohort_query::IndexError),
    #[error(
        "index snapshot {0} does not hold what its manifest says (content hash differs); it is ignored"
    )]
    Mismatch(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    snapshot: String,
    persons: u64,
    content_hash: String,
}

/// The snapshots of one data directory.
#[derive(Debug, Clone)]
pub struct IndexSnapshots {
    dir: PathBuf,
}

impl IndexSnapshots {
    pub fn new(dir: impl Into<PathBuf>) -> IndexSnapshots {
        IndexSnapshots { dir: dir.into() }
    }

    /// Whether a snapshot (current, or left by a write a crash interrupted) is on disk.
    pub fn exists(&self) -> bool {
        std::fs::read_dir(&self.dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name == MANIFEST || is_snapshot_name(&name)
            })
        })
    }

    /// The current snapshot, or `None` if none was ever written.
    pub fn load(&self) -> Result<Option<IndexTables>, SnapshotError> {
        let path = self.dir.join(MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io(&path, source)),
        };
        let bad = |message: String| SnapshotError::Manifest {
            path: path.display().to_string(),
            message,
        };
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if manifest.format != FORMAT {
            return Err(bad(format!(
                "format {} (this broker reads format {FORMAT})",
                manifest.format
            )));
        }
        if !is_snapshot_name(&manifest.snapshot) {
            return Err(bad(format!(
                "{:?} is not a snapshot name",
                manifest.snapshot
            )));
        }
        let dir = self.dir.join(&manifest.snapshot);
        let tables = IndexTables::read_parquet_dir(&dir)
            .map_err(|e| SnapshotError::Tables(dir.display().to_string(), e))?;
        if hex::encode(tables.content_hash()) != manifest.content_hash
            || tables.persons() as u64 != manifest.persons
        {
            return Err(SnapshotError::Mismatch(dir.display().to_string()));
        }
        Ok(Some(tables))
    }

    /// Writes `tables` (compacted) as the current snapshot, and removes older ones.
    pub fn write(&self, tables: &IndexTables) -> Result<(), SnapshotError> {
        self.write_replacing(tables, false)
    }

    /// Writes `tables` as the current snapshot and destroys the older ones (their files
    /// overwritten before removal): after an erasure, so that the erased patient's rows
    /// are gone from disk, not only unnamed.
    pub fn write_destroying_older(&self, tables: &IndexTables) -> Result<(), SnapshotError> {
        self.write_replacing(tables, true)
    }

    fn write_replacing(&self, tables: &IndexTables, destroy: bool) -> Result<(), SnapshotError> {
        private_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
        let name = format!("snap-{}", hex::encode(rand::random::<[u8; 8]>()));
        let dir = self.dir.join(&name);
        private_dir(&dir).map_err(|e| io(&dir, e))?;
        let written = (|| {
            tables
                .write_parquet_dir(&dir)
                .map_err(|e| SnapshotError::Tables(dir.display().to_string(), e))?;
            for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
                let path = entry.map_err(|e| io(&dir, e))?.path();
                owner_only(&path)?;
                std::fs::File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io(&path, e))?;
            }
            sync_dir(&dir)?;
            let manifest = Manifest {
                format: FORMAT,
                snapshot: name.clone(),
                persons: tables.persons() as u64,
                content_hash: hex::encode(tables.content_hash()),
            };
            let tmp = self.dir.join(format!("{MANIFEST}.tmp"));
            write_private(
                &tmp,
                &serde_json::to_vec(&manifest).expect("a manifest serializes"),
            )
            .map_err(|e| io(&tmp, e))?;
            let current = self.dir.join(MANIFEST);
            std::fs::rename(&tmp, &current).map_err(|e| io(&current, e))?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        // Older snapshots are no longer named by CURRENT.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let other = entry.file_name().to_string_lossy().into_owned();
                if is_snapshot_name(&other) && other != name {
                    if destroy {
                        pre_kms::private_fs::destroy_dir(&entry.path())
                            .map_err(|e| io(&entry.path(), e))?;
                    } else {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        Ok(())
    }
}

fn is_snapshot_name(name: &str) -> bool {
    name.strip_prefix("snap-")
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn io(path: &Path, source: std::io::Error) -> SnapshotError {
    SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(unix)]
fn owner_only(path: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
        .map_err(|e| io(path, e))
}

#[cfg(not(unix))]
fn owner_only(_: &Path) -> Result<(), SnapshotError> {
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_query::IndexBuilder;
    use model::{CodedEvent, PatientIndex, Person};

    fn tables(ids: &[i64]) -> IndexTables {
        let mut b = IndexBuilder::new();
        for &id in ids {
            let index = PatientIndex {
                person: Person {
                    birth_year: Some(1950 + id as i32),
                    sex: "female".into(),
                },
                conditions: vec![CodedEvent {
                    system: "snomed".into(),
                    code: format!("{}", 38341003 + id),
                    date: "2020-01-02".into(),
                    value: None,
                    unit: String::new(),
                }],
                ..Default::default()
            };
            b.add(id, &index).unwrap();
        }
        b.build()
    }

    #[test]
    fn a_written_snapshot_loads_equal_and_replaces_the_older() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = IndexSnapshots::new(dir.path().join("index"));
        assert!(snaps.load().unwrap().is_none());
        let first = tables(&[1, 2, 3]);
        snaps.write(&first).unwrap();
        let second = first.append(tables(&[4])).unwrap().retire([2]);
        snaps.write(&second).unwrap();
        let loaded = snaps.load().unwrap().expect("a snapshot");
        assert_eq!(loaded.content_hash(), second.content_hash());
        assert_eq!(loaded.persons(), 3);
        assert!(!loaded.holds(2) && loaded.holds(4));
        let snapshots: Vec<_> = std::fs::read_dir(dir.path().join("index"))
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.starts_with("snap-").then_some(n)
            })
            .collect();
        assert_eq!(snapshots.len(), 1, "the older snapshot is removed");
    }

    #[test]
    fn a_damaged_snapshot_is_refused_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = IndexSnapshots::new(dir.path());
        snaps.write(&tables(&[1, 2])).unwrap();
        // The manifest promises other contents than the files hold.
        let path = dir.path().join(MANIFEST);
        let mut manifest: Manifest =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        manifest.content_hash = hex::encode([0u8; 32]);
        std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        assert!(matches!(snaps.load(), Err(SnapshotError::Mismatch(_))));
        // A manifest naming a path outside the index directory.
        manifest.snapshot = "../escape".into();
        std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        assert!(matches!(snaps.load(), Err(SnapshotError::Manifest { .. })));
        std::fs::write(&path, b"not json").unwrap();
        assert!(matches!(snaps.load(), Err(SnapshotError::Manifest { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn snapshot_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let snaps = IndexSnapshots::new(dir.path().join("index"));
        snaps.write(&tables(&[1])).unwrap();
        let mut checked = 0;
        for entry in walk(&dir.path().join("index")) {
            let mode = std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.display());
            checked += 1;
        }
        assert!(checked >= 7, "{checked}");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = vec![dir.to_path_buf()];
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
