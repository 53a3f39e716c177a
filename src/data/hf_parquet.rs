//! Hugging Face parquet datasets (`data/train-00000-of-00042.parquet` ...): an image column
//! stored as the `datasets` Image feature, a struct `{bytes, path}`, and a text column, read
//! with arrow-rs's `parquet` crate (its record reader; no arrow arrays needed).
//!
//! Opening the set reads every file's footer and its small columns (the caption and the columns
//! the filters name), so captions, row counts and the row-group of each row are in memory.
//! `load(index, epoch)` reads the image column of that row's row group (the unit parquet can
//! seek to) and keeps the last few row groups decoded, so sequential passes (preprocess) read
//! each group once and shuffled ones stay pure functions of (index, epoch). Random access costs
//! one row group read per sample: `datasets` writes image datasets with 100 rows per group;
//! files with much larger groups are slow to shuffle and are warned about.
//!
//! The loader's threads read row groups of one file at once. parquet's `ChunkReader` for `File`
//! clones the descriptor and seeks, and clones share one offset, so concurrent reads interleave
//! and return the wrong bytes; the readers here read by position instead (`PositionedFile`).
//!
//! A row whose image is null, or whose struct holds only a `path` (an image that was never
//! embedded), is a bad sample named by file and row; paths are never followed.
use super::filters::{Filters, Meta};
use super::source::{decode_rgb, fingerprint_of, usable_caption, BadKind, BadSample, ImageRows};
use anyhow::{anyhow, bail, Context, Result};
use parquet::basic::Compression;
use bytes::Bytes;
use parquet::file::reader::{ChunkReader, FileReader, Length, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Row groups kept decoded (their image bytes).
const KEPT_GROUPS: usize = 8;
/// Rows per group above which shuffled reading is slow enough to warn.
const LARGE_GROUP: i64 = 2048;

#[derive(Clone, Debug)]
struct Entry {
    file: u32,
    group: u32,
    /// Row within its group.
    row: u32,
    /// Row within its file (for messages and keys).
    file_row: u64,
    caption: Option<String>,
    size: Option<(u32, u32)>,
}

/// A parquet file read with positional reads (`pread`), which share no offset between threads.
struct PositionedFile {
    file: Arc<std::fs::File>,
    len: u64,
}

/// A reader of a `PositionedFile` from one position on, with its own offset.
struct PositionedRead {
    file: Arc<std::fs::File>,
    at: u64,
}

impl Read for PositionedRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl Length for PositionedFile {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for PositionedFile {
    type T = std::io::BufReader<PositionedRead>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(std::io::BufReader::new(PositionedRead { file: self.file.clone(), at: start }))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let mut buf = vec![0; length];
        self.file.read_exact_at(&mut buf, start)?;
        Ok(buf.into())
    }
}

type GroupImages = Arc<Vec<Option<Vec<u8>>>>;

/// An opened set of parquet files.
pub struct ParquetSet {
    pub files: Vec<PathBuf>,
    pub spec: String,
    pub image_column: String,
    readers: Vec<SerializedFileReader<PositionedFile>>,
    entries: Vec<Entry>,
    pub filtered_out: usize,
    recent: Mutex<VecDeque<((u32, u32), GroupImages)>>,
}

impl std::fmt::Debug for ParquetSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParquetSet({}, {} rows)", self.spec, self.entries.len())
    }
}

/// A scalar parquet field as JSON (for the filters and the caption).
fn scalar(f: &Field) -> Option<serde_json::Value> {
    use serde_json::Value as V;
    Some(match f {
        Field::Bool(b) => V::Bool(*b),
        Field::Byte(v) => (*v).into(),
        Field::Short(v) => (*v).into(),
        Field::Int(v) => (*v).into(),
        Field::Long(v) => (*v).into(),
        Field::UByte(v) => (*v).into(),
        Field::UShort(v) => (*v).into(),
        Field::UInt(v) => (*v).into(),
        Field::ULong(v) => (*v).into(),
        Field::Float(v) => serde_json::Number::from_f64(*v as f64).map(V::Number)?,
        Field::Double(v) => serde_json::Number::from_f64(*v).map(V::Number)?,
        Field::Str(s) => V::String(s.clone()),
        _ => return None,
    })
}

