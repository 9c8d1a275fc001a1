#include "nn/fleet.h"

#include <ATen/CPUGeneratorImpl.h>
#if defined(FXP_WITH_CUDA)
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/autograd.h>

#include <omp.h>

#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>

#include "ops/ops.h"

namespace fxp::nn {
namespace {

// The fleet's convolutions: stride 1, no padding, dilation 1.
constexpr int64_t kUnit[] = {1, 1};
constexpr int64_t kNone[] = {0, 0};

#ifndef _OPENMP
#error "fleet.cpp spreads members over the threads with at::parallel_for: build it with OpenMP"
#endif

// This task's OpenMP thread count set to 1 for the guard's lifetime. Restored
// on exit: where parallel_for runs its body inline (one member, one thread),
// the task is the caller's own, whose count must outlive the call.
class OneOpenMpThread {
 public:
  OneOpenMpThread() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneOpenMpThread() { omp_set_num_threads(saved_); }
  OneOpenMpThread(const OneOpenMpThread&) = delete;
  OneOpenMpThread& operator=(const OneOpenMpThread&) = delete;

 private:
  int saved_;
};

// fn(m) for every member: on the CPU spread over the threads, each member's
// calls on one thread (Note [Fleet calls nested in a parallel region]); on a
// GPU in order, where the calls only queue kernels. The calling thread's state
// (grad mode, the dispatcher's excluded keys) goes with each task: OpenMP's
// threads do not inherit it.
template <class Fn>
void for_each_member(const torch::Device& device, int64_t members, const Fn& fn) {
  if (!device.is_cpu()) {
    for (int64_t m = 0; m < members; ++m) fn(m);
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, members, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    const OneOpenMpThread one_thread;  // Note [Fleet calls nested in a parallel region]
    for (int64_t m = begin; m < end; ++m) fn(m);
  });
}

// Note [Fleet linear layers]
// Member m's linear layer is y[m] = h[m] W[m]^T + b[m], the solo layer's
// addmm. Autograd's bmm backward would compute W's gradient as (h^T g)^T,
// while the solo layer's addmm computes g^T h (its weight is read
// transposed); and a batched g^T h of the last layer's small 10 x 128 outputs
// takes another kernel than mm. Either way float32 results differ in the last
// bits. So the fleet layer has its own backward, in the solo layer's
// orientation and kernels: dh = g W, dW[m] = g[m]^T h[m] (one mm per member),
// db = the sum of g over the batch.
// Which products spread over the CPU threads, one member each (Note [Fleet
// thread counts]): y and dh sum over the features, which MKL does not split
// over threads at batches 1 to 64 (tested: the solo bits at 1, 4, 16 and 64 on
// 2 threads and up to 32 on 4), so up to kLinearSpreadBatch they do. At batch
// 1 a member's fc1 weights are read from memory twice a step for one
// multiply-add each, and one thread alone left the other idle for 6% of a
// fleet's time. dW sums over the batch, which MKL does split (seen at batch 4
// on 2 threads), so it spreads at batch 1 only, where it is an outer product
// with no sum; at larger batches the members' dW run one after another, each
// on every thread, as solo. Above kLinearSpreadBatch, and on a GPU, y is one
// baddbmm and dh one bmm (a loop of the same addmm and mm, on every thread:
// the same bits).
constexpr int64_t kLinearSpreadBatch = 64;

class FleetLinear : public torch::autograd::Function<FleetLinear> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& h,
                               const torch::Tensor& weight, const torch::Tensor& bias) {
    ctx->save_for_backward({h, weight});
    if (!spread(h)) return torch::baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2));
    torch::Tensor y = torch::empty({h.size(0), h.size(1), weight.size(1)}, h.options());
    for_each_member(h.device(), h.size(0), [&](int64_t m) {
      torch::Tensor rows = y.select(0, m);
      at::addmm_out(rows, bias.select(0, m), h.select(0, m), weight.select(0, m).t());
    });
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& h = saved[0];
    const torch::Tensor& weight = saved[1];
    const torch::Tensor g = grad_outputs[0];
    const int64_t k = g.size(0);
    torch::Tensor grad_weight = torch::empty(weight.sizes(), weight.options());
    auto weight_product = [&](int64_t m) {
      torch::Tensor rows = grad_weight.select(0, m);
      torch::mm_out(rows, g.select(0, m).t(), h.select(0, m));
    };
    const bool spread_products = spread(h);
    const bool spread_weight_products = spread_products && h.size(1) == 1;  // outer products
    if (!spread_weight_products) {
      for (int64_t m = 0; m < k; ++m) weight_product(m);
    }
    if (!spread_products) return {torch::bmm(g, weight), grad_weight, g.sum(1)};
    torch::Tensor grad_h = torch::empty(h.sizes(), h.options());
    for_each_member(g.device(), k, [&](int64_t m) {
      if (spread_weight_products) weight_product(m);
      torch::Tensor rows = grad_h.select(0, m);
      torch::mm_out(rows, g.select(0, m), weight.select(0, m));
    });
    return {grad_h, grad_weight, g.sum(1)};
  }

 private:
  static bool spread(const torch::Tensor& h) { return h.device().is_cpu() && h.size(1) <= kLinearSpreadBatch; }
};

