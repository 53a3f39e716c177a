//! `sdkd inspect`: architecture tables and parameter counts, of a UNet (and a student built
//! from it) or of a whole pipeline.
use crate::formatting::group_digits;
use crate::distill::student::{StudentPlan, StudentSpec};
use crate::models::{ClipTextEncoder, ClipTokenizer, Init, Part, PipelineDir, UNet, UNetConfig};
use anyhow::Result;
use clap::Args;
use serde_json::{json, Value};
use std::path::PathBuf;
use tch::{Device, Kind};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A UNet config.json or a diffusers UNet folder.
    #[arg(long)]
    pub unet: Option<PathBuf>,
    /// A student preset (bk_base/sd_small, bk_small, bk_tiny/sd_tiny; on an SDXL teacher also ssd_1b, vega, koala_1b, koala_700m) or spec YAML to build from it.
    #[arg(long)]
    pub student: Option<String>,
    /// A diffusers pipeline folder or a single-file checkpoint: loads every part and counts its parameters.
    #[arg(long, conflicts_with = "unet")]
    pub model: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// One row of the architecture table.
struct BlockRow {
    name: String,
    kind: String,
    channels: i64,
    resnets: usize,
    attentions: usize,
    params: i64,
}

/// Counts and describes a UNet built from `config` without touching its weights' memory.
pub fn describe_unet(config: &UNetConfig) -> Value {
    let unet = UNet::build(config, Device::Cpu, Kind::Float, Init::Empty);
    let vars = unet.vs.variables();
    let params_under = |prefix: &str| -> i64 {
        vars.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, t)| t.numel() as i64).sum()
    };
    let count = |prefix: &str, part: &str| -> usize {
        let p = format!("{prefix}{part}.");
        let mut idx: Vec<&str> = vars.keys().filter_map(|k| k.strip_prefix(&p)).filter_map(|r| r.split('.').next()).collect();
        idx.sort();
        idx.dedup();
        idx.len()
    };
    let mut rows = vec![];
    let n = config.num_stages();
    for i in 0..n {
        let prefix = format!("down_blocks.{i}.");
        rows.push(BlockRow {
            name: format!("down_blocks.{i}"),
            kind: config.down_block_types[i].diffusers_name().into(),
            channels: config.block_out_channels[i],
            resnets: count(&prefix, "resnets"),
            attentions: count(&prefix, "attentions"),
            params: params_under(&prefix),
        });
    }
    if let Some(mid) = config.mid_block {
        rows.push(BlockRow {
            name: "mid_block".into(),
            kind: mid.diffusers_name().into(),
            channels: config.block_out_channels[n - 1],
            resnets: count("mid_block.", "resnets"),
            attentions: count("mid_block.", "attentions"),
            params: params_under("mid_block."),
        });
    }
    for i in 0..n {
        let prefix = format!("up_blocks.{i}.");
        rows.push(BlockRow {
            name: format!("up_blocks.{i}"),
            kind: config.up_block_types[i].diffusers_name().into(),
            channels: config.block_out_channels[n - 1 - i],
            resnets: count(&prefix, "resnets"),
            attentions: count(&prefix, "attentions"),
            params: params_under(&prefix),
        });
    }
    let blocks: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"name": r.name, "type": r.kind, "channels": r.channels, "resnets": r.resnets,
                   "attentions": r.attentions, "params": r.params})
        })
        .collect();
    json!({"params": unet.num_params(), "transformer_blocks": config.transformer_block_count(), "blocks": blocks, "config": config.to_json()})
}

/// The architecture table of a `describe_unet` value.
pub fn format_table(title: &str, d: &Value) -> String {
    let mut s = format!("{title}\n{:<16} {:<24} {:>8} {:>7} {:>10} {:>14}\n", "block", "type", "channels", "resnets", "attentions", "params");
    for b in d["blocks"].as_array().into_iter().flatten() {
        s += &format!(
            "{:<16} {:<24} {:>8} {:>7} {:>10} {:>14}\n",
            b["name"].as_str().unwrap_or(""),
            b["type"].as_str().unwrap_or(""),
            b["channels"].as_i64().unwrap_or(0),
            b["resnets"].as_i64().unwrap_or(0),
            b["attentions"].as_i64().unwrap_or(0),
            group_digits(b["params"].as_i64().unwrap_or(0))
        );
    }
    s += &format!("{:<16} {:>68}\n", "total", group_digits(d["params"].as_i64().unwrap_or(0)));
    s += &format!("{:<16} {:>68}\n", "transformer blocks", d["transformer_blocks"].as_i64().unwrap_or(0));
    s
}

