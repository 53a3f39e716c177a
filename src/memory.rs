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

/// A process's memory high-water mark over a stretch of work: on the CPU the kernel's VmHWM,
/// restarted by writing 5 to /proc/self/clear_refs (Linux 4.0+); on CUDA the caching allocator's
/// peak of live tensors, restarted through the shim. Both exclude what came before `start`,
/// except what is still held then (`before`).
pub struct PeakWindow {
    device: Device,
    /// Bytes held when the window started: resident set (CPU), allocated tensors (CUDA).
    pub before: i64,
    /// CPU: this program's peak RSS before the restart (what the restart forgets).
    pub rss_peak_before_start: Option<i64>,
    /// CPU: whether the tensor-byte counter of `crate::aten_extra::cpu_live_bytes_start` runs.
    counting: bool,
}

/// This program's peak resident set (VmHWM of /proc/self/status) in bytes. Unlike getrusage's
/// ru_maxrss it starts afresh at exec, so a parent's memory does not count.
pub fn peak_rss_bytes() -> Option<i64> {
    proc_status_bytes("VmHWM:")
}

/// `VmRSS`/`VmHWM` of /proc/self/status in bytes.
fn proc_status_bytes(key: &str) -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    Some(line.split_whitespace().nth(1)?.parse::<i64>().ok()? * 1024)
}

impl PeakWindow {
    pub fn start(device: Device) -> anyhow::Result<PeakWindow> {
        let rss_peak_before_start = peak_rss_bytes();
        let before = match device {
            Device::Cuda(i) => crate::aten_extra::cuda_memory_reset_peaks(i)?,
            _ => {
                crate::aten_extra::cpu_live_bytes_start()?;
                std::fs::write("/proc/self/clear_refs", "5").map_err(|e| anyhow::anyhow!("restarting the peak RSS (/proc/self/clear_refs): {e}"))?;
                proc_status_bytes("VmRSS:").ok_or_else(|| anyhow::anyhow!("/proc/self/status has no VmRSS"))?
            }
        };
        Ok(PeakWindow { device, before, rss_peak_before_start, counting: !device.is_cuda() })
    }

    /// The peak in bytes since `start`.
    pub fn peak(&self) -> anyhow::Result<i64> {
        match self.device {
            Device::Cuda(i) => Ok(crate::aten_extra::cuda_memory_peaks(i)?.0),
            _ => proc_status_bytes("VmHWM:").ok_or_else(|| anyhow::anyhow!("/proc/self/status has no VmHWM")),
        }
    }

    /// CPU: the peak bytes of the tensors allocated since `start` and live at once (what a
    /// step's gradients, activations and temporaries take, without the allocator's slack and
    /// fragmentation that the peak RSS includes). None on CUDA (the allocator's peak is that).
    pub fn tensor_peak(&self) -> anyhow::Result<Option<i64>> {
        if !self.counting {
            return Ok(None);
        }
        Ok(Some(crate::aten_extra::cpu_live_bytes()?.1))
    }

    pub fn what(&self) -> &'static str {
        match self.device {
            Device::Cuda(_) => "CUDA caching allocator: peak of live tensors during the steps (warm-up included), reset before them",
            _ => "peak RSS during the steps (warm-up included): VmHWM after a reset through /proc/self/clear_refs before them",
        }
    }
}

impl Drop for PeakWindow {
    fn drop(&mut self) {
        if self.counting {
            // the counter is removed from this thread; its last reading no longer matters
            let _ = crate::aten_extra::cpu_live_bytes_stop();
        }
    }
}
