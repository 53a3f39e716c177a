//! The built-in condensed dataset (`sdkd synth`): procedurally drawn scenes of 1-3 shapes with
//! captions that describe them ("two small red circles on a blue background, top left"), written
//! as PNGs plus `metadata.jsonl` in imagefolder layout, or the same PNGs and captions as
//! webdataset tar shards (img2dataset's layout) or a Hugging Face parquet dataset.
//!
//! It exists so the demo and the tests can train without downloads, so it must be learnable on
//! two CPU cores in minutes: a small closed vocabulary (6 colours, 4 shapes, 2 sizes, 4 positions,
//! counts 1-3, 4 backgrounds) in which the caption fixes almost every pixel; the only thing it
//! leaves open is a small shift of the group. Every scene is a pure function of (seed, index).
use super::order::{below, hash, Stream};
use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// A named colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Colour {
    pub name: &'static str,
    pub rgb: [u8; 3],
}

const fn c(name: &'static str, r: u8, g: u8, b: u8) -> Colour {
    Colour { name, rgb: [r, g, b] }
}

/// Colours a shape can have.
pub const SHAPE_COLOURS: [Colour; 6] = [
    c("red", 220, 40, 40),
    c("green", 40, 170, 60),
    c("blue", 40, 80, 220),
    c("yellow", 240, 210, 40),
    c("purple", 140, 60, 180),
    c("orange", 245, 140, 30),
];

/// Colours a background can have (never the shape's colour).
pub const BACKGROUNDS: [Colour; 4] = [c("white", 245, 245, 245), c("black", 20, 20, 20), c("gray", 128, 128, 128), c("blue", 40, 80, 220)];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Diamond];
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
        }
    }

    /// Whether (dx, dy) from the centre lies inside a shape of radius `r` (y points down). The
    /// shapes have about the area of the circle so size reads the same across shapes.
    fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs().max(dy.abs()) <= 0.886 * r,
            Shape::Triangle => {
                let big = 1.35 * r; // circumradius of an upward equilateral triangle
                dy <= 0.5 * big && 3f32.sqrt() * dx.abs() - dy <= big
            }
            Shape::Diamond => dx.abs() + dy.abs() <= 1.25 * r,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
}

impl Position {
    pub const ALL: [Position; 4] = [Position::TopLeft, Position::TopRight, Position::BottomLeft, Position::BottomRight];
    pub fn name(self) -> &'static str {
        match self {
            Position::TopLeft => "top left",
            Position::TopRight => "top right",
            Position::BottomLeft => "bottom left",
            Position::BottomRight => "bottom right",
        }
    }
}

const COUNT_WORDS: [&str; 3] = ["one", "two", "three"];

/// One scene: what the caption says, plus the small shift it does not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scene {
    /// 1..=3 shapes.
    pub count: usize,
    pub size: Size,
    pub colour: Colour,
    pub shape: Shape,
    pub background: Colour,
    pub position: Position,
    /// Shift of the group, as fractions of the image side (within ±0.03).
    pub shift: (f32, f32),
}

impl Scene {
    /// Scene `index` of the dataset drawn with `seed`.
    pub fn sample(seed: u64, index: usize) -> Scene {
        let h = |k: u64| hash(seed, Stream::Synth, index as u64, k);
        let pick = |k: u64, n: usize| below(h(k), n as u64) as usize;
        let colour = SHAPE_COLOURS[pick(2, SHAPE_COLOURS.len())];
        let mut bg = pick(4, BACKGROUNDS.len());
        if BACKGROUNDS[bg].name == colour.name {
            bg = (bg + 1) % BACKGROUNDS.len();
        }
        let unit = |k: u64| (below(h(k), 2001) as f32 / 1000.0 - 1.0) * 0.03;
        Scene {
            count: 1 + pick(0, 3),
            size: if pick(1, 2) == 0 { Size::Small } else { Size::Large },
            colour,
            shape: Shape::ALL[pick(3, 4)],
            background: BACKGROUNDS[bg],
            position: Position::ALL[pick(5, 4)],
            shift: (unit(6), unit(7)),
        }
    }

