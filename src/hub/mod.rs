//! Models by name, as diffusers names them: `org/name`, `org/name@revision`, a subfolder
//! (`org/name/unet`) or one file (`org/name/v1-5-pruned-emaonly.safetensors`), resolved to a
//! local path through the Hugging Face cache that Python fills and reads
//! (`models--org--name/{blobs,snapshots,refs}`, `cache`), fetching what is missing from the
//! hub's file protocol (`client`) unless `HF_HUB_OFFLINE` is set.
//!
//! Resolution is offline-first: a revision whose snapshot already holds everything the command
//! loads is used without a request (a resumed run or a cluster node with a shared cache never
//! waits on the network). Otherwise only the files the command needs are fetched: the pipeline's
//! `model_index.json`, each part's configs and tokenizer files, and one set of weights per part
//! (safetensors over `.bin`, the chosen `variant`).
//!
//! `resolve` is the one entry point: commands call it on their path arguments and the run
//! config on `teacher:`; a value that exists on disk is a path, whatever it looks like.
pub mod cache;
pub mod card;
mod client;
pub mod push;

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub use cache::Env;

/// A model on the hub: repository, revision (branch, tag or commit) and a path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
    /// A subfolder (`unet`) or a file (`v1-5-pruned-emaonly.safetensors`) inside the repository.
    pub path: Option<String>,
}

/// File extensions that make `org/name/<path>` a single file rather than a subfolder.
const FILE_EXTENSIONS: [&str; 6] = [".safetensors", ".ckpt", ".pth", ".pt", ".bin", ".npz"];

/// A name segment as the hub allows it: letters, digits, `-`, `_`, `.`, not starting with `.`
/// or `-`, at most 96 characters.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && !s.starts_with(['.', '-'])
        && !s.ends_with('.')
        && !s.contains("..")
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl HubId {
    /// `org/name[@revision][/path]`, or None when the text is not shaped like one (an absolute
    /// or `./` path, a single name, backslashes, empty segments).
    pub fn parse(text: &str) -> Option<HubId> {
        if text.starts_with(['/', '.', '~']) || text.contains('\\') || text.contains("//") || text.ends_with('/') {
            return None;
        }
        let mut segments = text.split('/');
        let org = segments.next()?;
        let name_rev = segments.next()?;
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) if !r.is_empty() && !r.contains('@') => (n, Some(r.to_string())),
            Some(_) => return None,
            None => (name_rev, None),
        };
        if !is_name(org) || !is_name(name) {
            return None;
        }
        let rest: Vec<&str> = segments.collect();
        if rest.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
            return None;
        }
        let path = (!rest.is_empty()).then(|| rest.join("/"));
        Some(HubId { repo: format!("{org}/{name}"), revision, path })
    }

    /// True when `path` names one file rather than a subfolder.
    pub fn is_file(&self) -> bool {
        self.path.as_deref().is_some_and(|p| FILE_EXTENSIONS.iter().any(|e| p.ends_with(e)))
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.repo)?;
        if let Some(r) = &self.revision {
            write!(f, "@{r}")?;
        }
        if let Some(p) = &self.path {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

/// What the command loads from the model, which decides the files fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A whole pipeline: `model_index.json` and every part sdkd loads. A file id (`org/name/x.safetensors`) is a single-file checkpoint.
    Pipeline,
    /// A UNet: a pipeline's `unet/` (with `model_index.json`) or a UNet repository's root.
    Unet,
    /// One file (`org/name/path/file`): weights such as `--clip`'s.
    File,
}

/// Options beside the id (the run YAML's `revision:` and `variant:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub revision: Option<String>,
    /// diffusers' `variant=`: `fp16` fetches `*.fp16.safetensors` where a part has them.
    pub variant: Option<String>,
}

/// Where a hub id resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub repo: String,
    /// The commit the revision pointed at (40 hex digits).
    pub commit: String,
}

/// A local path, and the hub repository and commit it came from when it was a hub id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    pub origin: Option<Origin>,
}

/// True when `value` would be taken for a hub id: it does not exist on disk (relative to the
/// working directory, or to `base` when given) and is shaped `org/name[...]`.
pub fn is_hub_id(value: &Path, base: Option<&Path>) -> bool {
    let exists = match base {
        Some(b) => b.join(value).exists(),
        None => value.exists(),
    };
    !exists && value.to_str().and_then(HubId::parse).is_some()
}

/// The local path of `value`: itself when it exists or is not shaped like a hub id (the
/// caller's own error then names it), else the cached or downloaded snapshot path.
pub fn resolve(value: &Path, want: Want, options: &Options) -> Result<Resolved> {
    let local = Resolved { path: value.to_path_buf(), origin: None };
    if value.exists() {
        return Ok(local);
    }
    let Some(id) = value.to_str().and_then(HubId::parse) else { return Ok(local) };
    let env = Env::from_env();
    resolve_id(&id, want, options, &env)
}

