//! The data pipeline: imagefolder formats, image codecs and transforms against Pillow, bad
//! samples, determinism and resume, the synthetic dataset, and the latent cache.
mod common;

use common::{assert_clean_failure, read_tensors, run_reference, sdkd, tempdir};
use sdkd::data::synthetic::{write_dataset, Scene};
use sdkd::data::*;
use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use tch::{Kind, Tensor};

// ---------------------------------------------------------------------------------------------
// helpers

/// A noisy RGB image whose content depends on `seed`.
fn noise_image(w: u32, h: u32, seed: u64) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = sdkd::data::order::splitmix64(seed ^ ((y as u64) << 20) ^ x as u64);
        image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    })
}

fn write_png(dir: &Path, name: &str, w: u32, h: u32, seed: u64) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    noise_image(w, h, seed).save(&p).unwrap();
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn jsonl(rows: &[(&str, &str)]) -> String {
    rows.iter().map(|(f, t)| serde_json::json!({"file_name": f, "text": t}).to_string() + "\n").collect()
}

fn transform(res: u32, center: bool, flip: bool) -> Transform {
    Transform { resolution: res, center_crop: center, random_flip: flip }
}

fn image_source(dir: &Path, t: Transform, seed: u64) -> Arc<ImageSource> {
    Arc::new(ImageSource::new(Arc::new(ImageFolder::open(dir).unwrap()), t, seed))
}

fn sequential(batch: usize, n: usize, policy: OnBadSample) -> LoaderOptions {
    LoaderOptions { batch_size: batch, order: Order::Sequential { start: 0, end: n }, on_bad_sample: policy, prefetch: 2, threads: 2 }
}

/// Every batch of a sequential pass.
fn all_batches<S: SampleSource>(src: Arc<S>, opts: LoaderOptions) -> anyhow::Result<(Vec<Batch<S::Batch>>, LoaderStats)> {
    let first = opts.order.first();
    let mut l = Loader::new(src, opts, first)?;
    let mut out = vec![];
    while let Some(b) = l.next_batch()? {
        out.push(b);
    }
    Ok((out, l.stats()))
}

fn equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

// ---------------------------------------------------------------------------------------------
// metadata formats

#[test]
fn jsonl_csv_and_sidecars_give_the_same_samples() {
    let captions = ["a red, round thing", "say \"hi\"", "plain"];
    let dirs: Vec<_> = (0..3).map(|_| tempdir()).collect();
    for d in &dirs {
        write_png(d.path(), "a.png", 40, 30, 1);
        write_png(d.path(), "sub/b.png", 30, 44, 2);
        write_png(d.path(), "c.png", 32, 32, 3);
    }
    let files = ["a.png", "sub/b.png", "c.png"];
    write(dirs[0].path(), "metadata.jsonl", &jsonl(&files.iter().copied().zip(captions).collect::<Vec<_>>()));
    write(
        dirs[1].path(),
        "metadata.csv",
        "file_name,extra,text\r\na.png,1,\"a red, round thing\"\r\nsub/b.png,2,\"say \"\"hi\"\"\"\r\nc.png,3,plain\r\n",
    );
    write(dirs[2].path(), "a.txt", "a red, round thing\n");
    write(dirs[2].path(), "sub/b.txt", "say \"hi\"");
    write(dirs[2].path(), "c.txt", "plain");

    let kinds = [dataset::MetadataKind::Jsonl, dataset::MetadataKind::Csv, dataset::MetadataKind::Sidecar];
    let mut images = vec![];
    for (d, kind) in dirs.iter().zip(kinds) {
        let ds = ImageFolder::open(d.path()).unwrap();
        assert_eq!(ds.kind, kind);
        let names: Vec<_> = ds.samples.iter().map(|s| s.file_name.replace('\\', "/")).collect();
        let caps: Vec<_> = ds.samples.iter().map(|s| s.caption.clone().unwrap()).collect();
        // Sidecars come in path order: a, c, sub/b.
        if kind == dataset::MetadataKind::Sidecar {
            assert_eq!(names, ["a.png", "c.png", "sub/b.png"]);
            assert_eq!(caps, [captions[0], captions[2], captions[1]]);
        } else {
            assert_eq!(names, files);
            assert_eq!(caps, captions);
        }
        let src = Arc::new(ImageSource::new(Arc::new(ds), transform(16, true, false), 0));
        let (batches, stats) = all_batches(src, sequential(8, 3, OnBadSample::Fail)).unwrap();
        assert_eq!(stats.skipped, 0);
        assert_eq!(batches[0].data.images.size(), [3, 3, 16, 16]);
        images.push(batches.into_iter().next().unwrap().data.images);
    }
    assert!(equal(&images[0], &images[1]));
    // Sidecar order a, c, b against metadata order a, b, c.
    assert!(equal(&images[2], &images[0].index_select(0, &Tensor::from_slice(&[0i64, 2, 1]))));
}