    /// "two small red circles on a blue background, top left".
    pub fn caption(&self) -> String {
        let plural = if self.count > 1 { "s" } else { "" };
        format!(
            "{} {} {} {}{plural} on a {} background, {}",
            COUNT_WORDS[self.count - 1],
            self.size.name(),
            self.colour.name,
            self.shape.name(),
            self.background.name,
            self.position.name()
        )
    }

    /// Reads a caption back into a scene (with no shift); None if it is not one of ours.
    pub fn parse(caption: &str) -> Option<Scene> {
        let (head, pos) = caption.rsplit_once(", ")?;
        let position = *Position::ALL.iter().find(|p| p.name() == pos)?;
        let w: Vec<&str> = head.split(' ').collect();
        let [count, size, colour, shape, "on", "a", bg, "background"] = w.as_slice() else { return None };
        let count = COUNT_WORDS.iter().position(|c| c == count)? + 1;
        let size = [Size::Small, Size::Large].into_iter().find(|s| s.name() == *size)?;
        let colour = *SHAPE_COLOURS.iter().find(|c| c.name == *colour)?;
        let singular = if count > 1 { shape.strip_suffix('s')? } else { shape };
        let shape = *Shape::ALL.iter().find(|s| s.name() == singular)?;
        let background = *BACKGROUNDS.iter().find(|c| c.name == *bg)?;
        Some(Scene { count, size, colour, shape, background, position, shift: (0.0, 0.0) })
    }

    /// Centres (as fractions of the side) and radius (fraction) of the shapes.
    fn layout(&self) -> (Vec<(f32, f32)>, f32) {
        let (qx, qy) = match self.position {
            Position::TopLeft => (0.25, 0.25),
            Position::TopRight => (0.75, 0.25),
            Position::BottomLeft => (0.25, 0.75),
            Position::BottomRight => (0.75, 0.75),
        };
        let (cx, cy) = (qx + self.shift.0, qy + self.shift.1);
        // Offsets within the quadrant (side 0.5), arranged so even large shapes do not touch.
        let offsets: &[(f32, f32)] = match self.count {
            1 => &[(0.0, 0.0)],
            2 => &[(-0.12, 0.0), (0.12, 0.0)],
            _ => &[(-0.12, 0.1), (0.12, 0.1), (0.0, -0.11)],
        };
        let r = match self.size {
            Size::Small => 0.05,
            Size::Large => 0.085,
        };
        (offsets.iter().map(|&(dx, dy)| (cx + dx, cy + dy)).collect(), r)
    }

    /// Draws the scene at `res`² pixels, antialiased by 4x4 supersampling.
    pub fn render(&self, res: u32) -> RgbImage {
        let (centres, r) = self.layout();
        let s = res as f32;
        let centres: Vec<(f32, f32)> = centres.iter().map(|&(x, y)| (x * s, y * s)).collect();
        let r = r * s;
        const SUB: u32 = 4;
        RgbImage::from_fn(res, res, |x, y| {
            let mut hits = 0u32;
            for sy in 0..SUB {
                for sx in 0..SUB {
                    let px = x as f32 + (sx as f32 + 0.5) / SUB as f32;
                    let py = y as f32 + (sy as f32 + 0.5) / SUB as f32;
                    hits += centres.iter().any(|&(cx, cy)| self.shape.contains(px - cx, py - cy, r)) as u32;
                }
            }
            let a = hits as f32 / (SUB * SUB) as f32;
            let mix = |i: usize| {
                (self.background.rgb[i] as f32 + (self.colour.rgb[i] as f32 - self.background.rgb[i] as f32) * a).round() as u8
            };
            Rgb([mix(0), mix(1), mix(2)])
        })
    }
}

/// One line of `metadata.jsonl`: the imagefolder columns, then the scene's attributes.
#[derive(Serialize)]
struct Row {
    file_name: String,
    text: String,
    count: usize,
    size: &'static str,
    colour: &'static str,
    shape: &'static str,
    background: &'static str,
    position: &'static str,
}

