//! Crash-safe writing, and the rule that keeps sdkd from destroying what it did not make.
//!
//! Crash-safe: a folder is filled in a hidden sibling (`.<name>.tmp-<pid>`), every file and
//! folder fsynced, then renamed into place (the old one moved aside to `.<name>.old-<pid>` first
//! and removed after); a file is written to a hidden sibling, fsynced and renamed. A crash leaves
//! the old folder or file or the new one, never half of one; `clean_stale` removes what a dead
//! process left behind.
//!
//! The rule: every folder sdkd makes for a user (a run's `output_dir`, an exported or pruned UNet
//! or pipeline, a synthetic dataset, a demo's output) holds a small marker, [`MARKER`], naming its purpose. sdkd
//! writes only where nothing is, into an empty folder, or over a folder it marked for the same
//! purpose, and over that only when asked (`--overwrite`) and only when every file in it, at
//! any depth, is one sdkd wrote there ([`foreign_files`]). Anything else is refused by name.
//!
//! Which files sdkd wrote: a folder written whole by [`write_dir`] lists them in its marker
//! (name and size, so a file the user added or changed counts as theirs); a folder that grows
//! after it is made (a run, a demo until it finishes, an eval generation) is judged by the names
//! its purpose writes ([`Purpose::layout`]), and a marked folder inside it by its own marker.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The marker file of a folder sdkd made (hidden, so diffusers and image folders ignore it).
pub const MARKER: &str = ".sdkd.json";

/// What a folder sdkd made is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// A training run's `output_dir`.
    Run,
    /// A diffusers UNet folder (`export`, `prune`).
    Unet,
    /// A diffusers pipeline folder (`export`, `prune --format pipeline`).
    Pipeline,
    /// A synthetic image-caption dataset (`synth`).
    Dataset,
    /// The output of `sdkd demo`.
    Demo,
    /// The report folder of `sdkd eval`.
    Eval,
}

impl Purpose {
    pub fn describe(self) -> &'static str {
        match self {
            Purpose::Run => "a training run",
            Purpose::Unet => "a diffusers UNet folder",
            Purpose::Pipeline => "a diffusers pipeline folder",
            Purpose::Dataset => "a synthetic dataset",
            Purpose::Demo => "an sdkd demo output",
            Purpose::Eval => "an sdkd eval report",
        }
    }

    /// The paths (relative, `/`-separated; `*` within a name, a final `**` for anything below)
    /// that sdkd writes into a folder of this purpose whose marker lists no files: a run and an
    /// eval generation, which grow after their marker is written, and folders marked by an sdkd
    /// that did not list its files. Anything else there is the user's.
    pub fn layout(self) -> &'static [&'static str] {
        match self {
            // distill::checkpoint (a step folder's files, listed in its state.json), the trainer's
            // config.yaml, final/ (marked UNet folders), TensorBoard events, sample grids and
            // validation.eval's reports and images
            Purpose::Run => &[
                "config.yaml",
                "checkpoints/step-*/state.json",
                "checkpoints/step-*/student.safetensors",
                "checkpoints/step-*/ema.safetensors",
                "checkpoints/step-*/target.safetensors",
                "checkpoints/step-*/optimizer.safetensors",
                "checkpoints/step-*/unet/config.json",
                "final/unet/config.json",
                "final/unet/diffusion_pytorch_model.safetensors",
                "final/unet_ema/config.json",
                "final/unet_ema/diffusion_pytorch_model.safetensors",
                "final/unet_target/config.json",
                "final/unet_target/diffusion_pytorch_model.safetensors",
                "tb/events.out.tfevents.*",
                "samples/step-*.png",
                "eval/step-*/report.json",
                "eval/step-*/images/*.png",
                "eval/step-*/images_*/*.png",
                "eval/.step-*.partial/**",
            ],
            Purpose::Unet => &["config.json", "diffusion_pytorch_model.safetensors"],
            Purpose::Pipeline => &[
                "model_index.json",
                "*/config.json",
                "*/diffusion_pytorch_model.safetensors",
                "*/model.safetensors",
                "tokenizer/*",
                "scheduler/scheduler_config.json",
            ],
            Purpose::Dataset => &["metadata.jsonl", "*.png", "*.tar", "data/train-*.parquet"],
            // the demo's own writers (src/demo/); its pipelines and runs carry their own markers
            Purpose::Demo => &[
                "cache/**",
                "cache-heldout/**",
                "configs/*.yaml",
                "data/**",
                "heldout/**",
                "logs/*.log",
                "pipeline-init/**",
                "runs/**",
                "samples/**",
                "student_kd/**",
                "student_scratch/**",
                "student_lcm/**",
                "teacher/**",
                "grid.png",
                "grid_lcm.png",
                "report.md",
                "vae_reconstructions.png",
            ],
            Purpose::Eval => &["report.json", "report.md", "images/*.png", "images/captions.jsonl", "images_*/*.png", "features/*"],
        }
    }
}

