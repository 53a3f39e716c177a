//! The torchvision image pipeline of diffusers' `train_text_to_image.py` and BK-SDM's training
//! script, reproduced exactly on 8-bit RGB:
//! `Resize(res, BILINEAR)` (short side to `res`, long side `int(res * long / short)`), then
//! `CenterCrop(res)` or `RandomCrop(res)`, optional `RandomHorizontalFlip()`, `ToTensor()` and
//! `Normalize([0.5], [0.5])`.
//!
//! torchvision resizes PIL images with Pillow, whose bilinear filter is not the textbook 2x2
//! interpolation: when shrinking it widens the triangle filter by the scale (antialiasing) and it
//! works in 22-bit fixed point, rounding to 8 bits after each of its two passes. The resampler here
//! follows Pillow's `Resample.c` step by step so that a model sees the pixels it would have seen
//! in PyTorch; the tests compare against Pillow itself. The same code with Pillow's bicubic
//! kernel (a = -0.5, support 2) gives `Image.resize(size, BICUBIC)`, which the evaluation
//! protocol uses (FID's 256² squash, open_clip's 224 resize). Only the pixels inside the crop are
//! computed (each output pixel depends only on the full-size filter coefficients).
use super::order::{below, hash, Stream};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Resize, crop and flip options (the `data.resolution`, `data.center_crop` and
/// `data.random_flip` keys of the run config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transform {
    /// Side of the square output, in pixels.
    pub resolution: u32,
    /// Centre crop (true) or a random crop drawn from (seed, epoch, index) (false).
    pub center_crop: bool,
    /// Mirror half of the samples, drawn from (seed, epoch, index).
    pub random_flip: bool,
}

/// Where a sample is cropped, to what size, and whether it is mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Augment {
    pub left: u32,
    pub top: u32,
    pub flip: bool,
    /// (width, height) of the crop: `resolution`², or an aspect-ratio bucket's size.
    pub target: (u32, u32),
}

/// The size (width, height) an image `w` × `h` is resized to before its `target` crop: the
/// smallest that covers the target keeping the aspect ratio, the side that fits exactly and the
/// other `int(side * long / short)` as torchvision's `Resize(int)` computes it (for a square
/// target, exactly `Resize(resolution)`: the short side to `resolution`).
pub fn cover(w: u32, h: u32, target: (u32, u32)) -> (u32, u32) {
    let (tw, th) = target;
    // Python's `int(size * long / short)`: an exact product, one correctly rounded division.
    let scaled = |side: u32, num: u32, den: u32| ((side as u64 * num as u64) as f64 / den as f64) as u32;
    if w as u64 * th as u64 >= h as u64 * tw as u64 {
        (scaled(th, w, h), th) // as wide as the target or wider: the height fits
    } else {
        (tw, scaled(tw, h, w))
    }
}

