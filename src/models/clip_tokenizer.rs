//! CLIP's byte-level BPE tokenizer, exactly as transformers' `CLIPTokenizer` (the
//! tokenizers-backed class of transformers 5) encodes: added tokens split out first (those marked
//! `normalized: false` from the raw text, the others from the normalized text), then NFC,
//! whitespace runs to one space, per-character lower-casing, CLIP's split pattern, bytes to
//! unicode characters, BPE with `</w>` on the last symbol of each word, then BOS ... EOS,
//! truncation and padding to `model_max_length` (77) with the configured pad token
//! (`<|endoftext|>` in SD-1.x, `!` in SD-2.x, where `!` then splits out of the text as a special
//! token, as in transformers).
//!
//! Loads a published `tokenizer/` folder: `tokenizer.json` when present (as transformers does),
//! else `vocab.json` + `merges.txt`, with the special tokens of `tokenizer_config.json` and
//! `special_tokens_map.json`. Like transformers, the normalizer and pre-tokenizer written in a
//! `tokenizer.json` are not read: `CLIPTokenizer` always applies CLIP's.
//! ftfy and HTML unescaping (the original OpenAI code) are not applied: transformers 5 does not
//! apply them either.
use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Tensor};
use unicode_normalization::UnicodeNormalization;

/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The GPT-2 pattern of the `ByteLevel` pre-tokenizer that runs after CLIP's. Its whitespace
/// alternatives (`\s+(?!\S)|\s+`) are dropped: CLIP's split leaves no whitespace to match.
/// It only changes anything on `<|startoftext|>`-like words that were not split out as added
/// tokens (e.g. `<|ENDOFTEXT|>`, which lower-cases to the pattern but is not an added token).
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+";
const END_OF_WORD: &str = "</w>";
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_MAX_LENGTH: usize = 77;

/// A token that is matched in the text before BPE (the special tokens, and any others a
/// `tokenizer.json` lists).
#[derive(Debug, Clone, PartialEq)]
pub struct AddedToken {
    pub content: String,
    pub id: i64,
    /// Matched in the normalized text (lower-cased etc.) rather than the raw text.
    pub normalized: bool,
    /// Dropped by `decode(.., skip_special = true)`.
    pub special: bool,
}

/// The roles the special tokens play.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
    pub pad: String,
    pub unk: String,
}

#[derive(Debug)]
pub struct ClipTokenizer {
    vocab: HashMap<String, i64>,
    id_to_token: HashMap<i64, String>,
    /// (left id, right id) -> (rank, merged id)
    merges: HashMap<(i64, i64), (usize, i64)>,
    /// Added tokens matched in the raw text, then those matched in the normalized text (with
    /// their normalized content), longest first within each list.
    raw_added: Vec<AddedToken>,
    normalized_added: Vec<AddedToken>,
    special_ids: Vec<i64>,
    pub special: SpecialTokens,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    unk_id: Option<i64>,
    model_max_length: usize,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    clip_re: Regex,
    byte_level_re: Regex,
    whitespace_re: Regex,
    /// Which files it came from, for messages and `inspect`.
    pub source: String,
}

/// GPT-2's reversible map from bytes to printable unicode characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1 is valid unicode")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("U+0100.. is valid unicode")
        };
    }
    table
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// A special token entry of tokenizer_config.json / special_tokens_map.json: a string (not
/// normalized, as tokenizers adds special tokens) or an `AddedToken` object.
fn token_entry(v: &Value) -> Option<(String, bool)> {
    match v {
        Value::String(s) => Some((s.clone(), false)),
        Value::Object(o) => {
            let content = o.get("content")?.as_str()?.to_string();
            let normalized = o.get("normalized").and_then(Value::as_bool).unwrap_or(false);
            Some((content, normalized))
        }
        _ => None,
    }
}

/// What tokenizer_config.json and special_tokens_map.json say (the first wins per key).
struct TokenizerSettings {
    roles: HashMap<&'static str, (String, bool)>,
    extra_special: Vec<(String, bool)>,
    added_tokens_decoder: Option<Vec<AddedToken>>,
    model_max_length: Option<usize>,
}

const ROLES: [&str; 7] = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