/// A file as sdkd wrote it (its size), in a marker's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub size: u64,
}

/// The content of [`MARKER`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub purpose: Purpose,
    pub sdkd_version: String,
    /// A run's `RunConfig::config_hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// A run's `RunConfig::resume_identity`, so a refusal can name the keys that differ.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub config: serde_json::Value,
    /// Every file sdkd wrote into the folder (relative path, `/`-separated), when it wrote the
    /// folder whole; absent for a folder that grows (judged by [`Purpose::layout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<BTreeMap<String, Written>>,
}

impl Marker {
    pub fn new(purpose: Purpose) -> Marker {
        Marker {
            purpose,
            sdkd_version: env!("CARGO_PKG_VERSION").to_string(),
            config_hash: None,
            config: serde_json::Value::Null,
            files: None,
        }
    }

    /// This marker listing every file now under `dir` (its own marker excepted).
    pub fn listing(&self, dir: &Path) -> Result<Marker> {
        let mut files = BTreeMap::new();
        list_files(dir, "", &mut files)?;
        Ok(Marker { files: Some(files), ..self.clone() })
    }

    /// Writes the marker into `dir` (atomically).
    pub fn write_into(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).context("serialising a folder marker")? + "\n";
        write_file(&dir.join(MARKER), json.as_bytes())
    }
}

/// What is at a path sdkd was asked to write.
#[derive(Debug, Clone, PartialEq)]
pub enum Existing {
    /// Nothing, or an empty folder (a folder holding only a marker counts as empty).
    Nothing,
    /// A folder sdkd made, with its marker.
    Made(Marker),
    /// Something sdkd did not make (or whose marker is unreadable), described in words.
    Foreign(String),
}

