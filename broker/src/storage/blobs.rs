//! Content-addressed envelope blobs on the local file system.
//!
//! A blob lives at `blobs/<first 2 hex>/<BLAKE3 hex>`. A write goes to a temporary file
//! that is fsynced, renamed into place and the directory fsynced, so a blob that was
//! acknowledged survives a crash, and a crash mid-write leaves only a temporary file
//! (cleaned at the next start) and never a torn blob under a real name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    pub fn open(root: &Path) -> io::Result<BlobStore> {
        fs::create_dir_all(root)?;
        // Leftovers of writes that never completed.
        for entry in fs::read_dir(root)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(BlobStore { root: root.to_owned() })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(&name[..2]).join(name)
    }

    /// Stores `bytes` under their BLAKE3 name and returns it. Idempotent.
    pub fn put(&self, bytes: &[u8]) -> io::Result<String> {
        let name = blake3::hash(bytes).to_hex().to_string();
        let path = self.path(&name);
        if path.exists() {
            return Ok(name);
        }
        let dir = path.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir)?;
        let tmp = self.root.join(format!(".tmp-{name}-{}", std::process::id()));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()?;
        Ok(name)
    }

    /// Reads a blob and checks it still hashes to its name.
    pub fn get(&self, name: &str) -> io::Result<Vec<u8>> {
        if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a blob name"));
        }
        let bytes = fs::read(self.path(name))?;
        if blake3::hash(&bytes).to_hex().as_str() != name {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("blob {name} is corrupt")));
        }
        Ok(bytes)
    }
}