// Note [Fleet calls nested in a parallel region]
// A member's calls inside for_each_member run in an OpenMP parallel region.
// ATen's own parallel_for runs inline there, but oneDNN and MKL read
// omp_get_max_threads(): oneDNN would plan a convolution for every thread,
// then run its per-thread parts one after another on this one (a weight
// gradient's cross-thread reduction then waits forever on a thread that never
// comes: seen). So each task sets its own OpenMP thread count to 1 while it
// runs the members' calls (OneOpenMpThread), and restores it: where
// parallel_for runs the body inline (a chunk of one member) the task is the
// caller's, and a count of 1 left there made the solo runs' later calls part
// from their bits (seen; tested, FleetMatchesSoloRuns.LeavesTheThreadCountAsItWas).
// Only calls whose bits do not depend on the thread count go here (Note [Fleet
// thread counts]).

// Note [Fleet member convolutions]
// A convolution with one input channel per member (a first convolution)
// would, grouped, take oneDNN's depthwise kernel, which sums the taps in
// another order than the solo convolution. So such a layer runs each
// member's convolution as a solo call on its own batch, forward and
// backward; one call per member through autograd would pay K times the
// per-op cost (and wake the thread pool K times), so this one autograd node
// runs the K solo calls: the forwards and the input gradients spread over the
// CPU threads one member each, the weight gradients one member after another
// on every thread (Note [Fleet thread counts]). Grouped
// convolutions with a few input channels per group part from the solo bits in
// float32 too (LeNet-5's 6 and 16: tested), so fleet_layers runs a layer
// grouped only where the tests show the solo bits (the paper CNN's second
// convolution, 32 per group); every other convolution runs here.
// Input [K, N, C, H, W]; output [K, N, out, H', W'] (member-major: Note [Fleet layouts]).

// Note [Fleet thread counts]
// A solo run's calls use every thread. The fleet runs a member's convolution
// forward and input gradient on one thread (for_each_member), its linear
// layers' forward and input gradient up to batch 64, and at batch 1 their
// weight gradients, and a grouped call keeps each member's reduction on one
// thread too. Their bits agree where oneDNN and mm do not split a reduction
// across threads: oneDNN's forward and input gradient sum each output inside
// one thread's kernel, and so does mm over the features (tested at batches 1 to
// 64 on 2 threads and 1 to 32 on 4, each test in a process of its own: a
// process that has already run a convolution on more threads may reuse its
// plan, so only a fresh process shows what one thread computes), and a batch-1
// linear weight gradient is an outer product, with no sum. A convolution's
// weight gradient is where oneDNN does split the sum (on one thread float64
// members at batch 4 part from their solo runs' bits), and mm a linear weight
// gradient's (float32, seen at batch 4 on 2 threads), so those run one member
// after another, each on every thread, as solo. On an AVX-512 machine
// (2026-12-05) oneDNN splits the solo second convolution's weight-gradient
// reduction at batch 64 on 4 threads (not on 2), where the paper CNN's grouped
// call keeps each member's on one: there fp32 and STE members agree with their
// solo runs to float32 rounding (about 1e-7 relative after 8 steps; tested to
// 1e-5), not bit for bit; QPU parameters, on their grid, agree until a
// rounding decision flips, then differ by grid steps.
// float64 runs were bit for bit at every batch tested.

