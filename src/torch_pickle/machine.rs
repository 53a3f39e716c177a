//! The machine: reads the opcodes and applies each to its stack and memo. It interprets, never
//! executes: globals come only from the allow-list (`globals`), storages from the archive.
use super::archive::Storages;
use super::globals::{resolve_global, Global};
use super::obj::{drop_flat, obj_name, Instance, Obj};
use super::op::Op;
use super::rebuild::rebuild_tensor;
use anyhow::{anyhow, bail, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tch::Kind;

/// One pickle being read: its bytes and position, the stack and memo, and the file's storages.
pub(super) struct Unpickler<'d, 's, 'a> {
    data: &'d [u8],
    pos: usize,
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
    /// Every container that left the stack, kept until the unpickler is dropped (by `drop_flat`):
    /// a local dropping the last reference to a deeply nested value would recurse.
    popped: Vec<Obj>,
    storages: &'s mut Storages<'a>,
}

impl<'d, 's, 'a> Unpickler<'d, 's, 'a> {
    pub(super) fn new(data: &'d [u8], storages: &'s mut Storages<'a>) -> Self {
        Self { data, pos: 0, stack: vec![], memo: HashMap::new(), popped: vec![], storages }
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
            Some(o) => {
                self.keep(&o);
                Ok(o)
            }
        }
    }
    fn keep(&mut self, o: &Obj) {
        if matches!(o, Obj::List(_) | Obj::Tuple(_) | Obj::Dict(_) | Obj::Object(_)) {
            self.popped.push(o.clone());
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
        items.iter().for_each(|o| self.keep(o));
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

    pub(super) fn run(mut self) -> Result<Obj> {
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

impl Drop for Unpickler<'_, '_, '_> {
    fn drop(&mut self) {
        drop_flat(std::mem::take(&mut self.stack));
        drop_flat(self.memo.drain().map(|(_, o)| o).collect());
        drop_flat(std::mem::take(&mut self.popped));
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
