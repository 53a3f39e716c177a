//! CLIP score by BK-SDM's protocol: open_clip ViT-g-14 (`laion2b_s34b_b88k`), open_clip's
//! validation preprocessing and tokenizer, per image-caption pair the cosine of the two
//! embeddings; reported as the mean cosine (BK-SDM) and as torchmetrics' `CLIPScore`
//! (`max(100 * mean cosine, 0)`). docs/eval.md gives the measured agreement.
use crate::data::transform::{self, Filter};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::open_clip::OpenClip;
use anyhow::{bail, Context, Result};
use image::RgbImage;
use regex::Regex;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use unicode_normalization::UnicodeNormalization;

/// open_clip's `OPENAI_DATASET_MEAN` / `OPENAI_DATASET_STD` (ViT-g-14's `preprocess_cfg`), as
/// the Python floats torchvision's `Normalize` rounds to float32.
pub const MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Python's `int(round(x / 2.0))` for a non-negative integer x: round half to even.
fn half_even(d: u32) -> u32 {
    let k = d / 2;
    if d % 2 == 1 && k % 2 == 1 {
        k + 1
    } else {
        k
    }
}

/// open_clip's validation transform (`image_transform_v2(PreprocessCfg(size), is_train=False)`,
/// what `create_model_and_transforms(...)[2]` is for ViT-g-14): torchvision `Resize(size)` on a
/// PIL image (shorter side to `size`, the longer `int(size * long / short)`, PIL bicubic),
/// `CenterCrop(size)` (offsets `int(round(d / 2))`), `ToTensor`, `Normalize(MEAN, STD)`, all in
/// float32 as torchvision computes them. Returns (3, size, size).
pub fn preprocess(img: &RgbImage, size: u32) -> Tensor {
    let (w, h) = img.dimensions();
    let (short, long) = (w.min(h), w.max(h));
    let new_long = (size as f64 * long as f64 / short as f64) as u32;
    let (nw, nh) = if w <= h { (size, new_long) } else { (new_long, size) };
    let resized;
    let img = if (nw, nh) == (w, h) {
        img
    } else {
        resized = transform::resize(img, (nw, nh), Filter::Bicubic);
        &resized
    };
    let (left, top) = (half_even(nw - size), half_even(nh - size));
    let raw = img.as_raw();
    let s = size as usize;
    let (mean, std) = (MEAN.map(|m| m as f32), STD.map(|v| v as f32));
    let mut out = vec![0f32; 3 * s * s];
    for y in 0..s {
        for x in 0..s {
            let p = ((top as usize + y) * nw as usize + left as usize + x) * 3;
            for c in 0..3 {
                out[c * s * s + y * s + x] = (raw[p + c] as f32 / 255.0 - mean[c]) / std[c];
            }
        }
    }
    Tensor::from_slice(&out).view([3, size as i64, size as i64])
}

/// open_clip's `SimpleTokenizer` (`open_clip.get_tokenizer("ViT-g-14")`): CLIP's BPE (the
/// vocabulary sdkd embeds), open_clip's special tokens `<start_of_text>` / `<end_of_text>`, its
/// cleaning, truncation to the context length with the last id replaced by `<end_of_text>`, zero
/// padding.
pub struct Tokenizer {
    bpe: ClipTokenizer,
    pattern: Regex,
    pub context_length: usize,
}

/// Python's `str.isspace` (what `str.split()` and `strip()` use): Unicode whitespace plus the
/// four information separators U+001C..U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `html.unescape` for the entities captions carry: numeric ones and amp, lt, gt, quot, apos,
/// nbsp (Python also knows the other HTML5 names; those stay as they are here).
fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let re = Regex::new(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|amp;?|lt;?|gt;?|quot;?|apos;|nbsp;?)").expect("valid regex");
    re.replace_all(text, |m: &regex::Captures| {
        let e = m[1].trim_end_matches(';');
        let num = if let Some(hex) = e.strip_prefix("#x").or_else(|| e.strip_prefix("#X")) {
            u32::from_str_radix(hex, 16).ok()
        } else {
            e.strip_prefix('#').and_then(|d| d.parse::<u32>().ok())
        };
        match (e, num) {
            (_, Some(n)) => match n {
                0 | 0xd800..=0xdfff => '\u{fffd}'.to_string(),
                n if n > 0x10ffff => '\u{fffd}'.to_string(),
                n => char::from_u32(n).map_or_else(|| m[0].to_string(), String::from),
            },
            ("amp", _) => "&".into(),
            ("lt", _) => "<".into(),
            ("gt", _) => ">".into(),
            ("quot", _) => "\"".into(),
            ("apos", _) => "'".into(),
            ("nbsp", _) => "\u{a0}".into(),
            _ => m[0].to_string(),
        }
    })
    .into_owned()
}

