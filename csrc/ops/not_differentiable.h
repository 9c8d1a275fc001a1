// The autograd of ops without a gradient (Note [Ops without a gradient] in
// not_differentiable.cpp), registered by each op family for its own ops.
#pragma once

#include <torch/library.h>

#include <initializer_list>

namespace fxp {

// In a TORCH_LIBRARY_IMPL(fxp, Autograd, m) block: backward through these ops
// raises, pointing to quantize_ste; in-place ones refuse leaves that require grad.
void register_not_differentiable(torch::Library& m, std::initializer_list<const char*> ops);

// In a TORCH_LIBRARY_IMPL(fxp, ADInplaceOrView, m) block, for ops that write
// their arguments: bumps the autograd version of every tensor they write.
void register_version_bump(torch::Library& m, std::initializer_list<const char*> ops);

}  // namespace fxp
