//! Gradient checkpointing (`train.gradient_checkpointing`): a region of the UNet (one resnet, one
//! spatial transformer, one resampler, or the output head) runs its forward without keeping
//! activations and runs it again in backward, through the autograd Function of `csrc/recompute.cpp` (the reentrant form
//! of `torch.utils.checkpoint`). The recomputed forward is the same deterministic computation:
//! sdkd's UNet has no dropout (`dropout` ≠ 0 is refused when a UNet config loads), so nothing
//! random is drawn twice.
//!
//! Gradients equal the stored-activation step's bit for bit on the CPU (`tests/memory.rs`).
//! Autograd sums the gradients a tensor receives in the order its consumers run, and a
//! checkpointed region hands back one summed gradient per input, in input order; so every
//! region, checkpointed or not, starts by aliasing its inputs (`Tensor::alias`, a differentiable
//! no-op), which makes the stored-activation graph sum each region's contributions first and
//! hand them on in the same order.
//!
//! A closure must take everything that needs a gradient through its inputs (parameters excepted:
//! they are leaves, and the inner backward accumulates into their `.grad`).
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use tch::Tensor;

/// What `train.gradient_checkpointing` recomputes in backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Every activation is stored.
    #[default]
    None,
    /// Every layer of the down, mid and up blocks, one region each (each resnet, transformer
    /// and resampler, as diffusers' `gradient_checkpointing` does), and the output head: only
    /// the layer boundaries are stored, among them the block outputs and skips that feature KD
    /// and the up path read anyway. Per layer rather than per block, because backward holds one
    /// recomputed region's activations at a time, and a whole full-resolution up block's are
    /// a large share of the step's.
    Blocks,
    /// Only the spatial transformers, whose attention activations are the largest.
    Attention,
}

/// The kinds of region the UNet offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// A resnet, a resampler, the output head.
    Layer,
    /// A spatial transformer.
    Attention,
}

/// Regions checkpointed (forwards run without keeping activations) and region runs (those
/// forwards and their recomputations in backward), process-wide: after a backward the runs are
/// twice the regions when every region was recomputed once (`tests/memory.rs`).
static CHECKPOINTED: AtomicU64 = AtomicU64::new(0);
static RUNS: AtomicU64 = AtomicU64::new(0);

/// (regions checkpointed, region runs) so far in this process; see `CHECKPOINTED`.
pub fn counts() -> (u64, u64) {
    (CHECKPOINTED.load(Ordering::Relaxed), RUNS.load(Ordering::Relaxed))
}

type RegionFn<'a> = dyn Fn(&[Tensor], &Recompute<'a>) -> Vec<Tensor> + 'a;

extern "C" {
    fn sdkd_recompute_scope_new() -> *mut c_void;
    fn sdkd_recompute_scope_end(scope: *mut c_void);
    fn sdkd_recompute_push(sink: *mut c_void, t: *const c_void);
    fn sdkd_recompute(
        scope: *mut c_void,
        run: unsafe extern "C" fn(*const c_void, *mut *mut c_void, i64, *mut c_void) -> *mut c_char,
        closure: *const c_void,
        inputs: *const *mut c_void,
        n: i64,
        outputs: *mut *mut *mut c_void,
        n_outputs: *mut i64,
    ) -> *mut c_char;
}

/// The checkpointing of one forward and its backward. The closures of checkpointed regions live
/// here until it is dropped, so it must outlive the backward of the graph it helped build; a
/// backward after that fails with an error instead of calling freed closures.
pub struct Recompute<'a> {
    mode: Checkpointing,
    /// The C++ side's liveness flag, present unless the mode is `None`.
    scope: Option<*mut c_void>,
    /// Boxed twice: the shim holds a thin pointer to the inner (fat) box, which must not move.
    #[allow(clippy::vec_box)]
    closures: RefCell<Vec<Box<Box<RegionFn<'a>>>>>,
}