/// The parts of `ftfy.fix_text` (ftfy 6 defaults) that change well-formed text: HTML entities
/// when the text has no `<`, curly quotes to straight ones, Latin ligatures and full-width
/// characters to ASCII, NFC. Not done: ftfy's repair of mojibake (UTF-8 decoded as Latin-1 or
/// cp1252), which needs its byte-sequence heuristics.
fn ftfy_subset(text: &str) -> String {
    let t = if text.contains('<') { text.to_string() } else { html_unescape(text) };
    let mut out = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}' => out.push('\''),
            '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{201f}' => out.push('"'),
            '\u{fb00}' => out.push_str("ff"),
            '\u{fb01}' => out.push_str("fi"),
            '\u{fb02}' => out.push_str("fl"),
            '\u{fb03}' => out.push_str("ffi"),
            '\u{fb04}' => out.push_str("ffl"),
            '\u{fb05}' | '\u{fb06}' => out.push_str("st"),
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ff5e}' => out.push(char::from_u32(c as u32 - 0xff01 + 0x21).expect("ASCII")),
            c => out.push(c),
        }
    }
    out.nfc().collect()
}

impl Tokenizer {
    pub fn new(context_length: usize) -> Result<Self> {
        if context_length < 2 {
            bail!("a CLIP context length of {context_length} leaves no room for <start_of_text> and <end_of_text>");
        }
        Ok(Tokenizer {
            bpe: ClipTokenizer::embedded("<|endoftext|>")?,
            // SimpleTokenizer's pattern, compiled with re.IGNORECASE
            pattern: Regex::new(r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+").expect("valid regex"),
            context_length,
        })
    }

    /// open_clip's `_clean_lower`: ftfy, `html.unescape` twice, whitespace runs to one space,
    /// stripped, lower-cased (Python's `str.lower`, with its final-sigma rule, as Rust's).
    pub fn clean(text: &str) -> String {
        let t = html_unescape(&html_unescape(&ftfy_subset(text)));
        t.split(py_space).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ").to_lowercase()
    }

    /// `SimpleTokenizer.encode`: the ids of the cleaned text, without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut ids = vec![];
        for m in self.pattern.find_iter(&Self::clean(text)) {
            match m.as_str() {
                "<start_of_text>" => ids.push(self.bpe.bos_id()),
                "<end_of_text>" => ids.push(self.bpe.eos_id()),
                word => ids.extend(self.bpe.bpe_word(word)),
            }
        }
        ids
    }

    /// `tokenizer(texts)`: (n, context_length) int64.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Tensor {
        let n = self.context_length;
        let mut all = vec![0i64; texts.len() * n];
        for (i, t) in texts.iter().enumerate() {
            let mut ids = vec![self.bpe.bos_id()];
            ids.extend(self.encode(t.as_ref()));
            ids.push(self.bpe.eos_id());
            if ids.len() > n {
                ids.truncate(n);
                ids[n - 1] = self.bpe.eos_id();
            }
            all[i * n..i * n + ids.len()].copy_from_slice(&ids);
        }
        Tensor::from_slice(&all).view([texts.len() as i64, n as i64])
    }
}

/// The two numbers of a CLIP score run.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipScore {
    /// Mean cosine of the L2-normalized image and caption embeddings (BK-SDM's `clip_score`).
    pub mean_cosine: f64,
    /// torchmetrics' `CLIPScore`: `max(100 * mean cosine, 0)`.
    pub torchmetrics: f64,
    pub count: usize,
}

impl ClipScore {
    /// From per-pair cosines (in float64, in order).
    pub fn from_cosines(cosines: &[f64]) -> Result<Self> {
        if cosines.is_empty() {
            bail!("no image-caption pairs to score");
        }
        let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
        Ok(ClipScore { mean_cosine: mean, torchmetrics: (100.0 * mean).max(0.0), count: cosines.len() })
    }
}

