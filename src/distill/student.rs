//! Students: what of the teacher each stage keeps (a [`StudentSpec`], from a preset or a YAML
//! file), the student's diffusers config, the BK-SDM copy map and the feature pairs. The presets
//! are specs like any other: one mechanism, not special cases.
use crate::models::unet_config::{DownBlockKind, UNetConfig};
use crate::models::UNet;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// What a student keeps of its teacher. Indices refer to the teacher's stages and blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    /// A name for reports (the preset name, or the spec file's stem).
    #[serde(default)]
    pub name: String,
    /// Per teacher down stage: the resnet (and attention) indices kept, in order.
    pub down: Vec<Vec<usize>>,
    /// Per teacher up block: the resnet (and attention) indices kept, in order. An up block must
    /// keep one more than its mirrored down stage (diffusers' `layers_per_block + 1`).
    pub up: Vec<Vec<usize>>,
    /// Keep the teacher's mid block.
    #[serde(default = "yes")]
    pub mid_block: bool,
    /// Teacher stages removed together with their mirrored up block (BK-SDM-Tiny drops the
    /// innermost one).
    #[serde(default)]
    pub drop_stages: Vec<usize>,
    /// `[teacher feature, student feature]` pairs for feature KD; derived when absent.
    #[serde(default)]
    pub feature_pairs: Option<Vec<(String, String)>>,
}

fn yes() -> bool {
    true
}

/// The BK-SDM presets, with Segmind's names for two of them (`sd_small` is `bk_base`, `sd_tiny`
/// is `bk_tiny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    BkBase,
    BkSmall,
    BkTiny,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::BkBase, Preset::BkSmall, Preset::BkTiny];

    /// Every name a preset answers to: its own and Segmind's.
    const NAMES: [(&'static str, Preset); 5] = [
        ("bk_base", Preset::BkBase),
        ("sd_small", Preset::BkBase),
        ("bk_small", Preset::BkSmall),
        ("bk_tiny", Preset::BkTiny),
        ("sd_tiny", Preset::BkTiny),
    ];

    /// The preset a name (or alias) means, with that name as a `'static` string.
    fn named(name: &str) -> Option<(Preset, &'static str)> {
        Preset::NAMES.iter().find(|(n, _)| *n == name).map(|&(n, p)| (p, n))
    }

    /// Its canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::BkBase => "bk_base",
            Preset::BkSmall => "bk_small",
            Preset::BkTiny => "bk_tiny",
        }
    }

    /// Its spec for a teacher with `stages` stages: down stages keep resnet/attention 0, up blocks
    /// keep 0 and 2; base keeps the mid block, tiny drops the innermost stage.
    pub fn spec(self, stages: usize) -> StudentSpec {
        StudentSpec {
            name: self.name().to_string(),
            down: vec![vec![0]; stages],
            up: vec![vec![0, 2]; stages],
            mid_block: self == Preset::BkBase,
            drop_stages: if self == Preset::BkTiny { vec![stages - 1] } else { vec![] },
            feature_pairs: None,
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = anyhow::Error;
    fn from_str(name: &str) -> Result<Preset> {
        Preset::named(name).map(|(preset, _)| preset).ok_or_else(|| unknown_preset(name))
    }
}

fn unknown_preset(name: &str) -> anyhow::Error {
    anyhow!("unknown student preset {name:?} (bk_base/sd_small, bk_small, bk_tiny/sd_tiny, or a spec .yaml)")
}

/// What a `student` value names, read once (the run YAML's `student`, `--student`): a preset, a
/// spec YAML, or a UNet config (a `config.json` or a UNet folder) taken as it is. It serialises
/// back to the text it was read from (a preset keeps the alias it was given), so the config hash
/// of a run is that of its YAML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum StudentChoice {
    /// A preset and the name it was given by.
    Preset { preset: Preset, name: &'static str },
    Spec(PathBuf),
    Config(PathBuf),
}

impl StudentChoice {
    /// A `.yaml`/`.yml` value is a spec and a `.json` one a UNet config; then a preset name; then
    /// an existing file is a spec, and a folder or any other value with a path separator a UNet
    /// config; anything else an unknown preset.
    pub fn parse(arg: &str) -> Result<StudentChoice> {
        if arg.trim().is_empty() {
            bail!("student is empty: give a preset (bk_base, bk_small, bk_tiny) or a spec YAML path");
        }
        let path = Path::new(arg);
        Ok(if arg.ends_with(".yaml") || arg.ends_with(".yml") {
            StudentChoice::Spec(path.to_path_buf())
        } else if arg.ends_with(".json") {
            StudentChoice::Config(path.to_path_buf())
        } else if let Some((preset, name)) = Preset::named(arg) {
            StudentChoice::Preset { preset, name }
        } else if path.is_file() {
            StudentChoice::Spec(path.to_path_buf())
        } else if path.is_dir() || is_pathlike(arg) {
            StudentChoice::Config(path.to_path_buf())
        } else {
            return Err(unknown_preset(arg));
        })
    }

    /// Makes a relative spec or config path absolute against `base` (a run YAML's folder) when
    /// the value reads as a path (a `.yaml`/`.yml` name or one with a separator); a bare name
    /// stays relative to the working directory.
    pub fn resolve_against(&mut self, base: &Path) {
        if let StudentChoice::Spec(p) | StudentChoice::Config(p) = self {
            let s = p.to_string_lossy();
            if p.is_relative() && (s.ends_with(".yaml") || s.ends_with(".yml") || is_pathlike(&s)) {
                *p = base.join(&*p);
            }
        }
    }
}

fn is_pathlike(s: &str) -> bool {
    s.contains('/') || s.contains('\\')
}

impl std::fmt::Display for StudentChoice {
    /// The text it was read from (paths made absolute by `resolve_against`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StudentChoice::Preset { name, .. } => f.write_str(name),
            StudentChoice::Spec(p) | StudentChoice::Config(p) => write!(f, "{}", p.to_string_lossy()),
        }
    }
}

