// The quantize ops, written once over a Backend that supplies random-number
// state and a launcher. quantize_register.cpp (CPU, Meta) and
// quantize_register_cuda.cpp instantiate it and register the kernels.
//
// A Backend provides:
//   using Philox = ...;                      // what the launcher needs for SR
//   using DeviceGuard = ...;                 // constructed from x.device()
//   static constexpr bool kIsMeta;           // shapes only: no launch, no generator check
//   static constexpr bool kRunsMembersOnThreads;  // Note [Members over the threads]
//   static Philox from_generator(const std::optional<at::Generator>&, const at::Tensor& x);  // x's device's default
//   static Philox from_seed(uint64_t seed, uint64_t offset);
//   static void launch(x, out, params, philox, saturated, saturated_count);
//   static void launch_pack(x, codes, params, philox, exact, counts);  // adds PackCounts to counts (int64 [2])
//   static int64_t launch_unpack(codes, out, total_bits, frac_bits);  // codes outside the range, if checked
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/native/Resize.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ops/backend.h"
#include "ops/quantize/quantize_args.h"

namespace fxp {

template <class Backend>
struct QuantizeOps {
  using Philox = typename Backend::Philox;
  using Generator = std::optional<at::Generator>;

  // Note [Result layout]
  // A result takes x's strides when x is non-overlapping and dense (a
  // channels_last activation, a transposed weight), as torch's elementwise
  // ops do (empty_like's Preserve); a strided x (a slice) gives a dense
  // result in x's order of dimensions. The layout never changes a value:
  // Philox's element order is logical row-major (run).
  static at::Tensor empty_result(const at::Tensor& x, at::ScalarType dtype) {
    return at::empty_like(x, x.options().dtype(dtype), at::MemoryFormat::Preserve);
  }
  static at::Tensor empty_result(const at::Tensor& x) { return empty_result(x, x.scalar_type()); }

  // Quantizes x into out (same shape; any strides; out may be x), and marks
  // saturated elements in `saturated` when it is defined (out's shape).
  // Note [Quantizing in memory order]
  // The kernels number elements in memory order. That is the logical
  // row-major order the contract keys Philox by only for contiguous tensors,
  // so a stochastic rounding of any other layout runs on contiguous copies.
  // Every other rounding is elementwise and position-free: a dense x, with
  // out (and the mask) in the same strides, is quantized where it lies, so a
  // channels_last activation costs no copy.
  static void run(const at::Tensor& x, const at::Tensor& out, const kernels::QuantizeParams& params,
                  const Philox& philox, const at::Tensor& saturated = {},
                  const at::Tensor& saturated_count = {}) {
    if constexpr (Backend::kIsMeta) return;
    const bool mask_contiguous = !saturated.defined() || saturated.is_contiguous();
    const bool mask_like_x = !saturated.defined() || saturated.strides() == x.strides();
    const bool in_memory_order = params.rounding != Rounding::Stochastic && x.is_non_overlapping_and_dense() &&
                                 out.strides() == x.strides() && mask_like_x;
    if (in_memory_order || (x.is_contiguous() && out.is_contiguous() && mask_contiguous)) {
      Backend::launch(x, out, params, philox, saturated, saturated_count);
      return;
    }
    const at::Tensor x_contig = x.contiguous();
    // A strided x was copied; its copy can take the result in place.
    const at::Tensor target = out.is_contiguous() ? out
                              : x_contig.is_same(x) ? at::empty_like(x, at::MemoryFormat::Contiguous)
                                                    : x_contig;
    const at::Tensor mask =
        mask_contiguous ? saturated : at::empty_like(saturated, at::MemoryFormat::Contiguous);
    Backend::launch(x_contig, target, params, philox, mask, saturated_count);
    if (!target.is_same(out)) out.copy_(target);
    if (!mask.is_same(saturated)) saturated.copy_(mask);
  }

