//! The objects on the machine's stack, dropped one container at a time (`drop_flat`), and turned
//! into the caller's [`Value`] with a depth limit.
use super::globals::Global;
use super::value::{Value, MAX_DEPTH};
use anyhow::{bail, Result};
use std::cell::RefCell;
use std::rc::Rc;
use tch::Tensor;

/// A value on the unpickler's stack. Lists and dicts are shared cells, as Python objects are, so
/// that a memoized container filled later (EMPTY_DICT, BINPUT, ..., SETITEMS) is seen full.
#[derive(Clone, Debug)]
pub(super) enum Obj {
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
pub(super) struct Instance {
    pub(super) class: String,
    pub(super) args: Vec<Obj>,
    pub(super) state: Option<Obj>,
}

/// Drops `objs` and what only they hold one container at a time: a hostile pickle nests
/// containers hundreds of thousands deep (refused by `to_value`'s depth check), and dropping
/// them recursively would overflow the stack.
pub(super) fn drop_flat(mut objs: Vec<Obj>) {
    while let Some(o) = objs.pop() {
        match o {
            Obj::List(l) => objs.extend(Rc::try_unwrap(l).map(RefCell::into_inner).unwrap_or_default()),
            Obj::Tuple(t) => objs.extend(Rc::try_unwrap(t).unwrap_or_default()),
            Obj::Dict(d) => objs.extend(Rc::try_unwrap(d).map(RefCell::into_inner).unwrap_or_default().into_iter().flat_map(|(k, v)| [k, v])),
            Obj::Object(i) => {
                if let Ok(i) = Rc::try_unwrap(i).map(RefCell::into_inner) {
                    objs.extend(i.args.into_iter().chain(i.state));
                }
            }
            _ => {}
        }
    }
}

pub(super) fn obj_name(o: &Obj) -> String {
    match o {
        Obj::Global(g) => format!("{g:?}"),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

pub(super) fn to_value(o: &Obj, depth: usize) -> Result<Value> {
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
