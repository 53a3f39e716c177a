//! `sdkd eval`: FID (pytorch-fid), Inception Score (torch-fidelity) and CLIP score (open_clip),
//! with the networks read from their published weight files. `sdkd eval fid A B` is pytorch-fid's own command line;
//! `sdkd eval --images ... --out ...` scores a folder; `sdkd eval --model ... --prompts ... --out ...`
//! generates the images first by BK-SDM's protocol (resumable, batch-invariant seeds) and scores
//! them with a per-image feature cache; `sdkd eval --compare A/ B/` tabulates reports.
use crate::commands::generate::PipelineArgs;
use crate::runtime::{DeviceChoice, Precision};
use crate::eval::generate::{self as gen, Generation, Seeding};
use crate::eval::{self, clip_score, fid, inception::InceptionV3, inception_score, prompts, FeatureCache, Metric};
use crate::fs_safe::{self, Existing, Marker, Purpose};
use crate::schedulers::SchedulerKind;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub tool: Option<EvalTool>,
    /// The generated images to score (a folder).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// The real images' folder, or a pytorch-fid .npz of their statistics (FID only).
    #[arg(long)]
    pub real: Option<PathBuf>,
    /// Comma-separated: fid, is, clip.
    #[arg(long, default_value = "fid,is")]
    pub metrics: String,
    /// FID's Inception features: 64, 192, 768 or 2048 (pool3, the standard).
    #[arg(long, default_value_t = 2048)]
    pub dims: i64,
    /// The report folder (report.json, report.md): new or empty, or an earlier one with
    /// --overwrite. With --model it also holds images/ and features/, and a rerun resumes it.
    /// With --compare: a .md file for the table.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an earlier sdkd eval report in --out (never a folder sdkd did not make, never
    /// generated images).
    #[arg(long)]
    pub overwrite: bool,
    /// Generate the images with this pipeline folder (or single-file checkpoint) first.
    #[arg(long, conflicts_with = "images")]
    pub model: Option<PathBuf>,
    /// With --model: a UNet to use instead of the pipeline's (a student's folder, checkpoint or final/).
    #[arg(long, requires = "model")]
    pub unet: Option<PathBuf>,
    /// With --unet: its EMA weights.
    #[arg(long, requires = "unet")]
    pub ema: bool,
    /// The UNet's and text encoder's dtype (default fp16 on CUDA, fp32 on the CPU; the VAE decodes in fp32).
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
    /// The captions: a metadata.csv or .jsonl (file_name, text or caption), or COCO's
    /// captions_val2014.json. With --images (for the CLIP score): the images' metadata file, or a
    /// folder holding one (default: the --images folder).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Images to generate (default: one per caption): the first N captions, or with --sample-seed a seeded sample.
    #[arg(long)]
    pub count: Option<usize>,
    /// Sample --count captions as numpy's RandomState(seed).choice(n, count, replace=False).
    #[arg(long)]
    pub sample_seed: Option<u32>,
    #[arg(long, default_value = "pndm")]
    pub scheduler: SchedulerKind,
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// consecutive: one generator drawn for the whole run (BK-SDM); per-image: image k seeded seed + k.
    #[arg(long, value_enum, default_value = "consecutive")]
    pub seeding: Seeding,
    /// Square images of this many pixels.
    #[arg(long, default_value_t = 512)]
    pub resolution: i64,
    /// With --model: score copies resized to this square size with Pillow's BICUBIC (BK-SDM's
    /// 256, images_<size>/); 0 scores the images as generated.
    #[arg(long, default_value_t = 256)]
    pub score_size: u32,
    /// Put the report.json of these eval folders in one table.
    #[arg(long, num_args = 1.., conflicts_with_all = ["images", "model"])]
    pub compare: Vec<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Clone)]
pub struct CommonArgs {
    /// The Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or torch-fidelity's copy).
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// The CLIP weights: open_clip's ViT-g-14 open_clip_pytorch_model.bin or open_clip_model.safetensors.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// Images per batch: with --model, prompts per UNet call (default 8; the images do not
    /// depend on it); otherwise images per Inception batch (default 50, pytorch-fid's).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// auto (the first CUDA device when there is one, else the CPU), cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
}

