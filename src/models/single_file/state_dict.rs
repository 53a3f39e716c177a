//! The tensors of a single-file checkpoint, by name, read on demand.
use super::super::weights::{kind_of, MappedFile};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The tensors of a checkpoint file, by name, read on demand.
pub struct StateDict {
    path: PathBuf,
    shapes: BTreeMap<String, Vec<i64>>,
    store: Store,
}

enum Store {
    Mapped(MappedFile),
    /// A `.ckpt`, already unpickled.
    Memory(HashMap<String, Tensor>),
}

impl std::fmt::Debug for StateDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateDict({}, {} tensors)", self.path.display(), self.shapes.len())
    }
}

impl StateDict {
    /// A `.safetensors` file (its header is checked to cover the whole file, so a truncated
    /// download is refused here), or a `.ckpt` (a `torch.save` zip, read by `torch_pickle`,
    /// which refuses any pickle that asks for more than tensors and plain containers).
    pub fn open(path: &Path) -> Result<StateDict> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        match ext.as_str() {
            "safetensors" => {}
            "ckpt" | "pt" | "pth" => {
                let tensors = crate::torch_pickle::load_state_dict(path)?;
                return Ok(Self::from_tensors(path, tensors.into_iter().collect()));
            }
            _ => bail!("{}: not a single-file checkpoint (.safetensors or .ckpt)", path.display()),
        }
        let file = MappedFile::open(path)?;
        let shapes = {
            let st = file.parse()?;
            st.names()
                .into_iter()
                .map(|n| Ok((n.to_string(), st.tensor(n)?.shape().iter().map(|&d| d as i64).collect())))
                .collect::<Result<BTreeMap<_, _>>>()?
        };
        Ok(StateDict { path: path.to_path_buf(), shapes, store: Store::Mapped(file) })
    }

    /// Tensors already in memory (an unpickled `.ckpt`), named for messages by `path`.
    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> StateDict {
        let shapes = tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
        StateDict { path: path.to_path_buf(), shapes, store: Store::Memory(tensors) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(String::as_str)
    }

    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.shapes.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))
    }

    pub(super) fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.shapes.range(prefix.to_string()..).map(|(k, _)| k.as_str()).take_while(move |k| k.starts_with(prefix))
    }

    /// Calls `f` with a reader of single tensors (the safetensors header is parsed once).
    pub(super) fn read<R>(&self, f: impl FnOnce(&dyn Fn(&str) -> Result<Tensor>) -> Result<R>) -> Result<R> {
        match &self.store {
            Store::Mapped(file) => {
                let st: SafeTensors<'_> = file.parse()?;
                f(&|name: &str| {
                    let view = st.tensor(name).map_err(|e| anyhow!("{}: key {name}: {e}", self.path.display()))?;
                    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                    Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)
                        .with_context(|| format!("{}: key {name}", self.path.display()))
                })
            }
            Store::Memory(map) => f(&|name: &str| {
                map.get(name).map(Tensor::shallow_clone).ok_or_else(|| anyhow!("{}: no key {name}", self.path.display()))
            }),
        }
    }
}
