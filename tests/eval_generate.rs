//! `sdkd eval --model`: generation by BK-SDM's protocol on the tiny pipeline of
//! tests/reference/make_pipeline.py (PNDM, 3 steps, 32 px) scored with a random-weight Inception
//! (tests/reference/eval_reference.py --weights-only), each scored at 256² (BK-SDM's bicubic
//! copies, equal to Pillow's): batch 1 and batch 4 give byte-identical
//! images and equal metrics, consecutive seeding gives diffusers' images from one generator drawn
//! for the whole run (tests/reference/eval_generate_reference.py), per-image seeding gives `sdkd
//! generate --seed seed+k`, an interrupted run resumed equals an uninterrupted one, other settings
//! in the same --out are refused with nothing touched, and `--compare` tabulates reports.
mod common;

use common::{assert_clean_failure, run_reference, sdkd, tempdir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const COUNT: usize = 10;
const STEPS: &str = "3";
const RES: &str = "32";

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pipeline: PathBuf,
    inception: PathBuf,
    prompts: PathBuf,
    real: PathBuf,
}

fn prompts() -> Vec<String> {
    let subjects = ["a red cube", "a toy panda, sitting", "two green spheres", "a \"quoted\" lamp"];
    let places = ["on a blue floor", "at dusk", "in the snow"];
    (0..COUNT).map(|k| format!("{} {}", subjects[k % 4], places[k / 4])).collect()
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempdir();
        let root = dir.path().to_path_buf();
        let pipeline = root.join("sd");
        let net = root.join("net");
        std::thread::scope(|s| {
            s.spawn(|| run_reference("make_pipeline.py", &[pipeline.to_str().unwrap()]));
            s.spawn(|| run_reference("eval_reference.py", &[net.to_str().unwrap(), "--weights-only"]));
        });
        // a metadata.csv with quoting (commas and quotes inside captions)
        let mut csv = "file_name,text\n".to_string();
        for (k, p) in prompts().iter().enumerate() {
            csv += &format!("{k}.jpg,\"{}\"\n", p.replace('"', "\"\""));
        }
        let prompts = root.join("metadata.csv");
        std::fs::write(&prompts, csv).unwrap();
        // "real" images: smooth random colour fields
        let real = root.join("real");
        std::fs::create_dir(&real).unwrap();
        let mut x = 12345u32;
        for i in 0..COUNT {
            let mut img = image::RgbImage::new(32, 32);
            let base: Vec<u8> = (0..3).map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                (x >> 24) as u8
            }).collect();
            for (px, py, p) in img.enumerate_pixels_mut() {
                *p = image::Rgb([base[0].wrapping_add(px as u8 * 3), base[1].wrapping_add(py as u8 * 5), base[2]]);
            }
            img.save(real.join(format!("{i:03}.png"))).unwrap();
        }
        Fixture { pipeline, inception: root.join("net/inception.pth"), prompts, real, root, _dir: dir }
    })
}

/// `sdkd eval --model ...` into `out` with `extra` flags; asserts success, returns stderr.
fn eval(out: &Path, extra: &[&str]) -> String {
    let f = fixture();
    let mut args = vec!["eval", "--model", f.pipeline.to_str().unwrap(), "--prompts", f.prompts.to_str().unwrap(),
        "--real", f.real.to_str().unwrap(), "--inception", f.inception.to_str().unwrap(), "--dims", "64", "--steps", STEPS, "--resolution", RES, "--device", "cpu", "--out", out.to_str().unwrap()];
    if !extra.contains(&"--metrics") {
        args.extend(["--metrics", "fid,is"]);
    }
    args.extend_from_slice(extra);
    let t = std::time::Instant::now();
    let o = sdkd(&args);
    println!("sdkd eval {extra:?}: {:.1} s", t.elapsed().as_secs_f64());
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "sdkd eval {extra:?} failed:\n{stderr}");
    stderr
}

fn report(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

fn image_bytes(out: &Path, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|k| std::fs::read(out.join(format!("images/{k:06}.png"))).unwrap()).collect()
}

fn metrics(r: &Value) -> [f64; 3] {
    ["fid", "is_mean", "is_std"].map(|k| r[k].as_f64().unwrap_or_else(|| panic!("no {k} in {r}")))
}

/// Batch 1, made once (the reference run the other tests compare with).
fn batch1() -> &'static Path {
    static OUT: OnceLock<PathBuf> = OnceLock::new();
    OUT.get_or_init(|| {
        let out = fixture().root.join("batch1");
        eval(&out, &["--batch-size", "1"]);
        out
    })
}

