//! PNG files with text metadata: what `sdkd generate` writes (prompt, seed, scheduler, ... as
//! text chunks, so that an image carries how to make it again) and reads back in tests.
//!
//! Text that Latin-1 can spell goes in a tEXt chunk (what most viewers show); other text (a
//! prompt in another script) goes in an iTXt chunk, which is UTF-8.
use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) < 256)
}

/// Writes `image` as an 8-bit RGB PNG at `path` with one text chunk per `(keyword, text)`.
/// Keywords must be 1 to 79 Latin-1 characters (the PNG rule).
pub fn write_png(path: &Path, image: &RgbImage, text: &[(&str, String)]) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    encode(BufWriter::new(file), image, text).with_context(|| format!("writing {}", path.display()))
}

/// `write_png` into memory: the bytes of the PNG file.
pub fn png_bytes(image: &RgbImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode(&mut out, image, text)?;
    Ok(out)
}

fn encode<W: Write>(w: W, image: &RgbImage, text: &[(&str, String)]) -> Result<()> {
    let mut encoder = png::Encoder::new(w, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        if key.is_empty() || key.len() > 79 || !is_latin1(key) {
            bail!("PNG text keyword {key:?} must be 1 to 79 Latin-1 characters");
        }
        let added = if is_latin1(value) {
            encoder.add_text_chunk(key.to_string(), value.clone())
        } else {
            encoder.add_itxt_chunk(key.to_string(), value.clone())
        };
        added.with_context(|| format!("adding PNG text chunk {key:?}"))?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()?;
    Ok(())
}

/// The text chunks (tEXt, zTXt and iTXt) of the PNG at `path`, in file order.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("reading PNG {}", path.display()))?;
    // text chunks may also follow the image data
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    reader.next_frame(&mut buf).with_context(|| format!("decoding PNG {}", path.display()))?;
    reader.finish().with_context(|| format!("reading PNG {}", path.display()))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())).collect();
    for c in &info.compressed_latin1_text {
        out.push((
            c.keyword.clone(),
            c.get_text().with_context(|| format!("zTXt {:?} in {}", c.keyword, path.display()))?,
        ));
    }
    for c in &info.utf8_text {
        out.push((
            c.keyword.clone(),
            c.get_text().with_context(|| format!("iTXt {:?} in {}", c.keyword, path.display()))?,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_round_trip() {
        let dir = std::env::temp_dir().join(format!("sdkd-png-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.png");
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 80, y as u8 * 100, 7]));
        let text =
            [("prompt", "a café".to_string()), ("negative_prompt", "熊猫".to_string()), ("seed", "42".to_string())];
        write_png(&path, &img, &text).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, img);
        let mut got = read_png_text(&path).unwrap();
        got.sort();
        let mut want: Vec<(String, String)> = text.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        want.sort();
        assert_eq!(got, want);
        assert!(write_png(&path, &img, &[("", "x".into())]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