impl Transform {
    /// torchvision's `Resize(int)` output size (width, height) for a `w` x `h` image.
    pub fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        cover(w, h, (self.resolution, self.resolution))
    }

    /// The crop and flip of sample `index` in epoch `epoch` for an image resized to `resized`,
    /// cropped to `resolution`².
    pub fn augment(&self, seed: u64, epoch: u64, index: usize, resized: (u32, u32)) -> Augment {
        self.augment_to(seed, epoch, index, resized, (self.resolution, self.resolution))
    }

    /// [`Transform::augment`] for a `target` (width, height) crop (an aspect-ratio bucket).
    pub fn augment_to(&self, seed: u64, epoch: u64, index: usize, resized: (u32, u32), target: (u32, u32)) -> Augment {
        let (w, h) = resized;
        let (span_x, span_y) = (w - target.0, h - target.1);
        let (left, top) = if self.center_crop {
            // torchvision: int(round((size - crop) / 2.0)); Python rounds halves to even.
            let c = |span: u32| (span as f64 / 2.0).round_ties_even() as u32;
            (c(span_x), c(span_y))
        } else {
            let r = |s: Stream, span: u32| below(hash(seed, s, epoch, index as u64), span as u64 + 1) as u32;
            (r(Stream::CropX, span_x), r(Stream::CropY, span_y))
        };
        let flip = self.random_flip && hash(seed, Stream::Flip, epoch, index as u64) >> 63 == 1;
        Augment { left, top, flip, target }
    }

    /// SDXL's six micro-conditioning ids of a `original` (width, height) image cropped and
    /// flipped by `aug`: original size (h, w) before the resize, crop top-left (y, x) in the
    /// resized image, target size (h, w). A flip stores `target width - x`, as diffusers'
    /// `train_text_to_image_sdxl.py` does (`x1 = image.width - x1` on the cropped image).
    pub fn time_ids(&self, original: (u32, u32), aug: Augment) -> [i64; 6] {
        let (tw, th) = (aug.target.0 as i64, aug.target.1 as i64);
        let left = if aug.flip { tw - aug.left as i64 } else { aug.left as i64 };
        [original.1 as i64, original.0 as i64, aug.top as i64, left, th, tw]
    }

    /// Resizes, crops and flips `img` into `aug.target` RGB pixels (row-major, HWC).
    pub fn apply(&self, img: &RgbImage, aug: Augment) -> Vec<u8> {
        let (w, h) = cover(img.width(), img.height(), aug.target);
        let (tw, th) = aug.target;
        assert!(aug.left + tw <= w && aug.top + th <= h, "crop {aug:?} outside the resized {w}x{h} image");
        resize_crop(img, (w, h), (aug.left, aug.top), aug.target, aug.flip)
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling filters that sdkd reproduces: `BILINEAR` (the training transform) and
/// `BICUBIC` (a = -0.5; the FID protocol's 256² squash and open_clip's preprocessing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    /// Pillow's `filter->support` (before widening by the scale when shrinking).
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    /// Pillow's `bilinear_filter` / `bicubic_filter` (Resample.c), term for term.
    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The fixed-point filter taps of one axis: output pixel `i` reads `count[i]` input pixels from
/// `first[i]` with weights `k[i * ksize..]` (Pillow's `precompute_coeffs` and
/// `normalize_coeffs_8bpc` on the whole image).
struct Taps {
    ksize: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    k: Vec<i32>,
}

impl Taps {
    fn new(filter: Filter, in_size: u32, out_size: u32) -> Taps {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale; // widened when shrinking (antialiasing)
        let ksize = support.ceil() as usize * 2 + 1;
        let n = out_size as usize;
        let (mut first, mut count, mut k) = (vec![0; n], vec![0; n], vec![0i32; n * ksize]);
        let mut w = vec![0f64; ksize];
        for xx in 0..n {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let (xmin, xmax) = (xmin as usize, xmax.max(0) as usize);
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(xmax) {
                *wx = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
                ww += *wx;
            }
            for x in 0..xmax {
                let v = if ww != 0.0 { w[x] / ww } else { w[x] };
                let f = v * (1u32 << PRECISION_BITS) as f64;
                k[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
            }
            first[xx] = xmin;
            count[xx] = xmax;
        }
        Taps { ksize, first, count, k }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        (self.first[i], &self.k[i * self.ksize..i * self.ksize + self.count[i]])
    }
}

/// Pillow's `clip8`: shift out the fraction (flooring) and clamp to a byte.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The `crop` (width, height) window at `offset` of `img` resized to `size` with Pillow's
/// bilinear filter (horizontal pass then vertical, as Pillow does), mirrored when `flip`.
pub fn resize_crop(img: &RgbImage, size: (u32, u32), offset: (u32, u32), crop: (u32, u32), flip: bool) -> Vec<u8> {
    resize_crop_with(Filter::Bilinear, img, size, offset, crop, flip)
}

/// `img.resize(size, filter)` as Pillow computes it, bit for bit.
pub fn resize(img: &RgbImage, size: (u32, u32), filter: Filter) -> RgbImage {
    let pixels = resize_crop_with(filter, img, size, (0, 0), size, false);
    RgbImage::from_raw(size.0, size.1, pixels).expect("resize_crop_with returns size.0 * size.1 pixels")
}

/// [`resize_crop`] with any of Pillow's filters that sdkd reproduces.
pub fn resize_crop_with(filter: Filter, img: &RgbImage, size: (u32, u32), offset: (u32, u32), crop: (u32, u32), flip: bool) -> Vec<u8> {
    let (in_w, in_h) = img.dimensions();
    let (out_w, out_h) = size;
    let (left, top) = (offset.0 as usize, offset.1 as usize);
    let (cw, ch) = (crop.0 as usize, crop.1 as usize);
    let src = img.as_raw();
    let round = 1i32 << (PRECISION_BITS - 1);

    // Rows of the (horizontally resized) intermediate image that the vertical pass reads.
    let vtaps = (out_h != in_h).then(|| Taps::new(filter, in_h, out_h));
    let (y0, y1) = match &vtaps {
        Some(t) => {
            let first = (top..top + ch).map(|y| t.first[y]).min().unwrap_or(0);
            let last = (top..top + ch).map(|y| t.first[y] + t.count[y]).max().unwrap_or(0);
            (first, last)
        }
        None => (top, top + ch),
    };

    // Horizontal pass: rows y0..y1, only the crop's columns.
    let row_len = cw * 3;
    let mut mid = vec![0u8; (y1 - y0) * row_len];
    if out_w != in_w {
        let htaps = Taps::new(filter, in_w, out_w);
        let taps: Vec<(usize, &[i32])> = (0..cw).map(|c| htaps.taps(left + c)).collect();
        for (y, dst) in (y0..y1).zip(mid.chunks_exact_mut(row_len)) {
            let row = &src[y * in_w as usize * 3..(y + 1) * in_w as usize * 3];
            for (d, &(x0, k)) in dst.chunks_exact_mut(3).zip(&taps) {
                let mut s = [round; 3];
                for (p, &kj) in row[x0 * 3..].chunks_exact(3).zip(k) {
                    s[0] += p[0] as i32 * kj;
                    s[1] += p[1] as i32 * kj;
                    s[2] += p[2] as i32 * kj;
                }
                d[0] = clip8(s[0]);
                d[1] = clip8(s[1]);
                d[2] = clip8(s[2]);
            }
        }
    } else {
        for (y, dst) in (y0..y1).zip(mid.chunks_exact_mut(row_len)) {
            let s = (y * in_w as usize + left) * 3;
            dst.copy_from_slice(&src[s..s + row_len]);
        }
    }

    // Vertical pass, a whole row at a time (integer sums: the order does not change them).
    let mut out = vec![0u8; ch * row_len];
    let mut acc = vec![0i32; row_len];
    for (r, dst) in out.chunks_exact_mut(row_len).enumerate() {
        match &vtaps {
            Some(t) => {
                let (ya, k) = t.taps(top + r);
                acc.fill(round);
                for (j, &kj) in k.iter().enumerate() {
                    let m = &mid[(ya + j - y0) * row_len..(ya + j - y0 + 1) * row_len];
                    for (a, &v) in acc.iter_mut().zip(m) {
                        *a += v as i32 * kj;
                    }
                }
                for (d, &a) in dst.iter_mut().zip(&acc) {
                    *d = clip8(a);
                }
            }
            None => dst.copy_from_slice(&mid[r * row_len..(r + 1) * row_len]),
        }
        if flip {
            flip_row(dst);
        }
    }
    out
}

/// Mirrors one row of RGB pixels in place.
fn flip_row(row: &mut [u8]) {
    let n = row.len() / 3;
    for i in 0..n / 2 {
        let j = n - 1 - i;
        for c in 0..3 {
            row.swap(i * 3 + c, j * 3 + c);
        }
    }
}

/// `ToTensor()` then `Normalize([0.5], [0.5])` of one byte, in f32 as torchvision computes it.
pub fn normalize(v: u8) -> f32 {
    (v as f32 / 255.0 - 0.5) / 0.5
}

/// Stacks `n` HWC RGB images of `res`² pixels into a (n, 3, res, res) f32 tensor in [-1, 1].
pub fn to_tensor(pixels: &[u8], n: usize, res: usize) -> Tensor {
    to_tensor_sized(pixels, n, (res, res))
}

/// [`to_tensor`] of `n` images of (width, height) `size`: (n, 3, height, width).
pub fn to_tensor_sized(pixels: &[u8], n: usize, size: (usize, usize)) -> Tensor {
    let (w, h) = size;
    assert_eq!(pixels.len(), n * w * h * 3, "pixel buffer does not hold {n} images of {w}x{h}");
    let lut: Vec<f32> = (0..=255u8).map(normalize).collect();
    let plane = w * h;
    let out = Tensor::empty([n as i64, 3, h as i64, w as i64], (Kind::Float, Device::Cpu));
    if n * plane == 0 {
        return out;
    }
    // SAFETY: `out` is a fresh, contiguous CPU f32 tensor of exactly n * 3 * plane elements that
    // nothing else references yet; every element is written below before it is returned. Writing
    // in place saves a zero-filled staging buffer and a copy (a 512px batch of 64 is 200 MB).
    let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n * 3 * plane) };
    dst.par_chunks_mut(plane).enumerate().for_each(|(k, dst)| {
        let (img, c) = (k / 3, k % 3);
        let src = &pixels[img * 3 * plane..(img + 1) * 3 * plane];
        for (d, p) in dst.iter_mut().zip(src.chunks_exact(3)) {
            *d = lut[p[c] as usize];
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(res: u32, center: bool, flip: bool) -> Transform {
        Transform { resolution: res, center_crop: center, random_flip: flip }
    }

    #[test]
    fn resized_size_follows_torchvision() {
        assert_eq!(t(64, true, false).resized_size(100, 75), (85, 64)); // int(64*100/75) = 85
        assert_eq!(t(64, true, false).resized_size(75, 100), (64, 85));
        assert_eq!(t(512, true, false).resized_size(512, 512), (512, 512));
        assert_eq!(t(512, true, false).resized_size(300, 1000), (512, 1706));
    }

    #[test]
    fn centre_crop_rounds_halves_to_even() {
        // (77 - 64) / 2 = 6.5 -> 6 and (79 - 64) / 2 = 7.5 -> 8, as Python's round does.
        assert_eq!(t(64, true, false).augment(0, 0, 0, (77, 64)), Augment { left: 6, top: 0, flip: false, target: (64, 64) });
        assert_eq!(t(64, true, false).augment(0, 0, 0, (64, 79)), Augment { left: 0, top: 8, flip: false, target: (64, 64) });
    }

    #[test]
    fn random_crop_and_flip_are_spread_and_deterministic() {
        let tr = t(8, false, true);
        let mut lefts = std::collections::BTreeSet::new();
        let mut flips = 0;
        for i in 0..400 {
            let a = tr.augment(3, 1, i, (12, 8));
            assert_eq!(a, tr.augment(3, 1, i, (12, 8)));
            assert!(a.left <= 4 && a.top == 0);
            lefts.insert(a.left);
            flips += a.flip as usize;
        }
        assert_eq!(lefts.len(), 5, "every offset 0..=4 should occur");
        assert!((150..250).contains(&flips), "{flips} flips of 400");
    }

    #[test]
    fn time_ids_record_size_crop_and_mirrored_left() {
        let tr = t(64, false, true);
        let aug = Augment { left: 10, top: 3, flip: false, target: (64, 64) };
        assert_eq!(tr.time_ids((100, 75), aug), [75, 100, 3, 10, 64, 64]);
        assert_eq!(tr.time_ids((100, 75), Augment { flip: true, ..aug }), [75, 100, 3, 54, 64, 64]);
    }

    #[test]
    fn identity_resize_taps_copy_pixels() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        // A pass with equal sizes would be an identity; check the taps say so too.
        let taps = Taps::new(Filter::Bilinear, 5, 5);
        for i in 0..5 {
            let (f, k) = taps.taps(i);
            assert_eq!(f, i);
            assert_eq!(k[0], 1 << PRECISION_BITS);
        }
        let out = resize_crop(&img, (5, 4), (0, 0), (5, 4), false);
        assert_eq!(out, img.as_raw().clone());
        let flipped = resize_crop(&img, (5, 4), (1, 1), (3, 2), true);
        assert_eq!(&flipped[0..3], img.get_pixel(3, 1).0.as_slice());
        assert_eq!(&flipped[6..9], img.get_pixel(1, 1).0.as_slice());
    }

    #[test]
    fn constant_image_stays_constant_through_resize() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 90]));
        let out = resize_crop(&img, (27, 16), (5, 0), (16, 16), true);
        assert!(out.chunks(3).all(|p| p == [200, 13, 90]));
    }

    #[test]
    fn normalize_maps_bytes_to_unit_range() {
        assert_eq!(normalize(0), -1.0);
        assert_eq!(normalize(255), 1.0);
        let x = to_tensor(&[0, 255, 0, 255, 0, 255, 0, 255, 0, 255, 0, 255], 1, 2);
        assert_eq!(x.size(), vec![1, 3, 2, 2]);
        assert_eq!(x.double_value(&[0, 0, 0, 0]), -1.0);
        assert_eq!(x.double_value(&[0, 1, 0, 0]), 1.0);
    }
}
