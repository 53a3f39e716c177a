//! webdataset tar shards and Hugging Face parquet files, written by the reference writers
//! (webdataset's TarWriter, `datasets` and pyarrow; tests/reference/make_shards.py) and by
//! `sdkd synth --format`: the same samples, captions and tensors as the imagefolder they came
//! from, exact resume, bad samples skipped by shard and key, `train` and `preprocess` on them.
mod common;

use common::*;
use sdkd::data::*;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tch::{Kind, Tensor};

const COUNT: usize = 24;
const PER_SHARD: usize = 10;

struct Fixture {
    dir: tempfile::TempDir,
    /// (shard file, key) the corrupted sets must skip: {"wds": [...], "parquet": [...]}.
    skips: serde_json::Value,
    /// Every file under `ref/` (the user's shards) and its bytes, as made.
    shards: BTreeMap<PathBuf, Vec<u8>>,
}

impl Fixture {
    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).to_string_lossy().into_owned()
    }

    /// The user's shards are only read: the same files under `ref/`, byte for byte, and nothing
    /// added beside them (no index, no lock, no temp file).
    fn assert_shards_untouched(&self) {
        let now = snapshot(&self.dir.path().join("ref"));
        assert_eq!(now.keys().collect::<Vec<_>>(), self.shards.keys().collect::<Vec<_>>(), "files under the shards' folder");
        for (rel, bytes) in &self.shards {
            assert!(now[rel] == *bytes, "{} changed", rel.display());
        }
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempdir();
        let at = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
        for (out, format) in [("if", "imagefolder"), ("synth-wds", "webdataset"), ("synth-pq", "parquet")] {
            let o = sdkd(&["synth", "--out", &at(out), "--count", &COUNT.to_string(), "--resolution", "20", "--format", format]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let out = python_command()
            .arg(root().join("tests/reference/make_shards.py"))
            .args([at("if"), at("ref"), PER_SHARD.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "make_shards.py: {}", String::from_utf8_lossy(&out.stderr));
        let skips = serde_json::from_slice(&out.stdout).unwrap();
        let shards = snapshot(&dir.path().join("ref"));
        assert!(shards.len() >= 3 + 3 + 3, "wds, bad-wds, parquet shards: {:?}", shards.keys());
        Fixture { dir, skips, shards }
    })
}

fn transform() -> Transform {
    Transform { resolution: 16, center_crop: false, random_flip: true }
}

fn source(location: &str) -> Arc<ImageSource> {
    Arc::new(ImageSource::new(open_image_rows(location, "test", &DataOptions::default()).unwrap(), transform(), 3))
}

fn equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

/// Every location form of every format gives the imagefolder's tensors and captions, sample by
/// sample and epoch by epoch (random crops and flips included).
#[test]
fn shards_decode_to_the_imagefolders_tensors() {
    let f = fixture();
    let list = f.dir.path().join("shards.txt");
    std::fs::write(&list, "# the reference shards\nref/wds/00000.tar\n\nref/wds/00001.tar\nref/wds/00002.tar\n").unwrap();
    let folder = source(&f.path("if"));
    let locations = [
        f.path("ref/wds"),
        f.path("ref/wds/{00000..00002}.tar"),
        list.to_string_lossy().into_owned(),
        f.path("ref/parquet"),
        f.path("synth-wds"),
        f.path("synth-pq"),
        f.path("synth-pq/data/train-{00000..00000}-of-00001.parquet"),
    ];
    for loc in &locations {
        let s = source(loc);
        assert_eq!(s.len(), COUNT, "{loc}");
        for i in 0..COUNT {
            for epoch in 0..2 {
                let (a, ca) = folder.get(i, epoch).unwrap();
                let (b, cb) = s.get(i, epoch).unwrap();
                assert!(equal(&a, &b), "{loc}: sample {i} epoch {epoch} differs from the imagefolder's");
                assert_eq!(ca, cb, "{loc}: sample {i}");
            }
        }
    }
    let wds = open_image_rows(&f.path("ref/wds"), "test", &DataOptions::default()).unwrap();
    assert_eq!((wds.key(0), wds.key(13)), ("00000.tar/000000000".to_string(), "00001.tar/000010003".to_string()));
    let pq = open_image_rows(&f.path("ref/parquet"), "test", &DataOptions::default()).unwrap();
    assert_eq!(pq.key(13), "train-00001-of-00003.parquet#3");
    assert_ne!(wds.fingerprint(), pq.fingerprint());
}

/// The same resume test as the imagefolder's (tests/data.rs): shuffled batches across epochs,
/// resumed from a cursor, equal those of an uninterrupted run; on the corrupted sets, so skipped
/// samples are crossed too. On the clean sets the batches equal the imagefolder's.
#[test]
fn resume_is_exact_on_webdataset_and_parquet() {
    let f = fixture();
    let opts = LoaderOptions { prefetch: 3, threads: 2, ..LoaderOptions::shuffled(5, 9) };
    let run = |s: &Arc<ImageSource>, from: Cursor, n: usize| -> Vec<Batch<ImageBatch>> {
        Loader::new(s.clone(), opts, from).unwrap().take(n).map(|b| b.unwrap()).collect()
    };
    for loc in ["ref/bad-wds", "ref/bad-parquet"] {
        let s = source(&f.path(loc));
        let straight = run(&s, Cursor::default(), 12);
        assert!(straight.last().unwrap().next.epoch >= 2, "{loc}: the run crosses epochs");
        assert!(straight.iter().any(|b| !b.skipped.is_empty()), "{loc}: the run meets bad samples");
        for k in [0, 4, 7] {
            let resumed = run(&s, straight[k].next, 12 - k - 1);
            for (j, r) in resumed.iter().enumerate() {
                let u = &straight[k + 1 + j];
                assert!(equal(&u.data.images, &r.data.images), "{loc}: resume after batch {k}: batch {} differs", k + 1 + j);
                assert_eq!((&u.indices, &u.epochs, u.next, &u.data.captions), (&r.indices, &r.epochs, r.next, &r.data.captions));
                assert_eq!(u.skipped, r.skipped);
            }
        }
    }
    let folder = run(&source(&f.path("if")), Cursor::default(), 6);
    for loc in ["ref/wds", "ref/parquet"] {
        for (a, b) in folder.iter().zip(run(&source(&f.path(loc)), Cursor::default(), 6)) {
            assert!(equal(&a.data.images, &b.data.images) && a.data.captions == b.data.captions, "{loc}");
        }
    }
}

/// The loader's threads read row groups of one parquet file at once, each group for the first
/// time; every row still decodes to its own image (reads that shared one file offset returned
/// other bytes: rows reported as missing, or another row's image).
#[test]
fn concurrent_parquet_reads_give_each_row_its_own_image() {
    let f = fixture();
    let loc = f.path("ref/bad-parquet");
    let serial = open_image_rows(&loc, "test", &DataOptions::default()).unwrap();
    let expected: Vec<Option<Vec<u8>>> = (0..serial.len()).map(|i| serial.decode(i).ok().map(|(im, _)| im.into_raw())).collect();
    assert_eq!(expected.iter().filter(|e| e.is_none()).count(), 1, "one bad row in the fixture");
    for round in 0..10 {
        // a fresh set, so no row group is decoded yet and the threads read them together
        let rows = open_image_rows(&loc, "test", &DataOptions::default()).unwrap();
        let n = rows.len();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (rows, expected) = (&rows, &expected);
                scope.spawn(move || {
                    for k in 0..n {
                        let i = (k + t * n / 4) % n;
                        let got = rows.decode(i).ok().map(|(im, _)| im.into_raw());
                        assert!(got == expected[i], "round {round}, thread {t}: row {i} decoded differently from a serial read");
                    }
                });
            }
        });
    }
}

