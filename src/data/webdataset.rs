//! webdataset tar shards, as img2dataset writes them: each sample is the consecutive members
//! `KEY.jpg` (or `.png`/`.webp`), `KEY.txt` and `KEY.json` of one tar (a key is a member's path
//! up to the first dot of its file name, as webdataset groups them).
//!
//! Streaming by index, not by a shuffle buffer: opening the set reads every shard's member
//! headers (seeking over the image bytes) and its small `.txt`/`.json` members, and keeps in
//! memory where each image's bytes sit. `load(index, epoch)` then reads exactly one image with
//! one positioned read, so a sample is a pure function of (index, epoch), the order is the same
//! seeded permutation as for an imagefolder, and a resumed run continues exactly. The index
//! lives only in memory: nothing is written beside the user's shards (which may be read-only or
//! shared), and rebuilding it costs one pass over the headers (measured in docs/benchmarks.md).
//! Nothing is unpacked to disk.
//!
//! A shard that ends inside a member (a truncated download) keeps the samples before it; the
//! cut sample is a bad sample named by shard and key, as are a sample without a caption or
//! image and one whose image does not decode. A shard cut inside a tar header is warned about
//! when it is opened (no key can be named for what followed); one cut exactly between two
//! members cannot be told from a complete tar.
use super::filters::{Filters, Meta};
use super::source::{decode_rgb, fingerprint_of, usable_caption, BadKind, BadSample, ImageRows};
use anyhow::{Context, Result};
use rayon::prelude::*;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Which member holds the caption (`data.caption`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptionField {
    /// `KEY.txt`, else the json's `caption` (the default: img2dataset writes both or the json alone).
    Default,
    /// `KEY.txt` only.
    Txt,
    /// This key of `KEY.json`.
    JsonKey(String),
}

impl CaptionField {
    pub fn parse(caption: Option<&str>) -> CaptionField {
        match caption {
            None => CaptionField::Default,
            Some("txt") => CaptionField::Txt,
            Some(k) => CaptionField::JsonKey(k.to_string()),
        }
    }
}

/// Where one sample's image is, and what is known of it without decoding.
#[derive(Clone, Debug)]
struct Entry {
    shard: u32,
    key: String,
    /// (byte offset of the image data in the tar, length); None when the sample has no image.
    image: Option<(u64, u64)>,
    caption: Option<String>,
    size: Option<(u32, u32)>,
    /// The shard ends inside this sample's members.
    truncated: bool,
    /// Its caption is a `.txt` member that is not UTF-8.
    caption_not_utf8: bool,
}

/// An opened set of webdataset shards.
#[derive(Debug)]
pub struct WebDataset {
    pub shards: Vec<PathBuf>,
    /// What `describe` calls the set (the user's `data.shards`).
    pub spec: String,
    entries: Vec<Entry>,
    /// Samples removed by `data.min_size`, `data.max_aspect` and `data.filter`.
    pub filtered_out: usize,
}

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// webdataset's split of a member path into (key, extension): the extension starts at the first
/// dot of the file name.
fn split_key(path: &str) -> (&str, &str) {
    let name_start = path.rfind('/').map_or(0, |i| i + 1);
    match path[name_start..].find('.') {
        Some(dot) => (&path[..name_start + dot], &path[name_start + dot + 1..]),
        None => (path, ""),
    }
}

/// One sample's members while its shard is scanned.
#[derive(Default)]
struct Pending {
    key: String,
    image: Option<(u64, u64)>,
    txt: Option<String>,
    /// The `.txt` member is not UTF-8 (a bad sample when it is the caption).
    txt_not_utf8: bool,
    json: Option<serde_json::Map<String, serde_json::Value>>,
    truncated: bool,
}

/// Reads one shard's member headers and small members: its samples in tar order.
fn scan_shard(path: &Path) -> Result<Vec<Pending>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
    let file_len = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
    let mut archive = tar::Archive::new(file);
    let mut out: Vec<Pending> = vec![];
    let entries = archive.entries_with_seek().with_context(|| format!("reading shard {}", path.display()))?;
    for entry in entries {
        // A header cut short or garbled ends the shard: the samples before it are kept (a
        // sample whose later members were lost reports that when it is loaded).
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let after = out.last().map_or("its start".to_string(), |p| format!("key {}", p.key));
                eprintln!("warning: shard {} ends in a damaged tar header after {after} ({e}): the rest of it is not read", path.display());
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let (key, ext) = split_key(&name);
        if key.is_empty() || name.rsplit('/').next().is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        if out.last().is_none_or(|p| p.key != key) {
            out.push(Pending { key: key.to_string(), ..Default::default() });
        }
        let offset = entry.raw_file_position();
        let size = entry.size();
        let pending = out.last_mut().expect("pushed above");
        // checked: a GNU base-256 size can be near u64::MAX and wrap the sum past the test
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            pending.truncated = true;
            break;
        }
        let ext = ext.to_ascii_lowercase();
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            pending.image.get_or_insert((offset, size));
        } else if ext == "txt" || ext == "json" {
            let mut bytes = vec![];
            if entry.read_to_end(&mut bytes).is_err() {
                pending.truncated = true;
                break;
            }
            if ext == "txt" {
                match String::from_utf8(bytes) {
                    Ok(text) => pending.txt = Some(text.trim().to_string()),
                    Err(_) => pending.txt_not_utf8 = true,
                }
            } else {
                // A json that does not parse is ignored (as if absent): its caption or filter
                // fields are then missing, which the sample reports when it is loaded.
                pending.json = serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| match v {
                    serde_json::Value::Object(m) => Some(m),
                    _ => None,
                });
            }
        }
    }
    Ok(out)
}

