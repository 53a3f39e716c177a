//! Reads `torch.save` files (`.pth`, `.bin`, `.ckpt`) without Python and without running any of
//! their code.
//!
//! Since PyTorch 1.6 such a file is a zip holding `<archive>/data.pkl` (a pickle of the saved
//! object), one entry `<archive>/data/<key>` per storage, and `byteorder` / `version` entries.
//! The pickle refers to storages by `persistent_load` ids, `('storage', <storage type>, key,
//! location, numel)`, and rebuilds tensors through `torch._utils._rebuild_tensor_v2` (and `_v3`
//! for the dtypes without a typed storage).
//!
//! The pickle is interpreted, never executed: the opcodes build a [`Value`] tree, and a
//! `GLOBAL` / `STACK_GLOBAL` is resolved only against an allow-list (tensor rebuilding, storage
//! types, dtypes, `collections.OrderedDict`, and a few inert data classes Lightning checkpoints
//! carry, which become [`Value::Object`]). Any other global, such as `posix.system`, is refused
//! with an error naming it, before anything else is read.
//!
//! One file per concern: the zip container and its storages (`archive`), the allow-list of
//! globals (`globals`), the opcodes (`op`), the machine that applies them (`machine`) to the
//! objects on its stack (`obj`, dropped one container at a time), tensors rebuilt over storages
//! (`rebuild`), and the plain [`Value`] the caller gets (`value`).
mod archive;
mod globals;
mod machine;
mod obj;
mod op;
mod rebuild;
mod value;

pub use value::Value;

use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::Tensor;

/// The tensors of a torch file by name. A Lightning checkpoint (a dict with a `state_dict`
/// entry) gives that state dict; any other object gives its tensors flattened with dots.
pub fn load_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let value = load(path)?;
    let dict = match value.get("state_dict") {
        Some(sd @ Value::Dict(_)) => sd,
        _ => &value,
    };
    let tensors = dict.flatten_tensors().with_context(|| format!("reading {}", path.display()))?;
    if tensors.is_empty() {
        bail!("{} holds no tensors (a {} without any)", path.display(), value.type_name());
    }
    Ok(tensors)
}

/// The object a torch file holds.
pub fn load(path: &Path) -> Result<Value> {
    read(path).with_context(|| format!("reading the PyTorch file {}", path.display()))
}

fn read(path: &Path) -> Result<Value> {
    let map = archive::map(path)?;
    let (pickle, mut storages) = archive::open(&map)?;
    let root = machine::Unpickler::new(&pickle, &mut storages).run()?;
    let value = obj::to_value(&root, 0);
    obj::drop_flat(vec![root]);
    value
}