// Note [Fleet layouts]
// A grouped convolution takes and gives [N, K*C, H, W], member m's channels
// in group m. The per-member convolutions take and give member-major
// [K, N, C, H, W] instead: there member m's activations, and their gradient
// in the backward, are one dense block, which its solo-shaped oneDNN calls
// read as they are (in the grouped layout each backward call first gathered
// its member's strided gradient: 5% of a batch-64 step), and consecutive
// per-member layers (all of LeNet-5's) need no transposes. The forward
// switches layout where the layer kind changes, after the pooling, where the
// tensor is smallest. Layouts move elements, never change them: each
// member's element i keeps its solo index for the quantization's draws.

class FleetMemberConv : public torch::autograd::Function<FleetMemberConv> {
 public:
  // bias: [K, out], or [0] for none (autograd functions take defined tensors only).
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, const torch::Tensor& bias) {
    ctx->save_for_backward({x, weight});
    const bool has_bias = bias.numel() > 0;
    ctx->saved_data["bias"] = has_bias;
    const int64_t k = x.size(0);
    std::vector<torch::Tensor> per_member(static_cast<size_t>(k));
    for_each_member(x.device(), k, [&](int64_t m) {
      per_member[static_cast<size_t>(m)] = at::conv2d(x[m], weight[m], has_bias ? bias[m] : torch::Tensor());
    });
    return torch::stack(per_member, 0);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor& weight = saved[1];
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const bool input_grad = ctx->needs_input_grad(0);
    const int64_t k = x.size(0), out = weight.size(1);
    const torch::Tensor g = grad_outputs[0].contiguous();  // [K, N, out, H', W']: each g[m] is dense
    torch::Tensor grad_x = input_grad ? torch::empty(x.sizes(), x.options()) : torch::Tensor();
    torch::Tensor grad_weight = torch::empty(weight.sizes(), weight.options());
    torch::Tensor grad_bias = has_bias ? torch::empty({k, out}, weight.options()) : torch::Tensor();
    const std::vector<int64_t> bias_sizes = {out};
    const auto bias_arg = has_bias ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt;
    if (input_grad) {
      for_each_member(x.device(), k, [&](int64_t m) {
        const auto grads = at::convolution_backward(g[m], x[m], weight[m], bias_arg, kUnit, kNone, kUnit, false,
                                                    kNone, 1, {true, false, false});
        grad_x[m].copy_(std::get<0>(grads));
      });
    }
    for (int64_t m = 0; m < k; ++m) {
      const auto grads = at::convolution_backward(g[m], x[m], weight[m], bias_arg, kUnit, kNone, kUnit, false,
                                                  kNone, 1, {false, true, has_bias});
      grad_weight[m].copy_(std::get<1>(grads));
      if (has_bias) grad_bias[m].copy_(std::get<2>(grads));
    }
    return {grad_x, grad_weight, grad_bias};
  }
};

const char* op_rounding(const std::string& act_rounding) {
  return act_rounding == "hte" ? "nearest_even" : "stochastic";
}

}  // namespace

const std::vector<FleetLayer>& fleet_layers(const std::string& model) {
  using A = FleetLayer::Activation;
  using P = FleetLayer::Pool;
  // {conv, grouped, bias, activation, pool}; Note [Fleet member convolutions] for grouped.
  static const std::vector<FleetLayer> paper_cnn = {{true, false, false, A::Relu, P::Max2},
                                                    {true, true, false, A::Relu, P::Max2},
                                                    {false, false, true, A::Relu, P::None},
                                                    {false, false, true, A::None, P::None}};
  static const std::vector<FleetLayer> lenet5 = {{true, false, true, A::Tanh, P::Avg2},
                                                 {true, false, true, A::Tanh, P::Avg2},
                                                 {true, false, true, A::Tanh, P::None},
                                                 {false, false, true, A::Tanh, P::None},
                                                 {false, false, true, A::None, P::None}};
  if (model == "paper_cnn") return paper_cnn;
  if (model == "lenet5") return lenet5;
  TORCH_CHECK(false, "fxp::nn::NetworkFleet: fleets train paper_cnn and lenet5, not ", model);
}

