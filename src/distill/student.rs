//! Students: a [`StudentSpec`] (from a preset or a YAML file, `spec`) applied to a teacher gives
//! the student's diffusers config, the copy map (every student tensor's teacher source, down to
//! the transformer layer) and the feature pairs. The presets are specs like any other: one
//! mechanism, not special cases.
use crate::models::unet_config::{Depth, DownBlockKind, MidBlockKind, UNetConfig, UpBlockKind};
use crate::models::UNet;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::Tensor;

mod spec;
use spec::unknown_preset;
pub use spec::{is_sdxl, Kept, Layers, MidSpec, Preset, Stage, StudentSpec};

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
            bail!("student is empty: give a preset (bk_base, bk_small, bk_tiny, ssd_1b, vega, koala_1b, koala_700m) or a spec YAML path");
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
    /// A preset name, or a path to a spec YAML, for `teacher`.
    pub fn resolve(arg: &str, teacher: &UNetConfig) -> Result<StudentSpec> {
        StudentSpec::of(&StudentChoice::parse(arg)?, teacher)
    }

    /// The spec `choice` names for `teacher`; a UNet config is no spec.
    pub fn of(choice: &StudentChoice, teacher: &UNetConfig) -> Result<StudentSpec> {
        match choice {
            StudentChoice::Spec(path) => StudentSpec::from_yaml(path),
            StudentChoice::Preset { preset, .. } => preset.spec(teacher),
            StudentChoice::Config(_) => choice.to_string().parse::<Preset>()?.spec(teacher),
        }
    }
}

/// A `[teacher, student]` pair of feature names that feature KD compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeaturePair {
    pub teacher: String,
    pub student: String,
}

/// Which features feature KD pairs (`loss.features`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureLevel {
    /// Block outputs (BK-SDM), or the spec's `feature_pairs`.
    #[default]
    Blocks,
    /// Every kept resnet's and attention's output with its teacher source (SSD-1B's trainer); the
    /// mid block whole on the teacher side.
    SubBlocks,
    /// The self-attention (`attn1`) output of every kept transformer layer with the teacher layer
    /// it was copied from (KOALA).
    SelfAttention,
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

fn check_indices(what: &str, stage: usize, keep: &Stage, available: i64) -> Result<()> {
    if keep.0.is_empty() {
        bail!("student spec: {what} {stage} keeps no resnets (at least one)");
    }
    if let Some(i) = keep.indices().into_iter().find(|&i| i as i64 >= available) {
        bail!("student spec: {what} {stage} keeps index {i}, but the teacher's has only {available} (0..{})", available - 1);
    }
    Ok(())
}

/// A kept resnet resolved against the teacher: its index there and, when it has an attention,
/// the teacher transformer layers that attention keeps, in the student's order.
#[derive(Debug, Clone)]
struct KeptLayer {
    resnet: usize,
    layers: Option<Vec<usize>>,
}

/// A spec resolved against its teacher (indexed by teacher stage and teacher up block).
struct Resolved {
    down: Vec<Vec<KeptLayer>>,
    up: Vec<Vec<KeptLayer>>,
    /// The student's mid block and, for a cross-attention one, its teacher layers.
    mid: Option<(MidBlockKind, Option<Vec<usize>>)>,
}

/// The teacher transformer layers `pick` keeps of an attention `depth` deep (`None`: the teacher
/// block has no attention); `key` names the spec entry in errors.
fn pick_layers(key: &str, pick: &Layers, depth: Option<i64>) -> Result<Option<Vec<usize>>> {
    let Some(depth) = depth else {
        if *pick != Layers::All {
            bail!("{key}: the teacher's block has no attention, so `depth`/`layers` have nothing to keep");
        }
        return Ok(None);
    };
    let depth = depth as usize;
    Ok(Some(match pick {
        Layers::All => (0..depth).collect(),
        Layers::First(0) => bail!("{key}: depth 0 (an attention keeps at least one transformer layer)"),
        Layers::First(k) if *k > depth => bail!("{key}: depth {k}, but the teacher's attention has {depth} transformer layers"),
        Layers::First(k) => (0..*k).collect(),
        Layers::Pick(v) => {
            if v.is_empty() {
                bail!("{key}: layers is empty (an attention keeps at least one transformer layer)");
            }
            if let Some(&l) = v.iter().find(|&&l| l >= depth) {
                bail!("{key}: layers names layer {l}, but the teacher's attention has {depth} (0..{})", depth - 1);
            }
            if let Some((i, &l)) = v.iter().enumerate().find(|(i, l)| v[..*i].contains(l)) {
                bail!("{key}: layers lists layer {l} twice (at {i})");
            }
            v.clone()
        }
    }))
}

