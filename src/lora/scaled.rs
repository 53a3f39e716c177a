//! `--lora FILE[:SCALE]`: a LoRA file and the scale its adapters are fused with.
use anyhow::{bail, Result};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A LoRA file with its scale (diffusers' `fuse_lora(lora_scale=…)`; 1 when not given).
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledLora {
    pub path: PathBuf,
    pub scale: f64,
}

impl ScaledLora {
    /// Parses `FILE[:SCALE]`. The text after the last `:` is the scale unless the whole argument
    /// names an existing file (a path may hold `:`); a scale that is not a finite number is
    /// refused naming it. Paths may be any bytes (not only UTF-8).
    pub fn parse(arg: &Path) -> Result<ScaledLora> {
        let bytes = arg.as_os_str().as_bytes();
        let split = bytes.iter().rposition(|&b| b == b':').filter(|_| !arg.is_file());
        let Some(i) = split else { return Ok(ScaledLora { path: arg.to_path_buf(), scale: 1.0 }) };
        let (file, scale) = (&bytes[..i], &bytes[i + 1..]);
        let text = String::from_utf8_lossy(scale);
        let value: Option<f64> = std::str::from_utf8(scale).ok().and_then(|s| s.trim().parse().ok());
        match value {
            Some(v) if v.is_finite() && !file.is_empty() => Ok(ScaledLora { path: PathBuf::from(OsStr::from_bytes(file)), scale: v }),
            Some(_) if file.is_empty() => bail!("{}: no file before the scale", arg.display()),
            _ => bail!("{}: the scale {text:?} after the last ':' is not a finite number (FILE[:SCALE], e.g. style.safetensors:0.8)", arg.display()),
        }
    }
}
