//! Atomic file writing: the one way the dev setup and the agent put files
//! on disk. A reader sees the old contents or the new, never a torn file.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Who may read the written file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Owner only (mode 0600 on Unix): keys, tokens.
    Private,
    /// The process umask decides (certificates, policy, addresses).
    Shared,
}

/// A write that did not happen; the target is unchanged.
#[derive(Debug, thiserror::Error)]
#[error("`{}`: {source}", path.display())]
pub struct WriteError {
    /// The file that failed (the target, or its temporary sibling).
    pub path: PathBuf,
    /// What the OS said.
    #[source]
    pub source: std::io::Error,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError {
        path: path.to_owned(),
        source,
    }
}

/// A fresh, unguessable temporary name next to `path` (same directory, so
/// the rename is atomic): a file planted in advance under a predictable name
/// can neither be reused nor block the write.
fn temp_path(path: &Path) -> Result<PathBuf, WriteError> {
    use ring::rand::SecureRandom as _;
    let mut rnd = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut rnd)
        .map_err(|_| WriteError {
            path: path.to_owned(),
            source: std::io::Error::other("no system randomness"),
        })?;
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".");
    for b in rnd {
        name.push(format!("{b:02x}"));
    }
    name.push(".tmp");
    Ok(path.with_file_name(name))
}

/// Refuse a target that is a symbolic link: whoever planted it wanted the
/// secret somewhere else (the rename would replace the link, but a caller
/// that meant to write *through* it is told, not surprised).
fn refuse_symlink(path: &Path) -> Result<(), WriteError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(WriteError {
            path: path.to_owned(),
            source: std::io::Error::other("is a symbolic link; refusing to write through it"),
        }),
        _ => Ok(()),
    }
}

/// Write `contents` to `path` atomically: create a temporary file in the same
/// directory exclusively (`O_CREAT|O_EXCL`, which never follows a link),
/// fsync it, rename it over `path`, fsync the directory.
/// `Access::Private` creates it with mode 0600 from the start, so the
/// contents are never readable by others, not even briefly.
pub fn write_atomic(path: &Path, contents: &[u8], access: Access) -> Result<(), WriteError> {
    refuse_symlink(path)?;
    let tmp = temp_path(path)?;
    let written = write_new(&tmp, contents, access).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(err(path))?;
        sync_parent(path);
        Ok(())
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_new(tmp: &Path, contents: &[u8], access: Access) -> Result<(), WriteError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = access;
    let mut f = opts.open(tmp).map_err(err(tmp))?;
    f.write_all(contents).map_err(err(tmp))?;
    f.sync_all().map_err(err(tmp))
}

/// Make the rename itself durable. Best effort: not every platform lets a
/// directory be opened and synced, and the data is already safe in the file.
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        write_atomic(&p, b"one", Access::Private).unwrap();
        write_atomic(&p, b"two", Access::Private).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("token")]);
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        write_atomic(&p, b"secret", Access::Private).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_failed_write_names_the_path_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir").join("f");
        let e = write_atomic(&p, b"x", Access::Shared).unwrap_err();
        assert!(e.to_string().contains("missing-dir"), "{e}");
    }
}