impl<'de> Deserialize<'de> for StudentChoice {
    /// Through a visitor, so that serde_yaml's error names the key and the line.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<StudentChoice, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = StudentChoice;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a student preset name or a path")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> std::result::Result<StudentChoice, E> {
                StudentChoice::parse(text).map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

impl From<StudentChoice> for String {
    fn from(choice: StudentChoice) -> String {
        choice.to_string()
    }
}

impl StudentSpec {
    /// A BK-SDM preset by name (`Preset`) for a teacher with `stages` stages.
    pub fn preset(name: &str, stages: usize) -> Result<StudentSpec> {
        Ok(name.parse::<Preset>()?.spec(stages))
    }

    /// A preset name, or a path to a spec YAML, for `teacher`.
    pub fn resolve(arg: &str, teacher: &UNetConfig) -> Result<StudentSpec> {
        StudentSpec::of(&StudentChoice::parse(arg)?, teacher)
    }

    /// The spec `choice` names for `teacher`; a UNet config is no spec.
    pub fn of(choice: &StudentChoice, teacher: &UNetConfig) -> Result<StudentSpec> {
        match choice {
            StudentChoice::Spec(path) => StudentSpec::from_yaml(path),
            StudentChoice::Preset { preset, .. } => Ok(preset.spec(teacher.num_stages())),
            StudentChoice::Config(_) => Ok(choice.to_string().parse::<Preset>()?.spec(teacher.num_stages())),
        }
    }

    pub fn from_yaml(path: &Path) -> Result<StudentSpec> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading student spec {}", path.display()))?;
        let mut spec: StudentSpec =
            serde_yaml::from_str(&text).with_context(|| format!("student spec {}", path.display()))?;
        if spec.name.is_empty() {
            spec.name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        }
        Ok(spec)
    }

}

/// A `[teacher, student]` pair of feature names that feature KD compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeaturePair {
    pub teacher: String,
    pub student: String,
}