impl Resolved {
    fn new(spec: &StudentSpec, teacher: &UNetConfig, stages: &[usize]) -> Result<Resolved> {
        let n = teacher.num_stages();
        let stage = |key: &str, i: usize, keep: &Stage, depth: &dyn Fn(usize) -> Option<i64>| -> Result<Vec<KeptLayer>> {
            keep.0
                .iter()
                .enumerate()
                .map(|(j, k)| Ok(KeptLayer { resnet: k.resnet, layers: pick_layers(&format!("{key}[{i}][{j}]"), &k.layers, depth(k.resnet))? }))
                .collect()
        };
        let mut down = vec![vec![]; n];
        let mut up = vec![vec![]; n];
        for &s in stages {
            let tu = n - 1 - s;
            let attends = teacher.down_block_types[s] == DownBlockKind::CrossAttn;
            down[s] = stage("down", s, &spec.down[s], &|r| attends.then(|| teacher.down_depth(s, r)))?;
            let attends = teacher.up_block_types[tu] == UpBlockKind::CrossAttn;
            up[tu] = stage("up", tu, &spec.up[tu], &|r| attends.then(|| teacher.up_depth(tu, r)))?;
        }
        let mid = match (&spec.mid_block, teacher.mid_block) {
            (MidSpec::None, _) => None,
            (MidSpec::Keep | MidSpec::Resnet | MidSpec::Full(_), None) => bail!("mid_block: the spec keeps a mid block, but the teacher has none"),
            (MidSpec::Keep, Some(MidBlockKind::Plain)) | (MidSpec::Resnet, Some(_)) => Some((MidBlockKind::Plain, None)),
            (MidSpec::Keep, Some(MidBlockKind::CrossAttn)) => Some((MidBlockKind::CrossAttn, Some((0..teacher.mid_depth() as usize).collect()))),
            (MidSpec::Full(_), Some(MidBlockKind::Plain)) => {
                bail!("mid_block: full needs a cross-attention mid block, but the teacher's is UNetMidBlock2D (one resnet)")
            }
            (MidSpec::Full(pick), Some(MidBlockKind::CrossAttn)) => {
                Some((MidBlockKind::CrossAttn, pick_layers("mid_block", pick, Some(teacher.mid_depth()))?))
            }
        };
        Ok(Resolved { down, up, mid })
    }

    /// Whether every kept attention (and a kept cross-attention mid block) keeps all its
    /// teacher's transformer layers in order: then the teacher's depth lists carry over.
    fn keeps_whole_attentions(&self, teacher: &UNetConfig) -> bool {
        let n = teacher.num_stages();
        let whole = |layers: &Option<Vec<usize>>, depth: i64| layers.as_ref().is_none_or(|l| l.len() as i64 == depth && l.iter().enumerate().all(|(i, &x)| i == x));
        let down = (0..n).all(|s| self.down[s].iter().all(|k| whole(&k.layers, teacher.down_depth(s, k.resnet))));
        let up = (0..n).all(|b| self.up[b].iter().all(|k| whole(&k.layers, teacher.up_depth(b, k.resnet))));
        let mid = self.mid.as_ref().is_none_or(|(_, l)| whole(l, teacher.mid_depth()));
        down && up && mid
    }
}

/// `v` as one depth when all are equal, else per layer.
fn depth_of(v: &[i64]) -> Depth {
    if v.windows(2).all(|w| w[0] == w[1]) {
        Depth::Uniform(v[0])
    } else {
        Depth::PerLayer(v.to_vec())
    }
}