NetworkFleet::NetworkFleet(std::vector<std::shared_ptr<NetworkImpl>> members, std::vector<at::Generator> generators)
    : members_(std::move(members)), generators_(std::move(generators)) {
  TORCH_CHECK(!members_.empty(), "fxp::nn::NetworkFleet: a fleet needs at least one member");
  TORCH_CHECK(generators_.size() == members_.size(), "fxp::nn::NetworkFleet: ", members_.size(), " members but ",
              generators_.size(), " generators");
  layers_ = fleet_layers(members_[0]->name());
  const auto first_layers = members_[0]->quantized_layers();
  TORCH_CHECK(!first_layers.empty(), "fxp::nn::NetworkFleet: member 0 has no quantized layers");
  mode_ = first_layers[0].second->config.weight_mode;
  const auto first_shapes = members_[0]->parameters();
  size_t tensors = 0;
  for (const auto& layer : layers_) tensors += layer.tensors();
  TORCH_CHECK(first_shapes.size() == tensors, "fxp::nn::NetworkFleet: expected ", members_[0]->name(), "'s ",
              tensors, " parameter tensors, got ", first_shapes.size());
  for (size_t m = 0; m < members_.size(); ++m) {
    const auto& net = *members_[m];
    TORCH_CHECK(net.name() == members_[0]->name(), "fxp::nn::NetworkFleet: member ", m, " is a ", net.name(),
                ", member 0 a ", members_[0]->name(), "; a fleet holds one model");
    const auto layers = net.quantized_layers();
    const QuantConfig& c = layers[0].second->config;
    for (const auto& [name, layer] : layers) {
      TORCH_CHECK(layer->config.weight_mode == mode_, "fxp::nn::NetworkFleet: member ", m,
                  " has another method than member 0; a fleet holds one method");
      TORCH_CHECK(!layer->packed.weights && !layer->packed.saved_input_format,
                  "fxp::nn::NetworkFleet: packed members are not supported");
      TORCH_CHECK(layer->config.param_total_bits == c.param_total_bits &&
                      layer->config.param_frac_bits == c.param_frac_bits &&
                      layer->config.act_total_bits == c.act_total_bits &&
                      layer->config.act_frac_bits == c.act_frac_bits && layer->config.act_rounding == c.act_rounding,
                  "fxp::nn::NetworkFleet: member ", m, "'s layer ", name,
                  " has a format of its own; a fleet member has one format for all its layers");
    }
    const auto params = net.parameters();
    for (size_t k = 0; k < params.size(); ++k) {
      TORCH_CHECK(params[k].sizes() == first_shapes[k].sizes() && params[k].device() == first_shapes[k].device() &&
                      params[k].scalar_type() == first_shapes[k].scalar_type(),
                  "fxp::nn::NetworkFleet: member ", m, "'s parameter ", k, " is ", params[k].sizes(), " ",
                  params[k].scalar_type(), " on ", params[k].device(), ", member 0's ", first_shapes[k].sizes(), " ",
                  first_shapes[k].scalar_type(), " on ", first_shapes[k].device());
    }
    formats_.add(c);
  }
  stack_parameters();
}

void NetworkFleet::MemberFormats::add(const QuantConfig& c) {
  param_bits.push_back(c.param_total_bits);
  param_frac.push_back(c.param_frac_bits);
  act_bits.push_back(c.act_total_bits);
  act_frac.push_back(c.act_frac_bits);
  rounding.push_back(op_rounding(c.act_rounding));
}

NetworkFleet::MemberFormats NetworkFleet::MemberFormats::select(const std::vector<int64_t>& members) const {
  MemberFormats out;
  for (const int64_t m : members) {
    const auto i = static_cast<size_t>(m);
    out.param_bits.push_back(param_bits[i]);
    out.param_frac.push_back(param_frac[i]);
    out.act_bits.push_back(act_bits[i]);
    out.act_frac.push_back(act_frac[i]);
    out.rounding.push_back(rounding.get(i));
  }
  return out;
}

