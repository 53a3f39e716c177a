//! The latent cache that `sdkd preprocess` writes and `train` reads through `data.cache`: every
//! usable sample of a dataset (imagefolder, webdataset or parquet) encoded once, by a [`SampleEncoder`] (the teacher's VAE and
//! text encoder), into safetensors shards plus an `index.json`.
//!
//! Layout of a cache folder:
//! ```text
//! index.json                 format, version, dataset fingerprint, transform, seed, shard_size,
//!                            encoder description, complete, and the finished shards
//! shard-00000.safetensors    latent_mean (n, c, h, w), latent_std (n, c, h, w),
//!                            text_embeddings (n, tokens, dim), sample_ids (n,) i64,
//!                            time_ids (n, 6) i64 (SDXL's micro-conditioning of each row),
//!                            pooled_embeddings (n, dim) when the encoder has one (SDXL);
//!                            header metadata "sdkd_rows": {"captions": [...], "file_names": [...]}
//! ```
//! Version 1 caches (before SDXL) have no `time_ids` and no `pooled_embeddings`: they still
//! load, for the SD-1.x/2.x runs they were made for; an SDXL run refuses them by name.
//!
//! Version 3 is a cache made with aspect-ratio buckets (`--buckets`, recorded in `index.json`
//! as `buckets`): its rows' latents differ in size, so `latent_mean` and `latent_std` are 1-D,
//! the rows' values one after another, and `latent_shapes` (n, 3) i64 gives each row's (c, h, w).
//! Each row's sizes are its time ids: the original (h, w), the crop's top-left and the bucket
//! (h, w) it was cropped to, which decides its bucket when training. Caches made without
//! buckets stay version 2 (byte for byte as before); an sdkd before buckets refuses version 3 by
//! its version number.
//! Shard k covers dataset indices `k * shard_size .. (k + 1) * shard_size`; its `n` rows are the
//! usable samples of that range (bad ones are skipped and counted, or fail the run, as in the
//! image loader). Latents are stored unscaled (the VAE's `scaling_factor` is the trainer's), as
//! mean and std, so training still samples `mean + std * noise`.
//!
//! Resuming: a shard is written to a temporary file and renamed, then recorded in `index.json`
//! (also replaced atomically). Running again with the same settings keeps every recorded shard
//! and redoes the rest; other settings are an error naming the key.
//!
//! Crops and flips are fixed at preprocess time: each sample is transformed once, as epoch 0
//! would see it with the preprocess seed (use a centre crop and no flip to match evaluation).
//! Reading a cache, the loader shuffles rows with the training seed exactly as it shuffles
//! images, with the same [`Cursor`](super::order::Cursor) semantics.
use super::buckets::Buckets;
use super::image_source::ImageSource;
use super::loader::{Loader, LoaderOptions};
use super::source::{BadSample, ImageRows, OnBadSample, SampleSource};
use super::order::{Cursor, Order};
use super::transform::Transform;
use crate::models::weights::{dtype_of, kind_of};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::{tensor::TensorView, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// What an encoder makes of a batch.
#[derive(Debug)]
pub struct Encoded {
    /// (b, c, h, w): the mean of the VAE's latent distribution (unscaled).
    pub latent_mean: Tensor,
    /// (b, c, h, w): its standard deviation.
    pub latent_std: Tensor,
    /// (b, tokens, dim): what the UNet cross-attends to (SD: the text encoder's last hidden
    /// state; SDXL: both encoders' penultimate states concatenated).
    pub text_embeddings: Tensor,
    /// (b, dim): SDXL's pooled text embedding (text_encoder_2's `text_embeds`); None for SD.
    pub pooled_embeddings: Option<Tensor>,
}

/// Encodes images and captions (the teacher's VAE and text encoder; anything in tests).
pub trait SampleEncoder {
    /// `images`: (b, 3, h, w) f32 in [-1, 1] on the CPU; `captions`: b strings.
    fn encode(&self, images: &Tensor, captions: &[String]) -> Result<Encoded>;
    /// Names what encodes (teacher path, dtype...): stored in `index.json` so that resuming
    /// with another encoder is an error, not a mixed cache.
    fn describe(&self) -> serde_json::Value;
}

/// How `sdkd preprocess` builds a cache.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    pub transform: Transform,
    /// Aspect-ratio buckets: each sample cropped to its nearest (a version 3 cache).
    pub buckets: Option<Buckets>,
    /// Draws random crops and flips (epoch 0) when the transform asks for them.
    pub seed: u64,
    /// Dataset samples per shard.
    pub shard_size: usize,
    /// Samples per encoder call.
    pub batch_size: usize,
    pub on_bad_sample: OnBadSample,
    /// Decode threads (0 = one per core).
    pub threads: usize,
}

