//! Local directories under `LOCAL_FILES_DOCUMENT_ROOT`.
//!
//! Listing walks the tree depth-first with each directory's entries sorted, so
//! keys come out in component-wise order (`Path` ordering); that order is what
//! a resumed run's `start_after` is compared in. Directory symlinks are never
//! followed (no loops, no escapes); file symlinks are followed only when their
//! target stays inside the storage's own directory: two storages under one
//! document root (two tenants, say) cannot read each other's files through
//! a link.
use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, UNIX_EPOCH},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, stream::BoxStream};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{
    BackendKind, GetRange, KeyShape, ListError, ListOptions, Object, ObjectMeta, Page, Role,
    Storage, StorageEnv, check_key, paginate,
};
use crate::{Error, Result, security::paths};

/// The `config` object of a `local` storage (docs/API.md); unknown keys are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Absolute directory under the document root.
    pub path: String,
}

impl LocalConfig {
    pub fn parse(config: &serde_json::Value, env: &StorageEnv) -> Result<Self> {
        let config: LocalConfig = serde_json::from_value(config.clone()).map_err(|e| {
            Error::invalid(
                "invalid_config",
                Some("config"),
                format!("local config: {e}"),
            )
        })?;
        let root = paths::document_root(env.document_root.as_deref())?;
        paths::confine(&root, &config.path)?;
        Ok(config)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "path": self.path })
    }
}

/// Set when dropped: tells a blocking write that its caller is gone.
#[derive(Default)]
struct Dropped(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A directory under `LOCAL_FILES_DOCUMENT_ROOT`; keys are paths relative to
/// it. Nothing is read or written outside the storage's directory, and
/// directory symlinks are not followed; puts write aside and rename. No
/// presign.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
    base: PathBuf,
}

impl LocalStorage {
    pub fn new(config: LocalConfig, env: &StorageEnv) -> Result<Self> {
        let root = paths::document_root(env.document_root.as_deref())?;
        let base = paths::confine(&root, &config.path)?;
        Ok(LocalStorage { root, base })
    }

    /// The file behind a key, resolved and checked to stay in the storage's
    /// directory. It agrees with listing: no symlinked directory on the way,
    /// and a symlinked file only when its target is a file inside the
    /// storage's directory.
    fn object_path(&self, key: &str) -> Result<PathBuf> {
        check_key(key, KeyShape::Path)?;
        let path = self.base.join(key);
        let not_listed = |why: &str| Error::NotFound(format!("{key}: {why}"));
        let parent = path.parent().unwrap_or(&self.base);
        // `base` is canonical and the key has only plain segments, so the
        // parent resolves to itself exactly when no segment is a symlink.
        let real_parent = parent
            .canonicalize()
            .map_err(|e| io_error(&self.root, parent, e))?;
        if real_parent != parent {
            return Err(not_listed(
                "goes through a symlinked directory, which the storage does not list",
            ));
        }
        let canonical = path
            .canonicalize()
            .map_err(|e| io_error(&self.root, &path, e))?;
        if !canonical.starts_with(&self.base) || !canonical.is_file() {
            return Err(not_listed("not a file inside the storage's directory"));
        }
        Ok(canonical)
    }

    /// Checks that the file opened for `key` is inside the storage's
    /// directory, as its path was when checked: a directory on the way
    /// swapped for a symlink between the check and the open (by whoever
    /// writes the directory) would lead elsewhere. Linux names an open
    /// file's path in `/proc/self/fd`; where it cannot be read, the check
    /// made on the path stands.
    fn check_opened(&self, key: &str, file: &fs::File) -> Result<()> {
        use std::os::fd::AsRawFd;
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        match fs::read_link(link) {
            Ok(opened) if !opened.starts_with(&self.base) => Err(Error::NotFound(format!(
                "{key}: not a file inside the storage's directory"
            ))),
            _ => Ok(()),
        }
    }