#[test]
fn malformed_metadata_names_file_and_line() {
    let cases: [(&str, &str, &str); 7] = [
        ("metadata.jsonl", "{\"file_name\": \"a.png\", \"text\": \"x\"}\n\n{\"file_name\": \"b.png\", \"text\": \n", "metadata.jsonl:3"),
        ("metadata.jsonl", "{\"file_name\": \"a.png\", \"text\": \"x\"}\n{\"file_name\": \"b.png\"}\n", "metadata.jsonl:2"),
        ("metadata.jsonl", "[1, 2]\n", "metadata.jsonl:1"),
        ("metadata.jsonl", "{\"file_name\": 3, \"text\": \"x\"}\n", "metadata.jsonl:1"),
        ("metadata.csv", "file_name,text\na.png,\"multi\nline\"\nb.png,x,extra\n", "metadata.csv:4"),
        ("metadata.csv", "file_name,caption\na.png,x\n", "metadata.csv:1"),
        ("metadata.csv", "file_name,text\na.png,\"never closed\n", "metadata.csv:2"),
    ];
    for (file, text, needle) in cases {
        let d = tempdir();
        write(d.path(), file, text);
        let e = format!("{:#}", ImageFolder::open(d.path()).unwrap_err());
        assert!(e.contains(needle), "{file} {text:?}: error {e:?} does not name {needle}");
    }
    let d = tempdir();
    write(d.path(), "metadata.csv", "file_name,text\n");
    write(d.path(), "metadata.jsonl", "");
    let e = ImageFolder::open(d.path()).unwrap_err().to_string();
    assert!(e.contains("both metadata.jsonl and metadata.csv"), "{e}");
    let d = tempdir();
    write_png(d.path(), "a.png", 8, 8, 0);
    let e = ImageFolder::open(d.path()).unwrap_err().to_string();
    assert!(e.contains("none of its 1 images has a .txt caption"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// codecs and transforms against Pillow

#[test]
fn every_image_format_decodes_like_pillow() {
    let d = tempdir();
    run_reference("data_reference.py", &["formats", d.path().to_str().unwrap()]);
    let expected = read_tensors(&d.path().join("decoded.safetensors"));
    let rows: Vec<(&str, &str)> = expected.keys().map(|k| (k.as_str(), "a caption")).collect();
    write(d.path(), "metadata.jsonl", &jsonl(&rows));
    let ds = ImageFolder::open(d.path()).unwrap();
    // Lossless codecs must agree exactly. JPEG decoders may round differently (zune-jpeg vs
    // libjpeg-turbo IDCT and chroma upsampling; measured max 3, mean 0.37 levels); lossy WebP
    // decoded identically here (image-webp vs libwebp), a little slack is left for libwebp updates.
    let tolerance = |name: &str| match name {
        "photo.jpg" => (6.0, 1.0),
        "photo_lossy.webp" => (2.0, 0.25),
        _ => (0.0, 0.0),
    };
    for (i, (name, want)) in expected.iter().enumerate() {
        let (img, _) = ds.decode(i).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = Tensor::from_slice(img.as_raw()).view([img.height() as i64, img.width() as i64, 3]);
        let diff = (got.to_kind(Kind::Float) - want.to_kind(Kind::Float)).abs();
        let (max, mean) = (diff.max().double_value(&[]), diff.mean(Kind::Float).double_value(&[]));
        println!("{name}: max |diff| {max} mean {mean:.4} (0-255 scale)");
        let (tmax, tmean) = tolerance(name);
        assert!(max <= tmax && mean <= tmean, "{name}: decoded pixels differ from Pillow: max {max}, mean {mean}");
    }
}

#[test]
fn transform_matches_pillow_and_numpy() {
    let d = tempdir();
    run_reference("data_reference.py", &["transform", d.path().to_str().unwrap()]);
    let expected = read_tensors(&d.path().join("expected.safetensors"));
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("cases.json")).unwrap()).unwrap();
    let mut worst_resized = 0f64;
    for (i, c) in cases.iter().enumerate() {
        let res = c["resolution"].as_u64().unwrap() as u32;
        let center = c["center_crop"].as_bool().unwrap();
        let t = transform(res, center, false);
        let img = image::open(d.path().join(c["file"].as_str().unwrap())).unwrap().to_rgb8();
        let resized = t.resized_size(img.width(), img.height());
        let mut aug = t.augment(0, 0, 0, resized);
        if center {
            // Our centre offsets must be torchvision's.
            assert_eq!((aug.left as u64, aug.top as u64), (c["left"].as_u64().unwrap(), c["top"].as_u64().unwrap()), "case {i}");
        } else {
            aug.left = c["left"].as_u64().unwrap() as u32;
            aug.top = c["top"].as_u64().unwrap() as u32;
        }
        aug.flip = c["flip"].as_bool().unwrap();
        let pixels = t.apply(&img, aug);
        let got_px = Tensor::from_slice(&pixels).view([res as i64, res as i64, 3]);
        let got = sdkd::data::transform::to_tensor(&pixels, 1, res as usize).squeeze_dim(0);
        let (want_px, want) = (&expected[&format!("{i}.pixels")], &expected[&format!("{i}.tensor")]);
        let px_diff = max_abs_diff(&got_px, want_px);
        let diff = max_abs_diff(&got, want);
        println!("case {i} {c}: max |diff| {px_diff} levels, {diff:e} in [-1, 1]");
        // Pillow's fixed-point bilinear filter is reproduced step by step, and ToTensor/Normalize
        // are the same f32 operations: the whole pipeline must be bit-exact (measured: 0 levels).
        assert!(equal(&got, want), "case {i}: transform differs from Pillow/numpy: {px_diff} levels, {diff} in [-1, 1]");
        if !c["resize_free"].as_bool().unwrap() {
            worst_resized = worst_resized.max(px_diff);
        }
    }
    println!("max |diff| after bilinear resize, over all cases: {worst_resized} levels of 255");
}

#[test]
fn bicubic_resize_matches_pillow() {
    let d = tempdir();
    run_reference("data_reference.py", &["bicubic", d.path().to_str().unwrap()]);
    let expected = read_tensors(&d.path().join("expected.safetensors"));
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("cases.json")).unwrap()).unwrap();
    for (i, c) in cases.iter().enumerate() {
        let img = image::open(d.path().join(c["file"].as_str().unwrap())).unwrap().to_rgb8();
        let size = (c["size"][0].as_u64().unwrap() as u32, c["size"][1].as_u64().unwrap() as u32);
        let out = sdkd::data::transform::resize(&img, size, sdkd::data::transform::Filter::Bicubic);
        let got = Tensor::from_slice(out.as_raw()).view([size.1 as i64, size.0 as i64, 3]);
        let want = &expected[&i.to_string()];
        // Pillow's fixed-point bicubic path is reproduced step by step: every byte equal.
        assert!(got.equal(want), "case {i} {c}: {} levels off Pillow's BICUBIC", max_abs_diff(&got, want));
    }
}

