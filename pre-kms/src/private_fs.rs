//! Files and directories that hold secrets (key files, the broker's and proxies' stores,
//! decrypted releases): created readable by their owner only, whatever the umask, and
//! data directories that one process at a time may hold.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Owner read/write/search only.
pub const DIR_MODE: u32 = 0o700;
/// Owner read/write only.
pub const FILE_MODE: u32 = 0o600;

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> io::Result<()> {
    Ok(())
}

/// Creates `path` and any missing parents owner-only; an existing `path` is made
/// owner-only too. Existing parents are left as they are.
pub fn private_dir(path: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    builder.create(path)?;
    set_mode(path, DIR_MODE)
}

/// Makes sure the file at `path` exists and is owner-only, before anything secret is
/// written into it (e.g. before SQLite opens it).
pub fn private_file(path: &Path) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    options.open(path)?;
    set_mode(path, FILE_MODE)
}

/// Writes `bytes` to `path` owner-only, replacing what was there, and syncs it.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    private_file(path)?;
    let mut file = OpenOptions::new().write(true).truncate(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Destroys the file at `path`: its bytes are overwritten with zeroes and synced before
/// it is removed and its directory synced, so that what it held does not linger in the
/// file's blocks (on file systems that overwrite in place; a copy-on-write file system or
/// the device may keep old blocks until they are reused). A missing file is no error.
pub fn destroy_file(path: &Path) -> io::Result<()> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    {
        let mut f = OpenOptions::new().write(true).open(path)?;
        let zeroes = vec![0u8; 1 << 16];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeroes.len() as u64) as usize;
            f.write_all(&zeroes[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    fs::remove_file(path)?;
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Destroys every file under `dir` ([`destroy_file`]), then removes the directory.
pub fn destroy_dir(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            destroy_dir(&entry.path())?;
        } else {
            destroy_file(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// Why a data directory could not be held.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{0} is in use by another process (a broker or proxy already runs on it); stop that one first"
    )]
    Held(String),
    #[error("cannot lock {0}: {1}")]
    Io(String, io::Error),
}

/// An exclusive hold on a data directory, released when dropped (or when the process
/// ends, however it ends: the operating system drops the lock with the file).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock file `dir/LOCK`, or fails at once if another process holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join("LOCK");
        let shown = || dir.display().to_string();
        private_file(&path).map_err(|e| LockError::Io(shown(), e))?;
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| LockError::Io(shown(), e))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(LockError::Held(shown())),
            Err(fs::TryLockError::Error(e)) => Err(LockError::Io(shown(), e)),
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_owner_only_and_existing_ones_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        let file = dir.join("f");
        fs::write(&file, b"x").unwrap();
        set_mode(&file, 0o666).unwrap();
        private_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(
            fs::read(&file).unwrap(),
            b"x",
            "an existing file keeps its bytes"
        );
        write_private(&dir.join("g"), b"secret").unwrap();
        assert_eq!(mode(&dir.join("g")), 0o600);
    }

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(tmp.path()).unwrap();
        let err = DirLock::acquire(tmp.path()).unwrap_err();
        assert!(matches!(err, LockError::Held(_)), "{err}");
        assert!(err.to_string().contains("in use by another process"));
        drop(first);
        DirLock::acquire(tmp.path()).unwrap();
    }
}
