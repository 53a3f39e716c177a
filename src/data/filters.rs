//! The LAION-style row filters (`data.min_size`, `data.max_aspect`, `data.filter`) that the
//! webdataset and parquet readers apply when a shard set is opened, over a row's metadata
//! (`Meta`: a webdataset json or a parquet row's scalar columns).
use anyhow::{anyhow, Result};
use std::collections::BTreeMap;

/// A row's metadata as the filters see it: a webdataset json or a parquet row's scalar columns.
pub trait Meta {
    fn field(&self, name: &str) -> Option<serde_json::Value>;
}

/// One `data.filter` condition: `>= 6.5`, `< 2`, `== en`, `!= 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    op: Op,
    value: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
    Ne,
}

impl Condition {
    pub fn parse(text: &str) -> std::result::Result<Condition, String> {
        let t = text.trim();
        let ops = [(">=", Op::Ge), ("<=", Op::Le), ("==", Op::Eq), ("!=", Op::Ne), (">", Op::Gt), ("<", Op::Lt)];
        let (op, rest) = ops
            .iter()
            .find_map(|(s, op)| t.strip_prefix(s).map(|r| (*op, r.trim())))
            .ok_or_else(|| format!("{text:?}: expected an operator (>=, >, <=, <, ==, !=) and a value, such as \">= 6.5\""))?;
        if rest.is_empty() {
            return Err(format!("{text:?}: no value after the operator"));
        }
        if matches!(op, Op::Ge | Op::Gt | Op::Le | Op::Lt) && rest.parse::<f64>().is_err() {
            return Err(format!("{text:?}: {rest:?} is not a number"));
        }
        Ok(Condition { op, value: rest.to_string() })
    }

    /// Whether `v` passes; a missing value never does.
    fn holds(&self, v: Option<&serde_json::Value>) -> bool {
        let Some(v) = v else { return false };
        let number = v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
        let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
        let want = self.value.parse::<f64>().ok();
        match (self.op, number, want) {
            (Op::Ge, Some(x), Some(w)) => x >= w,
            (Op::Gt, Some(x), Some(w)) => x > w,
            (Op::Le, Some(x), Some(w)) => x <= w,
            (Op::Lt, Some(x), Some(w)) => x < w,
            (Op::Eq, Some(x), Some(w)) => x == w,
            (Op::Ne, Some(x), Some(w)) => x != w,
            (Op::Eq, _, _) => text == self.value,
            (Op::Ne, _, _) => text != self.value,
            _ => false,
        }
    }
}

/// `data.min_size`, `data.max_aspect`, `data.filter`: which rows of a shard set are used.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filters {
    /// The image's short side (its metadata's `width`/`height`) at least this.
    pub min_size: Option<u32>,
    /// long side / short side at most this.
    pub max_aspect: Option<f64>,
    pub columns: BTreeMap<String, Condition>,
}

impl Filters {
    /// Checks the YAML's values; errors name the key.
    pub fn from_config(min_size: Option<u32>, max_aspect: Option<f64>, filter: &BTreeMap<String, String>) -> std::result::Result<Filters, (String, String)> {
        if let Some(a) = max_aspect {
            if !(a.is_finite() && a >= 1.0) {
                return Err(("data.max_aspect".into(), format!("data.max_aspect = {a}: must be a number >= 1 (long side over short side)")));
            }
        }
        let mut columns = BTreeMap::new();
        for (k, v) in filter {
            let key = format!("data.filter.{k}");
            columns.insert(k.clone(), Condition::parse(v).map_err(|e| (key.clone(), format!("{key}: {e}")))?);
        }
        Ok(Filters { min_size, max_aspect, columns })
    }

    pub fn is_empty(&self) -> bool {
        self.min_size.is_none() && self.max_aspect.is_none() && self.columns.is_empty()
    }

    /// Whether a row passes; `size` is its (width, height) from the metadata. A size filter on a
    /// row whose metadata has no size is an error (the filters must not decode every image).
    pub fn keep(&self, meta: &dyn Meta, size: Option<(u32, u32)>) -> Result<bool> {
        if self.min_size.is_some() || self.max_aspect.is_some() {
            let (w, h) = size.ok_or_else(|| anyhow!("data.min_size/data.max_aspect need the image's width and height in the metadata, and this row has none"))?;
            let (short, long) = (w.min(h), w.max(h));
            if self.min_size.is_some_and(|m| short < m) || short == 0 {
                return Ok(false);
            }
            if self.max_aspect.is_some_and(|a| long as f64 / short as f64 > a) {
                return Ok(false);
            }
        }
        Ok(self.columns.iter().all(|(k, c)| c.holds(meta.field(k).as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct M(serde_json::Value);
    impl Meta for M {
        fn field(&self, name: &str) -> Option<serde_json::Value> {
            self.0.get(name).cloned()
        }
    }

    #[test]
    fn filters_keep_what_the_conditions_say() {
        let f = Filters::from_config(Some(256), Some(2.0), &[("aesthetic".to_string(), ">= 6.5".to_string())].into()).unwrap();
        let m = M(serde_json::json!({"aesthetic": 6.5}));
        assert!(f.keep(&m, Some((300, 256))).unwrap());
        assert!(!f.keep(&m, Some((300, 255))).unwrap());
        assert!(!f.keep(&m, Some((600, 299))).unwrap());
        assert!(f.keep(&m, Some((600, 300))).unwrap());
        assert!(!f.keep(&m, Some((1000, 300))).unwrap());
        assert!(!f.keep(&M(serde_json::json!({"aesthetic": 6.4})), Some((300, 300))).unwrap());
        assert!(!f.keep(&M(serde_json::json!({})), Some((300, 300))).unwrap());
        assert!(f.keep(&m, None).is_err());
        let e = Filters::from_config(None, None, &[("x".to_string(), "about 3".to_string())].into()).unwrap_err();
        assert_eq!(e.0, "data.filter.x");
        assert!(Filters::from_config(None, Some(0.5), &BTreeMap::new()).is_err());
        assert!(Condition::parse("== en").unwrap().holds(Some(&serde_json::json!("en"))));
        assert!(Condition::parse(">= x").is_err());
    }
}