/// (shard file name, key) of a skipped sample, from its message.
fn shard_and_key(b: &BadSample) -> (String, String) {
    let shard = b.file.file_name().unwrap().to_string_lossy().into_owned();
    let key = b.reason.split(':').next().unwrap();
    let key = key.trim_start_matches("key ").trim_start_matches("row ").to_string();
    (shard, key)
}

fn expected(v: &serde_json::Value) -> Vec<(String, String)> {
    v.as_array().unwrap().iter().map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string())).collect()
}

#[test]
fn corrupted_shards_report_exactly_their_bad_samples() {
    let f = fixture();
    let mut total = 0;
    for (loc, which, kinds) in [
        ("ref/bad-wds", "wds", vec![BadKind::EmptyCaption, BadKind::Corrupt, BadKind::Corrupt]),
        ("ref/bad-parquet", "parquet", vec![BadKind::Missing]),
    ] {
        let s = source(&f.path(loc));
        let n = s.len();
        let opts = LoaderOptions { batch_size: 4, order: Order::Sequential { start: 0, end: n }, on_bad_sample: OnBadSample::Skip, prefetch: 2, threads: 2 };
        let mut l = Loader::new(s.clone(), opts, Cursor::default()).unwrap();
        let mut skipped = vec![];
        let mut used = 0;
        while let Some(b) = l.next_batch().unwrap() {
            used += b.indices.len();
            skipped.extend(b.skipped);
        }
        assert_eq!(skipped.iter().map(shard_and_key).collect::<Vec<_>>(), expected(&f.skips[which]), "{loc}");
        assert_eq!(skipped.iter().map(|b| b.kind).collect::<Vec<_>>(), kinds, "{loc}");
        assert_eq!((used, l.stats().skipped as usize), (COUNT - kinds.len(), kinds.len()), "{loc}");
        total += skipped.len();
        // on_bad_sample: fail stops at the first, naming shard and key.
        let mut l = Loader::new(s, LoaderOptions { on_bad_sample: OnBadSample::Fail, ..opts }, Cursor::default()).unwrap();
        let e = loop {
            match l.next_batch() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("{loc}: fail policy passed a bad sample"),
                Err(e) => break e.to_string(),
            }
        };
        let (shard, key) = &expected(&f.skips[which])[0];
        assert!(e.contains(shard.as_str()) && e.contains(key.as_str()) && e.contains("on_bad_sample"), "{e}");
    }
    assert_eq!(total, 4);
}