// ---------------------------------------------------------------------------------------------
// bad samples

/// 5 good samples (0, 2, 4, 6, 8) interleaved with a corrupt file, a missing file, an empty
/// file and an empty caption (1, 3, 5, 7).
fn dataset_with_bad_samples(d: &Path) -> Vec<&'static str> {
    for (i, name) in ["g0.png", "g2.png", "g4.png", "g6.png", "g8.png"].iter().enumerate() {
        write_png(d, name, 20 + i as u32, 24, i as u64);
    }
    std::fs::write(d.join("corrupt.png"), b"\x89PNG\r\n\x1a\nthis is not really a png at all").unwrap();
    std::fs::write(d.join("empty.png"), b"").unwrap();
    write_png(d, "nocap.png", 20, 20, 9);
    let rows = [
        ("g0.png", "good zero"),
        ("corrupt.png", "corrupt bytes"),
        ("g2.png", "good two"),
        ("missing.png", "missing file"),
        ("g4.png", "good four"),
        ("empty.png", "zero bytes"),
        ("g6.png", "good six"),
        ("nocap.png", "  "),
        ("g8.png", "good eight"),
    ];
    write(d, "metadata.jsonl", &jsonl(&rows));
    vec!["corrupt.png", "missing.png", "empty.png", "nocap.png"]
}

#[test]
fn bad_samples_are_skipped_and_counted() {
    let d = tempdir();
    dataset_with_bad_samples(d.path());
    let src = image_source(d.path(), transform(16, true, false), 0);
    let (batches, stats) = all_batches(src.clone(), sequential(3, 9, OnBadSample::Skip)).unwrap();
    let indices: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(indices, [0, 2, 4, 6, 8]);
    assert_eq!(stats.skipped, 4);
    let kinds: Vec<BadKind> = batches.iter().flat_map(|b| b.skipped.iter().map(|s| s.kind)).collect();
    assert_eq!(kinds, [BadKind::Corrupt, BadKind::Missing, BadKind::Empty, BadKind::EmptyCaption]);
    // Batches are filled from the next samples: 3 then 2, never short in the middle.
    assert_eq!(batches.iter().map(|b| b.indices.len()).collect::<Vec<_>>(), [3, 2]);
    assert_eq!(batches[0].data.captions, ["good zero", "good two", "good four"]);

    // Shuffled: full batches of good samples only, across epochs, counts per pass.
    let mut l = Loader::new(src, LoaderOptions::shuffled(4, 3), Cursor::default()).unwrap();
    for _ in 0..5 {
        let b = l.next_batch().unwrap().unwrap();
        assert_eq!(b.indices.len(), 4);
        assert!(b.indices.iter().all(|i| i % 2 == 0), "{:?}", b.indices);
    }
    // 5 batches of 4 = 20 good samples = 4 epochs of 5: the first three skip all 4 bad ones,
    // the last those placed before its last good sample.
    assert!((12..=16).contains(&l.stats().skipped), "{:?}", l.stats());
}