impl TokenizerSettings {
    fn read(dir: &Path) -> Result<Self> {
        let mut s = TokenizerSettings { roles: HashMap::new(), extra_special: vec![], added_tokens_decoder: None, model_max_length: None };
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json = read_json(&path)?;
            let obj = json.as_object().ok_or_else(|| anyhow!("{}: expected a JSON object", path.display()))?;
            for role in ROLES {
                if s.roles.contains_key(role) {
                    continue;
                }
                match obj.get(role) {
                    None | Some(Value::Null) => {}
                    Some(v) => {
                        let entry = token_entry(v).ok_or_else(|| anyhow!("{}: key {role:?}: not a token: {v}", path.display()))?;
                        s.roles.insert(role, entry);
                    }
                }
            }
            if s.extra_special.is_empty() {
                if let Some(list) = obj.get("additional_special_tokens").and_then(Value::as_array) {
                    s.extra_special = list.iter().filter_map(token_entry).collect();
                }
            }
            if s.model_max_length.is_none() {
                if let Some(v) = obj.get("model_max_length") {
                    // transformers writes 1e30 for "no limit"; anything that large is no limit.
                    let n = v.as_f64().ok_or_else(|| anyhow!("{}: key \"model_max_length\": not a number: {v}", path.display()))?;
                    if n < 2.0 {
                        bail!("{}: key \"model_max_length\": {v} leaves no room for BOS and EOS", path.display());
                    }
                    s.model_max_length = (n < 1e9).then_some(n as usize);
                }
            }
            if s.added_tokens_decoder.is_none() {
                if let Some(map) = obj.get("added_tokens_decoder").and_then(Value::as_object) {
                    let mut list = vec![];
                    for (id, entry) in map {
                        let id: i64 = id.parse().map_err(|_| anyhow!("{}: added_tokens_decoder: bad id {id:?}", path.display()))?;
                        let content = entry
                            .get("content")
                            .and_then(Value::as_str)
                            .ok_or_else(|| anyhow!("{}: added_tokens_decoder.{id}: no \"content\"", path.display()))?;
                        let special = entry.get("special").and_then(Value::as_bool).unwrap_or(false);
                        let normalized = entry.get("normalized").and_then(Value::as_bool).unwrap_or(!special);
                        list.push(AddedToken { content: content.to_string(), id, normalized, special });
                    }
                    list.sort_by_key(|t| t.id);
                    s.added_tokens_decoder = Some(list);
                }
            }
        }
        Ok(s)
    }

    fn role(&self, role: &str, default: &str) -> String {
        self.roles.get(role).map(|(c, _)| c.clone()).unwrap_or_else(|| default.to_string())
    }

    fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            bos: self.role("bos_token", DEFAULT_BOS),
            eos: self.role("eos_token", DEFAULT_EOS),
            pad: self.role("pad_token", DEFAULT_EOS),
            unk: self.role("unk_token", DEFAULT_EOS),
        }
    }

    /// The special tokens as added tokens, in transformers' order; a later role that names the
    /// same content decides its `normalized` flag (SD-1.x's plain-string `pad_token` makes
    /// `<|endoftext|>` match only in the raw text).
    fn special_added(&self) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = vec![];
        // CLIPTokenizer's constructor defaults are plain strings: not normalized.
        let defaults = [("bos_token", DEFAULT_BOS), ("eos_token", DEFAULT_EOS), ("unk_token", DEFAULT_EOS), ("pad_token", DEFAULT_EOS)];
        let mut entries: Vec<(String, bool)> = vec![];
        for role in ROLES {
            match self.roles.get(role) {
                Some(e) => entries.push(e.clone()),
                None => {
                    if let Some((_, d)) = defaults.iter().find(|(r, _)| *r == role) {
                        entries.push((d.to_string(), false));
                    }
                }
            }
        }
        entries.extend(self.extra_special.iter().cloned());
        for (content, normalized) in entries {
            match out.iter_mut().find(|(c, _)| *c == content) {
                Some(e) => e.1 = normalized,
                None => out.push((content, normalized)),
            }
        }
        out
    }
}

/// OpenAI's CLIP BPE merges (MIT; `assets/clip/LICENSE`), for single-file checkpoints, which
/// carry no tokenizer.
const CLIP_MERGES_GZ: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");

/// BPE merges, in rank order.
type Merges = Vec<(String, String)>;