/// Looks at `path` for the overwrite rule.
pub fn existing(path: &Path) -> Result<Existing> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    };
    if meta.file_type().is_symlink() {
        return Ok(Existing::Foreign("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Ok(Existing::Foreign("is a file, not a folder".into()));
    }
    let mut names: Vec<String> = fs::read_dir(path)
        .with_context(|| format!("listing {}", path.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", path.display()))?;
    names.sort();
    let marker = names.iter().any(|n| n == MARKER).then(|| read_marker(path));
    names.retain(|n| n != MARKER);
    Ok(match marker {
        None if names.is_empty() => Existing::Nothing,
        Some(Ok(_)) if names.is_empty() => Existing::Nothing,
        Some(Ok(m)) => Existing::Made(m),
        Some(Err(e)) => Existing::Foreign(format!("has an unreadable {MARKER} ({e:#})")),
        None => Existing::Foreign(format!("holds {}", list_some(&names))),
    })
}

fn read_marker(dir: &Path) -> Result<Marker> {
    let path = dir.join(MARKER);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Lists in `dir`'s marker every file now in it: for a writer that adds a file of its own to a
/// folder `write_dir` made (export's model card), so a later `--overwrite` counts it as sdkd's.
pub fn relist(dir: &Path) -> Result<()> {
    read_marker(dir)?.listing(dir)?.write_into(dir)
}

/// Every file under `dir` (not following symbolic links; the root's marker left out), by
/// relative `/`-separated path.
fn list_files(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Written>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        if rel == MARKER {
            continue;
        }
        let meta = entry.metadata().with_context(|| format!("looking at {}", entry.path().display()))?;
        if meta.is_dir() {
            list_files(&entry.path(), &format!("{rel}/"), out)?;
        } else {
            out.insert(rel, Written { size: meta.len() });
        }
    }
    Ok(())
}

/// The files and links under `dir`, a folder sdkd marked with `marker`, that sdkd did not write
/// there (relative paths, sorted): what `--overwrite` would delete of the user's. A file is
/// sdkd's when the marker lists it with its size, or (a marker listing no files) its path is in
/// the purpose's [`Purpose::layout`]; a marked folder inside is judged by its own marker, and
/// the hidden temp and replaced folders of a writer ([`clean_stale`]'s) are sdkd's.
pub fn foreign_files(dir: &Path, marker: &Marker) -> Result<Vec<String>> {
    let mut foreign = vec![];
    walk_foreign(dir, "", marker, "", &mut foreign)?;
    foreign.sort();
    Ok(foreign)
}

/// `rel` is the path from the governing marker's folder, `shown` the prefix from the root.
fn walk_foreign(dir: &Path, rel: &str, marker: &Marker, shown: &str, foreign: &mut Vec<String>) -> Result<()> {
    let mut entries = vec![];
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        entries.push(entry.with_context(|| format!("listing {}", dir.display()))?);
    }
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let (path, here, show) = (entry.path(), format!("{rel}{name}"), format!("{shown}{name}"));
        if here == MARKER || stale_pid(&name).is_some() {
            continue;
        }
        let meta = fs::symlink_metadata(&path).with_context(|| format!("looking at {}", path.display()))?;
        if meta.file_type().is_symlink() {
            foreign.push(show); // sdkd makes no links
        } else if meta.is_dir() {
            // a folder with its own marker (one sdkd made inside: a run's final/unet) answers for itself
            let inner = path.join(MARKER);
            if inner.is_file() {
                match read_marker(&path) {
                    Ok(m) => walk_foreign(&path, "", &m, &format!("{show}/"), foreign)?,
                    Err(_) => foreign.push(format!("{show}/{MARKER}")),
                }
            } else {
                walk_foreign(&path, &format!("{here}/"), marker, &format!("{show}/"), foreign)?;
            }
        } else {
            let ours = match &marker.files {
                Some(files) => files.get(&here) == Some(&Written { size: meta.len() }),
                None => marker.purpose.layout().iter().any(|p| path_matches(p, &here)),
            };
            if !ours {
                foreign.push(show);
            }
        }
    }
    Ok(())
}

/// Whether the `/`-separated `path` matches `pattern` (`*` within a name; a last `**` matches
/// everything below).
fn path_matches(pattern: &str, path: &str) -> bool {
    let mut parts = path.split('/');
    for p in pattern.split('/') {
        if p == "**" {
            return parts.next().is_some();
        }
        match parts.next() {
            Some(name) if name_matches(p.as_bytes(), name.as_bytes()) => {}
            _ => return false,
        }
    }
    parts.next().is_none()
}

fn name_matches(p: &[u8], n: &[u8]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some((b'*', rest)) => (0..=n.len()).any(|i| name_matches(rest, &n[i..])),
        Some((c, rest)) => n.first() == Some(c) && name_matches(rest, &n[1..]),
    }
}