impl CommonArgs {
    /// `--device` through the run config's device parser (default auto), a bad value an exit-1 error.
    fn device(&self) -> Result<tch::Device> {
        let choice: DeviceChoice = self.device.as_deref().unwrap_or("auto").parse().map_err(|e| anyhow::anyhow!("--device: {e}"))?;
        choice.resolve().context("--device")
    }
}

#[derive(Subcommand)]
pub enum EvalTool {
    /// FID between two image folders or .npz statistics, as `python -m pytorch_fid A B`.
    Fid(FidArgs),
}

#[derive(Args)]
pub struct FidArgs {
    /// Two image folders or pytorch-fid .npz files; with --save-stats: a folder and the .npz to write.
    #[arg(num_args = 2, required = true)]
    pub paths: Vec<PathBuf>,
    /// Inception features: 64, 192, 768 or 2048 (pool3, the standard).
    #[arg(long, default_value_t = 2048)]
    pub dims: i64,
    /// Write the first path's statistics to the second (a .npz) instead of computing FID.
    #[arg(long)]
    pub save_stats: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The network, or an error that says which file is needed and where users get it.
fn network(c: &CommonArgs) -> Result<InceptionV3> {
    let Some(path) = &c.inception else {
        bail!("--inception is required: sdkd downloads nothing and never scores with random weights; it needs {}", eval::inception::WEIGHTS_HELP);
    };
    InceptionV3::load(&crate::hub::local(path, crate::hub::Want::File)?, c.device()?)
}

pub fn run(a: &EvalArgs) -> Result<()> {
    match &a.tool {
        Some(EvalTool::Fid(f)) => run_fid(f),
        None if !a.compare.is_empty() => run_compare(a),
        None if a.model.is_some() => run_generated(a),
        None => run_report(a),
    }
}

/// pytorch-fid's default Inception batch.
const INCEPTION_BATCH: usize = 50;

fn run_fid(f: &FidArgs) -> Result<()> {
    let net = network(&f.common)?;
    let batch = f.common.batch_size.unwrap_or(INCEPTION_BATCH);
    let (p1, p2) = (&f.paths[0], &f.paths[1]);
    if f.save_stats {
        if p2.exists() {
            bail!("{} exists: --save-stats writes a new .npz and replaces nothing", p2.display());
        }
        let s = eval::stats_of(p1, &net, f.dims, batch)?;
        warn_few(p1, &s, f.dims);
        return s.write_npz(p2);
    }
    let s1 = eval::stats_of(p1, &net, f.dims, batch)?;
    warn_few(p1, &s1, f.dims);
    let s2 = eval::stats_of(p2, &net, f.dims, batch)?;
    warn_few(p2, &s2, f.dims);
    println!("FID: {}", fid::frechet_distance(&s1, &s2)?);
    Ok(())
}

fn warn_few(path: &Path, s: &fid::Stats, dims: i64) {
    if let Some(w) = s.count.and_then(|n| eval::few_images_warning(path, n, dims)) {
        eprintln!("{w}");
    }
}

/// What the metrics are computed on, and where their results go.
struct Scoring<'a> {
    net: Option<InceptionV3>,
    /// The CLIP scorer and the (image, caption) pairs it scores, when `clip` is asked for.
    clip: Option<(clip_score::ClipScorer, Vec<(PathBuf, String)>)>,
    paths: Vec<PathBuf>,
    images: &'a Path,
    real: Option<&'a Path>,
    dims: i64,
    batch: usize,
    cache: Option<FeatureCache>,
}

impl Scoring<'_> {
    fn net(&self) -> &InceptionV3 {
        self.net.as_ref().expect("loaded for the metrics that need it")
    }
}

