//! The zip container of `torch.save` (PyTorch 1.6 and later): `<archive>/data.pkl`, one entry
//! `<archive>/data/<key>` per storage, and `byteorder`. Storages are read once each, as 1-D
//! tensors.
use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

/// The file mapped into memory, after checking it is a zip (and not the legacy format).
pub(super) fn map(path: &Path) -> Result<memmap2::Mmap> {
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
    Ok(unsafe { memmap2::Mmap::map(&file)? })
}

/// The pickle's bytes and the storages of the zip in `map`.
pub(super) fn open(map: &[u8]) -> Result<(Vec<u8>, Storages<'_>)> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(map))
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
    let pickle = read_entry(&mut zip, map, &pkl_name)?;
    Ok((pickle, Storages { zip, map, prefix, big_endian, loaded: HashMap::new() }))
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
pub(super) struct Storages<'a> {
    zip: zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
    map: &'a [u8],
    prefix: String,
    big_endian: bool,
    loaded: HashMap<String, Tensor>,
}

impl Storages<'_> {
    /// Storage `key` as a 1-D tensor of `kind` with `numel` elements.
    pub(super) fn get(&mut self, key: &str, kind: Kind, numel: usize) -> Result<Tensor> {
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