/// "a, b, c and 4 more".
pub fn list_some(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let shown = names.iter().take(SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
    match names.len().saturating_sub(SHOWN) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// The overwrite rule for writing `purpose` at `dest`, named on the command line by `flag`:
/// nothing there, or an earlier sdkd folder of the same purpose with `overwrite`.
pub fn check_replaceable(dest: &Path, purpose: Purpose, overwrite: bool, flag: &str) -> Result<()> {
    let d = dest.display();
    match existing(dest)? {
        Existing::Nothing => Ok(()),
        Existing::Made(m) if m.purpose == purpose && overwrite => {
            let foreign = foreign_files(dest, &m)?;
            if !foreign.is_empty() {
                bail!(
                    "--overwrite: {flag} {d} holds {} that sdkd did not write there: {}; move them out first (sdkd replaces the whole folder), or choose another {flag}",
                    if foreign.len() == 1 { "a file" } else { "files" },
                    list_some(&foreign)
                );
            }
            Ok(())
        }
        Existing::Made(m) if m.purpose == purpose => {
            bail!("{flag} {d} holds {} that sdkd wrote earlier: pass --overwrite to replace it, or choose another {flag}", purpose.describe())
        }
        Existing::Made(m) => bail!(
            "{flag} {d} holds {}, not {}: sdkd will not replace it; choose another {flag}",
            m.purpose.describe(),
            purpose.describe()
        ),
        Existing::Foreign(what) => {
            bail!("{flag} {d} {what}, which sdkd did not make: sdkd will not write there; choose a new or empty folder")
        }
    }
}

/// `path` made absolute with symlinks resolved, also when it (or its last parts) does not exist.
fn resolved(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let mut rest = vec![];
    let mut head = abs.as_path();
    loop {
        match head.canonicalize() {
            Ok(c) => return Ok(rest.iter().rev().fold(c, |p, part| p.join(part))),
            Err(_) => match (head.parent(), head.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    head = parent;
                }
                _ => return Ok(abs),
            },
        }
    }
}

/// Refuses a `dest` (named by `flag`) that is, contains or lies inside `source`, which is being
/// read (`what` names it): writing there would destroy or mix into the source.
pub fn check_apart(dest: &Path, source: &Path, what: &str, flag: &str) -> Result<()> {
    let (d, s) = (resolved(dest)?, resolved(source)?);
    if d.starts_with(&s) {
        bail!("{flag} {} is or lies inside {what} {}: sdkd will not write there; choose another {flag}", dest.display(), source.display());
    }
    check_not_over(dest, source, what, flag)
}

/// Refuses a `dest` (named by `flag`) that is or contains `source` (`what` names it): replacing
/// it would delete the source. A `dest` inside `source` is allowed.
pub fn check_not_over(dest: &Path, source: &Path, what: &str, flag: &str) -> Result<()> {
    let (d, s) = (resolved(dest)?, resolved(source)?);
    if s.starts_with(&d) {
        bail!("{flag} {} is or contains {what} {}: sdkd will not write there; choose another {flag}", dest.display(), source.display());
    }
    Ok(())
}

/// A hidden sibling of `dest`: `.<name>.<tag>-<pid>`.
fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    dest.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

fn parent_of(path: &Path) -> Option<&Path> {
    path.parent().filter(|p| !p.as_os_str().is_empty())
}

/// fsyncs one folder (its entries' names).
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync folder {}", dir.display()))
}

/// fsyncs every file and folder under `dir`, and `dir` itself.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            fs::File::open(&path).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", path.display()))?;
        }
    }
    sync_dir(dir)
}

/// Fills a fresh hidden sibling of `dest` with `fill`, adds `marker` (if any), fsyncs it, and
/// renames it to `dest`, replacing what `dest` held only once the new folder is complete. The
/// caller has applied the overwrite rule. On error nothing of the new folder is left.
pub fn write_dir(dest: &Path, marker: Option<&Marker>, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = parent_of(dest) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = sibling(dest, "tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // the marker lists what was written, so a later --overwrite can tell the user's additions
    let mark = |m: &Marker| -> Result<()> {
        let listed = m.listing(&tmp)?;
        match listed.files.as_ref().is_some_and(|f| f.is_empty()) {
            true => m.write_into(&tmp), // made empty, filled later: judged by its layout
            false => listed.write_into(&tmp),
        }
    };
    let filled = fill(&tmp).and_then(|_| marker.map_or(Ok(()), mark)).and_then(|_| sync_tree(&tmp));
    if let Err(e) = filled {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = sibling(dest, "old");
    let replacing = fs::symlink_metadata(dest).is_ok();
    if replacing {
        fs::rename(dest, &old).with_context(|| format!("moving aside {}", dest.display()))?;
    }
    fs::rename(&tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    if let Some(parent) = parent_of(dest) {
        sync_dir(parent)?;
    }
    if replacing {
        fs::remove_dir_all(&old).with_context(|| format!("removing the replaced {}", old.display()))?;
    }
    Ok(())
}

/// The mode a file created now gets, as any tool's (`open(2)` with 0666): 0666 & !umask. The
/// umask is read from /proc/self/status (setting it to read it would race other threads); 022
/// where it cannot be read.
pub fn file_mode() -> u32 {
    let umask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok())))
        .unwrap_or(0o022);
    0o666 & !umask
}

/// Gives `path` the mode of a file created now ([`file_mode`]): for a file a library wrote
/// through a private temp file (mode 0600, kept by its rename), such as the safetensors crate's.
pub fn set_file_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(file_mode())).with_context(|| format!("setting the mode of {}", path.display()))
}

/// Removes the folder `dir`, renamed aside first so that a crash never leaves half of it under
/// its own name.
pub fn remove_dir(dir: &Path) -> Result<()> {
    let aside = sibling(dir, "old");
    fs::rename(dir, &aside).with_context(|| format!("moving {} aside", dir.display()))?;
    fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))
}

