//! `sdkd export --checkpoint <dir> --out <dir> [--ema] [--format unet|pipeline|single-file] [--dtype]`:
//! a training checkpoint as a diffusers UNet folder, as a whole pipeline beside the teacher's
//! other parts, or as one LDM-layout `.safetensors` file with the teacher's VAE and text encoder.
//! `--out` must be new or empty, or an earlier sdkd export of the same format with
//! `--overwrite`; never the checkpoint (or inside it), its run or the teacher (or inside it).
//! `--fuse FILE[:SCALE]` merges LoRAs into the UNet it writes (W += scale · alpha/r · B·A).
//! Every export gets a model card (`README.md`, `hub::card`); `--push-to-hub org/name` then
//! uploads the export with it as one commit (`hub::push`).
use crate::distill::checkpoint::Checkpoint;
use crate::lora::{Layout, LoraSet};
use crate::lora::ScaledLora;
use crate::runtime::Precision;
use crate::export::{self, ExportFormat};
use crate::fs_safe;
use crate::hub::{self, Want};
use crate::models::{weights, UNetConfig};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint folder (`<output_dir>/checkpoints/step-N`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an earlier sdkd export of the same format at --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Export the EMA weights instead of the raw student.
    #[arg(long)]
    pub ema: bool,
    #[arg(long, value_enum, default_value = "unet")]
    pub format: ExportFormat,
    /// Storage dtype of the written weights (default fp32; fp16 for `--format single-file`).
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
    /// The teacher pipeline (folder or single file) whose other parts go beside the UNet
    /// (`--format pipeline`/`single-file`); by default the run's own teacher, recorded in the
    /// checkpoint.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Upload the export (with its model card) to this hub model repository (`org/name`),
    /// created when missing, through HF_ENDPOINT with HF_TOKEN or the login token. Files the
    /// repository already has are replaced only with --overwrite.
    #[arg(long, value_name = "ORG/NAME")]
    pub push_to_hub: Option<String>,
    /// A `lora:` run's checkpoint: write its adapters as one LoRA file at --out
    /// (`<name>.safetensors`) instead of a UNet.
    #[arg(long)]
    pub lora: bool,
    /// The LoRA file's layout: diffusers (`load_lora_weights`) or kohya (A1111, ComfyUI).
    #[arg(long, value_enum, default_value = "diffusers", requires = "lora")]
    pub lora_format: Layout,
    /// A LoRA to merge into the exported UNet, FILE[:SCALE] (diffusers' or kohya's layout; scale 1
    /// when not given); repeatable, merged in order (docs/lora.md).
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub fuse: Vec<PathBuf>,
}

