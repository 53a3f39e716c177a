//! Image grids: rows of images tiled into one picture (the trainer's validation grid is a teacher
//! row over a student row; the demo lays out teacher, student and control).
use image::{Rgb, RgbImage};

/// Gap between cells, in pixels.
pub const GAP: u32 = 2;
/// Colour of the gaps and of cells a short row leaves empty.
pub const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);

/// Tiles `rows` (row i is the i-th line of the picture) into one image: every cell is as large as
/// the largest image, images sit at the top left of their cell, cells are `GAP` pixels apart,
/// short rows leave their end empty. An empty input gives a 1×1 background image.
pub fn grid(rows: &[Vec<RgbImage>]) -> RgbImage {
    let cells = rows.iter().flatten();
    let cell_w = cells.clone().map(RgbImage::width).max().unwrap_or(0);
    let cell_h = cells.map(RgbImage::height).max().unwrap_or(0);
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let span = |n: u32, cell: u32| if n == 0 || cell == 0 { 1 } else { n * cell + (n - 1) * GAP };
    let mut out = RgbImage::from_pixel(span(cols, cell_w), span(rows.len() as u32, cell_h), BACKGROUND);
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let (x, y) = (c as u32 * (cell_w + GAP), r as u32 * (cell_h + GAP));
            image::imageops::replace(&mut out, img, x as i64, y as i64);
        }
    }
    out
}

/// `rows` with every image enlarged `scale` times, each pixel a `scale`² block (small images
/// made legible before `grid`).
pub fn enlarged(rows: &[Vec<RgbImage>], scale: u32) -> Vec<Vec<RgbImage>> {
    let up = |im: &RgbImage| image::imageops::resize(im, im.width() * scale, im.height() * scale, image::imageops::FilterType::Nearest);
    rows.iter().map(|r| r.iter().map(up).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb([v, v, v]))
    }

    #[test]
    fn tiles_rows_with_gaps() {
        let g = grid(&[vec![solid(4, 3, 10), solid(4, 3, 20)], vec![solid(2, 2, 30)]]);
        assert_eq!(g.dimensions(), (4 * 2 + GAP, 3 * 2 + GAP));
        assert_eq!(g.get_pixel(0, 0), &Rgb([10; 3]));
        assert_eq!(g.get_pixel(3, 2), &Rgb([10; 3]));
        assert_eq!(g.get_pixel(4, 0), &BACKGROUND); // gap
        assert_eq!(g.get_pixel(4 + GAP, 0), &Rgb([20; 3]));
        assert_eq!(g.get_pixel(1, 3 + GAP + 1), &Rgb([30; 3]));
        assert_eq!(g.get_pixel(3, 3 + GAP + 2), &BACKGROUND); // outside the smaller image
        assert_eq!(g.get_pixel(4 + GAP, 3 + GAP), &BACKGROUND); // the short row's empty cell
        assert_eq!(grid(&[]).dimensions(), (1, 1));
        assert_eq!(grid(&[vec![solid(5, 7, 1)]]).dimensions(), (5, 7));
    }

    #[test]
    fn enlarging_repeats_pixels() {
        let mut im = solid(2, 1, 0);
        im.put_pixel(1, 0, Rgb([200; 3]));
        let big = &enlarged(&[vec![im]], 3)[0][0];
        assert_eq!(big.dimensions(), (6, 3));
        assert_eq!((big.get_pixel(2, 2), big.get_pixel(3, 0)), (&Rgb([0; 3]), &Rgb([200; 3])));
    }
}