/// One finished shard in `index.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name in the cache folder; None when every sample of its range was bad.
    pub file: Option<String>,
    pub start: usize,
    pub end: usize,
    pub rows: usize,
    pub skipped: usize,
}

/// `index.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheIndex {
    pub format: String,
    pub version: u32,
    /// The dataset folder it was made from (informative).
    pub source: String,
    /// [`ImageRows::fingerprint`] of that dataset.
    pub fingerprint: String,
    pub num_source_samples: usize,
    pub transform: Transform,
    /// The aspect-ratio buckets of a version 3 cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Buckets>,
    pub seed: u64,
    pub shard_size: usize,
    pub encoder: serde_json::Value,
    pub complete: bool,
    pub shards: Vec<ShardEntry>,
}

pub const FORMAT: &str = "sdkd-latent-cache";
/// 2 added `time_ids` and `pooled_embeddings`; 3 is a cache with aspect-ratio buckets (ragged
/// latents), written only when buckets are on. Versions 1 and 2 are still read.
pub const VERSION: u32 = 3;
/// The version of a cache made without buckets.
const VERSION_SQUARE: u32 = 2;
const INDEX: &str = "index.json";

impl CacheIndex {
    pub fn read(dir: &Path) -> Result<CacheIndex> {
        let path = dir.join(INDEX);
        if dir.is_dir() && !path.exists() {
            bail!("{} is not an sdkd latent cache (it has no {INDEX}; `sdkd preprocess --out` makes one)", dir.display());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let index: CacheIndex =
            serde_json::from_str(&text).map_err(|e| anyhow!("{} is not a latent cache index: {e}", path.display()))?;
        if index.format != FORMAT || !(1..=VERSION).contains(&index.version) {
            bail!(
                "{}: format {:?} version {}, expected {FORMAT:?} version 1 to {VERSION} (a cache from a newer sdkd?)",
                path.display(),
                index.format,
                index.version
            );
        }
        Ok(index)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("the index serialises");
        crate::fs_safe::write_file(&dir.join(INDEX), text.as_bytes())
    }

    /// The first setting in which `self` (on disk) and `want` (this run) differ.
    fn mismatch(&self, want: &CacheIndex) -> Option<(&'static str, String, String)> {
        fn show<T: Serialize>(v: &T) -> String {
            serde_json::to_string(v).unwrap_or_default()
        }
        [
            ("format version", show(&self.version), show(&want.version)),
            ("fingerprint (of the dataset's files and captions)", show(&self.fingerprint), show(&want.fingerprint)),
            ("num_source_samples", show(&self.num_source_samples), show(&want.num_source_samples)),
            ("transform", show(&self.transform), show(&want.transform)),
            ("buckets", show(&self.buckets), show(&want.buckets)),
            ("seed", show(&self.seed), show(&want.seed)),
            ("shard_size", show(&self.shard_size), show(&want.shard_size)),
            ("encoder", show(&self.encoder), show(&want.encoder)),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b)
    }
}

/// What a build did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheReport {
    pub shards: usize,
    /// Finished shards found on disk and kept.
    pub shards_kept: usize,
    pub shards_written: usize,
    /// Rows in the whole cache.
    pub rows: usize,
    /// Bad samples skipped in the whole cache.
    pub skipped: usize,
}

fn shard_name(k: usize) -> String {
    format!("shard-{k:05}.safetensors")
}

