//! `sdkd eval`: FID (pytorch-fid), Inception Score (torch-fidelity) and CLIP score (open_clip
//! ViT-g-14) of image folders, with the networks read from their published weight files. `sdkd eval fid A B` is pytorch-fid's own
//! command line; `sdkd eval --images ... --real ... --out ...` writes report.json and report.md.
use crate::eval::{self, clip_score, fid, inception::InceptionV3, inception_score, Frontend};
use crate::fs_safe::{self, Marker, Purpose};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use tch::Device;

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
    /// The captions of --images for the CLIP score: a metadata.csv / metadata.jsonl with
    /// file_name and text (or caption), or a folder holding one (default: the --images folder).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The report folder (report.json, report.md): new or empty, or an earlier one with --overwrite.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an earlier sdkd eval report in --out (never a folder sdkd did not make).
    #[arg(long)]
    pub overwrite: bool,
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
    /// Images per Inception batch.
    #[arg(long, default_value_t = 50)]
    pub batch_size: usize,
    /// cpu, or cuda (the default when one is present).
    #[arg(long)]
    pub device: Option<String>,
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

fn device(name: Option<&str>) -> Result<Device> {
    Ok(match name {
        None => Device::cuda_if_available(),
        Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(other) => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => Device::Cuda(i),
            None => bail!("--device {other:?}: expected cpu, cuda or cuda:N"),
        },
    })
}

/// The network, or an error that says which file is needed and where users get it.
fn network(c: &CommonArgs) -> Result<InceptionV3> {
    let Some(path) = &c.inception else {
        bail!("--inception is required: sdkd downloads nothing and never scores with random weights; it needs {}", eval::inception::WEIGHTS_HELP);
    };
    InceptionV3::load(path, device(c.device.as_deref())?)
}

pub fn run(a: &EvalArgs) -> Result<()> {
    match &a.tool {
        Some(EvalTool::Fid(f)) => run_fid(f),
        None => run_report(a),
    }
}

fn run_fid(f: &FidArgs) -> Result<()> {
    let net = network(&f.common)?;
    let (p1, p2) = (&f.paths[0], &f.paths[1]);
    if f.save_stats {
        if p2.exists() {
            bail!("{} exists: --save-stats writes a new .npz and replaces nothing", p2.display());
        }
        let s = eval::stats_of(p1, &net, f.dims, f.common.batch_size)?;
        warn_few(p1, &s, f.dims);
        return s.write_npz(p2);
    }
    let s1 = eval::stats_of(p1, &net, f.dims, f.common.batch_size)?;
    warn_few(p1, &s1, f.dims);
    let s2 = eval::stats_of(p2, &net, f.dims, f.common.batch_size)?;
    warn_few(p2, &s2, f.dims);
    println!("FID: {}", fid::frechet_distance(&s1, &s2)?);
    Ok(())
}

fn warn_few(path: &Path, s: &fid::Stats, dims: i64) {
    if let Some(w) = s.count.and_then(|n| eval::few_images_warning(path, n, dims)) {
        eprintln!("{w}");
    }
}

