//! `sdkd export --push-to-hub org/name`: one commit of the exported files to a model repository,
//! by the Hub's HTTP protocol as huggingface_hub's `upload_folder` speaks it:
//!
//! 1. `POST /api/repos/create` (409: it exists; then its files at `main` are listed and any the
//!    commit would replace is refused without `--overwrite`);
//! 2. `POST /api/models/<repo>/preupload/main`: which files go through LFS;
//! 3. LFS files: `POST /<repo>.git/info/lfs/objects/batch` (git-lfs batch API, basic transfer),
//!    `PUT` of the bytes to the `upload` action's URL (and its `verify` action) unless the hub
//!    already holds the object;
//! 4. `POST /api/models/<repo>/commit/main` (`application/x-ndjson`): a header line, then the
//!    regular files inline (base64) and the LFS files by sha256 and size.
//!
//! Basic LFS transfer sends a file in one request; object stores limit those to 5 GB, which an
//! fp16 SD-1.x/2.x or SDXL UNet stays under (multipart upload is not written).
use super::cache::Env;
use super::client::{sha256_of, Client};
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use std::io::Read;
use std::path::PathBuf;

/// One file of the commit: its path in the repository and on disk.
pub struct Upload {
    pub path_in_repo: String,
    pub local: PathBuf,
}

fn json_of(resp: &mut ureq::http::Response<ureq::Body>, what: &str) -> Result<Value> {
    let text = resp.body_mut().read_to_string().with_context(|| format!("{what}: reading the answer"))?;
    serde_json::from_str(&text).with_context(|| format!("{what}: the answer is not JSON: {}", text.chars().take(200).collect::<String>()))
}

/// The checks a push can make before anything is exported: an `org/name` id, online, a token.
pub fn check_target(env: &Env, repo: &str) -> Result<super::HubId> {
    let id = super::HubId::parse(repo).filter(|i| i.revision.is_none() && i.path.is_none()).ok_or_else(|| anyhow!("--push-to-hub {repo}: not a repository id (org/name)"))?;
    if env.offline {
        bail!("--push-to-hub {repo}: HF_HUB_OFFLINE is set");
    }
    if env.token.is_none() {
        bail!("--push-to-hub {repo}: uploading needs a token with write access: run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN");
    }
    Ok(id)
}

/// Uploads `files` to `repo` (created when missing) as one commit; returns the commit's URL.
pub fn push(env: &Env, repo: &str, files: &[Upload], overwrite: bool, message: &str) -> Result<String> {
    let id = check_target(env, repo)?;
    let hub = Pusher { client: Client::new(env)?, endpoint: &env.endpoint, what: repo, repo: &id.repo };
    hub.create_repo(files, overwrite)?;
    let modes = hub.upload_modes(files)?;
    let is_lfs = |path: &str| {
        modes["files"].as_array().into_iter().flatten().any(|m| m["path"] == path && m["uploadMode"] == "lfs")
    };
    let mut lfs = vec![];
    for file in files.iter().filter(|f| is_lfs(&f.path_in_repo)) {
        lfs.push(LfsObject { file, oid: sha256_of(&file.local)?, size: std::fs::metadata(&file.local)?.len() });
    }
    if !lfs.is_empty() {
        hub.upload_lfs(&lfs)?;
    }
    hub.commit(files, &lfs, message)
}

/// A file that goes through LFS: its sha256 and size.
struct LfsObject<'f> {
    file: &'f Upload,
    oid: String,
    size: u64,
}

/// One push's connection: the client, the repository as given (`what`, in errors) and its id.
struct Pusher<'a> {
    client: Client<'a>,
    endpoint: &'a str,
    what: &'a str,
    repo: &'a str,
}

type Response = ureq::http::Response<ureq::Body>;

