//! `sdkd eval`: FID (pytorch-fid), Inception Score (torch-fidelity) and CLIP score (open_clip),
//! with the networks read from their published weight files. `sdkd eval fid A B` is pytorch-fid's own command line;
//! `sdkd eval --images ... --out ...` scores a folder; `sdkd eval --model ... --prompts ... --out ...`
//! generates the images first by BK-SDM's protocol (resumable, batch-invariant seeds) and scores
//! them with a per-image feature cache; `sdkd eval --compare A/ B/` tabulates reports.
use crate::eval::generate::{self as gen, Generation, Seeding};
use crate::eval::protocol::{
    ClipWeights, FidDims, GenerationSettings, Images, ModelSettings, RealStats, Report, Scorer, Settings, GENERATION_BATCH,
    INCEPTION_BATCH,
};
use crate::eval::{self, clip_score, fid, inception::InceptionV3, prompts, FeatureCache, Metric};
use crate::fs_safe::{self, Existing, Marker, Purpose};
use crate::json_config::differing_keys;
use crate::lora::ScaledLora;
use crate::pipeline::{TextToImage, UnetSource};
use crate::runtime::{DeviceChoice, Precision};
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
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fid,is")]
    pub metrics: Vec<Metric>,
    /// FID's Inception features: 64, 192, 768 or 2048 (pool3, the standard).
    #[arg(long, value_enum, default_value = "2048")]
    pub dims: FidDims,
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
    /// With --model: a LoRA fused into the UNet and text encoders, FILE[:SCALE]; repeatable
    /// (docs/lora.md).
    #[arg(long = "lora", value_name = "FILE[:SCALE]", requires = "model")]
    pub loras: Vec<PathBuf>,
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
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

