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
    let client = Client::new(env)?;
    let agent = client.agent();
    let endpoint = &env.endpoint;
    let post_json = |url: &str, body: &Value, what: &str| -> Result<ureq::http::Response<ureq::Body>> {
        client.send(what, url, |auth| {
            let mut r = agent.post(url).header("Content-Type", "application/json");
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.send(body.to_string())
        })
    };

    // 1. the repository, and what it holds
    let (org, name) = id.repo.split_once('/').expect("org/name");
    let url = format!("{endpoint}/api/repos/create");
    let mut resp = post_json(&url, &json!({"name": name, "organization": org, "type": "model", "private": false}), repo)?;
    match resp.status().as_u16() {
        200 | 201 => {}
        409 => {
            let existing = match client.revision(&id.repo, "main") {
                Ok(info) => info.files,
                Err(e) if e.to_string().contains("HTTP 404") => vec![], // created, no commit yet
                Err(e) => return Err(e),
            };
            let clash: Vec<String> = files.iter().map(|f| f.path_in_repo.clone()).filter(|p| existing.contains(p)).collect();
            if !clash.is_empty() && !overwrite {
                bail!(
                    "--push-to-hub {repo}: the repository already holds {}; pass --overwrite to replace them",
                    crate::fs_safe::list_some(&clash)
                );
            }
        }
        _ => return Err(client.status_error(&mut resp, &id.repo, "main", None)),
    }

    // 2. which files go through LFS
    let mut samples = vec![];
    for f in files {
        let mut head = vec![0u8; 512];
        let mut file = std::fs::File::open(&f.local).with_context(|| format!("reading {}", f.local.display()))?;
        let n = file.read(&mut head)?;
        head.truncate(n);
        let size = file.metadata()?.len();
        samples.push(json!({"path": f.path_in_repo, "size": size, "sample": base64::engine::general_purpose::STANDARD.encode(&head)}));
    }
    let url = format!("{endpoint}/api/models/{}/preupload/main", id.repo);
    let mut resp = post_json(&url, &json!({"files": samples}), repo)?;
    if !resp.status().is_success() {
        return Err(client.status_error(&mut resp, &id.repo, "main", None));
    }
    let modes = json_of(&mut resp, &url)?;
    let is_lfs = |path: &str| {
        modes["files"].as_array().into_iter().flatten().any(|m| m["path"] == path && m["uploadMode"] == "lfs")
    };

    // 3. LFS objects
    let mut lfs = vec![];
    for f in files.iter().filter(|f| is_lfs(&f.path_in_repo)) {
        let size = std::fs::metadata(&f.local)?.len();
        lfs.push((f, sha256_of(&f.local)?, size));
    }
    if !lfs.is_empty() {
        let url = format!("{endpoint}/{}.git/info/lfs/objects/batch", id.repo);
        let objects: Vec<Value> = lfs.iter().map(|(_, oid, size)| json!({"oid": oid, "size": size})).collect();
        let body = json!({"operation": "upload", "transfers": ["basic"], "objects": objects, "hash_algo": "sha256", "ref": {"name": "refs/heads/main"}});
        let mut resp = client.send(repo, &url, |auth| {
            let mut r = agent.post(&url).header("Accept", "application/vnd.git-lfs+json").header("Content-Type", "application/vnd.git-lfs+json");
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            r.send(body.to_string())
        })?;
        if !resp.status().is_success() {
            return Err(client.status_error(&mut resp, &id.repo, "main", None));
        }
        let batch = json_of(&mut resp, &url)?;
        for obj in batch["objects"].as_array().into_iter().flatten() {
            if let Some(err) = obj.get("error") {
                bail!("--push-to-hub {repo}: the hub refused LFS object {}: {err}", obj["oid"]);
            }
            let Some(upload) = obj["actions"].get("upload") else { continue }; // already there
            let (f, _, size) = lfs.iter().find(|(_, oid, _)| obj["oid"] == oid.as_str()).ok_or_else(|| anyhow!("{url}: an object that was not asked for"))?;
            let href = upload["href"].as_str().ok_or_else(|| anyhow!("{url}: an upload action without href"))?;
            let file = std::fs::File::open(&f.local)?;
            let mut put = agent.put(href).header("Content-Length", size.to_string());
            for (k, v) in upload["header"].as_object().into_iter().flatten() {
                put = put.header(k.as_str(), v.as_str().unwrap_or_default());
            }
            // the object store's URL is signed: no hub token goes there
            let mut resp = put.send(&file).map_err(|e| client.network_error(&format!("uploading {}", f.path_in_repo), &e))?;
            if !resp.status().is_success() {
                return Err(client.status_error(&mut resp, &id.repo, "main", Some(&f.path_in_repo)));
            }
            if let Some(verify) = obj["actions"].get("verify") {
                let href = verify["href"].as_str().unwrap_or_default();
                let mut r = agent.post(href).header("Content-Type", "application/vnd.git-lfs+json");
                for (k, v) in verify["header"].as_object().into_iter().flatten() {
                    r = r.header(k.as_str(), v.as_str().unwrap_or_default());
                }
                let mut resp = r.send(json!({"oid": obj["oid"], "size": size}).to_string()).map_err(|e| client.network_error(repo, &e))?;
                if !resp.status().is_success() {
                    return Err(client.status_error(&mut resp, &id.repo, "main", Some(&f.path_in_repo)));
                }
            }
        }
    }

    // 4. the commit
    let mut lines = vec![json!({"key": "header", "value": {"summary": message, "description": ""}}).to_string()];
    for f in files {
        match lfs.iter().find(|(l, _, _)| l.path_in_repo == f.path_in_repo) {
            Some((_, oid, size)) => lines.push(json!({"key": "lfsFile", "value": {"path": f.path_in_repo, "algo": "sha256", "oid": oid, "size": size}}).to_string()),
            None => {
                let bytes = std::fs::read(&f.local).with_context(|| format!("reading {}", f.local.display()))?;
                let content = base64::engine::general_purpose::STANDARD.encode(&bytes);
                lines.push(json!({"key": "file", "value": {"content": content, "path": f.path_in_repo, "encoding": "base64"}}).to_string());
            }
        }
    }
    let url = format!("{endpoint}/api/models/{}/commit/main", id.repo);
    let body = lines.join("\n") + "\n";
    let mut resp = client.send(repo, &url, |auth| {
        let mut r = agent.post(&url).header("Content-Type", "application/x-ndjson");
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send(body.as_str())
    })?;
    if !resp.status().is_success() {
        return Err(client.status_error(&mut resp, &id.repo, "main", None));
    }
    let done = json_of(&mut resp, &url)?;
    Ok(done["commitUrl"].as_str().map(str::to_string).unwrap_or_else(|| format!("{endpoint}/{}", id.repo)))
}