/// The run folder of a checkpoint at `<run>/checkpoints/step-N`.
fn run_of(checkpoint: &Path) -> Option<&Path> {
    let parent = checkpoint.parent()?;
    (parent.file_name()? == "checkpoints").then(|| parent.parent()).flatten()
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let loras: Vec<ScaledLora> = args.fuse.iter().map(|l| ScaledLora::parse(l).context("--fuse")).collect::<Result<_>>()?;
    let ckpt = Checkpoint::open(&args.checkpoint)?;
    fs_safe::check_apart(&args.out, &ckpt.dir, "the checkpoint", "--out")?;
    let ckpt_dir = ckpt.dir.canonicalize().unwrap_or_else(|_| ckpt.dir.clone());
    if let Some(run) = run_of(&ckpt_dir) {
        fs_safe::check_not_over(&args.out, run, "the checkpoint's run", "--out")?;
    }
    let config = UNetConfig::from_json(&ckpt.unet_config).with_context(|| format!("{}: unet/config.json", ckpt.dir.display()))?;
    match (args.lora, ckpt.is_lora()) {
        (true, true) => return export_lora(args, &ckpt, &config),
        (true, false) => bail!("--lora: checkpoint {} holds a whole student, not LoRA adapters (its run had no lora: section)", ckpt.dir.display()),
        (false, true) => bail!("checkpoint {} holds LoRA adapters only: export them with --lora [--lora-format diffusers|kohya]", ckpt.dir.display()),
        (false, false) => {}
    }
    let file = if args.ema {
        ckpt.ema_file().ok_or_else(|| anyhow!("--ema: checkpoint {} has no EMA weights (the run had no train.ema_decay)", ckpt.dir.display()))?
    } else {
        ckpt.student_file()
    };
    if let Some(repo) = &args.push_to_hub {
        // before the export's work: a malformed id fails now
        hub::push::check_target(&hub::Env::from_env(), repo)?;
    }
    let teacher = match (args.format, &args.teacher) {
        (ExportFormat::Unet, _) => None,
        (_, Some(t)) => Some(hub::local(t, Want::Pipeline)?),
        (_, None) => {
            let t = ckpt.meta.config["teacher"].as_str().map(PathBuf::from).ok_or_else(|| {
                anyhow!("checkpoint {} records no teacher pipeline: pass --teacher <pipeline dir>", ckpt.dir.display())
            })?;
            // a hub id at the commit the run recorded
            let text = |k: &str| ckpt.meta.config[k].as_str().map(str::to_string);
            let options = hub::Options { revision: text("revision"), variant: text("variant") };
            Some(hub::resolve(&t, Want::Pipeline, &options).with_context(|| format!("the teacher checkpoint {} records", ckpt.dir.display()))?.path)
        }
    };
    if let Some(teacher) = &teacher {
        fs_safe::check_apart(&args.out, teacher, "the teacher pipeline", "--out")?;
    }
    if args.format == ExportFormat::SingleFile {
        export::check_single_file_replaceable(&args.out, args.overwrite, "--out")?;
    } else {
        fs_safe::check_replaceable(&args.out, args.format.purpose(), args.overwrite, "--out")?;
    }
    let tensors = weights::read_all(&file)?;
    crate::lora::fuse_unet_files(&config, &tensors, &loras)?;
    let kind = Some(args.dtype.unwrap_or(export::default_dtype(args.format)).kind());
    match &teacher {
        None => export::write_unet_dir(&args.out, &config, &tensors, kind)?,
        Some(teacher) => {
            let title = format!("{} step {}", ckpt.meta.config["student"].as_str().unwrap_or("student"), ckpt.meta.step);
            // an LCM student's scheduler config repeats the grid it was distilled on
            let lcm = crate::config::LcmConfig::of_recorded(&ckpt.meta.config).with_context(|| format!("checkpoint {}: config.lcm", ckpt.dir.display()))?;
            export::write_student(&args.out, args.format, teacher, &config, &tensors, kind, &title, lcm.grid())?
        }
    }
    let card_path = write_card(args, &ckpt, &config, teacher.as_deref())?;
    let fused = if loras.is_empty() { String::new() } else { format!(" with LoRA {} merged", super::generate::describe_loras(&loras)) };
    println!(
        "exported step {} ({}{fused}) of {} to {} (model card {})",
        ckpt.meta.step,
        if args.ema { "EMA" } else { "student" },
        ckpt.dir.display(),
        args.out.display(),
        card_path.display()
    );
    if let Some(repo) = &args.push_to_hub {
        let files = upload_list(&args.out, args.format, &card_path)?;
        let message = format!("sdkd export of step {} ({})", ckpt.meta.step, ckpt.meta.config["student"].as_str().unwrap_or("student"));
        let url = hub::push::push(&hub::Env::from_env(), repo, &files, args.overwrite, &message)?;
        println!("pushed {} files to {repo}: {url}", files.len());
    }
    Ok(())
}

/// `--lora`: the checkpoint's adapters as one LoRA file at --out in `--lora-format`, with the
/// alpha of the run's `lora:` section.
fn export_lora(args: &ExportArgs, ckpt: &Checkpoint, config: &UNetConfig) -> Result<()> {
    let given = [("--ema", args.ema), ("--push-to-hub", args.push_to_hub.is_some()), ("--teacher", args.teacher.is_some()), ("--fuse", !args.fuse.is_empty())];
    for (flag, set) in given {
        if set {
            bail!("{flag} does not apply to --lora (a LoRA file holds the adapters alone)");
        }
    }
    if args.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("--out {}: a LoRA file is written as .safetensors; name it <name>.safetensors (diffusers looks for {} in a folder)", args.out.display(), crate::lora::DIFFUSERS_FILE);
    }
    // an earlier LoRA file (keys of either layout) may be replaced with --overwrite, nothing else
    let is_lora = || weights::MappedFile::open(&args.out).and_then(|f| Ok(f.parse()?.names().into_iter().map(str::to_string).collect::<Vec<_>>())).is_ok_and(|n| Layout::detect(&n).is_ok());
    fs_safe::check_file_replaceable(&args.out, is_lora, args.overwrite, "--out")?;
    let lora: crate::lora::config::LoraConfig = serde_json::from_value(ckpt.meta.config["lora"].clone())
        .with_context(|| format!("checkpoint {}: the run's lora: section", ckpt.dir.display()))?;
    let set = LoraSet::from_trained(&weights::read_all(&ckpt.student_file())?, lora.alpha()).with_context(|| format!("{}", ckpt.student_file().display()))?;
    set.write(&args.out, args.lora_format, config)?;
    println!(
        "exported the {} LoRA adapters ({} parameters, rank {}, alpha {}) of step {} of {} to {} ({} layout)",
        set.len(),
        set.parameters(),
        lora.rank,
        lora.alpha(),
        ckpt.meta.step,
        ckpt.dir.display(),
        args.out.display(),
        args.lora_format.name()
    );
    Ok(())
}

