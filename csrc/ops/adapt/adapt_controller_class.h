// torch.classes.fxp.AdaptController: AdaPT's PrecisionController for Python
// (fxp.adapt wraps it), defined in the TORCH_LIBRARY(fxp) block.
#pragma once

#include <torch/library.h>

namespace fxp {

void define_adapt_controller_class(torch::Library& m);

}  // namespace fxp
