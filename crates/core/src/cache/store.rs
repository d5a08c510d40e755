//! The result store: staging folders, atomic commit of a stage's output under its key, files
//! stored once in `objects/` and hard-linked into each result, the per-stage index `explain`
//! reads, and the human `runs/<pipeline>/<stage>` links.
use super::CacheError;
use super::hash::{TreeDigest, hash_file_uncached, relative_name, tree_digest};
use super::lock::{self, Acquired};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Sub-folders of the cache root (see the module doc of `cache`).
const SUBDIRS: [&str; 11] = [
    "objects",
    "states",
    "results",
    "staging",
    "work",
    "locks",
    "logs",
    "index",
    "runs",
    "records",
    "quarantine",
];

/// What `result.json` records about a committed output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultRecord {
    pub key: String,
    pub stage_id: String,
    pub kind: String,
    /// blake3 over the sorted (relative path, file digest) pairs of `out/`.
    pub output_digest: String,
    pub files: TreeDigest,
    pub size_bytes: u64,
    pub created_unix: u64,
    pub duration_s: f64,
}

/// A handle on one cache root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), CacheError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| CacheError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, bytes).map_err(|e| CacheError::io("write", path, e))
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CacheError> {
    let bytes = std::fs::read(path).map_err(|e| CacheError::io("read", path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| CacheError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Longest file name made from a stage id (file systems allow 255 bytes).
const MAX_FILE_NAME_BYTES: usize = 200;

/// Makes a stage id usable as one file name (ids may contain `/` only by user error); a long
/// sweep variant id keeps its first 180 bytes and gets a hash of the whole id.
pub fn file_name_for(stage_id: &str) -> String {
    let name = stage_id.replace(['/', '\\', '\0'], "_");
    if name.len() <= MAX_FILE_NAME_BYTES {
        return name;
    }
    let mut end = 180;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let hash = blake3::hash(stage_id.as_bytes()).to_hex();
    format!("{}-{}", &name[..end], &hash[..16])
}

impl Store {
    /// Opens (and creates) the cache root and its sub-folders. The root is made absolute:
    /// stages run in other working directories and receive paths inside it.
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        let root = &std::path::absolute(root).map_err(|e| CacheError::io("resolve", root, e))?;
        for sub in SUBDIRS {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| CacheError::io("create", &dir, e))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn result_dir(&self, key: &str) -> PathBuf {
        self.root.join("results").join(key)
    }

    /// The folder downstream stages read: `results/<key>/out`.
    pub fn output_dir(&self, key: &str) -> PathBuf {
        self.result_dir(key).join("out")
    }

    pub fn object_path(&self, digest: &str) -> PathBuf {
        let prefix = digest.get(..2).unwrap_or("__");
        self.root.join("objects").join(prefix).join(digest)
    }

    /// `states/<key>`: the training state (weights, optimizer moments, step) a training
    /// result ended with, kept beside it so a longer run of the same stage can continue from
    /// it (docs/cache.md); not part of the output folder.
    pub fn state_dir(&self, key: &str) -> PathBuf {
        self.root.join("states").join(key)
    }

    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.root.join("work").join(key)
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.root.join("logs").join(format!("{key}.log"))
    }

    pub fn memo_path(&self) -> PathBuf {
        self.root.join("memo.json")
    }

    /// The committed result for `key`, if any (a result without a readable record is a miss).
    pub fn lookup(&self, key: &str) -> Option<ResultRecord> {
        read_json(&self.result_dir(key).join("result.json")).ok()
    }

    /// Why `results/<key>` exists but cannot be used: its record is missing or unreadable.
    /// `None` when there is no such folder or its record reads.
    pub fn unreadable_record(&self, key: &str) -> Option<String> {
        let dir = self.result_dir(key);
        if !dir.is_dir() {
            return None;
        }
        let path = dir.join("result.json");
        let reason = match read_json::<ResultRecord>(&path).err()? {
            CacheError::Io { source, .. } => source.to_string(),
            CacheError::Json { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        Some(format!("`{}` does not read: {reason}", path.display()))
    }

    /// The key material stored beside a result.
    pub fn load_key_material<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        read_json(&self.result_dir(key).join("key.json")).ok()
    }

    /// Blocks (polling `cancel`) until this process holds the lock for `key`, or, once
    /// `reusable()` says the result may be used as it is, a shared lock on it.
    pub fn lock_key(
        &self,
        key: &str,
        cancel: &AtomicBool,
        on_wait: impl FnOnce(),
        reusable: impl FnMut() -> bool,
    ) -> Result<Acquired, CacheError> {
        lock::acquire(&self.lock_path(key), cancel, on_wait, reusable)
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    /// A shared lock on `key`'s result while a run uses it (see `lock::try_shared`); `None`
    /// while another process holds the key exclusively.
    pub fn try_lock_key_shared(&self, key: &str) -> Result<Option<lock::KeyLock>, CacheError> {
        lock::try_shared(&self.lock_path(key))
    }

    /// The exclusive lock on `key` if nobody computes or reads it right now.
    pub fn try_lock_key(&self, key: &str) -> Result<Option<lock::KeyLock>, CacheError> {
        lock::try_exclusive(&self.lock_path(key))
    }

    /// A fresh staging folder for `key` with an empty `out/` inside.
    pub fn create_staging(&self, key: &str) -> Result<PathBuf, CacheError> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join("staging")
            .join(format!("{key}-{}-{n}", std::process::id()));
        let out = dir.join("out");
        std::fs::create_dir_all(&out).map_err(|e| CacheError::io("create", &out, e))?;
        Ok(dir)
    }

    /// Moves every file of `staging/out` into `objects/` (once per content), hard-links it back,
    /// writes `key.json` and `result.json`, then renames the staging folder to `results/<key>`.
    /// With `replace`, an existing result for the key is swapped out only after all of that.
    pub fn commit(
        &self,
        commit: &Commit<'_, impl Serialize>,
        staging: &Path,
        replace: bool,
    ) -> Result<ResultRecord, CacheError> {
        let out = staging.join("out");
        let files = self.absorb_files(&out)?;
        let record = ResultRecord {
            key: commit.key.to_string(),
            stage_id: commit.stage_id.to_string(),
            kind: commit.kind.to_string(),
            output_digest: tree_digest(&files),
            size_bytes: files_size(&out, &files),
            files,
            created_unix: now_unix(),
            duration_s: commit.duration_s,
        };
        write_json(&staging.join("key.json"), commit.material)?;
        write_json(&staging.join("result.json"), &record)?;
        let target = self.result_dir(commit.key);
        // A folder without a readable record is no result: the new one replaces it.
        if (replace || self.unreadable_record(commit.key).is_some()) && target.exists() {
            self.discard(&target)?;
        }
        match std::fs::rename(staging, &target) {
            Ok(()) => Ok(record),
            Err(_) if target.join("result.json").exists() => {
                // Another process committed the same key first; its bytes are as good as ours.
                let _ = std::fs::remove_dir_all(staging);
                self.lookup(commit.key).ok_or_else(|| {
                    CacheError::io("read", &target, std::io::ErrorKind::NotFound.into())
                })
            }
            Err(e) => Err(CacheError::io("commit", &target, e)),
        }
    }

    /// Moves a folder out of the way atomically, then deletes it.
    pub fn discard(&self, dir: &Path) -> Result<(), CacheError> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let trash = self
            .root
            .join("staging")
            .join(format!("trash-{}-{n}", std::process::id()));
        std::fs::rename(dir, &trash).map_err(|e| CacheError::io("move", dir, e))?;
        std::fs::remove_dir_all(&trash).map_err(|e| CacheError::io("remove", &trash, e))
    }

    fn absorb_files(&self, out: &Path) -> Result<TreeDigest, CacheError> {
        let mut files = TreeDigest::new();
        for entry in walkdir::WalkDir::new(out).sort_by_file_name() {
            let entry = entry.map_err(|e| CacheError::io("walk", out, e.into()))?;
            if !admit(out, &entry)? {
                continue;
            }
            let path = entry.path();
            let size = entry
                .metadata()
                .map_err(|e| CacheError::io("stat", path, e.into()))?
                .len();
            let digest = hash_file_uncached(path, size)?;
            self.store_object(path, &digest)?;
            files.insert(relative_name(out, path), digest);
        }
        Ok(files)
    }

    /// Puts `path`'s content into `objects/` (unless already there) and replaces `path` by a
    /// hard link to the object. A file the stage hard-linked from elsewhere (an input such as
    /// a base model's VAE; link count > 1) is reflinked or copied into the store once rather
    /// than linked, so the store never shares an inode with a user's file. Objects are
    /// published with a no-clobber link, so two commits of the same content at once end up
    /// sharing the first one's object instead of each keeping its own inode.
    fn store_object(&self, path: &Path, digest: &str) -> Result<(), CacheError> {
        let object = self.object_path(digest);
        if !object.exists() {
            if let Some(parent) = object.parent() {
                std::fs::create_dir_all(parent).map_err(|e| CacheError::io("create", parent, e))?;
            }
            let shared = std::fs::metadata(path)
                .map(|m| m.nlink() > 1)
                .unwrap_or(true);
            let published = if shared {
                self.publish_copy(path, &object)?
            } else {
                set_read_only(path);
                publish_link(path, &object)?
            };
            if published && !shared {
                return Ok(());
            }
        }
        let temp = path.with_extension(unique_suffix("link"));
        if std::fs::hard_link(&object, &temp).is_ok() {
            std::fs::rename(&temp, path).map_err(|e| CacheError::io("link", path, e))?;
        }
        Ok(())
    }

    /// Copies (or reflinks) `path` into a read-only temporary beside `object`, then publishes
    /// it; `false` when another commit published the object first.
    fn publish_copy(&self, path: &Path, object: &Path) -> Result<bool, CacheError> {
        let temp = object.with_extension(unique_suffix("in"));
        reflink_or_copy(path, &temp).map_err(|e| CacheError::io("store", &temp, e))?;
        set_read_only(&temp);
        let published = publish_link(&temp, object);
        let _ = std::fs::remove_file(&temp);
        published
    }

    /// The key of every folder under `results/` (readable or not), sorted.
    pub fn result_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = std::fs::read_dir(self.root.join("results"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().is_dir())
            .map(|entry| entry.file_name().to_string_lossy().to_string())
            .collect();
        keys.sort();
        keys
    }

    /// Every committed result, oldest first.
    pub fn results(&self) -> Vec<ResultRecord> {
        let mut list: Vec<ResultRecord> = std::fs::read_dir(self.root.join("results"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| read_json(&entry.path().join("result.json")).ok())
            .collect();
        list.sort_by(|a, b| (a.created_unix, &a.key).cmp(&(b.created_unix, &b.key)));
        list
    }

    fn index_path(&self, pipeline: &str, stage_id: &str) -> PathBuf {
        self.root
            .join("index")
            .join(file_name_for(pipeline))
            .join(file_name_for(stage_id))
    }

    /// Remembers `key` as the latest result of `stage_id` and points `runs/<pipeline>/<stage>`
    /// at its output.
    pub fn record_stage(
        &self,
        pipeline: &str,
        stage_id: &str,
        key: &str,
    ) -> Result<(), CacheError> {
        let index = self.index_path(pipeline, stage_id);
        if let Some(parent) = index.parent() {
            std::fs::create_dir_all(parent).map_err(|e| CacheError::io("create", parent, e))?;
        }
        replace_file(&index, key.as_bytes())?;
        let link = self.human_path(pipeline, stage_id);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(|e| CacheError::io("create", parent, e))?;
        }
        let target = Path::new("../../results").join(key).join("out");
        let temp = link.with_extension(unique_suffix("tmp"));
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(&target, &temp).map_err(|e| CacheError::io("link", &temp, e))?;
        std::fs::rename(&temp, &link).map_err(|e| CacheError::io("link", &link, e))
    }

    /// The last key recorded for a stage.
    pub fn last_key(&self, pipeline: &str, stage_id: &str) -> Option<String> {
        std::fs::read_to_string(self.index_path(pipeline, stage_id))
            .ok()
            .map(|text| text.trim().to_string())
    }

    /// `runs/<pipeline>/<stage>`: a stable link to the stage's latest output.
    pub fn human_path(&self, pipeline: &str, stage_id: &str) -> PathBuf {
        self.root
            .join("runs")
            .join(file_name_for(pipeline))
            .join(file_name_for(stage_id))
    }
}

/// Whether a stage's output entry is a file to store (`false` for folders). A name that is
/// not UTF-8 (the manifest could not name it), a symbolic link, or a special file is refused:
/// a result holds only regular files and folders, so nothing it hands downstream or to the
/// report leads outside it. A link to a file inside the output is replaced by a copy first.
fn admit(out: &Path, entry: &walkdir::DirEntry) -> Result<bool, CacheError> {
    let path = entry.path();
    let relative = path.strip_prefix(out).unwrap_or(path);
    let refuse = |problem: String| {
        Err(CacheError::Output {
            path: relative.to_string_lossy().to_string(),
            problem,
        })
    };
    if relative.to_str().is_none() {
        return refuse(
            "has a name that is not valid UTF-8; rename it (result manifests name files in UTF-8)"
                .to_string(),
        );
    }
    let kind = entry.file_type();
    if kind.is_symlink() {
        return materialize_link(out, path, relative);
    }
    if kind.is_dir() || kind.is_file() {
        return Ok(kind.is_file());
    }
    refuse("is not a regular file or folder (a FIFO, socket or device); remove it".to_string())
}

/// Replaces a link to a regular file inside `out` by a copy of that file; refuses any other.
fn materialize_link(out: &Path, path: &Path, relative: &Path) -> Result<bool, CacheError> {
    let target = std::fs::read_link(path).unwrap_or_default();
    let inside = match (out.canonicalize(), path.canonicalize()) {
        (Ok(root), Ok(real)) => real.starts_with(root) && real.is_file(),
        _ => false,
    };
    if !inside {
        return Err(CacheError::Output {
            path: relative.to_string_lossy().to_string(),
            problem: format!(
                "is a symbolic link to `{}`, outside the stage's output (or not a file); copy the file into $OUT instead (cp -L)",
                target.display()
            ),
        });
    }
    let temp = path.with_extension(unique_suffix("copy"));
    std::fs::copy(path, &temp).map_err(|e| CacheError::io("copy", path, e))?;
    std::fs::rename(&temp, path).map_err(|e| CacheError::io("replace", path, e))?;
    Ok(true)
}

/// What a commit needs besides the staging folder.
pub struct Commit<'a, M: Serialize> {
    pub key: &'a str,
    pub stage_id: &'a str,
    pub kind: &'a str,
    pub material: &'a M,
    pub duration_s: f64,
}

/// A temporary-file suffix unique within this process and across processes.
pub fn unique_suffix(what: &str) -> String {
    let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{what}-{}-{n}", std::process::id())
}

fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let temp = path.with_extension(unique_suffix("tmp"));
    std::fs::write(&temp, bytes).map_err(|e| CacheError::io("write", &temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| CacheError::io("rename", path, e))
}

/// Makes `object` a hard link to `source` unless it exists: `link(2)` never replaces a file,
/// so of two commits racing on one digest exactly one publishes. `false` when it existed. On a
/// file system without hard links, falls back to copying (a racing copy then replaces an equal
/// one, which costs space but loses nothing).
fn publish_link(source: &Path, object: &Path) -> Result<bool, CacheError> {
    match std::fs::hard_link(source, object) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(_) => {
            let temp = object.with_extension(unique_suffix("in"));
            std::fs::copy(source, &temp).map_err(|e| CacheError::io("store", &temp, e))?;
            set_read_only(&temp);
            std::fs::rename(&temp, object).map_err(|e| CacheError::io("store", object, e))?;
            Ok(true)
        }
    }
}