/// Writes the model card beside or into the export and returns its path. A single file's card
/// is `README.md` beside it unless a README.md that sdkd did not write is there
/// (then `<name>.README.md`).
fn write_card(args: &ExportArgs, ckpt: &Checkpoint, config: &UNetConfig, teacher: Option<&Path>) -> Result<PathBuf> {
    use crate::models::{Init, PipelineDir, UNet};
    let run = &ckpt.meta.config;
    let teacher_id = run["teacher"].as_str().filter(|_| args.teacher.is_none()).map(PathBuf::from).or_else(|| args.teacher.clone());
    let base_model = teacher_id.as_deref().filter(|t| hub::is_hub_id(t, None)).and_then(|t| t.to_str()).and_then(hub::HubId::parse).map(|i| i.repo);
    // the teacher's UNet, counted on the meta device: the resolved teacher, or a cached one (never fetched for this)
    let teacher_dir = teacher.map(Path::to_path_buf).or_else(|| {
        let text = |k: &str| run[k].as_str().map(str::to_string);
        let options = hub::Options { revision: text("revision"), variant: text("variant") };
        teacher_id.as_deref().and_then(|t| hub::resolve_cached(t, Want::Unet, &options)).map(|r| r.path)
    });
    let count = |c: &UNetConfig| UNet::build(c, tch::Device::Cpu, tch::Kind::Float, Init::Empty).num_params() as u64;
    let opened = teacher_dir.as_deref().and_then(|d| PipelineDir::open(d).ok());
    let teacher_params = opened.as_ref().and_then(|p| p.unet_config().ok()).map(|c| count(&c));
    let license = teacher_dir
        .as_deref()
        .and_then(|d| std::fs::read_to_string(d.join("README.md")).ok())
        .and_then(|t| hub::card::header(&t))
        .and_then(|h| h.get("license").and_then(|l| l.as_str()).map(str::to_string));
    let eval = run_of(&ckpt.dir.canonicalize().unwrap_or_else(|_| ckpt.dir.clone())).and_then(|r| latest_eval(r, ckpt.meta.step));
    let file_name = (args.format == ExportFormat::SingleFile).then(|| args.out.file_name().map(|n| n.to_string_lossy().into_owned())).flatten();
    let card = hub::card::Card {
        title: format!("{} distilled from {}", run["student"].as_str().unwrap_or("student"), base_model.clone().unwrap_or_else(|| "its teacher".into())),
        format: match args.format {
            ExportFormat::Unet => "unet",
            ExportFormat::Pipeline => "pipeline",
            ExportFormat::SingleFile => "single-file",
        },
        file_name,
        run,
        step: ckpt.meta.step,
        ema: args.ema,
        student_params: count(config),
        teacher_params,
        base_model,
        license,
        eval,
    };
    let path = match args.format {
        ExportFormat::SingleFile => {
            let beside = args.out.with_file_name("README.md");
            let ours = |p: &Path| std::fs::read_to_string(p).map(|t| t.contains(hub::card::MARK)).unwrap_or(true);
            if ours(&beside) {
                beside
            } else {
                let name = args.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                args.out.with_file_name(format!("{}.README.md", name.trim_end_matches(".safetensors")))
            }
        }
        _ => args.out.join("README.md"),
    };
    fs_safe::write_file(&path, card.render().as_bytes()).with_context(|| format!("writing the model card {}", path.display()))?;
    if args.format != ExportFormat::SingleFile {
        fs_safe::relist(&args.out)?; // the card is sdkd's too
    }
    Ok(path)
}

/// The newest `eval/step-N/report.json` of a run at or before `step`.
fn latest_eval(run: &Path, step: u64) -> Option<serde_json::Value> {
    let best = std::fs::read_dir(run.join("eval"))
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        .filter(|s| *s <= step)
        .max()?;
    let text = std::fs::read_to_string(run.join(format!("eval/step-{best}/report.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// The files an export uploads: a folder's files (not sdkd's marker), or the single file, its
/// `.yaml` and the card as README.md.
fn upload_list(out: &Path, format: ExportFormat, card: &Path) -> Result<Vec<hub::push::Upload>> {
    use hub::push::Upload;
    if format == ExportFormat::SingleFile {
        let mut files = vec![Upload { path_in_repo: "README.md".into(), local: card.to_path_buf() }];
        for p in [out.to_path_buf(), out.with_extension("yaml")] {
            if p.is_file() {
                files.push(Upload { path_in_repo: p.file_name().expect("a path that is_file has a name").to_string_lossy().into_owned(), local: p });
            }
        }
        return Ok(files);
    }
    fn walk(root: &Path, dir: &Path, out: &mut Vec<hub::push::Upload>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else if p.file_name().is_some_and(|n| n != fs_safe::MARKER) {
                let rel = p.strip_prefix(root).expect("under the root").to_string_lossy().replace('\\', "/");
                out.push(hub::push::Upload { path_in_repo: rel, local: p });
            }
        }
        Ok(())
    }
    let mut files = vec![];
    walk(out, out, &mut files)?;
    files.sort_by(|a, b| a.path_in_repo.cmp(&b.path_in_repo));
    Ok(files)
}