/// Computes `metric` into `report` (one arm per metric), with its warnings.
fn score(metric: Metric, s: &Scoring<'_>, report: &mut Value, warnings: &mut Vec<String>) -> Result<()> {
    match metric {
        Metric::Fid => {
            let real = s.real.context("--metrics fid needs --real <image folder or .npz>")?;
            let real_stats = eval::stats_of(real, s.net(), s.dims, s.batch)?;
            let (fid, gen) = eval::fid_against(s.net(), &s.paths, s.dims, s.batch, s.cache.as_ref(), &real_stats)?;
            for (p, st) in [(s.images, &gen), (real, &real_stats)] {
                if let Some(w) = st.count.and_then(|n| eval::few_images_warning(p, n, s.dims)) {
                    eprintln!("{w}");
                    warnings.push(w);
                }
            }
            report["fid"] = fid.into();
            report["real"] = real.display().to_string().into();
        }
        Metric::Is => {
            let (m, sd) = eval::inception_score_of(s.net(), &s.paths, s.batch, s.cache.as_ref())?;
            report["is_mean"] = m.into();
            report["is_std"] = sd.into();
        }
        Metric::Clip => {
            let (scorer, pairs) = s.clip.as_ref().expect("loaded when clip is asked for");
            let c = scorer.score_files(pairs, s.batch)?;
            report["clip_score"] = c.mean_cosine.into();
            report["clip_score_torchmetrics"] = c.torchmetrics.into();
            report["clip_count"] = c.count.into();
            let cfg = &scorer.model.config;
            report["settings"]["clip"] = json!({
                "weights": scorer.model.path.display().to_string(),
                "image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size, "vision_width": cfg.vision.width,
                "vision_layers": cfg.vision.layers, "text_width": cfg.text.width, "text_layers": cfg.text.layers, "embed_dim": cfg.embed_dim,
            });
        }
    }
    Ok(())
}

/// The scoring settings every report records.
fn scoring_settings(a: &EvalArgs, metrics: &[Metric], batch: usize) -> Value {
    json!({"inception": a.common.inception.as_ref().map(|p| p.display().to_string()),
           "fid_dims": a.dims, "is_splits": inception_score::SPLITS, "is_shuffle_seed": inception_score::SHUFFLE_SEED,
           "metrics": metrics.iter().map(|m| format!("{m:?}").to_lowercase()).collect::<Vec<_>>(),
           "inception_batch_size": batch})
}

fn load_for(metrics: &[Metric], a: &EvalArgs) -> Result<Option<InceptionV3>> {
    if !eval::inception::DIMS.contains(&a.dims) {
        bail!("--dims {}: expected one of 64, 192, 768, 2048", a.dims);
    }
    if metrics.contains(&Metric::Fid) {
        match a.real.as_deref() {
            None => bail!("--metrics fid needs --real <image folder or .npz>"),
            Some(r) if !r.exists() => bail!("--real {}: no such folder or file", r.display()),
            _ => {}
        }
    }
    metrics.iter().any(|m| m.needs_inception()).then(|| network(&a.common)).transpose()
}

/// The CLIP scorer when `clip` is asked for, or an error that says which file is needed and
/// where users get it.
fn clip_for(metrics: &[Metric], c: &CommonArgs) -> Result<Option<clip_score::ClipScorer>> {
    if !metrics.contains(&Metric::Clip) {
        return Ok(None);
    }
    let Some(path) = &c.clip else {
        bail!("--metrics clip needs --clip <weights>: sdkd downloads nothing and never scores with random weights; it needs {}", crate::models::open_clip::WEIGHTS_HELP);
    };
    clip_score::ClipScorer::load(&crate::hub::local(path, crate::hub::Want::File)?, c.device()?).map(Some)
}

