//! Confinement of local storages to `LOCAL_FILES_DOCUMENT_ROOT`.
//!
//! The check runs on canonical paths (symlinks resolved, `..` folded), so a
//! path that *looks* inside the root but resolves outside is refused, and so is
//! a symlink inside the storage that points out of the root (see
//! `storage::local`, which re-checks every symlink it meets while listing).
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// The canonical document root, or an error saying how to configure it.
pub fn document_root(root: Option<&Path>) -> Result<PathBuf> {
    let root = root.ok_or_else(|| {
        Error::invalid(
            "local_files_disabled",
            Some("config.path"),
            "local storages need LOCAL_FILES_DOCUMENT_ROOT to be set on the server",
        )
    })?;
    root.canonicalize().map_err(|e| {
        Error::Internal(format!(
            "LOCAL_FILES_DOCUMENT_ROOT {} is not usable: {e}",
            root.display()
        ))
    })
}

/// Refuses a local path given anew (a storage's new or changed
/// `config.path`) with a `..` part, before [`confine`] asks the file
/// system: its answers for a missing, unreadable or existing path would
/// tell the caller what the server's disk holds outside the root. Paths
/// saved before this rule still open through [`confine`], which folds
/// them safely.
pub fn refuse_parent_parts(path: &str) -> Result<()> {
    if !Path::new(path)
        .components()
        .any(|part| part == Component::ParentDir)
    {
        return Ok(());
    }
    Err(Error::invalid(
        "path_outside_document_root",
        Some("config.path"),
        // Not the path itself: an absolute one would show where the root is.
        "config.path has a '..' part: give the directory relative to the document root \
         (LOCAL_FILES_DOCUMENT_ROOT) without one",
    ))
}

/// Resolves a user-given path and checks it lies under `root` (already
/// canonical). A relative path is taken relative to the root, so spec files can
/// be written without knowing where the root is mounted. Returns the canonical path.
pub fn confine(root: &Path, path: &str) -> Result<PathBuf> {
    let field = Some("config.path");
    let given = root.join(path);
    // Messages name the path as the user may see it: relative to the root,
    // never where the root is mounted on the server.
    let shown = given
        .strip_prefix(root)
        .map_or_else(|_| path.to_owned(), |rel| rel.display().to_string());
    let outside = || {
        Error::invalid(
            "path_outside_document_root",
            field,
            format!("path {shown:?} is outside the document root (LOCAL_FILES_DOCUMENT_ROOT)"),
        )
    };
    if !given.starts_with(root) {
        return Err(outside());
    }
    let canonical = given.canonicalize().map_err(|e| {
        Error::invalid(
            "invalid_path",
            field,
            format!("path {shown:?} cannot be opened: {}", e.kind()),
        )
    })?;
    // Checked again after resolution: `..` and symlinks can lead out.
    if !canonical.starts_with(root) {
        return Err(outside());
    }
    if !canonical.is_dir() {
        return Err(Error::invalid(
            "invalid_path",
            field,
            format!("path {shown:?} is not a directory"),
        ));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_dotdot_and_symlinks_out_of_root() {
        let outside = tempfile::tempdir().unwrap();
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        std::fs::create_dir_all(root.join("data")).unwrap();
        let root = root.canonicalize().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();

        assert!(confine(&root, root.join("data").to_str().unwrap()).is_ok());
        let dotdot = format!("{}/data/../..", root.display());
        assert!(matches!(
            confine(&root, &dotdot),
            Err(Error::Invalid {
                code: "path_outside_document_root",
                ..
            })
        ));
        let via_link = root.join("escape");
        assert!(matches!(
            confine(&root, via_link.to_str().unwrap()),
            Err(Error::Invalid {
                code: "path_outside_document_root",
                ..
            })
        ));
        assert_eq!(confine(&root, "data").unwrap(), root.join("data"));
        assert!(matches!(
            confine(&root, "missing/dir"),
            Err(Error::Invalid {
                code: "invalid_path",
                ..
            })
        ));
        for path in [
            root.join("missing").display().to_string(),
            "missing".to_owned(),
            dotdot.clone(),
            via_link.display().to_string(),
        ] {
            let message = confine(&root, &path).unwrap_err().to_string();
            assert!(
                !message.contains(root.to_str().unwrap()),
                "{path}: {message}"
            );
        }
        assert!(matches!(
            confine(&root, "../.."),
            Err(Error::Invalid {
                code: "path_outside_document_root",
                ..
            })
        ));
    }

    #[test]
    fn a_new_path_with_a_parent_part_is_refused_before_the_disk_is_asked() {
        for path in ["../no-such-dir-anywhere", "..", "data/../..", "a/../b"] {
            assert!(
                matches!(
                    refuse_parent_parts(path),
                    Err(Error::Invalid {
                        code: "path_outside_document_root",
                        ..
                    })
                ),
                "{path}"
            );
        }
        for path in ["data", "a/b", "./a", "/srv/root/data"] {
            assert!(refuse_parent_parts(path).is_ok(), "{path}");
        }
    }
}