struct RowMeta(Vec<(String, serde_json::Value)>);

impl Meta for RowMeta {
    fn field(&self, name: &str) -> Option<serde_json::Value> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

/// The root schema restricted to `names` (those present).
fn projection(root: &Type, names: &[&str]) -> Result<Type> {
    let fields = root.get_fields().iter().filter(|f| names.contains(&f.name())).cloned().collect();
    Ok(Type::group_type_builder(root.name()).with_fields(fields).build()?)
}

impl ParquetSet {
    pub fn open(files: Vec<PathBuf>, spec: &str, image_column: &str, text_column: &str, filters: &Filters) -> Result<ParquetSet> {
        let mut readers = vec![];
        let mut entries = vec![];
        let mut filtered_out = 0;
        for (f, path) in files.iter().enumerate() {
            let at = || path.display().to_string();
            let file = std::fs::File::open(path).with_context(|| format!("opening {}", at()))?;
            let len = file.metadata().with_context(|| format!("reading {}", at()))?.len();
            let reader = SerializedFileReader::new(PositionedFile { file: Arc::new(file), len }).map_err(|e| anyhow!("{} is not a readable parquet file: {e}", at()))?;
            let meta = reader.metadata();
            let root = meta.file_metadata().schema();
            let has = |n: &str| root.get_fields().iter().any(|c| c.name() == n);
            let columns: Vec<&str> = root.get_fields().iter().map(|c| c.name()).collect();
            if !has(image_column) {
                bail!("{}: no image column {image_column:?} (data.image_column; columns: {columns:?})", at());
            }
            if !has(text_column) {
                bail!("{}: no caption column {text_column:?} (data.caption; columns: {columns:?})", at());
            }
            let text = root.get_fields().iter().find(|c| c.name() == text_column).expect("checked");
            if !text.is_primitive() || text.get_physical_type() != parquet::basic::Type::BYTE_ARRAY {
                let kind = if text.is_primitive() { format!("{}", text.get_physical_type()) } else { "a group".to_string() };
                bail!("{}: the caption column {text_column:?} holds {kind}, not text (data.caption names the caption column; columns: {columns:?})", at());
            }
            let image = root.get_fields().iter().find(|c| c.name() == image_column).expect("checked");
            if !image.is_group() || !image.get_fields().iter().any(|c| c.name() == "bytes") {
                bail!("{}: column {image_column:?} is not a struct with a \"bytes\" field (the datasets Image feature)", at());
            }
            for g in 0..meta.num_row_groups() {
                for c in meta.row_group(g).columns() {
                    if !matches!(c.compression(), Compression::UNCOMPRESSED | Compression::SNAPPY) {
                        bail!(
                            "{}: column {} is compressed with {}; sdkd reads uncompressed and snappy parquet (the pyarrow and datasets default): rewrite it with pyarrow.parquet.write_table(..., compression=\"snappy\")",
                            at(),
                            c.column_path(),
                            c.compression()
                        );
                    }
                }
            }
            let mut wanted: Vec<&str> = vec![text_column];
            wanted.extend(filters.columns.keys().map(String::as_str));
            let sized = filters.min_size.is_some() || filters.max_aspect.is_some();
            if sized || has("width") {
                wanted.extend(["width", "height"]);
            }
            for k in filters.columns.keys() {
                if !has(k) {
                    bail!("{}: data.filter names column {k:?}, which is not there (columns: {columns:?})", at());
                }
            }
            let proj = projection(root, &wanted)?;
            let mut file_row = 0u64;
            let mut large = false;
            for g in 0..meta.num_row_groups() {
                large |= meta.row_group(g).num_rows() > LARGE_GROUP;
                let group = reader.get_row_group(g).map_err(|e| anyhow!("{} row group {g}: {e}", at()))?;
                let rows = group.get_row_iter(Some(proj.clone())).map_err(|e| anyhow!("{} row group {g}: {e}", at()))?;
                for (r, row) in rows.enumerate() {
                    let row = row.map_err(|e| anyhow!("{} row {file_row}: {e}", at()))?;
                    let values: Vec<(String, serde_json::Value)> =
                        row.get_column_iter().filter_map(|(k, v)| scalar(v).map(|v| (k.clone(), v))).collect();
                    let meta_row = RowMeta(values);
                    let caption = meta_row.field(text_column).and_then(|v| v.as_str().map(str::to_string));
                    let dim = |k: &str| meta_row.field(k).and_then(|v| v.as_u64()).map(|v| u32::try_from(v).unwrap_or(u32::MAX));
                    let size = dim("width").zip(dim("height"));
                    if !filters.keep(&meta_row, size).with_context(|| format!("{} row {file_row}", at()))? {
                        filtered_out += 1;
                    } else {
                        entries.push(Entry { file: f as u32, group: g as u32, row: r as u32, file_row, caption, size });
                    }
                    file_row += 1;
                }
            }
            if large {
                eprintln!(
                    "warning: {} has row groups of more than {LARGE_GROUP} rows: each shuffled sample reads its whole row group (datasets writes image sets with 100 rows per group)",
                    at()
                );
            }
            readers.push(reader);
        }
        if entries.is_empty() {
            bail!("data.shards {spec:?}: the {} parquet file(s) hold no rows ({filtered_out} filtered out)", files.len());
        }
        Ok(ParquetSet {
            files,
            spec: spec.to_string(),
            image_column: image_column.to_string(),
            readers,
            entries,
            filtered_out,
            recent: Mutex::new(VecDeque::new()),
        })
    }