fn run_report(a: &EvalArgs) -> Result<()> {
    let images = a.images.as_ref().context("give --images <folder>, --model <pipeline> --prompts <file>, or --compare (or use `sdkd eval fid A B`)")?;
    let out = a.out.as_ref().context("give --out <folder> for report.json and report.md")?;
    let metrics = Metric::parse_list(&a.metrics)?;
    if let Existing::Made(m) = fs_safe::existing(out)? {
        if !m.config.is_null() {
            bail!("--out {} holds generated images (an `sdkd eval --model` run): sdkd will not replace them; choose another --out", out.display());
        }
    }
    fs_safe::check_replaceable(out, Purpose::Eval, a.overwrite, "--out")?;
    fs_safe::check_apart(out, images, "the --images folder", "--out")?;
    let batch = a.common.batch_size.unwrap_or(INCEPTION_BATCH);
    let clip = clip_for(&metrics, &a.common)?; // every weights file is checked before any network runs
    let net = load_for(&metrics, a)?;
    let paths = eval::list_images(images)?;
    let clip = match clip {
        Some(scorer) => Some((scorer, clip_score::read_captions(images, a.prompts.as_deref().unwrap_or(images))?)),
        None => None,
    };
    let mut report = json!({"model": images.display().to_string(), "count": paths.len(), "images": images.display().to_string(),
                            "settings": scoring_settings(a, &metrics, batch)});
    let scoring = Scoring { net, clip, paths, images, real: a.real.as_deref(), dims: a.dims, batch, cache: None };
    let mut warnings = vec![];
    for &m in &metrics {
        score(m, &scoring, &mut report, &mut warnings)?;
    }
    report["warnings"] = warnings.into();
    let md = report_md(&[report.clone()]);
    let json = serde_json::to_string_pretty(&report)? + "\n";
    fs_safe::write_dir(out, Some(&Marker::new(Purpose::Eval)), |tmp| {
        std::fs::write(tmp.join("report.json"), &json)?;
        std::fs::write(tmp.join("report.md"), &md)?;
        Ok(())
    })?;
    print!("{md}");
    Ok(())
}