/// Encodes images as 4x4-pooled means and captions as their bytes; can be told to fail.
struct ToyEncoder {
    calls: Cell<usize>,
    fail_after_calls: Option<usize>,
}

impl SampleEncoder for ToyEncoder {
    fn encode(&self, images: &Tensor, captions: &[String]) -> anyhow::Result<Encoded> {
        if self.fail_after_calls.is_some_and(|n| self.calls.get() >= n) {
            anyhow::bail!("simulated crash");
        }
        self.calls.set(self.calls.get() + 1);
        let mean = images.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None::<i64>);
        let text = Tensor::stack(
            &captions
                .iter()
                .map(|c| {
                    let mut v = [0f32; 32];
                    c.bytes().take(32).enumerate().for_each(|(i, b)| v[i] = b as f32);
                    Tensor::from_slice(&v).view([8, 4])
                })
                .collect::<Vec<_>>(),
            0,
        );
        Ok(Encoded { latent_std: mean.abs() + 0.01, latent_mean: mean, text_embeddings: text, pooled_embeddings: None })
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"encoder": "toy"})
    }
}

fn cache_rows(dir: &Path) -> (Tensor, Vec<String>) {
    let c = LatentCache::open(dir).unwrap();
    let b = c.gather(&(0..c.len()).collect::<Vec<_>>()).unwrap();
    assert!(b.latent_mean.kind() == Kind::Float);
    (b.latent_mean, b.captions)
}

