//! Image-caption datasets in the Hugging Face "imagefolder" layout that BK-SDM's and diffusers'
//! training scripts read: a folder with `metadata.jsonl` or `metadata.csv` whose rows name a
//! `file_name` (relative to the folder, and refused when it leads outside) and its `text`; other
//! columns are ignored. Without a metadata file, every JPEG/PNG/WebP under the
//! folder (recursively, in path order) is a sample whose caption is the `.txt` file of the same
//! stem beside it.
//!
//! Images are decoded by their content (not their extension), converted to 8-bit RGB (alpha
//! dropped, grey replicated, palettes expanded, as Pillow's `convert("RGB")`); EXIF orientation is
//! not applied, the pixels are used as stored.
//!
//! Opening a dataset reads only the metadata: a malformed line is an error naming `file:line`.
//! Images are read when a sample is loaded, so a missing, empty or corrupt image, or an empty
//! caption, surfaces as a [`BadSample`] that the loader skips (and counts) or fails on, according
//! to [`OnBadSample`].
use super::source::{decode_rgb, fingerprint_of, usable_caption, BadKind, BadSample, ImageRows};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Component, Path, PathBuf};

/// One row of the dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The image path as the metadata spells it (relative to the dataset folder).
    pub file_name: String,
    /// The image path on disk.
    pub path: PathBuf,
    /// The caption; None when a sidecar `.txt` is missing.
    pub caption: Option<String>,
    /// A sidecar `.txt` that is not UTF-8: a bad sample when loaded (as a webdataset `.txt`),
    /// never a caption of U+FFFD.
    pub caption_not_utf8: bool,
}

/// Where an imagefolder's captions came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetadataKind {
    Jsonl,
    Csv,
    Sidecar,
}

/// An opened imagefolder: the sample list, in metadata order.
#[derive(Debug)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub kind: MetadataKind,
    pub samples: Vec<Sample>,
}

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

impl ImageFolder {
    /// Reads the metadata of the imagefolder at `root`.
    pub fn open(root: &Path) -> Result<ImageFolder> {
        if !root.is_dir() {
            bail!("dataset folder {} does not exist or is not a folder", root.display());
        }
        let jsonl = root.join("metadata.jsonl");
        let csv = root.join("metadata.csv");
        let (kind, samples) = match (jsonl.is_file(), csv.is_file()) {
            (true, true) => bail!(
                "{} has both metadata.jsonl and metadata.csv: keep one (Hugging Face imagefolder refuses mixed metadata too)",
                root.display()
            ),
            (true, false) => (MetadataKind::Jsonl, read_jsonl(root, &jsonl)?),
            (false, true) => (MetadataKind::Csv, read_csv(root, &csv)?),
            (false, false) => (MetadataKind::Sidecar, read_sidecars(root)?),
        };
        if samples.is_empty() {
            bail!("dataset {} has no samples", root.display());
        }
        Ok(ImageFolder { root: root.to_path_buf(), kind, samples })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Reads and decodes the image of sample `index` as 8-bit RGB, checking its caption first.
    pub fn decode(&self, index: usize) -> Result<(image::RgbImage, String), BadSample> {
        let s = &self.samples[index];
        let bad = |(kind, reason): (BadKind, String)| BadSample { index, file: s.path.clone(), kind, reason };
        if s.caption_not_utf8 {
            return Err(bad((BadKind::Corrupt, format!("its caption {} is not valid UTF-8", s.path.with_extension("txt").display()))));
        }
        let caption = usable_caption(s.caption.as_deref(), "no caption (its .txt file is missing)").map_err(bad)?;
        let bytes = match std::fs::read(&s.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad((BadKind::Missing, "image file is missing".into())))
            }
            Err(e) => return Err(bad((BadKind::Corrupt, format!("cannot read the image: {e}")))),
        };
        if bytes.is_empty() {
            return Err(bad((BadKind::Empty, "image file is empty (0 bytes)".into())));
        }
        Ok((decode_rgb(&bytes).map_err(bad)?, caption))
    }
}