impl CommonArgs {
    fn device(&self) -> Result<tch::Device> {
        self.device.resolve().context("--device")
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
    #[arg(long, value_enum, default_value = "2048")]
    pub dims: FidDims,
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
    let common = match &a.tool {
        Some(EvalTool::Fid(f)) => &f.common,
        None => &a.common,
    };
    if common.batch_size == Some(0) {
        bail!("--batch-size 0: must be at least 1");
    }
    match &a.tool {
        Some(EvalTool::Fid(f)) => run_fid(f),
        None if !a.compare.is_empty() => run_compare(a),
        None if a.model.is_some() => run_generated(a),
        None => run_report(a),
    }
}

fn run_fid(f: &FidArgs) -> Result<()> {
    let net = network(&f.common)?;
    let batch = f.common.batch_size.unwrap_or(INCEPTION_BATCH);
    let (p1, p2) = (&f.paths[0], &f.paths[1]);
    let dims = f.dims.features();
    let read = |p: &Path| -> Result<RealStats> {
        let s = RealStats::read(p, &net, dims, batch)?;
        if let Some(w) = s.warning(dims) {
            eprintln!("{w}");
        }
        Ok(s)
    };
    if f.save_stats {
        if p2.exists() {
            bail!("{} exists: --save-stats writes a new .npz and replaces nothing", p2.display());
        }
        return read(p1)?.stats.write_npz(p2);
    }
    let (s1, s2) = (read(p1)?, read(p2)?);
    println!("FID: {}", fid::frechet_distance(&s1.stats, &s2.stats)?);
    Ok(())
}

/// The asked metrics, each once, in their order.
fn metrics(a: &EvalArgs) -> Vec<Metric> {
    let mut out: Vec<Metric> = vec![];
    for &m in &a.metrics {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// The scorer of `metrics`: every weights file is read before any network runs or image is
/// generated, and each missing file is named with the flag that gives it and where users get it.
/// The real statistics come later (`with_real`), as they may take a while.
fn scorer(metrics: Vec<Metric>, a: &EvalArgs, batch: usize) -> Result<Scorer> {
    let clip = match metrics.contains(&Metric::Clip) {
        true => {
            let Some(path) = &a.common.clip else {
                bail!("--metrics clip needs --clip <weights>: sdkd downloads nothing and never scores with random weights; it needs {}", crate::models::open_clip::WEIGHTS_HELP);
            };
            Some(ClipWeights::Loaded(clip_score::ClipScorer::load(&crate::hub::local(path, crate::hub::Want::File)?, a.common.device()?)?))
        }
        false => None,
    };
    if metrics.contains(&Metric::Fid) {
        match a.real.as_deref() {
            None => bail!("--metrics fid needs --real <image folder or .npz>"),
            Some(r) if !r.exists() => bail!("--real {}: no such folder or file", r.display()),
            _ => {}
        }
    }
    let inception = match metrics.iter().any(|m| m.needs_inception()) {
        true => Some((network(&a.common)?, a.common.inception.clone().expect("network() needs it"))),
        false => None,
    };
    Ok(Scorer { metrics, inception, real: None, clip, dims: a.dims.features(), batch })
}

/// The scorer with the real images' statistics, when FID is asked for.
fn with_real(mut s: Scorer, a: &EvalArgs) -> Result<Scorer> {
    if let (true, Some(real), Some((net, _))) = (s.metrics.contains(&Metric::Fid), a.real.as_deref(), &s.inception) {
        s.real = Some(RealStats::read(real, net, s.dims, s.batch)?);
    }
    Ok(s)
}

fn run_report(a: &EvalArgs) -> Result<()> {
    let images = a.images.as_ref().context("give --images <folder>, --model <pipeline> --prompts <file>, or --compare (or use `sdkd eval fid A B`)")?;
    let out = a.out.as_ref().context("give --out <folder> for report.json and report.md")?;
    if let Existing::Made(m) = fs_safe::existing(out)? {
        if !m.config.is_null() {
            bail!("--out {} holds generated images (an `sdkd eval --model` run): sdkd will not replace them; choose another --out", out.display());
        }
    }
    fs_safe::check_replaceable(out, Purpose::Eval, a.overwrite, "--out")?;
    fs_safe::check_apart(out, images, "the --images folder", "--out")?;
    let scorer = scorer(metrics(a), a, a.common.batch_size.unwrap_or(INCEPTION_BATCH))?;
    let paths = eval::list_images(images)?;
    let captioned = match scorer.clip.is_some() {
        true => clip_score::read_captions(images, a.prompts.as_deref().unwrap_or(images))?,
        false => vec![],
    };
    let scorer = with_real(scorer, a)?;
    let scores = scorer.score(&Images { folder: images, scored: &paths, captioned, cache: None })?;
    let report = Report {
        model: images.display().to_string(),
        step: None,
        count: paths.len(),
        images: Some(images.display().to_string()),
        scored: None,
        unet_params: None,
        kept: None,
        generated: None,
        seconds_per_image: None,
        seconds: None,
        settings: Settings { scoring: scorer.settings(scores.clip_settings.clone()), generation: None },
        warnings: warned(&scores.warnings),
        scores,
    };
    let md = report_md(&[serde_json::to_value(&report)?]);
    let json = report.to_json()?;
    fs_safe::write_dir(out, Some(&Marker::new(Purpose::Eval)), |tmp| {
        std::fs::write(tmp.join("report.json"), &json)?;
        std::fs::write(tmp.join("report.md"), &md)?;
        Ok(())
    })?;
    print!("{md}");
    Ok(())
}

/// Prints the warnings of a scoring; returns them for the report.
fn warned(warnings: &[String]) -> Vec<String> {
    for w in warnings {
        eprintln!("{w}");
    }
    warnings.to_vec()
}

/// What decides a `--model` run's images and marks its --out (a rerun must match it).
#[derive(serde::Serialize)]
struct Identity<'a> {
    #[serde(flatten)]
    model: &'a ModelSettings,
    generation: &'a Generation,
}

/// Generates (or completes) `--out/images/` by the protocol, then scores the first `--count`.
fn run_generated(a: &EvalArgs) -> Result<()> {
    let model = a.model.as_ref().expect("run_generated needs --model");
    let out = a.out.as_ref().context("give --out <folder>: it gets images/, features/, report.json and report.md")?;
    let prompts_file = a.prompts.as_ref().context("--model needs --prompts <metadata.csv, .jsonl or captions_val2014.json>")?;
    let captions = prompts::select(prompts::read(prompts_file)?, a.count, a.sample_seed)?;
    let texts: Vec<String> = captions.into_iter().map(|c| c.text).collect();
    let loras: Vec<ScaledLora> = a.loras.iter().map(|l| ScaledLora::parse(l).context("--lora")).collect::<Result<_>>()?;
    let device = a.common.device()?;
    let dtype = a.dtype.unwrap_or(if device.is_cuda() { Precision::Fp16 } else { Precision::Fp32 });
    let generation = Generation {
        scheduler: a.scheduler,
        steps: a.steps,
        guidance_scale: a.guidance_scale,
        seed: a.seed,
        seeding: a.seeding,
        resolution: a.resolution,
    };
    generation.validate()?;
    // before hours of generation: a bad weights file fails now
    let scorer = scorer(metrics(a), a, INCEPTION_BATCH)?;
    let source = ModelSettings {
        model: model.display().to_string(),
        unet: a.unet.as_ref().map(|u| u.display().to_string()),
        ema: a.ema,
        lora: loras.iter().map(|l| format!("{}:{}", l.path.display(), l.scale)).collect(),
        dtype: dtype.name(),
        device: if device.is_cuda() { "cuda" } else { "cpu" },
    };
    let identity = serde_json::to_value(Identity { model: &source, generation: &generation })?;
    let images = out.join("images");
    claim_out(out, &identity)?;
    let all_captions = merge_captions(&images, &texts)?;

    let unet = a.unet.as_deref().map(|p| UnetSource::resolve(p, a.ema)).transpose()?;
    let t2i = TextToImage::load_with_loras(model, unet.as_ref(), &loras, device, dtype.kind())?;
    let batch_size = a.common.batch_size.unwrap_or(GENERATION_BATCH);
    let mut text = vec![("model", model.display().to_string())];
    text.extend(unet.as_ref().map(|u| ("unet", u.describe())));
    if !loras.is_empty() {
        text.push(("lora", super::generate::describe_loras(&loras)));
    }
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
    let generated: Vec<PathBuf> = (0..texts.len()).map(|k| images.join(gen::image_name(k))).collect();
    let (scored_dir, scored) = match a.score_size {
        0 => (images.clone(), generated.clone()),
        size => {
            let dir = out.join(format!("images_{size}"));
            let paths = gen::resized(&generated, &dir, size)?;
            (dir, paths)
        }
    };
    let cache = match &scorer.inception {
        Some((_, w)) => Some(FeatureCache::new(&out.join("features"), w)?),
        None => None,
    };
    let unet_params = t2i.unet.num_params();
    drop(t2i);
    let scorer = with_real(scorer, a)?;
    // CLIP scores the images as generated (its own preprocessing resizes them to 224), paired with their captions
    let captioned = generated.into_iter().zip(texts.iter().cloned()).collect();
    let scores = scorer.score(&Images { folder: &scored_dir, scored: &scored, captioned, cache: cache.as_ref() })?;
    let settings = Settings {
        scoring: scorer.settings(scores.clip_settings.clone()),
        generation: Some(GenerationSettings {
            generation,
            batch_size,
            score_size: a.score_size,
            prompts: prompts_file.display().to_string(),
            sample_seed: a.sample_seed,
            model: Some(source),
        }),
    };
    let report = Report {
        model: a.unet.as_ref().unwrap_or(model).display().to_string(),
        step: None,
        count: texts.len(),
        images: Some(images.display().to_string()),
        scored: Some(scored_dir.display().to_string()),
        unet_params: Some(unet_params),
        kept: Some(outcome.kept),
        generated: Some(outcome.generated),
        seconds_per_image: Some(seconds_per_image),
        seconds: None,
        settings,
        warnings: warned(&scores.warnings),
        scores,
    };
    let md = report_md(&[serde_json::to_value(&report)?]);
    fs_safe::write_file(&out.join("report.json"), report.to_json()?.as_bytes())?;
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
            let differ: Vec<(String, Value)> = differing_keys(&m.config, identity)
                .into_iter()
                .map(|(k, old, _)| (if k.is_empty() { "settings".to_string() } else { k }, old))
                .collect();
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