/// Generates (or completes) `--out/images/` by the protocol, then scores the first `--count`.
fn run_generated(a: &EvalArgs) -> Result<()> {
    let model = a.model.as_ref().expect("run_generated needs --model");
    let out = a.out.as_ref().context("give --out <folder>: it gets images/, features/, report.json and report.md")?;
    let prompts_file = a.prompts.as_ref().context("--model needs --prompts <metadata.csv, .jsonl or captions_val2014.json>")?;
    let metrics = Metric::parse_list(&a.metrics)?;
    let captions = prompts::select(prompts::read(prompts_file)?, a.count, a.sample_seed)?;
    let texts: Vec<String> = captions.into_iter().map(|c| c.text).collect();
    let device = a.common.device()?;
    let dtype = a.dtype.unwrap_or(if device.is_cuda() { Precision::Fp16 } else { Precision::Fp32 });
    let generation = Generation {
        scheduler: a.scheduler.name().to_string(),
        steps: a.steps,
        guidance_scale: a.guidance_scale,
        seed: a.seed,
        seeding: a.seeding,
        resolution: a.resolution,
    };
    generation.validate()?;
    // before hours of generation: a bad weights file fails now
    let clip = clip_for(&metrics, &a.common)?;
    let net = load_for(&metrics, a)?;
    let identity = json!({"model": model.display().to_string(), "unet": a.unet.as_ref().map(|u| u.display().to_string()),
                          "ema": a.ema, "dtype": dtype.name(), "device": if device.is_cuda() { "cuda" } else { "cpu" },
                          "generation": &generation});
    let images = out.join("images");
    claim_out(out, &identity)?;
    let all_captions = merge_captions(&images, &texts)?;

    let pipeline = PipelineArgs { model: model.clone(), unet: a.unet.clone(), ema: a.ema, dtype };
    let (t2i, unet) = pipeline.load(device)?;
    let batch_size = a.common.batch_size.unwrap_or(8);
    let mut text = vec![("model", model.display().to_string())];
    text.extend(unet.as_ref().map(|u| ("unet", u.describe())));
    text.push(("Software", format!("sdkd {}", env!("CARGO_PKG_VERSION"))));
    let outcome = gen::generate_missing(&t2i.parts(), &texts, &generation, batch_size, &images, &text, &mut |done, total| {
        eprintln!("generated {done}/{total}");
    })?;
    eprintln!("{} images kept, {} generated in {:.1} s", outcome.kept, outcome.generated, outcome.seconds);
    fs_safe::write_file(&images.join(CAPTIONS), all_captions.as_bytes())?;

    let previous: Option<Value> = std::fs::read_to_string(out.join("report.json")).ok().and_then(|s| serde_json::from_str(&s).ok());
    let seconds_per_image = match outcome.generated {
        0 => previous.as_ref().and_then(|p| p["seconds_per_image"].as_f64()),
        n => Some(outcome.seconds / n as f64),
    };
    let mut paths: Vec<PathBuf> = (0..texts.len()).map(|k| images.join(gen::image_name(k))).collect();
    let scored = match a.score_size {
        0 => images.clone(),
        size => {
            let dir = out.join(format!("images_{size}"));
            paths = gen::resized(&paths, &dir, size)?;
            dir
        }
    };
    let cache = match &a.common.inception {
        Some(w) if net.is_some() => Some(FeatureCache::new(&out.join("features"), w)?),
        _ => None,
    };
    let label = a.unet.as_ref().unwrap_or(model).display().to_string();
    let mut settings = scoring_settings(a, &metrics, INCEPTION_BATCH);
    for (k, v) in identity.as_object().expect("an object").iter().chain(json!(generation).as_object().expect("an object")) {
        if k != "generation" {
            settings[k] = v.clone();
        }
    }
    settings["batch_size"] = batch_size.into();
    settings["score_size"] = a.score_size.into();
    settings["prompts"] = prompts_file.display().to_string().into();
    settings["sample_seed"] = a.sample_seed.into();
    let mut report = json!({"model": label, "count": texts.len(), "images": images.display().to_string(),
        "unet_params": t2i.unet.num_params(), "seconds_per_image": seconds_per_image,
        "kept": outcome.kept, "generated": outcome.generated, "scored": scored.display().to_string(), "settings": settings});
    drop(t2i);
    // CLIP scores the images as generated (its own preprocessing resizes them to 224), paired with their captions
    let clip = clip.map(|scorer| (scorer, texts.iter().enumerate().map(|(k, t)| (images.join(gen::image_name(k)), t.clone())).collect()));
    let scoring = Scoring { net, clip, paths, images: &scored, real: a.real.as_deref(), dims: a.dims, batch: INCEPTION_BATCH, cache };
    let mut warnings = vec![];
    for &m in &metrics {
        score(m, &scoring, &mut report, &mut warnings)?;
    }
    report["warnings"] = warnings.into();
    let md = report_md(&[report.clone()]);
    fs_safe::write_file(&out.join("report.json"), (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;
    fs_safe::write_file(&out.join("report.md"), md.as_bytes())?;
    print!("{md}");
    Ok(())
}

/// The caption sidecar of the images folder: one `{"file_name", "text"}` line per image, the form
/// `--prompts` reads, so `--images` scoring (and the CLIP score) can pair images and captions.
const CAPTIONS: &str = "captions.jsonl";

/// Makes `out` a generation run with `identity`, or checks that it is one with the same: a run
/// with other settings, or anything else, is refused and left as it is.
fn claim_out(out: &Path, identity: &Value) -> Result<()> {
    match fs_safe::existing(out)? {
        Existing::Nothing => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            Marker { config: identity.clone(), ..Marker::new(Purpose::Eval) }.write_into(out)
        }
        Existing::Made(m) if m.purpose == Purpose::Eval && &m.config == identity => Ok(()),
        Existing::Made(m) if m.purpose == Purpose::Eval && m.config.is_null() => {
            bail!("--out {} holds an `sdkd eval --images` report, not generated images: choose another --out", out.display())
        }
        Existing::Made(m) if m.purpose == Purpose::Eval => {
            let differ = differing_keys(&m.config, identity);
            bail!(
                "--out {} holds images generated with other settings ({}: was {}): sdkd will not mix or replace them; choose another --out",
                out.display(),
                differ.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", "),
                differ.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ")
            )
        }
        _ => fs_safe::check_replaceable(out, Purpose::Eval, false, "--out"),
    }
}

