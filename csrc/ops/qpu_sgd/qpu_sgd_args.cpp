#include "ops/qpu_sgd/qpu_sgd_args.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "ops/aliasing.h"
#include "ops/bit_pack/code_storage.h"
#include "ops/format_args.h"

namespace fxp {

namespace {
Storage storage_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return Storage::Float64;
    case at::kChar: return Storage::Int8;
    case at::kShort: return Storage::Int16;
    case at::kInt: return Storage::Int32;
    default: return Storage::Float32;
  }
}
}  // namespace

kernels::QpuSgdParams check_qpu_sgd(at::TensorList params, at::TensorList grads,
                                    at::TensorList momentum_buffers, const QpuSgdArgs& a,
                                    bool check_memory, c10::ArrayRef<NamedTensorList> scalars) {
  const char* const op = a.op;  // the overload
  check_fxp_format(op, a.total_bits, a.frac_bits);
  check_fxp_format(op, a.momentum_total_bits, a.momentum_frac_bits);
  // QPU's two roundings only: parse_rounding's message would offer floor and nearest_away too.
  TORCH_CHECK(a.rounding == "nearest_even" || a.rounding == "stochastic", op,
              ": rounding must be nearest_even (HTEQPU) or stochastic (SQPU), but got '", a.rounding, "'");
  const Rounding rounding = parse_rounding(op, a.rounding);
  MomentumForm form;
  if (a.momentum_form == "standard") {
    form = MomentumForm::Standard;
  } else if (a.momentum_form == "paper_eq6") {
    form = MomentumForm::PaperEq6;
  } else {
    TORCH_CHECK(false, op, ": unknown momentum_form '", a.momentum_form,
                "'; expected one of standard, paper_eq6");
  }
  TORCH_CHECK(a.lr >= 0 && std::isfinite(a.lr), op, ": lr must be a non-negative finite number, but got ", a.lr);
  TORCH_CHECK(a.momentum >= 0 && std::isfinite(a.momentum), op,
              ": momentum must be a non-negative finite number, but got ", a.momentum);
  TORCH_CHECK(a.weight_decay >= 0 && std::isfinite(a.weight_decay), op,
              ": weight_decay must be a non-negative finite number, but got ", a.weight_decay);
  TORCH_CHECK(!a.nesterov || (a.momentum > 0 && form == MomentumForm::Standard), op,
              ": nesterov needs momentum > 0 and momentum_form='standard'");
  TORCH_CHECK(a.step >= 0 && a.step < (int64_t{1} << 32), op, ": step must be in [0, 2^32), but got ",
              a.step);

  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": expected as many grads as params (", n, "), but got ",
              grads.size());
  const bool has_momentum = a.momentum != 0;
  TORCH_CHECK(momentum_buffers.size() == (has_momentum ? n : 0), op,
              has_momentum ? ": momentum > 0 needs one momentum buffer per param ("
                           : ": momentum == 0 takes no momentum buffers (",
              has_momentum ? n : 0, "), but got ", momentum_buffers.size());
  TORCH_CHECK(n < (size_t{1} << 31), op, ": too many tensors (", n, ")");
  // Storage: grads are float32 or float64; params and momentum buffers hold
  // floats of the grads' dtype, or codes of their format (packed storage):
  // integer codes of the value's shape or a bit stream (Note [Bit-stream
  // storage]). Each list has one dtype.
  const at::ScalarType grad_dtype = n > 0 ? grads[0].scalar_type() : at::kFloat;
  const at::ScalarType param_dtype = n > 0 ? params[0].scalar_type() : at::kFloat;
  const at::ScalarType momentum_dtype = has_momentum && n > 0 ? momentum_buffers[0].scalar_type() : grad_dtype;
  const at::ScalarType param_codes = packed_dtype(static_cast<int>(a.total_bits));
  const at::ScalarType momentum_codes = packed_dtype(static_cast<int>(a.momentum_total_bits));
  const bool param_stream = param_dtype == at::kByte, momentum_stream = momentum_dtype == at::kByte;
  TORCH_CHECK(grad_dtype == at::kFloat || grad_dtype == at::kDouble, op,
              ": grads must be float32 or float64, but got ", grad_dtype);
  TORCH_CHECK(param_dtype == grad_dtype || param_dtype == param_codes || param_stream, op, ": params must be ",
              grad_dtype, " like the grads, or ", param_codes, " codes of FxP(", a.total_bits, ",", a.frac_bits,
              ") or a uint8 bit stream of them (packed storage), but got ", param_dtype);
  TORCH_CHECK(momentum_dtype == grad_dtype || momentum_dtype == momentum_codes || momentum_stream, op,
              ": momentum_buffers must be ", grad_dtype, " like the grads, or ", momentum_codes, " codes of FxP(",
              a.momentum_total_bits, ",", a.momentum_frac_bits, ") or a uint8 bit stream of them (packed storage), "
              "but got ", momentum_dtype);
  for (size_t k = 0; k < n; ++k) {
    const at::Tensor& w = params[k];
    TORCH_CHECK(w.device() == params[0].device(), op, ": params[", k, "] is on ", w.device(),
                " but params[0] is on ", params[0].device(), "; all tensors must share one device");
    // The value's shape: the params' own, or the grads' when params are a stream.
    const c10::SymIntArrayRef value_sizes = param_stream ? grads[k].sym_sizes() : w.sym_sizes();
    const char* value_name = param_stream ? "grads" : "params";
    auto check_like = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, bool stream,
                          int64_t total_bits) {
      TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", k, "] is a ", t.layout(),
                  " tensor; the QPU step takes dense ones (a sparse gradient, as from nn.Embedding(sparse=True), "
                  "can be made dense with .to_dense())");
      TORCH_CHECK(t.device() == w.device(), op, ": ", name, "[", k, "] is on ", t.device(),
                  " but params[", k, "] is on ", w.device());
      TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", k, "] has dtype ", t.scalar_type(), " but ",
                  name, "[0] has ", dtype, "; a list has one dtype");
      if (stream) {
        const std::string arg = std::string(name) + "[" + std::to_string(k) + "]";
        check_stored_codes(op, arg.c_str(), t, total_bits, value_sizes);
      } else {
        TORCH_CHECK(t.sym_sizes() == value_sizes, op, ": ", name, "[", k, "] has shape ", t.sym_sizes(), " but ",
                    value_name, "[", k, "] has ", value_sizes);
      }
      if (check_memory) TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", k, "] must be contiguous");
    };
    check_like(w, "params", param_dtype, param_stream, a.total_bits);
    check_like(grads[k], "grads", grad_dtype, false, 0);
    if (has_momentum) check_like(momentum_buffers[k], "momentum_buffers", momentum_dtype, momentum_stream,
                                 a.momentum_total_bits);
  }
  if (check_memory) {
    std::vector<NamedTensorList> lists{{params, "params", true}, {grads, "grads", false},
                                       {momentum_buffers, "momentum_buffers", true}};
    lists.insert(lists.end(), scalars.begin(), scalars.end());
    check_no_aliasing(op, lists);
  }

  kernels::QpuSgdParams p;
  p.hyper = QpuHyper{a.lr, a.momentum, a.weight_decay, a.nesterov};
  p.total_bits = static_cast<int>(a.total_bits);
  p.frac_bits = static_cast<int>(a.frac_bits);
  p.momentum_total_bits = static_cast<int>(a.momentum_total_bits);
  p.momentum_frac_bits = static_cast<int>(a.momentum_frac_bits);
  p.rounding = rounding;
  p.form = form;
  p.seed = static_cast<uint64_t>(a.seed);
  p.step = static_cast<uint64_t>(a.step);
  p.grad_storage = storage_of(grad_dtype);
  // A stream reaches the kernels decoded into integer codes (qpu_sgd_op.h).
  p.param_storage = storage_of(param_stream ? param_codes : param_dtype);
  p.momentum_storage = storage_of(momentum_stream ? momentum_codes : momentum_dtype);
  return p;
}