/// Loads every part of a pipeline (on the CPU, fp32, one part at a time) and describes it:
/// `{"unet": {"params": N, ...}, "vae": {...}, "text_encoder": {...}, "tokenizer": {...},
/// "scheduler": {...}}`. Any missing or broken part is an error naming it.
pub fn describe_pipeline(dir: &std::path::Path) -> Result<Value> {
    let p = PipelineDir::open(dir)?;
    let (device, kind) = (Device::Cpu, Kind::Float);
    let class = |part: Part, default: &str| p.part_class(part).unwrap_or(default).to_string();

    let unet_config = p.unet_config()?;
    let unet_params = p.load_unet(device, kind)?.num_params();
    let mut unet = describe_unet(&unet_config);
    unet["params"] = json!(unet_params);
    unet["class"] = json!(class(Part::Unet, "UNet2DConditionModel"));

    let vae = p.load_vae(device, kind)?;
    let c = &vae.model.config;
    let vae_json = json!({"params": vae.num_params(), "class": class(Part::Vae, "AutoencoderKL"),
        "latent_channels": c.latent_channels, "scaling_factor": c.scaling_factor, "shift_factor": c.shift_factor,
        "downscale_factor": c.downscale_factor(), "config": c.to_json()});
    drop(vae);

    let describe_te = |te: ClipTextEncoder, part: Part, default: &str| {
        let c = &te.model.config;
        json!({"params": te.num_params(), "class": class(part, default), "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers, "hidden_act": c.hidden_act.name(), "config": c.to_json()})
    };
    let describe_tok = |tok: ClipTokenizer, part: Part| {
        json!({"class": class(part, "CLIPTokenizer"), "vocab_size": tok.vocab_size(),
            "merges": tok.num_merges(), "model_max_length": tok.model_max_length(),
            "bos_token": tok.special.bos, "eos_token": tok.special.eos, "pad_token": tok.special.pad,
            "bos_token_id": tok.bos_id(), "eos_token_id": tok.eos_id(), "pad_token_id": tok.pad_id(), "source": tok.source})
    };
    let te_json = describe_te(p.load_text_encoder(device, kind)?, Part::TextEncoder, "CLIPTextModel");
    let tok_json = describe_tok(p.load_tokenizer()?, Part::Tokenizer);

    let sched = p.scheduler_config()?;
    let mut sched_json = serde_json::Map::new();
    let sched_class = sched.class_name.clone().unwrap_or_else(|| class(Part::Scheduler, "unknown"));
    sched_json.insert("class".into(), json!(sched_class));
    for (k, v) in sched.raw() {
        if !k.starts_with('_') {
            sched_json.insert(k.clone(), v.clone());
        }
    }
    let mut d = json!({"unet": unet, "vae": vae_json, "text_encoder": te_json, "tokenizer": tok_json, "scheduler": sched_json});
    if p.is_xl() {
        d["text_encoder_2"] = describe_te(p.load_text_encoder_2(device, kind)?, Part::TextEncoder2, "CLIPTextModelWithProjection");
        d["tokenizer_2"] = describe_tok(p.load_tokenizer_2()?, Part::Tokenizer2);
    }
    Ok(d)
}

/// The one-screen summary of a `describe_pipeline` value.
pub fn format_pipeline(dir: &std::path::Path, d: &Value) -> String {
    let row = |part: &str, v: &Value, what: String| format!("{part:<14} {:<24} {what}\n", v["class"].as_str().unwrap_or(""));
    let params = |v: &Value| format!("{:>14} params", group_digits(v["params"].as_i64().unwrap_or(0)));
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let t = &d["tokenizer"];
    let s = &d["scheduler"];
    let mut out = format!("pipeline: {}\n", dir.display());
    out += &row("unet", &d["unet"], params(&d["unet"]));
    out += &row("vae", &d["vae"], params(&d["vae"]));
    out += &row("text_encoder", &d["text_encoder"], params(&d["text_encoder"]));
    out += &row("tokenizer", t, format!("vocab {}, max length {}, pad {:?}", t["vocab_size"], t["model_max_length"], text(&t["pad_token"])));
    if let (Some(te2), Some(t2)) = (d.get("text_encoder_2"), d.get("tokenizer_2")) {
        out += &row("text_encoder_2", te2, params(te2));
        out += &row("tokenizer_2", t2, format!("vocab {}, max length {}, pad {:?}", t2["vocab_size"], t2["model_max_length"], text(&t2["pad_token"])));
    }
    out += &row("scheduler", s, format!("{} train steps, {} betas {}..{}, {}", s["num_train_timesteps"], text(&s["beta_schedule"]),
        s["beta_start"], s["beta_end"], text(s.get("prediction_type").unwrap_or(&json!("epsilon")))));
    let total: i64 = ["unet", "vae", "text_encoder", "text_encoder_2"].iter().map(|k| d[*k]["params"].as_i64().unwrap_or(0)).sum();
    out += &format!("{:<14} {:<24} {:>14} params\n", "total", "", group_digits(total));
    out
}

pub fn run(args: &InspectArgs) -> Result<()> {
    if let Some(dir) = &args.model {
        let dir = &crate::hub::local(dir, crate::hub::Want::Pipeline)?;
        let d = describe_pipeline(dir)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&d)?);
        } else {
            print!("{}", format_pipeline(dir, &d));
        }
        return Ok(());
    }
    let Some(unet_path) = &args.unet else {
        anyhow::bail!("inspect needs --unet <config.json or unet dir> or --model <pipeline dir>");
    };
    let config = UNetConfig::from_path(&crate::models::pipeline_dir::unet_dir(&crate::hub::local(unet_path, crate::hub::Want::Unet)?))?;
    let teacher = describe_unet(&config);
    let mut report = json!({ "teacher": teacher });
    let mut text = format_table(&format!("teacher: {}", unet_path.display()), &teacher);
    if let Some(arg) = &args.student {
        let spec = StudentSpec::resolve(arg, &config)?;
        let plan = StudentPlan::new(&spec, &config)?;
        let mut student = describe_unet(&plan.config);
        let ratio = student["params"].as_f64().unwrap_or(0.0) / teacher["params"].as_f64().unwrap_or(1.0);
        student["preset"] = json!(plan.name);
        student["param_ratio"] = json!(ratio);
        student["feature_pairs"] = json!(plan.feature_pairs);
        student["copied_tensors"] = json!(plan.copy_map.len());
        text += &format!("\n{}", format_table(&format!("student: {} ({:.1}% of the teacher)", plan.name, 100.0 * ratio), &student));
        text += "feature pairs (teacher -> student):\n";
        for p in &plan.feature_pairs {
            text += &format!("  {} -> {}\n", p.teacher, p.student);
        }
        report["student"] = student;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{text}");
    }
    Ok(())
}
