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
use anyhow::{anyhow, bail, Context, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;
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

const MAX_DEPTH: usize = 512;

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
    let file = std::fs::File::open(path)?;
    let mut magic = [0u8; 4];
    let n = (&file).take(4).read(&mut magic)?;
    if n < 4 || &magic != b"PK\x03\x04" {
        if n >= 2 && magic[0] == 0x80 {
            bail!(
                "this is the legacy (before PyTorch 1.6) torch.save format, which sdkd does not read; \
                 re-save it with a current PyTorch: torch.save(torch.load(f), \"new.pth\")"
            );
        }
        bail!("not a torch.save file (no zip header)");
    }
    // SAFETY: the file is opened read-only and every storage is copied out of the map at once;
    // a concurrent writer truncating it is outside what any model loader can defend against
    // (models::weights maps safetensors files the same way).
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&map[..]))
        .map_err(|e| anyhow!("not a complete zip archive (truncated or damaged?): {e}"))?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .map(str::to_string)
        .ok_or_else(|| {
            let torchscript = zip.file_names().any(|n| n.ends_with("constants.pkl"));
            if torchscript {
                anyhow!("this is a TorchScript archive (torch.jit.save), not a torch.save file")
            } else {
                anyhow!("the zip has no data.pkl: not a torch.save file")
            }
        })?;
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or_default().to_string();
    let big_endian = match zip.by_name(&format!("{prefix}byteorder")) {
        Ok(mut f) => {
            let mut s = String::new();
            f.read_to_string(&mut s)?;
            match s.trim() {
                "little" => false,
                "big" => true,
                other => bail!("{prefix}byteorder says {other:?}, expected little or big"),
            }
        }
        Err(_) => false, // files before byteorder existed were written on little-endian machines
    };
    let pickle = read_entry(&mut zip, &map, &pkl_name)?;
    let mut storages = Storages { zip, map: &map, prefix, big_endian, loaded: HashMap::new() };
    let root = Unpickler::new(&pickle, &mut storages).run()?;
    to_value(&root, 0)
}

/// An entry's bytes: a slice of the map for stored entries (what torch writes), else decoded.
fn read_entry(zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, map: &[u8], name: &str) -> Result<Vec<u8>> {
    let mut f = zip.by_name(name).map_err(|e| anyhow!("entry {name}: {e}"))?;
    let size = f.size() as usize;
    if f.compression() == zip::CompressionMethod::Stored {
        let start = f.data_start() as usize;
        let bytes = map.get(start..start + size).ok_or_else(|| anyhow!("entry {name} runs past the end of the file (truncated?)"))?;
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::with_capacity(size.min(1 << 30));
    f.read_to_end(&mut out).map_err(|e| anyhow!("entry {name}: {e}"))?;
    Ok(out)
}

/// The storages of one file, each read once (tensors sharing a storage share its memory).
struct Storages<'a> {
    zip: zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
    map: &'a [u8],
    prefix: String,
    big_endian: bool,
    loaded: HashMap<String, Tensor>,
}

impl Storages<'_> {
    /// Storage `key` as a 1-D tensor of `kind` with `numel` elements.
    fn get(&mut self, key: &str, kind: Kind, numel: usize) -> Result<Tensor> {
        if let Some(t) = self.loaded.get(key) {
            if t.kind() != kind {
                bail!("storage {key} is used as both {:?} and {kind:?}", t.kind());
            }
            return Ok(t.shallow_clone());
        }
        let name = format!("{}data/{key}", self.prefix);
        let mut bytes = read_entry(&mut self.zip, self.map, &name)?;
        let elem = kind.elt_size_in_bytes();
        if bytes.len() != numel * elem {
            bail!("storage {name} holds {} bytes; the pickle expects {numel} × {elem}", bytes.len());
        }
        if self.big_endian && elem > 1 {
            let swap = if matches!(kind, Kind::ComplexFloat | Kind::ComplexDouble) { elem / 2 } else { elem };
            bytes.chunks_exact_mut(swap).for_each(|c| c.reverse());
        }
        let t = Tensor::f_from_data_size(&bytes, &[numel as i64], kind)?;
        self.loaded.insert(key.to_string(), t.shallow_clone());
        Ok(t)
    }
}

// ---------------------------------------------------------------------------------------------
// the pickle machine

