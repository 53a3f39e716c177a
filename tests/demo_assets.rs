//! The demo's embedded teacher pipeline (src/demo): the folder `build_demo_teacher` writes loads
//! in sdkd and in diffusers/transformers, its tokenizer agrees with transformers' CLIPTokenizer,
//! its text encoder tells captions apart, and it is deterministic.
mod common;

use common::{read_tensors, rel_err, run_reference};
use sdkd::data::synthetic::write_dataset;
use sdkd::demo::tokenizer::all_captions;
use sdkd::demo::vae_train::load_images;
use sdkd::demo::{build_demo_teacher, cosine, parts, DemoTeacherOptions, DemoTeacherReport, VaeTrainOptions, DEMO_RESOLUTION};
use sdkd::models::weights::save;
use sdkd::models::{Init, PipelineDir, UNet};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// CPU seconds this process has used (user + system), from /proc (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // utime, stime (fields 14, 15 of stat; USER_HZ 100)
}

/// One forward+backward of the demo teacher UNet at batch 16, in ms (median of 5 after a warm-up),
/// with 1 and 2 LibTorch threads.
#[test]
#[ignore = "timing: run with --ignored --nocapture"]
fn unet_step_timing() {
    for (latent, threads) in [(16i64, 1), (16, 2), (8, 1)] {
        tch::set_num_threads(threads);
        let unet = UNet::build(&parts::unet_config(sdkd::demo::DemoFamily::Sd, latent), Device::Cpu, Kind::Float, Init::Torch);
        let x = Tensor::randn([16, 4, latent, latent], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([16, 77, parts::TEXT_HIDDEN], (Kind::Float, Device::Cpu));
        let t = Tensor::randint(1000, [16], (Kind::Int64, Device::Cpu));
        let mut times = vec![];
        let mut cpu = 0.0;
        for i in 0..6 {
            let t0 = Instant::now();
            let c0 = cpu_seconds();
            let y = unet.model.predict(&x, &t, &ctx);
            y.square().mean(Kind::Float).backward();
            for v in unet.vs.trainable_variables() {
                let mut g = v.grad();
                if g.defined() { let _ = g.zero_(); }
            }
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64() * 1000.0);
                cpu += cpu_seconds() - c0;
            }
        }
        times.sort_by(f64::total_cmp);
        eprintln!("latent {latent}x{latent}: {} params, fwd+bwd batch 16: wall {:.0} ms median, {:.0} min; CPU {:.0} ms per step ({} threads)",
            unet.num_params(), times[2], times[0], cpu * 1000.0 / 5.0, tch::get_num_threads());
    }
}

/// A small synthetic dataset and a demo teacher built from it with few VAE steps, made once.
fn teacher() -> &'static (tempfile::TempDir, DemoTeacherReport) {
    static T: OnceLock<(tempfile::TempDir, DemoTeacherReport)> = OnceLock::new();
    T.get_or_init(|| {
        let tmp = common::tempdir();
        let data = tmp.path().join("data");
        write_dataset(&data, 48, 7, DEMO_RESOLUTION).unwrap();
        let report = build_demo_teacher(&tmp.path().join("teacher"), &data, &small_options(11)).unwrap_or_else(|e| panic!("{e:#}"));
        (tmp, report)
    })
}

fn small_options(seed: u64) -> DemoTeacherOptions {
    DemoTeacherOptions { seed, vae: VaeTrainOptions { steps: 4, batch_size: 4, warmup_steps: 2, ..Default::default() }, held_out: 8, ..Default::default() }
}