    /// The file behind `key`, opened for reading and checked: a regular
    /// file ([`Self::object_path`]), opened without blocking on a FIFO
    /// swapped in since its path was checked, and inside the storage's
    /// directory as opened ([`Self::check_opened`]); with its path.
    /// Blocking.
    fn open_checked(&self, key: &str) -> Result<(PathBuf, fs::File)> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.object_path(key)?;
        let nonblocking = rustix::fs::OFlags::NONBLOCK.bits() as i32;
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nonblocking)
            .open(&path)
            .map_err(|e| io_error(&self.root, &path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| io_error(&self.root, &path, e))?;
        if !meta.is_file() {
            return Err(Error::NotFound(format!("{key}: not a file")));
        }
        self.check_opened(key, &file)?;
        Ok((path, file))
    }

    /// Where an object written under `key` goes. Its parent directories are
    /// created one at a time, each checked to be a real directory before the
    /// next is made in it, so nothing is ever created through a symlink
    /// (inside the root or out of it).
    fn new_object_path(&self, key: &str) -> Result<PathBuf> {
        check_key(key, KeyShape::Path)?;
        let path = self.base.join(key);
        self.real_dirs(key, true)?;
        Ok(path)
    }

    /// Walks the directories of `key` below `base`, refusing any that is
    /// not a real directory; with `create`, makes the missing ones. Returns
    /// false when one is missing (and `create` is off).
    fn real_dirs(&self, key: &str, create: bool) -> Result<bool> {
        let Some((dirs, _name)) = key.rsplit_once('/') else {
            return Ok(true);
        };
        let mut dir = self.base.clone();
        for segment in dirs.split('/') {
            dir.push(segment);
            let meta = match fs::symlink_metadata(&dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    match fs::create_dir(&dir) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                            return Err(io_error(&self.root, &dir, e));
                        }
                        // Made now, or by a concurrent put: look at what is there.
                        _ => fs::symlink_metadata(&dir),
                    }
                }
                other => other,
            };
            match meta {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(Error::invalid(
                        "invalid_key",
                        Some("key"),
                        format!(
                            "{key}: {} is a symlink or a file; objects are written only under real directories of the storage",
                            shown(&self.root, &dir).display()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(io_error(&self.root, &dir, e)),
            }
        }
        Ok(true)
    }
}

/// mtime + size: changes whenever the file is rewritten.
fn file_etag(meta: &fs::Metadata) -> String {
    let nanos = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{:x}", meta.len())
}