/// `resolve` without fetching anything: the local path when `value` exists or the cache holds
/// what `want` needs, else None.
pub fn resolve_cached(value: &Path, want: Want, options: &Options) -> Option<Resolved> {
    if value.exists() {
        return Some(Resolved { path: value.to_path_buf(), origin: None });
    }
    let id = value.to_str().and_then(HubId::parse)?;
    let env = Env { offline: true, ..Env::from_env() };
    resolve_id(&id, want, options, &env).ok()
}

/// `resolve` with default options, for command-line flags (`org/name@revision` carries the revision).
pub fn local(value: &Path, want: Want) -> Result<PathBuf> {
    Ok(resolve(value, want, &Options::default())?.path)
}

/// Resolves `id` in `env`'s cache, fetching from its endpoint what is missing.
pub fn resolve_id(id: &HubId, want: Want, options: &Options, env: &Env) -> Result<Resolved> {
    let revision = match (&id.revision, &options.revision) {
        (Some(a), Some(b)) if a != b => bail!("{id}: the id says revision {a:?} but revision is {b:?}: give one"),
        (Some(r), _) | (None, Some(r)) => r.clone(),
        (None, None) => "main".to_string(),
    };
    let want = if id.is_file() { Want::File } else { want };
    if want == Want::File && !id.is_file() {
        bail!("{id}: a file is needed here: org/name/<file> (ending in {})", FILE_EXTENSIONS.join(", "));
    }
    let variant = options.variant.as_deref();
    let repo = cache::RepoCache::new(&env.cache_dir, &id.repo);
    if let Some(commit) = repo.commit_of(&revision) {
        let snapshot = repo.snapshot(&commit);
        if complete(&snapshot, id, want, variant) {
            return Ok(Resolved { path: target(&snapshot, id), origin: Some(Origin { repo: id.repo.clone(), commit }) });
        }
    }
    if env.offline {
        bail!(
            "{id}: HF_HUB_OFFLINE is set and the cache {} does not hold {} at revision {revision}: download it first \
             (unset HF_HUB_OFFLINE, or `huggingface-cli download {}{}`), or give a local path",
            env.cache_dir.display(),
            describe(want, id),
            id.repo,
            if revision == "main" { String::new() } else { format!(" --revision {revision}") }
        );
    }
    let client = client::Client::new(env)?;
    let info = client.revision(&id.repo, &revision)?;
    let listing: Vec<&str> = info.files.iter().map(String::as_str).collect();
    let mut files = select(&listing, id, want, variant, |file| client.fetch(&repo, &info.commit, &revision, file))?;
    files.sort();
    files.dedup();
    for file in &files {
        client.fetch(&repo, &info.commit, &revision, file)?;
    }
    if revision != info.commit {
        repo.write_ref(&revision, &info.commit)?;
    }
    let snapshot = repo.snapshot(&info.commit);
    Ok(Resolved { path: target(&snapshot, id), origin: Some(Origin { repo: id.repo.clone(), commit: info.commit }) })
}

fn describe(want: Want, id: &HubId) -> String {
    match (want, &id.path) {
        (Want::File, Some(p)) => format!("the file {p}"),
        (Want::Unet, _) => "the UNet".into(),
        _ => "the pipeline".into(),
    }
}

/// The path a command gets: the snapshot, or the file or subfolder inside it.
fn target(snapshot: &Path, id: &HubId) -> PathBuf {
    match &id.path {
        Some(p) => snapshot.join(p),
        None => snapshot.to_path_buf(),
    }
}

/// Pipeline parts sdkd never loads (diffusers' safety checker and its image processor).
const UNUSED_PARTS: [&str; 3] = ["safety_checker", "feature_extractor", "image_encoder"];

/// The parts of a pipeline named by its `model_index.json` (entries whose class is not null).
fn pipeline_parts(model_index: &str) -> Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_str(model_index)?;
    let Some(map) = json.as_object() else { bail!("model_index.json is not a JSON object") };
    Ok(map
        .iter()
        .filter(|(k, _)| !k.starts_with('_') && !UNUSED_PARTS.contains(&k.as_str()))
        .filter(|(_, v)| v.as_array().is_some_and(|a| a.iter().any(|x| !x.is_null())))
        .map(|(k, _)| k.clone())
        .collect())
}

/// A weights file's name split as diffusers writes them: `<stem>[.<variant>][-0000i-of-0000n].<ext>`.
fn weight_variant(name: &str) -> Option<(&'static str, String)> {
    let ext = [".safetensors", ".bin"].into_iter().find(|e| name.ends_with(e))?;
    let base = &name[..name.len() - ext.len()];
    // shards: `-00001-of-00002` before or after the variant
    let re = regex::Regex::new(r"-\d{5}-of-\d{5}").expect("shard pattern");
    let base = re.replace(base, "");
    let variant = base.split_once('.').map(|(_, v)| v.to_string()).unwrap_or_default();
    Some((if ext == ".safetensors" { "safetensors" } else { "bin" }, variant))
}