/// CLIP's vocabulary and merges as its `SimpleTokenizer` builds them from the merges file: the
/// 256 byte characters (printable ones first, as GPT-2's map lists them), the same with `</w>`,
/// one token per merge (48,894), then BOS and EOS: 49,408 tokens.
fn embedded_vocab() -> Result<(Vec<String>, Merges)> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(CLIP_MERGES_GZ).read_to_string(&mut text).context("decompressing the embedded CLIP merges")?;
    let lines: Vec<&str> = text.split('\n').collect();
    let merges: Merges = lines[1..49152 - 256 - 2 + 1]
        .iter()
        .map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| anyhow!("embedded CLIP merges: bad line {l:?}")))
        .collect::<Result<_>>()?;
    let table = bytes_to_unicode();
    let printable = |b: usize| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let chars: Vec<String> =
        (0..256).filter(|&b| printable(b)).chain((0..256).filter(|&b| !printable(b))).map(|b| table[b].to_string()).collect();
    let mut vocab = chars.clone();
    vocab.extend(chars.iter().map(|c| format!("{c}{END_OF_WORD}")));
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push(DEFAULT_BOS.to_string());
    vocab.push(DEFAULT_EOS.to_string());
    Ok((vocab, merges))
}

fn added_token_json(content: &str) -> Value {
    serde_json::json!({"__type": "AddedToken", "content": content, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false})
}

impl ClipTokenizer {
    /// The tokenizer of the published SD pipelines from the embedded CLIP vocabulary: pad
    /// `<|endoftext|>` for SD-1.x, `!` for SD-2.x; 77 tokens.
    pub fn embedded(pad_token: &str) -> Result<Self> {
        let (list, merges) = embedded_vocab()?;
        let vocab: HashMap<String, i64> = list.into_iter().enumerate().map(|(i, t)| (t, i as i64)).collect();
        let mut roles = HashMap::new();
        roles.insert("bos_token", (DEFAULT_BOS.to_string(), true));
        roles.insert("eos_token", (DEFAULT_EOS.to_string(), true));
        roles.insert("unk_token", (DEFAULT_EOS.to_string(), true));
        roles.insert("pad_token", (pad_token.to_string(), false));
        let settings =
            TokenizerSettings { roles, extra_special: vec![], added_tokens_decoder: None, model_max_length: Some(DEFAULT_MAX_LENGTH) };
        let added = Self::specials_as_added(&vocab, &settings);
        Self::new(vocab, &merges, added, &settings, "the embedded CLIP vocabulary".into())
    }

    /// The files of a transformers `CLIPTokenizer` folder holding the embedded vocabulary (what
    /// the published SD-1.x/SD-2.x `tokenizer/` folders hold), as (file name, content).
    pub fn embedded_files(pad_token: &str) -> Result<Vec<(&'static str, String)>> {
        let (list, merges) = embedded_vocab()?;
        let vocab: serde_json::Map<String, Value> = list.into_iter().enumerate().map(|(i, t)| (t, serde_json::json!(i))).collect();
        let merges_txt = format!("#version: 0.2\n{}\n", merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>().join("\n"));
        let config = serde_json::json!({
            "add_prefix_space": false, "bos_token": added_token_json(DEFAULT_BOS), "do_lower_case": true,
            "eos_token": added_token_json(DEFAULT_EOS), "errors": "replace", "model_max_length": DEFAULT_MAX_LENGTH,
            "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer", "unk_token": added_token_json(DEFAULT_EOS),
        });
        let plain = |content: &str| {
            let mut v = added_token_json(content);
            v.as_object_mut().map(|o| o.remove("__type"));
            v
        };
        let special = serde_json::json!({
            "bos_token": plain(DEFAULT_BOS), "eos_token": plain(DEFAULT_EOS), "unk_token": plain(DEFAULT_EOS), "pad_token": pad_token,
        });
        Ok(vec![
            ("vocab.json", serde_json::to_string(&Value::Object(vocab))?),
            ("merges.txt", merges_txt),
            ("tokenizer_config.json", serde_json::to_string_pretty(&config)?),
            ("special_tokens_map.json", serde_json::to_string_pretty(&special)?),
        ])
    }
}