/// Characters escaped in `?d=`: enough to keep the query string unambiguous
/// while leaving `/` readable.
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`');

#[async_trait]
impl Storage for LocalStorage {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    fn list(&self, opts: ListOptions) -> BoxStream<'static, Result<Page>> {
        let walker = Walker::new(self.root.clone(), self.base.clone(), opts);
        paginate(walker, |mut walker: Walker| async move {
            // Directory reads block; keep them off the async threads.
            tokio::task::spawn_blocking(move || {
                let page = walker.next_page()?;
                Ok(if page.objects.is_empty() && page.errors.is_empty() {
                    None
                } else {
                    Some((page, walker))
                })
            })
            .await
            .map_err(|e| Error::Internal(format!("listing task failed: {e}")))?
        })
    }

    async fn check(&self, role: Role, _prefix: &str) -> Result<()> {
        let (root, base) = (self.root.clone(), self.base.clone());
        tokio::task::spawn_blocking(move || {
            fs::read_dir(&base).map_err(|e| io_error(&root, &base, e))?;
            if role == Role::Target {
                let probe = base.join(format!(".labelsync-check-{}", ulid::Ulid::new()));
                fs::write(&probe, b"").map_err(|e| io_error(&root, &base, e))?;
                fs::remove_file(&probe).map_err(|e| io_error(&root, &probe, e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("check task failed: {e}")))?
    }

    async fn get(&self, key: &str, range: Option<GetRange>) -> Result<Object> {
        let (this, owned) = (self.clone(), key.to_owned());
        let (path, file) = tokio::task::spawn_blocking(move || this.open_checked(&owned))
            .await
            .map_err(|e| Error::Internal(format!("open task failed: {e}")))??;
        let mut file = tokio::fs::File::from_std(file);
        let meta = file
            .metadata()
            .await
            .map_err(|e| io_error(&self.root, &path, e))?;
        let size = meta.len();
        let body = match range {
            None => tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024).boxed(),
            Some(range) => {
                let Some((start, end)) = range.resolve(size) else {
                    return Err(Error::invalid(
                        "range_not_satisfiable",
                        Some("range"),
                        format!(
                            "{key}: range {} is outside the object ({size} bytes)",
                            range.header()
                        ),
                    ));
                };
                file.seek(io::SeekFrom::Start(start))
                    .await
                    .map_err(|e| io_error(&self.root, &path, e))?;
                tokio_util::io::ReaderStream::with_capacity(file.take(end - start + 1), 64 * 1024)
                    .boxed()
            }
        };
        Ok(Object {
            body,
            size: Some(size),
            etag: Some(file_etag(&meta)),
            content_type: None,
        })
    }

    async fn put(&self, key: &str, body: Bytes, _content_type: Option<&str>) -> Result<()> {
        let path = self.new_object_path(key)?;
        let (root, tmp) = (
            self.root.clone(),
            path.with_file_name(format!(
                ".{}.labelsync-{}",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                ulid::Ulid::new()
            )),
        );
        // Write aside, then rename: a reader never sees half an object. A
        // put dropped meanwhile (its attempt stopped: a cancelled export)
        // renames nothing: the blocking write goes on without it, and its
        // body must not land after a later put of the key.
        let dropped = Dropped::default();
        let given_up = dropped.0.clone();
        tokio::task::spawn_blocking(move || {
            fs::write(&tmp, &body).map_err(|e| io_error(&root, &tmp, e))?;
            if given_up.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = fs::remove_file(&tmp);
                return Err(Error::Transient(format!(
                    "{}: the write was given up",
                    shown(&root, &path).display()
                )));
            }
            fs::rename(&tmp, &path).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io_error(&root, &path, e)
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("write task failed: {e}")))?
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key, KeyShape::Path)?;
        if !self.real_dirs(key, false)? {
            return Ok(()); // its directory is not there: neither is it
        }
        let path = self.base.join(key);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(&self.root, &path, e)),
            _ => Ok(()),
        }
    }

    async fn presign(&self, _key: &str, _ttl: Duration) -> Result<Option<String>> {
        Ok(None)
    }

    fn local_file(&self, key: &str) -> Option<Result<std::fs::File>> {
        Some(self.open_checked(key).map(|(_, file)| file))
    }

    fn task_uri(&self, key: &str) -> String {
        let full = self.base.join(key);
        let relative = full.strip_prefix(&self.root).unwrap_or(&full);
        let relative = relative.to_string_lossy();
        format!(
            "/data/local-files/?d={}",
            utf8_percent_encode(&relative, QUERY_VALUE)
        )
    }
}

/// A path as users may see it: relative to the document root, never the
/// server's layout.
fn shown<'a>(root: &Path, path: &'a Path) -> &'a Path {
    path.strip_prefix(root)
        .unwrap_or(Path::new("<outside the document root>"))
}

/// `ELOOP` (too many levels of symbolic links): `io::ErrorKind::FilesystemLoop`
/// is not stable yet.
const ELOOP: i32 = 40;

/// An I/O error naming the path relative to the document root. Errors a key
/// can cause (a file used as a directory, a symlink loop, a name too long)
/// are the key's fault, not the server's: not found, or an invalid key.
fn io_error(root: &Path, path: &Path, err: io::Error) -> Error {
    // io::Error's text never holds the path, only the OS's reason.
    let msg = format!("{}: {err}", shown(root, path).display());
    match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => Error::NotFound(msg),
        _ if err.raw_os_error() == Some(ELOOP) => Error::NotFound(msg),
        io::ErrorKind::InvalidFilename | io::ErrorKind::InvalidInput => {
            Error::invalid("invalid_key", Some("key"), msg)
        }
        io::ErrorKind::PermissionDenied => Error::PermissionDenied(msg),
        _ => Error::Transient(msg),
    }
}

struct Frame {
    /// Key prefix of this directory ("" or "a/b/").
    dir_key: String,
    /// Entry names not yet visited, sorted descending so `pop` yields ascending.
    pending: Vec<String>,
}

struct Walker {
    root: PathBuf,
    base: PathBuf,
    opts: ListOptions,
    /// The part of the prefix after its last `/`, matched against the names of
    /// the first directory only.
    name_prefix: String,
    stack: Vec<Frame>,
    started: bool,
    /// Subdirectories and entries that could not be read since the last
    /// page: they go out with the next one as per-object errors.
    errors: Vec<ListError>,
}

impl Walker {
    fn new(root: PathBuf, base: PathBuf, opts: ListOptions) -> Self {
        let (dir_key, name_prefix) = match opts.prefix.rfind('/') {
            Some(i) => (
                opts.prefix[..=i].to_owned(),
                opts.prefix[i + 1..].to_owned(),
            ),
            None => (String::new(), opts.prefix.clone()),
        };
        let stack = vec![Frame {
            dir_key,
            pending: Vec::new(),
        }];
        Walker {
            root,
            base,
            opts,
            name_prefix,
            stack,
            started: false,
            errors: Vec::new(),
        }
    }

    /// Notes a part of the tree that cannot be read; the walk goes on.
    fn skip(&mut self, key: String, err: Error) {
        // Reported already by the attempt that listed up to the cursor.
        if self.listed_already(&key) {
            return;
        }
        tracing::warn!(key, %err, "skipping an unreadable part of a local storage");
        self.errors.push(ListError {
            key,
            message: err.to_string(),
            incomplete: true,
        });
    }

    /// The names of directory `dir_key`, sorted descending; a name that is
    /// not UTF-8, which no key can hold, is an error of the listing (shown
    /// with U+FFFD for the bytes it cannot spell) that leaves it complete:
    /// nothing under that name was ever a key.
    fn read_sorted(&mut self, dir_key: &str) -> Result<Vec<String>> {
        let (names, unnamed) = self.read_names(dir_key)?;
        // In the first directory, only names the prefix admits, as shown
        // (so a retry run, whose prefix is the key shown, finds it again).
        let first = self.stack.first().is_some_and(|f| f.dir_key == dir_key);
        for name in unnamed {
            let shown = name.to_string_lossy();
            let key = format!("{dir_key}{shown}");
            if (first && !shown.starts_with(&self.name_prefix)) || self.listed_already(&key) {
                continue;
            }
            self.errors.push(ListError {
                key,
                message: "the file name is not UTF-8, so no key can name it; rename it".into(),
                incomplete: false,
            });
        }
        Ok(names)
    }

    /// The names of directory `dir_key` (sorted descending) and those that
    /// are not UTF-8.
    fn read_names(&self, dir_key: &str) -> Result<(Vec<String>, Vec<std::ffi::OsString>)> {
        let dir = self.base.join(dir_key);
        let (mut names, mut unnamed) = (Vec::new(), Vec::new());
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A prefix naming no directory lists nothing, like an empty bucket prefix.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok((names, unnamed));
            }
            Err(e) => return Err(io_error(&self.root, &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&self.root, &dir, e))?;
            match entry.file_name().into_string() {
                Ok(name) => names.push(name),
                Err(name) => unnamed.push(name),
            }
        }
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok((names, unnamed))
    }

    /// True when every key under directory `dir_key` sorts before `start_after`.
    fn dir_done(&self, dir_key: &str) -> bool {
        let Some(after) = &self.opts.start_after else {
            return false;
        };
        Path::new(dir_key) < Path::new(after.as_str()) && !after.starts_with(dir_key)
    }

    fn next_page(&mut self) -> Result<Page> {
        if !self.started {
            self.started = true;
            self.enter_first_dir()?;
        }
        let mut page = Page::default();
        while page.objects.len() < self.opts.page_size {
            let Some(key) = self.next_key() else {
                break;
            };
            if let Some(object) = self.visit(key)? {
                page.objects.push(object);
            }
        }
        page.errors = std::mem::take(&mut self.errors);
        Ok(page)
    }

    /// Reads the first directory, the one the prefix names. It must resolve
    /// inside the root (a prefix may traverse a symlink or say `..`), and is
    /// entered only if a walk from the base would enter it (no symlinked
    /// directory on the way), so that resolve serves every key listed.
    fn enter_first_dir(&mut self) -> Result<()> {
        let dir_key = self.stack[0].dir_key.clone();
        let first = self.base.join(dir_key.trim_end_matches('/'));
        if let Ok(canonical) = first.canonicalize() {
            if !canonical.starts_with(&self.base) {
                return Err(Error::invalid(
                    "path_outside_document_root",
                    Some("prefix"),
                    "the prefix leads outside the storage's directory",
                ));
            }
            if canonical != first {
                return Err(Error::invalid(
                    "invalid_prefix",
                    Some("prefix"),
                    "the prefix goes through a symlinked directory, which local storages do not follow",
                ));
            }
        }
        self.stack[0].pending = self.read_sorted(&dir_key)?;
        Ok(())
    }

    /// The key of the next entry in walk order (in the first directory, only
    /// names the prefix admits); `None` once the walk is over.
    fn next_key(&mut self) -> Option<String> {
        loop {
            let frame = self.stack.last_mut()?;
            let Some(name) = frame.pending.pop() else {
                self.stack.pop();
                continue;
            };
            let top_level = self.stack.len() == 1;
            if top_level && !name.starts_with(&self.name_prefix) {
                continue;
            }
            let dir_key = &self.stack[self.stack.len() - 1].dir_key;
            return Some(format!("{dir_key}{name}"));
        }
    }

    /// One entry of the walk: a file past the cursor is listed; a directory
    /// is entered (see [`Self::descend`]); anything else, or an entry gone
    /// or unreadable (noted by [`Self::skip`]), lists nothing.
    fn visit(&mut self, key: String) -> Result<Option<ObjectMeta>> {
        let path = self.base.join(&key);
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            // Removed since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                self.skip(key, io_error(&self.root, &path, e));
                return Ok(None);
            }
        };
        let Some(meta) = self.follow_symlink(&key, &path, meta)? else {
            return Ok(None);
        };
        if meta.is_dir() {
            self.descend(format!("{key}/"));
            return Ok(None);
        }
        if !meta.is_file() || self.listed_already(&key) {
            return Ok(None);
        }
        Ok(Some(ObjectMeta {
            key,
            size: i64::try_from(meta.len()).ok(),
            last_modified: meta.modified().ok().map(DateTime::<Utc>::from),
            etag: Some(file_etag(&meta)),
        }))
    }

    /// `meta` itself, or for a symlink its target's metadata when the target
    /// is a file inside the storage's directory; `None` for any other
    /// symlink.
    fn follow_symlink(
        &self,
        key: &str,
        path: &Path,
        meta: fs::Metadata,
    ) -> Result<Option<fs::Metadata>> {
        if !meta.file_type().is_symlink() {
            return Ok(Some(meta));
        }
        match path.canonicalize() {
            Ok(target) if target.starts_with(&self.base) && target.is_file() => {
                fs::metadata(&target)
                    .map(Some)
                    .map_err(|e| io_error(&self.root, &target, e))
            }
            _ => {
                tracing::debug!(
                    key,
                    "skipping a symlink to a directory or out of the storage's directory"
                );
                Ok(None)
            }
        }
    }

    /// Pushes directory `sub` (its key, ending in `/`) onto the walk, if the
    /// walk is recursive and the cursor is not past all of it.
    fn descend(&mut self, sub: String) {
        if !self.opts.recursive || self.dir_done(&sub) {
            return;
        }
        // One unreadable directory is that directory's error, not the
        // whole listing's.
        match self.read_sorted(&sub) {
            Ok(pending) => self.stack.push(Frame {
                dir_key: sub,
                pending,
            }),
            Err(e) => self.skip(sub, e),
        }
    }

    /// True when `key` sorts at or before `start_after` (an earlier attempt
    /// listed it).
    fn listed_already(&self, key: &str) -> bool {
        self.opts
            .start_after
            .as_ref()
            .is_some_and(|after| Path::new(key) <= Path::new(after.as_str()))
    }
}

/// The local backend as [`super::backend`] lists it.
pub struct Descriptor;

#[async_trait::async_trait]
impl super::Backend for Descriptor {
    fn secret_names(&self) -> &'static [&'static str] {
        &[]
    }

    /// The document root is the server's disk.
    fn acts_as_the_server(&self, _secrets: &[&str]) -> bool {
        true
    }

    fn key_shape(&self) -> super::KeyShape {
        super::KeyShape::Path
    }

    /// The storage's directory relative to the document root (what
    /// `/data/local-files/?d=` paths start with).
    fn uri_location(&self, config: &serde_json::Value, env: &StorageEnv) -> Option<String> {
        let root = crate::security::paths::document_root(env.document_root.as_deref()).ok()?;
        let base = crate::security::paths::confine(&root, config.get("path")?.as_str()?).ok()?;
        Some(
            base.strip_prefix(&root)
                .ok()?
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// The directory under the document root as written, `.` segments and
    /// a trailing `/` dropped (`data/` and `./data` are `data`). Symlinks
    /// are not followed: a link to `data` is another place, whose target
    /// can change.
    fn place(&self, config: &serde_json::Value, env: &StorageEnv) -> Option<serde_json::Value> {
        let c: LocalConfig = serde_json::from_value(config.clone()).ok()?;
        let root = paths::document_root(env.document_root.as_deref()).ok()?;
        let path: std::path::PathBuf = root
            .join(&c.path)
            .components()
            .filter(|part| !matches!(part, std::path::Component::CurDir))
            .collect();
        Some(serde_json::Value::String(
            path.to_string_lossy().into_owned(),
        ))
    }

    async fn validate(
        &self,
        config: &serde_json::Value,
        env: &StorageEnv,
    ) -> Result<serde_json::Value> {
        LocalConfig::parse(config, env).map(|c| c.to_json())
    }

    async fn open(
        &self,
        config: &serde_json::Value,
        _secrets: &super::Secrets,
        env: &StorageEnv,
    ) -> Result<std::sync::Arc<dyn super::Storage>> {
        Ok(std::sync::Arc::new(LocalStorage::new(
            LocalConfig::parse(config, env)?,
            env,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    fn tree() -> (tempfile::TempDir, LocalStorage) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for key in [
            "data/a.jpg",
            "data/b/c.jpg",
            "data/b/d.txt",
            "data/a/x.jpg",
            "data/img1.png",
            "data/sp ace.jpg",
        ] {
            let path = root.join(key);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, key).unwrap();
        }
        let env = StorageEnv {
            document_root: Some(root.clone()),
            ..StorageEnv::default()
        };
        let config = LocalConfig {
            path: root.join("data").to_string_lossy().into_owned(),
        };
        (dir, LocalStorage::new(config, &env).unwrap())
    }

    async fn keys(
        storage: &LocalStorage,
        prefix: &str,
        recursive: bool,
        after: Option<&str>,
    ) -> Vec<String> {
        let opts = ListOptions {
            prefix: prefix.into(),
            recursive,
            start_after: after.map(Into::into),
            page_size: 2,
        };
        let pages: Vec<Page> = storage.list(opts).try_collect().await.unwrap();
        pages
            .into_iter()
            .flat_map(|p| p.objects)
            .map(|o| o.key)
            .collect()
    }

    #[tokio::test]
    async fn lists_in_order_with_prefix_recursion_and_resume() {
        let (_dir, storage) = tree();
        assert_eq!(
            keys(&storage, "", true, None).await,
            [
                "a/x.jpg",
                "a.jpg",
                "b/c.jpg",
                "b/d.txt",
                "img1.png",
                "sp ace.jpg"
            ]
        );
        assert_eq!(
            keys(&storage, "", false, None).await,
            ["a.jpg", "img1.png", "sp ace.jpg"]
        );
        assert_eq!(
            keys(&storage, "b/", true, None).await,
            ["b/c.jpg", "b/d.txt"]
        );
        assert_eq!(
            keys(&storage, "b", true, None).await,
            ["b/c.jpg", "b/d.txt"]
        );
        assert_eq!(keys(&storage, "i", true, None).await, ["img1.png"]);
        assert_eq!(
            keys(&storage, "", true, Some("b/c.jpg")).await,
            ["b/d.txt", "img1.png", "sp ace.jpg"]
        );
        assert_eq!(
            keys(&storage, "", true, Some("a.jpg")).await,
            ["b/c.jpg", "b/d.txt", "img1.png", "sp ace.jpg"]
        );
        assert_eq!(
            storage.task_uri("sp ace.jpg"),
            "/data/local-files/?d=data/sp%20ace.jpg"
        );
    }

    /// A file symlink is followed only to a file of the storage's own
    /// directory: a link to another directory of the document root (another
    /// storage's, another tenant's) is neither listed nor read.
    #[tokio::test]
    async fn file_symlinks_stay_in_the_storage_directory() {
        let (dir, storage) = tree();
        let root = dir.path().canonicalize().unwrap();
        fs::create_dir_all(root.join("other")).unwrap();
        fs::write(root.join("other/secret.jpg"), "another tenant's").unwrap();
        let data = root.join("data");
        std::os::unix::fs::symlink(root.join("other/secret.jpg"), data.join("away.jpg")).unwrap();
        std::os::unix::fs::symlink(data.join("b/c.jpg"), data.join("near.jpg")).unwrap();
        let listed = keys(&storage, "", true, None).await;
        assert!(listed.contains(&"near.jpg".to_owned()), "{listed:?}");
        assert!(!listed.contains(&"away.jpg".to_owned()), "{listed:?}");
        let away = storage.get("away.jpg", None).await;
        assert!(matches!(away, Err(Error::NotFound(_))), "{away:?}");
        assert!(storage.get("near.jpg", None).await.is_ok());
    }

    /// Directory symlinks are not followed, whether met while walking or
    /// named by the prefix, and keys through them are not served.
    #[tokio::test]
    async fn symlinked_directories_are_neither_listed_nor_read() {
        let (dir, storage) = tree();
        let data = dir.path().canonicalize().unwrap().join("data");
        std::os::unix::fs::symlink(data.join("b"), data.join("ln")).unwrap();
        assert!(
            !keys(&storage, "", true, None)
                .await
                .iter()
                .any(|k| k.starts_with("ln"))
        );
        let opts = ListOptions {
            prefix: "ln/".into(),
            recursive: true,
            start_after: None,
            page_size: 10,
        };
        let listed: Result<Vec<Page>> = storage.list(opts).try_collect().await;
        assert!(
            matches!(
                listed,
                Err(Error::Invalid {
                    code: "invalid_prefix",
                    ..
                })
            ),
            "{listed:?}"
        );
        assert!(matches!(
            storage.get("ln/c.jpg", None).await,
            Err(Error::NotFound(_))
        ));
        assert!(storage.get("b/c.jpg", None).await.is_ok());
    }
}
