// The whole C++ API of fxp: the ops (fxp::quantize, ...), the modules
// (fxp::nn) and the optimizer (fxp::optim). Installed as <fxp/fxp.h>; link
// the CMake target fxp::fxp (find_package(fxp)).
#pragma once

#include "adapt/controller.h"
#include "adapt/precision.h"
#include "msq/controller.h"
#include "msq/hessian.h"
#include "msq/width_controller.h"
#include "nn/fleet.h"
#include "nn/models.h"
#include "nn/modules.h"
#include "nn/network.h"
#include "ops/ops.h"
#include "optim/fleet_sgd.h"
#include "optim/qpu_sgd.h"
