#include "ops/bit_pack/code_storage.h"

#include <ATen/ATen.h>

#include "bit_pack/bit_pack_math.h"
#include "ops/format_args.h"
#include "ops/ops.h"

namespace fxp {

bool stores_bit_stream(int64_t total_bits) {
  return total_bits >= kMinPackBits && total_bits <= kMaxPackBits && total_bits % 8 != 0;
}

bool is_bit_stream(const at::Tensor& stored) { return stored.scalar_type() == at::kByte; }

at::Tensor store_codes(const at::Tensor& codes, int64_t total_bits, bool check_range) {
  return stores_bit_stream(total_bits) ? pack_bits(codes, total_bits, /*is_signed=*/true, check_range) : codes;
}

at::Tensor stored_zeros(at::IntArrayRef sizes, int64_t total_bits, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (stores_bit_stream(total_bits)) {
    return at::zeros({packed_byte_count(numel, static_cast<int>(total_bits))}, options.dtype(at::kByte));
  }
  return at::zeros(sizes, options.dtype(packed_dtype(static_cast<int>(total_bits))));
}

void check_stored_codes(const char* op, const char* name, const at::Tensor& stored, int64_t total_bits,
                        c10::SymIntArrayRef sizes) {
  for (const auto& d : sizes) {
    TORCH_CHECK(d >= 0, op, ": the shape of ", name, "'s value must not be negative, but got ", sizes);
  }
  if (is_bit_stream(stored)) {
    TORCH_CHECK(total_bits <= kMaxPackBits, op, ": ", name, " is a bit stream (uint8), but codes of ", total_bits,
                " bits are stored as ", packed_dtype(static_cast<int>(total_bits)), " (streams hold at most ", kMaxPackBits, " bits)");
    c10::SymInt numel = 1;
    for (const auto& d : sizes) numel *= d;
    const c10::SymInt bytes = (numel * total_bits + 7) / 8;
    TORCH_CHECK(stored.dim() == 1 && stored.sym_size(0) == bytes, op, ": ", name, " is a bit stream (uint8) of ",
                total_bits, "-bit codes for shape ", sizes, ", so it must be 1-D with ", bytes,
                " bytes, but it has shape ", stored.sym_sizes());
    return;
  }
  TORCH_CHECK(stored.sym_sizes() == sizes, op, ": ", name, " has shape ", stored.sym_sizes(), " but the value has ",
              sizes);
}

at::Tensor load_codes(const at::Tensor& stored, int64_t total_bits, at::IntArrayRef sizes) {
  if (!is_bit_stream(stored)) return stored;
  return unpack_bits(stored, total_bits, sizes, /*is_signed=*/true, packed_dtype(static_cast<int>(total_bits)));
}

void assign_codes(const at::Tensor& stored, const at::Tensor& codes, int64_t total_bits) {
  if (is_bit_stream(stored)) {
    stored.copy_(pack_bits(codes, total_bits, /*is_signed=*/true, /*check_range=*/false));
  } else if (!stored.is_same(codes)) {
    stored.copy_(codes);
  }
}

}  // namespace fxp
