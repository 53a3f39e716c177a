//! The Hugging Face cache, in the layout huggingface_hub writes, so that Python and sdkd share
//! one copy of every file:
//!
//! ```text
//! <cache>/models--org--name/blobs/<etag>                 the bytes (sha256 for LFS files, git sha1 otherwise)
//! <cache>/models--org--name/snapshots/<commit>/<file>    relative symlink to ../../blobs/<etag>
//! <cache>/models--org--name/refs/<revision>              the commit a branch or tag pointed at
//! <cache>/.locks/models--org--name/<etag>.lock           held (flock) while one process fetches the blob
//! ```
//!
//! The cache is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`, as huggingface_hub's constants say. The lock file is the one
//! huggingface_hub's `hf_hub_download` takes (`filelock`, flock on Unix), so an sdkd process and
//! a Python process fetching the same blob also wait for each other.
use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// The environment of huggingface_hub: cache, endpoint, token, offline mode.
#[derive(Debug, Clone)]
pub struct Env {
    pub cache_dir: PathBuf,
    /// `HF_ENDPOINT` without a trailing slash (default `https://huggingface.co`).
    pub endpoint: String,
    /// `HF_TOKEN`, else the file `huggingface-cli login` writes (`HF_TOKEN_PATH`, else `HF_HOME/token`).
    pub token: Option<String>,
    /// Where the token came from, for error messages.
    pub token_source: Option<String>,
    /// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is true: nothing is fetched.
    pub offline: bool,
}

fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

impl Env {
    pub fn from_env() -> Env {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Env {
        let home = var("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".cache")).join("huggingface")
        });
        let cache_dir =
            var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")).map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string();
        let (token, token_source) = match var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")) {
            Some(t) => (Some(t.trim().to_string()), Some("HF_TOKEN".to_string())),
            None => {
                let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
                match fs::read_to_string(&path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
                    Some(t) => (Some(t), Some(path.display().to_string())),
                    None => (None, None),
                }
            }
        };
        let offline = var("HF_HUB_OFFLINE").or_else(|| var("TRANSFORMERS_OFFLINE")).is_some_and(|v| truthy(&v));
        Env { cache_dir, endpoint, token, token_source, offline }
    }
}

/// True for a full commit id (40 hex digits).
pub fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub root: PathBuf,
    locks: PathBuf,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo: &str) -> RepoCache {
        let folder = format!("models--{}", repo.replace('/', "--"));
        RepoCache { root: cache_dir.join(&folder), locks: cache_dir.join(".locks").join(folder) }
    }

    /// The commit `revision` names in the cache: itself when it is a commit, else `refs/<revision>`.
    pub fn commit_of(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let commit = fs::read_to_string(self.root.join("refs").join(revision)).ok()?.trim().to_string();
        is_commit(&commit).then_some(commit)
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    /// Records that `revision` points at `commit` (written whole: temp file, rename).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        let path = self.root.join("refs").join(revision);
        let current = fs::read_to_string(&path).ok();
        if current.as_deref().map(str::trim) == Some(commit) {
            return Ok(());
        }
        fs::create_dir_all(path.parent().expect("refs/<revision>"))?;
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        fs::write(&tmp, commit).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Takes the lock of blob `etag`, waiting while another process (sdkd or Python) holds it.
    pub fn lock(&self, etag: &str) -> Result<BlobLock> {
        fs::create_dir_all(&self.locks).with_context(|| format!("creating {}", self.locks.display()))?;
        let path = self.locks.join(format!("{etag}.lock"));
        let file = File::options().create(true).truncate(false).write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: flock on a file descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(BlobLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                bail!("locking {}: {err}", path.display());
            }
        }
    }

    /// Makes `snapshots/<commit>/<file>` a relative symlink to `blobs/<etag>` (as Python does, so
    /// the cache can be moved), replacing whatever link was there in one rename.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.snapshot(commit).join(file);
        let parent = pointer.parent().expect("a file in a snapshot"); // `file` is a listed name (no `..`, client::revision)
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let depth = file.matches('/').count() + 2;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        let tmp = parent.join(format!(".{}.sdkd-{}.tmp", pointer.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(), std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
        fs::rename(&tmp, &pointer).with_context(|| format!("linking {}", pointer.display()))?;
        Ok(pointer)
    }
}

/// A held blob lock; released when dropped (closing the file releases the flock).
pub struct BlobLock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_follows_huggingface_hub() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let e = Env::from_vars(vars(&[("HOME", "/h")]));
        assert_eq!((e.cache_dir.as_path(), e.endpoint.as_str(), e.offline), (Path::new("/h/.cache/huggingface/hub"), "https://huggingface.co", false));
        let e = Env::from_vars(vars(&[("HOME", "/h"), ("HF_HOME", "/hf"), ("HF_HUB_OFFLINE", "1"), ("HF_ENDPOINT", "http://x:1/")]));
        assert_eq!((e.cache_dir.as_path(), e.endpoint.as_str(), e.offline), (Path::new("/hf/hub"), "http://x:1", true));
        let e = Env::from_vars(vars(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c"), ("HF_TOKEN", "hf_x"), ("HF_HUB_OFFLINE", "0")]));
        assert_eq!((e.cache_dir.as_path(), e.token.as_deref(), e.offline), (Path::new("/c"), Some("hf_x"), false));
        assert!(is_commit(&"a".repeat(40)) && !is_commit("main") && !is_commit(&"A".repeat(40)));
    }
}
