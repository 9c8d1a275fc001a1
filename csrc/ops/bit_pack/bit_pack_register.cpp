// fxp::pack_bits and fxp::unpack_bits's registrations: CPU, Meta and Autograd
// (CUDA in bit_pack_register_cuda.cpp). The ops are written once in bit_pack_op.h.
// fxp::store_codes and fxp::load_codes, on every backend through those two.
#include <torch/library.h>

#include "ops/backend.h"
#include "ops/bit_pack/bit_pack_op.h"
#include "ops/bit_pack/code_storage.h"
#include "ops/format_args.h"
#include "ops/not_differentiable.h"

namespace fxp {
namespace {

struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static constexpr auto pack = &kernels::pack_bits_cpu;
  static constexpr auto unpack = &kernels::unpack_bits_cpu;
};

// Shapes and checks only (the kernels it names are never called; codes are not range-checked).
struct MetaBackend : CpuBackend {
  static constexpr bool kIsMeta = true;
};

// Integer codes of a width kept as integers must have its dtype (pack's).
void check_integer_codes(const char* op, const char* name, const at::Tensor& codes, int64_t total_bits) {
  const at::ScalarType expected = packed_dtype(static_cast<int>(total_bits));
  TORCH_CHECK(codes.scalar_type() == expected, op, ": ", name, " must be ", expected, " codes of ", total_bits,
              " bits", stores_bit_stream(total_bits) ? " (or a uint8 bit stream)" : "", ", but got ",
              codes.scalar_type());
}

// The ops return new tensors (a schema without alias annotations promises that).
at::Tensor store_codes_op(const at::Tensor& codes, int64_t total_bits) {
  constexpr const char* op = "fxp::store_codes";
  check_fxp_format(op, total_bits, 0);
  // A stream's width range-checks the codes (pack_bits); integer codes keep pack's dtype.
  if (!stores_bit_stream(total_bits)) check_integer_codes(op, "codes", codes, total_bits);
  const at::Tensor stored = store_codes(codes, total_bits);
  return stored.is_same(codes) ? codes.clone() : stored;
}

at::Tensor load_codes_op(const at::Tensor& stored, int64_t total_bits, at::IntArrayRef size) {
  constexpr const char* op = "fxp::load_codes";
  check_fxp_format(op, total_bits, 0);
  if (!is_bit_stream(stored)) check_integer_codes(op, "stored", stored, total_bits);
  check_stored_codes(op, "stored", stored, total_bits, c10::fromIntArrayRefSlow(size));
  const at::Tensor codes = load_codes(stored, total_bits, size);
  return codes.is_same(stored) ? stored.clone() : codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CompositeExplicitAutograd, m) {
  m.impl("store_codes", &store_codes_op);
  m.impl("load_codes", &load_codes_op);
}

TORCH_LIBRARY_IMPL(fxp, CPU, m) { FXP_REGISTER_BIT_PACK_OPS(m, CpuBackend); }

TORCH_LIBRARY_IMPL(fxp, Meta, m) { FXP_REGISTER_BIT_PACK_OPS(m, MetaBackend); }

TORCH_LIBRARY_IMPL(fxp, Autograd, m) { register_not_differentiable(m, {"pack_bits", "unpack_bits", "store_codes", "load_codes"}); }

}  // namespace fxp
