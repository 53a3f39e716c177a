//! `sdkd generate` against diffusers' `StableDiffusionPipeline` on tiny random perturbed pipelines
//! (tests/reference/make_pipeline.py): an SD-1.x-like one (4 stages, mid block, epsilon, conv
//! projections, PNDM config), also with a pruned bk_small student swapped in, and an SD-2-like one
//! (v_prediction, linear projections, upcast attention, gelu, DDIM config). Every scheduler, the
//! seeded latents and step noise, guidance on and off, several samples, and LCM: the SD-1.x-like
//! UNet given a guidance embedding (`time_cond_proj_dim`, tests/reference/lcm_unet.py) at 1, 2, 4
//! and 8 LCM steps, and LCM-LoRA style (the plain UNet, LCM steps, real guidance), and a LoRA made
//! with peft (tests/reference/make_lora.py) fused from diffusers' and kohya's layouts: on the CPU in fp32 the
//! images must be pixel-identical, every channel value of every pixel equal (the PNG files' bytes
//! may differ: encoders compress differently). tests/reference/generate_reference.py makes
//! diffusers' PNGs.
mod common;

use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const SCHEDULERS: [&str; 8] = ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "pndm", "lcm"];
/// The step counts LCM students are run at.
const LCM_STEPS: [usize; 4] = [1, 2, 4, 8];
const PANDA: &str = "a toy panda standing on a pile of broccoli";
/// A long negative prompt as users write them: longer than CLIP's 77 tokens, so truncation is exercised.
const NEGATIVE: &str = "(deformed iris, deformed pupils, semi-realistic, cgi, render, sketch, cartoon, drawing, anime), text, cropped, out of frame, worst quality, low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry, dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, gross proportions, malformed limbs, missing arms, missing legs, extra arms, extra legs, fused fingers, too many fingers, long neck, BadDream, UnrealisticDream";
const SD2_PROMPT: &str = "a red cube on a blue sphere, studio light";

/// One generation, run by both diffusers and `sdkd generate`.
#[derive(Clone)]
struct Case {
    name: String,
    model: PathBuf,
    unet: Option<PathBuf>,
    prompt: &'static str,
    negative_prompt: Option<&'static str>,
    scheduler: &'static str,
    steps: usize,
    guidance_scale: f64,
    seed: u64,
    width: i64,
    height: i64,
    samples: usize,
    /// `--lora FILE:SCALE` each (diffusers: `load_lora_weights` + `fuse_lora(lora_scale=SCALE)`).
    loras: Vec<(PathBuf, f64)>,
}

impl Case {
    fn sdkd_args(&self, out: &Path) -> Vec<String> {
        let mut a: Vec<String> = vec!["generate".into(), "--model".into(), self.model.display().to_string()];
        if let Some(u) = &self.unet {
            a.extend(["--unet".into(), u.display().to_string()]);
        }
        for (file, scale) in &self.loras {
            a.extend(["--lora".into(), format!("{}:{scale}", file.display())]);
        }
        a.extend(["--prompt".into(), self.prompt.into()]);
        if let Some(n) = self.negative_prompt {
            a.extend(["--negative-prompt".into(), n.into()]);
        }
        for (k, v) in [
            ("--scheduler", self.scheduler.to_string()),
            ("--steps", self.steps.to_string()),
            ("--guidance-scale", self.guidance_scale.to_string()),
            ("--seed", self.seed.to_string()),
            ("--width", self.width.to_string()),
            ("--height", self.height.to_string()),
            ("--samples", self.samples.to_string()),
            ("--out", out.display().to_string()),
        ] {
            a.extend([k.to_string(), v]);
        }
        a
    }
}

struct Fixture {
    root: PathBuf,
    sd1: PathBuf,
    sd2: PathBuf,
    student: PathBuf,
    checkpoint: PathBuf,
    /// sd1's UNet with `time_cond_proj_dim` 32, as an LCM student is made from its teacher.
    lcm_unet: PathBuf,
    /// A peft LoRA of sd1 (tests/reference/make_lora.py): pytorch_lora_weights.safetensors and
    /// kohya.safetensors.
    lora: PathBuf,
    cases: BTreeMap<String, Case>,
}

impl Fixture {
    /// diffusers' i-th image of case `name`.
    fn reference(&self, name: &str, i: usize) -> PathBuf {
        self.root.join("ref").join(format!("{name}-{i}.png"))
    }

    fn case(&self, name: &str) -> &Case {
        &self.cases[name]
    }
}

