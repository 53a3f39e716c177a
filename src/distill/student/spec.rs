//! The student spec grammar: which teacher resnets each stage keeps, how many (and which) transformer
//! layers each kept attention keeps, and what becomes of the mid block; and the presets, which are
//! specs like any other.
use crate::models::unet_config::{DownBlockKind, UNetConfig};
use anyhow::{anyhow, bail, Context, Result};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::path::Path;

/// What a student keeps of its teacher. Indices refer to the teacher's stages and blocks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    /// A name for reports (the preset name, or the spec file's stem).
    #[serde(default)]
    pub name: String,
    /// Per teacher down stage: the resnets (with their attentions) kept, in order.
    pub down: Vec<Stage>,
    /// Per teacher up block: the resnets (with their attentions) kept, in order. An up block must
    /// keep one more than its mirrored down stage (diffusers' `layers_per_block + 1`).
    pub up: Vec<Stage>,
    /// What the student's mid block is.
    #[serde(default)]
    pub mid_block: MidSpec,
    /// Teacher stages removed together with their mirrored up block (BK-SDM-Tiny drops the
    /// innermost one).
    #[serde(default)]
    pub drop_stages: Vec<usize>,
    /// `[teacher feature, student feature]` pairs for feature KD; derived when absent.
    #[serde(default)]
    pub feature_pairs: Option<Vec<(String, String)>>,
}

/// Which transformer layers (`transformer_blocks.l`) of a kept attention the student keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layers {
    /// All of the teacher's, in order.
    All,
    /// The first k (`depth: k`).
    First(usize),
    /// These teacher layers, in this order (`layers: [0, 1, 8, 9]`).
    Pick(Vec<usize>),
}

/// One kept resnet (and the attention after it): the teacher's index and the transformer layers.
/// Written as the index alone (every layer), or `{resnet: 1, depth: 4}` / `{resnet: 1, layers:
/// [0, 1, 8, 9]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub resnet: usize,
    pub layers: Layers,
}

impl Kept {
    pub fn all(resnet: usize) -> Kept {
        Kept { resnet, layers: Layers::All }
    }

    pub fn depth(resnet: usize, depth: usize) -> Kept {
        Kept { resnet, layers: Layers::First(depth) }
    }
}

/// One stage's kept resnets: a list of [`Kept`], or a count n (resnets 0..n with every layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage(pub Vec<Kept>);

impl From<Vec<usize>> for Stage {
    fn from(indices: Vec<usize>) -> Stage {
        Stage(indices.into_iter().map(Kept::all).collect())
    }
}

impl Stage {
    pub fn indices(&self) -> Vec<usize> {
        self.0.iter().map(|k| k.resnet).collect()
    }
}

/// `mid_block`: `true` keeps the teacher's as it is, `false`/`none` drops it, `resnet` is
/// diffusers' `UNetMidBlock2D` (the teacher's first mid resnet alone, as SSD-1B and Segmind-Vega),
/// `full` the cross-attention mid block with every layer, `{depth: k}` / `{layers: [...]}` with
/// those transformer layers (KOALA-1B keeps 6 of 10).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MidSpec {
    #[default]
    Keep,
    None,
    Resnet,
    Full(Layers),
}

/// The map forms of a layer choice: `{resnet, depth}` / `{resnet, layers}` and the mid block's
/// `{depth}` / `{layers}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerMap {
    resnet: Option<usize>,
    depth: Option<usize>,
    layers: Option<Vec<usize>>,
}

impl LayerMap {
    fn layers<E: de::Error>(&self) -> Result<Layers, E> {
        match (self.depth, &self.layers) {
            (Some(_), Some(_)) => Err(E::custom("give `depth` or `layers`, not both")),
            (Some(d), None) => Ok(Layers::First(d)),
            (None, Some(l)) => Ok(Layers::Pick(l.clone())),
            (None, None) => Ok(Layers::All),
        }
    }
}

