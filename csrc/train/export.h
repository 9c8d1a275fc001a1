// MSQ's export (docs/msq.md): a trained model with each MSQ layer's weight
// stored as its RoundClamp codes, bit-packed at its own width.
#pragma once

#include <cstdint>
#include <string>

#include "msq/controller.h"
#include "nn/network.h"

namespace fxp::train {

// Note [MSQ export format]
// "FXPMSQ1\n", the header's length (8 bytes, little-endian), a JSON header,
// then each tensor's bytes in the header's order. The header lists every
// parameter and buffer of the network by name with its shape, and either
// "packed": the weight of an MSQ layer at n bits, its codes sign(w) c_n as
// (n + 1)-bit two's complement through fxp::pack_bits, with n and the scale;
// or "raw": the tensor's bytes as they are (float32 biases, batch norm, and
// its int64 counter). Decoding a packed weight gives codes * scale * 2^-n
// rounded once to float32, the value RoundClamp gave it in training, so the
// loaded network's float forward equals the trained network's bit for bit.
struct ExportSizes {
  int64_t file_bytes = 0;   // the whole file, header included
  int64_t model_bytes = 0;  // the network's parameters and buffers as they are in memory
};
ExportSizes export_msq_model(const msq::Controller& controller, const nn::NetworkImpl& network,
                             const std::string& path);

// Loads an export into a network of the same model: packed weights decoded,
// the other tensors copied. Its layers keep their weight mode (fp32 for inference).
void load_msq_export(const std::string& path, nn::NetworkImpl& network);

}  // namespace fxp::train