fn cases(f: &Fixture) -> Vec<Case> {
    let base = |name: String, model: &Path, scheduler: &'static str| Case {
        name,
        model: model.to_path_buf(),
        unet: None,
        prompt: PANDA,
        negative_prompt: Some(NEGATIVE),
        scheduler,
        steps: 5,
        guidance_scale: 7.5,
        seed: 42,
        width: 32,
        height: 32,
        samples: 1,
        loras: vec![],
    };
    let mut out = vec![];
    for (k, s) in SCHEDULERS.into_iter().enumerate() {
        out.push(Case { seed: 42 + k as u64, ..base(format!("sd1-{s}"), &f.sd1, s) });
        // non-square (width 40, height 24), no negative prompt, another guidance and step count
        out.push(Case {
            prompt: SD2_PROMPT,
            negative_prompt: None,
            steps: 4,
            guidance_scale: 5.0,
            seed: 2313248373 + k as u64,
            width: 40,
            height: 24,
            ..base(format!("sd2-{s}"), &f.sd2, s)
        });
    }
    out.push(Case { samples: 2, seed: 7, ..base("sd1-samples2".into(), &f.sd1, "unipc") });
    out.push(Case {
        guidance_scale: 1.0,
        negative_prompt: None,
        seed: 9,
        ..base("sd1-noguidance".into(), &f.sd1, "euler_a")
    });
    out.push(Case { unet: Some(f.student.clone()), seed: 11, ..base("student".into(), &f.sd1, "dpmpp_2m") });
    // sd1-dpmpp_2m with a LoRA fused at 0.7
    let lora = vec![(f.lora.join("pytorch_lora_weights.safetensors"), 0.7)];
    out.push(Case { seed: 46, loras: lora, ..base("sd1-lora".into(), &f.sd1, "dpmpp_2m") });
    for steps in LCM_STEPS {
        // guidance embedded (w = 6 - 1), no unconditional batch: the negative prompt is unused
        out.push(Case { unet: Some(f.lcm_unet.clone()), steps, guidance_scale: 6.0, seed: 20 + steps as u64, ..base(format!("lcm-{steps}"), &f.sd1, "lcm") });
    }
    out
}

fn fixture() -> &'static Fixture {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = DIR.get_or_init(tempdir).path().to_path_buf();
        let p = |s: &str| root.join(s);
        let s = |p: &Path| p.display().to_string();
        let (sd1, sd2, student, checkpoint, lcm_unet, lora) = (p("sd1"), p("sd2"), p("student"), p("checkpoint"), p("lcm_unet"), p("lora"));
        run_reference("make_pipeline.py", &[&s(&sd1), "--stages", "4"]);
        run_reference("make_lora.py", &[&s(&sd1), &s(&lora)]);
        run_reference("lcm_unet.py", &[&s(&sd1.join("unet")), &s(&lcm_unet)]);
        run_reference(
            "make_pipeline.py",
            &[
                &s(&sd2),
                "--prediction-type",
                "v_prediction",
                "--linear-projection",
                "--upcast-attention",
                "--scheduler",
                "ddim",
                "--hidden-act",
                "gelu",
                "--pad-token",
                "!",
                "--seed",
                "1",
            ],
        );
        let out = sdkd1(&["prune", "--teacher", &s(&sd1), "--student", "bk_small", "--out", &s(&student)]);
        assert!(out.status.success(), "prune failed: {}", String::from_utf8_lossy(&out.stderr));
        // a training checkpoint's layout: unet/config.json + student.safetensors
        std::fs::create_dir_all(checkpoint.join("unet")).unwrap();
        std::fs::copy(student.join("config.json"), checkpoint.join("unet/config.json")).unwrap();
        std::fs::copy(student.join("diffusion_pytorch_model.safetensors"), checkpoint.join("student.safetensors"))
            .unwrap();

        let mut f = Fixture { root: root.clone(), sd1, sd2, student, checkpoint, lcm_unet, lora, cases: BTreeMap::new() };
        let list = cases(&f);
        std::fs::create_dir_all(root.join("ref")).unwrap();
        let json: Vec<_> = list
            .iter()
            .map(|c| {
                json!({
                    "model": c.model, "unet": c.unet, "prompt": c.prompt, "negative_prompt": c.negative_prompt,
                    "scheduler": c.scheduler, "steps": c.steps, "guidance_scale": c.guidance_scale, "seed": c.seed,
                    "width": c.width, "height": c.height, "samples": c.samples,
                    "out": root.join("ref").join(&c.name), "loras": c.loras,
                })
            })
            .collect();
        let cases_json = root.join("cases.json");
        std::fs::write(&cases_json, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        run_reference("generate_reference.py", &[&s(&cases_json)]);
        f.cases = list.into_iter().map(|c| (c.name.clone(), c)).collect();
        f
    })
}