/// A spec applied to one teacher: the student's config, where each student tensor comes from,
/// and the features to distil.
#[derive(Debug, Clone)]
pub struct StudentPlan {
    pub name: String,
    pub config: UNetConfig,
    /// Teacher stage of each student stage.
    pub stages: Vec<usize>,
    /// Student tensor name -> teacher tensor name, for every student tensor with a source.
    pub copy_map: BTreeMap<String, String>,
    pub feature_pairs: Vec<FeaturePair>,
}

fn check_indices(what: &str, stage: usize, keep: &[usize], available: i64) -> Result<()> {
    if keep.is_empty() {
        bail!("student spec: {what} {stage} keeps no resnets (at least one)");
    }
    if let Some(&i) = keep.iter().find(|&&i| i as i64 >= available) {
        bail!("student spec: {what} {stage} keeps index {i}, but the teacher's has only {available} (0..{})", available - 1);
    }
    Ok(())
}

impl StudentPlan {
    pub fn new(spec: &StudentSpec, teacher: &UNetConfig) -> Result<StudentPlan> {
        let n = teacher.num_stages();
        if spec.down.len() != n || spec.up.len() != n {
            bail!(
                "student spec {:?}: `down` has {} and `up` {} entries, but the teacher has {n} stages",
                spec.name,
                spec.down.len(),
                spec.up.len()
            );
        }
        if let Some(&s) = spec.drop_stages.iter().find(|&&s| s >= n) {
            bail!("student spec {:?}: drop_stages names stage {s}, but the teacher has stages 0..{}", spec.name, n - 1);
        }
        let stages: Vec<usize> = (0..n).filter(|s| !spec.drop_stages.contains(s)).collect();
        if stages.is_empty() {
            bail!("student spec {:?}: drop_stages removes every stage", spec.name);
        }
        if spec.mid_block && teacher.mid_block.is_none() {
            bail!("student spec {:?}: keeps the mid block, but the teacher has none", spec.name);
        }
        let m = stages.len();
        let up_of = |stage: usize, stages_total: usize| stages_total - 1 - stage; // up block mirroring a stage
        let mut config = teacher.clone();
        config.block_out_channels = stages.iter().map(|&s| teacher.block_out_channels[s]).collect();
        config.down_block_types = stages.iter().map(|&s| teacher.down_block_types[s]).collect();
        config.up_block_types = (0..m).map(|k| teacher.up_block_types[up_of(stages[m - 1 - k], n)]).collect();
        config.num_heads = stages.iter().map(|&s| teacher.num_heads[s]).collect();
        config.mid_block = teacher.mid_block.filter(|_| spec.mid_block);
        config.layers_per_block = Vec::with_capacity(m);
        for &s in &stages {
            let tu = up_of(s, n);
            check_indices("down stage", s, &spec.down[s], teacher.layers_per_block[s])?;
            check_indices("up block", tu, &spec.up[tu], teacher.layers_per_block[s] + 1)?;
            if spec.up[tu].len() != spec.down[s].len() + 1 {
                bail!(
                    "student spec {:?}: up block {tu} keeps {} resnets but must keep one more than down stage {s} ({})",
                    spec.name,
                    spec.up[tu].len(),
                    spec.down[s].len()
                );
            }
            config.layers_per_block.push(spec.down[s].len() as i64);
        }
        // Each kept transformer keeps its depth (SDXL's per-stage and per-layer depths).
        if !teacher.transformer_layers_per_block.is_empty() {
            config.transformer_layers_per_block = stages.iter().map(|&s| teacher.transformer_layers_per_block[s].select(&spec.down[s])).collect();
        }
        config.reverse_transformer_layers_per_block = teacher.reverse_transformer_layers_per_block.as_ref().map(|rev| {
            (0..m).map(|k| up_of(stages[m - 1 - k], n)).map(|tu| rev[tu].select(&spec.up[tu])).collect()
        });
        config.validate().with_context(|| format!("student spec {:?} gives an invalid UNet", spec.name))?;

        // The copy map, walked over the student's own tensor names.
        let student = UNet::build(&config, tch::Device::Cpu, tch::Kind::Float, crate::models::Init::Empty);
        let mut copy_map = BTreeMap::new();
        for name in student.vs.variables().keys() {
            if let Some(src) = source_of(name, spec, &stages, n) {
                copy_map.insert(name.clone(), src);
            }
        }
        let feature_pairs = match &spec.feature_pairs {
            Some(pairs) => pairs.iter().map(|(t, s)| FeaturePair { teacher: t.clone(), student: s.clone() }).collect(),
            None => default_feature_pairs(spec, teacher, &config, &stages),
        };
        let plan = StudentPlan { name: spec.name.clone(), config, stages, copy_map, feature_pairs };
        plan.check_against_teacher(teacher)?;
        Ok(plan)
    }

