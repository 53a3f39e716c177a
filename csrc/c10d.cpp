// LibTorch's c10d process groups behind a C ABI for src/distributed/group.rs: a TCPStore
// rendezvous, ProcessGroupGloo (CPU tensors) or ProcessGroupNCCL (CUDA tensors, compiled in only
// where the CUDA and NCCL headers were found: SDKD_WITH_NCCL), and the few collectives data
// parallel training needs (all-reduce, broadcast, barrier; reduce-scatter and all-gather for
// `optim.shard_state`). Failures return a malloc'd message the caller frees; C++ exceptions
// never cross the boundary.
//
// Naming a lost rank: Gloo reports a dead peer as a closed socket ("Connection closed by peer
// [addr]:port") and NCCL as a timeout, neither by rank. Every rank therefore bumps a heartbeat
// counter in the store twice a second from its own thread and connection; after a failed
// collective the survivor reads the counters twice, a few beats apart, and names the ranks whose
// counter stood still (or the store's host, rank 0, when the store itself is gone).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef SDKD_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include "shim.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {
using sdkd_shim::error_message;
using sdkd_shim::list;
using namespace std::chrono;
constexpr milliseconds kBeat{500};

std::string beat_key(int rank) { return "sdkd/heartbeat/" + std::to_string(rank); }

struct Group {
  std::string host;
  int port;
  std::string prefix;
  int rank;
  int size;
  milliseconds timeout;
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::thread heartbeat;
  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;

  // A fresh client connection to the store under this run's prefix (one per thread: a TCPStore
  // connection is not shared between threads here).
  c10::intrusive_ptr<c10d::Store> client(milliseconds timeout) const {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = false;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(host, opts);
    return c10::make_intrusive<c10d::PrefixStore>(prefix, tcp);
  }

  void start_heartbeat() {
    auto beats = client(timeout);
    heartbeat = std::thread([this, beats]() {
      std::unique_lock<std::mutex> lock(mu);
      while (!stopping) {
        lock.unlock();
        try {
          beats->add(beat_key(rank), 1);
        } catch (...) {
          // the store is gone (its host died or the run is over): nothing left to tell
          lock.lock();
          return;
        }
        lock.lock();
        cv.wait_for(lock, kBeat, [this] { return stopping; });
      }
    });
  }

  ~Group() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
    if (heartbeat.joinable()) heartbeat.join();
  }

  // Which ranks stopped beating, in words ("rank 1", "ranks 1, 3"), or why that is unknown.
  std::string lost_ranks() const {
    try {
      auto s = client(milliseconds(3000));
      auto read = [&] {
        std::vector<int64_t> v(size);
        for (int r = 0; r < size; ++r) v[r] = s->add(beat_key(r), 0);
        return v;
      };
      auto before = read();
      std::this_thread::sleep_for(kBeat * 4);
      auto after = read();
      std::vector<int> lost;
      for (int r = 0; r < size; ++r)
        if (r != rank && after[r] == before[r]) lost.push_back(r);
      if (lost.empty()) return "no rank lost its heartbeat (a rank may be stuck rather than dead)";
      std::ostringstream out;
      out << (lost.size() == 1 ? "lost rank " : "lost ranks ");
      for (size_t i = 0; i < lost.size(); ++i) out << (i ? ", " : "") << lost[i];
      out << " of " << size << " (its heartbeat stopped)";
      return out.str();
    } catch (const std::exception&) {
      return "lost rank 0 of " + std::to_string(size) + " (the rendezvous store it hosts at " + host + ":" +
             std::to_string(port) + " is gone)";
    }
  }

  std::string failure(const char* what, const std::exception& e) const {
    return std::string(what) + " failed on rank " + std::to_string(rank) + ": " + lost_ranks() + ": " + e.what();
  }
};

void wait_all(Group* g, std::vector<c10::intrusive_ptr<c10d::Work>>& works) {
  for (auto& w : works) w->wait(g->timeout);
}

}  // namespace