/// The CLIP model and its tokenizer, loaded once; images in, cosines out.
pub struct ClipScorer {
    pub model: OpenClip,
    pub tokenizer: Tokenizer,
}

impl ClipScorer {
    /// Reads open_clip's `open_clip_pytorch_model.bin` or `open_clip_model.safetensors`
    /// (a missing or unreadable file is an error naming it and where users get it).
    pub fn load(weights: &Path, device: Device) -> Result<Self> {
        let model = OpenClip::load(weights, device)?;
        let tokenizer = Tokenizer::new(model.config.text.context_length as usize)?;
        Ok(ClipScorer { model, tokenizer })
    }

    pub fn device(&self) -> Device {
        self.model.visual.device()
    }

    /// `encode_image(preprocess(images))`, unnormalized, (n, embed_dim) on the model's device.
    pub fn image_embeds(&self, images: &[RgbImage]) -> Tensor {
        let size = self.model.config.vision.image_size as u32;
        let px: Vec<Tensor> = images.iter().map(|im| preprocess(im, size)).collect();
        tch::no_grad(|| self.model.visual.forward(&Tensor::stack(&px, 0).to_device(self.device())))
    }

    /// `encode_text(tokenizer(captions))`, unnormalized, (n, embed_dim).
    pub fn text_embeds<S: AsRef<str>>(&self, captions: &[S]) -> Tensor {
        tch::no_grad(|| self.model.text.forward(&self.tokenizer.tokenize(captions).to_device(self.device())))
    }

    /// Per pair, the cosine of the normalized embeddings (float64, on the CPU).
    pub fn cosines<S: AsRef<str>>(&self, images: &[RgbImage], captions: &[S]) -> Result<Vec<f64>> {
        if images.len() != captions.len() {
            bail!("{} images but {} captions", images.len(), captions.len());
        }
        if images.is_empty() {
            return Ok(vec![]);
        }
        let norm = |t: Tensor| {
            let t = t.to_kind(Kind::Double);
            let n = t.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
            t / n
        };
        let (i, t) = (norm(self.image_embeds(images)), norm(self.text_embeds(captions)));
        let cos = (i * t).sum_dim_intlist(&[-1i64][..], false, Kind::Double).to_device(Device::Cpu);
        Ok(Vec::<f64>::try_from(&cos)?)
    }

    /// Scores image files against their captions in batches of `batch_size`.
    pub fn score_files(&self, pairs: &[(PathBuf, String)], batch_size: usize) -> Result<ClipScore> {
        let mut cos = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(batch_size.max(1)) {
            let images = chunk
                .iter()
                .map(|(p, _)| Ok(image::open(p).with_context(|| format!("decoding {}", p.display()))?.to_rgb8()))
                .collect::<Result<Vec<_>>>()?;
            let caps: Vec<&str> = chunk.iter().map(|(_, c)| c.as_str()).collect();
            cos.extend(self.cosines(&images, &caps)?);
        }
        ClipScore::from_cosines(&cos)
    }
}

/// The captions of an image folder, paired by file name: a `metadata.csv` or `metadata.jsonl`
/// (or the `captions.jsonl` that `sdkd eval --model` writes beside its images; `file_name` and
/// `text` or `caption`, read by [`super::prompts::read`]) in the folder or given
/// as `captions`. Returns (image path, caption) in file-name order; a caption without a file name,
/// or naming an absent image, is an error naming the file.
pub fn read_captions(images: &Path, captions: &Path) -> Result<Vec<(PathBuf, String)>> {
    let file = if captions.is_dir() {
        ["metadata.jsonl", "metadata.csv", "captions.jsonl"].iter().map(|n| captions.join(n)).find(|p| p.is_file()).with_context(|| {
            format!("{} holds no metadata.csv, metadata.jsonl or captions.jsonl (sdkd eval --model's) with file_name and text/caption", captions.display())
        })?
    } else {
        captions.to_path_buf()
    };
    let mut rows = vec![];
    for (i, c) in super::prompts::read(&file)?.into_iter().enumerate() {
        let Some(name) = c.file_name else {
            bail!("{}: caption {} has no file_name, so it cannot be paired with an image", file.display(), i + 1);
        };
        let p = images.join(&name);
        if !p.is_file() {
            bail!("{}: {name:?} is not an image in {}", file.display(), images.display());
        }
        rows.push((p, c.text));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(rows)
}
