//! `sdkd inspect`: architecture tables and parameter counts.
use crate::distill::student::{StudentPlan, StudentSpec};
use crate::models::{Init, UNet, UNetConfig};
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
    /// A student preset (bk_base/sd_small, bk_small, bk_tiny/sd_tiny) or spec YAML to build from it.
    #[arg(long)]
    pub student: Option<String>,
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
    if config.mid_block {
        rows.push(BlockRow {
            name: "mid_block".into(),
            kind: "UNetMidBlock2DCrossAttn".into(),
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
    json!({"params": unet.num_params(), "blocks": blocks, "config": config.to_json()})
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
    s
}

pub fn group_digits(n: i64) -> String {
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let Some(unet_path) = &args.unet else {
        anyhow::bail!("inspect needs --unet <config.json or unet dir>");
    };
    let config = UNetConfig::from_path(&crate::commands::prune::unet_dir(unet_path))?;
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