impl ImageRows for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn decode(&self, index: usize) -> Result<(image::RgbImage, String), BadSample> {
        ImageFolder::decode(self, index)
    }

    fn key(&self, index: usize) -> String {
        self.samples[index].file_name.clone()
    }

    /// From the image file's header alone.
    fn dimensions(&self, index: usize) -> Result<(u32, u32), BadSample> {
        let s = &self.samples[index];
        let bad = |kind, reason: String| BadSample { index, file: s.path.clone(), kind, reason };
        let reader = image::ImageReader::open(&s.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => bad(BadKind::Missing, "image file is missing".into()),
            _ => bad(BadKind::Corrupt, format!("cannot read the image: {e}")),
        })?;
        let reader = reader.with_guessed_format().map_err(|e| bad(BadKind::Corrupt, format!("cannot read the image: {e}")))?;
        match reader.into_dimensions() {
            Ok((0, _) | (_, 0)) => Err(bad(BadKind::Corrupt, "image has no pixels".into())),
            Ok(wh) => Ok(wh),
            Err(e) => Err(bad(BadKind::Corrupt, format!("not a readable JPEG/PNG/WebP image: {e}"))),
        }
    }

    /// A hash of every (file name, caption) row.
    fn fingerprint(&self) -> String {
        let parts = self.samples.iter().flat_map(|s| [s.file_name.as_bytes(), s.caption.as_deref().unwrap_or("\u{1}").as_bytes()]);
        fingerprint_of(self.samples.len(), parts)
    }

    fn describe(&self) -> String {
        format!("dataset {}", self.root.display())
    }
}

/// The sample of one metadata entry (`at` is its `file:line`). An entry that leaves the dataset
/// folder is refused: an absolute path, `..` above the folder, or a symlink resolving outside it.
/// The imagefolder convention keeps files inside, and a shared dataset must not make sdkd read
/// arbitrary files. `real_root` is the folder with its symlinks resolved.
fn sample(root: &Path, real_root: &Path, file_name: String, caption: Option<String>, at: &str) -> Result<Sample> {
    let outside = |why: String| anyhow!("{at}: file_name {file_name:?} {why} the dataset folder {}", root.display());
    let mut depth = 0usize;
    for part in Path::new(&file_name).components() {
        match part {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir if depth > 0 => depth -= 1,
            _ => return Err(outside("leaves".into())),
        }
    }
    let path = root.join(&file_name);
    // A missing file is a bad sample when it is loaded; an existing one must resolve inside.
    if let Ok(real) = path.canonicalize() {
        if !real.starts_with(real_root) {
            return Err(outside(format!("resolves to {}, outside", real.display())));
        }
    }
    Ok(Sample { path, file_name, caption, caption_not_utf8: false })
}

fn real_root(root: &Path) -> Result<PathBuf> {
    root.canonicalize().with_context(|| format!("resolving dataset folder {}", root.display()))
}

/// `metadata.jsonl`: one JSON object per line with string `file_name` and `text` (null text is
/// an empty caption, a bad sample at load time); blank lines are allowed.
fn read_jsonl(root: &Path, path: &Path) -> Result<Vec<Sample>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let real_root = real_root(root)?;
    let mut out = vec![];
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = std::str::from_utf8(line).map_err(|_| anyhow!("{}: not valid UTF-8", at()))?;
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow!("{}: not valid JSON: {e}", at()))?;
        let obj = v.as_object().ok_or_else(|| anyhow!("{}: expected a JSON object with file_name and text", at()))?;
        let file_name = match obj.get("file_name") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(other) => bail!("{}: file_name must be a non-empty string, found {other}", at()),
            None => bail!("{}: no \"file_name\" field", at()),
        };
        let text = match obj.get("text") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Null) => Some(String::new()),
            Some(other) => bail!("{}: text must be a string, found {other}", at()),
            None => bail!("{}: no \"text\" field", at()),
        };
        out.push(sample(root, &real_root, file_name, text, &at())?);
    }
    Ok(out)
}

/// One CSV record and the line it starts on.
pub(crate) struct Record {
    pub(crate) line: usize,
    pub(crate) fields: Vec<String>,
}

/// RFC 4180 CSV: comma-separated, fields optionally double-quoted, `""` for a quote inside
/// quotes, quoted fields may hold commas and newlines; LF or CRLF line ends; blank lines skipped.
pub(crate) fn parse_csv(text: &str, path: &Path) -> Result<Vec<Record>> {
    let text = text.trim_start_matches('\u{feff}');
    let mut records = vec![];
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = vec![];
        let mut field = String::new();
        let mut quoted = false; // the current field began with a quote
        let mut in_quotes = false;
        let mut after_quote = false; // a quoted field just closed
        loop {
            let Some(c) = chars.next() else {
                if in_quotes {
                    bail!("{}:{start}: unterminated quoted field", path.display());
                }
                break;
            };
            if in_quotes {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => {
                        in_quotes = false;
                        after_quote = true;
                    }
                    '\n' => {
                        line += 1;
                        field.push(c);
                    }
                    _ => field.push(c),
                }
                continue;
            }
            match c {
                ',' => {
                    fields.push(std::mem::take(&mut field));
                    quoted = false;
                    after_quote = false;
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    break;
                }
                '"' if field.is_empty() && !quoted => {
                    quoted = true;
                    in_quotes = true;
                }
                _ if after_quote => {
                    bail!("{}:{start}: unexpected {c:?} after a closing quote (quote the whole field)", path.display())
                }
                '"' => bail!("{}:{start}: a quote inside an unquoted field (quote the field and double the quote)", path.display()),
                _ => field.push(c),
            }
        }
        fields.push(field);
        let blank = fields.len() == 1 && fields[0].is_empty() && !quoted;
        if !blank {
            records.push(Record { line: start, fields });
        }
    }
    Ok(records)
}