impl ClipTokenizer {
    /// A `tokenizer/` folder: `tokenizer.json` if present, else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if dir.join("tokenizer.json").is_file() {
            Self::from_tokenizer_json(dir)
        } else {
            Self::from_vocab_merges(dir)
        }
    }

    /// `vocab.json` + `merges.txt` (+ `tokenizer_config.json` / `special_tokens_map.json`).
    pub fn from_vocab_merges(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let vocab = parse_vocab(&read_json(&vocab_path)?).with_context(|| format!("{}", vocab_path.display()))?;
        let text = std::fs::read_to_string(&merges_path).with_context(|| format!("reading {}", merges_path.display()))?;
        let mut merges = vec![];
        for (i, line) in text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => merges.push((a.to_string(), b.to_string())),
                _ => bail!("{} line {}: expected two tokens separated by a space, got {line:?}", merges_path.display(), i + 1),
            }
        }
        let settings = TokenizerSettings::read(dir)?;
        let added = match &settings.added_tokens_decoder {
            Some(list) => list.clone(),
            None => Self::specials_as_added(&vocab, &settings),
        };
        let source = format!("{} + {}", vocab_path.display(), merges_path.display());
        Self::new(vocab, &merges, added, &settings, source).with_context(|| format!("tokenizer {}", dir.display()))
    }

    /// `tokenizer.json` (its BPE model and added tokens), with the special-token roles and
    /// `model_max_length` of `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_tokenizer_json(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = read_json(&path)?;
        let ctx = || format!("{}", path.display());
        let model = json.get("model").ok_or_else(|| anyhow!("no \"model\"")).with_context(ctx)?;
        let kind = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
        if kind != "BPE" {
            bail!("{}: key \"model.type\": {kind:?} is not a CLIP tokenizer (BPE)", path.display());
        }
        let suffix = model.get("end_of_word_suffix").and_then(Value::as_str).unwrap_or("");
        if suffix != END_OF_WORD {
            bail!("{}: key \"model.end_of_word_suffix\": {suffix:?} is not CLIP's \"</w>\"", path.display());
        }
        let vocab = parse_vocab(model.get("vocab").unwrap_or(&Value::Null)).with_context(ctx)?;
        let list = model
            .get("merges")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("{}: key \"model.merges\": expected a list", path.display()))?;
        let mut merges = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(v) if v.len() == 2 => match (v[0].as_str(), v[1].as_str()) {
                    (Some(a), Some(b)) => Some((a.to_string(), b.to_string())),
                    _ => None,
                },
                _ => None,
            };
            merges.push(pair.ok_or_else(|| anyhow!("{}: model.merges[{i}]: not a pair: {m}", path.display()))?);
        }
        let settings = TokenizerSettings::read(dir)?;
        let mut added = vec![];
        for t in json.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
            let content = t.get("content").and_then(Value::as_str).ok_or_else(|| anyhow!("{}: added token without content", path.display()))?;
            let id = t.get("id").and_then(Value::as_i64).ok_or_else(|| anyhow!("{}: added token {content:?} without id", path.display()))?;
            let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
            let normalized = t.get("normalized").and_then(Value::as_bool).unwrap_or(!special);
            added.push(AddedToken { content: content.to_string(), id, normalized, special });
        }
        // transformers registers the configured special tokens too, when tokenizer.json lacks them.
        for (content, normalized) in settings.special_added() {
            if !added.iter().any(|t| t.content == content) {
                let id = vocab.get(&content).copied().unwrap_or_else(|| next_id(&vocab, &added));
                added.push(AddedToken { content, id, normalized, special: true });
            }
        }
        Self::new(vocab, &merges, added, &settings, path.display().to_string()).with_context(|| format!("tokenizer {}", dir.display()))
    }

    fn specials_as_added(vocab: &HashMap<String, i64>, settings: &TokenizerSettings) -> Vec<AddedToken> {
        let mut added: Vec<AddedToken> = vec![];
        for (content, normalized) in settings.special_added() {
            let id = vocab.get(&content).copied().unwrap_or_else(|| next_id(vocab, &added));
            added.push(AddedToken { content, id, normalized, special: true });
        }
        added
    }

    fn new(
        mut vocab: HashMap<String, i64>,
        merge_list: &[(String, String)],
        added: Vec<AddedToken>,
        settings: &TokenizerSettings,
        source: String,
    ) -> Result<Self> {
        for t in &added {
            vocab.entry(t.content.clone()).or_insert(t.id);
        }
        let mut id_to_token: HashMap<i64, String> = vocab.iter().map(|(k, &v)| (v, k.clone())).collect();
        for t in &added {
            id_to_token.insert(t.id, t.content.clone());
        }
        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, (a, b)) in merge_list.iter().enumerate() {
            let id = |s: &str| vocab.get(s).copied().ok_or_else(|| anyhow!("merge {} ({a} {b}): {s:?} is not in the vocabulary", rank + 1));
            let merged = format!("{a}{b}");
            merges.entry((id(a)?, id(b)?)).or_insert((rank, id(&merged)?));
        }
        let special = settings.special_tokens();
        let lookup = |role: &str, content: &str| -> Result<i64> {
            added
                .iter()
                .find(|t| t.content == content)
                .map(|t| t.id)
                .or_else(|| vocab.get(content).copied())
                .ok_or_else(|| anyhow!("{role} {content:?} is not in the vocabulary"))
        };
        let bos_id = lookup("bos_token", &special.bos)?;
        let eos_id = lookup("eos_token", &special.eos)?;
        let pad_id = lookup("pad_token", &special.pad)?;
        let unk_id = lookup("unk_token", &special.unk).ok();
        let byte_to_char = bytes_to_unicode();
        let char_to_byte = byte_to_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let whitespace_re = Regex::new(r"\s+").expect("valid regex");
        let mut raw_added = vec![];
        let mut normalized_added = vec![];
        for t in &added {
            if t.normalized {
                let content = normalize(&t.content, &whitespace_re);
                if !content.is_empty() {
                    normalized_added.push(AddedToken { content, ..t.clone() });
                }
            } else if !t.content.is_empty() {
                raw_added.push(t.clone());
            }
        }
        raw_added.sort_by_key(|t| std::cmp::Reverse(t.content.len()));
        normalized_added.sort_by_key(|t| std::cmp::Reverse(t.content.len()));
        Ok(ClipTokenizer {
            vocab,
            id_to_token,
            merges,
            special_ids: added.iter().filter(|t| t.special).map(|t| t.id).collect(),
            raw_added,
            normalized_added,
            special,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            model_max_length: settings.model_max_length.unwrap_or(DEFAULT_MAX_LENGTH),
            byte_to_char,
            char_to_byte,
            clip_re: Regex::new(CLIP_PATTERN).expect("valid regex"),
            byte_level_re: Regex::new(BYTE_LEVEL_PATTERN).expect("valid regex"),
            whitespace_re,
            source,
        })
    }

    /// Number of distinct token ids (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.id_to_token.len()
    }

    pub fn num_merges(&self) -> usize {
        self.merges.len()
    }

    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.vocab.get(token).copied()
    }

    pub fn id_to_token(&self, id: i64) -> Option<&str> {
        self.id_to_token.get(&id).map(String::as_str)
    }

    /// The token ids of `text` without BOS/EOS, truncation or padding.
    pub fn tokenize_ids(&self, text: &str) -> Vec<i64> {
        let mut ids = vec![];
        for raw in split_added(text, &self.raw_added) {
            match raw {
                Piece::Token(id) => ids.push(id),
                Piece::Text(t) => {
                    let normalized = normalize(t, &self.whitespace_re);
                    for piece in split_added(&normalized, &self.normalized_added) {
                        match piece {
                            Piece::Token(id) => ids.push(id),
                            Piece::Text(t) => self.encode_text(t, &mut ids),
                        }
                    }
                }
            }
        }
        ids
    }

    /// The BPE ids of one pre-tokenized word (its UTF-8 bytes mapped to characters, `</w>` on
    /// the last): the step open_clip's `SimpleTokenizer`, which splits words with its own
    /// pattern, shares with this tokenizer (src/eval/clip_score.rs).
    pub fn bpe_word(&self, word: &str) -> Vec<i64> {
        let chars: String = word.bytes().map(|b| self.byte_to_char[b as usize]).collect();
        let mut ids = vec![];
        self.bpe(&chars, &mut ids);
        ids
    }

    /// Pre-tokenizes normalized text into words and BPE-encodes each.
    fn encode_text(&self, text: &str, ids: &mut Vec<i64>) {
        for clip_word in self.clip_re.find_iter(text) {
            for word in self.byte_level_re.find_iter(clip_word.as_str()) {
                let chars: String = word.as_str().bytes().map(|b| self.byte_to_char[b as usize]).collect();
                self.bpe(&chars, ids);
            }
        }
    }

    /// BPE of one byte-level word: repeatedly merge the adjacent pair of lowest rank (leftmost on
    /// ties), as tokenizers' priority queue does.
    fn bpe(&self, word: &str, ids: &mut Vec<i64>) {
        let n = word.chars().count();
        let mut symbols: Vec<i64> = Vec::with_capacity(n);
        let mut buf = String::new();
        for (i, c) in word.chars().enumerate() {
            buf.clear();
            buf.push(c);
            if i + 1 == n {
                buf.push_str(END_OF_WORD);
            }
            match self.vocab.get(&buf) {
                Some(&id) => symbols.push(id),
                // tokenizers (fuse_unk false): one unknown token per unknown character
                None => symbols.extend(self.unk_id),
            }
        }
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(pos, w)| self.merges.get(&(w[0], w[1])).map(|&(rank, id)| (rank, pos, id)))
                .min();
            let Some((_, pos, id)) = best else { break };
            symbols[pos] = id;
            symbols.remove(pos + 1);
        }
        ids.extend(symbols);
    }

    /// BOS + tokens + EOS, untruncated (what `tokenizer(text).input_ids` gives).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut ids = vec![self.bos_id];
        ids.extend(self.tokenize_ids(text));
        ids.push(self.eos_id);
        ids
    }

    /// What diffusers feeds the text encoder: `tokenizer(text, padding="max_length",
    /// max_length=model_max_length, truncation=True)`: tokens cut to fit BOS and EOS, then padded
    /// with the pad token, `model_max_length` ids in all.
    pub fn encode_padded(&self, text: &str) -> Vec<i64> {
        let max = self.model_max_length;
        let mut tokens = self.tokenize_ids(text);
        tokens.truncate(max - 2);
        let mut ids = Vec::with_capacity(max);
        ids.push(self.bos_id);
        ids.extend(tokens);
        ids.push(self.eos_id);
        ids.resize(max, self.pad_id);
        ids
    }

    /// The end of `text` that `encode_padded` cuts off, decoded as diffusers shows it in its
    /// "The following part of your input was truncated" warning; None when the text fits.
    pub fn truncated_part(&self, text: &str) -> Option<String> {
        let tokens = self.tokenize_ids(text);
        let keep = self.model_max_length - 2;
        (tokens.len() > keep).then(|| self.decode(&tokens[keep..], true))
    }

    /// `encode_padded` of each text as one (batch, model_max_length) int64 tensor.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], device: Device) -> Tensor {
        let ids: Vec<i64> = texts.iter().flat_map(|t| self.encode_padded(t.as_ref())).collect();
        Tensor::from_slice(&ids).view([texts.len() as i64, self.model_max_length as i64]).to_device(device)
    }

    /// The text of `ids` (transformers' `decode`): `</w>` becomes a space and the ends are
    /// trimmed; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[i64], skip_special: bool) -> String {
        let mut bytes = vec![];
        for id in ids {
            if skip_special && self.special_ids.contains(id) {
                continue;
            }
            let Some(token) = self.id_to_token.get(id) else { continue };
            let mapped: Option<Vec<u8>> = token.chars().map(|c| self.char_to_byte.get(&c).copied()).collect();
            bytes.extend(mapped.unwrap_or_else(|| token.as_bytes().to_vec()));
        }
        String::from_utf8_lossy(&bytes).replace(END_OF_WORD, " ").trim().to_string()
    }
}