#[test]
fn bad_samples_fail_naming_the_file() {
    let d = tempdir();
    let bad = dataset_with_bad_samples(d.path());
    let ds = Arc::new(ImageFolder::open(d.path()).unwrap());
    for (i, name) in [1, 3, 5, 7].into_iter().zip(bad) {
        // Start right before each bad sample, so each kind is the first one met.
        let src = Arc::new(ImageSource::new(ds.clone(), transform(16, true, false), 0));
        let mut l = Loader::new(src, sequential(4, 9, OnBadSample::Fail), Cursor::new(0, i as u64 - 1)).unwrap();
        let e = l.next_batch().unwrap_err().to_string();
        assert!(e.contains(name), "error {e:?} does not name {name}");
        assert!(e.contains("on_bad_sample"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// determinism

fn determinism_dataset(d: &Path, n: usize) {
    let mut rows = vec![];
    let names: Vec<String> = (0..n).map(|i| format!("{i}.png")).collect();
    for (i, name) in names.iter().enumerate() {
        if i % 5 == 3 {
            std::fs::write(d.join(name), b"garbage").unwrap();
        } else {
            write_png(d, name, 24 + (i as u32 % 3) * 7, 20 + (i as u32 % 4) * 5, i as u64);
        }
    }
    for name in &names {
        rows.push((name.as_str(), "caption"));
    }
    write(d, "metadata.jsonl", &jsonl(&rows));
}

#[test]
fn samples_are_pure_functions_of_seed_epoch_index() {
    let d = tempdir();
    determinism_dataset(d.path(), 6);
    let t = transform(16, false, true);
    let a = image_source(d.path(), t, 7);
    let b = image_source(d.path(), t, 7);
    let c = image_source(d.path(), t, 8);
    let mut epochs_differ = false;
    let mut seeds_differ = false;
    for i in [0, 1, 2, 4, 5] {
        for e in 0..4 {
            let (x, _) = a.get(i, e).unwrap();
            assert!(equal(&x, &b.get(i, e).unwrap().0), "sample {i} epoch {e} not reproducible");
            assert_eq!(x.size(), [3, 16, 16]);
            epochs_differ |= !equal(&x, &a.get(i, e + 1).unwrap().0);
            seeds_differ |= !equal(&x, &c.get(i, e).unwrap().0);
        }
    }
    assert!(epochs_differ && seeds_differ, "random crop/flip must depend on epoch and seed");
    assert!(a.get(3, 0).is_err());
}

#[test]
fn resume_from_cursor_equals_uninterrupted_run() {
    let d = tempdir();
    determinism_dataset(d.path(), 11);
    let src = image_source(d.path(), transform(16, false, true), 5);
    let opts = LoaderOptions { prefetch: 3, threads: 2, ..LoaderOptions::shuffled(4, 5) };
    // 8 batches of 4 from 9 good samples: crosses three epoch boundaries.
    let run: Vec<_> = Loader::new(src.clone(), opts, Cursor::default()).unwrap().take(8).map(|b| b.unwrap()).collect();
    assert!(run.last().unwrap().next.epoch >= 3);
    // A second run with another thread count and prefetch depth sees the same data.
    let again: Vec<_> = Loader::new(src.clone(), LoaderOptions { threads: 1, prefetch: 1, ..opts }, Cursor::default())
        .unwrap()
        .take(8)
        .map(|b| b.unwrap())
        .collect();
    for k in [1, 3, 5] {
        let resumed: Vec<_> = Loader::new(src.clone(), opts, run[k].next).unwrap().take(8 - k - 1).map(|b| b.unwrap()).collect();
        for (j, r) in resumed.iter().enumerate() {
            let u = &run[k + 1 + j];
            assert!(equal(&u.data.images, &r.data.images), "resume after batch {k}: batch {} differs", k + 1 + j);
            assert_eq!((&u.indices, &u.epochs, u.start, u.next), (&r.indices, &r.epochs, r.start, r.next));
            assert_eq!(u.skipped, r.skipped);
        }
    }
    for (u, a) in run.iter().zip(&again) {
        assert!(equal(&u.data.images, &a.data.images));
        assert_eq!(u.indices, a.indices);
    }
    // The cursor survives a round trip through JSON (as in a checkpoint's state.json).
    let c: Cursor = serde_json::from_str(&serde_json::to_string(&run[2].next).unwrap()).unwrap();
    assert_eq!(c, run[2].next);
}

// ---------------------------------------------------------------------------------------------
// synthetic dataset

#[test]
fn synth_cli_writes_a_deterministic_dataset() {
    let (a, b, c) = (tempdir(), tempdir(), tempdir());
    let (pa, pb, pc) = (a.path().join("s"), b.path().join("s"), c.path().join("s"));
    for (p, seed) in [(&pa, "3"), (&pb, "3"), (&pc, "4")] {
        let out = sdkd(&["synth", "--out", p.to_str().unwrap(), "--count", "12", "--seed", seed, "--resolution", "32"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let ds = ImageFolder::open(&pa).unwrap();
    assert_eq!(ds.len(), 12);
    let pngs = std::fs::read_dir(&pa).unwrap().filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "png").count();
    assert_eq!(pngs, 12);
    for s in &ds.samples {
        let caption = s.caption.as_deref().unwrap();
        assert!(Scene::parse(caption).is_some(), "unparseable caption {caption:?}");
        let (img, _) = ds.decode(ds.samples.iter().position(|x| x == s).unwrap()).unwrap();
        assert_eq!(img.dimensions(), (32, 32));
        assert_eq!(std::fs::read(&s.path).unwrap(), std::fs::read(pb.join(&s.file_name)).unwrap(), "{} differs", s.file_name);
    }
    let meta = |p: &Path| std::fs::read_to_string(p.join("metadata.jsonl")).unwrap();
    assert_eq!(meta(&pa), meta(&pb));
    assert_ne!(meta(&pa), meta(&pc));

    assert_clean_failure(&sdkd(&["synth", "--out", pa.to_str().unwrap(), "--count", "0"]), "--count");
    let f = a.path().join("file");
    std::fs::write(&f, "x").unwrap();
    assert_clean_failure(&sdkd(&["synth", "--out", f.to_str().unwrap(), "--count", "2"]), "file");
}

#[test]
fn synth_is_learnable_from_its_captions() {
    // A predictor that reads the caption (draws the scene it describes, without the shift) must
    // beat one that ignores it (the mean image) by far.
    let d = tempdir();
    write_dataset(d.path(), 300, 11, 32).unwrap();
    let ds = ImageFolder::open(d.path()).unwrap();
    let to_f = |img: &image::RgbImage| img.as_raw().iter().map(|&v| v as f64).collect::<Vec<_>>();
    let images: Vec<Vec<f64>> = (0..ds.len()).map(|i| to_f(&ds.decode(i).unwrap().0)).collect();
    let n = images[0].len();
    let mean: Vec<f64> = (0..n).map(|j| images.iter().map(|im| im[j]).sum::<f64>() / images.len() as f64).collect();
    let mse = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / n as f64;
    let (mut with, mut without) = (0.0, 0.0);
    for (i, im) in images.iter().enumerate() {
        let scene = Scene::parse(ds.samples[i].caption.as_deref().unwrap()).unwrap();
        with += mse(&to_f(&scene.render(32)), im);
        without += mse(&mean, im);
    }
    let ratio = with / without;
    println!("MSE reading the caption / MSE ignoring it = {ratio:.4}");
    assert!(ratio < 0.2, "captions explain too little: ratio {ratio}");
}

// ---------------------------------------------------------------------------------------------
// latent cache

/// A trivial deterministic encoder: 4x4 average pooling (plus a 4th channel, the channel mean)
/// as latent mean, |mean| / 10 + 0.01 as std, caption bytes as an (8, 4) embedding. Counts the
/// samples it encodes and can be told to fail after some calls.
struct ToyEncoder {
    samples: Cell<usize>,
    calls: Cell<usize>,
    fail_after_calls: Option<usize>,
    name: &'static str,
}

impl ToyEncoder {
    fn new() -> Self {
        ToyEncoder { samples: Cell::new(0), calls: Cell::new(0), fail_after_calls: None, name: "toy" }
    }
    fn failing_after(calls: usize) -> Self {
        ToyEncoder { fail_after_calls: Some(calls), ..Self::new() }
    }
}

fn caption_embedding(caption: &str) -> Tensor {
    let mut v = [0f32; 32];
    for (i, b) in caption.bytes().take(32).enumerate() {
        v[i] = b as f32 / 255.0;
    }
    Tensor::from_slice(&v).view([8, 4])
}

impl SampleEncoder for ToyEncoder {
    fn encode(&self, images: &Tensor, captions: &[String]) -> anyhow::Result<Encoded> {
        if self.fail_after_calls.is_some_and(|n| self.calls.get() >= n) {
            anyhow::bail!("simulated crash");
        }
        self.calls.set(self.calls.get() + 1);
        self.samples.set(self.samples.get() + captions.len());
        let pooled = images.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None::<i64>);
        let mean = Tensor::cat(&[&pooled, &pooled.mean_dim(&[1i64][..], true, Kind::Float)], 1);
        let std = mean.abs() / 10.0 + 0.01;
        let text = Tensor::stack(&captions.iter().map(|c| caption_embedding(c)).collect::<Vec<_>>(), 0);
        Ok(Encoded { latent_mean: mean, latent_std: std, text_embeddings: text, pooled_embeddings: None })
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"encoder": self.name})
    }
}

fn cache_opts(res: u32) -> CacheOptions {
    CacheOptions {
        transform: transform(res, false, true),
        buckets: None,
        seed: 21,
        shard_size: 8,
        batch_size: 3,
        on_bad_sample: OnBadSample::Skip,
        threads: 2,
    }
}

/// A synthetic dataset of `n` with two corrupt files (indices 5 and 12).
fn cache_dataset(d: &Path, n: usize) -> Arc<ImageFolder> {
    write_dataset(d, n, 2, 24).unwrap();
    std::fs::write(d.join("000005.png"), b"broken").unwrap();
    std::fs::write(d.join("000012.png"), b"").unwrap();
    Arc::new(ImageFolder::open(d).unwrap())
}

fn cache_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files.iter().flat_map(|f| sdkd::models::weights::read_all(f).unwrap()).collect()
}

#[test]
fn cache_round_trip_equals_direct_encoding() {
    let (d, out) = (tempdir(), tempdir());
    let ds = cache_dataset(d.path(), 20);
    let enc = ToyEncoder::new();
    let opts = cache_opts(16);
    let report = build_cache(ds.clone(), &enc, &out.path().join("c"), &opts).unwrap();
    assert_eq!(report, CacheReport { shards: 3, shards_kept: 0, shards_written: 3, rows: 18, skipped: 2 });
    assert_eq!(enc.samples.get(), 18);

    let cache = Arc::new(LatentCache::open(&out.path().join("c")).unwrap());
    assert_eq!(cache.len(), 18);
    assert_eq!(cache.row_shapes(), (vec![4, 4, 4], vec![8, 4]));
    let (batches, _) = all_batches(cache.clone(), sequential(5, 18, OnBadSample::Fail)).unwrap();
    let source = ImageSource::new(ds.clone(), opts.transform, opts.seed);
    let mut seen = vec![];
    for b in &batches {
        for (r, &id) in b.data.sample_ids.iter().enumerate() {
            // Direct encoding of the same sample, as epoch 0 transforms it.
            let (img, caption) = source.get(id as usize, 0).unwrap();
            let direct = enc.encode(&img.unsqueeze(0), std::slice::from_ref(&caption)).unwrap();
            assert!(equal(&b.data.latent_mean.get(r as i64), &direct.latent_mean.get(0)), "row {id} latent_mean");
            assert!(equal(&b.data.latent_std.get(r as i64), &direct.latent_std.get(0)), "row {id} latent_std");
            assert!(equal(&b.data.text_embeddings.get(r as i64), &direct.text_embeddings.get(0)), "row {id} text");
            let ids: Vec<i64> = Vec::try_from(b.data.time_ids.as_ref().expect("a version 2 cache has time ids").get(r as i64)).unwrap();
            assert_eq!(ids, source.load(id as usize, 0).unwrap().time_ids, "row {id} time ids");
            assert_eq!(b.data.captions[r], caption);
            seen.push(id);
        }
    }
    assert_eq!(seen, (0..20).filter(|i| *i != 5 && *i != 12).collect::<Vec<i64>>());

    // Reading shuffled: deterministic, resumable, one epoch covers every row once.
    let lo = LoaderOptions::shuffled(4, 99);
    let run: Vec<_> = Loader::new(cache.clone(), lo, Cursor::default()).unwrap().take(6).map(|b| b.unwrap()).collect();
    let mut first_epoch: Vec<i64> = run.iter().flat_map(|b| b.data.sample_ids.clone()).take(18).collect();
    first_epoch.sort();
    assert_eq!(first_epoch, seen);
    let resumed: Vec<_> = Loader::new(cache, lo, run[2].next).unwrap().take(3).map(|b| b.unwrap()).collect();
    for (u, r) in run[3..].iter().zip(&resumed) {
        assert!(equal(&u.data.latent_mean, &r.data.latent_mean) && equal(&u.data.text_embeddings, &r.data.text_embeddings));
        assert_eq!(u.data.sample_ids, r.data.sample_ids);
    }
    version_1_cache_still_loads(&out.path().join("c"), ds, &enc, &opts);
}

/// The cache of `dir` rewritten as sdkd wrote it before SDXL (version 1: no time ids): it loads
/// with the same rows and no time ids, and `build_cache` refuses to add version 2 shards to it.
fn version_1_cache_still_loads(dir: &Path, ds: Arc<ImageFolder>, enc: &ToyEncoder, opts: &CacheOptions) {
    let index_file = dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_file).unwrap()).unwrap();
    index["version"] = 1.into();
    std::fs::write(&index_file, serde_json::to_string(&index).unwrap()).unwrap();
    for e in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "safetensors")) {
        let meta = sdkd::models::weights::MappedFile::open(&e).unwrap().metadata().unwrap();
        let tensors: Vec<(String, Tensor)> = sdkd::models::weights::read_all(&e).unwrap().into_iter().filter(|(n, _)| n != "time_ids").collect();
        sdkd::models::weights::save_with_metadata(&e, &tensors, None, &meta.into_iter().filter(|(k, _)| k != "format").collect()).unwrap();
    }
    let old = LatentCache::open(dir).unwrap();
    assert_eq!((old.index.version, old.len(), old.has_time_ids()), (1, 18, false));
    let b = old.gather(&[0, 17]).unwrap();
    assert!(b.time_ids.is_none() && b.pooled_embeddings.is_none());
    let err = build_cache(ds, enc, dir, opts).unwrap_err().to_string();
    assert!(err.contains("format version 1"), "{err}");
}