impl<'de> Deserialize<'de> for Kept {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Kept, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Kept;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a teacher resnet index, or {resnet: i, depth: k} / {resnet: i, layers: [...]}")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Kept, E> {
                Ok(Kept::all(v as usize))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Kept, A::Error> {
                let m = LayerMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let resnet = m.resnet.ok_or_else(|| de::Error::missing_field("resnet"))?;
                Ok(Kept { resnet, layers: m.layers()? })
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Stage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Stage, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Stage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a count of resnets, or a list of kept resnets")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Stage, E> {
                Ok(Stage((0..n as usize).map(Kept::all).collect()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Stage, A::Error> {
                let mut kept = vec![];
                while let Some(k) = seq.next_element::<Kept>()? {
                    kept.push(k);
                }
                Ok(Stage(kept))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for MidSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MidSpec, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MidSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, none, resnet, full, or {depth: k} / {layers: [...]}")
            }
            fn visit_bool<E: de::Error>(self, keep: bool) -> Result<MidSpec, E> {
                Ok(if keep { MidSpec::Keep } else { MidSpec::None })
            }
            fn visit_str<E: de::Error>(self, word: &str) -> Result<MidSpec, E> {
                match word {
                    "none" => Ok(MidSpec::None),
                    "resnet" => Ok(MidSpec::Resnet),
                    "full" => Ok(MidSpec::Full(Layers::All)),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MidSpec, A::Error> {
                let m = LayerMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                if m.resnet.is_some() {
                    return Err(de::Error::unknown_field("resnet", &["depth", "layers"]));
                }
                Ok(MidSpec::Full(m.layers()?))
            }
        }
        d.deserialize_any(V)
    }
}

/// The presets: BK-SDM's (with Segmind's names for two of them: `sd_small` is `bk_base`,
/// `sd_tiny` is `bk_tiny`) and the published SDXL students.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    BkBase,
    BkSmall,
    BkTiny,
    /// Segmind's SSD-1B (arXiv 2401.02677): SDXL's resnets, fewer transformer layers, an
    /// asymmetric decoder, a single-resnet mid block.
    Ssd1b,
    /// Segmind-Vega: SSD-1B's recipe cut further, symmetric.
    Vega,
    /// KOALA-1B (arXiv 2312.04005): one resnet per down stage, 6 of 10 layers, mid block of 6.
    Koala1b,
    /// KOALA-700M: as KOALA-1B with 5 layers and no mid block.
    Koala700m,
}

impl Preset {
    pub const ALL: [Preset; 7] = [Preset::BkBase, Preset::BkSmall, Preset::BkTiny, Preset::Ssd1b, Preset::Vega, Preset::Koala1b, Preset::Koala700m];

    /// Every name a preset answers to: its own and Segmind's.
    const NAMES: [(&'static str, Preset); 9] = [
        ("bk_base", Preset::BkBase),
        ("sd_small", Preset::BkBase),
        ("bk_small", Preset::BkSmall),
        ("bk_tiny", Preset::BkTiny),
        ("sd_tiny", Preset::BkTiny),
        ("ssd_1b", Preset::Ssd1b),
        ("vega", Preset::Vega),
        ("koala_1b", Preset::Koala1b),
        ("koala_700m", Preset::Koala700m),
    ];

    /// The preset a name (or alias) means, with that name as a `'static` string.
    pub(super) fn named(name: &str) -> Option<(Preset, &'static str)> {
        Preset::NAMES.iter().find(|(n, _)| *n == name).map(|&(n, p)| (p, n))
    }

    /// Its canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::BkBase => "bk_base",
            Preset::BkSmall => "bk_small",
            Preset::BkTiny => "bk_tiny",
            Preset::Ssd1b => "ssd_1b",
            Preset::Vega => "vega",
            Preset::Koala1b => "koala_1b",
            Preset::Koala700m => "koala_700m",
        }
    }

    /// Whether the preset is defined on SDXL's layout only.
    pub fn sdxl_only(self) -> bool {
        !matches!(self, Preset::BkBase | Preset::BkSmall | Preset::BkTiny)
    }

    /// Its spec for `teacher`. The SDXL students need an SDXL-shaped teacher (added `text_time`
    /// conditioning, a plain stage then two cross-attention stages of two resnets); whether its
    /// attentions are deep enough is checked when the spec is applied.
    pub fn spec(self, teacher: &UNetConfig) -> Result<StudentSpec> {
        let stages = teacher.num_stages();
        let sdxl = is_sdxl(teacher);
        if self.sdxl_only() && !sdxl {
            bail!(
                "student preset {:?} is an SDXL student and needs an SDXL teacher (text_time conditioning; DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D with 2 resnets each), but the teacher is an SD-1.x/2.x-style UNet ({stages} stages, {})",
                self.name(),
                if teacher.addition_embed.is_some() { "another layout" } else { "no added conditioning" }
            );
        }
        let bk_up = || vec![Stage::from(vec![0, 2]); stages];
        let spec = |down: Vec<Stage>, up: Vec<Stage>, mid_block: MidSpec| StudentSpec {
            name: self.name().to_string(),
            down,
            up,
            mid_block,
            drop_stages: vec![],
            feature_pairs: None,
        };
        let d = |depths: &[usize]| Stage(depths.iter().enumerate().map(|(i, &k)| Kept::depth(i, k)).collect());
        let ud = |pairs: &[(usize, usize)]| Stage(pairs.iter().map(|&(i, k)| Kept::depth(i, k)).collect());
        Ok(match self {
            Preset::BkBase | Preset::BkSmall | Preset::BkTiny if !sdxl => StudentSpec {
                mid_block: if self == Preset::BkBase { MidSpec::Keep } else { MidSpec::None },
                drop_stages: if self == Preset::BkTiny { vec![stages - 1] } else { vec![] },
                ..spec(vec![vec![0].into(); stages], bk_up(), MidSpec::Keep)
            },
            // diffengine's DistillSDXL (`sd_small`, `sd_tiny`): one resnet per down stage, up
            // resnets 0 and 2, every stage kept; tiny drops the mid block and pairs the teacher's
            // mid output with the student's last down block. BK-Small drops the mid block alone.
            Preset::BkBase => StudentSpec {
                feature_pairs: Some(sdxl_block_pairs(stages, ("mid_block", "mid_block"))),
                ..spec(vec![vec![0].into(); stages], bk_up(), MidSpec::Keep)
            },
            Preset::BkSmall => spec(vec![vec![0].into(); stages], bk_up(), MidSpec::None),
            Preset::BkTiny => StudentSpec {
                feature_pairs: Some(sdxl_block_pairs(stages, ("mid_block", &format!("down_blocks.{}", stages - 1)))),
                ..spec(vec![vec![0].into(); stages], bk_up(), MidSpec::None)
            },
            Preset::Ssd1b => spec(
                vec![vec![0, 1].into(), d(&[2, 2]), d(&[4, 4])],
                vec![d(&[4, 4, 10]), d(&[2, 1, 1]), vec![0, 1, 2].into()],
                MidSpec::Resnet,
            ),
            Preset::Vega => spec(
                vec![vec![0, 1].into(), d(&[1, 1]), d(&[2, 2])],
                vec![d(&[2, 2, 2]), d(&[1, 1, 1]), vec![0, 1, 2].into()],
                MidSpec::Resnet,
            ),
            Preset::Koala1b | Preset::Koala700m => {
                let deep = if self == Preset::Koala1b { 6 } else { 5 };
                spec(
                    vec![vec![0].into(), d(&[2]), d(&[deep])],
                    vec![ud(&[(0, deep), (2, deep)]), ud(&[(0, 2), (2, 2)]), vec![0, 2].into()],
                    if self == Preset::Koala1b { MidSpec::Full(Layers::First(6)) } else { MidSpec::None },
                )
            }
        })
    }
}

/// diffengine's DistillSDXL feature pairs: every down block, the mid pair given, every up block.
fn sdxl_block_pairs(stages: usize, mid: (&str, &str)) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = (0..stages).map(|i| (format!("down_blocks.{i}"), format!("down_blocks.{i}"))).collect();
    pairs.push((mid.0.to_string(), mid.1.to_string()));
    pairs.extend((0..stages).map(|i| (format!("up_blocks.{i}"), format!("up_blocks.{i}"))));
    pairs
}

/// SDXL's UNet layout: `text_time` added conditioning, a plain stage then two cross-attention
/// stages of two resnets each (its transformer depths may differ).
pub fn is_sdxl(c: &UNetConfig) -> bool {
    c.addition_embed.is_some()
        && c.down_block_types == [DownBlockKind::Plain, DownBlockKind::CrossAttn, DownBlockKind::CrossAttn]
        && c.layers_per_block == [2, 2, 2]
}

impl std::str::FromStr for Preset {
    type Err = anyhow::Error;
    fn from_str(name: &str) -> Result<Preset> {
        Preset::named(name).map(|(preset, _)| preset).ok_or_else(|| unknown_preset(name))
    }
}

pub(super) fn unknown_preset(name: &str) -> anyhow::Error {
    anyhow!("unknown student preset {name:?} (bk_base/sd_small, bk_small, bk_tiny/sd_tiny, ssd_1b, vega, koala_1b, koala_700m, or a spec .yaml)")
}

impl StudentSpec {
    /// A preset by name (`Preset`) for `teacher`.
    pub fn preset(name: &str, teacher: &UNetConfig) -> Result<StudentSpec> {
        name.parse::<Preset>()?.spec(teacher)
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
