//! Which on-disk format a dataset is in and how to open it: an imagefolder (`data.path`), or
//! webdataset / parquet shards (`data.shards`: a folder, a brace pattern such as
//! `laion/{00000..01023}.tar`, or a file listing one shard per line), detected from the names
//! unless `data.format` says; and the LAION-style row filters (`data.min_size`,
//! `data.max_aspect`, `data.filter`) applied when a shard set is opened.
use super::dataset::ImageFolder;
use super::hf_parquet::ParquetSet;
use super::source::ImageRows;
use super::webdataset::{CaptionField, WebDataset};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `data.format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Imagefolder,
    Webdataset,
    Parquet,
}

impl DataFormat {
    fn extension(self) -> &'static str {
        match self {
            DataFormat::Imagefolder => "",
            DataFormat::Webdataset => "tar",
            DataFormat::Parquet => "parquet",
        }
    }
}

/// How to read a dataset: everything of `data:` but its location.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataOptions {
    pub format: Option<DataFormat>,
    /// webdataset: `txt` or a json key; parquet: the text column (default `text`).
    pub caption: Option<String>,
    /// parquet: the image column, a struct {bytes, path} (default `image`).
    pub image_column: Option<String>,
    pub filters: Filters,
}

/// Opens the dataset at `location`: an imagefolder, a shard folder, a brace pattern or a shard
/// list. `key` names the setting in messages (`data.path`, `data.shards`, `--data`).
pub fn open_image_rows(location: &str, key: &str, opts: &DataOptions) -> Result<Arc<dyn ImageRows>> {
    let format = match opts.format {
        Some(f) => f,
        None => detect(location).with_context(|| format!("{key} {location:?}"))?,
    };
    if format == DataFormat::Imagefolder {
        if !opts.filters.is_empty() {
            bail!("{key} {location:?} is an imagefolder: data.min_size, data.max_aspect and data.filter apply to webdataset json and parquet columns only");
        }
        return Ok(Arc::new(ImageFolder::open(Path::new(location))?));
    }
    let shards = shard_list(location, format).with_context(|| format!("{key} {location:?}"))?;
    let rows: Arc<dyn ImageRows> = match format {
        DataFormat::Webdataset => Arc::new(WebDataset::open(shards, location, &CaptionField::parse(opts.caption.as_deref()), &opts.filters)?),
        DataFormat::Parquet => Arc::new(ParquetSet::open(
            shards,
            location,
            opts.image_column.as_deref().unwrap_or("image"),
            opts.caption.as_deref().unwrap_or("text"),
            &opts.filters,
        )?),
        DataFormat::Imagefolder => unreachable!("returned above"),
    };
    Ok(rows)
}

/// A warning when every image checked is smaller than `resolution` on its short side
/// (img2dataset's default is 256 px, padded squares): such a set trains on upscaled images.
/// 64 rows spread over the set are checked, by their metadata's size when it has one.
pub fn small_images_warning(rows: &dyn ImageRows, resolution: u32) -> Option<String> {
    let n = rows.len();
    let checked = n.min(64);
    let mut short_sides = vec![];
    for j in 0..checked {
        let i = j * n / checked;
        let size = rows.size_hint(i).or_else(|| rows.decode(i).ok().map(|(img, _)| img.dimensions()));
        if let Some((w, h)) = size {
            short_sides.push(w.min(h));
        }
    }
    let largest = *short_sides.iter().max()?;
    (largest < resolution).then(|| {
        format!(
            "warning: all {} images checked of {} are smaller than data.resolution {resolution} (the largest short side is {largest} px): they will be upscaled; img2dataset's default --image_size is 256",
            short_sides.len(),
            rows.describe()
        )
    })
}

/// The format of `location` when `data.format` is not given.
pub fn detect(location: &str) -> Result<DataFormat> {
    let path = Path::new(location);
    let by_extension = |p: &str| {
        if p.ends_with(".tar") {
            Some(DataFormat::Webdataset)
        } else if p.ends_with(".parquet") {
            Some(DataFormat::Parquet)
        } else {
            None
        }
    };
    if location.contains('{') {
        return by_extension(location).ok_or_else(|| anyhow!("a brace pattern must end in .tar or .parquet (or set data.format)"));
    }
    if path.is_dir() {
        if path.join("metadata.jsonl").is_file() || path.join("metadata.csv").is_file() {
            return Ok(DataFormat::Imagefolder);
        }
        // img2dataset writes NNNNN.parquet metadata beside its tars: tars win.
        for format in [DataFormat::Webdataset, DataFormat::Parquet] {
            if !files_with_extension(path, format.extension())?.is_empty() {
                return Ok(format);
            }
        }
        if !hub_train_files(path)?.is_empty() {
            return Ok(DataFormat::Parquet);
        }
        return Ok(DataFormat::Imagefolder);
    }
    if !path.is_file() {
        bail!("does not exist");
    }
    if let Some(f) = by_extension(location) {
        return Ok(f);
    }
    let listed = read_list(path)?;
    let first = listed.first().ok_or_else(|| anyhow!("the shard list is empty"))?;
    by_extension(&first.to_string_lossy()).ok_or_else(|| anyhow!("the shard list's first entry {} is not a .tar or .parquet file (or set data.format)", first.display()))
}

fn files_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !hidden && p.is_file() && p.extension().is_some_and(|e| e == ext) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The train split of a Hugging Face dataset folder: `data/train-*.parquet`, or every
/// `data/*.parquet` when none is named train.
fn hub_train_files(root: &Path) -> Result<Vec<PathBuf>> {
    let data = root.join("data");
    if !data.is_dir() {
        return Ok(vec![]);
    }
    let all = files_with_extension(&data, "parquet")?;
    let train: Vec<PathBuf> = all.iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("train"))).cloned().collect();
    Ok(if train.is_empty() { all } else { train })
}

/// A shard list file: one path per line (relative to the file's folder), blank lines and
/// `#` comments skipped.
fn read_list(path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading shard list {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(|l| base.join(l)).collect())
}

/// The shard files of `location`, in order; every one must exist.
pub fn shard_list(location: &str, format: DataFormat) -> Result<Vec<PathBuf>> {
    let path = Path::new(location);
    let shards = if location.contains('{') {
        expand_braces(location)?.into_iter().map(PathBuf::from).collect()
    } else if path.is_dir() {
        let mut found = files_with_extension(path, format.extension())?;
        if found.is_empty() && format == DataFormat::Parquet {
            found = hub_train_files(path)?;
        }
        if found.is_empty() {
            bail!("the folder holds no .{} files", format.extension());
        }
        found
    } else if path.extension().is_some_and(|e| e == format.extension()) {
        vec![path.to_path_buf()]
    } else if path.is_file() {
        read_list(path)?
    } else {
        bail!("does not exist");
    };
    if shards.is_empty() {
        bail!("names no shards");
    }
    for s in &shards {
        if !s.is_file() {
            bail!("shard {} does not exist", s.display());
        }
    }
    Ok(shards)
}

/// Bash/webdataset brace expansion: `{00000..00123}` (zero-padded to the first bound's width)
/// and `{a,b,c}`, several per pattern.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            bail!("unbalanced '}}' in {pattern:?}");
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..].find('}').map(|i| open + i).ok_or_else(|| anyhow!("unbalanced '{{' in {pattern:?}"))?;
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let choices: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let bad = || anyhow!("{{{body}}} in {pattern:?}: expected {{FIRST..LAST}} with integers FIRST <= LAST");
        let (lo, hi): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if lo > hi || hi - lo > 10_000_000 {
            return Err(bad());
        }
        (lo..=hi).map(|i| format!("{i:0width$}", width = a.len())).collect()
    } else if body.contains(',') {
        body.split(',').map(str::to_string).collect()
    } else {
        bail!("{{{body}}} in {pattern:?}: expected {{FIRST..LAST}} or {{a,b,...}}");
    };
    let rest = expand_braces(tail)?;
    Ok(choices.iter().flat_map(|c| rest.iter().map(move |r| format!("{head}{c}{r}"))).collect())
}

/// A row's metadata as the filters see it: a webdataset json or a parquet row's scalar columns.
pub trait Meta {
    fn field(&self, name: &str) -> Option<serde_json::Value>;
}

/// One `data.filter` condition: `>= 6.5`, `< 2`, `== en`, `!= 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    op: Op,
    value: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
    Ne,
}

impl Condition {
    pub fn parse(text: &str) -> std::result::Result<Condition, String> {
        let t = text.trim();
        let ops = [(">=", Op::Ge), ("<=", Op::Le), ("==", Op::Eq), ("!=", Op::Ne), (">", Op::Gt), ("<", Op::Lt)];
        let (op, rest) = ops
            .iter()
            .find_map(|(s, op)| t.strip_prefix(s).map(|r| (*op, r.trim())))
            .ok_or_else(|| format!("{text:?}: expected an operator (>=, >, <=, <, ==, !=) and a value, such as \">= 6.5\""))?;
        if rest.is_empty() {
            return Err(format!("{text:?}: no value after the operator"));
        }
        let number = rest.parse::<f64>();
        if matches!(op, Op::Ge | Op::Gt | Op::Le | Op::Lt) && !number.as_ref().is_ok_and(|x| x.is_finite()) {
            return Err(format!("{text:?}: {rest:?} is not a finite number"));
        }
        if number.is_ok_and(f64::is_nan) {
            return Err(format!("{text:?}: no value equals NaN"));
        }
        Ok(Condition { op, value: rest.to_string() })
    }

    /// Whether `v` passes; a missing value never does.
    fn holds(&self, v: Option<&serde_json::Value>) -> bool {
        let Some(v) = v else { return false };
        let number = v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
        let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
        let want = self.value.parse::<f64>().ok();
        match (self.op, number, want) {
            (Op::Ge, Some(x), Some(w)) => x >= w,
            (Op::Gt, Some(x), Some(w)) => x > w,
            (Op::Le, Some(x), Some(w)) => x <= w,
            (Op::Lt, Some(x), Some(w)) => x < w,
            (Op::Eq, Some(x), Some(w)) => x == w,
            (Op::Ne, Some(x), Some(w)) => x != w,
            (Op::Eq, _, _) => text == self.value,
            (Op::Ne, _, _) => text != self.value,
            _ => false,
        }
    }
}

/// `data.min_size`, `data.max_aspect`, `data.filter`: which rows of a shard set are used.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filters {
    /// The image's short side (its metadata's `width`/`height`) at least this.
    pub min_size: Option<u32>,
    /// long side / short side at most this.
    pub max_aspect: Option<f64>,
    pub columns: BTreeMap<String, Condition>,
}

impl Filters {
    /// Checks the YAML's values; errors name the key.
    pub fn from_config(min_size: Option<u32>, max_aspect: Option<f64>, filter: &BTreeMap<String, String>) -> std::result::Result<Filters, (String, String)> {
        if let Some(a) = max_aspect {
            if !(a.is_finite() && a >= 1.0) {
                return Err(("data.max_aspect".into(), format!("data.max_aspect = {a}: must be a number >= 1 (long side over short side)")));
            }
        }
        if min_size == Some(0) {
            return Err(("data.min_size".into(), "data.min_size = 0: must be at least 1 (or leave it out)".into()));
        }
        let mut columns = BTreeMap::new();
        for (k, v) in filter {
            let key = format!("data.filter.{k}");
            columns.insert(k.clone(), Condition::parse(v).map_err(|e| (key.clone(), format!("{key}: {e}")))?);
        }
        Ok(Filters { min_size, max_aspect, columns })
    }

    pub fn is_empty(&self) -> bool {
        self.min_size.is_none() && self.max_aspect.is_none() && self.columns.is_empty()
    }

    /// Whether a row passes; `size` is its (width, height) from the metadata. A size filter on a
    /// row whose metadata has no size is an error (the filters must not decode every image).
    pub fn keep(&self, meta: &dyn Meta, size: Option<(u32, u32)>) -> Result<bool> {
        if self.min_size.is_some() || self.max_aspect.is_some() {
            let (w, h) = size.ok_or_else(|| anyhow!("data.min_size/data.max_aspect need the image's width and height in the metadata, and this row has none"))?;
            let (short, long) = (w.min(h), w.max(h));
            if self.min_size.is_some_and(|m| short < m) || short == 0 {
                return Ok(false);
            }
            if self.max_aspect.is_some_and(|a| long as f64 / short as f64 > a) {
                return Ok(false);
            }
        }
        Ok(self.columns.iter().all(|(k, c)| c.holds(meta.field(k).as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_ranges_and_lists() {
        assert_eq!(expand_braces("s/{00008..00010}.tar").unwrap(), ["s/00008.tar", "s/00009.tar", "s/00010.tar"]);
        assert_eq!(expand_braces("{a,b}-{1..2}").unwrap(), ["a-1", "a-2", "b-1", "b-2"]);
        assert!(expand_braces("s/{3..1}.tar").is_err());
        assert!(expand_braces("s/{1..x}.tar").is_err());
        assert!(expand_braces("s/{1..2.tar").is_err());
    }

    struct M(serde_json::Value);
    impl Meta for M {
        fn field(&self, name: &str) -> Option<serde_json::Value> {
            self.0.get(name).cloned()
        }
    }

    #[test]
    fn filters_keep_what_the_conditions_say() {
        let f = Filters::from_config(Some(256), Some(2.0), &[("aesthetic".to_string(), ">= 6.5".to_string())].into()).unwrap();
        let m = M(serde_json::json!({"aesthetic": 6.5}));
        assert!(f.keep(&m, Some((300, 256))).unwrap());
        assert!(!f.keep(&m, Some((300, 255))).unwrap());
        assert!(!f.keep(&m, Some((600, 299))).unwrap());
        assert!(f.keep(&m, Some((600, 300))).unwrap());
        assert!(!f.keep(&m, Some((1000, 300))).unwrap());
        assert!(!f.keep(&M(serde_json::json!({"aesthetic": 6.4})), Some((300, 300))).unwrap());
        assert!(!f.keep(&M(serde_json::json!({})), Some((300, 300))).unwrap());
        assert!(f.keep(&m, None).is_err());
        let e = Filters::from_config(None, None, &[("x".to_string(), "about 3".to_string())].into()).unwrap_err();
        assert_eq!(e.0, "data.filter.x");
        assert!(Filters::from_config(None, Some(0.5), &BTreeMap::new()).is_err());
        assert!(Condition::parse("== en").unwrap().holds(Some(&serde_json::json!("en"))));
        assert!(Condition::parse(">= x").is_err());
    }
}
