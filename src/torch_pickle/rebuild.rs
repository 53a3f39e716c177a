//! Tensors rebuilt over storages (`_rebuild_tensor_v2`/`_v3`), checked to stay inside them.
use super::obj::{obj_name, Obj};
use anyhow::{bail, Result};
use std::rc::Rc;
use tch::{Kind, Tensor};

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
pub(super) fn rebuild_tensor(storage: &Obj, offset: &Obj, size: &Obj, stride: &Obj, dtype: Option<Kind>) -> Result<Obj> {
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