/// The files of one model folder (`dir`, "" for the root) that a loader reads: every `.json` and
/// `.txt` (configs, tokenizer, shard indexes) and one set of weights: safetensors where the
/// folder has any, `.bin` only where it has none; of those, the requested variant's where the
/// folder has it, else the plain files, then `fp16`, then `bf16` (as `models::weights` looks).
fn model_folder_files<'a>(listing: &[&'a str], dir: &str, variant: Option<&str>) -> Vec<&'a str> {
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    let children: Vec<&str> =
        listing.iter().copied().filter(|f| f.starts_with(&prefix) && !f[prefix.len()..].contains('/')).collect();
    let mut out: Vec<&str> = children.iter().copied().filter(|f| f.ends_with(".json") || f.ends_with(".txt")).collect();
    let weights: Vec<(&str, (&str, String))> =
        children.iter().filter_map(|f| weight_variant(&f[prefix.len()..]).map(|v| (*f, v))).collect();
    let has = |ext: &str, v: &str| weights.iter().any(|(_, (e, w))| *e == ext && w == v);
    let order: Vec<&str> = variant.into_iter().chain(["", "fp16", "bf16"]).collect();
    let chosen = ["safetensors", "bin"].into_iter().find_map(|ext| order.iter().find(|v| has(ext, v)).map(|v| (ext, *v)));
    if let Some((ext, chosen)) = chosen {
        out.extend(weights.iter().filter(|(_, (e, w))| *e == ext && w == chosen).map(|(f, _)| *f));
    }
    out
}

/// The files `want` needs from a repository whose files are `listing`. A pipeline's parts come
/// from its `model_index.json`, which `fetch` brings into the cache first.
fn select(
    listing: &[&str],
    id: &HubId,
    want: Want,
    variant: Option<&str>,
    fetch: impl Fn(&str) -> Result<PathBuf>,
) -> Result<Vec<String>> {
    let missing = |file: &str| anyhow::anyhow!("{id}: the repository has no {file}");
    let has = |file: &str| listing.contains(&file);
    let mut files: Vec<String> = vec![];
    match want {
        Want::File => {
            let path = id.path.as_deref().expect("a file id"); // Want::File only for is_file() ids (resolve_id)
            if !has(path) {
                return Err(missing(path));
            }
            files.push(path.to_string());
            // an SD-2.x single file's LDM config, beside it under the same stem
            if let Some(stem) = path.rsplit_once('.').map(|(s, _)| s) {
                let yaml = format!("{stem}.yaml");
                if has(&yaml) {
                    files.push(yaml);
                }
            }
        }
        Want::Pipeline | Want::Unet if id.path.is_some() => {
            let dir = id.path.as_deref().expect("matched on is_some");
            let found = model_folder_files(listing, dir, variant);
            if found.is_empty() {
                return Err(missing(&format!("folder {dir}")));
            }
            files.extend(found.into_iter().map(String::from));
        }
        Want::Pipeline | Want::Unet => {
            if !has("model_index.json") {
                if want == Want::Pipeline {
                    return Err(anyhow::anyhow!(
                        "{id}: the repository has no model_index.json, so it is not a diffusers pipeline (name a single file as {}/<file>.safetensors)",
                        id.repo
                    ));
                }
                files.extend(model_folder_files(listing, "", variant).into_iter().map(String::from));
                if !files.iter().any(|f| f == "config.json") {
                    return Err(missing("config.json (a diffusers UNet repository has one)"));
                }
            } else {
                let index = fetch("model_index.json")?;
                let text = std::fs::read_to_string(&index)?;
                let parts = match want {
                    Want::Unet => vec!["unet".to_string()],
                    _ => pipeline_parts(&text).map_err(|e| anyhow::anyhow!("{id}: model_index.json: {e}"))?,
                };
                files.push("model_index.json".into());
                // the model card: the teacher's license for the card of an export
                if has("README.md") {
                    files.push("README.md".into());
                }
                for part in parts {
                    let found = model_folder_files(listing, &part, variant);
                    if found.is_empty() {
                        return Err(missing(&format!("folder {part} (model_index.json names it)")));
                    }
                    files.extend(found.into_iter().map(String::from));
                }
            }
        }
    }
    Ok(files)
}