/// Writes `count` scenes drawn with `seed` at `resolution`² pixels into `out` as
/// `<index>.png` files and a `metadata.jsonl` (file_name, text, and the scene's attributes).
pub fn write_dataset(out: &Path, count: usize, seed: u64, resolution: u32) -> Result<()> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    if !(8..=4096).contains(&resolution) {
        bail!("--resolution {resolution} is outside 8..=4096");
    }
    if out.exists() {
        if !out.is_dir() {
            bail!("{} exists and is not a folder", out.display());
        }
        let non_empty = std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?.next().is_some();
        if non_empty && !out.join("metadata.jsonl").is_file() {
            bail!("{} is not empty and holds no earlier synthetic dataset: choose an empty or new folder", out.display());
        }
        if out.join("metadata.csv").exists() {
            bail!("{} holds a metadata.csv, which would conflict with the metadata.jsonl written here", out.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let digits = count.to_string().len().max(6);
    let lines: Vec<String> = (0..count)
        .into_par_iter()
        .map(|i| -> Result<String> {
            let scene = Scene::sample(seed, i);
            let file_name = format!("{i:0digits$}.png");
            let path = out.join(&file_name);
            scene.render(resolution).save(&path).with_context(|| format!("writing {}", path.display()))?;
            let row = Row {
                file_name,
                text: scene.caption(),
                count: scene.count,
                size: scene.size.name(),
                colour: scene.colour.name,
                shape: scene.shape.name(),
                background: scene.background.name,
                position: scene.position.name(),
            };
            Ok(serde_json::to_string(&row)?)
        })
        .collect::<Result<_>>()?;
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    crate::fs_safe::write_file(&out.join("metadata.jsonl"), body.as_bytes())
}

/// Samples per tar shard / parquet file that `sdkd synth --format webdataset|parquet` writes.
pub const SAMPLES_PER_SHARD: usize = 250;
/// Rows per parquet row group, as `datasets` writes image datasets.
const ROWS_PER_GROUP: usize = 100;

/// One rendered sample: PNG bytes, caption and the json img2dataset would write.
struct Rendered {
    png: Vec<u8>,
    caption: String,
    json: serde_json::Value,
}

fn render_all(count: usize, seed: u64, resolution: u32) -> Result<Vec<Rendered>> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    if !(8..=4096).contains(&resolution) {
        bail!("--resolution {resolution} is outside 8..=4096");
    }
    (0..count)
        .into_par_iter()
        .map(|i| {
            let scene = Scene::sample(seed, i);
            let mut png = vec![];
            scene.render(resolution).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            let caption = scene.caption();
            let json = serde_json::json!({
                "caption": caption, "key": "", "status": "success", "width": resolution, "height": resolution,
                "original_width": resolution, "original_height": resolution,
                "count": scene.count, "size": scene.size.name(), "colour": scene.colour.name,
                "shape": scene.shape.name(), "background": scene.background.name, "position": scene.position.name(),
            });
            Ok(Rendered { png, caption, json })
        })
        .collect()
}

/// The same samples as [`write_dataset`] (same PNG pixels, same captions, same order) as
/// img2dataset-style webdataset shards `00000.tar`, `00001.tar`, ... of [`SAMPLES_PER_SHARD`]
/// samples: `KEY.png`, `KEY.txt`, `KEY.json` with KEY the shard id then the index in the shard.
pub fn write_webdataset(out: &Path, count: usize, seed: u64, resolution: u32) -> Result<()> {
    let rows = render_all(count, seed, resolution)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (s, chunk) in rows.chunks(SAMPLES_PER_SHARD).enumerate() {
        let path = out.join(format!("{s:05}.tar"));
        let file = std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
        for (i, r) in chunk.iter().enumerate() {
            let key = format!("{s:05}{i:04}");
            let mut json = r.json.clone();
            json["key"] = key.clone().into();
            let json = serde_json::to_vec(&json)?;
            for (ext, data) in [("png", &r.png[..]), ("txt", r.caption.as_bytes()), ("json", &json[..])] {
                let mut header = tar::Header::new_gnu();
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_mtime(0);
                tar.append_data(&mut header, format!("{key}.{ext}"), data).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        let file = tar.into_inner().with_context(|| format!("writing {}", path.display()))?;
        file.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The same samples as a Hugging Face parquet dataset: `data/train-0000K-of-0000N.parquet` with
/// an `image` struct {bytes, path} (the `datasets` Image feature), `text`, `width`, `height`,
/// snappy-compressed, 100 rows per row group.
pub fn write_parquet(out: &Path, count: usize, seed: u64, resolution: u32) -> Result<()> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
    let rows = render_all(count, seed, resolution)?;
    let dir = out.join("data");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let schema = Arc::new(parquet::schema::parser::parse_message_type(
        "message schema { optional group image { optional binary bytes; optional binary path (STRING); } optional binary text (STRING); optional int32 width; optional int32 height; }",
    )?);
    let props = Arc::new(parquet::file::properties::WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let files = count.div_ceil(SAMPLES_PER_SHARD);
    for (k, chunk) in rows.chunks(SAMPLES_PER_SHARD).enumerate() {
        let path = dir.join(format!("train-{k:05}-of-{files:05}.parquet"));
        let file = std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
        let mut writer = parquet::file::writer::SerializedFileWriter::new(file, schema.clone(), props.clone())?;
        for group in chunk.chunks(ROWS_PER_GROUP) {
            let n = group.len();
            let mut rg = writer.next_row_group()?;
            let mut column = 0;
            while let Some(mut col) = rg.next_column()? {
                match column {
                    0 => {
                        let v: Vec<ByteArray> = group.iter().map(|r| ByteArray::from(r.png.clone())).collect();
                        col.typed::<ByteArrayType>().write_batch(&v, Some(&vec![2; n]), None)?;
                    }
                    // path: null inside a present struct.
                    1 => drop(col.typed::<ByteArrayType>().write_batch(&[], Some(&vec![1; n]), None)?),
                    2 => {
                        let v: Vec<ByteArray> = group.iter().map(|r| ByteArray::from(r.caption.as_str())).collect();
                        col.typed::<ByteArrayType>().write_batch(&v, Some(&vec![1; n]), None)?;
                    }
                    _ => drop(col.typed::<Int32Type>().write_batch(&vec![resolution as i32; n], Some(&vec![1; n]), None)?),
                }
                col.close()?;
                column += 1;
            }
            rg.close()?;
        }
        writer.close()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_parse_back_to_their_scene() {
        for i in 0..500 {
            let s = Scene::sample(3, i);
            let p = Scene::parse(&s.caption()).unwrap_or_else(|| panic!("cannot parse {:?}", s.caption()));
            assert_eq!(Scene { shift: (0.0, 0.0), ..s }, p);
            assert_ne!(s.colour.name, s.background.name);
        }
        assert!(Scene::parse("a photo of a cat").is_none());
        assert!(Scene::parse("one small red circles on a white background, top left").is_none());
        assert!(Scene::parse("two small red circles on a white background, top left").is_some());
    }

    #[test]
    fn every_attribute_value_occurs() {
        let scenes: Vec<Scene> = (0..2000).map(|i| Scene::sample(0, i)).collect();
        let distinct = |f: &dyn Fn(&Scene) -> String| scenes.iter().map(f).collect::<std::collections::BTreeSet<_>>().len();
        assert_eq!(distinct(&|s| s.count.to_string()), 3);
        assert_eq!(distinct(&|s| s.size.name().into()), 2);
        assert_eq!(distinct(&|s| s.colour.name.into()), 6);
        assert_eq!(distinct(&|s| s.shape.name().into()), 4);
        assert_eq!(distinct(&|s| s.background.name.into()), 4);
        assert_eq!(distinct(&|s| s.position.name().into()), 4);
        assert_eq!(Scene::sample(5, 17), Scene::sample(5, 17));
    }

    #[test]
    fn shapes_land_where_the_caption_says() {
        let s = Scene::parse("one large red circle on a white background, bottom right").unwrap();
        let img = s.render(64);
        assert_eq!(img.get_pixel(48, 48).0, [220, 40, 40]);
        assert_eq!(img.get_pixel(16, 16).0, [245, 245, 245]);
        let small = Scene { size: Size::Small, ..s }.render(64);
        let count = |im: &RgbImage| im.pixels().filter(|p| p.0 == [220, 40, 40]).count();
        assert!(count(&small) * 2 < count(&img), "small must be much smaller");
    }
}
