// torch.classes.fxp.MsqController: MSQ's WidthController for Python
// (fxp.msq.MsqController wraps it), defined in the TORCH_LIBRARY(fxp) block.
#pragma once

#include <torch/library.h>

namespace fxp {

void define_msq_controller_class(torch::Library& m);

}  // namespace fxp