/// The keys (dotted) whose values differ, with the old value.
fn differing_keys(old: &Value, new: &Value) -> Vec<(String, Value)> {
    let mut out = vec![];
    match (old.as_object(), new.as_object()) {
        (Some(o), Some(n)) => {
            for k in o.keys().chain(n.keys().filter(|k| !o.contains_key(*k))) {
                let (ov, nv) = (o.get(k).unwrap_or(&Value::Null), n.get(k).unwrap_or(&Value::Null));
                if ov != nv {
                    match (ov.is_object(), nv.is_object()) {
                        (true, true) => out.extend(differing_keys(ov, nv).into_iter().map(|(s, v)| (format!("{k}.{s}"), v))),
                        _ => out.push((k.clone(), ov.clone())),
                    }
                }
            }
        }
        _ => out.push(("settings".into(), old.clone())),
    }
    out
}

/// The captions sidecar after this run: `texts`, then those of earlier images beyond them (a
/// smaller --count keeps them). An image already made from another caption is refused.
fn merge_captions(images: &Path, texts: &[String]) -> Result<String> {
    let file = images.join(CAPTIONS);
    let old: Vec<String> = if file.is_file() { prompts::read(&file)?.into_iter().map(|c| c.text).collect() } else { vec![] };
    for (k, (o, n)) in old.iter().zip(texts).enumerate() {
        if o != n && images.join(gen::image_name(k)).is_file() {
            bail!(
                "--prompts gives image {k} the caption {n:?}, but {} was generated from {o:?}: sdkd will not mix them; choose another --out",
                images.join(gen::image_name(k)).display()
            );
        }
    }
    let merged = texts.iter().chain(old.iter().skip(texts.len()));
    let mut body = String::new();
    for (k, t) in merged.enumerate() {
        body += &(json!({"file_name": gen::image_name(k), "text": t}).to_string() + "\n");
    }
    Ok(body)
}

/// `--compare A/ B/ ...`: one table of their report.json, printed and written to `--out` (a .md).
fn run_compare(a: &EvalArgs) -> Result<()> {
    let mut reports = vec![];
    for dir in &a.compare {
        let file = dir.join("report.json");
        let body = std::fs::read_to_string(&file)
            .with_context(|| format!("--compare {}: no report.json there (an `sdkd eval --out` folder)", dir.display()))?;
        let r: Value = serde_json::from_str(&body).with_context(|| format!("parsing {}", file.display()))?;
        reports.push(r);
    }
    let md = report_md(&reports);
    if let Some(out) = &a.out {
        if out.extension().is_none_or(|e| e != "md") {
            bail!("--compare --out {}: give a .md file for the table", out.display());
        }
        let ours = || std::fs::read_to_string(out).is_ok_and(|s| s.starts_with(TABLE_HEADER));
        fs_safe::check_file_replaceable(out, ours, a.overwrite, "--out")?;
        fs_safe::write_file(out, md.as_bytes())?;
    }
    print!("{md}");
    Ok(())
}

const TABLE_HEADER: &str = "| model | images | FID | IS | CLIP score | UNet params | s/image |\n|---|---|---|---|---|---|---|\n";

/// The report table: one row per report, `—` where a report lacks the value; then warnings.
fn report_md(reports: &[Value]) -> String {
    let mut md = TABLE_HEADER.to_string();
    for r in reports {
        let num = |k: &str| r.get(k).and_then(Value::as_f64);
        let dash = || "—".to_string();
        let fid = num("fid").map_or_else(dash, |v| format!("{v:.4}"));
        let is = match (num("is_mean"), num("is_std")) {
            (Some(m), Some(s)) => format!("{m:.4} ± {s:.4}"),
            _ => dash(),
        };
        let clip = num("clip_score").map_or_else(dash, |v| format!("{v:.4}"));
        let params = r.get("unet_params").and_then(Value::as_i64).map_or_else(dash, |p| match p {
            p if p >= 1_000_000 => format!("{:.1}M", p as f64 / 1e6),
            p => p.to_string(),
        });
        let spi = num("seconds_per_image").map_or_else(dash, |v| format!("{v:.3}"));
        let model = r["model"].as_str().or(r["images"].as_str()).unwrap_or("");
        md += &format!("| {model} | {} | {fid} | {is} | {clip} | {params} | {spi} |\n", r["count"]);
    }
    for r in reports {
        for w in r["warnings"].as_array().into_iter().flatten() {
            md += &format!("\n{}\n", w.as_str().unwrap_or(""));
        }
    }
    md
}
