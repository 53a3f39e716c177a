// LibTorch operators (and the CUDA caching allocator's statistics) that tch 0.26 does not wrap, behind a C ABI for src/aten_extra.rs.
// A `tensor` is what tch hands out: a pointer to an at::Tensor (torch-sys' C_tensor).
// C++ exceptions never cross the boundary: failures return a malloc'd message the caller frees.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>
#include <c10/core/Allocator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include "shim.h"
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace {
using sdkd_shim::error_message;
using sdkd_shim::list;
}  // namespace

extern "C" {

// torch.optim.AdamW(fused=True)'s update: `steps += 1`, then aten::_fused_adamw_ (one pass over
// each parameter: decoupled weight decay, both moments, bias corrections, the step).
char* sdkd_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avgs,
                       at::Tensor* const* exp_avg_sqs, at::Tensor* const* steps, int64_t n, double lr, double beta1,
                       double beta2, double weight_decay, double eps) {
  try {
    auto p = list(params, n), g = list(grads, n), m = list(exp_avgs, n), v = list(exp_avg_sqs, n);
    auto s = list(steps, n);
    at::_foreach_add_(s, 1);
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false);
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

// torch.nn.utils.clip_grad_norm_(grads, max_norm) on its foreach path: one multi-tensor kernel for
// the per-gradient norms and one for the scaling. With max_norm < 0, only the total norm. The
// total (a new scalar tensor on the gradients' device) goes to *total_out, owned by the caller.
char* sdkd_clip_grad_norm(at::Tensor* const* grads, int64_t n, double max_norm, at::Tensor** total_out) {
  try {
    auto g = list(grads, n);
    auto total = at::linalg_vector_norm(at::stack(at::_foreach_norm(g, 2)), 2);
    if (max_norm >= 0) {
      // max_norm / (total + 1e-6), clamped at 1, as PyTorch computes it
      auto coef = at::clamp_max(total.add(1e-6).reciprocal().mul(max_norm), 1.0);
      at::_foreach_mul_(g, coef);
    }
    *total_out = new at::Tensor(std::move(total));
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

// optimizer.zero_grad(set_to_none=True): the next backward stores its gradient instead of adding
// it to a zeroed buffer.
char* sdkd_set_grad_none(at::Tensor* t) {
  try {
    t->mutable_grad() = at::Tensor();
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

// torch.cuda.max_memory_allocated / max_memory_reserved: the caching allocator's peaks on CUDA
// `device`, in bytes, since the process started. Through c10's device-generic allocator
// interface, so it compiles against a CPU-only LibTorch and fails cleanly (an error message)
// where no CUDA allocator is registered.
char* sdkd_cuda_memory_peaks(int64_t device, int64_t* allocated_peak, int64_t* reserved_peak) {
  try {
    auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated_peak = stats.allocated_bytes[all].peak;
    *reserved_peak = stats.reserved_bytes[all].peak;
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

// Live CPU tensor bytes over a window (`sdkd bench --report-memory`): LibTorch's default CPU
// allocator reports each allocation and free to the MemoryReportingInfoBase on the calling
// thread's debug info (the hook of the profiler's profile_memory), counting only blocks allocated
// while one is installed; this one keeps their running sum and its peak. Blocks allocated before
// the window count for nothing when freed (c10 logs a warning about them now and then).
namespace {
struct CpuLiveBytes final : c10::MemoryReportingInfoBase {
  std::atomic<int64_t> live{0}, peak{0};
  void reportMemoryUsage(void*, int64_t alloc_size, size_t, size_t, c10::Device device) override {
    if (device.type() != c10::DeviceType::CPU) return;
    int64_t now = live.fetch_add(alloc_size) + alloc_size;
    int64_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
  }
  bool memoryProfilingEnabled() const override { return true; }
};
}  // namespace

// Installs a counter on this thread (the autograd engine carries it into CPU backward).
char* sdkd_cpu_live_bytes_start() {
  try {
    c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, std::make_shared<CpuLiveBytes>());
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

// The installed counter's live bytes and peak; `stop` also removes it.
char* sdkd_cpu_live_bytes_read(int64_t* live, int64_t* peak, bool stop) {
  try {
    auto info = stop ? c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE)
                     : c10::ThreadLocalDebugInfo::_peek(c10::DebugInfoKind::PROFILER_STATE);
    auto counter = std::dynamic_pointer_cast<CpuLiveBytes>(info);
    if (!counter) return error_message("no live-bytes counter is installed on this thread");
    *live = counter->live.load();
    *peak = counter->peak.load();
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

// torch.get_rng_state() / torch.set_rng_state(): the CPU default generator's whole state as a
// uint8 tensor, so that several seeded random sequences can take turns on the one generator.
char* sdkd_cpu_rng_state(at::Tensor** out) {
  try {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    *out = new at::Tensor(gen.get_state());
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

// torch.cuda.reset_peak_memory_stats(device) and torch.cuda.memory_allocated(device): the peak
// restarts from what is allocated now, which goes to *allocated_now.
char* sdkd_cuda_memory_reset_peaks(int64_t device, int64_t* allocated_now) {
  try {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto index = static_cast<c10::DeviceIndex>(device);
    allocator->resetPeakStats(index);
    constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated_now = allocator->getDeviceStats(index).allocated_bytes[all].current;
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

char* sdkd_set_cpu_rng_state(const at::Tensor* state) {
  try {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*state);
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

}
