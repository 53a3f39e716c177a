//! The object a torch file holds as plain data, and its tensors flattened to dotted names.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};


/// The object a torch file holds, as plain data.
#[derive(Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond i64, as pickle stores it: little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict (also `OrderedDict` and dict subclasses), in the file's order.
    Dict(Vec<(Value, Value)>),
    Tensor(Tensor),
    /// A dtype (`torch.float16`, ...), as `_rebuild_tensor_v3` and some configs hold them.
    Dtype(Kind),
    /// An instance of an allow-listed inert class (numpy scalars, Lightning callbacks, ...):
    /// the class's dotted name, the arguments it was built from and the state set on it.
    Object { class: String, args: Vec<Value>, state: Option<Box<Value>> },
}

impl Value {
    /// The entry `key` of a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// What kind of value this is, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Tensor(_) => "tensor",
            Value::Dtype(_) => "dtype",
            Value::Object { .. } => "object",
        }
    }

    /// Every tensor of the tree under dotted names: dict keys and list/tuple indices joined with
    /// dots (`model.diffusion_model.input_blocks.0.0.weight`); other leaves are skipped.
    pub fn flatten_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        flatten(self, "", &mut out, 0)?;
        let mut seen = std::collections::HashSet::new();
        for (name, _) in &out {
            if !seen.insert(name.as_str()) {
                bail!("two tensors flatten to the name {name:?}");
            }
        }
        Ok(out)
    }
}

fn flatten(value: &Value, prefix: &str, out: &mut Vec<(String, Tensor)>, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!("the object nests deeper than {MAX_DEPTH} levels");
    }
    let join = |key: &str| if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
    match value {
        Value::Tensor(t) => out.push((prefix.to_string(), t.shallow_clone())),
        Value::Dict(items) => {
            for (k, v) in items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    other => bail!("a dict under {prefix:?} has a {} key; state dicts have string keys", other.type_name()),
                };
                flatten(v, &join(&key), out, depth + 1)?;
            }
        }
        Value::List(items) | Value::Tuple(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(v, &join(&i.to_string()), out, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// How deep a value may nest (a hostile pickle nests far deeper).
pub(super) const MAX_DEPTH: usize = 512;
