//! blake3 hashing of files and folders, memoized by (device, inode, size, mtime).
//!
//! Large files are memory-mapped and hashed on all cores (`blake3::Hasher::update_mmap_rayon`).
//! A folder's digest covers its sorted relative paths and each file's content digest, so
//! renaming a file inside it changes the digest while touching a file does not. The memo is
//! keyed by the file's identity and metadata, not its path: an unchanged file (or a hard link
//! to it) is never read twice.
use super::CacheError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Files at least this big are memory-mapped and hashed on all cores; below it one read is
/// faster (blake3's docs: multithreading pays off from roughly 128 KiB; 1 MiB leaves margin).
const MMAP_THRESHOLD_BYTES: u64 = 1 << 20;

/// Above this many entries, saving keeps only the files hashed by this process (the memo of
/// a long-lived cache would otherwise grow with every file ever hashed).
const MAX_MEMO_ENTRIES: usize = 100_000;

/// A file modified this recently is not memoized: another write within the same mtime tick
/// with the same size would be invisible (git's "racy clean" problem).
const RACY_WINDOW_NS: i128 = 2_000_000_000;

/// The memo's key: what identifies an unchanged file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct MemoEntry {
    id: FileIdentity,
    digest: String,
}

/// Digests of unchanged files, persisted as `memo.json` under the cache root.
pub struct HashMemo {
    path: Option<PathBuf>,
    entries: Mutex<HashMap<FileIdentity, String>>,
    used: Mutex<std::collections::HashSet<FileIdentity>>,
}

/// A file or folder's content: relative path (empty for a single file) → blake3 hex digest.
pub type TreeDigest = BTreeMap<String, String>;

impl HashMemo {
    /// A memo that is never saved (tests, `cache verify`).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            entries: Mutex::new(HashMap::new()),
            used: Mutex::default(),
        }
    }

    /// Loads `path` if it exists; an unreadable memo is ignored (it is only an accelerator).
    pub fn load(path: &Path) -> Self {
        let entries = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<MemoEntry>>(&bytes).ok())
            .map(|list| list.into_iter().map(|e| (e.id, e.digest)).collect())
            .unwrap_or_default();
        Self {
            path: Some(path.to_path_buf()),
            entries: Mutex::new(entries),
            used: Mutex::default(),
        }
    }

    /// Writes the memo atomically (temp file + rename); concurrent writers: last one wins.
    pub fn save(&self) -> Result<(), CacheError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let entries = self.lock_entries();
        let prune = entries.len() > MAX_MEMO_ENTRIES;
        let list: Vec<MemoEntry> = entries
            .iter()
            .filter(|(id, _)| !prune || used.contains(id))
            .map(|(id, digest)| MemoEntry {
                id: *id,
                digest: digest.clone(),
            })
            .collect();
        let bytes = serde_json::to_vec(&list).map_err(|source| CacheError::Json {
            path: path.clone(),
            source,
        })?;
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&temp, bytes).map_err(|e| CacheError::io("write", &temp, e))?;
        std::fs::rename(&temp, path).map_err(|e| CacheError::io("rename", path, e))
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, HashMap<FileIdentity, String>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The blake3 hex digest of one file, from the memo when its identity is unchanged.
    pub fn hash_file(&self, path: &Path) -> Result<String, CacheError> {
        let meta = std::fs::metadata(path).map_err(|e| CacheError::io("read", path, e))?;
        let id = FileIdentity::of(&meta);
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        if let Some(digest) = self.lock_entries().get(&id) {
            return Ok(digest.clone());
        }
        let digest = hash_file_uncached(path, meta.len())?;
        if !is_racy(id.mtime_ns) {
            self.lock_entries().insert(id, digest.clone());
        }
        Ok(digest)
    }

    /// Records `digest` for a file just committed (read-only, so no racy-clean wait).
    pub fn remember(&self, path: &Path, digest: &str) {
        if let Ok(meta) = std::fs::metadata(path) {
            let id = FileIdentity::of(&meta);
            self.used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id);
            self.lock_entries().insert(id, digest.to_string());
        }
    }

    /// Digests of every file under `path` (or of `path` itself when it is a file), sorted by
    /// relative path. Symlinks are followed.
    pub fn hash_tree(&self, path: &Path) -> Result<TreeDigest, CacheError> {
        let meta = std::fs::metadata(path).map_err(|e| CacheError::io("read", path, e))?;
        let mut tree = TreeDigest::new();
        if meta.is_file() {
            tree.insert(String::new(), self.hash_file(path)?);
            return Ok(tree);
        }
        for entry in walkdir::WalkDir::new(path)
            .follow_links(true)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| {
                let at = e.path().unwrap_or(path).to_path_buf();
                CacheError::io("walk", &at, e.into())
            })?;
            if !entry.file_type().is_file() {
                continue;
            }
            let relative = relative_name(path, entry.path());
            tree.insert(relative, self.hash_file(entry.path())?);
        }
        Ok(tree)
    }
}

/// `child` relative to `root`, with `/` separators.
pub fn relative_name(root: &Path, child: &Path) -> String {
    child
        .strip_prefix(root)
        .unwrap_or(child)
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

fn is_racy(mtime_ns: i128) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    now - mtime_ns < RACY_WINDOW_NS
}

/// Reads and hashes one file, multi-threaded over a memory map when it is large.
pub fn hash_file_uncached(path: &Path, size: u64) -> Result<String, CacheError> {
    let mut hasher = blake3::Hasher::new();
    if size >= MMAP_THRESHOLD_BYTES {
        hasher
            .update_mmap_rayon(path)
            .map_err(|e| CacheError::io("hash", path, e))?;
    } else {
        let bytes = std::fs::read(path).map_err(|e| CacheError::io("read", path, e))?;
        hasher.update(&bytes);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// One digest for a whole tree: blake3 over each (relative path, file digest) pair in order.
pub fn tree_digest(tree: &TreeDigest) -> String {
    let mut hasher = blake3::Hasher::new();
    for (name, digest) in tree {
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        hasher.update(digest.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_digest_ignores_touch_but_sees_renames_and_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.txt"), b"alpha").expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/b.txt"), b"beta").expect("write");
        let memo = HashMemo::in_memory();
        let first = memo.hash_tree(dir.path()).expect("hash");
        assert_eq!(
            first.keys().cloned().collect::<Vec<_>>(),
            vec!["a.txt", "sub/b.txt"]
        );
        assert_eq!(first["a.txt"], blake3::hash(b"alpha").to_hex().to_string());
        std::fs::write(dir.path().join("a.txt"), b"alpha").expect("rewrite");
        assert_eq!(
            tree_digest(&memo.hash_tree(dir.path()).expect("hash")),
            tree_digest(&first)
        );
        std::fs::rename(dir.path().join("a.txt"), dir.path().join("c.txt")).expect("rename");
        assert_ne!(
            tree_digest(&memo.hash_tree(dir.path()).expect("hash")),
            tree_digest(&first)
        );
    }

    #[test]
    fn large_file_uses_mmap_path_and_matches_plain_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("big.bin");
        std::fs::write(&path, &data).expect("write");
        let digest = HashMemo::in_memory().hash_file(&path).expect("hash");
        assert_eq!(digest, blake3::hash(&data).to_hex().to_string());
    }
}