void check_capturable_scalars(at::TensorList params, const at::Tensor& lr, const at::Tensor& step,
                              const at::Tensor& nan_count) {
  constexpr const char* op = "fxp::qpu_sgd_step_.capturable";
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  auto check = [&](const at::Tensor& t, const char* name, bool is_float) {
    TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
    const bool dtype_ok = is_float ? (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)
                                   : t.scalar_type() == at::kLong;
    TORCH_CHECK(dtype_ok, op, ": expected ", name, " to be ", is_float ? "float32 or float64" : "int64", ", but got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 0, op, ": expected ", name, " to be a 0-dim tensor, but got shape ", t.sizes());
    TORCH_CHECK(t.device() == device, op, ": expected ", name, " on ", device, ", the parameters' device, but got ",
                t.device());
  };
  check(lr, "lr", true);
  check(step, "step", false);
  check(nan_count, "nan_count", false);
}

void check_no_nan_results(int64_t nans, const char* op) {
  TORCH_CHECK_VALUE(nans == 0, op, ": ", nans,
                    " updated values are NaN (from a NaN or infinite gradient?); packed storage cannot hold NaN, so "
                    "those elements keep their previous codes");
}

std::vector<int64_t> qpu_stream_indices(const char* op, size_t n, at::OptionalIntArrayRef stream_indices) {
  std::vector<int64_t> streams(n);
  if (!stream_indices.has_value()) {
    for (size_t k = 0; k < n; ++k) streams[k] = static_cast<int64_t>(k);
    return streams;
  }
  TORCH_CHECK(stream_indices->size() == n, op, ": expected one stream index per param (", n, "), but got ",
              stream_indices->size());
  for (size_t k = 0; k < n; ++k) {
    streams[k] = (*stream_indices)[k];
    TORCH_CHECK(streams[k] >= 0 && streams[k] <= kernels::kMaxStreamIndex, op, ": stream_indices[", k,
                "] must be in [0, 2^31), but got ", streams[k]);
  }
  std::vector<int64_t> sorted = streams;
  std::sort(sorted.begin(), sorted.end());
  const auto repeated = std::adjacent_find(sorted.begin(), sorted.end());
  TORCH_CHECK(repeated == sorted.end(), op, ": stream index ", repeated == sorted.end() ? 0 : *repeated,
              " is given twice; two tensors would draw the same random numbers");
  return streams;
}

}  // namespace fxp