#[test]
fn cache_resume_keeps_finished_shards() {
    let (d, out, fresh) = (tempdir(), tempdir(), tempdir());
    let ds = cache_dataset(d.path(), 30); // 4 shards of 8, 8, 8, 6
    let dir = out.path().join("c");
    let opts = cache_opts(16);

    // Shard 0 takes 3 encoder calls (7 good samples), shard 1 three more: crash inside shard 2.
    let crashing = ToyEncoder::failing_after(7);
    let e = build_cache(ds.clone(), &crashing, &dir, &opts).unwrap_err();
    assert!(e.to_string().contains("simulated crash"), "{e}");
    let index = CacheIndex::read(&dir).unwrap();
    assert!(!index.complete);
    assert_eq!(index.shards.iter().map(|s| s.start).collect::<Vec<_>>(), [0, 8]);
    let e = LatentCache::open(&dir).err().expect("an incomplete cache must not open").to_string();
    assert!(e.contains("incomplete (2 of 4 shards)"), "{e}");

    // Debris of the crash: a half-written shard 2 and a temp file; both must be redone.
    std::fs::write(dir.join("shard-00002.safetensors"), b"half written").unwrap();
    // what a writer killed mid-shard leaves: fs_safe's hidden temp file, of a process that is gone
    std::fs::write(dir.join(".shard-00002.safetensors.tmp-4194999"), b"half written").unwrap();
    let kept_bytes = |k: usize| std::fs::read(dir.join(format!("shard-{k:05}.safetensors"))).unwrap();
    let mtime = |k: usize| std::fs::metadata(dir.join(format!("shard-{k:05}.safetensors"))).unwrap().modified().unwrap();
    let before = [(kept_bytes(0), mtime(0)), (kept_bytes(1), mtime(1))];

    // Settings that differ are refused, naming the key.
    let e = build_cache(ds.clone(), &ToyEncoder::new(), &dir, &cache_opts(8)).unwrap_err().to_string();
    assert!(e.contains("transform"), "{e}");
    let other = ToyEncoder { name: "other", ..ToyEncoder::new() };
    let e = build_cache(ds.clone(), &other, &dir, &opts).unwrap_err().to_string();
    assert!(e.contains("encoder"), "{e}");

    let resume = ToyEncoder::new();
    let report = build_cache(ds.clone(), &resume, &dir, &opts).unwrap();
    assert_eq!((report.shards_kept, report.shards_written, report.rows, report.skipped), (2, 2, 28, 2));
    // Only shards 2 and 3 were encoded (8 + 6 samples, none bad).
    assert_eq!(resume.samples.get(), 14);
    assert_eq!([(kept_bytes(0), mtime(0)), (kept_bytes(1), mtime(1))], before);
    assert!(!dir.join(".shard-00002.safetensors.tmp-4194999").exists(), "the temp file is removed");

    // The resumed cache equals one built in one go.
    let full = ToyEncoder::new();
    build_cache(ds.clone(), &full, &fresh.path().join("c"), &opts).unwrap();
    let (a, b) = (cache_tensors(&dir), cache_tensors(&fresh.path().join("c")));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(equal(ta, tb), "{na} differs between resumed and fresh caches");
    }
    let (ia, ib) = (CacheIndex::read(&dir).unwrap(), CacheIndex::read(&fresh.path().join("c")).unwrap());
    assert_eq!(ia.shards, ib.shards);

    // Running once more keeps everything and encodes nothing.
    let idle = ToyEncoder::new();
    let report = build_cache(ds, &idle, &dir, &opts).unwrap();
    assert_eq!((report.shards_kept, report.shards_written, idle.samples.get()), (4, 0, 0));

    // A recorded shard that was damaged later (truncated: header intact, data short) is redone.
    let len = std::fs::metadata(dir.join("shard-00001.safetensors")).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(dir.join("shard-00001.safetensors")).unwrap().set_len(len - 100).unwrap();
    let fix = ToyEncoder::new();
    let ds = Arc::new(ImageFolder::open(d.path()).unwrap());
    let report = build_cache(ds, &fix, &dir, &opts).unwrap();
    assert_eq!((report.shards_kept, report.shards_written, fix.samples.get()), (3, 1, 7));
    assert_eq!(kept_bytes(1), before[1].0);
}