    /// The image bytes of every row of one row group (None for a null image or null bytes).
    fn group_images(&self, file: u32, group: u32) -> Result<GroupImages> {
        let id = (file, group);
        if let Some((_, imgs)) = self.recent.lock().expect("not poisoned").iter().find(|(k, _)| *k == id) {
            return Ok(imgs.clone());
        }
        let reader = &self.readers[file as usize];
        let proj = projection(reader.metadata().file_metadata().schema(), &[&self.image_column])?;
        let rg = reader.get_row_group(group as usize)?;
        let mut out = vec![];
        for row in rg.get_row_iter(Some(proj))? {
            let row: Row = row?;
            let bytes = row.into_columns().into_iter().next().and_then(|(_, v)| match v {
                Field::Group(g) => g.into_columns().into_iter().find(|(k, _)| k == "bytes").and_then(|(_, b)| match b {
                    Field::Bytes(b) => Some(b.data().to_vec()),
                    _ => None,
                }),
                _ => None,
            });
            out.push(bytes);
        }
        let imgs = Arc::new(out);
        let mut recent = self.recent.lock().expect("not poisoned");
        recent.push_back((id, imgs.clone()));
        if recent.len() > KEPT_GROUPS {
            recent.pop_front();
        }
        Ok(imgs)
    }
}

impl ImageRows for ParquetSet {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn decode(&self, index: usize) -> std::result::Result<(image::RgbImage, String), BadSample> {
        let e = &self.entries[index];
        let file = &self.files[e.file as usize];
        let bad = |(kind, reason): (BadKind, String)| BadSample { index, file: file.clone(), kind, reason: format!("row {}: {reason}", e.file_row) };
        let caption = usable_caption(e.caption.as_deref(), "no caption (null text)").map_err(bad)?;
        let group = self.group_images(e.file, e.group).map_err(|err| bad((BadKind::Corrupt, format!("cannot read row group {}: {err}", e.group))))?;
        let Some(bytes) = group.get(e.row as usize).and_then(|b| b.as_deref()) else {
            return Err(bad((BadKind::Missing, format!("the {:?} column holds no image bytes (null)", self.image_column))));
        };
        Ok((decode_rgb(bytes).map_err(bad)?, caption))
    }

    fn key(&self, index: usize) -> String {
        let e = &self.entries[index];
        let name = self.files[e.file as usize].file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        format!("{name}#{}", e.file_row)
    }

    fn fingerprint(&self) -> String {
        let keys: Vec<String> = (0..self.len()).map(|i| self.key(i)).collect();
        let parts = keys.iter().zip(&self.entries).flat_map(|(k, e)| [k.as_bytes(), e.caption.as_deref().unwrap_or("\u{1}").as_bytes()]);
        fingerprint_of(self.len(), parts)
    }

    fn describe(&self) -> String {
        format!("parquet {} ({} files)", self.spec, self.files.len())
    }

    fn size_hint(&self, index: usize) -> Option<(u32, u32)> {
        self.entries[index].size
    }
}
