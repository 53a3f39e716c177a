//! The demo's CLIP tokenizer: a real byte-level BPE tokenizer folder (SD-1.x layout: vocab.json,
//! merges.txt, tokenizer_config.json, special_tokens_map.json) whose vocabulary is CLIP's 512
//! byte characters plus whole-word tokens for every word the synthetic captions use, so each
//! caption word is one token. Any other text still tokenizes (into bytes), as with CLIP.
//!
//! The word list is read off `Scene::caption` itself (every combination of attributes), so it
//! cannot drift from the dataset. The merges are learnt the way BPE is trained (repeatedly merge
//! the most frequent adjacent pair), which guarantees that applying them by rank, as CLIP's
//! tokenizer does, rebuilds every word.
use crate::data::synthetic::{Scene, Size, BACKGROUNDS, SHAPE_COLOURS};
use crate::data::synthetic::{Position, Shape};
use anyhow::{Context, Result};
use regex::Regex;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// CLIP's sequence length (SD-1.x's `model_max_length`).
pub const MAX_LENGTH: usize = 77;

/// Every caption `Scene::caption` can produce (all attribute combinations, no shift).
pub fn all_captions() -> Vec<String> {
    let mut out = vec![];
    for count in 1..=3 {
        for size in [Size::Small, Size::Large] {
            for colour in SHAPE_COLOURS {
                for shape in Shape::ALL {
                    for background in BACKGROUNDS {
                        for position in Position::ALL {
                            let s = Scene { count, size, colour, shape, background, position, shift: (0.0, 0.0) };
                            out.push(s.caption());
                        }
                    }
                }
            }
        }
    }
    out
}

/// The words of the synthetic captions as CLIP's pre-tokenizer splits them (letter runs and
/// punctuation runs), sorted.
pub fn caption_words() -> Vec<String> {
    let re = Regex::new(r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+").expect("valid regex");
    let words: BTreeSet<String> =
        all_captions().iter().flat_map(|c| re.find_iter(&c.to_lowercase()).map(|m| m.as_str().to_string()).collect::<Vec<_>>()).collect();
    words.into_iter().collect()
}

/// GPT-2's reversible map from bytes to printable unicode characters (CLIP's base alphabet).
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                n += 1;
                char::from_u32(255 + n).expect("U+0100..")
            }
        })
        .collect()
}

/// A word as BPE starts it: one symbol per byte-level character, `</w>` on the last.
fn symbols(word: &str, table: &[char]) -> Vec<String> {
    let chars: Vec<char> = word.bytes().map(|b| table[b as usize]).collect();
    let n = chars.len();
    chars.iter().enumerate().map(|(i, c)| if i + 1 == n { format!("{c}{END_OF_WORD}") } else { c.to_string() }).collect()
}

/// BPE training on `words` (each counted once) until every word is one symbol: the most frequent
/// adjacent pair is merged first, ties broken by the pair's text, so the result is deterministic.
pub fn learn_merges(words: &[String]) -> Vec<(String, String)> {
    let table = bytes_to_unicode();
    let mut seqs: Vec<Vec<String>> = words.iter().map(|w| symbols(w, &table)).collect();
    let mut merges = vec![];
    loop {
        let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for s in &seqs {
            for w in s.windows(2) {
                *counts.entry((w[0].as_str(), w[1].as_str())).or_default() += 1;
            }
        }
        // The first maximum in the map's (text) order.
        let Some(((a, b), _)) = counts.iter().fold(None, |best: Option<(&(&str, &str), usize)>, (k, &v)| match best {
            Some((_, bv)) if bv >= v => best,
            _ => Some((k, v)),
        }) else {
            break;
        };
        let pair = (a.to_string(), b.to_string());
        let merged = format!("{a}{b}");
        for s in &mut seqs {
            let mut out = Vec::with_capacity(s.len());
            let mut i = 0;
            while i < s.len() {
                if i + 1 < s.len() && s[i] == pair.0 && s[i + 1] == pair.1 {
                    out.push(merged.clone());
                    i += 2;
                } else {
                    out.push(s[i].clone());
                    i += 1;
                }
            }
            *s = out;
        }
        merges.push(pair);
    }
    merges
}

