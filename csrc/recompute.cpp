// Gradient checkpointing for src/models/recompute.rs: an autograd Function whose forward runs a Rust
// closure with grad off (so none of its activations are kept) and whose backward runs it again with
// grad on, from the saved inputs, and back-propagates through that second graph. This is the
// reentrant form of torch.utils.checkpoint: the inner backward accumulates into the parameters'
// .grad itself (as PyTorch's does), so parameters need not be inputs of the Function.
// C++ exceptions never cross the C ABI: failures return a malloc'd message the caller frees.
#include "shim.h"
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

extern "C" {
// The Rust side: runs closure `closure` on `n` inputs (each a new at::Tensor* it takes over) and
// pushes its outputs with sdkd_recompute_push(sink, ...). Returns null or a malloc'd message.
typedef char* (*sdkd_recompute_fn)(const void* closure, at::Tensor** inputs, int64_t n, void* sink);
}

namespace {
using sdkd_shim::error_message;
// Cleared when the Rust scope that owns the closures ends; a graph that outlives it refuses to
// call them in backward instead of calling freed memory.
struct Scope {
  std::atomic<bool> alive{true};
};

struct Closure : torch::CustomClassHolder {
  sdkd_recompute_fn run;
  const void* closure;
  std::shared_ptr<Scope> scope;

  variable_list call(const variable_list& inputs) const {
    if (!scope->alive.load()) {
      throw std::runtime_error("a checkpointed block's backward ran after its forward's scope ended");
    }
    std::vector<at::Tensor*> handles;
    handles.reserve(inputs.size());
    for (const auto& t : inputs) handles.push_back(new at::Tensor(t));
    variable_list outputs;
    char* msg = run(closure, handles.data(), static_cast<int64_t>(handles.size()), &outputs);
    if (msg) {
      std::string text(msg);
      std::free(msg);
      throw std::runtime_error(text);
    }
    return outputs;
  }
};

struct Recompute : public torch::autograd::Function<Recompute> {
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<Closure> closure, at::TensorList list) {
    // Function::apply runs this with grad mode off: the closure keeps no activations.
    variable_list inputs = list.vec();
    auto outputs = closure->call(inputs);
    ctx->save_for_backward(inputs);
    ctx->saved_data["closure"] = c10::IValue::make_capsule(closure);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto closure = c10::static_intrusive_pointer_cast<Closure>(ctx->saved_data["closure"].toCapsule());
    // Fresh leaves: the inner backward stops at them and leaves their gradients in .grad.
    variable_list leaves;
    leaves.reserve(saved.size());
    for (const auto& t : saved) leaves.push_back(t.detach().requires_grad_(t.requires_grad()));
    variable_list outputs;
    {
      at::AutoGradMode grad_on(true);
      outputs = closure->call(leaves);
    }
    if (outputs.size() != grad_outputs.size()) {
      throw std::runtime_error("a checkpointed block returned " + std::to_string(outputs.size()) +
                               " tensors when recomputed, " + std::to_string(grad_outputs.size()) + " the first time");
    }
    // Only the outputs something downstream used: an undefined gradient is no contribution.
    variable_list with_grad, grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (grad_outputs[i].defined() && outputs[i].requires_grad()) {
        with_grad.push_back(outputs[i]);
        grads.push_back(grad_outputs[i]);
      }
    }
    if (!with_grad.empty()) torch::autograd::backward(with_grad, grads, /*retain_graph=*/false, /*create_graph=*/false);
    variable_list result{at::Tensor()};  // the closure argument
    for (const auto& leaf : leaves) result.push_back(leaf.requires_grad() ? leaf.grad() : at::Tensor());
    return result;
  }
};
}  // namespace

extern "C" {

void sdkd_recompute_push(void* sink, const at::Tensor* t) { static_cast<variable_list*>(sink)->push_back(*t); }

void* sdkd_recompute_scope_new() { return new std::shared_ptr<Scope>(std::make_shared<Scope>()); }

void sdkd_recompute_scope_end(void* scope) {
  auto s = static_cast<std::shared_ptr<Scope>*>(scope);
  (*s)->alive.store(false);
  delete s;
}

// Runs `closure` on `inputs` as one checkpointed region. The outputs (new at::Tensor*, owned by
// the caller) go to a malloc'd array in *outputs, their count in *n_outputs.
char* sdkd_recompute(void* scope, sdkd_recompute_fn run, const void* closure, at::Tensor* const* inputs, int64_t n,
                     at::Tensor*** outputs, int64_t* n_outputs) {
  try {
    auto c = c10::make_intrusive<Closure>();
    c->run = run;
    c->closure = closure;
    c->scope = *static_cast<std::shared_ptr<Scope>*>(scope);
    variable_list in;
    in.reserve(n);
    for (int64_t i = 0; i < n; ++i) in.push_back(*inputs[i]);
    // A TensorList, not a vector: apply counts only TensorList elements as differentiable inputs.
    auto out = Recompute::apply(c, at::TensorList(in));
    auto array = static_cast<at::Tensor**>(std::malloc(sizeof(at::Tensor*) * (out.size() ? out.size() : 1)));
    if (!array) return error_message("out of memory");
    for (size_t i = 0; i < out.size(); ++i) array[i] = new at::Tensor(std::move(out[i]));
    *outputs = array;
    *n_outputs = static_cast<int64_t>(out.size());
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}
}
