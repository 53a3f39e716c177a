//! Whether a device can hold an allocation, asked before a user-sized one is made: LibTorch's and
//! Rust's failed allocations end the process (a panic or an abort), so sizes that come from a
//! config or a flag are checked against this first, and refused by name.
use tch::{Device, Kind, Tensor};

/// `MemAvailable` of /proc/meminfo in bytes (None where it cannot be read).
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whether `bytes` fit on `device`: on the CPU the memory available now (true where it cannot be
/// read), on an accelerator a trial allocation of that size, freed at once.
pub fn device_can_hold(device: Device, bytes: f64) -> bool {
    match device {
        Device::Cpu => available_bytes().is_none_or(|avail| bytes <= avail as f64),
        _ => bytes < i64::MAX as f64 && Tensor::f_empty([bytes as i64], (Kind::Uint8, device)).is_ok(),
    }
}