fn run_report(a: &EvalArgs) -> Result<()> {
    let images = a.images.as_ref().context("give --images <folder> (or use `sdkd eval fid A B`)")?;
    let out = a.out.as_ref().context("give --out <folder> for report.json and report.md")?;
    let metrics: Vec<&str> = a.metrics.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
    if let Some(bad) = metrics.iter().find(|m| !["fid", "is", "clip"].contains(m)) {
        bail!("--metrics: unknown metric {bad:?} (fid, is, clip)");
    }
    fs_safe::check_replaceable(out, Purpose::Eval, a.overwrite, "--out")?;
    fs_safe::check_apart(out, images, "the --images folder", "--out")?;
    // Every weights file is checked before any network runs.
    let clip = metrics.contains(&"clip").then(|| clip_scorer(&a.common)).transpose()?;
    let net = (metrics.contains(&"fid") || metrics.contains(&"is")).then(|| network(&a.common)).transpose()?;
    let paths = eval::list_images(images)?;
    let batch = a.common.batch_size;
    let mut report = serde_json::json!({
        "count": paths.len(),
        "images": images.display().to_string(),
        "settings": {"inception": a.common.inception.as_ref().map(|p| p.display().to_string()),
                     "fid_dims": 2048, "is_splits": inception_score::SPLITS, "is_shuffle_seed": inception_score::SHUFFLE_SEED},
    });
    let mut warnings = vec![];
    if let Some(scorer) = &clip {
        let pairs = clip_score::read_captions(images, a.prompts.as_deref().unwrap_or(images))?;
        let s = scorer.score_files(&pairs, batch)?;
        report["clip_score"] = s.mean_cosine.into();
        report["clip_score_torchmetrics"] = s.torchmetrics.into();
        report["clip_count"] = s.count.into();
        let c = &scorer.model.config;
        report["settings"]["clip"] = serde_json::json!({
            "weights": scorer.model.path.display().to_string(),
            "image_size": c.vision.image_size, "patch_size": c.vision.patch_size, "vision_width": c.vision.width,
            "vision_layers": c.vision.layers, "text_width": c.text.width, "text_layers": c.text.layers, "embed_dim": c.embed_dim,
        });
    }
    if let Some(net) = &net {
        if metrics.contains(&"fid") {
            let real = a.real.as_ref().context("--metrics fid needs --real <image folder or .npz>")?;
            let (f, _) = eval::features(net, &paths, Frontend::PytorchFid, 2048, batch)?;
            let gen = fid::Stats::from_features(&f)?;
            let real_stats = eval::stats_of(real, net, 2048, batch)?;
            for (p, s) in [(images, &gen), (real, &real_stats)] {
                if let Some(w) = s.count.and_then(|n| eval::few_images_warning(p, n, 2048)) {
                    eprintln!("{w}");
                    warnings.push(w);
                }
            }
            report["fid"] = fid::frechet_distance(&gen, &real_stats)?.into();
            report["real"] = real.display().to_string().into();
        }
        if metrics.contains(&"is") {
            let (_, logits) = eval::features(net, &paths, Frontend::TorchFidelity, 2048, batch)?;
            let (m, s) = inception_score::inception_score(&logits.expect("2048 features come with logits"), inception_score::SPLITS)?;
            report["is_mean"] = m.into();
            report["is_std"] = s.into();
        }
    }
    write_report(out, report, warnings)
}

/// The CLIP scorer, or an error that says which file is needed and where users get it.
fn clip_scorer(c: &CommonArgs) -> Result<clip_score::ClipScorer> {
    let Some(path) = &c.clip else {
        bail!("--metrics clip needs --clip <weights>: sdkd downloads nothing and never scores with random weights; it needs {}", crate::models::open_clip::WEIGHTS_HELP);
    };
    clip_score::ClipScorer::load(path, device(c.device.as_deref())?)
}

fn write_report(out: &Path, mut report: serde_json::Value, warnings: Vec<String>) -> Result<()> {
    report["warnings"] = warnings.into();
    let md = report_md(&report);
    let json = serde_json::to_string_pretty(&report)? + "\n";
    fs_safe::write_dir(out, Some(&Marker::new(Purpose::Eval)), |tmp| {
        std::fs::write(tmp.join("report.json"), &json)?;
        std::fs::write(tmp.join("report.md"), &md)?;
        Ok(())
    })?;
    print!("{md}");
    Ok(())
}

fn report_md(r: &serde_json::Value) -> String {
    let num = |k: &str| r.get(k).and_then(|v| v.as_f64());
    let fid = num("fid").map_or("-".to_string(), |v| format!("{v:.4}"));
    let is = match (num("is_mean"), num("is_std")) {
        (Some(m), Some(s)) => format!("{m:.4} ± {s:.4}"),
        _ => "-".to_string(),
    };
    let clip = num("clip_score").map_or("-".to_string(), |v| format!("{v:.4}"));
    let mut md = format!(
        "| images | count | FID | IS | CLIP |\n|---|---|---|---|---|\n| {} | {} | {fid} | {is} | {clip} |\n",
        r["images"].as_str().unwrap_or(""),
        r["count"]
    );
    for w in r["warnings"].as_array().into_iter().flatten() {
        md += &format!("\n{}\n", w.as_str().unwrap_or(""));
    }
    md
}
