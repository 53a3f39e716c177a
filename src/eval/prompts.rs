//! The captions an evaluation generates from: a `metadata.csv` or `.jsonl` (diffusers' and
//! Hugging Face `datasets`' image-folder layout: `file_name` and `text` or `caption`), or MS-COCO's
//! `captions_val2014.json` (the first caption of each image, ordered by image id, as BK-SDM's
//! 30K-prompt set is made). `select` takes the first N, or a seeded sample of N exactly as numpy's
//! `np.random.RandomState(seed).choice(n, N, replace=False)` picks it (its `permutation(n)[:N]`),
//! so a larger N keeps the images of a smaller one.
use super::inception_score::numpy_permutation;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// One caption, with the image it came from when the file names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caption {
    pub file_name: Option<String>,
    pub text: String,
}

/// The caption columns or keys accepted, in order of preference.
const TEXT_KEYS: [&str; 2] = ["text", "caption"];

/// Reads `path` by its form: `.csv`, `.jsonl`, or a COCO captions `.json`.
pub fn read(path: &Path) -> Result<Vec<Caption>> {
    let body = std::fs::read_to_string(path).with_context(|| format!("reading the prompts file {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let captions = match ext.as_str() {
        "csv" => from_csv(&body, path),
        "jsonl" => from_jsonl(&body),
        "json" => from_coco(&body),
        _ => bail!("prompts file {}: expected a .csv (metadata.csv), .jsonl or COCO captions .json", path.display()),
    }
    .with_context(|| format!("prompts file {}", path.display()))?;
    if captions.is_empty() {
        bail!("prompts file {} holds no captions", path.display());
    }
    Ok(captions)
}

/// The first `count` captions, or (with `sample_seed`) numpy's seeded sample of `count`.
pub fn select(captions: Vec<Caption>, count: Option<usize>, sample_seed: Option<u32>) -> Result<Vec<Caption>> {
    let n = count.unwrap_or(captions.len());
    if n == 0 || n > captions.len() {
        bail!("--count {n}: the prompts file has {} captions (give 1 to {0})", captions.len());
    }
    Ok(match sample_seed {
        None => captions.into_iter().take(n).collect(),
        Some(seed) => numpy_permutation(captions.len(), seed)[..n].iter().map(|&i| captions[i as usize].clone()).collect(),
    })
}

fn from_csv(body: &str, path: &Path) -> Result<Vec<Caption>> {
    let records: Vec<Vec<String>> = crate::data::dataset::parse_csv(body, path)?.into_iter().map(|r| r.fields).collect();
    let Some((header, rows)) = records.split_first() else { bail!("empty CSV: expected a header with file_name and text (or caption)") };
    let Some(text) = TEXT_KEYS.iter().find_map(|k| header.iter().position(|h| h.trim() == *k)) else {
        bail!("no `text` or `caption` column in the header ({})", header.join(", "));
    };
    let file_name = header.iter().position(|h| h.trim() == "file_name");
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let Some(t) = r.get(text) else { bail!("row {} has {} fields, the header {}", i + 2, r.len(), header.len()) };
            Ok(Caption { file_name: file_name.and_then(|f| r.get(f).cloned()), text: t.clone() })
        })
        .collect()
}

fn from_jsonl(body: &str) -> Result<Vec<Caption>> {
    let mut out = vec![];
    for (i, line) in body.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {}: not JSON", i + 1))?;
        let Some(text) = TEXT_KEYS.iter().find_map(|k| v.get(k).and_then(Value::as_str)) else {
            bail!("line {}: no `text` or `caption` key with a string", i + 1);
        };
        let file_name = v.get("file_name").and_then(Value::as_str).map(String::from);
        out.push(Caption { file_name, text: text.to_string() });
    }
    Ok(out)
}

/// COCO's captions file: `annotations` [{image_id, caption}], `images` [{id, file_name}].
fn from_coco(body: &str) -> Result<Vec<Caption>> {
    let v: Value = serde_json::from_str(body).context("not JSON")?;
    let Some(annotations) = v.get("annotations").and_then(Value::as_array) else {
        bail!("no `annotations` list (expected MS-COCO's captions_val2014.json)");
    };
    let names: std::collections::HashMap<i64, &str> = v
        .get("images")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|im| Some((im.get("id")?.as_i64()?, im.get("file_name")?.as_str()?)))
        .collect();
    let mut first = std::collections::BTreeMap::new();
    for (i, a) in annotations.iter().enumerate() {
        let Some(id) = a.get("image_id").and_then(Value::as_i64) else { bail!("annotations[{i}]: no integer `image_id` key") };
        let Some(text) = a.get("caption").and_then(Value::as_str) else { bail!("annotations[{i}]: no `caption` key with a string") };
        first.entry(id).or_insert_with(|| text.to_string());
    }
    Ok(first.into_iter().map(|(id, text)| Caption { file_name: names.get(&id).map(|s| s.to_string()), text }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        (dir, p)
    }

    #[test]
    fn csv_with_quoting() {
        let (_d, p) = write("metadata.csv", "file_name,text\r\na.png,\"a cat, on a mat\"\nb.png,\"she said \"\"hi\"\"\nthen left\"\n\nc.png,plain\n");
        let c = read(&p).unwrap();
        let texts: Vec<&str> = c.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["a cat, on a mat", "she said \"hi\"\nthen left", "plain"]);
        assert_eq!(c[1].file_name.as_deref(), Some("b.png"));
        let (_d, p) = write("m.csv", "file_name,caption\nx.png,y\n");
        assert_eq!(read(&p).unwrap()[0].text, "y");
    }

    #[test]
    fn missing_column_or_key_names_file_and_key() {
        for (name, body) in [("metadata.csv", "file_name,prompt\na.png,x\n"), ("p.jsonl", "{\"file_name\":\"a\"}\n"),
            ("captions_val2014.json", "{\"annotations\":[{\"image_id\":1}]}"), ("c.json", "{\"images\":[]}")]
        {
            let (_d, p) = write(name, body);
            let e = format!("{:#}", read(&p).unwrap_err());
            assert!(e.contains(name), "{e}");
            assert!(e.contains("caption") || e.contains("annotations"), "{e}");
        }
        let (_d, p) = write("bad.csv", "file_name,text\na,\"open\n");
        assert!(format!("{:#}", read(&p).unwrap_err()).contains("unterminated quoted field"));
    }

    #[test]
    fn coco_first_caption_by_image_id_and_seeded_sample() {
        let body = r#"{"images":[{"id":9,"file_name":"COCO_val2014_9.jpg"},{"id":2,"file_name":"COCO_val2014_2.jpg"}],
            "annotations":[{"image_id":9,"caption":"nine a"},{"image_id":2,"caption":"two a"},{"image_id":9,"caption":"nine b"},{"image_id":5,"caption":"five"}]}"#;
        let (_d, p) = write("captions_val2014.json", body);
        let c = read(&p).unwrap();
        let texts: Vec<&str> = c.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["two a", "five", "nine a"]);
        assert_eq!(c[0].file_name.as_deref(), Some("COCO_val2014_2.jpg"));
        assert_eq!(select(c.clone(), Some(2), None).unwrap(), c[..2]);
        // np.random.RandomState(0).permutation(3) = [2, 1, 0]
        let s = select(c.clone(), Some(2), Some(0)).unwrap();
        assert_eq!(s, [c[2].clone(), c[1].clone()]);
        assert!(select(c, Some(4), None).unwrap_err().to_string().contains("--count 4"));
    }
}
