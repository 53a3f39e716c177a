//! The allow-list: the globals a torch pickle may name, and what each means to the machine.
//! Any other global is refused by name before anything else is read.
use anyhow::{bail, Result};
use tch::Kind;

/// The allow-listed globals: what each one means to the unpickler.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Global {
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

pub(super) fn resolve_global(module: &str, name: &str) -> Result<Global> {
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