/// The allow-listed globals: what each one means to the unpickler.
#[derive(Debug, Clone, PartialEq)]
enum Global {
    /// `collections.OrderedDict` and the dict subclasses checkpoints hold.
    DictClass,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` / `torch.nn.Parameter` as the `new_type` of `_rebuild_from_type_v2`.
    TensorType,
    /// A typed storage class (`torch.FloatStorage`), or `None` for `torch.UntypedStorage`.
    Storage(Option<Kind>),
    Dtype(Kind),
    /// `_codecs.encode`: how protocol 2 pickles `bytes`.
    CodecsEncode,
    /// `builtins.set` / `frozenset`: become lists.
    Set,
    /// `torch.Size`: a tuple.
    TorchSize,
    /// An inert data class, kept as [`Value::Object`].
    Inert(String),
}

/// The inert classes found in published checkpoints (SD `.ckpt` files carry Lightning callbacks
/// and numpy scalars). They are recorded, never instantiated.
const INERT_CLASSES: &[&str] = &[
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
    "argparse.Namespace",
    "torch.torch_version.TorchVersion",
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "torch.device",
];

const DICT_CLASSES: &[&str] = &[
    "collections.OrderedDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "builtins.dict",
    "__builtin__.dict",
];

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "DoubleStorage" => Kind::Double,
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        "ComplexFloatStorage" => Kind::ComplexFloat,
        "ComplexDoubleStorage" => Kind::ComplexDouble,
        _ => return None,
    })
}

fn dtype_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "float64" | "double" => Kind::Double,
        "float32" | "float" => Kind::Float,
        "float16" | "half" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "int64" | "long" => Kind::Int64,
        "int32" | "int" => Kind::Int,
        "int16" | "short" => Kind::Int16,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        "complex64" | "cfloat" => Kind::ComplexFloat,
        "complex128" | "cdouble" => Kind::ComplexDouble,
        "float8_e4m3fn" => Kind::Float8e4m3fn,
        "float8_e5m2" => Kind::Float8e5m2,
        "float8_e4m3fnuz" => Kind::Float8e4m3fnuz,
        "float8_e5m2fnuz" => Kind::Float8e5m2fnuz,
        _ => return None,
    })
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    let full = format!("{module}.{name}");
    if DICT_CLASSES.contains(&full.as_str()) {
        return Ok(Global::DictClass);
    }
    if INERT_CLASSES.contains(&full.as_str()) {
        return Ok(Global::Inert(full));
    }
    Ok(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "Tensor") | ("torch._tensor", "Tensor") | ("torch.nn.parameter", "Parameter") | ("torch.nn", "Parameter") => {
            Global::TensorType
        }
        ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") => Global::Storage(None),
        ("torch" | "torch.cuda", s) if storage_kind(s).is_some() => Global::Storage(storage_kind(s)),
        ("torch", d) if dtype_kind(d).is_some() => Global::Dtype(dtype_kind(d).unwrap()),
        ("_codecs", "encode") => Global::CodecsEncode,
        ("builtins" | "__builtin__", "set" | "frozenset") => Global::Set,
        ("torch", "Size") => Global::TorchSize,
        _ => bail!(
            "the pickle calls {full}, which is not on sdkd's allow-list of tensor-rebuilding globals; \
             a weights file must not run code, so sdkd refuses it"
        ),
    })
}

/// A value on the unpickler's stack. Lists and dicts are shared cells, as Python objects are, so
/// that a memoized container filled later (EMPTY_DICT, BINPUT, ..., SETITEMS) is seen full.
#[derive(Clone, Debug)]
enum Obj {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    BigInt(Vec<u8>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    List(Rc<RefCell<Vec<Obj>>>),
    Tuple(Rc<Vec<Obj>>),
    Dict(Rc<RefCell<Vec<(Obj, Obj)>>>),
    Global(Global),
    /// A storage from `persistent_load`: its 1-D tensor, in elements of its kind.
    Storage(Rc<Tensor>),
    Tensor(Rc<Tensor>),
    Object(Rc<RefCell<Instance>>),
}

/// An inert class's instance while unpickling: class name, constructor arguments, BUILD state.
#[derive(Debug)]
struct Instance {
    class: String,
    args: Vec<Obj>,
    state: Option<Obj>,
}

/// The pickle opcodes of protocols 0 to 5, named as Python's `pickletools` names them
/// (`BININT1` is `BinInt1`); `Unpickler::apply` reads each, or refuses it by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Proto,
    Frame,
    Stop,
    Mark,
    None,
    NewTrue,
    NewFalse,
    BinInt,
    BinInt1,
    BinInt2,
    Long1,
    Long4,
    Int,
    Long,
    BinFloat,
    Float,
    BinUnicode,
    ShortBinUnicode,
    BinUnicode8,
    Unicode,
    BinBytes,
    ShortBinBytes,
    BinBytes8,
    ByteArray8,
    BinString,
    ShortBinString,
    String,
    EmptyList,
    List,
    EmptyTuple,
    Tuple,
    Tuple1,
    Tuple2,
    Tuple3,
    EmptyDict,
    Dict,
    EmptySet,
    AddItems,
    FrozenSet,
    Append,
    Appends,
    SetItem,
    SetItems,
    BinPut,
    LongBinPut,
    Put,
    Memoize,
    BinGet,
    LongBinGet,
    Get,
    Pop,
    PopMark,
    Dup,
    Global,
    StackGlobal,
    BinPersId,
    PersId,
    Reduce,
    NewObj,
    NewObjEx,
    Build,
    Ext1,
    Ext2,
    Ext4,
    NextBuffer,
    ReadOnlyBuffer,
}

impl Op {
    fn from_byte(b: u8) -> Option<Op> {
        use Op::*;
        Some(match b {
            0x80 => Proto,
            0x95 => Frame,
            b'.' => Stop,
            b'(' => Mark,
            b'N' => None,
            0x88 => NewTrue,
            0x89 => NewFalse,
            b'J' => BinInt,
            b'K' => BinInt1,
            b'M' => BinInt2,
            0x8a => Long1,
            0x8b => Long4,
            b'I' => Int,
            b'L' => Long,
            b'G' => BinFloat,
            b'F' => Float,
            b'X' => BinUnicode,
            0x8c => ShortBinUnicode,
            0x8d => BinUnicode8,
            b'V' => Unicode,
            b'B' => BinBytes,
            b'C' => ShortBinBytes,
            0x8e => BinBytes8,
            0x96 => ByteArray8,
            b'T' => BinString,
            b'U' => ShortBinString,
            b'S' => String,
            b']' => EmptyList,
            b'l' => List,
            b')' => EmptyTuple,
            b't' => Tuple,
            0x85 => Tuple1,
            0x86 => Tuple2,
            0x87 => Tuple3,
            b'}' => EmptyDict,
            b'd' => Dict,
            0x8f => EmptySet,
            0x90 => AddItems,
            0x91 => FrozenSet,
            b'a' => Append,
            b'e' => Appends,
            b's' => SetItem,
            b'u' => SetItems,
            b'q' => BinPut,
            b'r' => LongBinPut,
            b'p' => Put,
            0x94 => Memoize,
            b'h' => BinGet,
            b'j' => LongBinGet,
            b'g' => Get,
            b'0' => Pop,
            b'1' => PopMark,
            b'2' => Dup,
            b'c' => Global,
            0x93 => StackGlobal,
            b'Q' => BinPersId,
            b'P' => PersId,
            b'R' => Reduce,
            0x81 => NewObj,
            0x92 => NewObjEx,
            b'b' => Build,
            0x82 => Ext1,
            0x83 => Ext2,
            0x84 => Ext4,
            0x97 => NextBuffer,
            0x98 => ReadOnlyBuffer,
            _ => return Option::None,
        })
    }
}

struct Unpickler<'d, 's, 'a> {
    data: &'d [u8],
    pos: usize,
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
    storages: &'s mut Storages<'a>,
}

impl<'d, 's, 'a> Unpickler<'d, 's, 'a> {
    fn new(data: &'d [u8], storages: &'s mut Storages<'a>) -> Self {
        Self { data, pos: 0, stack: vec![], memo: HashMap::new(), storages }
    }

    fn take(&mut self, n: usize) -> Result<&'d [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| anyhow!("the pickle ends early at byte {} (truncated?)", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'d str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow!("the pickle ends inside a text field (truncated?)"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("a text field of the pickle is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<Obj> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| anyhow!("a string of the pickle is not UTF-8"))?;
        Ok(Obj::Str(s.into()))
    }

    fn pop(&mut self) -> Result<Obj> {
        match self.stack.pop() {
            Some(Obj::Mark) | None => bail!("the pickle pops an empty stack at byte {}", self.pos),
            Some(o) => Ok(o),
        }
    }
    fn top(&mut self) -> Result<&mut Obj> {
        self.stack.last_mut().ok_or_else(|| anyhow!("the pickle reads an empty stack"))
    }
    /// Everything above the topmost mark, removing the mark.
    fn pop_mark(&mut self) -> Result<Vec<Obj>> {
        let at = self.stack.iter().rposition(|o| matches!(o, Obj::Mark)).ok_or_else(|| anyhow!("the pickle has no MARK to pop to"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn memo_get(&self, i: u32) -> Result<Obj> {
        self.memo.get(&i).cloned().ok_or_else(|| anyhow!("the pickle reads memo entry {i}, never stored"))
    }
    fn memo_put(&mut self, i: u32) -> Result<()> {
        let v = self.stack.last().filter(|o| !matches!(o, Obj::Mark)).cloned().ok_or_else(|| anyhow!("the pickle memoizes an empty stack"))?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn run(mut self) -> Result<Obj> {
        loop {
            let byte = self.u8()?;
            let op = Op::from_byte(byte).ok_or_else(|| anyhow!("unknown pickle opcode 0x{byte:02x} at byte {}", self.pos - 1))?;
            if op == Op::Stop {
                return self.pop();
            }
            self.apply(op)?;
        }
    }

    /// One opcode's effect on the stack and the memo (`Stop` is `run`'s).
    fn apply(&mut self, op: Op) -> Result<()> {
        use Op::*;
        match op {
            Proto => {
                let proto = self.u8()?;
                if proto > 5 {
                    bail!("pickle protocol {proto} is newer than 5");
                }
            }
            Frame => {
                self.u64()?; // a length hint
            }
            None | NewTrue | NewFalse | BinInt | BinInt1 | BinInt2 | Long1 | Long4 | Int | Long | BinFloat | Float => {
                let v = self.number(op)?;
                self.stack.push(v)
            }
            BinUnicode | ShortBinUnicode | BinUnicode8 | Unicode | BinBytes | ShortBinBytes | BinBytes8 | ByteArray8 | BinString
            | ShortBinString | String => {
                let v = self.text(op)?;
                self.stack.push(v)
            }
            Mark | EmptyList | List | EmptyTuple | Tuple | Tuple1 | Tuple2 | Tuple3 | EmptyDict | Dict | EmptySet | AddItems
            | FrozenSet | Append | Appends | SetItem | SetItems => self.container(op)?,
            BinPut | LongBinPut | Put | Memoize | BinGet | LongBinGet | Get | Pop | PopMark | Dup => self.memo_or_stack(op)?,
            Global | StackGlobal | BinPersId | PersId | Reduce | NewObj | NewObjEx | Build => self.object(op)?,
            Ext1 | Ext2 | Ext4 => bail!("the pickle uses the extension registry (EXT opcodes), which torch.save never writes"),
            NextBuffer | ReadOnlyBuffer => bail!("out-of-band pickle buffers are not what torch.save writes"),
            Stop => unreachable!("run returns at STOP"),
        }
        Ok(())
    }

    /// The value of a number opcode (None and the booleans too).
    fn number(&mut self, op: Op) -> Result<Obj> {
        Ok(match op {
            Op::None => Obj::None,
            Op::NewTrue => Obj::Bool(true),
            Op::NewFalse => Obj::Bool(false),
            Op::BinInt => Obj::Int(i32::from_le_bytes(self.take(4)?.try_into().unwrap()) as i64),
            Op::BinInt1 => Obj::Int(self.u8()? as i64),
            Op::BinInt2 => Obj::Int(self.u16()? as i64),
            Op::Long1 | Op::Long4 => {
                let n = if op == Op::Long1 { self.u8()? as usize } else { self.u32()? as usize };
                long_from_bytes(self.take(n)?)
            }
            Op::Int => {
                let l = self.line()?;
                match l {
                    "00" => Obj::Bool(false),
                    "01" => Obj::Bool(true),
                    _ => Obj::Int(l.parse().map_err(|_| anyhow!("bad INT {l:?} in the pickle"))?),
                }
            }
            Op::Long => {
                let l = self.line()?;
                Obj::Int(l.trim_end_matches('L').parse().map_err(|_| anyhow!("LONG {l:?} beyond 64 bits in the pickle"))?)
            }
            Op::BinFloat => Obj::Float(f64::from_be_bytes(self.take(8)?.try_into().unwrap())),
            Op::Float => {
                let l = self.line()?;
                Obj::Float(l.parse().map_err(|_| anyhow!("bad FLOAT {l:?} in the pickle"))?)
            }
            _ => unreachable!("{op:?} is no number"),
        })
    }

    /// The value of a string or bytes opcode.
    fn text(&mut self, op: Op) -> Result<Obj> {
        Ok(match op {
            Op::BinUnicode => {
                let n = self.u32()? as usize;
                self.utf8(n)?
            }
            Op::ShortBinUnicode => {
                let n = self.u8()? as usize;
                self.utf8(n)?
            }
            Op::BinUnicode8 => {
                let n = usize::try_from(self.u64()?)?;
                self.utf8(n)?
            }
            Op::Unicode => Obj::Str(self.line()?.into()),
            Op::BinBytes | Op::BinString => {
                let n = self.u32()? as usize;
                Obj::Bytes(self.take(n)?.into())
            }
            Op::ShortBinBytes | Op::ShortBinString => {
                let n = self.u8()? as usize;
                Obj::Bytes(self.take(n)?.into())
            }
            Op::BinBytes8 | Op::ByteArray8 => {
                let n = usize::try_from(self.u64()?)?;
                Obj::Bytes(self.take(n)?.into())
            }
            Op::String => {
                // a protocol-0 quoted byte string; torch never writes it, only plain ones kept
                let l = self.line()?;
                Obj::Str(l.trim_matches(|c| c == '\'' || c == '"').into())
            }
            _ => unreachable!("{op:?} is no string"),
        })
    }

    /// Marks, lists, tuples, dicts and sets: made, or filled in place.
    fn container(&mut self, op: Op) -> Result<()> {
        let list = |items: Vec<Obj>| Obj::List(Rc::new(RefCell::new(items)));
        match op {
            Op::Mark => self.stack.push(Obj::Mark),
            Op::EmptyList | Op::EmptySet => self.stack.push(list(vec![])),
            Op::List | Op::FrozenSet => {
                let items = self.pop_mark()?;
                self.stack.push(list(items))
            }
            Op::EmptyTuple => self.stack.push(Obj::Tuple(Rc::new(vec![]))),
            Op::Tuple => {
                let items = self.pop_mark()?;
                self.stack.push(Obj::Tuple(Rc::new(items)))
            }
            Op::Tuple1 | Op::Tuple2 | Op::Tuple3 => {
                let n = match op {
                    Op::Tuple1 => 1,
                    Op::Tuple2 => 2,
                    _ => 3,
                };
                if self.stack.len() < n || self.stack[self.stack.len() - n..].iter().any(|o| matches!(o, Obj::Mark)) {
                    bail!("TUPLE{n} on a short stack");
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Obj::Tuple(Rc::new(items)))
            }
            Op::EmptyDict => self.stack.push(Obj::Dict(Rc::new(RefCell::new(vec![])))),
            Op::Dict => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.stack.push(Obj::Dict(Rc::new(RefCell::new(pairs))))
            }
            Op::AddItems | Op::Appends => {
                let items = self.pop_mark()?;
                append(self.top()?, items)?
            }
            Op::Append => {
                let v = self.pop()?;
                append(self.top()?, vec![v])?
            }
            Op::SetItem => {
                let v = self.pop()?;
                let k = self.pop()?;
                set_items(self.top()?, vec![(k, v)])?
            }
            Op::SetItems => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                set_items(self.top()?, pairs)?
            }
            _ => unreachable!("{op:?} is no container opcode"),
        }
        Ok(())
    }

    /// The memo's PUT and GET opcodes, and POP, POP_MARK and DUP.
    fn memo_or_stack(&mut self, op: Op) -> Result<()> {
        match op {
            Op::BinPut => {
                let i = self.u8()? as u32;
                self.memo_put(i)?
            }
            Op::LongBinPut => {
                let i = self.u32()?;
                self.memo_put(i)?
            }
            Op::Put => {
                let i = self.line()?.parse().map_err(|_| anyhow!("bad PUT index in the pickle"))?;
                self.memo_put(i)?
            }
            Op::Memoize => {
                let i = self.memo.len() as u32;
                self.memo_put(i)?
            }
            Op::BinGet | Op::LongBinGet | Op::Get => {
                let i = match op {
                    Op::BinGet => self.u8()? as u32,
                    Op::LongBinGet => self.u32()?,
                    _ => self.line()?.parse().map_err(|_| anyhow!("bad GET index in the pickle"))?,
                };
                let v = self.memo_get(i)?;
                self.stack.push(v)
            }
            Op::Pop => {
                self.pop()?;
            }
            Op::PopMark => {
                self.pop_mark()?;
            }
            Op::Dup => {
                let v = self.top()?.clone();
                self.stack.push(v)
            }
            _ => unreachable!("{op:?} is no memo or stack opcode"),
        }
        Ok(())
    }

    /// Globals (allow-listed only, `resolve_global`), storages, calls and BUILD.
    fn object(&mut self, op: Op) -> Result<()> {
        let v = match op {
            Op::Global => {
                let module = self.line()?;
                let name = self.line()?;
                Obj::Global(resolve_global(module, name)?)
            }
            Op::StackGlobal => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Obj::Str(module), Obj::Str(name)) = (module, name) else { bail!("STACK_GLOBAL without two strings") };
                Obj::Global(resolve_global(&module, &name)?)
            }
            Op::BinPersId => {
                let pid = self.pop()?;
                self.persistent_load(pid)?
            }
            Op::PersId => bail!("text persistent ids (PERSID) are not what torch.save writes"),
            Op::Reduce | Op::NewObj | Op::NewObjEx => {
                if op == Op::NewObjEx {
                    let _kwargs = self.pop()?;
                }
                let args = self.pop()?;
                let func = self.pop()?;
                let name = match op {
                    Op::Reduce => "REDUCE",
                    Op::NewObj => "NEWOBJ",
                    _ => "NEWOBJ_EX",
                };
                let Obj::Tuple(args) = args else { bail!("{name} with arguments that are not a tuple") };
                self.call(func, &args)?
            }
            Op::Build => {
                let state = self.pop()?;
                return build(self.top()?, state);
            }
            _ => unreachable!("{op:?} is no object opcode"),
        };
        self.stack.push(v);
        Ok(())
    }

    /// `('storage', storage type, key, location, numel)` → the storage's 1-D tensor.
    fn persistent_load(&mut self, pid: Obj) -> Result<Obj> {
        let Obj::Tuple(t) = pid else { bail!("a persistent id that is not a tuple") };
        let [Obj::Str(tag), Obj::Global(Global::Storage(kind)), Obj::Str(key), _location, Obj::Int(numel)] = &t[..] else {
            bail!("a persistent id of an unknown form: {:?}", t)
        };
        if &**tag != "storage" {
            bail!("a persistent id tagged {tag:?}, not 'storage'");
        }
        if key.contains('/') || key.contains("..") {
            bail!("a storage key {key:?} outside the data folder");
        }
        let numel = usize::try_from(*numel).map_err(|_| anyhow!("storage {key} has a negative size"))?;
        // an untyped storage counts bytes; _rebuild_tensor_v3 reinterprets it with its dtype
        let t = self.storages.get(key, kind.unwrap_or(Kind::Uint8), numel)?;
        Ok(Obj::Storage(Rc::new(t)))
    }

    fn call(&mut self, func: Obj, args: &[Obj]) -> Result<Obj> {
        let Obj::Global(g) = func else { bail!("the pickle calls a {} , not a global", obj_name(&func)) };
        match g {
            Global::DictClass => {
                let items = match args {
                    [] => vec![],
                    [Obj::Dict(d)] => d.borrow().clone(),
                    [Obj::List(l)] => pairs_of_tuples(&l.borrow())?,
                    _ => bail!("OrderedDict built from unexpected arguments"),
                };
                Ok(Obj::Dict(Rc::new(RefCell::new(items))))
            }
            Global::RebuildTensorV2 => match args {
                [storage, offset, size, stride, _requires_grad, _hooks, ..] => rebuild_tensor(storage, offset, size, stride, None),
                _ => bail!("_rebuild_tensor_v2 with {} arguments", args.len()),
            },
            Global::RebuildTensorV3 => match args {
                [storage, offset, size, stride, _requires_grad, _hooks, Obj::Global(Global::Dtype(kind)), ..] => {
                    rebuild_tensor(storage, offset, size, stride, Some(*kind))
                }
                _ => bail!("_rebuild_tensor_v3 with unexpected arguments"),
            },
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(t @ Obj::Tensor(_)) => Ok(t.clone()),
                _ => bail!("_rebuild_parameter without a tensor"),
            },
            Global::RebuildFromTypeV2 => match args {
                [inner, Obj::Global(Global::TensorType), Obj::Tuple(inner_args), _state] => self.call(inner.clone(), inner_args),
                [_, other, ..] => bail!("_rebuild_from_type_v2 of the tensor subclass {}", obj_name(other)),
                _ => bail!("_rebuild_from_type_v2 with {} arguments", args.len()),
            },
            Global::CodecsEncode => match args {
                [Obj::Str(s), Obj::Str(enc)] if &**enc == "latin1" || &**enc == "latin-1" => {
                    let bytes = s.chars().map(|c| u8::try_from(c as u32)).collect::<Result<Vec<u8>, _>>()?;
                    Ok(Obj::Bytes(bytes.into()))
                }
                [Obj::Str(s), ..] => Ok(Obj::Bytes(s.as_bytes().into())),
                _ => bail!("_codecs.encode with unexpected arguments"),
            },
            Global::Set => match args {
                [] => Ok(Obj::List(Rc::new(RefCell::new(vec![])))),
                [Obj::List(l)] => Ok(Obj::List(Rc::new(RefCell::new(l.borrow().clone())))),
                [Obj::Tuple(t)] => Ok(Obj::List(Rc::new(RefCell::new(t.to_vec())))),
                _ => bail!("set built from unexpected arguments"),
            },
            Global::TorchSize => match args {
                [] => Ok(Obj::Tuple(Rc::new(vec![]))),
                [Obj::Tuple(t)] => Ok(Obj::Tuple(t.clone())),
                [Obj::List(l)] => Ok(Obj::Tuple(Rc::new(l.borrow().clone()))),
                _ => bail!("torch.Size built from unexpected arguments"),
            },
            Global::Inert(class) => Ok(Obj::Object(Rc::new(RefCell::new(Instance { class, args: args.to_vec(), state: None })))),
            Global::TensorType | Global::Storage(_) | Global::Dtype(_) => bail!("the pickle calls {g:?}, which torch.save never does"),
        }
    }
}

fn obj_name(o: &Obj) -> String {
    match o {
        Obj::Global(g) => format!("{g:?}"),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

fn long_from_bytes(b: &[u8]) -> Obj {
    if b.len() <= 8 {
        let neg = b.last().is_some_and(|&x| x & 0x80 != 0);
        let mut buf = if neg { [0xff; 8] } else { [0; 8] };
        buf[..b.len()].copy_from_slice(b);
        Obj::Int(i64::from_le_bytes(buf))
    } else {
        Obj::BigInt(b.to_vec())
    }
}

fn pairs(items: Vec<Obj>) -> Result<Vec<(Obj, Obj)>> {
    if !items.len().is_multiple_of(2) {
        bail!("SETITEMS with an odd number of items");
    }
    let mut it = items.into_iter();
    let mut out = vec![];
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn pairs_of_tuples(items: &[Obj]) -> Result<Vec<(Obj, Obj)>> {
    items
        .iter()
        .map(|o| match o {
            Obj::Tuple(t) if t.len() == 2 => Ok((t[0].clone(), t[1].clone())),
            Obj::List(l) if l.borrow().len() == 2 => Ok((l.borrow()[0].clone(), l.borrow()[1].clone())),
            _ => bail!("a dict item that is not a pair"),
        })
        .collect()
}

fn append(target: &mut Obj, items: Vec<Obj>) -> Result<()> {
    match target {
        Obj::List(l) => {
            l.borrow_mut().extend(items);
            Ok(())
        }
        other => bail!("APPEND to a {}", obj_name(other)),
    }
}

fn set_items(target: &mut Obj, items: Vec<(Obj, Obj)>) -> Result<()> {
    match target {
        Obj::Dict(d) => {
            let mut d = d.borrow_mut();
            for (k, v) in items {
                // Python's dict semantics: a repeated key keeps its place and takes the new value
                match d.iter_mut().find(|(old, _)| same_key(old, &k)) {
                    Some(slot) => slot.1 = v,
                    None => d.push((k, v)),
                }
            }
            Ok(())
        }
        other => bail!("SETITEMS on a {}", obj_name(other)),
    }
}

fn same_key(a: &Obj, b: &Obj) -> bool {
    match (a, b) {
        (Obj::Str(a), Obj::Str(b)) => a == b,
        (Obj::Int(a), Obj::Int(b)) => a == b,
        (Obj::Bool(a), Obj::Bool(b)) => a == b,
        _ => false,
    }
}

/// BUILD: set state on the object below it. Dicts take a dict state's items as attributes
/// (OrderedDict's `_metadata`): dropped, as a state dict's tensors are the items. Objects keep it.
fn build(target: &mut Obj, state: Obj) -> Result<()> {
    match target {
        Obj::Object(o) => {
            o.borrow_mut().state = Some(state);
            Ok(())
        }
        Obj::Dict(_) | Obj::Tensor(_) => Ok(()),
        other => bail!("BUILD on a {}", obj_name(other)),
    }
}

fn int_list(o: &Obj, what: &str) -> Result<Vec<i64>> {
    match o {
        Obj::Tuple(t) => t.iter().map(|x| match x {
            Obj::Int(i) => Ok(*i),
            _ => bail!("a tensor {what} entry that is not an int"),
        }).collect(),
        Obj::List(l) => int_list(&Obj::Tuple(Rc::new(l.borrow().clone())), what),
        _ => bail!("a tensor {what} that is not a tuple"),
    }
}

/// `storage.as_strided(size, stride, offset)`, checked to stay inside the storage.
fn rebuild_tensor(storage: &Obj, offset: &Obj, size: &Obj, stride: &Obj, dtype: Option<Kind>) -> Result<Obj> {
    let Obj::Storage(storage) = storage else { bail!("a tensor rebuilt from a {} , not a storage", obj_name(storage)) };
    let Obj::Int(offset) = *offset else { bail!("a tensor storage offset that is not an int") };
    let size = int_list(size, "size")?;
    let stride = int_list(stride, "stride")?;
    if size.len() != stride.len() {
        bail!("a tensor with {} sizes and {} strides", size.len(), stride.len());
    }
    let storage: Tensor = match dtype {
        // _rebuild_tensor_v3: an untyped (byte) storage seen as `kind`
        Some(kind) if storage.kind() != kind => {
            let elem = kind.elt_size_in_bytes() as i64;
            let bytes = storage.size()[0];
            if storage.kind() != Kind::Uint8 || bytes % elem != 0 {
                bail!("a {kind:?} tensor over a storage of {bytes} {:?} elements", storage.kind());
            }
            storage.f_view_dtype(kind)?
        }
        _ => storage.shallow_clone(),
    };
    let numel = storage.size()[0];
    if offset < 0 || size.iter().any(|&s| s < 0) || stride.iter().any(|&s| s < 0) {
        bail!("a tensor with a negative size, stride or offset");
    }
    if size.iter().all(|&s| s > 0) {
        let last = size.iter().zip(&stride).try_fold(offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?));
        if last.is_none_or(|l| l >= numel) {
            bail!("a tensor of size {size:?} stride {stride:?} offset {offset} reaches past its storage of {numel} elements");
        }
    }
    Ok(Obj::Tensor(Rc::new(storage.f_as_strided(&size, &stride, offset)?)))
}

fn to_value(o: &Obj, depth: usize) -> Result<Value> {
    if depth > MAX_DEPTH {
        bail!("the object nests deeper than {MAX_DEPTH} levels (or refers to itself)");
    }
    let all = |v: &[Obj]| v.iter().map(|x| to_value(x, depth + 1)).collect::<Result<Vec<_>>>();
    Ok(match o {
        Obj::Mark => bail!("a MARK left in the object"),
        Obj::None => Value::None,
        Obj::Bool(b) => Value::Bool(*b),
        Obj::Int(i) => Value::Int(*i),
        Obj::BigInt(b) => Value::BigInt(b.clone()),
        Obj::Float(f) => Value::Float(*f),
        Obj::Str(s) => Value::Str(s.to_string()),
        Obj::Bytes(b) => Value::Bytes(b.to_vec()),
        Obj::List(l) => Value::List(all(&l.borrow())?),
        Obj::Tuple(t) => Value::Tuple(all(t)?),
        Obj::Dict(d) => Value::Dict(
            d.borrow().iter().map(|(k, v)| Ok((to_value(k, depth + 1)?, to_value(v, depth + 1)?))).collect::<Result<_>>()?,
        ),
        Obj::Tensor(t) => Value::Tensor(t.shallow_clone()),
        Obj::Storage(t) => Value::Tensor(t.shallow_clone()),
        Obj::Global(Global::Dtype(k)) => Value::Dtype(*k),
        // a class referred to but never called
        Obj::Global(Global::Inert(class)) => Value::Object { class: class.clone(), args: vec![], state: None },
        Obj::Global(g) => Value::Object { class: format!("{g:?}"), args: vec![], state: None },
        Obj::Object(o) => {
            let o = o.borrow();
            Value::Object {
                class: o.class.clone(),
                args: all(&o.args)?,
                state: o.state.as_ref().map(|s| to_value(s, depth + 1)).transpose()?.map(Box::new),
            }
        }
    })
}
