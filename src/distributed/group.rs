//! A c10d process group (`csrc/c10d.cpp`): TCPStore rendezvous, ProcessGroupGloo on the CPU,
//! ProcessGroupNCCL on CUDA, and the collectives data-parallel training uses. Every collective
//! waits at most the group's timeout; a failure names the lost rank when one stopped beating.
use super::Launch;
use anyhow::{anyhow, Result};
use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;
use tch::{Device, Tensor};

extern "C" {
    fn sdkd_dist_has_nccl() -> i32;
    #[allow(clippy::too_many_arguments)]
    fn sdkd_dist_init(
        backend: *const c_char,
        host: *const c_char,
        port: i32,
        rank: i32,
        size: i32,
        store_is_external: i32,
        prefix: *const c_char,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn sdkd_dist_free(group: *mut c_void);
    fn sdkd_dist_allreduce(group: *mut c_void, ts: *const *mut c_void, n: i64, op: i32) -> *mut c_char;
    fn sdkd_dist_broadcast(group: *mut c_void, ts: *const *mut c_void, n: i64, root: i32) -> *mut c_char;
    fn sdkd_dist_barrier(group: *mut c_void) -> *mut c_char;
    fn sdkd_dist_reduce_scatter(group: *mut c_void, ins: *const *mut c_void, outs: *const *mut c_void, n: i64) -> *mut c_char;
    fn sdkd_dist_all_gather(group: *mut c_void, ins: *const *mut c_void, outs: *const *mut c_void, n: i64) -> *mut c_char;
}

/// Turns the shim's error message (malloc'd, or null on success) into a Result.
fn check(msg: *mut c_char) -> Result<()> {
    if msg.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from malloc, owned by us now.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    unsafe { libc::free(msg.cast()) };
    Err(anyhow!(text))
}

fn ptrs(ts: &[&Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// Which c10d backend a group uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// Whether this build can make groups of this backend (NCCL needs the CUDA and NCCL
    /// headers at build time).
    pub fn available(self) -> bool {
        // SAFETY: reads a constant.
        self == Backend::Gloo || unsafe { sdkd_dist_has_nccl() } == 1
    }
}

/// One rank's membership of a process group.
pub struct ProcessGroup {
    ptr: *mut c_void,
    pub rank: usize,
    pub size: usize,
    pub backend: Backend,
    /// Where this group's collectives take their tensors: NCCL reduces only CUDA tensors (on
    /// `cuda:LOCAL_RANK`), Gloo here only CPU ones.
    pub device: Device,
}

// SAFETY: c10d backends are made to be driven from any thread (calls are serialised by us: a
// group is used by one thread at a time through &self methods that block until done).
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Rendezvous with the other ranks of `launch` and build the group; waits at most `timeout`
    /// for them, which also bounds every later collective.
    pub fn join(launch: &Launch, backend: Backend, timeout: Duration) -> Result<ProcessGroup> {
        let name = CString::new(backend.name()).expect("no NUL");
        let host = CString::new(launch.master_addr.as_str()).map_err(|_| anyhow!("MASTER_ADDR holds a NUL byte"))?;
        let prefix = CString::new(launch.store_prefix.as_str()).map_err(|_| anyhow!("the store prefix holds a NUL byte"))?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: NUL-terminated strings alive for the call; on success `ptr` is a group we own.
        check(unsafe {
            sdkd_dist_init(
                name.as_ptr(),
                host.as_ptr(),
                launch.master_port as i32,
                launch.rank as i32,
                launch.world_size as i32,
                launch.store_is_external as i32,
                prefix.as_ptr(),
                timeout.as_millis().min(i64::MAX as u128) as i64,
                &mut ptr,
            )
        })
        .map_err(|e| anyhow!("rank {} of {} ({} at {}:{}): {e}", launch.rank, launch.world_size, backend.name(), launch.master_addr, launch.master_port))?;
        let device = if backend == Backend::Nccl { Device::Cuda(launch.local_rank) } else { Device::Cpu };
        Ok(ProcessGroup { ptr, rank: launch.rank, size: launch.world_size, backend, device })
    }

    /// Every tensor summed over the ranks, in place.
    pub fn all_reduce_sum(&self, ts: &[&Tensor]) -> Result<()> {
        let p = ptrs(ts);
        // SAFETY: live tensor handles; the shim copies the handles and blocks until done.
        check(unsafe { sdkd_dist_allreduce(self.ptr, p.as_ptr(), p.len() as i64, 0) })
    }

    /// Every tensor replaced by its maximum over the ranks, in place.
    pub fn all_reduce_max(&self, ts: &[&Tensor]) -> Result<()> {
        let p = ptrs(ts);
        // SAFETY: as above.
        check(unsafe { sdkd_dist_allreduce(self.ptr, p.as_ptr(), p.len() as i64, 1) })
    }

    /// Every tensor replaced by rank `root`'s, in place.
    pub fn broadcast(&self, ts: &[&Tensor], root: usize) -> Result<()> {
        let p = ptrs(ts);
        // SAFETY: as above.
        check(unsafe { sdkd_dist_broadcast(self.ptr, p.as_ptr(), p.len() as i64, root as i32) })
    }

    /// Each `(input, output)`: the inputs (`size · k` elements, flat) summed over the ranks, and
    /// rank `r` given elements `r·k .. (r+1)·k` of the sum in its output (`k` elements).
    pub fn reduce_scatter_sum(&self, pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
        let (ins, outs): (Vec<&Tensor>, Vec<&Tensor>) = pairs.iter().copied().unzip();
        let (i, o) = (ptrs(&ins), ptrs(&outs));
        // SAFETY: as above, two arrays of the same length.
        check(unsafe { sdkd_dist_reduce_scatter(self.ptr, i.as_ptr(), o.as_ptr(), i.len() as i64) })
    }

    /// Each `(input, output)`: every rank's input (`k` elements) laid end to end, rank order, in
    /// the output (`size · k` elements, flat).
    pub fn all_gather(&self, pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
        let (ins, outs): (Vec<&Tensor>, Vec<&Tensor>) = pairs.iter().copied().unzip();
        let (i, o) = (ptrs(&ins), ptrs(&outs));
        // SAFETY: as above, two arrays of the same length.
        check(unsafe { sdkd_dist_all_gather(self.ptr, i.as_ptr(), o.as_ptr(), i.len() as i64) })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        check(unsafe { sdkd_dist_barrier(self.ptr) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the group made by join, freed once.
        unsafe { sdkd_dist_free(self.ptr) }
    }
}