#[test]
fn batch_size_changes_no_image_and_no_metric() {
    let f = fixture();
    let out4 = f.root.join("batch4");
    eval(&out4, &["--batch-size", "4"]);
    let (a, b) = (image_bytes(batch1(), COUNT), image_bytes(&out4, COUNT));
    for k in 0..COUNT {
        assert!(a[k] == b[k], "image {k}: batch 1 and batch 4 differ");
    }
    assert_ne!(a[0], a[1], "different prompts and draws gave the same image");
    let (r1, r4) = (report(batch1()), report(&out4));
    println!("batch 1: {:?}, batch 4: {:?}", metrics(&r1), metrics(&r4));
    assert_eq!(metrics(&r1), metrics(&r4));
    assert_eq!(r1["count"], COUNT);
    // 10 images < 2 x 64 dims: said, and FID reported anyway
    assert!(r1["warnings"][0].as_str().is_some_and(|w| w.contains("unreliable")), "{r1}");
    assert!(r1["unet_params"].as_i64().unwrap() > 1000, "{r1}");
    assert!(r1["seconds_per_image"].as_f64().unwrap() > 0.0, "{r1}");
    for (k, v) in [("scheduler", "pndm"), ("seeding", "consecutive"), ("dtype", "fp32")] {
        assert_eq!(r1["settings"][k], v, "settings.{k}");
    }
    assert_eq!(r4["settings"]["batch_size"], 4);
    assert_eq!(r1["settings"]["seed"], 1234);
    let md = std::fs::read_to_string(out4.join("report.md")).unwrap();
    assert!(md.contains("| CLIP score |") && md.contains("| — |"), "{md}");
    // the caption sidecar pairs every image with its prompt, in the form --prompts reads
    let side = std::fs::read_to_string(out4.join("images/captions.jsonl")).unwrap();
    let lines: Vec<Value> = side.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), COUNT);
    assert_eq!(lines[3]["file_name"], "000003.png");
    assert_eq!(lines[3]["text"], prompts()[3]);
}

#[test]
fn consecutive_seeding_gives_diffusers_images_from_one_generator() {
    let f = fixture();
    let n = 4;
    let list = f.root.join("prompts4.json");
    std::fs::write(&list, serde_json::to_string(&prompts()[..n]).unwrap()).unwrap();
    let theirs = f.root.join("diffusers");
    run_reference("eval_generate_reference.py", &[f.pipeline.to_str().unwrap(), list.to_str().unwrap(),
        theirs.to_str().unwrap(), "1234", STEPS, RES]);
    let randn: Value = serde_json::from_str(&std::fs::read_to_string(theirs.join("randn.json")).unwrap()).unwrap();
    println!("torch: randn (3, 4, h, w) == 3 consecutive (1, 4, h, w) draws: {randn}");
    for (size, equal) in [("64x64", true), ("16x16", true), ("8x8", true), ("1x1", true), ("3x3", false), ("5x7", false)] {
        assert_eq!(randn[size], equal, "{size}");
    }
    for k in 0..n {
        let ours = image::open(batch1().join(format!("images/{k:06}.png"))).unwrap().to_rgb8();
        let want = image::open(theirs.join(format!("{k:06}.png"))).unwrap().to_rgb8();
        let differing = ours.pixels().zip(want.pixels()).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "image {k}: {differing} pixels differ from diffusers' consecutive draw");
        // and the copy scored, resized to 256² as BK-SDM does, is Pillow's
        let ours = image::open(batch1().join(format!("images_256/{k:06}.png"))).unwrap().to_rgb8();
        let want = image::open(theirs.join(format!("256/{k:06}.png"))).unwrap().to_rgb8();
        assert!(ours == want, "image {k}: the 256² copy differs from Pillow's BICUBIC resize");
    }
}