    /// Every mapped pair must agree in shape (a dropped middle stage changes input widths), and
    /// every feature name must exist on its side.
    fn check_against_teacher(&self, teacher_config: &UNetConfig) -> Result<()> {
        let teacher = UNet::build(teacher_config, tch::Device::Cpu, tch::Kind::Float, crate::models::Init::Empty);
        let student = UNet::build(&self.config, tch::Device::Cpu, tch::Kind::Float, crate::models::Init::Empty);
        let tv = teacher.vs.variables();
        let sv = student.vs.variables();
        for (s, t) in &self.copy_map {
            let t_shape = tv.get(t).map(Tensor::size).ok_or_else(|| anyhow!("student spec {:?}: copy source {t} does not exist in the teacher", self.name))?;
            let s_shape = sv[s].size();
            if s_shape != t_shape {
                let stage = s.split('.').take(2).collect::<Vec<_>>().join(".");
                bail!(
                    "student spec {:?}: {stage} cannot be copied from the teacher: {s} is {s_shape:?} but its source {t} is {t_shape:?} (channel mismatch: the stage before it was dropped or resized)",
                    self.name
                );
            }
        }
        let t_names = teacher.model.feature_names();
        let s_names = student.model.feature_names();
        for p in &self.feature_pairs {
            if !t_names.contains(&p.teacher) {
                bail!("student spec {:?}: feature pair teacher side {:?} is not a teacher feature ({})", self.name, p.teacher, t_names.join(", "));
            }
            if !s_names.contains(&p.student) {
                bail!("student spec {:?}: feature pair student side {:?} is not a student feature ({})", self.name, p.student, s_names.join(", "));
            }
        }
        Ok(())
    }

    /// A student whose architecture is given outright (a UNet config, e.g. to train a teacher from
    /// scratch): every tensor whose name and shape the teacher shares is copied from it, and only
    /// the output is distilled (block correspondences are unknown).
    pub fn explicit(config: UNetConfig, teacher: Option<&UNetConfig>) -> StudentPlan {
        let student = UNet::build(&config, tch::Device::Cpu, tch::Kind::Float, crate::models::Init::Empty);
        let mut copy_map = BTreeMap::new();
        if let Some(teacher) = teacher {
            let t = UNet::build(teacher, tch::Device::Cpu, tch::Kind::Float, crate::models::Init::Empty);
            let tv = t.vs.variables();
            for (name, v) in student.vs.variables() {
                if tv.get(&name).is_some_and(|tt| tt.size() == v.size()) {
                    copy_map.insert(name.clone(), name);
                }
            }
        }
        let stages = (0..config.num_stages()).collect();
        StudentPlan { name: "explicit".into(), config, stages, copy_map, feature_pairs: vec![] }
    }

    /// A preset, a spec YAML, or a UNet config (a `config.json` or a UNet folder) for `teacher`.
    pub fn resolve(arg: &str, teacher: Option<&UNetConfig>) -> Result<StudentPlan> {
        StudentPlan::of(&StudentChoice::parse(arg)?, teacher)
    }

    /// The plan `choice` names for `teacher` (which only a UNet config does without).
    pub fn of(choice: &StudentChoice, teacher: Option<&UNetConfig>) -> Result<StudentPlan> {
        if let StudentChoice::Config(path) = choice {
            return Ok(StudentPlan::explicit(UNetConfig::from_path(path)?, teacher));
        }
        let teacher = teacher.ok_or_else(|| anyhow!("student {:?} is defined relative to a teacher, but the run has none", choice.to_string()))?;
        StudentPlan::new(&StudentSpec::of(choice, teacher)?, teacher)
    }

