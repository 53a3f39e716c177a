//! The hub's file protocol, as huggingface_hub's `hf_hub_download` speaks it:
//!
//! - `GET /api/models/<repo>/revision/<rev>`: the commit (`sha`) and the files (`siblings`);
//! - `HEAD /<repo>/resolve/<commit>/<file>`, redirects not followed: `X-Repo-Commit`, the blob's
//!   id (`X-Linked-Etag` for LFS files: their sha256; else `ETag`: the git blob sha1), its size
//!   (`X-Linked-Size` or `Content-Length`) and, for LFS files, the CDN `Location`;
//! - `GET <location>` with `Range: bytes=<n>-` to continue a partial file.
//!
//! A blob is fetched under its lock into `blobs/<etag>.incomplete`, continued after a dropped
//! connection (in this process, or by the next one after a crash), checked (size; sha256 for LFS
//! files) and renamed into place; a file whose sha256 differs from its ETag is discarded and
//! fetched once more from the start. The token goes to the endpoint's host only, never to the
//! CDN a file redirects to.
//!
//! Written on `ureq` rather than the `hf-hub` crate: hf-hub 0.4 gives up on a blob lock after
//! five seconds (eight ranks fetching one 5 GB file would fail), fetches a blob again after
//! waiting for another process's download, does not take huggingface_hub's lock, check sha256 or
//! read `HF_HUB_OFFLINE`; hf-hub 1.x pulls reqwest, tokio and the xet client. Neither uploads the
//! way `sdkd export --push-to-hub` needs (`push`). docs/hub.md.
use super::cache::{is_commit, Env, RepoCache};
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Attempts per blob after a dropped connection, each continuing where the last stopped.
const ATTEMPTS: usize = 4;

pub struct Client<'a> {
    env: &'a Env,
    agent: ureq::Agent,
}

/// A repository at one revision: its commit and files.
pub struct RevisionInfo {
    pub commit: String,
    pub files: Vec<String>,
}

/// What the HEAD of a file says.
struct FileMeta {
    etag: String,
    size: Option<u64>,
    /// Where the bytes are (the CDN for LFS files).
    location: String,
}

/// `/`-separated path segments percent-encoded for a URL.
fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            seg.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The host part (`scheme://host:port`) of a URL.
fn origin_of(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    url[after..].find('/').map_or(url, |i| &url[..after + i])
}