impl WebDataset {
    /// Opens the shards (in the order given), applying `filters` to each sample's json.
    pub fn open(shards: Vec<PathBuf>, spec: &str, caption: &CaptionField, filters: &Filters) -> Result<WebDataset> {
        if shards.is_empty() {
            anyhow::bail!("data.shards {spec:?}: no .tar shards");
        }
        let scanned: Vec<Vec<Pending>> =
            shards.par_iter().map(|p| scan_shard(p)).collect::<Result<_>>()?;
        let mut entries = vec![];
        let mut filtered_out = 0;
        for (s, pendings) in scanned.into_iter().enumerate() {
            for p in pendings {
                let json = p.json.as_ref();
                let from_json = |k: &str| json.and_then(|j| j.get(k)).and_then(|v| v.as_str()).map(|c| c.trim().to_string());
                let text = match caption {
                    CaptionField::Default => p.txt.clone().or_else(|| from_json("caption").filter(|_| !p.txt_not_utf8)),
                    CaptionField::Txt => p.txt.clone(),
                    CaptionField::JsonKey(k) => from_json(k),
                };
                let caption_not_utf8 = p.txt_not_utf8 && matches!(caption, CaptionField::Default | CaptionField::Txt);
                let meta = JsonMeta(json);
                let size = meta.size();
                if !p.truncated && !filters.keep(&meta, size).with_context(|| format!("{} key {}", shards[s].display(), p.key))? {
                    filtered_out += 1;
                    continue;
                }
                entries.push(Entry { shard: s as u32, key: p.key, image: p.image, caption: text, size, truncated: p.truncated, caption_not_utf8 });
            }
        }
        if entries.is_empty() {
            anyhow::bail!("data.shards {spec:?}: the {} shard(s) hold no samples ({filtered_out} filtered out)", shards.len());
        }
        Ok(WebDataset { shards, spec: spec.to_string(), entries, filtered_out })
    }

    /// The shard file and key of sample `index`.
    pub fn locate(&self, index: usize) -> (&Path, &str) {
        let e = &self.entries[index];
        (&self.shards[e.shard as usize], &e.key)
    }
}

/// A sample's json as filter metadata.
struct JsonMeta<'a>(Option<&'a serde_json::Map<String, serde_json::Value>>);

impl Meta for JsonMeta<'_> {
    fn field(&self, name: &str) -> Option<serde_json::Value> {
        self.0.and_then(|j| j.get(name)).cloned().filter(|v| !v.is_null())
    }
}

impl JsonMeta<'_> {
    fn size(&self) -> Option<(u32, u32)> {
        let dim = |k: &str| self.field(k).and_then(|v| v.as_u64()).map(|v| u32::try_from(v).unwrap_or(u32::MAX));
        Some((dim("width")?, dim("height")?))
    }
}

impl ImageRows for WebDataset {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn decode(&self, index: usize) -> std::result::Result<(image::RgbImage, String), BadSample> {
        let e = &self.entries[index];
        let shard = &self.shards[e.shard as usize];
        let bad = |(kind, reason): (BadKind, String)| BadSample {
            index,
            file: shard.clone(),
            kind,
            reason: format!("key {}: {reason}", e.key),
        };
        if e.truncated {
            return Err(bad((BadKind::Corrupt, "the shard ends inside this sample (a truncated tar)".into())));
        }
        if e.caption_not_utf8 {
            return Err(bad((BadKind::Corrupt, "its .txt caption is not valid UTF-8".into())));
        }
        let caption = usable_caption(e.caption.as_deref(), "no caption (no .txt member and no caption in its .json)").map_err(bad)?;
        let Some((offset, size)) = e.image else {
            return Err(bad((BadKind::Missing, "no .jpg/.jpeg/.png/.webp member".into())));
        };
        let read = || -> std::io::Result<Vec<u8>> {
            let file = std::fs::File::open(shard)?;
            let mut bytes = vec![0u8; size as usize];
            file.read_exact_at(&mut bytes, offset)?;
            Ok(bytes)
        };
        let bytes = read().map_err(|err| bad((BadKind::Corrupt, format!("cannot read the image: {err}"))))?;
        Ok((decode_rgb(&bytes).map_err(bad)?, caption))
    }

    fn key(&self, index: usize) -> String {
        let (shard, key) = self.locate(index);
        let name = shard.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        format!("{name}/{key}")
    }

    fn fingerprint(&self) -> String {
        let keys: Vec<String> = (0..self.len()).map(|i| self.key(i)).collect();
        let parts = keys.iter().zip(&self.entries).flat_map(|(k, e)| [k.as_bytes(), e.caption.as_deref().unwrap_or("\u{1}").as_bytes()]);
        fingerprint_of(self.len(), parts)
    }

    fn describe(&self) -> String {
        format!("webdataset {} ({} shards)", self.spec, self.shards.len())
    }

    fn size_hint(&self, index: usize) -> Option<(u32, u32)> {
        self.entries[index].size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_key("000010005.jpg"), ("000010005", "jpg"));
        assert_eq!(split_key("a.b/000.seg.png"), ("a.b/000", "seg.png"));
        assert_eq!(split_key("plain"), ("plain", ""));
    }
}
