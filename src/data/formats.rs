//! Which on-disk format a dataset is in and how to open it: an imagefolder (`data.path`), or
//! webdataset / parquet shards (`data.shards`: a folder, a brace pattern such as
//! `laion/{00000..01023}.tar`, or a file listing one shard per line), detected from the names
//! unless `data.format` says. The row filters the shard readers apply are `data::filters`.
use super::dataset::ImageFolder;
use super::filters::Filters;
use super::hf_parquet::ParquetSet;
use super::source::ImageRows;
use super::webdataset::{CaptionField, WebDataset};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
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
}