void NetworkFleet::stack_parameters() {
  torch::NoGradGuard no_grad;
  const size_t n = members_[0]->parameters().size();
  std::vector<std::vector<torch::Tensor>> per_member;
  for (const auto& net : members_) per_member.push_back(net->parameters());
  stacks_.clear();
  for (size_t k = 0; k < n; ++k) {
    std::vector<torch::Tensor> slices;
    for (const auto& params : per_member) slices.push_back(params[k]);
    stacks_.push_back(torch::stack(slices).contiguous().requires_grad_(true));
  }
  // Each member's parameters now read and write their rows of the stacks.
  for (size_t m = 0; m < members_.size(); ++m) {
    for (size_t k = 0; k < n; ++k) per_member[m][k].set_data(stacks_[k].select(0, static_cast<int64_t>(m)));
  }
}

void NetworkFleet::keep_members(const std::vector<int64_t>& keep) {
  torch::NoGradGuard no_grad;
  std::vector<bool> kept(members_.size(), false);
  for (const int64_t m : keep) {
    TORCH_CHECK(m >= 0 && m < size(), "fxp::nn::NetworkFleet: keep_members got member ", m, " of ", size());
    kept[static_cast<size_t>(m)] = true;
  }
  // The members that leave keep their last values in storage of their own.
  for (size_t m = 0; m < members_.size(); ++m) {
    if (kept[m]) continue;
    for (auto& p : members_[m]->parameters()) p.set_data(p.detach().clone());
  }
  std::vector<std::shared_ptr<NetworkImpl>> members;
  std::vector<at::Generator> generators;
  for (const int64_t m : keep) {
    members.push_back(members_[static_cast<size_t>(m)]);
    generators.push_back(generators_[static_cast<size_t>(m)]);
  }
  members_ = std::move(members), generators_ = std::move(generators);
  formats_ = formats_.select(keep);
  if (!members_.empty()) stack_parameters();  // copies the kept rows: their views read the old stacks until now
}

std::pair<std::vector<int64_t>, std::vector<int64_t>> NetworkFleet::draw_keys(const Chunk& chunk) {
  const auto k = static_cast<size_t>(chunk.range.count);
  std::vector<int64_t> seeds(k, 0), offsets(k, 0);
  for (size_t m = 0; m < k; ++m) {
    if (chunk.formats.rounding.get(m) != "stochastic") continue;  // deterministic rounding draws nothing
    at::Generator& g = generators_[static_cast<size_t>(chunk.range.first) + m];
    std::lock_guard<std::mutex> lock(g.mutex());
    if (g.device().is_cpu()) {
      // As the CPU kernels draw from a generator: one random64() key, offset 0.
      seeds[m] = static_cast<int64_t>(at::check_generator<at::CPUGeneratorImpl>(g)->random64());
    } else {
#if defined(FXP_WITH_CUDA)
      // As the CUDA kernels draw from a generator (Note [Philox offsets from a
      // generator]): an increment of 4, counter offset / 4.
      const at::PhiloxCudaState state = at::check_generator<at::CUDAGeneratorImpl>(g)->philox_cuda_state(4);
      TORCH_CHECK(!state.captured_, "fxp::nn::NetworkFleet: a fleet's step cannot be captured in a CUDA graph");
      seeds[m] = static_cast<int64_t>(state.seed_.val);
      offsets[m] = static_cast<int64_t>(state.offset_.val / 4);
#else
      TORCH_CHECK(false, "fxp::nn::NetworkFleet: this fxp build has no CUDA support");
#endif
    }
  }
  return {seeds, offsets};
}

torch::Tensor NetworkFleet::quantize(const torch::Tensor& x, int64_t member_dim, bool weights, const Chunk& chunk) {
  const auto [seeds, offsets] = draw_keys(chunk);
  const MemberFormats& f = chunk.formats;
  return quantize_members_ste(x, member_dim, weights ? f.param_bits : f.act_bits, weights ? f.param_frac : f.act_frac,
                              f.rounding, seeds, offsets);
}