    /// Inner feature names each side must compute for the pairs.
    pub fn inner_features(&self) -> (std::collections::BTreeSet<String>, std::collections::BTreeSet<String>) {
        let inner = |n: &String| n.contains(".attentions.") || n.contains(".resnets.");
        (
            self.feature_pairs.iter().map(|p| &p.teacher).filter(|n| inner(n)).cloned().collect(),
            self.feature_pairs.iter().map(|p| &p.student).filter(|n| inner(n)).cloned().collect(),
        )
    }
}

/// The teacher tensor a student tensor is copied from, by BK-SDM's rule: student stage k is
/// teacher stage `stages[k]`, student resnet/attention j is the j-th kept index.
fn source_of(name: &str, spec: &StudentSpec, stages: &[usize], n: usize) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let m = stages.len();
    match parts.as_slice() {
        ["down_blocks", k, rest @ ..] => {
            let s = stages[k.parse::<usize>().ok()?];
            Some(format!("down_blocks.{s}.{}", remap_layer(rest, &spec.down[s])?))
        }
        ["up_blocks", k, rest @ ..] => {
            let k: usize = k.parse().ok()?;
            let tu = n - 1 - stages[m - 1 - k];
            Some(format!("up_blocks.{tu}.{}", remap_layer(rest, &spec.up[tu])?))
        }
        _ => Some(name.to_string()),
    }
}

/// `resnets.j.…` / `attentions.j.…` -> the kept teacher index; resamplers keep their names.
fn remap_layer(rest: &[&str], keep: &[usize]) -> Option<String> {
    match rest {
        [kind @ ("resnets" | "attentions"), j, tail @ ..] => {
            let t = keep.get(j.parse::<usize>().ok()?)?;
            Some(format!("{kind}.{t}.{}", tail.join(".")))
        }
        other => Some(other.join(".")),
    }
}

/// BK-SDM's pairs: every kept down stage's output and every up block's output. A kept stage that
/// loses its downsampler (the innermost kept one when deeper stages are dropped) has a different
/// output size than its teacher stage, so its last attention's `proj_out` is paired instead.
fn default_feature_pairs(spec: &StudentSpec, teacher: &UNetConfig, student: &UNetConfig, stages: &[usize]) -> Vec<FeaturePair> {
    let n = teacher.num_stages();
    let m = stages.len();
    let mut pairs = vec![];
    for (k, &s) in stages.iter().enumerate() {
        let same_resolution = (k + 1 < m) == (s + 1 < n);
        if same_resolution {
            pairs.push(FeaturePair { teacher: format!("down_blocks.{s}"), student: format!("down_blocks.{k}") });
        } else if teacher.down_block_types[s] == DownBlockKind::CrossAttn {
            pairs.push(FeaturePair {
                teacher: format!("down_blocks.{s}.attentions.{}.proj_out", teacher.layers_per_block[s] - 1),
                student: format!("down_blocks.{k}.attentions.{}.proj_out", student.layers_per_block[k] - 1),
            });
        }
    }
    for k in 0..m {
        let tu = n - 1 - stages[m - 1 - k];
        pairs.push(FeaturePair { teacher: format!("up_blocks.{tu}"), student: format!("up_blocks.{k}") });
    }
    let _ = spec;
    pairs
}

/// What `copy_from_teacher` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub copied: usize,
    pub left_random: Vec<String>,
}