  static Philox philox_from_generator(const char* op, const at::Tensor& x,
                                      const kernels::QuantizeParams& params,
                                      const Generator& generator) {
    // Under FakeTensor the generator keeps its real device while x is meta.
    if constexpr (!Backend::kIsMeta) check_generator_device(op, x, generator);
    // Deterministic roundings leave the generator untouched.
    if (params.rounding != Rounding::Stochastic) return Philox{};
    return Backend::from_generator(generator, x);
  }

  static Philox philox_from_seed(const char* op, int64_t seed, int64_t offset) {
    check_philox_offset(op, offset);
    return Backend::from_seed(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  }

  static void check_out(const char* op, const at::Tensor& x, const at::Tensor& out) {
    check_same_device(op, x, out, "out");
    TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": expected out to have dtype ",
                x.scalar_type(), " like x, but got ", out.scalar_type());
    at::native::resize_output_symint(out, x.sym_sizes());
    if constexpr (!Backend::kIsMeta) {
      at::assert_no_internal_overlap(out);
      at::assert_no_partial_overlap(out, x);
    }
  }

  // Note [Check, then guard]
  // Every op checks all its arguments, and draws from the generator, before it
  // takes the device guard: with x on the CPU and out on CUDA the CUDA kernel
  // runs, and a CUDA guard for x's device would raise its own, unhelpful error
  // before check_out could say what is wrong.

  // --- generator-driven ---------------------------------------------------
  static at::Tensor quantize(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                             c10::string_view rounding, c10::string_view overflow,
                             const Generator& generator) {
    constexpr const char* op = "fxp::quantize";
    const auto params = parse_quantize_args(op, x, total_bits, frac_bits, rounding, overflow);
    const Philox philox = philox_from_generator(op, x, params, generator);
    typename Backend::DeviceGuard guard(x.device());
    at::Tensor out = empty_result(x);
    run(x, out, params, philox);
    return out;
  }

  static void quantize_(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                               c10::string_view rounding, c10::string_view overflow,
                               const Generator& generator) {
    constexpr const char* op = "fxp::quantize_";
    const auto params = parse_quantize_args(op, x, total_bits, frac_bits, rounding, overflow);
    if constexpr (!Backend::kIsMeta) at::assert_no_internal_overlap(x);
    const Philox philox = philox_from_generator(op, x, params, generator);
    typename Backend::DeviceGuard guard(x.device());
    run(x, x, params, philox);
  }

  static void quantize_out(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                  c10::string_view rounding, c10::string_view overflow,
                                  const Generator& generator, const at::Tensor& out) {
    constexpr const char* op = "fxp::quantize.out";
    const auto params = parse_quantize_args(op, x, total_bits, frac_bits, rounding, overflow);
    check_out(op, x, out);
    const Philox philox = philox_from_generator(op, x, params, generator);
    typename Backend::DeviceGuard guard(x.device());
    run(x, out, params, philox);
  }

  static std::tuple<at::Tensor, at::Tensor> quantize_stats(const at::Tensor& x, int64_t total_bits,
                                                           int64_t frac_bits, c10::string_view rounding,
                                                           c10::string_view overflow,
                                                           const Generator& generator) {
    constexpr const char* op = "fxp::quantize_stats";
    const auto params = parse_quantize_args(op, x, total_bits, frac_bits, rounding, overflow);
    const Philox philox = philox_from_generator(op, x, params, generator);
    typename Backend::DeviceGuard guard(x.device());
    at::Tensor out = empty_result(x);
    at::Tensor count = at::zeros({}, x.options().dtype(at::kLong));
    run(x, out, params, philox, {}, count);
    return {out, count};
  }

  static std::tuple<at::Tensor, at::Tensor> quantize_mask(const at::Tensor& x, int64_t total_bits,
                                                          int64_t frac_bits, c10::string_view rounding,
                                                          c10::string_view overflow,
                                                          const Generator& generator) {
    constexpr const char* op = "fxp::quantize_mask";
    const auto params = parse_quantize_args(op, x, total_bits, frac_bits, rounding, overflow);
    const Philox philox = philox_from_generator(op, x, params, generator);
    typename Backend::DeviceGuard guard(x.device());
    at::Tensor out = empty_result(x);
    at::Tensor saturated = empty_result(x, at::kBool);
    run(x, out, params, philox, saturated);
    return {out, saturated};
  }

