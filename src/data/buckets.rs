//! Aspect-ratio buckets (`data.buckets`): instead of one square crop, every image is resized
//! and cropped to the bucket (width × height) nearest its aspect ratio, and a micro-batch holds
//! samples of one bucket only, so non-square images keep most of their content. SDXL was trained
//! this way; SSD-1B's model card lists its nine resolutions ([`SSD_1B`]). SD-1.x/2.x UNets are
//! convolutional and train on any multiple of 8 as well.
//!
//! Nearest: the bucket whose aspect ratio is closest to the image's on a log scale (the ratio of
//! the larger to the smaller of `w/h` and `bw/bh`, so a 2:1 image is as far from 1:1 as a 1:2
//! one), compared exactly in integers; a tie goes to the bucket listed first.
use serde::{Deserialize, Serialize};

/// SSD-1B's training resolutions (width, height), from its model card (segmind/SSD-1B).
pub const SSD_1B: [(u32, u32); 9] =
    [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1536, 640), (640, 1536)];

/// What `data.buckets` says: a named list or the user's own `[width, height]` pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketsConfig {
    /// `ssd_1b`: [`SSD_1B`].
    Ssd1b,
    List(Vec<[u32; 2]>),
}

impl Serialize for BucketsConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BucketsConfig::Ssd1b => s.serialize_str("ssd_1b"),
            BucketsConfig::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for BucketsConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            List(Vec<[u32; 2]>),
        }
        let what = "data.buckets must be ssd_1b or a list of [width, height] pairs, e.g. [[1024, 1024], [1152, 896]]";
        match Raw::deserialize(d).map_err(|_| D::Error::custom(what))? {
            Raw::Name(n) if n == "ssd_1b" => Ok(BucketsConfig::Ssd1b),
            Raw::Name(n) => Err(D::Error::custom(format!("data.buckets: unknown bucket list {n:?}; {what}"))),
            Raw::List(l) => Ok(BucketsConfig::List(l)),
        }
    }
}

impl BucketsConfig {
    /// The checked bucket list, or why not (naming the pair at fault).
    pub fn buckets(&self) -> Result<Buckets, String> {
        match self {
            BucketsConfig::Ssd1b => Buckets::new(SSD_1B.to_vec()),
            BucketsConfig::List(l) => Buckets::new(l.iter().map(|&[w, h]| (w, h)).collect()),
        }
    }
}

/// A checked bucket list: (width, height) pixels, each a positive multiple of 8, no repeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<(u32, u32)>", into = "Vec<(u32, u32)>")]
pub struct Buckets(Vec<(u32, u32)>);

impl TryFrom<Vec<(u32, u32)>> for Buckets {
    type Error = String;
    fn try_from(v: Vec<(u32, u32)>) -> Result<Self, String> {
        Buckets::new(v)
    }
}

impl From<Buckets> for Vec<(u32, u32)> {
    fn from(b: Buckets) -> Self {
        b.0
    }
}

impl Buckets {
    pub fn new(sizes: Vec<(u32, u32)>) -> Result<Buckets, String> {
        if sizes.is_empty() {
            return Err("data.buckets is an empty list: give at least one [width, height] (or leave data.buckets out)".into());
        }
        for (i, &(w, h)) in sizes.iter().enumerate() {
            if w == 0 || h == 0 || !w.is_multiple_of(8) || !h.is_multiple_of(8) {
                return Err(format!("data.buckets: [{w}, {h}] is not a positive multiple of 8 on both sides (the VAE downsamples by 8)"));
            }
            if sizes[..i].contains(&(w, h)) {
                return Err(format!("data.buckets: [{w}, {h}] is listed twice"));
            }
        }
        Ok(Buckets(sizes))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (width, height) of bucket `i`.
    pub fn size(&self, i: usize) -> (u32, u32) {
        self.0[i]
    }

    /// The bucket of this exact size, if listed.
    pub fn position(&self, size: (u32, u32)) -> Option<usize> {
        self.0.iter().position(|&s| s == size)
    }

    /// The most pixels of any bucket.
    pub fn max_pixels(&self) -> u64 {
        self.0.iter().map(|&(w, h)| w as u64 * h as u64).max().unwrap_or(0)
    }

    /// The bucket nearest a `w` × `h` image (see the module comment; ties: the first listed).
    pub fn nearest(&self, w: u32, h: u32) -> usize {
        // The distance of bucket (bw, bh) is max(a, b) / min(a, b) with a = w·bh, b = bw·h:
        // a fraction, compared with another by cross-multiplying (exact in u128).
        let dist = |&(bw, bh): &(u32, u32)| {
            let (a, b) = (w as u128 * bh as u128, bw as u128 * h as u128);
            (a.max(b), a.min(b))
        };
        let mut best = 0;
        for i in 1..self.0.len() {
            let ((n, d), (bn, bd)) = (dist(&self.0[i]), dist(&self.0[best]));
            if n * bd < bn * d {
                best = i;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_is_symmetric_exact_and_ties_go_first() {
        let b = Buckets::new(vec![(32, 32), (48, 16), (16, 48)]).unwrap();
        assert_eq!(b.nearest(100, 100), 0);
        assert_eq!(b.nearest(200, 100), 1); // log 2 is nearer log 3 than 0
        assert_eq!(b.nearest(100, 200), 2);
        assert_eq!(b.nearest(150, 100), 0); // log 1.5 = 0.405 < log 3 - log 1.5 = 0.693
        // sqrt(3) : 1 is exactly between 1:1 and 3:1; 1732:1000 is just below, 1733:1000 above
        assert_eq!(b.nearest(1732, 1000), 0);
        assert_eq!(b.nearest(1733, 1000), 1);
        // a tie: 1:1 between 2:1 and 1:2 goes to the first listed
        let t = Buckets::new(vec![(32, 16), (16, 32)]).unwrap();
        assert_eq!((t.nearest(10, 10), Buckets::new(vec![(16, 32), (32, 16)]).unwrap().nearest(10, 10)), (0, 0));
        let ssd = BucketsConfig::Ssd1b.buckets().unwrap();
        assert_eq!(ssd.size(ssd.nearest(1920, 1080)), (1344, 768));
        assert_eq!(ssd.size(ssd.nearest(1080, 1920)), (768, 1344));
    }

    #[test]
    fn bad_lists_are_refused_naming_the_pair() {
        assert!(Buckets::new(vec![]).unwrap_err().contains("empty"));
        assert!(Buckets::new(vec![(32, 20)]).unwrap_err().contains("[32, 20]"));
        assert!(Buckets::new(vec![(0, 8)]).unwrap_err().contains("[0, 8]"));
        assert!(Buckets::new(vec![(8, 8), (8, 8)]).unwrap_err().contains("twice"));
        let c: BucketsConfig = serde_yaml::from_str("[[32, 32], [48, 16]]").unwrap();
        assert_eq!(c, BucketsConfig::List(vec![[32, 32], [48, 16]]));
        assert_eq!(serde_yaml::from_str::<BucketsConfig>("ssd_1b").unwrap(), BucketsConfig::Ssd1b);
        assert!(serde_yaml::from_str::<BucketsConfig>("sdxl").unwrap_err().to_string().contains("unknown bucket list"));
        assert_eq!(serde_yaml::to_string(&BucketsConfig::Ssd1b).unwrap().trim(), "ssd_1b");
    }
}
