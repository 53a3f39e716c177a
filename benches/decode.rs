//! Decode throughput of the image loader (images/s): read, decode, resize, crop, flip and
//! collate, through the prefetching `Loader` with a consumer that does nothing.
//!
//! `cargo bench --bench decode` measures two made-up datasets: LAION-like 768x576 JPEGs at
//! resolution 512 (BK-SDM's setting) and the 64 px synthetic PNGs of the demo.
//! `cargo bench --bench decode -- --data <imagefolder, shard folder, pattern or list>
//! [--resolution 512] [--batch-size 16] [--samples 512] [--threads 0]` measures a real dataset
//! in any format (`scripts/bench_loader.py` runs it on webdataset shards against PyTorch).
use sdkd::data::order::splitmix64;
use sdkd::data::synthetic::{write_dataset, Scene};
use sdkd::data::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `n` photo-sized JPEGs: synthetic scenes with per-pixel noise, so the codec works as on photos.
fn jpeg_dataset(dir: &Path, n: usize) {
    let mut meta = String::new();
    for i in 0..n {
        let scene = Scene::sample(0, i);
        let base = scene.render(768);
        let img = image::RgbImage::from_fn(768, 576, |x, y| {
            let p = base.get_pixel(x, y + 96).0;
            let h = splitmix64(((i as u64) << 40) ^ ((y as u64) << 20) ^ x as u64);
            let j = |c: usize, s: u32| (p[c] as i32 + ((h >> s) & 31) as i32 - 16).clamp(0, 255) as u8;
            image::Rgb([j(0, 0), j(1, 8), j(2, 16)])
        });
        let name = format!("{i:05}.jpg");
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(&name)).unwrap());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut f, 90).encode_image(&img).unwrap();
        meta += &format!("{}\n", serde_json::json!({"file_name": name, "text": scene.caption()}));
    }
    std::fs::write(dir.join("metadata.jsonl"), meta).unwrap();
}

fn measure(label: &str, dir: &Path, res: u32, batch: usize, samples: usize, threads: usize) {
    let opened = std::time::Instant::now();
    let ds = open_image_rows(&dir.to_string_lossy(), "--data", &DataOptions::default()).expect("opening the dataset");
    println!("opened {} ({} samples) in {:.3}s", ds.describe(), ds.len(), opened.elapsed().as_secs_f64());
    let t = Transform { resolution: res, center_crop: false, random_flip: true };
    let src = Arc::new(ImageSource::new(ds, t, 0));
    let opts = LoaderOptions { threads, prefetch: 4, ..LoaderOptions::shuffled(batch, 0) };
    // Warm the page cache once so the number is decode speed, not first-read disk speed.
    measure_throughput(src.clone(), opts, batch).unwrap();
    let r = measure_throughput(src, opts, samples).unwrap();
    let cores = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
    println!(
        "{label}: {:.1} images/s ({} images in {:.2}s, batch {batch}, {res}px, {cores} decode thread(s))",
        r.per_second, r.samples, r.seconds
    );
}

/// Single-thread time per image of each stage, to see where decode time goes.
fn breakdown(dir: &Path, res: u32) {
    let ds = ImageFolder::open(dir).unwrap();
    let t = Transform { resolution: res, center_crop: true, random_flip: false };
    let n = ds.len().min(32);
    let (mut dec, mut tr, mut col) = (0f64, 0f64, 0f64);
    for i in 0..n {
        let t0 = std::time::Instant::now();
        let (img, _) = ds.decode(i).unwrap();
        let t1 = std::time::Instant::now();
        let aug = t.augment(0, 0, i, t.resized_size(img.width(), img.height()));
        let px = t.apply(&img, aug);
        let t2 = std::time::Instant::now();
        let _ = sdkd::data::transform::to_tensor(&px, 1, res as usize);
        dec += (t1 - t0).as_secs_f64();
        tr += (t2 - t1).as_secs_f64();
        col += t2.elapsed().as_secs_f64();
    }
    let ms = |s: f64| 1e3 * s / n as f64;
    println!("  per image, one thread: read+decode {:.2} ms, resize+crop+flip {:.2} ms, to tensor {:.2} ms", ms(dec), ms(tr), ms(col));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (batch, threads) = (arg(&args, "--batch-size", 16usize), arg(&args, "--threads", 0usize));
    if let Some(data) = args.iter().position(|a| a == "--data").and_then(|i| args.get(i + 1)) {
        let res = arg(&args, "--resolution", 512u32);
        measure(data, &PathBuf::from(data), res, batch, arg(&args, "--samples", 512usize), threads);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let jpegs = tmp.path().join("jpeg");
    std::fs::create_dir_all(&jpegs).unwrap();
    jpeg_dataset(&jpegs, 96);
    let synth = tmp.path().join("synth");
    write_dataset(&synth, 512, 0, 64).unwrap();
    breakdown(&jpegs, 512);
    for t in [threads, 1] {
        measure("768x576 JPEG -> 512", &jpegs, 512, batch, arg(&args, "--samples", 384usize), t);
        measure("64px synthetic PNG -> 64", &synth, 64, 64, 8192, t);
    }
}