torch::Tensor NetworkFleet::read_weight(const torch::Tensor& stack, const Chunk& chunk) {
  return mode_ == WeightMode::Ste ? quantize(stack, 0, /*weights=*/true, chunk) : stack;
}

torch::Tensor NetworkFleet::output(const torch::Tensor& y, int64_t member_dim, const Chunk& chunk) {
  return mode_ == WeightMode::Fp32 ? y : quantize(y, member_dim, /*weights=*/false, chunk);
}

torch::Tensor NetworkFleet::forward(const torch::Tensor& x) { return forward_members(x, {0, size()}, stacks_); }

torch::Tensor NetworkFleet::forward_members(const torch::Tensor& x, const MemberRange& range,
                                            const std::vector<torch::Tensor>& params) {
  const int64_t k = range.count;
  const auto& shape = members_[0]->input_shape();
  TORCH_CHECK(x.dim() == 5 && x.size(0) == k && x.size(2) == shape[0] && x.size(3) == shape[1] &&
                  x.size(4) == shape[2],
              "fxp::nn::NetworkFleet: expected input [", k, ", N, ", shape[0], ", ", shape[1], ", ", shape[2],
              "], got ", x.sizes());
  TORCH_CHECK(mode_ == WeightMode::Fp32 || mode_ == WeightMode::Ste || mode_ == WeightMode::Qpu,
              "fxp::nn::NetworkFleet: fleets train fp32, ste, sqpu and hteqpu");
  TORCH_CHECK(range.first >= 0 && range.count >= 1 && range.first + range.count <= size(),
              "fxp::nn::NetworkFleet: members ", range.first, " to ", range.first + range.count - 1, " of a fleet of ",
              size());
  TORCH_CHECK(params.size() == stacks_.size(), "fxp::nn::NetworkFleet: expected ", stacks_.size(),
              " parameter tensors, got ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].dim() == stacks_[i].dim() && params[i].size(0) == k &&
                    params[i].sizes().slice(1) == stacks_[i].sizes().slice(1),
                "fxp::nn::NetworkFleet: parameter ", i, " is ", params[i].sizes(), ", expected [", k, "] + ",
                stacks_[i].sizes().slice(1));
  }
  MemberFormats selected;  // a chunk's formats; the whole fleet's are formats_
  const bool whole_fleet = range.first == 0 && k == size();
  if (!whole_fleet) {
    std::vector<int64_t> members(static_cast<size_t>(k));
    std::iota(members.begin(), members.end(), range.first);
    selected = formats_.select(members);
  }
  const Chunk chunk{range, whole_fleet ? formats_ : selected};
  const int64_t n = x.size(1);
  // Note [Fleet layouts]: h is member-major [K, N, C, H, W] (the input, and
  // the per-member convolutions' outputs), grouped [N, K*C, H, W] (a grouped
  // convolution's), or [K, N, features] once the linear layers run.
  torch::Tensor h = x;
  size_t next = 0;  // the layer's first parameter
  for (size_t l = 0; l < layers_.size(); ++l) {
    const FleetLayer& layer = layers_[l];
    const torch::Tensor& w = params[next];
    // The bias first, as the solo layer reads them (the order of the draws).
    const torch::Tensor bias = layer.bias ? read_weight(params[next + 1], chunk) : torch::Tensor();
    const torch::Tensor weight = read_weight(w, chunk);
    next += layer.tensors();
    torch::Tensor y;
    if (layer.conv) {
      const int64_t out = w.size(1), in = w.size(2);
      if (!layer.grouped && k > 1) {  // Note [Fleet member convolutions]
        if (h.dim() == 4) h = h.view({n, k, in, h.size(2), h.size(3)}).transpose(0, 1);
        y = FleetMemberConv::apply(h.contiguous(), weight, layer.bias ? bias : weight.new_empty({0}));
        y = output(y.view({k, -1}), 0, chunk).view(y.sizes());
      } else {
        if (h.dim() == 5) h = h.transpose(0, 1).reshape({n, k * in, h.size(3), h.size(4)});
        y = torch::conv2d(h, weight.reshape({k * out, in, w.size(3), w.size(4)}),
                          layer.bias ? bias.reshape({k * out}) : torch::Tensor(), kUnit, kNone, kUnit,
                          k);  // stride, padding, dilation, groups
        const auto spatial = y.sizes().slice(2).vec();
        y = output(y.reshape({n, k, -1}), 1, chunk).reshape({n, k * out, spatial[0], spatial[1]});
      }
    } else {
      if (h.dim() == 5) h = h.reshape({k, n, -1});  // the solo flatten per member
      if (h.dim() == 4) h = h.reshape({n, k, -1}).transpose(0, 1);
      y = output(FleetLinear::apply(h, weight, bias), 0, chunk);  // Note [Fleet linear layers]
    }
    // Activation and pooling act per element and per plane: on either layout, as 4-D.
    const auto sizes = y.sizes().vec();
    if (y.dim() == 5) y = y.view({k * n, sizes[2], sizes[3], sizes[4]});
    if (layer.activation == FleetLayer::Activation::Relu && layer.pool == FleetLayer::Pool::Max2) {
      y = relu_max_pool2x2(y);  // as the solo network pools
    } else {
      switch (layer.activation) {
        case FleetLayer::Activation::Relu: y = torch::relu(y); break;
        case FleetLayer::Activation::Tanh: y = torch::tanh(y); break;
        case FleetLayer::Activation::None: break;
      }
      switch (layer.pool) {
        case FleetLayer::Pool::Max2: y = torch::max_pool2d(y, 2); break;
        case FleetLayer::Pool::Avg2: y = torch::avg_pool2d(y, 2); break;
        case FleetLayer::Pool::None: break;
      }
    }
    if (sizes.size() == 5) y = y.view({k, n, y.size(1), y.size(2), y.size(3)});
    h = y;
  }
  return h;
}

