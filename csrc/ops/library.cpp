// Every fxp op schema lives in this one TORCH_LIBRARY block. Each op family
// registers its kernels next to its implementation: csrc/ops/<family>/
// <family>_register.cpp (CPU, Meta, Autograd) and <family>_register_cuda.cpp.
#include <torch/library.h>

#include "ops/adapt/adapt_controller_class.h"
#include "ops/msq/msq_controller_class.h"

// Mutating ops (in-place `_` and `.out`) return nothing, which keeps them
// functionalizable for torch.compile; the Python and C++ wrappers return the
// mutated tensor.
TORCH_LIBRARY(fxp, m) {
  // Fixed-point fake quantization, FxP(total_bits, frac_bits); see docs/design.md.
  m.def(
      "quantize(Tensor x, int total_bits, int frac_bits, str rounding=\"nearest_even\", "
      "str overflow=\"saturate\", Generator? generator=None) -> Tensor");
  m.def(
      "quantize_(Tensor(a!) x, int total_bits, int frac_bits, str rounding=\"nearest_even\", "
      "str overflow=\"saturate\", Generator? generator=None) -> ()");
  m.def(
      "quantize.out(Tensor x, int total_bits, int frac_bits, str rounding=\"nearest_even\", "
      "str overflow=\"saturate\", Generator? generator=None, *, Tensor(a!) out) -> ()");
  // (output, number of saturated elements as an int64 0-dim tensor), one pass.
  m.def(
      "quantize_stats(Tensor x, int total_bits, int frac_bits, str rounding=\"nearest_even\", "
      "str overflow=\"saturate\", Generator? generator=None) -> (Tensor, Tensor)");
  // (output, bool tensor that is true where the element saturated), one pass.
  m.def(
      "quantize_mask(Tensor x, int total_bits, int frac_bits, str rounding=\"nearest_even\", "
      "str overflow=\"saturate\", Generator? generator=None) -> (Tensor, Tensor)");
  // Straight-through estimator: gradient passes unchanged, or zeroed where saturated.
  m.def(
      "quantize_ste(Tensor x, int total_bits, int frac_bits, str rounding=\"nearest_even\", "
      "str overflow=\"saturate\", Generator? generator=None, bool zero_grad_saturated=False) "
      "-> Tensor");
  // Explicit Philox counter: element i uses lane i % 4 of block (offset, i / 4) under key seed.
  m.def(
      "quantize_seeded(Tensor x, int total_bits, int frac_bits, str rounding, int seed, "
      "int offset, str overflow=\"saturate\") -> Tensor");
  m.def(
      "quantize_seeded_(Tensor(a!) x, int total_bits, int frac_bits, str rounding, int seed, "
      "int offset, str overflow=\"saturate\") -> ()");
  m.def(
      "quantize_seeded.out(Tensor x, int total_bits, int frac_bits, str rounding, int seed, "
      "int offset, str overflow=\"saturate\", *, Tensor(a!) out) -> ()");
  m.def(
      "quantize_seeded_stats(Tensor x, int total_bits, int frac_bits, str rounding, int seed, "
      "int offset, str overflow=\"saturate\") -> (Tensor, Tensor)");

  // Note [Per-member quantization] (ops/quantize/quantize_op.h): member m,
  // x.select(member_dim, m), as quantize_seeded quantizes it alone with the
  // m-th format, rounding, seed and offset.
  m.def(
      "quantize_members(Tensor x, int member_dim, int[] total_bits, int[] frac_bits, str[] rounding, int[] seed, "
      "int[] offset, str overflow=\"saturate\") -> Tensor");
  // The same with the straight-through gradient (it passes unchanged), for training a fleet.
  m.def(
      "quantize_members_ste(Tensor x, int member_dim, int[] total_bits, int[] frac_bits, str[] rounding, "
      "int[] seed, int[] offset, str overflow=\"saturate\") -> Tensor");

  // Packed storage (docs/design.md, "Packed storage"): integer codes of
  // FxP(total_bits, frac_bits) in int8 (B <= 8), int16 (B <= 16) or int32.
  // pack rounds like quantize, saturating to the format's exact bounds; NaN is
  // an error that gives the count. unpack returns codes * 2^-frac_bits.
  m.def(
      "pack(Tensor x, int total_bits, int frac_bits, str rounding=\"nearest_even\", "
      "str overflow=\"saturate\", Generator? generator=None) -> Tensor");
  // Note [Deferred pack checks]: adds (NaN, off-grid) to counts (int64 [2] on
  // x's device) instead of raising, so nothing is read back to the host.
  m.def(
      "pack.counted(Tensor x, int total_bits, int frac_bits, str rounding=\"nearest_even\", "
      "str overflow=\"saturate\", Generator? generator=None, *, Tensor(a!) counts) -> Tensor");
  m.def(
      "pack_seeded(Tensor x, int total_bits, int frac_bits, str rounding, int seed, int offset, "
      "str overflow=\"saturate\") -> Tensor");
  m.def("unpack(Tensor codes, int total_bits, int frac_bits, ScalarType? dtype=None) -> Tensor");
  // Bit-packed storage (Note [Bit-packed codes], kernels/bit_pack): integer
  // codes of `bits` bits each (1 to 16; two's complement when is_signed, else
  // unsigned), element i in bits [i * bits, (i + 1) * bits) of a little-endian
  // bit stream, as uint8 of ceil(numel * bits / 8) bytes. A code outside the
  // range is an error that gives the count. unpack_bits returns the codes with
  // the given shape, as dtype (default: the smallest of int8, int16 and int32
  // that holds every code). check_range=False skips the range check, and with
  // it CUDA's read-back, for codes known to be in range (an out-of-range
  // code's low bits are stored).
  m.def("pack_bits(Tensor codes, int bits, bool is_signed=True, bool check_range=True) -> Tensor");
  m.def("unpack_bits(Tensor packed, int bits, int[] size, bool is_signed=True, ScalarType? dtype=None) -> Tensor");
  // How packed storage keeps FxP(total_bits, .) codes (Note [Bit-stream
  // storage], csrc/ops/bit_pack/code_storage.h): store_codes returns the
  // stored form of integer codes (a bit stream for widths up to 16 other than
  // 8 and 16, else a copy of the codes); load_codes returns the integer codes,
  // of shape `size`, that a stored form holds (a copy when it is not a stream).
  m.def("store_codes(Tensor codes, int total_bits) -> Tensor");
  m.def("load_codes(Tensor stored, int total_bits, int[] size) -> Tensor");

  // The conv and linear of quantized layers: torch's linear / conv2d, with
  // packed storage (Note [Packed saved inputs]). weight_codes and bias_codes
  // (codes of param_format) replace the values of weight and bias, which then
  // only carry shape and dtype and receive the gradients. With input_format,
  // the autograd saves x as codes of that format, which x must lie on. With
  // output_format, the output is quantized in place (saturate), as
  // quantize_ste would, with a straight-through gradient and no extra copy.
  // The .counted overloads take pack_counts (int64 [2] on x's device): saving
  // x adds its (NaN, off-grid) counts there instead of raising (Note
  // [Deferred pack checks]). Overloads, not an optional argument: inductor
  // (torch 2.11) fails on a mutable optional tensor argument given as None.
  m.def(
      "linear(Tensor x, Tensor weight, Tensor? bias=None, int[]? input_format=None, "
      "Tensor? weight_codes=None, Tensor? bias_codes=None, int[]? param_format=None, "
      "int[]? output_format=None, str output_rounding=\"nearest_even\", Generator? generator=None) -> Tensor");
  m.def(
      "linear.counted(Tensor x, Tensor weight, Tensor? bias=None, int[]? input_format=None, "
      "Tensor? weight_codes=None, Tensor? bias_codes=None, int[]? param_format=None, "
      "int[]? output_format=None, str output_rounding=\"nearest_even\", Generator? generator=None, *, "
      "Tensor(a!) pack_counts) -> Tensor");
  m.def(
      "conv2d(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1, int[]? input_format=None, Tensor? weight_codes=None, "
      "Tensor? bias_codes=None, int[]? param_format=None, int[]? output_format=None, "
      "str output_rounding=\"nearest_even\", Generator? generator=None) -> Tensor");
  m.def(
      "conv2d.counted(Tensor x, Tensor weight, Tensor? bias=None, int[2] stride=1, int[2] padding=0, "
      "int[2] dilation=1, int groups=1, int[]? input_format=None, Tensor? weight_codes=None, "
      "Tensor? bias_codes=None, int[]? param_format=None, int[]? output_format=None, "
      "str output_rounding=\"nearest_even\", Generator? generator=None, *, Tensor(a!) pack_counts) -> Tensor");
  // max_pool2d(relu(x), kernel_size) over non-overlapping windows, whose
  // autograd saves one byte per output (Note [Fused ReLU and max-pool])
  // instead of relu's output and the pool's int64 indices.
  m.def("relu_max_pool2d(Tensor x, int[2] kernel_size) -> Tensor");
  // Its parts: the output with each output's window position of the maximum
  // (uint8; 255: not positive), and the gradient from those positions.
  m.def("relu_max_pool2d_with_positions(Tensor x, int[2] kernel_size) -> (Tensor, Tensor)");
  m.def(
      "relu_max_pool2d_backward(Tensor grad_out, Tensor positions, int[2] kernel_size, SymInt[4] input_size) "
      "-> Tensor");

  // AdaPT's push-down histogram (Note [Fused quantize and histogram]): int64
  // counts of x in `bins` equal bins over [min, max], torch.histc's in float64, with
  // values beyond the range in the end bins and NaN nowhere. With format
  // [total_bits, frac_bits], x is first rounded half to even to FxP(total_bits,
  // frac_bits) (total_bits 0: no saturation), in the same pass.
  m.def("format_histogram(Tensor x, int bins, float min, float max, int[]? format=None) -> Tensor");

  // The fused QPU SGD step over a parameter group (docs/design.md, "Methods"):
  // updates params and momentum_buffers in place and returns int64 counts
  // [len(params), 2] of (saturated, vanished) elements per tensor. Random
  // numbers come from (seed, step) and each tensor's stream index: its entry
  // of stream_indices (the optimizers pass its position in the parameter
  // group), or by default its position in params (Note [QPU random streams]).
  m.def(
      "qpu_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "float lr, float momentum, float weight_decay, bool nesterov, int total_bits, int frac_bits, "
      "int momentum_total_bits, int momentum_frac_bits, str rounding, int seed, int step, "
      "str momentum_form=\"standard\", int[]? stream_indices=None) -> Tensor");
  // The same step with lr (float32 or float64) and step (int64) as 0-dim
  // tensors on the parameters' device, so that it needs nothing from the host
  // and a CUDA graph can capture it (Note [Capturable QPU step]): the step
  // draws from step's value and then adds 1 to it; packed storage's NaN
  // results are added to nan_count instead of raising.
  m.def(
      "qpu_sgd_step_.capturable(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor lr, Tensor(c!) step, Tensor(d!) nan_count, float momentum, float weight_decay, bool nesterov, "
      "int total_bits, int frac_bits, int momentum_total_bits, int momentum_frac_bits, str rounding, int seed, "
      "str momentum_form=\"standard\", int[]? stream_indices=None) -> Tensor");
  // AdaPT without a master copy (Note [AdaPT's fused QPU step]): the plain step
  // on each gradient normalized as normalize_accumulate_ normalizes it (with
  // L1's term, divided by norms[layers[k]]), which is added to accumulated in
  // the same pass; grads are only read. Float storage only.
  m.def(
      "qpu_sgd_step_.adapt(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] accumulated, Tensor norms, int[] layers, float l1, "
      "float lr, float momentum, float weight_decay, bool nesterov, int total_bits, int frac_bits, "
      "int momentum_total_bits, int momentum_frac_bits, str rounding, int seed, int step, "
      "str momentum_form=\"standard\", int[]? stream_indices=None) -> Tensor");
  // Note [Per-member QPU step] (ops/qpu_sgd/qpu_sgd_op.h): a fleet's tensors
  // stacked along dim 0; each active member stepped exactly as qpu_sgd_step_
  // steps its solo run, with its own hyperparameters, formats and stream.
  // Returns int64 counts [members, len(params), 2].
  m.def(
      "qpu_sgd_members_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float[] lr, "
      "float[] momentum, float[] weight_decay, bool nesterov, int[] total_bits, int[] frac_bits, "
      "int[] momentum_total_bits, int[] momentum_frac_bits, str[] rounding, int[] seed, int[] step, bool[] active, "
      "str momentum_form=\"standard\", int[]? stream_indices=None) -> Tensor");
  // QPU's initialization (Note [QPU initialization]): params[k] rounded in place
  // onto FxP(total_bits[k], frac_bits[k]) with Philox key seed + 0x9E3779B97F4A7C15 and offset k.
  m.def(
      "quantize_parameters_(Tensor(a!)[] params, int[] total_bits, int[] frac_bits, str rounding, int seed) -> ()");
  // A parameter group's move to FxP(total_bits, frac_bits) (Note [QPU format
  // change]): params (the whole group, in order) rounded in place onto it, and
  // momentum_buffers[j], the buffer of params[momentum_positions[j]], too;
  // step is the group's steps so far.
  m.def(
      "qpu_change_format_(Tensor(a!)[] params, Tensor(b!)[] momentum_buffers, int[] momentum_positions, "
      "int total_bits, int frac_bits, str rounding, int seed, int step) -> ()");

  // AdaPT's per-step gradient work (Note [AdaPT's fused step]). layers[k] is
  // tensor k's layer. layer_gradient_norms: float64 [num_layers], the norm of
  // each layer's gradients with L1's term l1 * sign(param), summed in a fixed
  // order (Note [Deterministic gradient norms]). normalize_accumulate_: each
  // such gradient divided by its layer's norm (Eq. 3.4), written to grads and
  // added to accumulated (Eq. 3.5). adapt_sgd_step_: the same normalized
  // gradient added to accumulated and applied by SGD (torch.optim.SGD's
  // formula, dampening 0) in the same pass; grads are only read.
  m.def("layer_gradient_norms(Tensor[] params, Tensor[] grads, int[] layers, int num_layers, float l1=0.) -> Tensor");
  m.def(
      "normalize_accumulate_(Tensor(a!)[] grads, Tensor(b!)[] accumulated, Tensor[] params, Tensor norms, "
      "int[] layers, float l1=0.) -> ()");
  m.def(
      "adapt_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] accumulated, Tensor norms, int[] layers, float l1, float lr, float momentum=0., "
      "float weight_decay=0., bool nesterov=False) -> ()");

  // MSQ's RoundClamp quantizer (Note [RoundClamp], kernels/round_clamp): w's
  // magnitude over scale rounded half to even at `bits` bits (1 to 16) and
  // clamped to the largest code, with w's sign. round_clamp returns (the
  // quantized weights, the L1 norm of their LSBs as a 0-dim tensor of w's
  // dtype, the count of non-zero LSBs as int64), in one pass; the LSB is the
  // difference between the value at `bits` and at bits - 1. Its gradient is
  // straight through: d quantized / dw = 1, d lsb_l1 / dw = sign(LSB).
  // round_clamp_lsb: the LSBs themselves (straight through). round_clamp_codes:
  // the signed integer codes (int8 for bits <= 7, int16 for bits <= 15, else int32).
  m.def("round_clamp(Tensor w, float scale, int bits) -> (Tensor, Tensor, Tensor)");
  m.def("round_clamp_lsb(Tensor w, float scale, int bits) -> Tensor");
  m.def("round_clamp_codes(Tensor w, float scale, int bits) -> Tensor");
  // round_clamp's backward: grad_quantized + grad_lsb_l1 * sign(LSB(w)).
  m.def("round_clamp_backward(Tensor grad_quantized, Tensor grad_lsb_l1, Tensor w, float scale, int bits) -> Tensor");

  // AdaPT's controller over plain parameter lists, for Python (fxp.adapt):
  // torch.classes.fxp.AdaptController (csrc/ops/adapt, csrc/adapt/precision_controller.h).
  fxp::define_adapt_controller_class(m);
  // MSQ's widths, penalty and pruning checks over plain weight lists, for Python
  // (fxp.msq): torch.classes.fxp.MsqController (csrc/ops/msq, csrc/msq/width_controller.h).
  fxp::define_msq_controller_class(m);
}
