//! Safetensors in and out, strictly. tch's `VarStore::load` ignores extra tensors and switches
//! the model's dtype to the file's; here every name must match, every shape must agree, and the
//! model keeps the dtype it was built with. Files are memory-mapped and copied one tensor at a
//! time, so loading never holds two copies of a model.
use anyhow::{anyhow, bail, Context, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Finds the weight files of a model folder: `<stem>.safetensors`, else the `.fp16` variant, else
/// the `.bf16` one (diffusers' `variant=`), each also sharded (`<stem>.safetensors.index.json`).
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    for variant in ["", ".fp16", ".bf16"] {
        let single = dir.join(format!("{stem}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}.safetensors.index{variant}.json"));
        let index_alt = dir.join(format!("{stem}{variant}.safetensors.index.json"));
        for index in [index, index_alt] {
            if index.is_file() {
                return shard_files(&index);
            }
        }
    }
    bail!(
        "no weights in {}: expected {stem}.safetensors, {stem}.fp16.safetensors, {stem}.bf16.safetensors or {stem}.safetensors.index.json",
        dir.display()
    )
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{}: no \"weight_map\" object", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .map(|v| v.as_str().map(|s| dir.join(s)).ok_or_else(|| anyhow!("{}: non-string shard name", index.display())))
        .collect::<Result<_>>()?;
    files.sort();
    files.dedup();
    Ok(files)
}

/// A memory-mapped safetensors file.
pub struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

impl MappedFile {
    /// The header's `__metadata__` (without reading any tensor).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", self.path.display()))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the file is opened read-only; a concurrent writer truncating it is outside what
        // any model loader can defend against (PyTorch's safetensors loader maps it the same way).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        Ok(MappedFile { path: path.to_path_buf(), mmap })
    }

    pub fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", self.path.display()))
    }
}

pub fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("unsupported safetensors dtype {other:?}"),
    })
}

pub fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("cannot store dtype {other:?} in safetensors"),
    })
}

/// A CPU tensor holding a copy of the view's data, in the file's dtype.
pub fn view_to_tensor(view: &TensorView<'_>) -> Result<Tensor> {
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)?)
}

/// Reads every tensor of a safetensors file (for small files: optimizer state, caches, tests).
pub fn read_all(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = MappedFile::open(path)?;
    let st = file.parse()?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let view = st.tensor(&name)?;
            Ok((name.clone(), view_to_tensor(&view).with_context(|| format!("{}: {name}", path.display()))?))
        })
        .collect()
}

/// What a strict load found wrong, reported as one error.
#[derive(Default)]
struct Mismatches {
    missing: Vec<String>,
    unexpected: Vec<String>,
    misshaped: Vec<String>,
    /// Integer or bool data for a floating model tensor.
    mistyped: Vec<String>,
}

impl Mismatches {
    fn into_result(self, what: &str) -> Result<()> {
        let mut parts = vec![];
        for (label, list) in
            [
            ("missing", &self.missing),
            ("unexpected", &self.unexpected),
            ("mis-shaped", &self.misshaped),
            ("not floating-point", &self.mistyped),
        ]
        {
            if !list.is_empty() {
                let shown: Vec<&str> = list.iter().take(5).map(String::as_str).collect();
                let more = if list.len() > 5 { ", ..." } else { "" };
                parts.push(format!("{} {label} ({}{more})", list.len(), shown.join(", ")));
            }
        }
        if parts.is_empty() {
            Ok(())
        } else {
            bail!("weights in {what} do not match the model: {}", parts.join("; "))
        }
    }
}

/// Copies the tensors of `files` into `vars` (name -> model tensor), converting each to the
/// model tensor's dtype. Every model tensor must be present exactly once with the same shape and
/// the files may hold nothing else.
pub fn load_strict(vars: &HashMap<String, Tensor>, files: &[PathBuf]) -> Result<()> {
    load_strict_mapped(vars, files, &|name| Some(name.to_string()))
}

/// `load_strict` where `map` gives the model name of each file tensor (legacy or prefixed
/// names), or `None` for a tensor to skip (e.g. a saved buffer). Two file tensors that map to
/// one model tensor are an error.
pub fn load_strict_mapped(
    vars: &HashMap<String, Tensor>,
    files: &[PathBuf],
    map: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    let what = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    let mut bad = Mismatches::default();
    let mut seen = std::collections::HashSet::new();
    for path in files {
        let file = MappedFile::open(path)?;
        let st = file.parse()?;
        let mut names: Vec<&str> = st.names();
        names.sort();
        for name in names {
            let Some(target) = map(name) else { continue };
            let Some(var) = vars.get(&target) else {
                bad.unexpected.push(name.to_string());
                continue;
            };
            if seen.contains(&target) {
                bad.unexpected.push(format!("{name} (a second copy of {target})"));
                continue;
            }
            let view = st.tensor(name)?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                bad.misshaped.push(format!("{name}: file {shape:?}, model {:?}", var.size()));
                continue;
            }
            // Casting integers or bools into weights would run and make images from garbage.
            let floating = matches!(view.dtype(), Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64);
            if var.is_floating_point() && !floating {
                bad.mistyped.push(format!("{name}: stored as {:?}", view.dtype()));
                continue;
            }
            let src = view_to_tensor(&view).with_context(|| format!("{}: {name}", path.display()))?;
            tch::no_grad(|| var.shallow_clone().copy_(&src));
            seen.insert(target);
        }
    }
    let mut missing: Vec<String> = vars.keys().filter(|k| !seen.contains(*k)).cloned().collect();
    missing.sort();
    bad.missing = missing;
    bad.into_result(&what)
}

/// Writes named tensors as one safetensors file with `format: pt` metadata (what diffusers and
/// transformers write), converting each to `kind` when given. The caller makes the write atomic.
pub fn save(path: &Path, tensors: &[(String, Tensor)], kind: Option<Kind>) -> Result<()> {
    save_with_metadata(path, tensors, kind, &BTreeMap::new())
}

/// `save` with more header metadata (a single file's ModelSpec keys).
pub fn save_with_metadata(path: &Path, tensors: &[(String, Tensor)], kind: Option<Kind>, extra: &BTreeMap<String, String>) -> Result<()> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(tch::Device::Cpu);
        let t = match kind {
            Some(k) if t.is_floating_point() => t.to_kind(k),
            _ => t,
        }
        .contiguous();
        let numel = t.numel();
        let dtype = dtype_of(t.kind())?;
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel).with_context(|| format!("copying {name} out of LibTorch"))?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?)))
        .collect::<Result<_>>()?;
    let mut metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    metadata.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// The dtype a var store's parameters are in (fp32 when it holds none).
pub fn var_kind(vs: &tch::nn::VarStore) -> tch::Kind {
    vs.variables().values().next().map_or(tch::Kind::Float, Tensor::kind)
}

/// The named parameters of a var store in a stable order.
pub fn named_tensors(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let map: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    map.into_iter().collect()
}