/// `sdkd preprocess`'s cache from shards equals the imagefolder's; an interrupted build resumes
/// at the shard it stopped in.
#[test]
fn preprocess_on_shards_equals_the_imagefolders_cache_and_resumes() {
    let f = fixture();
    let out = tempdir();
    let opts = CacheOptions { transform: transform(), buckets: None, seed: 4, shard_size: 8, batch_size: 4, on_bad_sample: OnBadSample::Skip, threads: 2 };
    let build = |loc: &str, name: &str, fail: Option<usize>| {
        let rows = open_image_rows(&f.path(loc), "test", &DataOptions::default()).unwrap();
        build_cache(rows, &ToyEncoder { calls: Cell::new(0), fail_after_calls: fail }, &out.path().join(name), &opts)
    };
    build("if", "if", None).unwrap();
    let (want, captions) = cache_rows(&out.path().join("if"));
    for loc in ["ref/wds", "ref/parquet", "synth-wds", "synth-pq"] {
        let name = loc.replace('/', "-");
        // 3 cache shards of 8 samples, 2 encoder calls each: dies in the second shard.
        assert!(build(loc, &name, Some(3)).is_err());
        let r = build(loc, &name, None).unwrap();
        assert_eq!((r.shards, r.shards_kept, r.shards_written, r.rows), (3, 1, 2, COUNT), "{loc}");
        let (got, got_captions) = cache_rows(&out.path().join(&name));
        assert!(equal(&want, &got), "{loc}: latents differ from the imagefolder's");
        assert_eq!(captions, got_captions, "{loc}");
    }
    let r = build("ref/bad-wds", "bad", None).unwrap();
    assert_eq!((r.rows, r.skipped), (COUNT - 3, 3));

    // The command: shards by brace pattern, filtered on the json.
    use sdkd::commands::preprocess::{run_with, PreprocessArgs};
    let mut args = PreprocessArgs {
        teacher: "unused-by-the-toy-encoder".into(),
        data: f.path("ref/wds/{00000..00002}.tar"),
        format: None,
        caption: None,
        image_column: None,
        min_size: Some(20),
        max_aspect: Some(1.0),
        filters: vec!["aesthetic=>= 2".into()],
        resolution: 16,
        buckets: None,
        out: out.path().join("cli"),
        center_crop: true,
        random_flip: false,
        seed: 0,
        shard_size: 4,
        batch_size: 4,
        on_bad_sample: OnBadSample::Fail,
        threads: 1,
    };
    run_with(&args, &ToyEncoder { calls: Cell::new(0), fail_after_calls: None }).unwrap();
    assert_eq!(LatentCache::open(&args.out).unwrap().len(), 10, "aesthetic >= 2: 4 + 4 + 2 of the shards of 10, 10, 4");
    args.filters = vec!["aesthetic=high".into()];
    let e = run_with(&args, &ToyEncoder { calls: Cell::new(0), fail_after_calls: None }).unwrap_err().to_string();
    assert!(e.contains("--filter aesthetic"), "{e}");
    f.assert_shards_untouched();
}