impl Pusher<'_> {
    /// A POST with `headers` (and the token, on the hub's host).
    fn post(&self, url: &str, headers: &[(&str, &str)], body: &str) -> Result<Response> {
        self.client.send(self.what, url, |auth| {
            let mut r = self.client.agent().post(url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.send(body)
        })
    }

    /// The answer when it is a success, else the hub's error (naming `file` if given).
    fn success(&self, mut resp: Response, file: Option<&str>) -> Result<Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.client.status_error(&mut resp, self.repo, "main", file))
    }

    /// 1. Creates the repository, or refuses to replace what it holds without `overwrite`.
    fn create_repo(&self, files: &[Upload], overwrite: bool) -> Result<()> {
        let (org, name) = self.repo.split_once('/').expect("org/name");
        let body = json!({"name": name, "organization": org, "type": "model", "private": false});
        let mut resp = self.post(&format!("{}/api/repos/create", self.endpoint), &[JSON], &body.to_string())?;
        match resp.status().as_u16() {
            200 | 201 => Ok(()),
            409 => {
                let existing = match self.client.revision(self.repo, "main") {
                    Ok(info) => info.files,
                    Err(e) if e.to_string().contains("HTTP 404") => vec![], // created, no commit yet
                    Err(e) => return Err(e),
                };
                let clash: Vec<String> = files.iter().map(|f| f.path_in_repo.clone()).filter(|p| existing.contains(p)).collect();
                if !clash.is_empty() && !overwrite {
                    bail!(
                        "--push-to-hub {}: the repository already holds {}; pass --overwrite to replace them",
                        self.what,
                        crate::fs_safe::list_some(&clash)
                    );
                }
                Ok(())
            }
            _ => Err(self.client.status_error(&mut resp, self.repo, "main", None)),
        }
    }

    /// 2. The hub's upload mode of each file (`preupload`: LFS or regular), from its first 512 bytes.
    fn upload_modes(&self, files: &[Upload]) -> Result<Value> {
        let mut samples = vec![];
        for f in files {
            let mut head = vec![0u8; 512];
            let mut file = std::fs::File::open(&f.local).with_context(|| format!("reading {}", f.local.display()))?;
            let n = file.read(&mut head)?;
            head.truncate(n);
            let size = file.metadata()?.len();
            samples.push(json!({"path": f.path_in_repo, "size": size, "sample": base64::engine::general_purpose::STANDARD.encode(&head)}));
        }
        let url = format!("{}/api/models/{}/preupload/main", self.endpoint, self.repo);
        let resp = self.post(&url, &[JSON], &json!({"files": samples}).to_string())?;
        json_of(&mut self.success(resp, None)?, &url)
    }

    /// 3. The git-lfs batch request, then each object the hub does not hold yet.
    fn upload_lfs(&self, lfs: &[LfsObject]) -> Result<()> {
        let url = format!("{}/{}.git/info/lfs/objects/batch", self.endpoint, self.repo);
        let objects: Vec<Value> = lfs.iter().map(|o| json!({"oid": o.oid, "size": o.size})).collect();
        let body = json!({"operation": "upload", "transfers": ["basic"], "objects": objects, "hash_algo": "sha256", "ref": {"name": "refs/heads/main"}});
        let resp = self.post(&url, &[("Accept", LFS_JSON), ("Content-Type", LFS_JSON)], &body.to_string())?;
        let batch = json_of(&mut self.success(resp, None)?, &url)?;
        for obj in batch["objects"].as_array().into_iter().flatten() {
            if let Some(err) = obj.get("error") {
                bail!("--push-to-hub {}: the hub refused LFS object {}: {err}", self.what, obj["oid"]);
            }
            let Some(upload) = obj["actions"].get("upload") else { continue }; // already there
            let o = lfs.iter().find(|o| obj["oid"] == o.oid.as_str()).ok_or_else(|| anyhow!("{url}: an object that was not asked for"))?;
            let href = upload["href"].as_str().ok_or_else(|| anyhow!("{url}: an upload action without href"))?;
            self.put_object(o, href, upload)?;
            if let Some(verify) = obj["actions"].get("verify") {
                let mut r = self.client.agent().post(verify["href"].as_str().unwrap_or_default()).header("Content-Type", LFS_JSON);
                for (k, v) in verify["header"].as_object().into_iter().flatten() {
                    r = r.header(k.as_str(), v.as_str().unwrap_or_default());
                }
                let resp = r.send(json!({"oid": obj["oid"], "size": o.size}).to_string()).map_err(|e| self.client.network_error(self.what, &e))?;
                self.success(resp, Some(&o.file.path_in_repo))?;
            }
        }
        Ok(())
    }

    /// One object's bytes to the `upload` action's URL, with the action's headers.
    fn put_object(&self, o: &LfsObject, href: &str, upload: &Value) -> Result<()> {
        let file = std::fs::File::open(&o.file.local)?;
        let mut put = self.client.agent().put(href).header("Content-Length", o.size.to_string());
        for (k, v) in upload["header"].as_object().into_iter().flatten() {
            put = put.header(k.as_str(), v.as_str().unwrap_or_default());
        }
        // the object store's URL is signed: no hub token goes there
        let resp = put.send(&file).map_err(|e| self.client.network_error(&format!("uploading {}", o.file.path_in_repo), &e))?;
        self.success(resp, Some(&o.file.path_in_repo)).map(drop)
    }

    /// 4. The commit: a header line, regular files inline (base64), LFS files by sha256 and size.
    fn commit(&self, files: &[Upload], lfs: &[LfsObject], message: &str) -> Result<String> {
        let mut lines = vec![json!({"key": "header", "value": {"summary": message, "description": ""}}).to_string()];
        for f in files {
            match lfs.iter().find(|o| o.file.path_in_repo == f.path_in_repo) {
                Some(o) => lines.push(json!({"key": "lfsFile", "value": {"path": f.path_in_repo, "algo": "sha256", "oid": o.oid, "size": o.size}}).to_string()),
                None => {
                    let bytes = std::fs::read(&f.local).with_context(|| format!("reading {}", f.local.display()))?;
                    let content = base64::engine::general_purpose::STANDARD.encode(&bytes);
                    lines.push(json!({"key": "file", "value": {"content": content, "path": f.path_in_repo, "encoding": "base64"}}).to_string());
                }
            }
        }
        let url = format!("{}/api/models/{}/commit/main", self.endpoint, self.repo);
        let resp = self.post(&url, &[("Content-Type", "application/x-ndjson")], &(lines.join("\n") + "\n"))?;
        let done = json_of(&mut self.success(resp, None)?, &url)?;
        Ok(done["commitUrl"].as_str().map(str::to_string).unwrap_or_else(|| format!("{}/{}", self.endpoint, self.repo)))
    }
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const LFS_JSON: &str = "application/vnd.git-lfs+json";