#[test]
fn per_image_seeding_is_sdkd_generate_with_seed_plus_index() {
    let f = fixture();
    let out = f.root.join("per-image");
    eval(&out, &["--seeding", "per-image", "--count", "3", "--batch-size", "3", "--metrics", "fid"]);
    let png = f.root.join("gen2.png");
    let o = sdkd(&["generate", "--model", f.pipeline.to_str().unwrap(), "--prompt", &prompts()[2], "--scheduler", "pndm",
        "--steps", STEPS, "--seed", "1236", "--width", RES, "--height", RES, "--out", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ours, want) = (image::open(out.join("images/000002.png")).unwrap().to_rgb8(), image::open(&png).unwrap().to_rgb8());
    assert!(ours == want, "per-image seeding: image 2 is not `sdkd generate --seed 1236`");
    assert!(report(&out).get("is_mean").is_none());
    // consecutive with a sampler that draws step noise is refused, nothing made
    let o = sdkd(&["eval", "--model", f.pipeline.to_str().unwrap(), "--prompts", f.prompts.to_str().unwrap(),
        "--scheduler", "euler_a", "--metrics", "is", "--inception", f.inception.to_str().unwrap(),
        "--out", f.root.join("ea").to_str().unwrap()]);
    assert_clean_failure(&o, "--seeding per-image");
    assert!(!f.root.join("ea").exists());
    // an unreadable Inception file fails before anything is generated
    let junk = f.root.join("junk.pth");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let o = sdkd(&["eval", "--model", f.pipeline.to_str().unwrap(), "--prompts", f.prompts.to_str().unwrap(),
        "--metrics", "is", "--inception", junk.to_str().unwrap(), "--out", f.root.join("junk").to_str().unwrap()]);
    assert_clean_failure(&o, "junk.pth");
    assert!(!f.root.join("junk").exists());
}

#[test]
fn interrupted_run_resumes_to_the_uninterrupted_result() {
    let f = fixture();
    let out = f.root.join("resumed");
    // "interrupted" after 5 images, then resumed to all 12 with another batch size
    let first = eval(&out, &["--count", "5", "--batch-size", "3", "--metrics", "fid"]);
    assert!(first.contains("0 images kept, 5 generated"), "{first}");
    let cached: Vec<_> = std::fs::read_dir(out.join("features")).unwrap().collect();
    assert_eq!(cached.len(), 1, "one cache per Inception file");
    let second = eval(&out, &["--batch-size", "4", "--metrics", "fid"]);
    assert!(second.contains("5 images kept, 5 generated"), "{second}");
    let (a, b) = (image_bytes(batch1(), COUNT), image_bytes(&out, COUNT));
    for k in 0..COUNT {
        assert!(a[k] == b[k], "image {k}: the resumed run differs from the uninterrupted one");
    }
    let (want, got) = (report(batch1())["fid"].as_f64().unwrap(), report(&out)["fid"].as_f64().unwrap());
    println!("FID uninterrupted {want}, resumed {got}");
    assert_eq!(want, got, "the resumed run's FID");
    // complete: everything kept, the features read from the cache, the same number
    let third = eval(&out, &["--metrics", "fid"]);
    assert!(third.contains("10 images kept, 0 generated"), "{third}");
    assert_eq!(report(&out)["fid"].as_f64().unwrap(), got);
    let cache = std::fs::read_dir(out.join("features")).unwrap().next().unwrap().unwrap().path().join("images_256/pytorch-fid-64");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), COUNT, "{}: one feature file per image", cache.display());
    assert!(report(&out)["seconds_per_image"].as_f64().is_some());

    // other settings into the same --out: refused by name, nothing touched
    let o = sdkd(&["eval", "--model", f.pipeline.to_str().unwrap(), "--prompts", f.prompts.to_str().unwrap(),
        "--metrics", "is", "--inception", f.inception.to_str().unwrap(), "--steps", STEPS, "--resolution", RES,
        "--seed", "7", "--out", out.to_str().unwrap()]);
    assert_clean_failure(&o, "generation.seed");
    assert!(image_bytes(&out, COUNT) == b);
    // nor may an --images report replace the generated images, even with --overwrite
    let o = sdkd(&["eval", "--images", f.real.to_str().unwrap(), "--metrics", "is", "--inception",
        f.inception.to_str().unwrap(), "--out", out.to_str().unwrap(), "--overwrite"]);
    assert_clean_failure(&o, "generated images");
    assert!(image_bytes(&out, COUNT) == b);
    // captions that differ from those the images were made from
    let other = f.root.join("other.jsonl");
    std::fs::write(&other, "{\"file_name\": \"x\", \"text\": \"something else\"}\n").unwrap();
    let o = sdkd(&["eval", "--model", f.pipeline.to_str().unwrap(), "--prompts", other.to_str().unwrap(),
        "--metrics", "is", "--inception", f.inception.to_str().unwrap(), "--steps", STEPS, "--resolution", RES,
        "--device", "cpu", "--out", out.to_str().unwrap()]);
    assert_clean_failure(&o, "something else");
    // a captions file without the column names it and the key
    let bad = f.root.join("bad.csv");
    std::fs::write(&bad, "file_name,prompt\na.png,x\n").unwrap();
    let o = sdkd(&["eval", "--model", f.pipeline.to_str().unwrap(), "--prompts", bad.to_str().unwrap(),
        "--metrics", "is", "--inception", f.inception.to_str().unwrap(), "--out", f.root.join("bad").to_str().unwrap()]);
    assert_clean_failure(&o, "bad.csv");
    assert_clean_failure(&o, "caption");
}

#[test]
fn compare_puts_reports_in_one_table() {
    let f = fixture();
    let per = f.root.join("cmp-per-image");
    eval(&per, &["--seeding", "per-image", "--count", "3", "--batch-size", "3", "--metrics", "fid"]);
    let md_out = f.root.join("compare.md");
    let args = ["eval", "--compare", batch1().to_str().unwrap(), per.to_str().unwrap(), "--out", md_out.to_str().unwrap()];
    let o = sdkd(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let table = std::fs::read_to_string(&md_out).unwrap();
    assert_eq!(stdout, table);
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(rows.len(), 4, "{table}");
    let fid = report(&per)["fid"].as_f64().unwrap();
    assert!(rows[3].contains(&format!("{fid:.4}")) && rows[3].contains("| 3 |") && rows[3].contains("| — |"), "{table}");
    assert!(rows[2].contains(&format!("{:.4}", report(batch1())["fid"].as_f64().unwrap())), "{table}");
    assert_clean_failure(&sdkd(&args), "--overwrite");
    assert_clean_failure(&sdkd(&["eval", "--compare", f.real.to_str().unwrap()]), "report.json");
}
