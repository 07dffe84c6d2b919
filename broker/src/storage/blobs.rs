//! Content-addressed envelope blobs, written in pack files.
//!
//! Every blob is named by the BLAKE3 hash of its bytes. The blobs of one upload are
//! appended to one new pack file (`blobs/<pack>.pack`), which is written to a temporary
//! name, fsynced, renamed into place and its directory fsynced, all before the metadata
//! transaction that points at it commits. So an acknowledged blob survives a crash, a
//! crash mid-write leaves only a temporary file (removed at the next start) or an
//! unreferenced pack, never a torn blob, and an upload costs two fsyncs however many
//! envelopes it carries. Reads check the bytes still hash to the blob's name.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where a blob lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLocation {
    /// BLAKE3 of the blob, lowercase hex.
    pub name: String,
    pub pack: String,
    pub offset: u64,
    pub length: u64,
}

pub struct BlobStore {
    root: PathBuf,
}

fn is_hex_name(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl BlobStore {
    pub fn open(root: &Path) -> io::Result<BlobStore> {
        fs::create_dir_all(root)?;
        for entry in fs::read_dir(root)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(BlobStore {
            root: root.to_owned(),
        })
    }

    fn pack_path(&self, pack: &str) -> PathBuf {
        self.root.join(format!("{pack}.pack"))
    }

    /// Writes the blobs into one durable pack file and returns where each one is.
    pub fn put_all(&self, blobs: &[&[u8]]) -> io::Result<Vec<BlobLocation>> {
        if blobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pack_hash = blake3::Hasher::new();
        let mut locations = Vec::with_capacity(blobs.len());
        let mut offset = 0u64;
        for b in blobs {
            let name = blake3::hash(b).to_hex().to_string();
            pack_hash.update(name.as_bytes());
            locations.push(BlobLocation {
                name,
                pack: String::new(),
                offset,
                length: b.len() as u64,
            });
            offset += b.len() as u64;
        }
        let pack = pack_hash.finalize().to_hex()[..32].to_string();
        let path = self.pack_path(&pack);
        if !path.exists() {
            let tmp = self
                .root
                .join(format!(".tmp-{pack}-{}", std::process::id()));
            {
                let mut f = io::BufWriter::new(File::create(&tmp)?);
                for b in blobs {
                    f.write_all(b)?;
                }
                f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            }
            fs::rename(&tmp, &path)?;
            File::open(&self.root)?.sync_all()?;
        }
        for l in &mut locations {
            l.pack = pack.clone();
        }
        Ok(locations)
    }

    /// Reads a blob and checks it still hashes to its name.
    pub fn get(&self, at: &BlobLocation) -> io::Result<Vec<u8>> {
        if !is_hex_name(&at.name, 64) || !is_hex_name(&at.pack, 32) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a blob location",
            ));
        }
        let mut f = File::open(self.pack_path(&at.pack))?;
        f.seek(SeekFrom::Start(at.offset))?;
        let mut bytes = vec![0u8; at.length as usize];
        f.read_exact(&mut bytes)?;
        if blake3::hash(&bytes).to_hex().as_str() != at.name {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("blob {} is corrupt", at.name),
            ));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let locs = store
            .put_all(&[b"first".as_slice(), b"second blob"])
            .unwrap();
        assert_eq!(store.get(&locs[0]).unwrap(), b"first");
        assert_eq!(store.get(&locs[1]).unwrap(), b"second blob");
        assert_eq!(
            locs[1].name,
            blake3::hash(b"second blob").to_hex().to_string()
        );
        // Flip a byte of the pack on disk: the read refuses it.
        let path = dir.path().join(format!("{}.pack", locs[1].pack));
        let mut bytes = fs::read(&path).unwrap();
        bytes[6] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert_eq!(
            store.get(&locs[1]).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert!(
            store
                .get(&BlobLocation {
                    name: "x".into(),
                    ..locs[0].clone()
                })
                .is_err()
        );
        // Leftover temporary files are cleaned at open.
        fs::write(dir.path().join(".tmp-abc-1"), b"partial").unwrap();
        BlobStore::open(dir.path()).unwrap();
        assert!(!dir.path().join(".tmp-abc-1").exists());
    }
}
