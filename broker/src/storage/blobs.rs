//! Content-addressed envelope blobs, written in pack files.
//!
//! Every blob is named by the BLAKE3 hash of its bytes. The blobs of one upload are
//! appended to one new pack file (`blobs/<pack>.pack`), which is written to a temporary
//! name, fsynced, renamed into place and its directory fsynced, all before the metadata
//! transaction that points at it commits. So an acknowledged blob survives a crash, a
//! crash mid-write leaves only a temporary file (removed at the next start) or an
//! unreferenced pack, never a torn blob, and an upload costs two fsyncs however many
//! envelopes it carries. Reads check the bytes still hash to the blob's name.
//!
//! Erasure needs the bytes gone from disk, not only unreferenced: a pack holding an erased
//! patient's blobs is rewritten with the others' ([`BlobStore::rewrite_pack`]), the records
//! are pointed at the new pack, and only then is the old one overwritten and removed
//! ([`BlobStore::remove_pack`]).

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

    /// Writes the blobs of pack `pack` that `keep` lists into a new pack and returns
    /// where each now is, so that the blobs it leaves out can be destroyed with the old
    /// pack (erasure). The old pack stays until [`BlobStore::remove_pack`]: the caller
    /// first points its records at the new places, in one transaction, so that a crash
    /// at any moment leaves every kept blob readable. Every kept blob is read back and
    /// checked against its name before it is written again.
    pub fn rewrite_pack(&self, pack: &str, keep: &[BlobLocation]) -> io::Result<Vec<BlobLocation>> {
        if keep.iter().any(|l| l.pack != pack) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a kept blob is not in the pack being rewritten",
            ));
        }
        let blobs = keep
            .iter()
            .map(|l| self.get(l))
            .collect::<io::Result<Vec<_>>>()?;
        let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
        self.put_all(&refs)
    }

    /// Destroys a pack no record points to any more: its bytes are overwritten and
    /// synced before the file is removed ([`pre_kms::private_fs::destroy_file`]).
    pub fn remove_pack(&self, pack: &str) -> io::Result<()> {
        if !is_hex_name(pack, 32) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a pack name",
            ));
        }
        pre_kms::private_fs::destroy_file(&self.pack_path(pack))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packs in the store's directory (their names).
    fn packs(root: &Path) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(root)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.strip_suffix(".pack").map(str::to_owned)
            })
            .collect();
        out.sort();
        out
    }

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

    /// Two patients' blobs share a pack; one is erased: the pack is rewritten with the
    /// other's, the records would move, and the old pack is destroyed. No byte of the
    /// erased blobs is left in the store's directory, and the kept ones read back.
    #[test]
    fn a_pack_rewritten_without_some_blobs_keeps_the_others_and_destroys_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let erased: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                format!("erased patient's envelope {i} ")
                    .repeat(40)
                    .into_bytes()
            })
            .collect();
        let kept: Vec<Vec<u8>> = (0..2)
            .map(|i| {
                format!("kept patient's envelope {i} ")
                    .repeat(40)
                    .into_bytes()
            })
            .collect();
        let all: Vec<&[u8]> = [&erased[0], &kept[0], &erased[1], &erased[2], &kept[1]]
            .iter()
            .map(|b| b.as_slice())
            .collect();
        let locs = store.put_all(&all).unwrap();
        let old = locs[0].pack.clone();
        let keep = vec![locs[1].clone(), locs[4].clone()];
        let moved = store.rewrite_pack(&old, &keep).unwrap();
        assert_ne!(moved[0].pack, old);
        assert_eq!(
            packs(dir.path()).len(),
            2,
            "the old pack stays until removed"
        );
        // A crash here leaves both packs; the records still point at the old one.
        assert_eq!(store.get(&keep[0]).unwrap(), kept[0]);
        store.remove_pack(&old).unwrap();
        store.remove_pack(&old).unwrap();
        assert_eq!(packs(dir.path()), vec![moved[0].pack.clone()]);
        assert_eq!(store.get(&moved[0]).unwrap(), kept[0]);
        assert_eq!(store.get(&moved[1]).unwrap(), kept[1]);
        for entry in fs::read_dir(dir.path()).unwrap() {
            let bytes = fs::read(entry.unwrap().path()).unwrap();
            for e in &erased {
                assert!(!bytes.windows(64).any(|w| e.windows(64).next() == Some(w)));
            }
        }
        // A kept blob that is not in the pack is refused; a bad pack name too.
        assert!(store.rewrite_pack(&old, &moved).is_err());
        assert!(store.remove_pack("../x").is_err());
    }
}