/// Copies the teacher's tensors into the student under the plan's map (converting dtype).
pub fn copy_from_teacher(plan: &StudentPlan, teacher: &UNet, student: &UNet) -> Result<CopyReport> {
    let tv: HashMap<String, Tensor> = teacher.vs.variables();
    let sv = student.vs.variables();
    let mut report = CopyReport { copied: 0, left_random: vec![] };
    let mut names: Vec<&String> = sv.keys().collect();
    names.sort();
    for name in names {
        match plan.copy_map.get(name) {
            Some(src) => {
                let t = tv.get(src).ok_or_else(|| anyhow!("teacher has no tensor {src} (source of {name})"))?;
                let s = &sv[name];
                if t.size() != s.size() {
                    bail!("cannot copy {src} {:?} into {name} {:?}", t.size(), s.size());
                }
                tch::no_grad(|| s.shallow_clone().copy_(t));
                report.copied += 1;
            }
            None => report.left_random.push(name.clone()),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Init;

    fn sd(path: &str) -> UNetConfig {
        UNetConfig::from_path(Path::new(path)).unwrap()
    }

    fn count(plan: &StudentPlan) -> i64 {
        UNet::build(&plan.config, tch::Device::Cpu, tch::Kind::Float, Init::Empty).num_params()
    }

    #[test]
    fn presets_count_the_published_parameters() {
        let t = sd("configs/reference/sd15_unet_config.json");
        let want = [("bk_base", 579_384_964), ("bk_small", 482_346_884), ("bk_tiny", 323_384_964)];
        for (preset, params) in want {
            let plan = StudentPlan::new(&StudentSpec::preset(preset, 4).unwrap(), &t).unwrap();
            assert_eq!(count(&plan), params, "{preset}");
            assert!(plan.copy_map.len() == UNet::build(&plan.config, tch::Device::Cpu, tch::Kind::Float, Init::Empty).vs.len(), "{preset}: every tensor has a source");
        }
    }

    #[test]
    fn bk_maps_follow_the_paper() {
        let t = sd("configs/reference/sd15_unet_config.json");
        let base = StudentPlan::new(&StudentSpec::preset("sd_small", 4).unwrap(), &t).unwrap();
        assert_eq!(base.copy_map["up_blocks.1.resnets.1.conv1.weight"], "up_blocks.1.resnets.2.conv1.weight");
        assert_eq!(base.copy_map["up_blocks.3.attentions.1.proj_in.weight"], "up_blocks.3.attentions.2.proj_in.weight");
        assert_eq!(base.copy_map["down_blocks.2.attentions.0.norm.weight"], "down_blocks.2.attentions.0.norm.weight");
        let tiny = StudentPlan::new(&StudentSpec::preset("sd_tiny", 4).unwrap(), &t).unwrap();
        assert_eq!(tiny.copy_map["up_blocks.0.resnets.1.conv1.weight"], "up_blocks.1.resnets.2.conv1.weight");
        assert_eq!(tiny.copy_map["up_blocks.1.upsamplers.0.conv.weight"], "up_blocks.2.upsamplers.0.conv.weight");
        assert!(!tiny.copy_map.contains_key("down_blocks.2.downsamplers.0.conv.weight"));
        let pairs: Vec<(&str, &str)> = tiny.feature_pairs.iter().map(|p| (p.teacher.as_str(), p.student.as_str())).collect();
        assert_eq!(
            pairs,
            vec![
                ("down_blocks.0", "down_blocks.0"),
                ("down_blocks.1", "down_blocks.1"),
                ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
                ("up_blocks.1", "up_blocks.0"),
                ("up_blocks.2", "up_blocks.1"),
                ("up_blocks.3", "up_blocks.2"),
            ]
        );
        assert_eq!(base.feature_pairs.len(), 8);
    }

    #[test]
    fn impossible_specs_say_which_stage() {
        let t = sd("configs/reference/sd15_unet_config.json");
        let mut spec = StudentSpec::preset("bk_base", 4).unwrap();
        spec.down[1] = vec![3];
        let e = StudentPlan::new(&spec, &t).unwrap_err().to_string();
        assert!(e.contains("down stage 1") && e.contains("index 3"), "{e}");
        let mut spec = StudentSpec::preset("bk_small", 4).unwrap();
        spec.drop_stages = vec![1];
        let e = format!("{:#}", StudentPlan::new(&spec, &t).unwrap_err());
        assert!(e.contains("down_blocks.1") && e.contains("channel mismatch"), "{e}");
        let mut spec = StudentSpec::preset("bk_small", 4).unwrap();
        spec.up[2] = vec![0];
        let e = StudentPlan::new(&spec, &t).unwrap_err().to_string();
        assert!(e.contains("up block 2"), "{e}");
    }
}