/// Whether a recorded shard is really there: its header parses, matches the file's length, and
/// says `rows` rows (only the header is read, not the tensors).
fn shard_intact(dir: &Path, entry: &ShardEntry) -> bool {
    let Some(file) = &entry.file else { return entry.rows == 0 };
    let Ok(f) = std::fs::File::open(dir.join(file)) else { return false };
    // SAFETY: read-only mapping, only the header pages are touched.
    let Ok(mmap) = (unsafe { memmap2::Mmap::map(&f) }) else { return false };
    let Ok((_, meta)) = SafeTensors::read_metadata(&mmap) else { return false };
    let rows_ok = meta.info("sample_ids").is_some_and(|i| i.shape == [entry.rows]);
    rows_ok && meta.metadata().as_ref().is_some_and(|m| m.contains_key(ROWS_KEY))
}

/// Encodes `dataset` into the cache folder `out`, keeping shards an earlier run finished.
pub fn build_cache(dataset: Arc<dyn ImageRows>, encoder: &dyn SampleEncoder, out: &Path, opts: &CacheOptions) -> Result<CacheReport> {
    if opts.shard_size == 0 || opts.batch_size == 0 {
        bail!("shard size and batch size must be at least 1");
    }
    if opts.batch_size > opts.shard_size {
        bail!("batch size {} is larger than the shard size {}: a batch never spans two shards", opts.batch_size, opts.shard_size);
    }
    let n = dataset.len();
    let mut index = CacheIndex {
        format: FORMAT.into(),
        version: if opts.buckets.is_some() { VERSION } else { VERSION_SQUARE },
        source: dataset.describe(),
        fingerprint: dataset.fingerprint(),
        num_source_samples: n,
        transform: opts.transform,
        buckets: opts.buckets.clone(),
        seed: opts.seed,
        shard_size: opts.shard_size,
        encoder: encoder.describe(),
        complete: false,
        shards: vec![],
    };
    let mut kept: HashMap<usize, ShardEntry> = HashMap::new();
    if out.join(INDEX).is_file() {
        let old = CacheIndex::read(out)?;
        if let Some((key, was, now)) = old.mismatch(&index) {
            bail!(
                "the cache in {} was made with {key} {was}, this run asks for {now}: use another output folder or delete this one",
                out.display()
            );
        }
        for e in old.shards {
            if shard_intact(out, &e) {
                kept.insert(e.start, e);
            }
        }
    } else if out.exists() && std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?.next().is_some() {
        bail!("{} is not empty and holds no {INDEX}: not a latent cache; choose an empty or new folder", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::fs_safe::clean_stale(out)?;

    let num_shards = n.div_ceil(opts.shard_size);
    let bounds = |k: usize| (k * opts.shard_size, ((k + 1) * opts.shard_size).min(n));
    let mut report = CacheReport { shards: num_shards, ..Default::default() };
    let mut todo = vec![];
    for k in 0..num_shards {
        let (start, end) = bounds(k);
        match kept.remove(&start).filter(|e| e.end == end) {
            Some(e) => index.shards.push(e),
            None => todo.push(k),
        }
    }
    report.shards_kept = index.shards.len();
    // Written before any encoding, so a run that dies in its first shard can still be resumed.
    index.write(out)?;
    let mut source = ImageSource::new(dataset.clone(), opts.transform, opts.seed);
    if let Some(b) = &opts.buckets {
        // a sample whose size cannot be read is a bad sample of its shard (skipped or failed there)
        source = source.with_buckets(b.clone(), opts.on_bad_sample)?.0;
    }
    let source = Arc::new(source);
    for k in todo {
        let (start, end) = bounds(k);
        let entry = encode_shard(source.clone(), encoder, out, k, start, end, opts)?;
        index.shards.push(entry);
        index.shards.sort_by_key(|e| e.start);
        index.write(out)?;
        report.shards_written += 1;
    }
    index.complete = true;
    index.write(out)?;
    report.rows = index.shards.iter().map(|e| e.rows).sum();
    report.skipped = index.shards.iter().map(|e| e.skipped).sum();
    Ok(report)
}

fn check_encoded(e: &Encoded, b: i64) -> Result<()> {
    let (m, s, t) = (e.latent_mean.size(), e.latent_std.size(), e.text_embeddings.size());
    if let Some(p) = e.pooled_embeddings.as_ref().map(Tensor::size).filter(|p| p.len() != 2 || p[0] != b) {
        bail!("the encoder returned pooled_embeddings of shape {p:?} for {b} captions, expected (b, dim)");
    }
    if m.len() != 4 || m[0] != b {
        bail!("the encoder returned latent_mean of shape {m:?} for {b} images, expected (b, c, h, w)");
    }
    if s != m {
        bail!("the encoder returned latent_std of shape {s:?}, latent_mean {m:?}: they must agree");
    }
    if t.len() < 2 || t[0] != b {
        bail!("the encoder returned text_embeddings of shape {t:?} for {b} captions, expected (b, tokens, dim)");
    }
    Ok(())
}

fn encode_shard(
    source: Arc<ImageSource>,
    encoder: &dyn SampleEncoder,
    out: &Path,
    k: usize,
    start: usize,
    end: usize,
    opts: &CacheOptions,
) -> Result<ShardEntry> {
    let lo = LoaderOptions {
        batch_size: opts.batch_size,
        order: Order::Sequential { start, end },
        on_bad_sample: opts.on_bad_sample,
        prefetch: 2,
        threads: opts.threads,
    };
    let dataset = source.dataset.clone();
    let mut loader = Loader::new(source, lo, Cursor::new(0, start as u64))?;
    let (mut means, mut stds, mut embs, mut ids, mut captions, mut files) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut pooled, mut time_ids, mut shapes) = (vec![], vec![], vec![]);
    let ragged = opts.buckets.is_some();
    while let Some(batch) = loader.next_batch()? {
        let b = batch.indices.len() as i64;
        let enc = encoder.encode(&batch.data.images, &batch.data.captions)?;
        check_encoded(&enc, b)?;
        let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu);
        // ragged: the rows' values one after another, and each row's (c, h, w)
        let rows = |t: &Tensor| if ragged { cpu(t).reshape([-1]) } else { cpu(t) };
        means.push(rows(&enc.latent_mean));
        stds.push(rows(&enc.latent_std));
        if ragged {
            let shape = enc.latent_mean.size()[1..].to_vec();
            shapes.extend((0..b).map(|_| Tensor::from_slice(&shape).view([1, 3])));
        }
        embs.push(cpu(&enc.text_embeddings));
        pooled.extend(enc.pooled_embeddings.as_ref().map(cpu));
        time_ids.push(batch.data.time_ids.shallow_clone());
        for &i in &batch.indices {
            ids.push(i as i64);
            files.push(dataset.key(i));
        }
        captions.extend(batch.data.captions);
    }
    let skipped = loader.stats().skipped as usize;
    let rows = ids.len();
    if rows == 0 {
        return Ok(ShardEntry { file: None, start, end, rows, skipped });
    }
    let cat = |ts: &[Tensor], what: &str| {
        Tensor::f_cat(ts, 0).map_err(|e| anyhow!("the encoder's {what} changed shape between batches: {e}"))
    };
    let mut tensors = vec![
        ("latent_mean", cat(&means, "latent_mean")?),
        ("latent_std", cat(&stds, "latent_std")?),
        ("text_embeddings", cat(&embs, "text_embeddings")?),
        ("time_ids", cat(&time_ids, "time_ids")?),
        ("sample_ids", Tensor::from_slice(&ids)),
    ];
    if ragged {
        tensors.push(("latent_shapes", cat(&shapes, "latent_shapes")?));
    }
    match pooled.len() {
        0 => {}
        n if n == embs.len() => tensors.push(("pooled_embeddings", cat(&pooled, "pooled_embeddings")?)),
        _ => bail!("the encoder returned pooled_embeddings for some batches only"),
    }
    // One metadata key: safetensors writes its metadata map in HashMap order, so several keys
    // would make the same shard come out with different bytes from run to run.
    let rows_json = serde_json::to_string(&RowMeta { captions, file_names: files })?;
    let meta: HashMap<String, String> = [(ROWS_KEY.to_string(), rows_json)].into();
    let name = shard_name(k);
    crate::fs_safe::write_file(&out.join(&name), &serialize(&tensors, meta)?)?;
    Ok(ShardEntry { file: Some(name), start, end, rows, skipped })
}