  // Without autograd this is quantize; the Autograd kernel (quantize_register.cpp)
  // adds the straight-through gradient.
  static at::Tensor quantize_ste(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                 c10::string_view rounding, c10::string_view overflow,
                                 const Generator& generator, bool /*zero_grad_saturated*/) {
    return quantize(x, total_bits, frac_bits, rounding, overflow, generator);
  }

  // --- per member (fleets) -----------------------------------------------------
  // Note [Per-member quantization]
  // (quantize_members_ste shares these kernels; its Autograd kernel adds the
  // straight-through gradient, as quantize_ste's does.)
  // A fleet trains K runs as one, their tensors stacked along a member
  // dimension. quantize_members quantizes member m, x.select(member_dim, m),
  // exactly as quantize_seeded quantizes that slice alone, with member m's
  // format, rounding and (seed, offset): element i of a member is its
  // row-major index in its own slice, the index it has in the member's solo
  // run. So a member's bits do not depend on the fleet around it, its place
  // in it, or the layout (a member dimension that is not the first costs a
  // copy of the slice, as a strided input does). Each member is one launch of
  // the quantize kernel; a single launch over all members is for later. On
  // the CPU the members spread over the threads where every slice is dense,
  // so that run() launches on it as it is, with no copy (Note [Members over
  // the threads]; a fleet's activations at small batches give each member a
  // slice below the kernel's task size, 18,432 elements per image after the
  // paper CNN's first layer).
  static at::Tensor quantize_members(const at::Tensor& x, int64_t member_dim, at::IntArrayRef total_bits,
                                     at::IntArrayRef frac_bits, const c10::List<std::string>& rounding,
                                     at::IntArrayRef seed, at::IntArrayRef offset, c10::string_view overflow) {
    constexpr const char* op = "fxp::quantize_members";
    TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x needs a member dimension, but is a scalar");
    // at::maybe_wrap_dim's own IndexError names no op.
    TORCH_CHECK_INDEX(member_dim >= -x.dim() && member_dim < x.dim(), op, ": member_dim must be in [", -x.dim(),
                      ", ", x.dim() - 1, "] for x of shape ", x.sizes(), ", but got ", member_dim);
    const int64_t dim = at::maybe_wrap_dim(member_dim, x.dim());
    const int64_t members = x.size(dim);
    auto check_length = [&](const char* name, size_t n) {
      TORCH_CHECK_VALUE(static_cast<int64_t>(n) == members, op, ": expected one ", name, " per member (x has ",
                        members, " members along dim ", dim, "), but got ", n);
    };
    check_length("total_bits", total_bits.size());
    check_length("frac_bits", frac_bits.size());
    check_length("rounding", rounding.size());
    check_length("seed", seed.size());
    check_length("offset", offset.size());
    // Every member's arguments are checked before anything runs.
    std::vector<kernels::QuantizeParams> params;
    std::vector<Philox> philox;
    for (int64_t m = 0; m < members; ++m) {
      const std::string member_op = std::string(op) + " (member " + std::to_string(m) + ")";
      const std::string member_rounding = rounding.get(m);
      params.push_back(parse_quantize_args(member_op.c_str(), x, total_bits[m], frac_bits[m], member_rounding,
                                           overflow));
      philox.push_back(philox_from_seed(member_op.c_str(), seed[m], offset[m]));
    }
    typename Backend::DeviceGuard guard(x.device());
    at::Tensor out = empty_result(x);
    // Each member's slices, made here: the threads run no tensor ops, and
    // run() makes none on dense slices (it launches on them as they are).
    std::vector<at::Tensor> x_slices, out_slices;
    bool dense_slices = true;
    for (int64_t m = 0; m < members; ++m) {
      x_slices.push_back(x.select(dim, m));
      out_slices.push_back(out.select(dim, m));
      dense_slices = dense_slices && x_slices.back().is_contiguous() && out_slices.back().is_contiguous();
    }
    for_each_op_member(Backend::kRunsMembersOnThreads && dense_slices, members, [&](int64_t m) {
      run(x_slices[m], out_slices[m], params[m], philox[m]);
    });
    return out;
  }

