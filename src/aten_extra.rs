//! LibTorch operators that tch 0.26 does not wrap, compiled from `csrc/aten_extra.cpp` against the
//! same LibTorch: PyTorch's fused AdamW kernel, the multi-tensor gradient clipping of
//! `clip_grad_norm_`, `zero_grad(set_to_none=True)`, the CUDA caching allocator's peak memory, and the CPU generator's
//! state (`torch.get_rng_state` / `set_rng_state`).
use anyhow::{anyhow, bail, Result};
use std::ffi::{c_char, c_void, CStr};
use tch::Tensor;

extern "C" {
    fn sdkd_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        n: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    fn sdkd_clip_grad_norm(grads: *const *mut c_void, n: i64, max_norm: f64, total_out: *mut *mut c_void) -> *mut c_char;
    fn sdkd_set_grad_none(t: *mut c_void) -> *mut c_char;
    fn sdkd_cuda_memory_peaks(device: i64, allocated_peak: *mut i64, reserved_peak: *mut i64) -> *mut c_char;
    fn sdkd_cpu_rng_state(out: *mut *mut c_void) -> *mut c_char;
    fn sdkd_set_cpu_rng_state(state: *const c_void) -> *mut c_char;
    fn sdkd_cuda_memory_reset_peaks(device: i64, allocated_now: *mut i64) -> *mut c_char;
    fn sdkd_cpu_live_bytes_start() -> *mut c_char;
    fn sdkd_cpu_live_bytes_read(live: *mut i64, peak: *mut i64, stop: bool) -> *mut c_char;
}

/// Turns the shim's error message (malloc'd, or null on success) into a Result.
fn check(msg: *mut c_char, what: &str) -> Result<()> {
    if msg.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from malloc, owned by us now.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    unsafe { libc::free(msg.cast()) };
    Err(anyhow!("{what}: {text}"))
}

fn ptrs(ts: &[&Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// `torch._foreach_add_(steps, 1)` then `torch._fused_adamw_(...)` (amsgrad and maximize off):
/// what `torch.optim.AdamW(fused=True).step()` does. `steps` are float32 scalars on the
/// parameters' device; every list has one entry per parameter, all defined.
#[allow(clippy::too_many_arguments)]
pub fn fused_adamw_(
    params: &[&Tensor],
    grads: &[&Tensor],
    exp_avgs: &[&Tensor],
    exp_avg_sqs: &[&Tensor],
    steps: &[&Tensor],
    lr: f64,
    betas: (f64, f64),
    weight_decay: f64,
    eps: f64,
) -> Result<()> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()].iter().any(|&l| l != n) {
        bail!("fused AdamW: lists of different lengths");
    }
    if n == 0 {
        return Ok(());
    }
    let (p, g, m, v, s) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(steps));
    // SAFETY: five arrays of `n` live tensor handles; the C++ side copies the handles.
    let msg = unsafe {
        sdkd_fused_adamw(p.as_ptr(), g.as_ptr(), m.as_ptr(), v.as_ptr(), s.as_ptr(), n as i64, lr, betas.0, betas.1, weight_decay, eps)
    };
    check(msg, "fused AdamW")
}

/// The total 2-norm of `grads` (a scalar tensor on their device) and, when `max_norm` is given,
/// every gradient times `min(max_norm / (norm + 1e-6), 1)`: `torch.nn.utils.clip_grad_norm_` with
/// its default foreach kernels. `grads`: defined tensors, at least one.
pub fn clip_grad_norm_(grads: &[&Tensor], max_norm: Option<f64>) -> Result<Tensor> {
    if grads.is_empty() {
        bail!("clipping gradients: no gradients");
    }
    if max_norm.is_some_and(|m| m.is_nan() || m < 0.0) {
        bail!("clipping gradients: max_norm {max_norm:?} is not a non-negative number");
    }
    let g = ptrs(grads);
    let mut total: *mut c_void = std::ptr::null_mut();
    // SAFETY: an array of live tensor handles; on success `total` is a new at::Tensor* we own.
    check(unsafe { sdkd_clip_grad_norm(g.as_ptr(), g.len() as i64, max_norm.unwrap_or(-1.0), &mut total) }, "clipping gradients")?;
    // SAFETY: a tensor allocated by `new at::Tensor`, which tch frees with delete as its own.
    Ok(unsafe { Tensor::from_ptr(total.cast()) })
}