/// The relative paths of the files under `dir` (a snapshot), `/`-separated.
fn list_tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.exists() {
                // a dangling link (a blob deleted by hand) is not a file
                if let Ok(rel) = p.strip_prefix(root) {
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// True when the snapshot holds every file `want` needs: the selection over the snapshot's own
/// files, with each part's config and (for models) weights present, and every shard its index names.
fn complete(snapshot: &Path, id: &HubId, want: Want, variant: Option<&str>) -> bool {
    if !snapshot.is_dir() {
        return false;
    }
    let owned = list_tree(snapshot);
    let listing: Vec<&str> = owned.iter().map(String::as_str).collect();
    let fetch = |f: &str| -> Result<PathBuf> { Ok(snapshot.join(f)) };
    let Ok(files) = select(&listing, id, want, variant, fetch) else { return false };
    if want == Want::File {
        return true;
    }
    // every folder of the selection needs its config and, unless it is a tokenizer or scheduler, weights
    let mut dirs: Vec<&str> = files.iter().map(|f| f.rsplit_once('/').map_or("", |(d, _)| d)).collect();
    dirs.sort();
    dirs.dedup();
    let in_dir = |d: &str, f: &str| if d.is_empty() { f.to_string() } else { format!("{d}/{f}") };
    for dir in dirs {
        let names: Vec<&str> = files.iter().filter(|f| f.rsplit_once('/').map_or("", |(d, _)| d) == dir).map(String::as_str).collect();
        let has = |f: &str| names.contains(&in_dir(dir, f).as_str());
        let leaf = dir.rsplit('/').next().unwrap_or(dir);
        let ok = match leaf {
            "" if has("model_index.json") => true,
            _ if leaf.starts_with("tokenizer") => {
                has("tokenizer_config.json") && (has("tokenizer.json") || (has("vocab.json") && has("merges.txt")))
            }
            _ if leaf.starts_with("scheduler") => has("scheduler_config.json"),
            _ => has("config.json") && names.iter().any(|f| weight_variant(f).is_some()),
        };
        if !ok {
            return false;
        }
        // a sharded model: every shard its index names
        for index in names.iter().filter(|f| f.ends_with(".index.json") || f.contains(".index.")) {
            let Ok(text) = std::fs::read_to_string(snapshot.join(index)) else { return false };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
            if let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) {
                if map.values().filter_map(|v| v.as_str()).any(|s| !snapshot.join(in_dir(dir, s)).is_file()) {
                    return false;
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_paths_do_not() {
        let id = HubId::parse("stabilityai/stable-diffusion-xl-base-1.0").unwrap();
        assert_eq!((id.repo.as_str(), id.revision, id.path), ("stabilityai/stable-diffusion-xl-base-1.0", None, None));
        let id = HubId::parse("org/name@v1.0/unet").unwrap();
        assert_eq!((id.revision.as_deref(), id.path.as_deref(), id.is_file()), (Some("v1.0"), Some("unet"), false));
        let id = HubId::parse("runwayml/stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors").unwrap();
        assert!(id.is_file());
        assert_eq!(id.to_string(), "runwayml/stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors");
        for not in ["/abs/path", "./rel/x", "../x/y", "single", "a//b", "a/b/", "a/-b", "a/b@", "~/x/y", "a\\b/c", "a/../b", "a/b/../c"] {
            assert_eq!(HubId::parse(not), None, "{not}");
        }
    }

    #[test]
    fn weights_of_the_variant_safetensors_over_bin() {
        let listing = [
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.bin",
            "unet/diffusion_flax_model.msgpack",
            "text_encoder/config.json",
            "text_encoder/pytorch_model.bin",
            "text_encoder/model.fp16.safetensors.index.json",
            "text_encoder/model.fp16-00001-of-00002.safetensors",
            "text_encoder/model.fp16-00002-of-00002.safetensors",
        ];
        assert_eq!(model_folder_files(&listing, "unet", None), ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]);
        assert_eq!(model_folder_files(&listing, "unet", Some("fp16")), ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]);
        // safetensors of another variant before any .bin: the fp16 shards
        assert_eq!(model_folder_files(&listing, "text_encoder", None), model_folder_files(&listing, "text_encoder", Some("fp16")));
        assert_eq!(model_folder_files(&["a/config.json", "a/pytorch_model.bin"], "a", None), ["a/config.json", "a/pytorch_model.bin"]);
        assert_eq!(
            model_folder_files(&listing, "text_encoder", Some("fp16"))[2..],
            ["text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/model.fp16-00002-of-00002.safetensors"]
        );
        // a variant a part lacks falls back to its plain weights
        assert_eq!(model_folder_files(&listing, "unet", Some("bf16"))[1..], ["unet/diffusion_pytorch_model.safetensors"]);
    }

    #[test]
    fn pipeline_parts_skip_nulls_and_the_safety_checker() {
        let index = r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "image_encoder": [null, null],
            "text_encoder": ["transformers", "CLIPTextModel"]}"#;
        let mut parts = pipeline_parts(index).unwrap();
        parts.sort();
        assert_eq!(parts, ["text_encoder", "unet"]);
    }
}