  // --- explicit (seed, offset) --------------------------------------------
  static at::Tensor quantize_seeded(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                    c10::string_view rounding, int64_t seed, int64_t offset,
                                    c10::string_view overflow) {
    constexpr const char* op = "fxp::quantize_seeded";
    const auto params = parse_quantize_args(op, x, total_bits, frac_bits, rounding, overflow);
    const Philox philox = philox_from_seed(op, seed, offset);
    typename Backend::DeviceGuard guard(x.device());
    at::Tensor out = empty_result(x);
    run(x, out, params, philox);
    return out;
  }

  static void quantize_seeded_(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                      c10::string_view rounding, int64_t seed, int64_t offset,
                                      c10::string_view overflow) {
    constexpr const char* op = "fxp::quantize_seeded_";
    const auto params = parse_quantize_args(op, x, total_bits, frac_bits, rounding, overflow);
    if constexpr (!Backend::kIsMeta) at::assert_no_internal_overlap(x);
    const Philox philox = philox_from_seed(op, seed, offset);
    typename Backend::DeviceGuard guard(x.device());
    run(x, x, params, philox);
  }

  static void quantize_seeded_out(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                         c10::string_view rounding, int64_t seed, int64_t offset,
                                         c10::string_view overflow, const at::Tensor& out) {
    constexpr const char* op = "fxp::quantize_seeded.out";
    const auto params = parse_quantize_args(op, x, total_bits, frac_bits, rounding, overflow);
    check_out(op, x, out);
    const Philox philox = philox_from_seed(op, seed, offset);
    typename Backend::DeviceGuard guard(x.device());
    run(x, out, params, philox);
  }

  static std::tuple<at::Tensor, at::Tensor> quantize_seeded_stats(
      const at::Tensor& x, int64_t total_bits, int64_t frac_bits, c10::string_view rounding,
      int64_t seed, int64_t offset, c10::string_view overflow) {
    constexpr const char* op = "fxp::quantize_seeded_stats";
    const auto params = parse_quantize_args(op, x, total_bits, frac_bits, rounding, overflow);
    const Philox philox = philox_from_seed(op, seed, offset);
    typename Backend::DeviceGuard guard(x.device());
    at::Tensor out = empty_result(x);
    at::Tensor count = at::zeros({}, x.options().dtype(at::kLong));
    run(x, out, params, philox, {}, count);
    return {out, count};
  }

  // --- packed storage -------------------------------------------------------
  // Codes of FxP(B, F) in the smallest integer type that holds them.
  static at::Tensor empty_codes(const at::Tensor& x, int64_t total_bits) {
    return at::empty_symint(x.sym_sizes(), x.options()
                                               .dtype(packed_dtype(static_cast<int>(total_bits)))
                                               .memory_format(at::MemoryFormat::Contiguous));
  }

  // Note [Deferred pack checks]: without `counts` the op checks what it
  // found and raises (one device-to-host read on CUDA); with it (pack.counted)
  // it only adds the counts to that device tensor, and the caller checks them
  // where it reads the device anyway (fxp-train: Note [Deferred pack checks in
  // training]), so a training step that packs reads nothing back and can be captured.
  static at::Tensor run_pack(const char* op, const at::Tensor& x, const PackArgs& pack, const Philox& philox,
                             const at::Tensor& counts = {}) {
    at::Tensor codes = empty_codes(x, pack.params.total_bits);
    if constexpr (!Backend::kIsMeta) {
      const bool check_now = !counts.defined();
      const at::Tensor found = check_now ? at::zeros({2}, x.options().dtype(at::kLong)) : counts;
      Backend::launch_pack(x.contiguous(), codes, pack.params, philox, pack.exact, found);
      if (check_now) {
        const at::Tensor host = found.cpu();
        const int64_t* n = host.const_data_ptr<int64_t>();
        check_pack_counts(op, pack, kernels::PackCounts{n[0], n[1]}, x.numel());
      }
    }
    return codes;
  }