fn read_rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).to_rgb8()
}

/// Mean |a - b| per channel, in 1/255 units (so 1.0 is the bound).
fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> [f64; 3] {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mut sum = [0f64; 3];
    for (pa, pb) in a.pixels().zip(b.pixels()) {
        for (c, s) in sum.iter_mut().enumerate() {
            *s += (pa.0[c] as f64 - pb.0[c] as f64).abs();
        }
    }
    let n = (a.width() * a.height()) as f64;
    sum.map(|s| s / n)
}

/// Asserts the image has real content (not a flat or saturated picture that would hide errors).
fn assert_has_content(img: &image::RgbImage, what: &str) {
    let mid = img.pixels().flat_map(|p| p.0).filter(|&v| v > 5 && v < 250).count();
    let total = (img.width() * img.height() * 3) as usize;
    assert!(mid * 2 > total, "{what}: most values are saturated ({mid} of {total} in 6..249)");
}

/// Runs the sdkd binary on one thread: the models are tiny, and on a busy machine more threads
/// only add overhead.
fn sdkd1(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sdkd"))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("running sdkd")
}

/// Runs `sdkd generate` for `case` writing to `out`, returns stdout.
fn run_case(case: &Case, out: &Path) -> String {
    let args = case.sdkd_args(out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = sdkd1(&args);
    assert!(o.status.success(), "sdkd generate ({}) failed:\n{}", case.name, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts `ours` and `theirs` are pixel-identical, naming how many values differ and by how much.
fn assert_pixel_identical(ours: &image::RgbImage, theirs: &image::RgbImage, what: &str) {
    assert_eq!(ours.dimensions(), theirs.dimensions(), "{what}: image sizes differ");
    let diffs: Vec<u8> = ours.as_raw().iter().zip(theirs.as_raw()).map(|(&a, &b)| a.abs_diff(b)).filter(|&d| d > 0).collect();
    assert!(
        diffs.is_empty(),
        "{what}: {} of {} channel values differ from diffusers' (max {}/255, mean |diff| per channel {:.4?}/255)",
        diffs.len(),
        ours.as_raw().len(),
        diffs.iter().max().unwrap(),
        mean_abs_diff(ours, theirs)
    );
}

/// Generates `name` with sdkd and compares every sample with diffusers'; returns how many samples.
fn compare_case(f: &Fixture, name: &str) -> usize {
    let case = f.case(name);
    let out_dir = f.root.join("ours").join(name);
    run_case(case, &out_dir);
    (0..case.samples)
        .map(|i| {
            let ours = read_rgb(&out_dir.join(format!("image-{i}.png")));
            let theirs = read_rgb(&f.reference(name, i));
            assert_eq!(ours.dimensions(), (case.width as u32, case.height as u32), "{name}: size");
            assert_has_content(&theirs, name);
            assert_pixel_identical(&ours, &theirs, &format!("{name} sample {i}"));
            eprintln!("{name} sample {i}: pixel-identical to diffusers'");
        })
        .count()
}

#[test]
fn every_scheduler_matches_diffusers_sd1_epsilon() {
    let f = fixture();
    for s in SCHEDULERS {
        compare_case(f, &format!("sd1-{s}"));
    }
    // the measure tells images apart: diffusers' DDIM and DDPM images differ by far more
    let d = mean_abs_diff(&read_rgb(&f.reference("sd1-ddim", 0)), &read_rgb(&f.reference("sd1-ddpm", 0)));
    assert!(d.iter().all(|&x| x > 5.0), "different schedulers and seeds gave near-equal images: {d:?}");
}

#[test]
fn every_scheduler_matches_diffusers_sd2_v_prediction() {
    let f = fixture();
    for s in SCHEDULERS {
        compare_case(f, &format!("sd2-{s}"));
    }
}

/// An LCM student (a `time_cond_proj_dim` UNet) against `StableDiffusionPipeline` + `LCMScheduler`
/// at the step counts LCM is run at; the plain UNet with `lcm` (LCM-LoRA style, real guidance) is
/// in the every-scheduler tests above.
#[test]
fn lcm_student_matches_diffusers_at_1_2_4_8_steps() {
    let f = fixture();
    for steps in LCM_STEPS {
        compare_case(f, &format!("lcm-{steps}"));
    }
    // the guidance scale reaches the UNet through the embedding: another scale, another image
    let case = Case { guidance_scale: 2.0, ..f.case("lcm-4").clone() };
    let out = f.root.join("ours").join("lcm-4-g2");
    let args = case.sdkd_args(&out);
    let o = sdkd1(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--negative-prompt is not used"), "no note on the unused negative prompt");
    let d = mean_abs_diff(&read_rgb(&out.join("image-0.png")), &read_rgb(&f.reference("lcm-4", 0)));
    assert!(d.iter().all(|&x| x > 1.0), "guidance 2 and 6 gave near-equal LCM images: {d:?}");
}

/// A LoRA made with peft (UNet and text encoder; linear, 1×1 and 3×3 conv layers; rank and alpha
/// patterns; random B), fused by `sdkd generate --lora FILE:0.7`, gives diffusers' image
/// (`load_lora_weights` + `fuse_lora(lora_scale=0.7)`) pixel for pixel from diffusers' file and
/// from the same adapters in kohya's layout.
#[test]
fn peft_lora_matches_diffusers_from_both_layouts() {
    let f = fixture();
    compare_case(f, "sd1-lora");
    let kohya = Case { loras: vec![(f.lora.join("kohya.safetensors"), 0.7)], ..f.case("sd1-lora").clone() };
    let out = f.root.join("ours").join("sd1-lora-kohya");
    run_case(&kohya, &out);
    let theirs = read_rgb(&f.reference("sd1-lora", 0));
    assert_pixel_identical(&read_rgb(&out.join("image-0.png")), &theirs, "kohya layout");
    // the LoRA changes the image (same seed and settings without it)
    let d = mean_abs_diff(&theirs, &read_rgb(&f.reference("sd1-dpmpp_2m", 0)));
    assert!(d.iter().all(|&x| x > 2.0), "the LoRA barely changed the image: {d:?}");
}

#[test]
fn guidance_off_matches_diffusers() {
    compare_case(fixture(), "sd1-noguidance");
}

#[test]
fn two_samples_write_two_files_matching_diffusers() {
    let f = fixture();
    assert_eq!(compare_case(f, "sd1-samples2"), 2);
    // the numbered-file form: out.png -> out-0.png, out-1.png (and no out.png)
    let case = f.case("sd1-samples2");
    let dir = f.root.join("numbered");
    run_case(case, &dir.join("out.png"));
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["out-0.png", "out-1.png"]);
    assert_eq!(read_rgb(&dir.join("out-0.png")), read_rgb(&f.root.join("ours/sd1-samples2/image-0.png")));
    // one seed, two different images
    assert_ne!(read_rgb(&dir.join("out-0.png")), read_rgb(&dir.join("out-1.png")));
}

#[test]
fn pruned_student_unet_matches_diffusers() {
    let f = fixture();
    compare_case(f, "student");
    let ours = read_rgb(&f.root.join("ours/student/image-0.png"));
    // the teacher's own UNet gives another image
    let teacher = Case { unet: None, ..f.case("student").clone() };
    let out = f.root.join("teacher.png");
    run_case(&teacher, &out);
    assert_ne!(read_rgb(&out), ours, "--unet had no effect");
    // a checkpoint folder (unet/config.json + student.safetensors) loads the same student
    let from_ckpt = Case { unet: Some(f.checkpoint.clone()), ..f.case("student").clone() };
    let out = f.root.join("ckpt.png");
    run_case(&from_ckpt, &out);
    assert_eq!(read_rgb(&out), ours, "checkpoint --unet differs from the UNet folder");
    // a checkpoint without EMA weights cannot give them
    let mut args = from_ckpt.sdkd_args(&f.root.join("ema.png"));
    args.push("--ema".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_clean_failure(&sdkd1(&args), "EMA");
    // a folder without a UNet is an error naming it
    let bogus = Case { unet: Some(f.root.join("ref")), ..f.case("student").clone() };
    let args = bogus.sdkd_args(&f.root.join("bogus.png"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_clean_failure(&sdkd1(&args), "ref");
}

/// `--dtype bf16` / `fp16`: the UNet and text encoder in half precision, the VAE in fp32. Not
/// diffusers' fp32 image bit for bit, but the same picture within the rounding of 2-byte floats:
/// the bound on the mean |difference| of each channel is about twice the worst channel measured
/// (bf16 0.71/255, fp16 0.11/255).
#[test]
fn half_precision_dtypes_stay_close_to_diffusers() {
    let f = fixture();
    let case = f.case("sd1-dpmpp_2m");
    for (dtype, bound) in [("bf16", 1.5), ("fp16", 0.25)] {
        let out = f.root.join("ours").join(format!("dtype-{dtype}"));
        let mut args = case.sdkd_args(&out);
        args.extend(["--dtype".to_string(), dtype.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = sdkd1(&args);
        assert!(o.status.success(), "--dtype {dtype}: {}", String::from_utf8_lossy(&o.stderr));
        let ours = read_rgb(&out.join("image-0.png"));
        let theirs = read_rgb(&f.reference("sd1-dpmpp_2m", 0));
        let d = mean_abs_diff(&ours, &theirs);
        eprintln!("--dtype {dtype}: mean |sdkd - diffusers fp32| per channel = {d:.3?} /255");
        assert!(ours != theirs, "--dtype {dtype} gave diffusers' fp32 image exactly: did it run in {dtype}?");
        assert!(d.iter().all(|&x| x <= bound), "--dtype {dtype}: mean abs difference {d:?}/255, bound {bound}/255");
        let chunks = sdkd::png_meta::read_png_text(&out.join("image-0.png")).unwrap();
        assert!(chunks.contains(&("dtype".to_string(), dtype.to_string())), "{chunks:?}");
    }
}

#[test]
fn png_text_chunks_record_the_request() {
    let f = fixture();
    let case = f.case("sd1-dpmpp_2m");
    let out = f.root.join("meta.png");
    run_case(case, &out);
    let text: BTreeMap<String, String> = sdkd::png_meta::read_png_text(&out).unwrap().into_iter().collect();
    for (k, v) in [
        ("prompt", PANDA.to_string()),
        ("negative_prompt", NEGATIVE.to_string()),
        ("seed", case.seed.to_string()),
        ("scheduler", "dpmpp_2m".to_string()),
        ("steps", "5".to_string()),
        ("guidance_scale", "7.5".to_string()),
        ("width", "32".to_string()),
        ("height", "32".to_string()),
        ("model", f.sd1.display().to_string()),
    ] {
        assert_eq!(text.get(k), Some(&v), "text chunk {k:?} in {text:?}");
    }
    // the image is diffusers' too
    assert_pixel_identical(&read_rgb(&out), &read_rgb(&f.reference("sd1-dpmpp_2m", 0)), "meta.png");
}

#[test]
fn random_seed_is_reported_and_reproduces_the_image() {
    let f = fixture();
    let case = Case { seed: 0, ..f.case("sd1-euler").clone() };
    let out = f.root.join("random.png");
    let mut args = case.sdkd_args(&out);
    let i = args.iter().position(|a| a == "--seed").unwrap();
    args[i + 1] = "-1".into();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = sdkd1(&argv);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().find(|l| l.starts_with("seed ")).unwrap_or_else(|| panic!("no seed reported:\n{stdout}"));
    assert!(line.contains("(random)"), "{line}");
    let seed: u64 = line.split_whitespace().nth(1).unwrap().trim_end_matches(',').parse().unwrap();
    let text: BTreeMap<String, String> = sdkd::png_meta::read_png_text(&out).unwrap().into_iter().collect();
    assert_eq!(text["seed"], seed.to_string());
    let again = f.root.join("again.png");
    run_case(&Case { seed, ..case }, &again);
    assert_eq!(read_rgb(&again), read_rgb(&out), "--seed {seed} does not reproduce the random-seed image");
}

#[test]
fn bad_requests_fail_cleanly() {
    let f = fixture();
    let case = f.case("sd1-unipc");
    let run = |edit: &dyn Fn(&mut Vec<String>), needle: &str| {
        let mut args = case.sdkd_args(&f.root.join("bad.png"));
        edit(&mut args);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_failure(&sdkd1(&argv), needle);
    };
    let set = |key: &'static str, value: &'static str| {
        move |args: &mut Vec<String>| {
            let i = args.iter().position(|a| a == key).unwrap();
            args[i + 1] = value.into();
        }
    };
    run(&set("--width", "30"), "width");
    run(&set("--height", "36"), "height");
    run(&set("--samples", "5"), "samples");
    run(&set("--seed", "-7"), "-7");
    run(&set("--steps", "0"), "steps");
    run(&set("--out", "x.jpg"), "x.jpg");
    run(&set("--model", "/nonexistent/pipeline"), "/nonexistent/pipeline");
    // LCM: more steps than the scheduler config's original_inference_steps (50) have grid points
    let lcm51 = |args: &mut Vec<String>| {
        set("--scheduler", "lcm")(args);
        set("--steps", "51")(args);
    };
    run(&lcm51, "original_inference_steps");
    assert!(!f.root.join("bad.png").exists());
}