/// The overwrite rule for a single output file at `dest` (named by `flag`): nothing there, or a
/// file sdkd wrote for the same purpose (`ours`, which the caller reads from it) with `overwrite`.
pub fn check_file_replaceable(dest: &Path, ours: impl FnOnce() -> bool, overwrite: bool, flag: &str) -> Result<()> {
    let d = dest.display();
    match fs::symlink_metadata(dest) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_file() => bail!("{flag} {d} exists and is not a file: sdkd will not write there; choose a new file name"),
        Ok(_) if !ours() => bail!("{flag} {d} exists and sdkd did not write it: sdkd will not replace it; choose a new file name"),
        Ok(_) if !overwrite => bail!("{flag} {d} is a file sdkd wrote earlier: pass --overwrite to replace it, or choose another {flag}"),
        Ok(_) => Ok(()),
    }
}

/// Writes the file `path` with `fill` into a hidden sibling, fsynced, then renamed over `path`:
/// complete or absent after a crash.
pub fn write_file_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = parent_of(path) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = sibling(path, "tmp");
    let filled = fill(&tmp).and_then(|_| {
        fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", tmp.display()))
    });
    if let Err(e) = filled {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_dir(parent_of(path).unwrap_or(Path::new(".")))
}

/// Writes `bytes` to `path` through a hidden sibling, fsynced, then renamed over `path`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, "tmp");
    let written = fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_dir(parent_of(path).unwrap_or(Path::new(".")))
}

/// Removes, in `dir`, the hidden `.<name>.tmp-<pid>` / `.<name>.old-<pid>` folders and files
/// that `write_dir` / `write_file` left behind in a process that no longer runs (or in this one).
pub fn clean_stale(dir: &Path) -> Result<()> {
    let me = std::process::id();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_pid(&name) else { continue };
        let alive = pid != me && Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let path = entry.path();
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.with_context(|| format!("removing stale {}", path.display()))?;
        }
    }
    Ok(())
}