impl<'a> Recompute<'a> {
    pub fn new(mode: Checkpointing) -> Recompute<'a> {
        // SAFETY: allocates a flag that only `drop` frees.
        let scope = (mode != Checkpointing::None).then(|| unsafe { sdkd_recompute_scope_new() });
        Recompute { mode, scope, closures: RefCell::new(Vec::new()) }
    }

    /// Nothing recomputed (inference, the teacher).
    pub fn off() -> Recompute<'a> {
        Recompute::new(Checkpointing::None)
    }

    fn checkpoints(&self, region: Region) -> bool {
        matches!((self.mode, region), (Checkpointing::Blocks, _) | (Checkpointing::Attention, Region::Attention))
    }

    /// `f(inputs)`, checkpointed when the mode covers `region`. `f` receives aliases of
    /// `inputs` and the `Recompute` its inner regions use (one that recomputes nothing inside a
    /// checkpointed region).
    pub fn run(&self, region: Region, inputs: &[&Tensor], f: impl Fn(&[Tensor], &Recompute<'a>) -> Vec<Tensor> + 'a) -> Vec<Tensor> {
        let Some(scope) = self.scope.filter(|_| self.checkpoints(region)) else {
            // Made last first: backward then runs them first first, handing each input's
            // gradient on in the order the checkpointed Function does (it matters when one
            // tensor is two inputs, e.g. the last down block's output as an up block's input
            // and its skip).
            let mut aliases: Vec<Tensor> = inputs.iter().rev().map(|t| t.alias()).collect();
            aliases.reverse();
            return f(&aliases, self);
        };
        CHECKPOINTED.fetch_add(1, Ordering::Relaxed);
        let closure: Box<Box<RegionFn<'a>>> = Box::new(Box::new(f));
        let closure_ptr = &*closure as *const Box<RegionFn<'a>> as *const c_void;
        self.closures.borrow_mut().push(closure);
        let handles: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let (mut out, mut n_out) = (std::ptr::null_mut(), 0i64);
        // SAFETY: `scope` is live; the closure stays boxed in `self.closures` (a stable address)
        // until `self` drops, and the C++ side refuses to call it after that.
        let msg = unsafe { sdkd_recompute(scope, run_region, closure_ptr, handles.as_ptr(), handles.len() as i64, &mut out, &mut n_out) };
        if let Err(e) = take_error(msg) {
            panic!("checkpointed {region:?} forward: {e}");
        }
        // SAFETY: `n_out` new at::Tensor* in a malloc'd array, all ours.
        let outputs = (0..n_out as usize).map(|i| unsafe { Tensor::from_ptr((*out.add(i)).cast()) }).collect();
        unsafe { libc::free(out.cast()) };
        outputs
    }
}

impl Drop for Recompute<'_> {
    fn drop(&mut self) {
        if let Some(scope) = self.scope {
            // SAFETY: created by `new`, ended once; the closures are freed after this.
            unsafe { sdkd_recompute_scope_end(scope) };
        }
    }
}

/// The shim's message (malloc'd, or null) as a Result.
fn take_error(msg: *mut c_char) -> Result<(), String> {
    if msg.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string from malloc, ours to free.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    unsafe { libc::free(msg.cast()) };
    Err(text)
}

/// A message for the shim, in malloc'd memory it frees.
fn error_for_shim(text: &str) -> *mut c_char {
    let bytes = text.as_bytes();
    // SAFETY: room for the bytes and a NUL.
    unsafe {
        let p = libc::malloc(bytes.len() + 1) as *mut u8;
        if !p.is_null() {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
            *p.add(bytes.len()) = 0;
        }
        p.cast()
    }
}

/// Called by the shim in forward (grad off) and in backward (grad on): runs the closure on the
/// inputs it hands over and pushes the outputs. A panic becomes an error message.
unsafe extern "C" fn run_region(closure: *const c_void, inputs: *mut *mut c_void, n: i64, sink: *mut c_void) -> *mut c_char {
    // SAFETY: `closure` points into a live `Recompute`'s box (the shim checked its scope).
    let f = unsafe { &*(closure as *const Box<RegionFn<'static>>) };
    // SAFETY: `n` new at::Tensor* handed over to us.
    let xs: Vec<Tensor> = (0..n as usize).map(|i| unsafe { Tensor::from_ptr((*inputs.add(i)).cast()) }).collect();
    let inner = Recompute::off();
    RUNS.fetch_add(1, Ordering::Relaxed);
    match catch_unwind(AssertUnwindSafe(|| f(&xs, &inner))) {
        Ok(outputs) => {
            for t in &outputs {
                // SAFETY: the shim copies the handle (a reference count) before we drop ours.
                unsafe { sdkd_recompute_push(sink, t.as_ptr() as *const c_void) };
            }
            std::ptr::null_mut()
        }
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            error_for_shim(&text)
        }
    }
}