#[test]
fn cache_refuses_foreign_folders_and_changed_datasets() {
    let (d, out) = (tempdir(), tempdir());
    let ds = cache_dataset(d.path(), 10);
    write(out.path(), "notes.txt", "mine");
    let e = build_cache(ds.clone(), &ToyEncoder::new(), out.path(), &cache_opts(16)).unwrap_err().to_string();
    assert!(e.contains("not a latent cache"), "{e}");
    let dir = out.path().join("c");
    // A crash in the very first shard leaves a cache that can be resumed.
    assert!(build_cache(ds.clone(), &ToyEncoder::failing_after(0), &dir, &cache_opts(16)).is_err());
    assert_eq!(CacheIndex::read(&dir).unwrap().shards, vec![]);
    build_cache(ds, &ToyEncoder::new(), &dir, &cache_opts(16)).unwrap();
    // Another caption in the dataset: the fingerprint no longer matches.
    let meta = std::fs::read_to_string(d.path().join("metadata.jsonl")).unwrap().replacen("\"text\":\"", "\"text\":\"changed ", 1);
    write(d.path(), "metadata.jsonl", &meta);
    let ds = Arc::new(ImageFolder::open(d.path()).unwrap());
    let e = build_cache(ds, &ToyEncoder::new(), &dir, &cache_opts(16)).unwrap_err().to_string();
    assert!(e.contains("fingerprint"), "{e}");
}