fn ids_of(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn teacher_loads_in_sdkd_and_diffusers() {
    let (tmp, report) = teacher();
    let dir = &report.dir;
    assert_eq!(report.resolution, DEMO_RESOLUTION);
    assert_eq!(report.latent_size, DEMO_RESOLUTION as i64 / 2);

    // sdkd
    let pipe = PipelineDir::open(dir).unwrap();
    let unet = pipe.load_unet(Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{e:#}"));
    let vae = pipe.load_vae(Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{e:#}"));
    let te = pipe.load_text_encoder(Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{e:#}"));
    let tok = pipe.load_tokenizer().unwrap_or_else(|e| panic!("{e:#}"));
    pipe.scheduler_config().unwrap();
    assert_eq!(unet.num_params(), report.unet_params);
    assert_eq!(vae.num_params(), report.vae_params);
    assert_eq!(te.num_params(), report.text_encoder_params);
    assert!((vae.model.config.scaling_factor - report.scaling_factor).abs() < 1e-12);
    assert_eq!(unet.model.config.cross_attention_dim, te.model.config.hidden_size);
    assert_eq!(unet.model.config.sample_size, Some(report.latent_size));

    // diffusers / transformers, on every caption the dataset can produce
    let captions = all_captions();
    let captions_path = tmp.path().join("captions.json");
    std::fs::write(&captions_path, serde_json::to_string(&captions).unwrap()).unwrap();
    let (images, _) = load_images(&tmp.path().join("data")).unwrap();
    let images = images.narrow(0, 0, 4);
    let images_path = tmp.path().join("images.safetensors");
    save(&images_path, &[("images".to_string(), images.shallow_clone())], None).unwrap();
    let out = tmp.path().join("reference");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    run_reference("check_demo_pipeline.py", &[&s(dir), &s(&captions_path), &s(&images_path), &s(&out)]);
    let want: Value = serde_json::from_str(&std::fs::read_to_string(out.join("ids.json")).unwrap()).unwrap();
    assert_eq!(tok.vocab_size() as i64, want["vocab_size"].as_i64().unwrap());
    assert_eq!(tok.pad_id(), want["pad_token_id"].as_i64().unwrap());
    assert_eq!(tok.bos_id(), want["bos_token_id"].as_i64().unwrap());
    assert_eq!(tok.eos_id(), want["eos_token_id"].as_i64().unwrap());
    assert_eq!(tok.model_max_length() as i64, want["model_max_length"].as_i64().unwrap());
    for (i, c) in captions.iter().enumerate() {
        let ids = tok.encode(c);
        assert_eq!(ids, ids_of(&want["ids"][i]), "{c:?}");
        assert_eq!(tok.encode_padded(c), ids_of(&want["padded"][i]), "{c:?}");
        // one token per word, one for the comma, BOS and EOS
        assert_eq!(ids.len(), c.split(' ').count() + 3, "{c:?}");
    }
    for (part, n) in [("unet", report.unet_params), ("vae", report.vae_params), ("text_encoder", report.text_encoder_params)] {
        assert_eq!(want["params"][part].as_i64().unwrap(), n, "{part} parameters");
    }
    assert!((want["scaling_factor"].as_f64().unwrap() - report.scaling_factor).abs() < 1e-9);
    assert_eq!(want["scheduler"], "DDPMScheduler");
    assert_eq!(ids_of(&want["sample_shape"]), vec![1, DEMO_RESOLUTION as i64, DEMO_RESOLUTION as i64, 3]);

    // the same numbers from the same weights
    let r = read_tensors(&out.join("tensors.safetensors"));
    let ids = tok.encode_batch(&captions, Device::Cpu);
    let enc = tch::no_grad(|| te.model.forward(&ids));
    let e1 = rel_err(&enc.last_hidden_state, &r["text_embeds"]);
    let e2 = rel_err(&enc.pooled, &r["pooled"]);
    let mean = tch::no_grad(|| vae.model.encode(&images).mean);
    let e3 = rel_err(&mean, &r["latent_mean"]);
    let e4 = rel_err(&tch::no_grad(|| vae.model.decode(&r["latent_mean"])), &r["decoded"]);
    eprintln!("rel err vs transformers/diffusers: text {e1:.1e} pooled {e2:.1e}, vae mean {e3:.1e} decode {e4:.1e}");
    for e in [e1, e2, e3, e4] {
        assert!(e < 1e-4, "{e}");
    }
}

/// The frozen random text encoder is a fixed feature extractor: each caption word leaves a
/// clearly different embedding at its position, and no two captions share an embedding.
#[test]
fn text_encoder_tells_captions_apart() {
    let (_, report) = teacher();
    let pipe = PipelineDir::open(&report.dir).unwrap();
    let te = pipe.load_text_encoder(Device::Cpu, Kind::Float).unwrap();
    let tok = pipe.load_tokenizer().unwrap();
    let base = "two small red circles on a blue background, top left";
    // each differs from `base` in one attribute, at token position `pos` (BOS is 0)
    let others = [
        ("one small red circle on a blue background, top left", 1),
        ("two large red circles on a blue background, top left", 2),
        ("two small green circles on a blue background, top left", 3),
        ("two small red squares on a blue background, top left", 4),
        ("two small red circles on a white background, top left", 7),
        ("two small red circles on a blue background, bottom left", 10),
        ("two small red circles on a blue background, top right", 11),
    ];
    let mut texts = vec![base];
    texts.extend(others.iter().map(|o| o.0));
    texts.push(base);
    let h = tch::no_grad(|| te.model.forward(&tok.encode_batch(&texts, Device::Cpu)).last_hidden_state); // (n, 77, hidden)
    let n = texts.len() as i64;
    assert!(h.get(0).equal(&h.get(n - 1)), "the same caption must give the same embedding");
    let len = tok.encode(base).len() as i64; // 14: BOS, 11 words, the comma, EOS
    for (i, (text, pos)) in others.iter().enumerate() {
        let other = h.get(i as i64 + 1);
        let at_word = cosine(&h.get(0).get(*pos), &other.get(*pos));
        let caption = cosine(&h.get(0).narrow(0, 0, len), &other.narrow(0, 0, len));
        let all = cosine(&h.get(0), &other);
        eprintln!("{text:?}: cosine {at_word:.3} at the changed word, {caption:.3} over the caption's tokens, {all:.4} over all 77");
        assert!(at_word < 0.7, "{text:?}: the changed word's embedding is too like the original's: cosine {at_word}");
        assert!(caption < 0.99 && all < 0.999, "{text:?}: {caption} {all}");
    }
    // every caption the dataset can produce has its own embedding
    let captions = all_captions();
    let ids = tok.encode_batch(&captions, Device::Cpu);
    let e = tch::no_grad(|| te.model.forward(&ids).last_hidden_state.narrow(1, 0, len).flatten(1, -1)); // (2304, len·hidden)
    let d = Tensor::cdist(&e, &e, 2.0, None::<i64>);
    let off_diagonal = &d + Tensor::eye(captions.len() as i64, (Kind::Float, Device::Cpu)) * 1e9;
    let nearest = off_diagonal.min().double_value(&[]);
    let typical = d.median().double_value(&[]);
    let norm = e.norm_scalaropt_dim(2.0, [1i64].as_slice(), false).mean(Kind::Float).double_value(&[]);
    eprintln!("{} captions: nearest pair {nearest:.2} apart, median pair {typical:.2}, mean norm {norm:.2}", captions.len());
    assert!(nearest > 0.1 * norm, "two captions have nearly the same embedding: {nearest} apart (norm {norm})");
}

#[test]
fn same_seed_same_files() {
    let (tmp, report) = teacher();
    let again = tmp.path().join("again");
    build_demo_teacher(&again, &tmp.path().join("data"), &small_options(11)).unwrap();
    let files = |root: &Path| -> Vec<PathBuf> {
        let mut out = vec![];
        for part in ["", "unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            for e in std::fs::read_dir(root.join(part)).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    out.push(p.strip_prefix(root).unwrap().to_path_buf());
                }
            }
        }
        out.sort();
        out
    };
    let names = files(&report.dir);
    assert_eq!(names, files(&again));
    assert_eq!(names.len(), 12, "{names:?}");
    for n in &names {
        assert!(std::fs::read(report.dir.join(n)).unwrap() == std::fs::read(again.join(n)).unwrap(), "{} differs between two builds", n.display());
    }
    // another seed gives other weights
    let other = tmp.path().join("other");
    build_demo_teacher(&other, &tmp.path().join("data"), &small_options(12)).unwrap();
    let unet = |d: &Path| std::fs::read(d.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(unet(&report.dir) != unet(&other));
}

#[test]
fn bad_data_is_an_error() {
    let tmp = common::tempdir();
    let e = build_demo_teacher(&tmp.path().join("t"), &tmp.path().join("nope"), &small_options(0)).unwrap_err();
    assert!(format!("{e:#}").contains("nope"), "{e:#}");
    // a folder that holds something else is not overwritten
    let busy = tmp.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let e = build_demo_teacher(&busy, &tmp.path().join("nope"), &small_options(0)).unwrap_err();
    assert!(format!("{e:#}").contains("busy"), "{e:#}");
}

/// The demo's real VAE training (2000 images, default options): how good and how fast.
#[test]
#[ignore = "full size: about 2-3 minutes; run with --ignored --nocapture"]
fn full_size_demo_teacher() {
    let tmp = common::tempdir();
    let data = tmp.path().join("data");
    write_dataset(&data, 2000, 0, DEMO_RESOLUTION).unwrap();
    let t0 = Instant::now();
    let r = build_demo_teacher(&tmp.path().join("teacher"), &data, &DemoTeacherOptions::default()).unwrap();
    eprintln!(
        "{} VAE steps in {:.1}s ({} threads), build {:.1}s: PSNR {:.2} dB train, {:.2} dB held out; latent std {:.3}",
        r.vae_stats.steps, r.vae_stats.seconds, tch::get_num_threads(), t0.elapsed().as_secs_f64(), r.psnr_train, r.psnr_held_out, r.latent_std
    );
    r.grid.save(tmp.path().join("grid.png")).unwrap();
    assert!(r.psnr_held_out > 30.0, "held-out PSNR {} dB", r.psnr_held_out);
}