extern "C" {

// Whether this build can make NCCL groups.
int sdkd_dist_has_nccl() {
#ifdef SDKD_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Rendezvous at host:port (rank 0 hosts the TCPStore unless `store_is_external`, as under
// torchrun, whose agent hosts it) and a process group of `size` ranks: "gloo" or "nccl".
// Every key lives under `prefix`, so an agent's store and a restarted attempt stay apart.
char* sdkd_dist_init(const char* backend, const char* host, int port, int rank, int size, int store_is_external,
                     const char* prefix, int64_t timeout_ms, void** out) {
  try {
    auto g = std::make_unique<Group>();
    g->host = host;
    g->port = port;
    g->prefix = prefix;
    g->rank = rank;
    g->size = size;
    g->timeout = milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = rank == 0 && !store_is_external;
    opts.numWorkers = store_is_external ? std::nullopt : std::optional<std::size_t>(size);
    opts.waitWorkers = !store_is_external;
    opts.timeout = g->timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(g->host, opts);
    g->store = c10::make_intrusive<c10d::PrefixStore>(g->prefix, tcp);
    g->start_heartbeat();
    std::string which = backend;
    if (which == "gloo") {
      auto options = c10d::ProcessGroupGloo::Options::create(g->timeout);
      // The address the hostname resolves to, or loopback (what torch.distributed picks too;
      // GLOO_SOCKET_IFNAME names an interface instead).
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else {
        options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(g->store, rank, size, options);
    } else if (which == "nccl") {
#ifdef SDKD_WITH_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = g->timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(g->store, rank, size, options);
#else
      return error_message("this sdkd was built without NCCL (no CUDA and NCCL headers were found at build time)");
#endif
    } else {
      return error_message("unknown process group backend " + which);
    }
    *out = g.release();
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(std::string("joining the process group: ") + e.what());
  }
}

void sdkd_dist_free(void* group) { delete static_cast<Group*>(group); }

// In-place all-reduce of each tensor (sum when `op` is 0, max when 1): all issued, then all
// waited for, so the backend may overlap them.
char* sdkd_dist_allreduce(void* group, at::Tensor* const* ts, int64_t n, int op) {
  auto* g = static_cast<Group*>(group);
  try {
    c10d::AllreduceOptions opts;
    opts.reduceOp = op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
    opts.timeout = g->timeout;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    auto tensors = list(ts, n);
    for (auto& t : tensors) {
      std::vector<at::Tensor> one{t};
      works.push_back(g->backend->allreduce(one, opts));
    }
    wait_all(g, works);
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(g->failure("all-reduce", e));
  }
}

// Each tensor replaced by rank `root`'s.
char* sdkd_dist_broadcast(void* group, at::Tensor* const* ts, int64_t n, int root) {
  auto* g = static_cast<Group*>(group);
  try {
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    auto tensors = list(ts, n);
    for (auto& t : tensors) {
      std::vector<at::Tensor> one{t};
      works.push_back(g->backend->broadcast(one, opts));
    }
    wait_all(g, works);
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(g->failure("broadcast", e));
  }
}

// ZeRO-1's collectives, one call per (input, output) pair, all issued then all waited for:
// reduce-scatter (sum) of each flat input of size·k elements into its output of k (rank r gets
// elements r·k ..), and all-gather of each input of k elements into its output of size·k.
char* sdkd_dist_reduce_scatter(void* group, at::Tensor* const* ins, at::Tensor* const* outs, int64_t n) {
  auto* g = static_cast<Group*>(group);
  try {
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    opts.timeout = g->timeout;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    auto in = list(ins, n), out = list(outs, n);
    for (int64_t i = 0; i < n; ++i) works.push_back(g->backend->_reduce_scatter_base(out[i], in[i], opts));
    wait_all(g, works);
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(g->failure("reduce-scatter", e));
  }
}

char* sdkd_dist_all_gather(void* group, at::Tensor* const* ins, at::Tensor* const* outs, int64_t n) {
  auto* g = static_cast<Group*>(group);
  try {
    c10d::AllgatherOptions opts;
    opts.timeout = g->timeout;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    auto in = list(ins, n), out = list(outs, n);
    for (int64_t i = 0; i < n; ++i) works.push_back(g->backend->_allgather_base(out[i], in[i], opts));
    wait_all(g, works);
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(g->failure("all-gather", e));
  }
}

char* sdkd_dist_barrier(void* group) {
  auto* g = static_cast<Group*>(group);
  try {
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    auto work = g->backend->barrier(opts);
    work->wait(g->timeout);
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(g->failure("barrier", e));
  }
}
}