/// Per-row strings of a shard, stored in its header metadata under [`ROWS_KEY`].
#[derive(Serialize, Deserialize)]
struct RowMeta {
    captions: Vec<String>,
    file_names: Vec<String>,
}

const ROWS_KEY: &str = "sdkd_rows";

fn serialize(tensors: &[(&str, Tensor)], meta: HashMap<String, String>) -> Result<Vec<u8>> {
    let mut owned = vec![];
    for (name, t) in tensors {
        let t = t.contiguous();
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.to_string(), dtype_of(t.kind())?, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Where one tensor's rows sit in a mapped shard.
#[derive(Clone, Debug)]
struct Column {
    offset: usize,
    row_bytes: usize,
    kind: Kind,
    row_shape: Vec<i64>,
}

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// One per [`COLUMNS`] entry; the optional ones may be absent.
    columns: Vec<Option<Column>>,
    /// A version 3 shard: each row's (element offset, (c, h, w)) in the 1-D latent columns.
    ragged: Option<Vec<(usize, Vec<i64>)>>,
    ids: Vec<i64>,
    captions: Vec<String>,
}

/// The tensors of the cache, in [`LatentBatch`] order; the first [`REQUIRED`] are in every shard.
const COLUMNS: [&str; 5] = ["latent_mean", "latent_std", "text_embeddings", "pooled_embeddings", "time_ids"];
const REQUIRED: usize = 3;

impl Shard {
    fn open(path: &Path, rows: usize) -> Result<Shard> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: read-only mapping of a file the cache owns; caches are not rewritten in place
        // (shards are replaced by rename), so the mapped bytes do not change under us.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let bad = |what: String| anyhow!("{}: {what}", path.display());
        let st = SafeTensors::deserialize(&mmap).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let ragged = match st.tensor("latent_shapes") {
            Err(_) => None,
            Ok(v) => {
                if kind_of(v.dtype())? != Kind::Int64 || v.shape() != [rows, 3] {
                    return Err(bad(format!("latent_shapes must be i64 of shape [{rows}, 3]")));
                }
                let dims: Vec<i64> = v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
                let mut at = 0usize;
                let mut rows_at = Vec::with_capacity(rows);
                for d in dims.chunks_exact(3) {
                    if d.iter().any(|&x| x <= 0) {
                        return Err(bad(format!("latent_shapes holds {d:?}")));
                    }
                    rows_at.push((at, d.to_vec()));
                    at += d.iter().product::<i64>() as usize;
                }
                Some((rows_at, at))
            }
        };
        let column = |name: &str| -> Result<Column> {
            let v = st.tensor(name).map_err(|_| bad(format!("no {name} tensor")))?;
            if let (Some((_, total)), true) = (&ragged, name.starts_with("latent_")) {
                if v.shape() != [*total] {
                    return Err(bad(format!("{name} has shape {:?}, latent_shapes says [{total}]", v.shape())));
                }
                let offset = v.data().as_ptr() as usize - mmap.as_ptr() as usize;
                let kind = kind_of(v.dtype())?;
                return Ok(Column { offset, row_bytes: kind.elt_size_in_bytes(), kind, row_shape: vec![] });
            }
            if v.shape().is_empty() {
                return Err(bad(format!("{name} is a scalar, index.json says {rows} rows")));
            }
            let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
            if shape.first() != Some(&(rows as i64)) {
                return Err(bad(format!("{name} has shape {shape:?}, index.json says {rows} rows")));
            }
            let offset = v.data().as_ptr() as usize - mmap.as_ptr() as usize;
            Ok(Column { offset, row_bytes: v.data().len() / rows, kind: kind_of(v.dtype())?, row_shape: shape[1..].to_vec() })
        };
        let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        let columns = COLUMNS
            .iter()
            .enumerate()
            .map(|(i, name)| match i < REQUIRED || names.iter().any(|n| n == name) {
                true => column(name).map(Some),
                false => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let ids_view = st.tensor("sample_ids").map_err(|_| bad("no sample_ids tensor".into()))?;
        if kind_of(ids_view.dtype())? != Kind::Int64 || ids_view.shape() != [rows] {
            return Err(bad(format!("sample_ids must be i64 of shape [{rows}]")));
        }
        let ids: Vec<i64> = ids_view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        let (_, header) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
        let meta: RowMeta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(ROWS_KEY))
            .ok_or_else(|| bad(format!("no {ROWS_KEY:?} in the header metadata")))
            .and_then(|c| serde_json::from_str(c).map_err(|e| bad(format!("{ROWS_KEY:?} metadata: {e}"))))?;
        let captions = meta.captions;
        if captions.len() != rows {
            return Err(bad(format!("{} captions for {rows} rows", captions.len())));
        }
        drop(st);
        let ragged = ragged.map(|(r, _)| r);
        Ok(Shard { path: path.to_path_buf(), mmap, columns, ragged, ids, captions })
    }
}

/// A batch read from a cache.
#[derive(Debug)]
pub struct LatentBatch {
    /// (b, c, h, w), unscaled.
    pub latent_mean: Tensor,
    /// (b, c, h, w).
    pub latent_std: Tensor,
    /// (b, tokens, dim).
    pub text_embeddings: Tensor,
    /// (b, dim): SDXL's pooled text embedding, when the cache holds it.
    pub pooled_embeddings: Option<Tensor>,
    /// (b, 6) i64: SDXL's time ids (absent from version 1 caches).
    pub time_ids: Option<Tensor>,
    pub captions: Vec<String>,
    /// Dataset indices the rows were made from.
    pub sample_ids: Vec<i64>,
}

/// The bucket of every row of a bucketed cache: the target (h, w) of its time ids.
fn row_buckets(dir: &Path, buckets: &Buckets, shards: &[Shard], rows: &[(u32, u32)]) -> Result<Arc<[Option<u32>]>> {
    rows.iter()
        .map(|&(s, i)| {
            let sh = &shards[s as usize];
            let col = match (&sh.ragged, &sh.columns[4]) {
                (Some(_), Some(col)) => col,
                _ => bail!("{}: index.json lists buckets, but its rows have no latent_shapes or time_ids", sh.path.display()),
            };
            let at = col.offset + i as usize * col.row_bytes;
            let id = |k: usize| i64::from_le_bytes(sh.mmap[at + 8 * k..at + 8 * k + 8].try_into().expect("8 bytes"));
            let size = (id(5) as u32, id(4) as u32);
            match buckets.position(size) {
                Some(k) => Ok(Some(k as u32)),
                None => bail!("{}: row {i} was cropped to {}x{}, not one of the cache's buckets ({})", sh.path.display(), size.0, size.1, dir.display()),
            }
        })
        .collect()
}

/// A finished cache, memory-mapped; a [`SampleSource`] whose samples are its rows.
pub struct LatentCache {
    pub dir: PathBuf,
    pub index: CacheIndex,
    shards: Vec<Shard>,
    /// (shard, row in shard) of every row.
    rows: Vec<(u32, u32)>,
    /// A bucketed cache: each row's bucket in `index.buckets`.
    bucket_of: Option<Arc<[Option<u32>]>>,
}

impl LatentCache {
    pub fn open(dir: &Path) -> Result<LatentCache> {
        let index = CacheIndex::read(dir)?;
        let expected = index.num_source_samples.div_ceil(index.shard_size.max(1));
        if !index.complete || index.shards.len() != expected {
            bail!(
                "the cache in {} is incomplete ({} of {expected} shards): run `sdkd preprocess` again to finish it",
                dir.display(),
                index.shards.len()
            );
        }
        let mut shards: Vec<Shard> = vec![];
        let mut rows = vec![];
        for e in &index.shards {
            let Some(file) = &e.file else { continue };
            let shard = Shard::open(&dir.join(file), e.rows)?;
            if let Some(first) = shards.first() {
                for (c, name) in COLUMNS.iter().enumerate() {
                    let row = |col: &Option<Column>| col.as_ref().map(|c| (c.kind, c.row_shape.clone()));
                    let (a, b) = (row(&first.columns[c]), row(&shard.columns[c]));
                    if a != b {
                        bail!("{}: {name} rows are {b:?}, but {a:?} in {}", shard.path.display(), first.path.display());
                    }
                }
            }
            let s = shards.len() as u32;
            rows.extend((0..e.rows as u32).map(|r| (s, r)));
            shards.push(shard);
        }
        if rows.is_empty() {
            bail!("the cache in {} holds no samples (every sample was bad)", dir.display());
        }
        let bucket_of = match &index.buckets {
            Some(b) => Some(row_buckets(dir, b, &shards, &rows)?),
            None => None,
        };
        Ok(LatentCache { dir: dir.to_path_buf(), index, shards, rows, bucket_of })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Shapes of one row of latent_mean (c, h, w; the first row's in a bucketed cache) and
    /// text_embeddings (tokens, dim).
    pub fn row_shapes(&self) -> (Vec<i64>, Vec<i64>) {
        let first = &self.shards[0];
        let shape = |c: usize| first.columns[c].as_ref().expect("a required column").row_shape.clone();
        let latent = first.ragged.as_ref().map_or_else(|| shape(0), |r| r[0].1.clone());
        (latent, shape(2))
    }

    /// The width of the pooled embeddings, when the cache holds them (an SDXL teacher's).
    pub fn pooled_width(&self) -> Option<i64> {
        self.shards[0].columns[3].as_ref().map(|c| c.row_shape[0])
    }

    /// Whether the rows carry SDXL's time ids (version 2 caches).
    pub fn has_time_ids(&self) -> bool {
        self.shards[0].columns[4].is_some()
    }

    /// Rows `rows` (cache order) as one batch.
    pub fn gather(&self, rows: &[usize]) -> Result<LatentBatch> {
        let b = rows.len() as i64;
        let mut tensors = vec![];
        for c in 0..COLUMNS.len() {
            let Some(col0) = &self.shards[0].columns[c] else {
                tensors.push(None);
                continue;
            };
            let mut buf = Vec::with_capacity(rows.len() * col0.row_bytes);
            let mut row_shape = col0.row_shape.clone();
            for (k, &r) in rows.iter().enumerate() {
                let (s, i) = self.rows[r];
                let sh = &self.shards[s as usize];
                let col = sh.columns[c].as_ref().expect("every shard has the columns of the first (checked at open)");
                let (at, len) = match (&sh.ragged, col.row_shape.is_empty()) {
                    (Some(ragged), true) => {
                        let (first, shape) = &ragged[i as usize];
                        if k == 0 {
                            row_shape = shape.clone();
                        } else if *shape != row_shape {
                            bail!("{}: rows of latent sizes {row_shape:?} and {shape:?} in one batch (a batch keeps to one bucket)", self.dir.display());
                        }
                        let n = shape.iter().product::<i64>() as usize;
                        (col.offset + first * col.row_bytes, n * col.row_bytes)
                    }
                    _ => (col.offset + i as usize * col.row_bytes, col.row_bytes),
                };
                buf.extend_from_slice(&sh.mmap[at..at + len]);
            }
            let shape: Vec<i64> = std::iter::once(b).chain(row_shape).collect();
            tensors.push(Some(Tensor::f_from_data_size(&buf, &shape, col0.kind)?));
        }
        let (captions, sample_ids) = rows
            .iter()
            .map(|&r| {
                let (s, i) = self.rows[r];
                let sh = &self.shards[s as usize];
                (sh.captions[i as usize].clone(), sh.ids[i as usize])
            })
            .unzip();
        let mut columns = tensors.into_iter();
        let mut required = || columns.next().flatten().expect("the required columns");
        let (latent_mean, latent_std, text_embeddings) = (required(), required(), required());
        let (pooled_embeddings, time_ids) = (columns.next().flatten(), columns.next().flatten());
        Ok(LatentBatch { latent_mean, latent_std, text_embeddings, pooled_embeddings, time_ids, captions, sample_ids })
    }
}

impl SampleSource for LatentCache {
    type Item = usize;
    type Batch = LatentBatch;

    fn len(&self) -> usize {
        self.rows.len()
    }

    /// Rows were checked when the cache was built: every one is usable.
    fn load(&self, index: usize, _epoch: u64) -> std::result::Result<usize, BadSample> {
        Ok(index)
    }

    fn collate(&self, items: Vec<usize>) -> Result<LatentBatch> {
        self.gather(&items)
    }

    fn describe(&self) -> String {
        format!("latent cache {}", self.dir.display())
    }

    fn buckets(&self) -> Option<Arc<[Option<u32>]>> {
        self.bucket_of.clone()
    }
}