/// `sdkd train` on webdataset and parquet shards trains the same student as on the imagefolder;
/// on the corrupted shards it trains and names exactly the bad samples, which TensorBoard counts.
#[test]
fn train_on_shards_equals_train_on_the_imagefolder() {
    let f = fixture();
    let tmp = tempdir();
    let teacher = tmp.path().join("teacher");
    run_reference("make_pipeline.py", &[teacher.to_str().unwrap(), "--stages", "4", "--sample-size", "8", "--scheduler", "ddpm"]);
    let train = |name: &str, data: &str, steps: u64| -> (PathBuf, String) {
        let run = tmp.path().join(name);
        let yaml = format!(
            "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  {data}\n  resolution: 16\n\
             train:\n  batch_size: 4\n  max_steps: {steps}\n  seed: 7\n  device: cpu\n  precision: fp32\n\
             checkpoint:\n  every: {steps}\nlog:\n  every: 1\nvalidation:\n  every: 0\n",
            teacher.display(),
            run.display()
        );
        let cfg = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        let o = sdkd(&["train", "--quiet", "--config", cfg.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{name}: {stderr}");
        (run.join("final/unet/diffusion_pytorch_model.safetensors"), stderr)
    };
    let (folder, _) = train("if", &format!("path: {}", f.path("if")), 2);
    let want = read_tensors(&folder);
    for (name, data) in [("wds", format!("shards: {}", f.path("ref/wds/{00000..00002}.tar"))), ("pq", format!("shards: {}\n  format: parquet", f.path("ref/parquet")))] {
        let (got, _) = train(name, &data, 2);
        for (k, v) in read_tensors(&got) {
            assert!(v.equal(&want[&k]), "{name}: {k} differs from the imagefolder run's");
        }
    }
    // 6 steps of 4 = one epoch of the 21 good samples and a bit: every bad sample is met.
    let mut named = vec![];
    for (name, loc, which) in [("bad-wds", "ref/bad-wds", "wds"), ("bad-pq", "ref/bad-parquet", "parquet")] {
        let (_, stderr) = train(name, &format!("shards: {}", f.path(loc)), 6);
        let mut seen: Vec<(String, String)> = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("warning: skipped "))
            .map(|l| {
                let (file, rest) = l.split_once(": ").unwrap();
                let key = rest.split(':').next().unwrap().trim_start_matches("key ").trim_start_matches("row ");
                (Path::new(file).file_name().unwrap().to_string_lossy().into_owned(), key.to_string())
            })
            .collect();
        let warnings = seen.len();
        seen.sort();
        seen.dedup();
        let mut want = expected(&f.skips[which]);
        want.sort();
        assert_eq!(seen, want, "{name}: {stderr}");
        let tb = python_command().arg(root().join("tests/reference/trainkit_tb_read.py")).arg(tmp.path().join(name).join("tb")).output().unwrap();
        let tb: serde_json::Value = serde_json::from_slice(&tb.stdout).unwrap();
        let counts = tb["scalars"]["data/skipped_samples"].as_array().unwrap();
        assert_eq!(counts.last().unwrap()[1].as_f64().unwrap() as usize, warnings, "{name}");
        named.extend(seen);
    }
    assert_eq!(named.len(), 4);
    f.assert_shards_untouched();
}

#[test]
fn bad_data_settings_are_clean_errors() {
    let f = fixture();
    let tmp = tempdir();
    for (data, needle) in [
        (format!("shards: {}\n  filter: {{aesthetic: \"about 3\"}}", f.path("ref/wds")), "data.filter.aesthetic"),
        (format!("shards: {}\n  format: tiff", f.path("ref/wds")), "data.format"),
        (format!("shards: {}\n  path: {}", f.path("ref/wds"), f.path("if")), "data.shards"),
        (format!("shards: {}\n  max_aspect: 0.5", f.path("ref/wds")), "data.max_aspect"),
    ] {
        let cfg = tmp.path().join("bad.yaml");
        std::fs::write(&cfg, format!("teacher: t\nstudent: bk_small\noutput_dir: {}\ndata:\n  {data}\n", tmp.path().join("o").display())).unwrap();
        assert_clean_failure(&sdkd(&["train", "--config", cfg.to_str().unwrap()]), needle);
    }
    let e = |loc: &str, opts: &DataOptions| open_image_rows(loc, "data.shards", opts).err().map(|e| format!("{e:#}")).unwrap_or_default();
    let d = DataOptions::default();
    assert!(e(&f.path("ref/wds/{00000..00009}.tar"), &d).contains("00003.tar does not exist"));
    assert!(e(&f.path("ref/nothing"), &d).contains("does not exist"));
    let pq = DataOptions { caption: Some("caption".into()), ..Default::default() };
    assert!(e(&f.path("ref/parquet"), &pq).contains("no caption column \"caption\""));
    // Filters on the json: img2dataset-style width/height and any extra key.
    let filters = Filters::from_config(None, None, &[("aesthetic".to_string(), ">= 2".to_string())].into()).unwrap();
    let rows = open_image_rows(&f.path("ref/wds"), "data.shards", &DataOptions { filters, ..Default::default() }).unwrap();
    assert_eq!(rows.len(), 10, "aesthetic is i % 4 within each shard of 10, 10, 4: 4 + 4 + 2 pass");
    let filters = Filters::from_config(Some(21), None, &Default::default()).unwrap();
    assert!(e(&f.path("ref/wds"), &DataOptions { filters, ..Default::default() }).contains("no samples (24 filtered out)"));
    // The json's sizes (20 px) are below a resolution of 64: warned; the parquet has no sizes
    // and is checked by decoding.
    for loc in ["ref/wds", "ref/parquet"] {
        let rows = open_image_rows(&f.path(loc), "data.shards", &d).unwrap();
        let w = sdkd::data::formats::small_images_warning(rows.as_ref(), 64).unwrap_or_default();
        assert!(w.contains("all 24 images checked") && w.contains("data.resolution 64") && w.contains("20 px"), "{loc}: {w}");
        assert_eq!(sdkd::data::formats::small_images_warning(rows.as_ref(), 16), None);
    }
    f.assert_shards_untouched();
}
