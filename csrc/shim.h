// What every file of the C ABI shim shares (csrc/aten_extra.cpp, recompute.cpp, c10d.cpp): the
// malloc'd error message a failed call returns (the Rust caller frees it), and tch's tensor
// handles (pointers to at::Tensor) as a vector.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace sdkd_shim {
inline char* error_message(const std::string& what) {
  char* msg = static_cast<char*>(std::malloc(what.size() + 1));
  if (msg) std::memcpy(msg, what.c_str(), what.size() + 1);
  return msg;
}

inline std::vector<at::Tensor> list(at::Tensor* const* ts, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}
}  // namespace sdkd_shim