/// Drops `t`'s gradient (PyTorch's `zero_grad(set_to_none=True)`): the next backward stores its
/// gradient instead of adding it to a zeroed buffer, which saves a fill and an add per parameter.
pub fn set_grad_none(t: &Tensor) -> Result<()> {
    // SAFETY: `t` is a live tensor handle; resetting its grad field needs no other state.
    check(unsafe { sdkd_set_grad_none(t.as_ptr() as *mut c_void) }, "clearing a gradient")
}

/// Peak bytes (allocated, reserved) of LibTorch's CUDA caching allocator on `device` since the
/// process started: `torch.cuda.max_memory_allocated` and `max_memory_reserved`. An error where
/// CUDA is not in use.
pub fn cuda_memory_peaks(device: usize) -> Result<(i64, i64)> {
    let (mut allocated, mut reserved) = (0i64, 0i64);
    // SAFETY: the shim only writes the two integers it is given.
    check(unsafe { sdkd_cuda_memory_peaks(device as i64, &mut allocated, &mut reserved) }, "CUDA allocator statistics")?;
    Ok((allocated, reserved))
}

/// The state of LibTorch's default CPU generator (`torch.get_rng_state()`): a uint8 tensor that
/// `set_cpu_rng_state` puts back, so that seeded random sequences can take turns on it.
pub fn cpu_rng_state() -> Result<Tensor> {
    let mut state: *mut c_void = std::ptr::null_mut();
    // SAFETY: on success `state` is a new at::Tensor* we own.
    check(unsafe { sdkd_cpu_rng_state(&mut state) }, "reading the CPU generator's state")?;
    // SAFETY: a tensor allocated by `new at::Tensor`, which tch frees with delete as its own.
    Ok(unsafe { Tensor::from_ptr(state.cast()) })
}

/// `torch.set_rng_state(state)` with a state from `cpu_rng_state`.
pub fn set_cpu_rng_state(state: &Tensor) -> Result<()> {
    // SAFETY: `state` is a live tensor handle; the generator copies what it reads.
    check(unsafe { sdkd_set_cpu_rng_state(state.as_ptr() as *const c_void) }, "setting the CPU generator's state")
}

/// Restarts the caching allocator's peaks on `device` from what is allocated now
/// (`torch.cuda.reset_peak_memory_stats`) and returns that (`torch.cuda.memory_allocated`), in
/// bytes. An error where CUDA is not in use.
pub fn cuda_memory_reset_peaks(device: usize) -> Result<i64> {
    let mut now = 0i64;
    // SAFETY: the shim only writes the integer it is given.
    check(unsafe { sdkd_cuda_memory_reset_peaks(device as i64, &mut now) }, "CUDA allocator statistics")?;
    Ok(now)
}

/// Starts counting the CPU tensor bytes this thread allocates (and frees) from now on, with
/// their peak, through the default CPU allocator's memory-reporting hook (the one
/// `torch.profiler`'s `profile_memory` uses). `cpu_live_bytes` reads the count, until
/// `cpu_live_bytes_stop` ends it; no other profiler may run meanwhile.
pub fn cpu_live_bytes_start() -> Result<()> {
    // SAFETY: no arguments; the shim installs a counter on this thread.
    check(unsafe { sdkd_cpu_live_bytes_start() }, "counting CPU tensor bytes")
}

/// (live, peak) bytes of the CPU tensors allocated since `cpu_live_bytes_start`.
pub fn cpu_live_bytes() -> Result<(i64, i64)> {
    read_live_bytes(false)
}

/// `cpu_live_bytes`, and removes the counter.
pub fn cpu_live_bytes_stop() -> Result<(i64, i64)> {
    read_live_bytes(true)
}

fn read_live_bytes(stop: bool) -> Result<(i64, i64)> {
    let (mut live, mut peak) = (0i64, 0i64);
    // SAFETY: the shim only writes the two integers it is given.
    check(unsafe { sdkd_cpu_live_bytes_read(&mut live, &mut peak, stop) }, "reading the CPU tensor byte count")?;
    Ok((live, peak))
}