  static at::Tensor pack(const at::Tensor& x, int64_t total_bits, int64_t frac_bits, c10::string_view rounding,
                         c10::string_view overflow, const Generator& generator) {
    constexpr const char* op = "fxp::pack";
    const PackArgs args = parse_pack_args(op, x, total_bits, frac_bits, rounding, overflow);
    const Philox philox = philox_from_generator(op, x, args.params, generator);
    typename Backend::DeviceGuard guard(x.device());
    return run_pack(op, x, args, philox);
  }

  // pack without raising: see Note [Deferred pack checks] (run_pack).
  static at::Tensor pack_counted(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                 c10::string_view rounding, c10::string_view overflow, const Generator& generator,
                                 const at::Tensor& counts) {
    constexpr const char* op = "fxp::pack.counted";
    const PackArgs args = parse_pack_args(op, x, total_bits, frac_bits, rounding, overflow);
    check_pack_count_tensor(op, x, counts);
    const Philox philox = philox_from_generator(op, x, args.params, generator);
    typename Backend::DeviceGuard guard(x.device());
    return run_pack(op, x, args, philox, counts);
  }

  static at::Tensor pack_seeded(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                c10::string_view rounding, int64_t seed, int64_t offset,
                                c10::string_view overflow) {
    constexpr const char* op = "fxp::pack_seeded";
    const PackArgs args = parse_pack_args(op, x, total_bits, frac_bits, rounding, overflow);
    const Philox philox = philox_from_seed(op, seed, offset);
    typename Backend::DeviceGuard guard(x.device());
    return run_pack(op, x, args, philox);
  }

  static at::Tensor unpack(const at::Tensor& codes, int64_t total_bits, int64_t frac_bits,
                           std::optional<at::ScalarType> dtype) {
    constexpr const char* op = "fxp::unpack";
    const at::ScalarType out_dtype = check_unpack_args(op, codes, total_bits, frac_bits, dtype);
    typename Backend::DeviceGuard guard(codes.device());
    at::Tensor out = at::empty_symint(codes.sym_sizes(), codes.options().dtype(out_dtype).memory_format(
                                                             at::MemoryFormat::Contiguous));
    if constexpr (!Backend::kIsMeta) {
      const int64_t outside = Backend::launch_unpack(codes.contiguous(), out, static_cast<int>(total_bits),
                                                     static_cast<int>(frac_bits));
      check_codes_in_range(op, outside, codes.numel(), total_bits, frac_bits);
    }
    return out;
  }
};

// Registers every quantize op of QuantizeOps<Backend> on the library m.
#define FXP_REGISTER_QUANTIZE_OPS(m, Backend)                                   \
  do {                                                                          \
    using Ops = ::fxp::QuantizeOps<Backend>;                                    \
    (m).impl("quantize", &Ops::quantize);                                       \
    (m).impl("quantize_", &Ops::quantize_);                                     \
    (m).impl("quantize.out", &Ops::quantize_out);                               \
    (m).impl("quantize_stats", &Ops::quantize_stats);                           \
    (m).impl("quantize_mask", &Ops::quantize_mask);                             \
    (m).impl("quantize_ste", &Ops::quantize_ste);                               \
    (m).impl("quantize_seeded", &Ops::quantize_seeded);                         \
    (m).impl("quantize_seeded_", &Ops::quantize_seeded_);                       \
    (m).impl("quantize_seeded.out", &Ops::quantize_seeded_out);                 \
    (m).impl("quantize_seeded_stats", &Ops::quantize_seeded_stats);             \
    (m).impl("quantize_members", &Ops::quantize_members);                       \
    (m).impl("quantize_members_ste", &Ops::quantize_members);                   \
    (m).impl("pack", &Ops::pack);                                               \
    (m).impl("pack.counted", &Ops::pack_counted);                               \
    (m).impl("pack_seeded", &Ops::pack_seeded);                                 \
    (m).impl("unpack", &Ops::unpack);                                           \
  } while (false)

}  // namespace fxp
