// Autograd and ADInplaceOrView kernels of the ops that have no gradient; each
// op family registers its own (not_differentiable.h).
//
// Note [Ops without a gradient]
// Without these kernels torch's default autograd fallback only warns when a
// backward reaches such an op and leaves the gradient None, and in-place ops
// never bump the autograd version counter, so a backward through a tensor
// that an fxp op modified in place silently used the modified values. Here:
// - an in-place op (quantize_, quantize_seeded_, the QPU step) bumps the
//   version counter of every tensor it writes, as ATen's in-place ops do, so
//   autograd raises "modified by an inplace operation" where it must;
// - in grad mode, an in-place op on a leaf that requires grad raises, as ATen's do;
// - an out= op whose arguments require grad raises, as ATen's do;
// - outputs (and tensors written in place) of a call whose inputs require
//   grad get an Error node: the forward works, and a backward through it
//   raises and points to quantize_ste, the op with a (straight-through) gradient.
// The ops with gradients (quantize_ste, linear, conv2d, relu_max_pool2d and
// relu_max_pool2d_backward) register their own Autograd kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops/not_differentiable.h"

namespace fxp {
namespace {

// The tensors among an op's arguments (on the stack), and those it writes.
struct TensorArguments {
  std::vector<at::Tensor> requiring_grad, written;
};

TensorArguments tensor_arguments(const c10::FunctionSchema& schema, const torch::jit::Stack& stack) {
  TensorArguments out;
  const auto& arguments = schema.arguments();
  const auto values = torch::jit::last(stack, arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    const bool written = arguments[i].alias_info() != nullptr && arguments[i].alias_info()->isWrite();
    auto visit = [&](const at::Tensor& t) {
      if (!t.defined()) return;
      if (t.requires_grad()) out.requiring_grad.push_back(t);
      if (written) out.written.push_back(t);
    };
    if (values[i].isTensor()) {
      visit(values[i].toTensor());
    } else if (values[i].isTensorList()) {
      for (at::Tensor t : values[i].toTensorList()) visit(t);  // a list element converts to a temporary
    }
  }
  return out;
}

std::string not_differentiable_message(const c10::OperatorHandle& op) {
  return op.schema().name() + " is not differentiable. For a straight-through gradient use fxp::quantize_ste " +
         "(fxp.quantize_ste in Python); to quantize without a gradient, pass a tensor that does not require grad " +
         "(x.detach()) or call it under torch.no_grad()";
}

void autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const TensorArguments args = tensor_arguments(op.schema(), *stack);
  const bool needs_history = at::GradMode::is_enabled() && !args.requiring_grad.empty();
  if (at::GradMode::is_enabled()) {
    if (needs_history && op.schema().overload_name() == "out") {
      torch::autograd::throw_error_out_requires_grad(op.schema().name().c_str());
    }
    for (const at::Tensor& t : args.written) torch::autograd::check_inplace(t, needs_history);
  }
  {
    at::AutoDispatchBelowAutograd guard;
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  }
  if (!needs_history) return;
  std::shared_ptr<torch::autograd::Error> node(
      new torch::autograd::Error(not_differentiable_message(op),
                                 torch::autograd::collect_next_edges(args.requiring_grad)),
      torch::autograd::deleteNode);
  for (const c10::IValue& result : torch::jit::last(*stack, op.schema().returns().size())) {
    if (result.isTensor() && torch::autograd::isDifferentiableType(result.toTensor().scalar_type())) {
      torch::autograd::set_history(result.toTensor(), node);
    }
  }
  for (const at::Tensor& t : args.written) {
    if (torch::autograd::isDifferentiableType(t.scalar_type())) torch::autograd::rebase_history(t, node);
  }
}

void inplace_or_view_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const std::vector<at::Tensor> written = tensor_arguments(op.schema(), *stack).written;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::increment_version(t);
}

}  // namespace

void register_not_differentiable(torch::Library& m, std::initializer_list<const char*> ops) {
  for (const char* op : ops) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autograd_kernel>());
}

void register_version_bump(torch::Library& m, std::initializer_list<const char*> ops) {
  for (const char* op : ops) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&inplace_or_view_kernel>());
}

}  // namespace fxp
