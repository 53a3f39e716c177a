//! A caption-following score for the synthetic scenes: the attributes a caption states that
//! still read from the pixels at the demo's 32 px, read back by plain image analysis, and
//! compared with what the caption asked for.
//!
//! - background colour: the per-channel median of the border pixels, nearest palette colour;
//! - object colour: among the pixels far from that background, the shape colour most of them are
//!   close to (antialiased edge pixels, which at 32 px can outnumber a small shape's interior,
//!   vote only when no pixel is close to a shape colour);
//! - position: the quadrant of the centroid of those pixels.
//!
//! Count, size and shape are left out: shapes are 3-5 px across at 32 px, and a generated blob
//! of the right colour in the right place is what a 3M-parameter teacher can learn in minutes.
use crate::data::synthetic::{Colour, Position, Scene, BACKGROUNDS, SHAPE_COLOURS};
use image::RgbImage;

/// The attributes the score reads, in report order.
pub const ATTRIBUTES: [&str; 3] = ["background", "object_colour", "position"];

/// Pixels at least this far (euclidean RGB) from the background colour count as the object: past
/// half the distance between the closest background and shape colours (blue and purple, 108).
const FOREGROUND_DISTANCE: f64 = 60.0;

/// A pixel this close to a shape colour is that colour (edge pixels mix it with the background).
const PURE_DISTANCE: f64 = 40.0;

/// What one image shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub background: &'static str,
    /// None when no pixel stands out from the background.
    pub object_colour: Option<&'static str>,
    pub position: Option<Position>,
}

fn distance(a: [u8; 3], b: [u8; 3]) -> f64 {
    a.iter().zip(b).map(|(&x, y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt()
}

fn nearest(p: [u8; 3], palette: &[Colour]) -> Colour {
    *palette.iter().min_by(|a, b| distance(p, a.rgb).total_cmp(&distance(p, b.rgb))).expect("a palette")
}

fn median(mut v: Vec<u8>) -> u8 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Reads background colour, object colour and position off an image.
pub fn read(img: &RgbImage) -> Reading {
    let (w, h) = img.dimensions();
    let border: Vec<[u8; 3]> = img.enumerate_pixels().filter(|(x, y, _)| *x == 0 || *y == 0 || *x + 1 == w || *y + 1 == h).map(|(_, _, p)| p.0).collect();
    let bg_rgb = [0, 1, 2].map(|c| median(border.iter().map(|p| p[c]).collect()));
    let background = nearest(bg_rgb, &BACKGROUNDS);
    // votes of pixels close to a shape colour, and of all foreground pixels
    let (mut pure, mut all) = ([0usize; SHAPE_COLOURS.len()], [0usize; SHAPE_COLOURS.len()]);
    let (mut sx, mut sy, mut n) = (0.0, 0.0, 0usize);
    for (x, y, p) in img.enumerate_pixels() {
        if distance(p.0, bg_rgb) < FOREGROUND_DISTANCE {
            continue;
        }
        let c = nearest(p.0, &SHAPE_COLOURS);
        let i = SHAPE_COLOURS.iter().position(|s| s.name == c.name).expect("from the palette");
        all[i] += 1;
        pure[i] += (distance(p.0, c.rgb) < PURE_DISTANCE) as usize;
        (sx, sy, n) = (sx + x as f64 + 0.5, sy + y as f64 + 0.5, n + 1);
    }
    if n == 0 {
        return Reading { background: background.name, object_colour: None, position: None };
    }
    let votes = if pure.iter().any(|&v| v > 0) { pure } else { all };
    let best = (0..votes.len()).max_by_key(|&i| (votes[i], usize::MAX - i)).expect("six colours");
    let (left, top) = (sx / (n as f64) < w as f64 / 2.0, sy / (n as f64) < h as f64 / 2.0);
    let position = match (top, left) {
        (true, true) => Position::TopLeft,
        (true, false) => Position::TopRight,
        (false, true) => Position::BottomLeft,
        (false, false) => Position::BottomRight,
    };
    Reading { background: background.name, object_colour: Some(SHAPE_COLOURS[best].name), position: Some(position) }
}

/// Per attribute of [`ATTRIBUTES`]: whether `img` shows what `scene` asks for.
pub fn matches(img: &RgbImage, scene: &Scene) -> [bool; 3] {
    let r = read(img);
    [r.background == scene.background.name, r.object_colour == Some(scene.colour.name), r.position == Some(scene.position)]
}

/// Accuracy per attribute of [`ATTRIBUTES`] (fractions in [0, 1]) of images against the captions
/// they were made from; captions that are not synthetic scenes are an error.
pub fn accuracy(images: &[RgbImage], captions: &[String]) -> anyhow::Result<[f64; 3]> {
    anyhow::ensure!(images.len() == captions.len() && !images.is_empty(), "{} images for {} captions", images.len(), captions.len());
    let mut hits = [0usize; 3];
    for (img, caption) in images.iter().zip(captions) {
        let scene = Scene::parse(caption).ok_or_else(|| anyhow::anyhow!("{caption:?} is not a synthetic scene's caption"))?;
        for (h, m) in hits.iter_mut().zip(matches(img, &scene)) {
            *h += m as usize;
        }
    }
    Ok(hits.map(|h| h as f64 / images.len() as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::DEMO_RESOLUTION;

    #[test]
    fn reads_the_real_scenes_and_refuses_wrong_ones() {
        // the demo's held-out set: seed 0's held-out seed, at the demo resolution
        let scenes: Vec<Scene> = (0..500).map(|i| Scene::sample(1_000_003, i)).collect();
        let images: Vec<RgbImage> = scenes.iter().map(|s| s.render(DEMO_RESOLUTION)).collect();
        let captions: Vec<String> = scenes.iter().map(Scene::caption).collect();
        let acc = accuracy(&images, &captions).unwrap();
        assert!(acc.iter().all(|&a| a >= 0.98), "{acc:?}");
        for (s, img) in scenes.iter().zip(&images).take(100) {
            // the background recoloured: another palette colour that is not the object's
            let other = *BACKGROUNDS.iter().find(|b| b.name != s.background.name && b.name != s.colour.name).unwrap();
            let recoloured = Scene { background: other, ..*s }.render(DEMO_RESOLUTION);
            assert!(!matches(&recoloured, s)[0], "{}: background {} read as the caption's", s.caption(), other.name);
            // the object recoloured
            let colour = *SHAPE_COLOURS.iter().find(|c| c.name != s.colour.name && c.name != s.background.name).unwrap();
            assert!(!matches(&Scene { colour, ..*s }.render(DEMO_RESOLUTION), s)[1], "{}", s.caption());
            // the object moved to the diagonally opposite quadrant
            let i = Position::ALL.iter().position(|p| *p == s.position).unwrap();
            let moved = Scene { position: Position::ALL[3 - i], ..*s }.render(DEMO_RESOLUTION);
            assert!(!matches(&moved, s)[2], "{}", s.caption());
            assert!(matches(img, s)[0]);
        }
        // a flat image has no object: colour and position wrong, background right
        let flat = RgbImage::from_pixel(32, 32, image::Rgb(BACKGROUNDS[0].rgb));
        let s = Scene::parse("one small red circle on a white background, top left").unwrap();
        assert_eq!(matches(&flat, &s), [true, false, false]);
    }
}