fn files_size(out: &Path, files: &TreeDigest) -> u64 {
    files
        .keys()
        .filter_map(|name| std::fs::metadata(out.join(name)).ok())
        .map(|m| m.len())
        .sum()
}

/// A copy-on-write clone (FICLONE: btrfs, XFS) when the file system allows, else a copy.
pub fn reflink_or_copy(source: &Path, target: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = std::fs::File::open(source)?;
    let to = std::fs::File::create(target)?;
    // SAFETY: both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    drop(to);
    std::fs::copy(source, target).map(|_| ())
}

fn set_read_only(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mut perms = meta.permissions();
        perms.set_readonly(true);
        let _ = std::fs::set_permissions(path, perms);
    }
}

/// Whether a process with this pid is alive (used to clean staging folders of dead runs).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {

    fn free_bytes(dir: &Path) -> u64 {
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: statvfs writes into the zeroed struct; the path is a valid C string.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stats) }, 0);
        stats.f_bavail * stats.f_frsize
    }

    /// On a filesystem with reflinks (XFS with reflink=1, Btrfs), a copy shares the source's
    /// extents. Needs such a folder, so it is run by hand:
    /// `DREAMPIPE_REFLINK_DIR=/mnt/xfs cargo test -p dreampipe-core reflink -- --ignored`.
    #[test]
    #[ignore = "needs a reflink filesystem: set DREAMPIPE_REFLINK_DIR"]
    fn reflink_copies_share_extents_on_a_reflink_filesystem() {
        let root = std::env::var_os("DREAMPIPE_REFLINK_DIR").expect("set DREAMPIPE_REFLINK_DIR");
        let dir = tempfile::tempdir_in(root).expect("tempdir");
        let source = dir.path().join("weights.bin");
        let bytes: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&source, &bytes).expect("write");
        let target = dir.path().join("copy.bin");
        let before = free_bytes(dir.path());
        reflink_or_copy(&source, &target).expect("copy");
        let after = free_bytes(dir.path());
        assert_eq!(std::fs::read(&target).expect("read"), bytes);
        let used = before.saturating_sub(after);
        assert!(used < 1 << 20, "a 64 MiB reflink copy took {used} bytes");
    }
    use super::*;

    #[test]
    fn long_stage_ids_make_file_names_within_the_limit() {
        assert_eq!(file_name_for("db[lr=1e-6]"), "db[lr=1e-6]");
        let long = format!("db[{}]", "x=é,".repeat(80));
        let name = file_name_for(&long);
        assert_eq!(name.len(), 180 + 17);
        assert!(name.starts_with("db[x=é,"));
        assert_ne!(name, file_name_for(&format!("{long}y")));
    }

    #[test]
    fn identical_files_are_stored_once_and_hard_linked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut keys = Vec::new();
        for (key, extra) in [("k1", "one"), ("k2", "two")] {
            let staging = store.create_staging(key).expect("staging");
            std::fs::write(staging.join("out/vae.bin"), b"shared weights").expect("write");
            std::fs::write(staging.join("out/extra.txt"), extra).expect("write");
            let material = serde_json::json!({"k": key});
            let commit = Commit {
                key,
                stage_id: "s",
                kind: "command",
                material: &material,
                duration_s: 0.0,
            };
            store.commit(&commit, &staging, false).expect("commit");
            keys.push(key);
        }
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(store.output_dir("k1").join("vae.bin")).expect("meta");
        let b = std::fs::metadata(store.output_dir("k2").join("vae.bin")).expect("meta");
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.nlink(), 3, "object + two results");
        assert!(
            !dir.path()
                .join("staging")
                .read_dir()
                .expect("ls")
                .any(|_| true)
        );
    }

    /// Two commits of the same new content at the same moment (two stages that keep a file
    /// from one input): both results end up as links of one object. Before the no-clobber
    /// publication each could rename its own copy over the other's object.
    #[test]
    fn racing_commits_of_one_content_share_one_object() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let user_file = dir.path().join("user-vae.bin");
        for round in 0..40 {
            std::fs::write(&user_file, format!("weights of round {round}")).expect("write");
            let barrier = std::sync::Barrier::new(2);
            let outputs: Vec<PathBuf> = std::thread::scope(|scope| {
                let racers: Vec<_> = ["a", "b"]
                    .map(|side| {
                        let (store, barrier, user_file) = (&store, &barrier, &user_file);
                        scope.spawn(move || {
                            let key = format!("{side}{round}");
                            let staging = store.create_staging(&key).expect("staging");
                            let kept = staging.join("out/vae.bin");
                            std::fs::hard_link(user_file, &kept).expect("link");
                            let digest = hash_file_uncached(&kept, 0).expect("hash");
                            barrier.wait();
                            store.store_object(&kept, &digest).expect("store");
                            kept
                        })
                    })
                    .into_iter()
                    .collect();
                racers
                    .into_iter()
                    .map(|r| r.join().expect("racer"))
                    .collect()
            });
            let inodes: Vec<u64> = outputs
                .iter()
                .map(|p| std::fs::metadata(p).expect("meta").ino())
                .collect();
            assert_eq!(
                inodes[0], inodes[1],
                "round {round}: two objects for one content"
            );
            assert_eq!(std::fs::metadata(&outputs[0]).expect("meta").nlink(), 3);
        }
    }
}