/// The student's `transformer_layers_per_block` and `reverse_transformer_layers_per_block` as
/// diffusers reads them: the mid block takes the last stage's (first) depth, and the reverse list
/// is written when the decoder is not the encoder's mirror or a stage lists per-layer depths.
fn set_depths(config: &mut UNetConfig, teacher: &UNetConfig, stages: &[usize], res: &Resolved) -> Result<()> {
    let (n, m) = (teacher.num_stages(), stages.len());
    let depths = |kept: &[KeptLayer]| -> Option<Vec<i64>> { kept.iter().map(|k| k.layers.as_ref().map(|l| l.len() as i64)).collect() };
    let mut down: Vec<Depth> = stages
        .iter()
        .map(|&s| match depths(&res.down[s]) {
            Some(d) if !d.is_empty() => depth_of(&d),
            _ => teacher.transformer_layers_per_block.get(s).cloned().unwrap_or(Depth::Uniform(1)),
        })
        .collect();
    if let Some((MidBlockKind::CrossAttn, Some(layers))) = &res.mid {
        let d = layers.len() as i64;
        if config.down_block_types[m - 1] == DownBlockKind::CrossAttn {
            if down[m - 1].at(0) != d {
                bail!(
                    "mid_block: depth {d}, but diffusers builds the mid block as deep as the last stage's first attention (transformer_layers_per_block[-1]), which keeps {}",
                    down[m - 1].at(0)
                );
            }
        } else {
            down[m - 1] = Depth::Uniform(d);
        }
    }
    let up: Vec<Depth> = (0..m)
        .map(|k| {
            let tu = n - 1 - stages[m - 1 - k];
            match depths(&res.up[tu]) {
                Some(d) if !d.is_empty() && config.up_block_types[k] == UpBlockKind::CrossAttn => depth_of(&d),
                _ => Depth::Uniform(down[m - 1 - k].at(0)),
            }
        })
        .collect();
    let mirrored = (0..m).all(|k| up[k] == Depth::Uniform(down[m - 1 - k].at(0)));
    let per_layer = down.iter().any(|d| matches!(d, Depth::PerLayer(_)));
    config.transformer_layers_per_block = down;
    config.reverse_transformer_layers_per_block = (per_layer || !mirrored).then_some(up);
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
        if spec.mid_block == MidSpec::Keep && teacher.mid_block.is_none() {
            bail!("student spec {:?}: keeps the mid block, but the teacher has none", spec.name);
        }
        let m = stages.len();
        let up_of = |stage: usize, stages_total: usize| stages_total - 1 - stage; // up block mirroring a stage
        let mut config = teacher.clone();
        config.block_out_channels = stages.iter().map(|&s| teacher.block_out_channels[s]).collect();
        config.down_block_types = stages.iter().map(|&s| teacher.down_block_types[s]).collect();
        config.up_block_types = (0..m).map(|k| teacher.up_block_types[up_of(stages[m - 1 - k], n)]).collect();
        config.num_heads = stages.iter().map(|&s| teacher.num_heads[s]).collect();
        config.layers_per_block = Vec::with_capacity(m);
        for &s in &stages {
            let tu = up_of(s, n);
            check_indices("down stage", s, &spec.down[s], teacher.layers_per_block[s])?;
            check_indices("up block", tu, &spec.up[tu], teacher.layers_per_block[s] + 1)?;
            if spec.up[tu].0.len() != spec.down[s].0.len() + 1 {
                bail!(
                    "student spec {:?}: up block {tu} keeps {} resnets but must keep one more than down stage {s} ({})",
                    spec.name,
                    spec.up[tu].0.len(),
                    spec.down[s].0.len()
                );
            }
            config.layers_per_block.push(spec.down[s].0.len() as i64);
        }
        let res = Resolved::new(spec, teacher, &stages).with_context(|| format!("student spec {:?}", spec.name))?;
        config.mid_block = res.mid.as_ref().map(|(kind, _)| *kind);
        if res.keeps_whole_attentions(teacher) {
            // Each kept transformer keeps its depth (SDXL's per-stage and per-layer depths).
            if !teacher.transformer_layers_per_block.is_empty() {
                config.transformer_layers_per_block = stages.iter().map(|&s| teacher.transformer_layers_per_block[s].select(&spec.down[s].indices())).collect();
            }
            config.reverse_transformer_layers_per_block = teacher.reverse_transformer_layers_per_block.as_ref().map(|rev| {
                (0..m).map(|k| up_of(stages[m - 1 - k], n)).map(|tu| rev[tu].select(&spec.up[tu].indices())).collect()
            });
        } else {
            set_depths(&mut config, teacher, &stages, &res).with_context(|| format!("student spec {:?}", spec.name))?;
        }
        config.validate().with_context(|| format!("student spec {:?} gives an invalid UNet", spec.name))?;

        // The copy map, walked over the student's own tensor names.
        let student = UNet::build(&config, tch::Device::Cpu, tch::Kind::Float, crate::models::Init::Empty);
        let mut copy_map = BTreeMap::new();
        for name in student.vs.variables().keys() {
            if let Some(src) = source_of(name, &res, &stages, n) {
                copy_map.insert(name.clone(), src);
            }
        }
        let feature_pairs = match &spec.feature_pairs {
            Some(pairs) => pairs.iter().map(|(t, s)| FeaturePair { teacher: t.clone(), student: s.clone() }).collect(),
            None => default_feature_pairs(teacher, &config, &stages),
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

    /// The feature pairs `level` distils. The finer levels are read off the copy map: a student
    /// resnet (attention, self-attention) is paired with the teacher one it was copied from. The
    /// mid block is paired whole on the teacher side, with the student's whole mid block or, for
    /// a single-resnet one, that resnet (SSD-1B's pairing).
    pub fn pairs_at(&self, level: FeatureLevel) -> Vec<FeaturePair> {
        let module = |name: &str, suffix: &str| name.strip_suffix(suffix).map(str::to_string);
        let read = |suffix: &str, inner: &dyn Fn(&str) -> bool| -> Vec<FeaturePair> {
            self.copy_map
                .iter()
                .filter(|(s, _)| inner(s))
                .filter_map(|(s, t)| Some(FeaturePair { teacher: module(t, suffix)?, student: module(s, suffix)? }))
                .collect()
        };
        match level {
            FeatureLevel::Blocks => self.feature_pairs.clone(),
            FeatureLevel::SubBlocks => {
                let not_mid = |s: &str| !s.starts_with("mid_block.");
                let mut pairs = read(".conv1.weight", &|s| not_mid(s) && s.contains(".resnets."));
                pairs.extend(read(".proj_in.weight", &|s| not_mid(s) && s.contains(".attentions.")));
                match self.config.mid_block {
                    Some(MidBlockKind::Plain) => pairs.push(FeaturePair { teacher: "mid_block".into(), student: "mid_block.resnets.0".into() }),
                    Some(MidBlockKind::CrossAttn) => pairs.push(FeaturePair { teacher: "mid_block".into(), student: "mid_block".into() }),
                    None => {}
                }
                pairs
            }
            FeatureLevel::SelfAttention => read(".to_q.weight", &|s| s.ends_with(".attn1.to_q.weight")),
        }
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

/// The teacher tensor a student tensor is copied from: student stage k is teacher stage
/// `stages[k]`, student resnet/attention j the j-th kept one (BK-SDM's rule), transformer layer l
/// of a kept attention its l-th kept teacher layer; the rest by name.
fn source_of(name: &str, res: &Resolved, stages: &[usize], n: usize) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let m = stages.len();
    match parts.as_slice() {
        ["down_blocks", k, rest @ ..] => {
            let s = stages[k.parse::<usize>().ok()?];
            Some(format!("down_blocks.{s}.{}", remap_layer(rest, &res.down[s])?))
        }
        ["up_blocks", k, rest @ ..] => {
            let k: usize = k.parse().ok()?;
            let tu = n - 1 - stages[m - 1 - k];
            Some(format!("up_blocks.{tu}.{}", remap_layer(rest, &res.up[tu])?))
        }
        ["mid_block", "attentions", "0", "transformer_blocks", l, tail @ ..] => {
            let layers = res.mid.as_ref()?.1.as_ref()?;
            Some(format!("mid_block.attentions.0.transformer_blocks.{}.{}", layers.get(l.parse::<usize>().ok()?)?, tail.join(".")))
        }
        _ => Some(name.to_string()),
    }
}

/// `resnets.j.…` / `attentions.j.…` -> the kept teacher index (and transformer layer);
/// resamplers keep their names.
fn remap_layer(rest: &[&str], keep: &[KeptLayer]) -> Option<String> {
    match rest {
        ["attentions", j, "transformer_blocks", l, tail @ ..] => {
            let k = keep.get(j.parse::<usize>().ok()?)?;
            let t = k.layers.as_ref()?.get(l.parse::<usize>().ok()?)?;
            Some(format!("attentions.{}.transformer_blocks.{t}.{}", k.resnet, tail.join(".")))
        }
        [kind @ ("resnets" | "attentions"), j, tail @ ..] => {
            let t = keep.get(j.parse::<usize>().ok()?)?.resnet;
            Some(format!("{kind}.{t}.{}", tail.join(".")))
        }
        other => Some(other.join(".")),
    }
}

/// BK-SDM's pairs: every kept down stage's output and every up block's output. A kept stage that
/// loses its downsampler (the innermost kept one when deeper stages are dropped) has a different
/// output size than its teacher stage, so its last attention's `proj_out` is paired instead.
fn default_feature_pairs(teacher: &UNetConfig, student: &UNetConfig, stages: &[usize]) -> Vec<FeaturePair> {
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
            let plan = StudentPlan::new(&StudentSpec::preset(preset, &t).unwrap(), &t).unwrap();
            assert_eq!(count(&plan), params, "{preset}");
            assert!(plan.copy_map.len() == UNet::build(&plan.config, tch::Device::Cpu, tch::Kind::Float, Init::Empty).vs.len(), "{preset}: every tensor has a source");
        }
    }

    #[test]
    fn bk_maps_follow_the_paper() {
        let t = sd("configs/reference/sd15_unet_config.json");
        let base = StudentPlan::new(&StudentSpec::preset("sd_small", &t).unwrap(), &t).unwrap();
        assert_eq!(base.copy_map["up_blocks.1.resnets.1.conv1.weight"], "up_blocks.1.resnets.2.conv1.weight");
        assert_eq!(base.copy_map["up_blocks.3.attentions.1.proj_in.weight"], "up_blocks.3.attentions.2.proj_in.weight");
        assert_eq!(base.copy_map["down_blocks.2.attentions.0.norm.weight"], "down_blocks.2.attentions.0.norm.weight");
        let tiny = StudentPlan::new(&StudentSpec::preset("sd_tiny", &t).unwrap(), &t).unwrap();
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
        let mut spec = StudentSpec::preset("bk_base", &t).unwrap();
        spec.down[1] = vec![3].into();
        let e = StudentPlan::new(&spec, &t).unwrap_err().to_string();
        assert!(e.contains("down stage 1") && e.contains("index 3"), "{e}");
        let mut spec = StudentSpec::preset("bk_small", &t).unwrap();
        spec.drop_stages = vec![1];
        let e = format!("{:#}", StudentPlan::new(&spec, &t).unwrap_err());
        assert!(e.contains("down_blocks.1") && e.contains("channel mismatch"), "{e}");
        let mut spec = StudentSpec::preset("bk_small", &t).unwrap();
        spec.up[2] = vec![0].into();
        let e = StudentPlan::new(&spec, &t).unwrap_err().to_string();
        assert!(e.contains("up block 2"), "{e}");
    }

    fn sdxl() -> UNetConfig {
        sd("configs/reference/sdxl_unet_config.json")
    }

    /// SDXL students from SDXL-base's published config, with unwritten half-precision storage.
    #[test]
    fn sdxl_presets_count_the_published_parameters() {
        let t = sdxl();
        let want = [("ssd_1b", 1_331_334_404i64, 34), ("vega", 745_225_604, 15), ("koala_1b", 1_161_184_324, 30), ("koala_700m", 782_822_724, 21)];
        for (preset, params, blocks) in want {
            let plan = StudentPlan::new(&StudentSpec::preset(preset, &t).unwrap(), &t).unwrap();
            let unet = UNet::build(&plan.config, tch::Device::Cpu, tch::Kind::Half, Init::Empty);
            assert_eq!(unet.num_params(), params, "{preset}");
            assert_eq!(plan.config.transformer_block_count(), blocks, "{preset}");
            assert_eq!(plan.copy_map.len(), unet.vs.len(), "{preset}: every tensor has a source");
        }
    }

    #[test]
    fn sdxl_presets_write_diffusers_depth_keys() {
        let t = sdxl();
        let json = |p: &str| StudentPlan::new(&StudentSpec::preset(p, &t).unwrap(), &t).unwrap().config.to_json();
        let ssd = json("ssd_1b");
        assert_eq!(ssd["transformer_layers_per_block"], serde_json::json!([1, 2, 4]));
        assert_eq!(ssd["reverse_transformer_layers_per_block"], serde_json::json!([[4, 4, 10], [2, 1, 1], 1]));
        assert_eq!(ssd["mid_block_type"], "UNetMidBlock2D");
        let vega = json("vega");
        assert_eq!((&vega["transformer_layers_per_block"], &vega["reverse_transformer_layers_per_block"]), (&serde_json::json!([1, 1, 2]), &serde_json::Value::Null));
        let koala = json("koala_1b");
        assert_eq!((&koala["transformer_layers_per_block"], &koala["layers_per_block"], &koala["mid_block_type"]), (&serde_json::json!([1, 2, 6]), &serde_json::json!(1), &serde_json::json!("UNetMidBlock2DCrossAttn")));
        assert_eq!(json("koala_700m")["mid_block_type"], serde_json::Value::Null);
        for bk in ["bk_base", "bk_small", "bk_tiny"] {
            let c = json(bk);
            assert_eq!((&c["layers_per_block"], &c["transformer_layers_per_block"]), (&serde_json::json!(1), &serde_json::json!([1, 2, 10])), "{bk}");
            assert_eq!(c["mid_block_type"].is_null(), bk != "bk_base", "{bk}");
        }
        for (bk, blocks) in [("bk_base", 46), ("bk_small", 36), ("bk_tiny", 36)] {
            assert_eq!(StudentPlan::new(&StudentSpec::preset(bk, &t).unwrap(), &t).unwrap().config.transformer_block_count(), blocks, "{bk}");
        }
        let tiny = StudentPlan::new(&StudentSpec::preset("bk_tiny", &t).unwrap(), &t).unwrap();
        assert!(tiny.feature_pairs.contains(&FeaturePair { teacher: "mid_block".into(), student: "down_blocks.2".into() }));
    }

    #[test]
    fn kept_layers_map_to_their_teacher_layers() {
        let t = sdxl();
        let ssd = StudentPlan::new(&StudentSpec::preset("ssd_1b", &t).unwrap(), &t).unwrap();
        assert_eq!(ssd.copy_map["down_blocks.2.attentions.1.transformer_blocks.3.ff.net.2.weight"], "down_blocks.2.attentions.1.transformer_blocks.3.ff.net.2.weight");
        assert_eq!(ssd.copy_map["mid_block.resnets.0.conv1.weight"], "mid_block.resnets.0.conv1.weight");
        assert!(!ssd.copy_map.keys().any(|k| k.contains("transformer_blocks.4") && k.starts_with("down_blocks.2")));
        let koala = StudentPlan::new(&StudentSpec::preset("koala_1b", &t).unwrap(), &t).unwrap();
        assert_eq!(koala.copy_map["up_blocks.0.attentions.1.transformer_blocks.5.attn1.to_q.weight"], "up_blocks.0.attentions.2.transformer_blocks.5.attn1.to_q.weight");
        assert_eq!(koala.copy_map["mid_block.attentions.0.transformer_blocks.5.norm1.weight"], "mid_block.attentions.0.transformer_blocks.5.norm1.weight");
        let yaml: StudentSpec = serde_yaml::from_str(
            "down: [2, [0, 1], [{resnet: 0, layers: [0, 1, 8, 9]}, {resnet: 1, layers: [9, 0, 1, 2]}]]\n\
             up: [[{resnet: 0, depth: 4}, {resnet: 1, depth: 4}, {resnet: 2, depth: 4}], 3, 3]\n\
             mid_block: {layers: [2, 3, 4, 5]}\n",
        )
        .unwrap();
        let spec = StudentPlan::new(&yaml, &t).unwrap();
        assert_eq!(spec.copy_map["down_blocks.2.attentions.0.transformer_blocks.2.attn2.to_k.weight"], "down_blocks.2.attentions.0.transformer_blocks.8.attn2.to_k.weight");
        assert_eq!(spec.copy_map["down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_v.weight"], "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_v.weight");
        assert_eq!(spec.copy_map["mid_block.attentions.0.transformer_blocks.1.attn1.to_v.weight"], "mid_block.attentions.0.transformer_blocks.3.attn1.to_v.weight");
        assert_eq!(spec.config.to_json()["transformer_layers_per_block"], serde_json::json!([1, 2, 4]));
    }

    /// A spec the teacher cannot give is refused naming the spec's key.
    #[test]
    fn impossible_sdxl_specs_name_the_key() {
        let t = sdxl();
        let err = |yaml: &str, t: &UNetConfig| -> String {
            match serde_yaml::from_str::<StudentSpec>(yaml) {
                Ok(spec) => format!("{:#}", StudentPlan::new(&spec, t).unwrap_err()),
                Err(e) => e.to_string(),
            }
        };
        let full_up = "up: [3, 3, 3]\n";
        let cases = [
            ("down: [2, 2, [{resnet: 0, depth: 11}, 1]]\n", "down[2][0]: depth 11, but the teacher's attention has 10"),
            ("down: [2, 2, [{resnet: 0, layers: [0, 3, 3]}, 1]]\n", "down[2][0]: layers lists layer 3 twice"),
            ("down: [2, 2, [{resnet: 0, layers: [0, 10]}, 1]]\n", "down[2][0]: layers names layer 10"),
            ("down: [[{resnet: 0, depth: 1}, 1], 2, 2]\n", "down[0][0]: the teacher's block has no attention"),
            ("down: [2, 2, [{resnet: 0, depth: 4, layers: [1]}, 1]]\n", "give `depth` or `layers`, not both"),
            ("down: [2, 2, 2]\nmid_block: {depth: 6}\n", "mid_block: depth 6, but diffusers builds the mid block as deep as the last stage"),
            ("down: [2, 2, 2]\nmid_block: most\n", "mid_block"),
        ];
        for (down, want) in cases {
            let e = err(&format!("{down}{full_up}"), &t);
            assert!(e.contains(want), "{down}: {e}");
        }
        let mut no_mid = t.clone();
        no_mid.mid_block = None;
        let e = err("down: [2, 2, 2]\nup: [3, 3, 3]\nmid_block: full\n", &no_mid);
        assert!(e.contains("mid_block") && e.contains("teacher has none"), "{e}");
        let mut plain_mid = t.clone();
        plain_mid.mid_block = Some(MidBlockKind::Plain);
        let e = err("down: [2, 2, 2]\nup: [3, 3, 3]\nmid_block: full\n", &plain_mid);
        assert!(e.contains("mid_block: full") && e.contains("UNetMidBlock2D"), "{e}");
        let e = StudentSpec::preset("koala_700m", &sd("configs/reference/sd15_unet_config.json")).unwrap_err().to_string();
        assert!(e.contains("koala_700m") && e.contains("SDXL teacher") && e.contains("SD-1.x/2.x"), "{e}");
    }

    /// docs/students.md's SSD-1B spec file is the preset.
    #[test]
    fn the_documented_spec_file_is_the_preset() {
        let doc = std::fs::read_to_string("docs/students.md").unwrap();
        let yaml = doc.split("```yaml\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
        let spec: StudentSpec = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(spec, StudentSpec::preset("ssd_1b", &sdxl()).unwrap());
    }

    /// SSD-1B's trainer distils 26 points; KOALA's self-attention pairs follow the copied layers.
    #[test]
    fn finer_feature_levels_follow_the_copy_map() {
        let t = sdxl();
        let ssd = StudentPlan::new(&StudentSpec::preset("ssd_1b", &t).unwrap(), &t).unwrap();
        let pairs = ssd.pairs_at(FeatureLevel::SubBlocks);
        assert_eq!(pairs.len(), 26);
        assert!(pairs.contains(&FeaturePair { teacher: "mid_block".into(), student: "mid_block.resnets.0".into() }));
        assert!(pairs.contains(&FeaturePair { teacher: "up_blocks.0.attentions.2".into(), student: "up_blocks.0.attentions.2".into() }));
        let koala = StudentPlan::new(&StudentSpec::preset("koala_1b", &t).unwrap(), &t).unwrap();
        let attn = koala.pairs_at(FeatureLevel::SelfAttention);
        assert_eq!(attn.len() as i64, koala.config.transformer_block_count());
        assert!(attn.contains(&FeaturePair {
            teacher: "up_blocks.0.attentions.2.transformer_blocks.5.attn1".into(),
            student: "up_blocks.0.attentions.1.transformer_blocks.5.attn1".into()
        }));
        // docs/students.md's table
        let counts = |p: &StudentPlan| [FeatureLevel::Blocks, FeatureLevel::SubBlocks, FeatureLevel::SelfAttention].map(|l| p.pairs_at(l).len());
        assert_eq!((counts(&ssd), counts(&koala)), ([6, 26, 34], [6, 16, 30]));
        assert!(koala.pairs_at(FeatureLevel::SubBlocks).contains(&FeaturePair { teacher: "up_blocks.0.resnets.2".into(), student: "up_blocks.0.resnets.1".into() }));
    }
}
