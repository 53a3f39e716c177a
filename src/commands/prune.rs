//! `sdkd prune`: build a student from a teacher UNet, copy the teacher's weights into it by the
//! copy map, and write a diffusers UNet folder (or a whole pipeline). `--out` follows the same
//! rule as `export --out`.
use crate::distill::student::{copy_from_teacher, StudentPlan, StudentSpec};
use crate::runtime::Precision;
use crate::export::{self, ExportFormat};
use crate::fs_safe::{self, Marker, Purpose};
use crate::models::pipeline_dir::unet_dir;
use crate::models::{weights, Init, PipelineDir, UNet};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use tch::{Device, Kind};

#[derive(Args, Debug, Clone)]
pub struct PruneArgs {
    /// The teacher: a diffusers UNet folder, a pipeline folder (its unet/ is used) or a
    /// single-file checkpoint.
    #[arg(long)]
    pub teacher: PathBuf,
    /// A preset (bk_base/sd_small, bk_small, bk_tiny/sd_tiny; on an SDXL teacher also ssd_1b, vega, koala_1b, koala_700m) or a student spec YAML.
    #[arg(long)]
    pub student: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an earlier sdkd folder of the same format at --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Storage dtype of the written weights (default fp32; fp16 for `--format single-file`).
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
    /// `unet` writes a UNet folder; `pipeline` also copies the teacher pipeline's other parts;
    /// `single-file` writes one LDM-layout .safetensors with the teacher's VAE and text encoder.
    #[arg(long, value_enum, default_value = "unet")]
    pub format: ExportFormat,
}

pub fn run(args: &PruneArgs) -> Result<()> {
    let want = if args.format == ExportFormat::Unet { crate::hub::Want::Unet } else { crate::hub::Want::Pipeline };
    let teacher_path = crate::hub::local(&args.teacher, want)?;
    let args = &PruneArgs { teacher: teacher_path, ..args.clone() };
    let teacher_dir = unet_dir(&args.teacher);
    fs_safe::check_apart(&args.out, &args.teacher, "the teacher", "--out")?;
    if args.format == ExportFormat::SingleFile {
        export::check_single_file_replaceable(&args.out, args.overwrite, "--out")?;
    } else {
        fs_safe::check_replaceable(&args.out, args.format.purpose(), args.overwrite, "--out")?;
    }
    let teacher = if args.teacher.is_file() {
        PipelineDir::open(&args.teacher)?.load_unet(Device::Cpu, Kind::Float)?
    } else {
        UNet::load(&teacher_dir, Device::Cpu, Kind::Float)?
    };
    let spec = StudentSpec::resolve(&args.student, &teacher.model.config)?;
    let plan = StudentPlan::new(&spec, &teacher.model.config)
        .with_context(|| format!("applying student {:?} to teacher {}", args.student, teacher_dir.display()))?;
    let student = UNet::build(&plan.config, Device::Cpu, Kind::Float, Init::Torch);
    let report = copy_from_teacher(&plan, &teacher, &student)?;
    let tensors = weights::named_tensors(&student.vs);
    let kind = Some(args.dtype.unwrap_or(export::default_dtype(args.format)).kind());
    let copy_map = serde_json::to_string_pretty(&plan.copy_map)? + "\n";
    match args.format {
        ExportFormat::Unet => fs_safe::write_dir(&args.out, Some(&Marker::new(Purpose::Unet)), |dir| {
            export::fill_unet_dir(dir, &plan.config, &tensors, kind)?;
            // provenance: where each student tensor came from (diffusers ignores the file)
            Ok(std::fs::write(dir.join("copy_map.json"), &copy_map)?)
        })?,
        format => {
            if teacher_dir == args.teacher && !args.teacher.is_file() {
                bail!(
                    "--format {} needs --teacher to be a pipeline folder (with model_index.json) or a single file, not {}",
                    if format == ExportFormat::Pipeline { "pipeline" } else { "single-file" },
                    args.teacher.display()
                );
            }
            let title = format!("{} pruned from {}", plan.name, args.teacher.display());
            // a pruned LCM teacher keeps the grid its scheduler config names
            let lcm = crate::models::PipelineDir::open(&args.teacher)?.scheduler_config()?.lcm_grid();
            export::write_student(&args.out, format, &args.teacher, &plan.config, &tensors, kind, &title, lcm)?
        }
    }
    println!(
        "pruned {} -> {} ({}): {} params (teacher {}), {} tensors copied, {} left random",
        teacher_dir.display(),
        args.out.display(),
        plan.name,
        student.num_params(),
        teacher.num_params(),
        report.copied,
        report.left_random.len()
    );
    Ok(())
}