#[test]
fn prefetch_keeps_a_slower_consumer_from_waiting() {
    let d = tempdir();
    write_dataset(d.path(), 64, 0, 32).unwrap();
    let src = image_source(d.path(), transform(32, false, true), 0);
    let opts = LoaderOptions { prefetch: 2, threads: 1, ..LoaderOptions::shuffled(8, 0) };
    let mut l = Loader::new(src, opts, Cursor::default()).unwrap();
    l.next_batch().unwrap();
    let after_first = l.stats().wait;
    for _ in 0..8 {
        // A "training step" far slower than decoding 8 tiny PNGs.
        std::thread::sleep(std::time::Duration::from_millis(40));
        l.next_batch().unwrap();
    }
    let waited = l.stats().wait - after_first;
    println!("waited {waited:?} over 8 steps");
    assert!(waited < std::time::Duration::from_millis(40), "the consumer waited {waited:?} for ready batches");
}

#[test]
fn preprocess_command_builds_and_resumes_a_cache() {
    use sdkd::commands::preprocess::{run_with, PreprocessArgs};
    let (d, out) = (tempdir(), tempdir());
    cache_dataset(d.path(), 12);
    let mut args = PreprocessArgs {
        teacher: "unused-by-the-toy-encoder".into(),
        data: d.path().to_string_lossy().into_owned(),
        format: None,
        caption: None,
        image_column: None,
        min_size: None,
        max_aspect: None,
        filters: vec![],
        resolution: 16,
        buckets: None,
        out: out.path().join("c"),
        center_crop: true,
        random_flip: false,
        seed: 0,
        shard_size: 5,
        batch_size: 4,
        on_bad_sample: OnBadSample::Skip,
        threads: 1,
    };
    let enc = ToyEncoder::new();
    run_with(&args, &enc).unwrap();
    assert_eq!(enc.samples.get(), 11); // 12 samples, 000005.png corrupt
    let again = ToyEncoder::new();
    run_with(&args, &again).unwrap();
    assert_eq!(again.samples.get(), 0, "a finished cache is kept whole");
    assert_eq!(LatentCache::open(&args.out).unwrap().len(), 11);

    args.on_bad_sample = OnBadSample::Fail;
    args.out = out.path().join("strict");
    let e = run_with(&args, &ToyEncoder::new()).unwrap_err().to_string();
    assert!(e.contains("000005.png"), "{e}");
    args.resolution = 12;
    let e = run_with(&args, &ToyEncoder::new()).unwrap_err().to_string();
    assert!(e.contains("--resolution 12"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// aspect-ratio buckets (data.buckets)

/// The buckets of the bucket tests: square, wide and tall, (width, height).
const BUCKETS: [(u32, u32); 3] = [(32, 32), (48, 16), (16, 48)];
/// Nine images of mixed aspect, three per bucket, then a corrupt one (its size cannot be read).
const BUCKET_IMAGES: [(u32, u32); 9] = [(40, 30), (20, 50), (64, 20), (30, 30), (17, 61), (50, 20), (36, 28), (24, 72), (45, 15)];

fn bucket_dataset(d: &Path) -> Arc<ImageFolder> {
    let mut rows = vec![];
    for (i, &(w, h)) in BUCKET_IMAGES.iter().enumerate() {
        write_png(d, &format!("{i}.png"), w, h, i as u64);
        rows.push((format!("{i}.png"), format!("picture {i}")));
    }
    std::fs::write(d.join("9.png"), b"not a png").unwrap();
    rows.push(("9.png".into(), "broken".into()));
    let r: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write(d, "metadata.jsonl", &jsonl(&r));
    Arc::new(ImageFolder::open(d).unwrap())
}

/// What sample `i` must become, computed here from the image's size alone: its bucket (the
/// least |log(w/h) - log(bw/bh)|; no ties among these), the size it is resized to (the bucket's
/// fitting side exact, the other int(side * long / short)), the centre crop (Python's round,
/// halves to even) and the time ids (original (h, w), crop (top, left) with a flip storing
/// width - left as diffusers' SDXL script does, target (h, w)).
struct Expected {
    bucket: usize,
    resized: (u32, u32),
    crop: (u32, u32),
    time_ids: [i64; 6],
}

fn expected(i: usize, flip: bool) -> Expected {
    let (w, h) = BUCKET_IMAGES[i];
    let dist = |&(bw, bh): &(u32, u32)| ((w as f64 / h as f64).ln() - (bw as f64 / bh as f64).ln()).abs();
    let bucket = (0..3).min_by(|&a, &b| dist(&BUCKETS[a]).partial_cmp(&dist(&BUCKETS[b])).unwrap()).unwrap();
    let (tw, th) = BUCKETS[bucket];
    let resized = if w * th >= h * tw { (th * w / h, th) } else { (tw, tw * h / w) };
    let half = |span: u32| if span % 2 == 0 || (span / 2) % 2 == 0 { span / 2 } else { span / 2 + 1 };
    let (left, top) = (half(resized.0 - tw), half(resized.1 - th));
    let x = if flip { tw - left } else { left };
    Expected { bucket, resized, crop: (left, top), time_ids: [h as i64, w as i64, top as i64, x as i64, th as i64, tw as i64] }
}

fn flips(seed: u64, epoch: u64, i: usize) -> bool {
    sdkd::data::order::hash(seed, sdkd::data::order::Stream::Flip, epoch, i as u64) >> 63 == 1
}

/// `data.buckets`: every image goes to its nearest bucket and is resized, centre-cropped and
/// flipped to it with the time ids computed above; shuffled micro-batches hold one bucket and
/// resume exactly; `preprocess`'s bucketed cache (version 3) stores each row's latents at its
/// bucket's size with its time ids, and its shuffled batches keep to one bucket too.
#[test]
fn buckets_place_crop_and_batch_each_sample() {
    let (d, out) = (tempdir(), tempdir());
    let ds = bucket_dataset(d.path());
    let buckets = Buckets::new(BUCKETS.to_vec()).unwrap();
    let seed = 13;
    let (src, unsizable) = ImageSource::new(ds.clone(), transform(32, true, true), seed).with_buckets(buckets.clone(), OnBadSample::Skip).unwrap();
    assert_eq!(unsizable.iter().map(|b| b.index).collect::<Vec<_>>(), vec![9]);
    let mut per_bucket = [0; 3];
    for (i, &(w, h)) in BUCKET_IMAGES.iter().enumerate() {
        for epoch in 0..3 {
            let flip = flips(seed, epoch, i);
            let e = expected(i, flip);
            assert_eq!(src.bucket_of().unwrap()[i], Some(e.bucket as u32), "image {i} ({w}x{h})");
            let item = src.load(i, epoch).unwrap();
            assert_eq!((item.size, item.time_ids), (BUCKETS[e.bucket], e.time_ids), "image {i} ({w}x{h}) epoch {epoch}");
            let img = image::open(d.path().join(format!("{i}.png"))).unwrap().to_rgb8();
            let pixels = sdkd::data::transform::resize_crop(&img, e.resized, e.crop, BUCKETS[e.bucket], flip);
            assert!(item.pixels == pixels, "image {i} epoch {epoch}: pixels");
        }
        per_bucket[expected(i, false).bucket] += 1;
    }
    assert_eq!(per_bucket, [3, 3, 3], "each bucket is used");
    assert!(ImageSource::new(ds.clone(), transform(32, true, true), seed).with_buckets(buckets.clone(), OnBadSample::Fail).err().unwrap().to_string().contains("9.png"));

    // shuffled micro-batches of 2: one bucket each (3 per epoch, one sample of each bucket left out)
    let src = Arc::new(src);
    let lo = LoaderOptions { batch_size: 2, order: Order::Shuffled { seed }, on_bad_sample: OnBadSample::Skip, prefetch: 2, threads: 2 };
    let run: Vec<_> = Loader::new(src.clone(), lo, Cursor::default()).unwrap().take(9).map(|b| b.unwrap()).collect();
    for (k, b) in run.iter().enumerate() {
        let e: Vec<Expected> = b.indices.iter().zip(&b.epochs).map(|(&i, &ep)| expected(i, flips(seed, ep, i))).collect();
        let (tw, th) = BUCKETS[e[0].bucket];
        assert!(e.iter().all(|x| x.bucket == e[0].bucket), "batch {k} mixes buckets: {:?}", b.indices);
        assert_eq!(b.data.images.size(), vec![2, 3, th as i64, tw as i64], "batch {k}");
        let ids: Vec<i64> = Vec::try_from(b.data.time_ids.flatten(0, -1)).unwrap();
        assert_eq!(ids, e.iter().flat_map(|x| x.time_ids).collect::<Vec<_>>(), "batch {k}");
    }
    assert_eq!(run[2].next, Cursor::new(1, 0));
    let resumed: Vec<_> = Loader::new(src.clone(), lo, run[4].next).unwrap().take(4).map(|b| b.unwrap()).collect();
    for (a, b) in run[5..].iter().zip(&resumed) {
        assert!(a.indices == b.indices && equal(&a.data.images, &b.data.images), "resumed batch differs");
    }

    // the bucketed cache: centre crops, no flip (preprocess's defaults), batches of 2
    let opts = CacheOptions { transform: transform(32, true, false), buckets: Some(buckets.clone()), seed: 3, shard_size: 6, batch_size: 2, on_bad_sample: OnBadSample::Skip, threads: 2 };
    let enc = ToyEncoder::new();
    let report = build_cache(ds.clone(), &enc, &out.path().join("c"), &opts).unwrap();
    assert_eq!((report.rows, report.skipped), (9, 1));
    let cache = Arc::new(LatentCache::open(&out.path().join("c")).unwrap());
    assert_eq!((cache.index.version, cache.len()), (3, 9));
    let plain = ImageSource::new(ds.clone(), opts.transform, opts.seed).with_buckets(buckets.clone(), OnBadSample::Skip).unwrap().0;
    for row in 0..9 {
        let b = cache.gather(&[row]).unwrap();
        let id = b.sample_ids[0] as usize;
        let e = expected(id, false);
        let (tw, th) = BUCKETS[e.bucket];
        let (img, caption) = plain.get(id, 0).unwrap();
        let direct = enc.encode(&img.unsqueeze(0), &[caption]).unwrap();
        assert_eq!(b.latent_mean.size(), vec![1, 4, th as i64 / 4, tw as i64 / 4], "row {row} (image {id})");
        assert!(equal(&b.latent_mean, &direct.latent_mean) && equal(&b.latent_std, &direct.latent_std), "row {row} latents");
        assert_eq!(Vec::<i64>::try_from(b.time_ids.unwrap().flatten(0, -1)).unwrap(), e.time_ids.to_vec(), "row {row} time ids");
    }
    let from_cache: Vec<_> = Loader::new(cache.clone(), lo, Cursor::default()).unwrap().take(6).map(|b| b.unwrap()).collect();
    for b in &from_cache {
        let e: Vec<usize> = b.data.sample_ids.iter().map(|&i| expected(i as usize, false).bucket).collect();
        assert!(e[0] == e[1], "a cache batch mixes buckets: {:?}", b.data.sample_ids);
    }
    // other buckets on the same folder: refused by name
    let other = CacheOptions { buckets: Some(Buckets::new(vec![(32, 32)]).unwrap()), ..opts };
    let err = build_cache(ds, &enc, &out.path().join("c"), &other).unwrap_err().to_string();
    assert!(err.contains("buckets"), "{err}");
}