// Note [Fleet chunks]
// A chunk's members run forward and backward before the next chunk's, so the
// activations alive at once are one chunk's (Note [Fleet chunk size] in
// train/fleet.h says why that matters). Each chunk's parameters are fresh
// leaves viewing the stacks' rows, so its backward fills a chunk-sized grad
// (a narrow of the stacks would give every chunk a zero-filled stack-sized
// one); the chunks' grads are then copied into stack-sized grads, once per
// step, for the update that runs over all members at once. Members never
// interact, and each member's ops sum as its solo ops do whatever the number
// of members beside it (Note [Fleet forward]), so every chunk size gives the
// same bits (tested: test_fleet.cpp, test_fxp_train_fleet.py). Each member's
// draws stay in its solo order: they come from its own generator.
void NetworkFleet::forward_backward(const torch::Tensor& x, int64_t chunk, const ChunkLoss& loss_of) {
  const int64_t k = size();
  TORCH_CHECK(x.dim() == 5 && x.size(0) == k, "fxp::nn::NetworkFleet: expected input [", k,
              ", N, C, H, W], got ", x.sizes());
  TORCH_CHECK(chunk >= 0, "fxp::nn::NetworkFleet: the chunk size must be at least 0 (0: all members), got ", chunk);
  for (const auto& p : stacks_) p.mutable_grad().reset();
  if (chunk == 0 || chunk >= k) {
    loss_of(forward(x), {0, k}).backward();
    return;
  }
  std::vector<torch::Tensor> grads;  // Note [Fleet chunks]
  for (const auto& p : stacks_) grads.push_back(torch::empty_like(p, torch::MemoryFormat::Contiguous));
  for (int64_t first = 0; first < k; first += chunk) {
    const MemberRange range{first, std::min(chunk, k - first)};
    std::vector<torch::Tensor> leaves;
    for (const auto& p : stacks_) leaves.push_back(p.detach().narrow(0, first, range.count).requires_grad_(true));
    loss_of(forward_members(x.narrow(0, first, range.count), range, leaves), range).backward();
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < leaves.size(); ++i) grads[i].narrow(0, first, range.count).copy_(leaves[i].grad());
  }
  for (size_t i = 0; i < stacks_.size(); ++i) stacks_[i].mutable_grad() = grads[i];
}

}  // namespace fxp::nn