/// huggingface_hub's `_normalize_etag`: without `W/` and quotes.
fn normalize_etag(etag: &str) -> String {
    etag.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

impl<'a> Client<'a> {
    pub fn new(env: &'a Env) -> Result<Client<'a>> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .user_agent(format!("sdkd/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Client { env, agent })
    }

    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    /// The Authorization header for `url` when it is on the endpoint's host.
    pub fn auth_for(&self, url: &str) -> Option<String> {
        let t = self.env.token.as_ref()?;
        (origin_of(url) == origin_of(&self.env.endpoint)).then(|| format!("Bearer {t}"))
    }

    /// A request's outcome, or the network error named with the endpoint and the way out.
    pub fn send(
        &self,
        what: &str,
        url: &str,
        call: impl FnOnce(Option<String>) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        call(self.auth_for(url)).map_err(|e| self.network_error(what, &e))
    }

    pub fn network_error(&self, what: &str, e: &ureq::Error) -> anyhow::Error {
        anyhow!(
            "{what}: cannot reach the hub at {} ({e}); check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 \
             to use only the local cache ({})",
            self.env.endpoint,
            self.env.cache_dir.display()
        )
    }

    /// The error of an HTTP answer that is not a success, in words a user can act on.
    pub fn status_error(&self, resp: &mut ureq::http::Response<ureq::Body>, repo: &str, revision: &str, file: Option<&str>) -> anyhow::Error {
        let status = resp.status().as_u16();
        let code = header(resp, "X-Error-Code").unwrap_or_default();
        let message = header(resp, "X-Error-Message")
            .or_else(|| resp.body_mut().read_to_string().ok().filter(|s| !s.is_empty() && s.len() < 500))
            .unwrap_or_default();
        let endpoint = &self.env.endpoint;
        let server = if message.is_empty() { String::new() } else { format!(" (the hub says: {message})") };
        match (status, code.as_str()) {
            (401 | 403, "RepoNotFound") | (404, "RepoNotFound") => anyhow!(
                "{repo}: repository not found at {endpoint} (HTTP {status}){server}, and there is no local path of that \
                 name; check the name, or, if it is private, authenticate ({})",
                self.auth_hint()
            ),
            (401 | 403, _) => anyhow!(
                "{repo}: the hub refused access (HTTP {status}): the model is gated or private{server}. Accept its \
                 conditions at {endpoint}/{repo} and authenticate: {}",
                self.auth_hint()
            ),
            (404, "RevisionNotFound") => anyhow!("{repo}: revision {revision} not found at {endpoint} (HTTP 404){server}"),
            (404, _) => match file {
                Some(f) => anyhow!("{repo}@{revision}: file {f} not found at {endpoint} (HTTP 404){server}"),
                None => anyhow!("{repo}@{revision}: not found at {endpoint} (HTTP 404){server}: check the repository and the revision"),
            },
            _ => anyhow!(
                "{repo}@{revision}{}: the hub at {endpoint} answered HTTP {status}{server}",
                file.map(|f| format!(": {f}")).unwrap_or_default()
            ),
        }
    }

    fn auth_hint(&self) -> String {
        match &self.env.token_source {
            Some(src) => format!("the token from {src} was sent and refused or lacks access to it; log in again with `huggingface-cli login` or set HF_TOKEN"),
            None => "no token was sent: run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN".into(),
        }
    }

    /// The commit and files of `repo` at `revision`.
    pub fn revision(&self, repo: &str, revision: &str) -> Result<RevisionInfo> {
        let url = format!("{}/api/models/{repo}/revision/{}", self.env.endpoint, encode_path(revision).replace('/', "%2F"));
        let mut resp = self.send(repo, &url, |auth| {
            let mut r = self.agent.get(url.as_str());
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.call()
        })?;
        if !resp.status().is_success() {
            return Err(self.status_error(&mut resp, repo, revision, None));
        }
        let text = resp.body_mut().read_to_string().map_err(|e| self.network_error(repo, &e))?;
        let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{url}: the answer is not JSON"))?;
        let commit = json["sha"].as_str().filter(|c| is_commit(c)).ok_or_else(|| anyhow!("{url}: the answer has no commit (sha)"))?;
        let files = json["siblings"]
            .as_array()
            .ok_or_else(|| anyhow!("{url}: the answer lists no files (siblings)"))?
            .iter()
            .filter_map(|s| s["rfilename"].as_str().map(str::to_string))
            // a name that could leave the snapshot folder is no file sdkd fetches
            .filter(|f: &String| !f.starts_with('/') && !f.contains('\\') && f.split('/').all(|s| !s.is_empty() && s != "." && s != ".."))
            .collect();
        Ok(RevisionInfo { commit: commit.to_string(), files })
    }

    /// Where `file` of `repo` at `commit` is and what its blob is called (HEAD, following only
    /// redirects that stay on the endpoint's host, as huggingface_hub does).
    fn head(&self, repo: &str, commit: &str, revision: &str, file: &str) -> Result<FileMeta> {
        let mut url = format!("{}/{repo}/resolve/{commit}/{}", self.env.endpoint, encode_path(file));
        for _ in 0..5 {
            let mut resp = self.send(&format!("{repo}: {file}"), &url, |auth| {
                let mut r = self.agent.head(url.as_str()).header("Accept-Encoding", "identity");
                if let Some(a) = auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            })?;
            let status = resp.status();
            if !(status.is_success() || status.is_redirection()) {
                return Err(self.status_error(&mut resp, repo, revision, Some(file)));
            }
            let location = header(&resp, "Location").map(|l| if l.starts_with('/') { format!("{}{l}", origin_of(&url)) } else { l });
            if status.is_redirection() && header(&resp, "X-Linked-Etag").is_none() {
                // a renamed repository: follow it on the hub
                url = location.ok_or_else(|| anyhow!("{url}: a redirect without a Location"))?;
                continue;
            }
            if header(&resp, "X-Repo-Commit").is_none() {
                bail!("{url}: the answer has no X-Repo-Commit header, so {} does not speak the hub's protocol (check HF_ENDPOINT)", self.env.endpoint);
            }
            let etag = header(&resp, "X-Linked-Etag")
                .or_else(|| header(&resp, "ETag"))
                .map(|e| normalize_etag(&e))
                .filter(|e| !e.is_empty() && !e.contains(['/', '\\']) && e != "." && e != "..")
                .ok_or_else(|| anyhow!("{url}: the answer has no ETag"))?;
            let size = header(&resp, "X-Linked-Size")
                .or_else(|| if status.is_redirection() { None } else { header(&resp, "Content-Length") })
                .and_then(|s| s.parse().ok());
            let location = if status.is_redirection() { location.ok_or_else(|| anyhow!("{url}: a redirect without a Location"))? } else { url };
            return Ok(FileMeta { etag, size, location });
        }
        bail!("{repo}: {file}: too many redirects from {}", self.env.endpoint)
    }

    /// Brings `file` of `repo` at `commit` into the cache (blob and snapshot link) unless it is
    /// there, and returns its path in the snapshot.
    pub fn fetch(&self, cache: &RepoCache, commit: &str, revision: &str, file: &str) -> Result<PathBuf> {
        let pointer = cache.snapshot(commit).join(file);
        if pointer.exists() {
            return Ok(pointer);
        }
        let repo = cache_repo_name(cache);
        let meta = self.head(&repo, commit, revision, file)?;
        let blob = cache.blob(&meta.etag);
        let _lock = cache.lock(&meta.etag)?;
        if !blob.is_file() {
            fs::create_dir_all(blob.parent().expect("blobs/")).with_context(|| format!("creating {}", blob.display()))?;
            self.download(&repo, revision, file, &meta, &blob)?;
        }
        cache.link(commit, file, &meta.etag)
    }

    /// Fetches a blob into `<blob>.incomplete` (continuing what is there), checks it and renames it.
    fn download(&self, repo: &str, revision: &str, file: &str, meta: &FileMeta, blob: &Path) -> Result<()> {
        let partial = PathBuf::from(format!("{}.incomplete", blob.display()));
        let lfs_sha = (meta.etag.len() == 64 && meta.etag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(meta.etag.as_str());
        for pass in 0..2 {
            self.fill(repo, revision, file, meta, &partial)?;
            let len = fs::metadata(&partial)?.len();
            if let Some(size) = meta.size.filter(|s| *s != len) {
                bail!("{repo}: {file}: got {len} bytes, the hub says {size}; run again to continue ({})", partial.display());
            }
            if let Some(want) = lfs_sha {
                let got = sha256_of(&partial)?;
                if got != want {
                    fs::remove_file(&partial)?;
                    if pass == 0 {
                        eprintln!("{repo}: {file}: sha256 {got} differs from the hub's {want}: discarded, fetching it again");
                        continue;
                    }
                    bail!("{repo}: {file}: sha256 {got} differs from the hub's ETag {want} twice: refused (nothing kept)");
                }
            }
            File::open(&partial)?.sync_all()?;
            fs::rename(&partial, blob).with_context(|| format!("renaming {} into place", partial.display()))?;
            return Ok(());
        }
        unreachable!("the second pass returns")
    }

    /// Appends the rest of the file to `partial`, continuing after dropped connections.
    fn fill(&self, repo: &str, revision: &str, file: &str, meta: &FileMeta, partial: &Path) -> Result<()> {
        let mut out = File::options().create(true).append(true).read(true).open(partial).with_context(|| format!("opening {}", partial.display()))?;
        let bar = progress_bar(file, meta.size);
        let mut last_err = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500 * attempt as u64));
            }
            let mut start = out.metadata()?.len();
            if meta.size.is_some_and(|s| start > s) {
                out.set_len(0)?;
                start = 0;
            }
            if meta.size == Some(start) && start > 0 {
                bar.finish_and_clear();
                return Ok(());
            }
            let url = &meta.location;
            let result = self.send(&format!("{repo}: {file}"), url, |auth| {
                let mut r = self.agent.get(url.as_str()).header("Accept-Encoding", "identity");
                if start > 0 {
                    r = r.header("Range", format!("bytes={start}-"));
                }
                if let Some(a) = auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            });
            let mut resp = match result {
                Ok(r) => r,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            match resp.status().as_u16() {
                206 => {}
                200 => {
                    // the server sent the whole file: start over
                    out.set_len(0)?;
                    out.seek(std::io::SeekFrom::End(0))?;
                }
                416 => {
                    out.set_len(0)?;
                    continue;
                }
                _ => return Err(self.status_error(&mut resp, repo, revision, Some(file))),
            }
            let done = out.metadata()?.len();
            bar.set_position(done);
            let mut reader = resp.into_body().into_reader();
            let mut buf = vec![0u8; 1 << 20];
            let copied: std::io::Result<()> = (|| loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                out.write_all(&buf[..n])?;
                bar.inc(n as u64);
            })();
            match copied {
                Ok(()) => {
                    let len = out.metadata()?.len();
                    if meta.size.is_none_or(|s| len >= s) {
                        bar.finish_and_clear();
                        return Ok(());
                    }
                    last_err = Some(anyhow!("the connection closed at byte {len}"));
                }
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(e).with_context(|| format!("writing {}", partial.display()));
                }
                Err(e) => {
                    out.flush()?;
                    last_err = Some(anyhow!("{e}"));
                }
            }
        }
        bar.abandon();
        let got = out.metadata()?.len();
        Err(anyhow!(
            "{repo}: {file}: the download from {} stopped at {got} bytes after {ATTEMPTS} attempts ({}); run again to \
             continue from there ({}), or set HF_HUB_OFFLINE=1 to use only the local cache",
            self.env.endpoint,
            last_err.map(|e| e.to_string()).unwrap_or_default(),
            partial.display()
        ))
    }
}

/// `org/name` back from `models--org--name`.
fn cache_repo_name(cache: &RepoCache) -> String {
    let folder = cache.root.file_name().expect("models--org--name").to_string_lossy();
    folder.trim_start_matches("models--").replacen("--", "/", 1)
}

pub fn sha256_of(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn progress_bar(file: &str, size: Option<u64>) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(size.unwrap_or(0));
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}") {
        bar.set_style(style);
    }
    bar.set_message(file.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_etags() {
        assert_eq!(encode_path("unet/diffusion pytorch+model.safetensors"), "unet/diffusion%20pytorch%2Bmodel.safetensors");
        assert_eq!(origin_of("http://127.0.0.1:8000/a/b"), "http://127.0.0.1:8000");
        assert_eq!(origin_of("https://huggingface.co"), "https://huggingface.co");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
    }
}
