//! Files that hold key material or secrets: created with their final mode from the first byte
//! (never written and then chmod-ed) and flushed to disk before they count as written.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Owner read and write only: keys, shards, decrypted output.
pub const PRIVATE: u32 = 0o600;

/// Creates `path` with `mode`, writes `data` and syncs it. Fails with
/// [`std::io::ErrorKind::AlreadyExists`] rather than overwrite an existing file.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// Replaces `path` atomically with a file of `mode` holding `data`: written and synced under a
/// temporary name beside it, renamed into place, and the directory synced, so a reader (or a
/// crash) sees the old file or the new one, never half of it, and the new one survives a power
/// cut once this returns. The temporary file is removed on failure.
pub fn replace(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = write_new(&tmp, data, mode)
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(
            |()| match path.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(dir) => std::fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            },
        );
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` empty with `mode` if it does not exist yet (an existing file is left as it
/// is), so a file another library then opens is private from its first byte.
pub fn create_if_missing(path: &Path, mode: u32) -> std::io::Result<()> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(mode)
        .open(path)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_files_are_private_new_and_atomically_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new(&path, b"one", PRIVATE).unwrap();
        assert_eq!(mode(&path), PRIVATE);
        let again = write_new(&path, b"two", PRIVATE).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        replace(&path, b"three", PRIVATE).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        assert_eq!(mode(&path), PRIVATE);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        create_if_missing(&path, PRIVATE).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        let db = dir.path().join("db");
        create_if_missing(&db, PRIVATE).unwrap();
        assert_eq!(mode(&db), PRIVATE);
    }
}