fn next_id(vocab: &HashMap<String, i64>, added: &[AddedToken]) -> i64 {
    vocab.values().chain(added.iter().map(|t| &t.id)).max().map_or(0, |m| m + 1)
}

fn parse_vocab(v: &Value) -> Result<HashMap<String, i64>> {
    let obj = v.as_object().ok_or_else(|| anyhow!("the vocabulary is not a JSON object of token -> id"))?;
    obj.iter()
        .map(|(k, v)| v.as_i64().map(|id| (k.clone(), id)).ok_or_else(|| anyhow!("token {k:?}: id {v} is not an integer")))
        .collect()
}

/// CLIPTokenizer's normalizer: NFC, whitespace runs to one space, lower case character by
/// character (tokenizers' `Lowercase`, so no final-sigma rule).
fn normalize(text: &str, whitespace: &Regex) -> String {
    let nfc: String = text.nfc().collect();
    let spaced = whitespace.replace_all(&nfc, " ");
    spaced.chars().flat_map(char::to_lowercase).collect()
}

enum Piece<'a> {
    Text(&'a str),
    Token(i64),
}

/// Splits out added tokens, leftmost first and longest at each position (tokenizers'
/// leftmost-longest matching). `tokens` is sorted longest first.
fn split_added<'a>(text: &'a str, tokens: &[AddedToken]) -> Vec<Piece<'a>> {
    if tokens.is_empty() {
        return vec![Piece::Text(text)];
    }
    let mut out = vec![];
    let mut start = 0;
    let mut i = 0;
    while i < text.len() {
        if let Some(t) = tokens.iter().find(|t| text[i..].starts_with(t.content.as_str())) {
            if start < i {
                out.push(Piece::Text(&text[start..i]));
            }
            out.push(Piece::Token(t.id));
            i += t.content.len();
            start = i;
        } else {
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    if start < text.len() {
        out.push(Piece::Text(&text[start..]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny CLIP-style vocabulary: the 256 byte characters, the same with `</w>`, a few merges.
    fn tiny(dir: &Path, pad: &str) -> ClipTokenizer {
        let table = bytes_to_unicode();
        let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        vocab.extend(table.iter().map(|c| format!("{c}</w>")));
        let merges = [("c", "a"), ("ca", "t</w>"), ("h", "i</w>"), ("a", "a"), ("aa", "a</w>")];
        for (a, b) in merges {
            vocab.push(format!("{a}{b}"));
        }
        vocab.push(DEFAULT_BOS.into());
        vocab.push(DEFAULT_EOS.into());
        let map: serde_json::Map<String, Value> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), Value::from(i))).collect();
        std::fs::write(dir.join("vocab.json"), Value::Object(map).to_string()).unwrap();
        let text: String = merges.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
        std::fs::write(dir.join("merges.txt"), format!("#version: 0.2\n{text}")).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), serde_json::json!({"pad_token": pad, "model_max_length": 8}).to_string()).unwrap();
        ClipTokenizer::from_dir(dir).unwrap()
    }

    #[test]
    fn bpe_special_tokens_truncation_padding() {
        let dir = tempfile::tempdir().unwrap();
        let t = tiny(dir.path(), "<|endoftext|>");
        let cat = t.token_to_id("cat</w>").unwrap();
        let hi = t.token_to_id("hi</w>").unwrap();
        let (bos, eos) = (t.bos_id(), t.eos_id());
        assert_eq!(t.encode("CAT  hi"), vec![bos, cat, hi, eos]);
        // a a a -> "aa" + "a</w>" merges to "aaa</w>"
        assert_eq!(t.encode("aaa"), vec![bos, t.token_to_id("aaa</w>").unwrap(), eos]);
        assert_eq!(t.encode("hi<|endoftext|>hi"), vec![bos, hi, eos, hi, eos]);
        assert_eq!(t.encode_padded("cat"), vec![bos, cat, eos, eos, eos, eos, eos, eos]);
        assert_eq!(t.encode_padded("cat cat cat cat cat cat cat").len(), 8);
        assert_eq!(t.encode_padded("cat cat cat cat cat cat cat")[7], eos);
        assert_eq!(t.decode(&t.encode("cat hi!"), true), "cat hi !");
    }

    #[test]
    fn exclamation_pad_splits_out() {
        let dir = tempfile::tempdir().unwrap();
        let t = tiny(dir.path(), "!");
        let bang = t.token_to_id("!").unwrap();
        let hi = t.token_to_id("hi</w>").unwrap();
        assert_eq!(t.pad_id(), bang);
        assert_eq!(t.encode("hi!"), vec![t.bos_id(), hi, bang, t.eos_id()]);
        assert_eq!(t.encode_padded("hi")[4..], [bang; 4]);
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", ClipTokenizer::from_dir(dir.path()).unwrap_err());
        assert!(e.contains("vocab.json"), "{e}");
    }
}