/// `metadata.csv`: a header naming `file_name` and `text` columns (any order, others ignored),
/// then one record per sample with as many fields as the header.
fn read_csv(root: &Path, path: &Path) -> Result<Vec<Sample>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow!("{}:{line}: not valid UTF-8", path.display())
    })?;
    let records = parse_csv(&text, path)?;
    let Some((header, rows)) = records.split_first() else {
        bail!("{} is empty: expected a header with file_name and text", path.display());
    };
    let col = |name: &str| {
        header.fields.iter().position(|h| h.trim() == name).ok_or_else(|| {
            anyhow!("{}:{}: the header has no {name:?} column (found {:?})", path.display(), header.line, header.fields)
        })
    };
    let (fc, tc) = (col("file_name")?, col("text")?);
    let real_root = real_root(root)?;
    let mut out = vec![];
    for r in rows {
        if r.fields.len() != header.fields.len() {
            bail!(
                "{}:{}: expected {} fields as in the header, found {}",
                path.display(),
                r.line,
                header.fields.len(),
                r.fields.len()
            );
        }
        let file_name = r.fields[fc].clone();
        if file_name.is_empty() {
            bail!("{}:{}: empty file_name", path.display(), r.line);
        }
        let at = format!("{}:{}", path.display(), r.line);
        out.push(sample(root, &real_root, file_name, Some(r.fields[tc].clone()), &at)?);
    }
    Ok(out)
}

/// Image files under `root` in path order, each with the `.txt` of the same stem as caption.
fn read_sidecars(root: &Path) -> Result<Vec<Sample>> {
    let mut images = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let path = entry.path();
            let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            // file_type does not follow symlinks: a linked folder is not entered (no loops).
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                images.push(path);
            }
        }
    }
    images.sort();
    if images.is_empty() {
        bail!(
            "{} has no metadata.jsonl or metadata.csv and no .jpg/.jpeg/.png/.webp images with .txt captions",
            root.display()
        );
    }
    let mut with_caption = 0;
    let samples: Vec<Sample> = images
        .into_iter()
        .map(|path| {
            let txt = path.with_extension("txt");
            let bytes = std::fs::read(&txt).ok();
            with_caption += bytes.is_some() as usize;
            let caption = bytes.as_ref().and_then(|b| std::str::from_utf8(b).ok()).map(|t| t.trim().to_string());
            let caption_not_utf8 = bytes.is_some() && caption.is_none();
            let file_name = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
            Sample { file_name, path, caption, caption_not_utf8 }
        })
        .collect();
    if with_caption == 0 {
        bail!(
            "{} has no metadata.jsonl or metadata.csv, and none of its {} images has a .txt caption beside it",
            root.display(),
            samples.len()
        );
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> Result<Vec<Vec<String>>> {
        Ok(parse_csv(text, Path::new("m.csv"))?.into_iter().map(|r| r.fields).collect())
    }

    #[test]
    fn csv_quotes_commas_and_newlines() {
        let rows = csv("file_name,text\r\na.png,\"red, round\"\n\nb.png,\"say \"\"hi\"\"\nthere\"\nc.png,\n").unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1], vec!["a.png", "red, round"]);
        assert_eq!(rows[2], vec!["b.png", "say \"hi\"\nthere"]);
        assert_eq!(rows[3], vec!["c.png", ""]);
    }

    #[test]
    fn csv_records_know_their_lines() {
        let r = parse_csv("h,t\n\"x\ny\",1\nz,2\n", Path::new("m.csv")).unwrap();
        assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 2, 4]);
    }

    #[test]
    fn csv_errors_name_the_line() {
        let e = csv("h,t\na,b\nc,\"open\n").unwrap_err().to_string();
        assert!(e.contains("m.csv:3") && e.contains("unterminated"), "{e}");
        let e = csv("h,t\na,\"b\"x\n").unwrap_err().to_string();
        assert!(e.contains("m.csv:2"), "{e}");
        let e = csv("h,t\na,b\"c\n").unwrap_err().to_string();
        assert!(e.contains("m.csv:2"), "{e}");
    }
}