/// The vocabulary in CLIP's order: the 256 byte characters, the same with `</w>`, one token per
/// merge (a result two merges share is listed once), then `<|startoftext|>` and `<|endoftext|>`.
pub fn build_vocab(merges: &[(String, String)]) -> Vec<String> {
    let table = bytes_to_unicode();
    let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    vocab.extend(table.iter().map(|c| format!("{c}{END_OF_WORD}")));
    let mut seen: BTreeSet<String> = vocab.iter().cloned().collect();
    for (a, b) in merges {
        let t = format!("{a}{b}");
        if seen.insert(t.clone()) {
            vocab.push(t);
        }
    }
    vocab.push(BOS.into());
    vocab.push(EOS.into());
    vocab
}

/// What `write_demo_tokenizer` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoVocab {
    pub vocab_size: usize,
    pub num_merges: usize,
    pub bos_id: i64,
    pub eos_id: i64,
    /// The whole-word tokens (caption words of two or more characters).
    pub words: Vec<String>,
}

fn added(content: &str) -> Value {
    json!({"__type": "AddedToken", "content": content, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false})
}

/// Writes the demo tokenizer folder into `dir` (created), as the published SD-1.x tokenizer
/// folders are laid out (pad token `<|endoftext|>`, 77 tokens).
pub fn write_demo_tokenizer(dir: &Path) -> Result<DemoVocab> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let words = caption_words();
    let merges = learn_merges(&words);
    let vocab = build_vocab(&merges);
    let map: Map<String, Value> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), Value::from(i))).collect();
    let write = |name: &str, text: String| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("vocab.json", Value::Object(map).to_string())?;
    let lines: String = merges.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
    write("merges.txt", format!("#version: 0.2\n{lines}"))?;
    let config = json!({
        "add_prefix_space": false,
        "bos_token": added(BOS),
        "clean_up_tokenization_spaces": true,
        "do_lower_case": true,
        "eos_token": added(EOS),
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added(EOS),
    });
    write("tokenizer_config.json", serde_json::to_string_pretty(&config)?)?;
    let strip = |v: &Value| {
        let mut o = v.as_object().cloned().unwrap_or_default();
        o.remove("__type");
        Value::Object(o)
    };
    let special = json!({
        "bos_token": strip(&config["bos_token"]),
        "eos_token": strip(&config["eos_token"]),
        "pad_token": EOS,
        "unk_token": strip(&config["unk_token"]),
    });
    write("special_tokens_map.json", serde_json::to_string_pretty(&special)?)?;
    let n = vocab.len() as i64;
    Ok(DemoVocab {
        vocab_size: vocab.len(),
        num_merges: merges.len(),
        bos_id: n - 2,
        eos_id: n - 1,
        words: words.into_iter().filter(|w| w.chars().count() > 1).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ClipTokenizer;

    #[test]
    fn words_come_from_the_captions() {
        let words = caption_words();
        for w in ["one", "three", "small", "large", "purple", "circles", "diamond", "on", "a", "background", "gray", "bottom", "right", ","] {
            assert!(words.contains(&w.to_string()), "{w:?} missing from {words:?}");
        }
        assert_eq!(all_captions().len(), 3 * 2 * 6 * 4 * 4 * 4);
    }

    #[test]
    fn every_caption_word_is_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let v = write_demo_tokenizer(dir.path()).unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.vocab_size(), v.vocab_size);
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (v.bos_id, v.eos_id, v.eos_id));
        for w in &v.words {
            assert!(tok.token_to_id(&format!("{w}</w>")).is_some(), "no token for {w:?}");
        }
        for caption in all_captions() {
            let ids = tok.encode(&caption);
            // words, plus the comma CLIP splits off "background,"
            let pieces = caption.split(' ').count() + 1;
            assert_eq!(ids.len(), pieces + 2, "{caption:?} -> {ids:?}");
            assert_eq!(tok.decode(&ids, true), caption.replace(',', " ,"));
        }
        // text outside the vocabulary still encodes, byte by byte
        assert_eq!(tok.encode("zq").len(), 4);
    }

    #[test]
    fn merges_are_deterministic() {
        let w = caption_words();
        assert_eq!(learn_merges(&w), learn_merges(&w));
    }
}