/// The pid in a name `write_dir` makes (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`).
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once('.')?;
    let pid = tail.strip_prefix("tmp-").or_else(|| tail.strip_prefix("old-"))?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_fill_leaves_the_old_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        write_dir(&dest, None, |d| Ok(fs::write(d.join("a"), "1")?)).unwrap();
        let e = write_dir(&dest, None, |d| {
            fs::write(d.join("a"), "2")?;
            bail!("disk full")
        });
        assert!(e.is_err());
        assert_eq!(fs::read_to_string(dest.join("a")).unwrap(), "1");
        let leftovers: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        write_dir(&dest, Some(&Marker::new(Purpose::Unet)), |d| Ok(fs::write(d.join("b"), "3")?)).unwrap();
        assert!(!dest.join("a").exists() && dest.join("b").exists());
        let listed = Marker { files: Some([("b".to_string(), Written { size: 1 })].into()), ..Marker::new(Purpose::Unet) };
        assert_eq!(existing(&dest).unwrap(), Existing::Made(listed));
    }

    #[test]
    fn foreign_files_at_any_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let p = |n: &str| tmp.path().join(n);
        // a folder written whole: its listing decides, by name and size
        write_dir(&p("unet"), Some(&Marker::new(Purpose::Unet)), |d| {
            fs::create_dir(d.join("sub"))?;
            fs::write(d.join("sub/w"), "12")?;
            Ok(fs::write(d.join("config.json"), "{}")?)
        })
        .unwrap();
        let m = read_marker(&p("unet")).unwrap();
        assert!(foreign_files(&p("unet"), &m).unwrap().is_empty());
        fs::write(p("unet/sub/notes.txt"), "mine").unwrap();
        fs::write(p("unet/config.json"), "{\"edited\": 1}").unwrap();
        assert_eq!(foreign_files(&p("unet"), &m).unwrap(), ["config.json", "sub/notes.txt"]);
        let e = format!("{:#}", check_replaceable(&p("unet"), Purpose::Unet, true, "--out").unwrap_err());
        assert!(e.contains("sub/notes.txt") && e.contains("config.json"), "{e}");
        // a folder that grows: its purpose's layout, and a marked folder inside by its own marker
        let run = p("run");
        write_dir(&run, Some(&Marker::new(Purpose::Run)), |_| Ok(())).unwrap();
        let m = read_marker(&run).unwrap();
        assert_eq!(m.files, None);
        for f in ["config.yaml", "checkpoints/step-2/state.json", "checkpoints/step-2/unet/config.json", "tb/events.out.tfevents.1.h.2.0", "samples/step-2.png"] {
            fs::create_dir_all(run.join(f).parent().unwrap()).unwrap();
            fs::write(run.join(f), "x").unwrap();
        }
        fs::create_dir_all(run.join("checkpoints/.step-4.tmp-99999999")).unwrap();
        fs::write(run.join("checkpoints/.step-4.tmp-99999999/student.safetensors"), "half").unwrap();
        write_dir(&run.join("final/unet"), Some(&Marker::new(Purpose::Unet)), |d| Ok(fs::write(d.join("config.json"), "{}")?)).unwrap();
        assert!(foreign_files(&run, &m).unwrap().is_empty());
        for f in ["checkpoints/notes.txt", "checkpoints/step-2/x.ckpt", "tb/mine", "samples/cat.png", "final/unet/README.md"] {
            fs::write(run.join(f), "mine").unwrap();
        }
        assert_eq!(
            foreign_files(&run, &m).unwrap(),
            ["checkpoints/notes.txt", "checkpoints/step-2/x.ckpt", "final/unet/README.md", "samples/cat.png", "tb/mine"]
        );
        assert!(path_matches("eval/.step-*.partial/**", "eval/.step-3.partial/images/000001.png"));
        assert!(!path_matches("eval/.step-*.partial/**", "eval/.step-3.partial"));
        assert!(!path_matches("samples/step-*.png", "samples/step-2.png/x"));
        assert!(!path_matches("*.png", "a/b.png"));
    }

    #[test]
    fn file_mode_is_umask_of_0666() {
        // the test harness's umask, read the way a shell does
        let umask = std::process::Command::new("sh").args(["-c", "umask"]).output().unwrap();
        let umask = u32::from_str_radix(String::from_utf8_lossy(&umask.stdout).trim(), 8).unwrap();
        assert_eq!(file_mode(), 0o666 & !umask);
    }

    #[test]
    fn the_overwrite_rule() {
        let tmp = tempfile::tempdir().unwrap();
        let p = |n: &str| tmp.path().join(n);
        check_replaceable(&p("absent"), Purpose::Unet, false, "--out").unwrap();
        fs::create_dir(p("empty")).unwrap();
        check_replaceable(&p("empty"), Purpose::Unet, false, "--out").unwrap();
        fs::create_dir(p("mine")).unwrap();
        fs::write(p("mine/notes.txt"), "x").unwrap();
        for overwrite in [false, true] {
            let e = format!("{:#}", check_replaceable(&p("mine"), Purpose::Unet, overwrite, "--out").unwrap_err());
            assert!(e.contains("notes.txt") && e.contains("did not make"), "{e}");
        }
        write_dir(&p("unet"), Some(&Marker::new(Purpose::Unet)), |d| Ok(fs::write(d.join("config.json"), "{}")?)).unwrap();
        let e = format!("{:#}", check_replaceable(&p("unet"), Purpose::Unet, false, "--out").unwrap_err());
        assert!(e.contains("--overwrite"), "{e}");
        check_replaceable(&p("unet"), Purpose::Unet, true, "--out").unwrap();
        let e = format!("{:#}", check_replaceable(&p("unet"), Purpose::Dataset, true, "--out").unwrap_err());
        assert!(e.contains("a diffusers UNet folder, not a synthetic dataset"), "{e}");
        fs::write(p("file"), "x").unwrap();
        assert!(check_replaceable(&p("file"), Purpose::Unet, true, "--out").is_err());

        check_apart(&p("a/b"), &p("a/c"), "the checkpoint", "--out").unwrap();
        for dest in ["a", "a/c", "a/c/d"] {
            let e = format!("{:#}", check_apart(&p(dest), &p("a/c"), "the checkpoint", "--out").unwrap_err());
            assert!(e.contains("the checkpoint"), "{e}");
        }
        check_not_over(&p("a/c/d"), &p("a/c"), "the run", "--out").unwrap();
        for dest in ["a", "a/c"] {
            assert!(check_not_over(&p(dest), &p("a/c"), "the run", "--out").is_err());
        }
    }

    #[test]
    fn stale_names() {
        assert_eq!(stale_pid(".step-300.tmp-4194999"), Some(4194999));
        assert_eq!(stale_pid(".out.old-12"), Some(12));
        assert_eq!(stale_pid("step-300"), None);
        assert_eq!(stale_pid(".sdkd.json"), None);
        assert_eq!(stale_pid(".hidden.tmp-x"), None);
    }
}
