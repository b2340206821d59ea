// Whole-sequence RNN, LSTM and GRU kernels for XLA:CPU, on oneDNN's RNN primitives.
//
// Two XLA FFI handlers, one per direction of BPTT:
//
//   bptt_rnn_forward(xs, h0, c0, W, U, bias) -> (hs, h_T, c_T, workspace)
//   bptt_rnn_backward(xs, h0, c0, W, U, bias, hs, h_T, c_T, workspace, dhs, dh_T, dc_T)
//       -> (dxs, dh0, dc0, dW, dU, dbias)
//
// Every array is float32 and in the layouts oneDNN reads directly: time-major
// sequences [T, B, C] (tnc), states [B, H] (ldnc with L = D = 1), weights
// [D, G*H] and [H, G*H] (ldigo), bias [G', H] (ldgo). The gate blocks are in
// oneDNN's order; the caller permutes them (bptt_jax/_kernel.py). c0 and c_T
// are empty except for the LSTM. The attribute `kind` is 0 (tanh RNN), 1 (ReLU
// RNN), 2 (LSTM) or 3 (GRU, linear before reset); `training` is 0 (inference,
// no workspace) or 1 (the workspace that the backward pass reads is written).
//
// Primitives are built once per (kind, T, B, D, H) and cached; weights are
// reordered into the layout each primitive prefers on every call (O(weights),
// small beside the sequence). The scratchpad and the reordered weights live in
// kept buffers grown as needed (kept.h: a set per call running at once):
// allocating them per call would hand the primitive fresh pages to fault in on
// every step of training. oneDNN's backward
// pass accumulates into the weight gradients: they are zeroed first.

#include <omp.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "kept.h"
#include "rnn_calls.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

enum Kind : int64_t { kRnnTanh = 0, kRnnRelu = 1, kLstm = 2, kGru = 3 };

int64_t Gates(int64_t kind) { return kind == kLstm ? 4 : kind == kGru ? 3 : 1; }
int64_t BiasGates(int64_t kind) { return kind == kGru ? 4 : Gates(kind); }

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>;  // kind, T, B, D, H

// The descriptors of one shape and its three primitives.
struct Plan {
  memory::desc src_layer, state, weights_layer, weights_iter, bias, dst_layer;
  dnnl::primitive_desc train_pd, infer_pd, backward_pd;
  dnnl::primitive train, infer, backward;
};

memory::desc Md(memory::dims dims, tag format) { return memory::desc(dims, dt::f32, format); }

std::unique_ptr<Plan> MakePlan(const Key& key) {
  auto [kind, T, B, D, H] = key;
  auto& eng = Engine();
  auto plan = std::make_unique<Plan>();
  const int64_t G = Gates(kind);
  plan->src_layer = Md({T, B, D}, tag::tnc);
  plan->state = Md({1, 1, B, H}, tag::ldnc);
  plan->weights_layer = Md({1, 1, D, G, H}, tag::ldigo);
  plan->weights_iter = Md({1, 1, H, G, H}, tag::ldigo);
  plan->bias = Md({1, 1, BiasGates(kind), H}, tag::ldgo);
  plan->dst_layer = Md({T, B, H}, tag::tnc);
  const auto any_layer = Md({1, 1, D, G, H}, tag::any);
  const auto any_iter = Md({1, 1, H, G, H}, tag::any);
  const auto& s = plan->state;
  const auto dir = dnnl::rnn_direction::unidirectional_left2right;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto fwd = dnnl::prop_kind::forward_training;
  const auto inf = dnnl::prop_kind::forward_inference;
  const auto bwd = dnnl::prop_kind::backward;

  if (kind == kLstm) {
    using F = dnnl::lstm_forward;
    using Bw = dnnl::lstm_backward;
    F::primitive_desc train(eng, fwd, dir, plan->src_layer, s, s, any_layer, any_iter,
                            plan->bias, plan->dst_layer, s, s, attr);
    F::primitive_desc infer(eng, inf, dir, plan->src_layer, s, s, any_layer, any_iter,
                            plan->bias, plan->dst_layer, s, s, attr);
    Bw::primitive_desc back(eng, bwd, dir, plan->src_layer, s, s, any_layer, any_iter,
                            plan->bias, plan->dst_layer, s, s, plan->src_layer, s, s,
                            plan->weights_layer, plan->weights_iter, plan->bias,
                            plan->dst_layer, s, s, train, attr);
    plan->train_pd = train, plan->infer_pd = infer, plan->backward_pd = back;
  } else if (kind == kGru) {
    using F = dnnl::lbr_gru_forward;
    using Bw = dnnl::lbr_gru_backward;
    F::primitive_desc train(eng, fwd, dir, plan->src_layer, s, any_layer, any_iter, plan->bias,
                            plan->dst_layer, s, attr);
    F::primitive_desc infer(eng, inf, dir, plan->src_layer, s, any_layer, any_iter, plan->bias,
                            plan->dst_layer, s, attr);
    Bw::primitive_desc back(eng, bwd, dir, plan->src_layer, s, any_layer, any_iter, plan->bias,
                            plan->dst_layer, s, plan->src_layer, s, plan->weights_layer,
                            plan->weights_iter, plan->bias, plan->dst_layer, s, train, attr);
    plan->train_pd = train, plan->infer_pd = infer, plan->backward_pd = back;
  } else {
    using F = dnnl::vanilla_rnn_forward;
    using Bw = dnnl::vanilla_rnn_backward;
    const auto act =
        kind == kRnnTanh ? dnnl::algorithm::eltwise_tanh : dnnl::algorithm::eltwise_relu;
    F::primitive_desc train(eng, fwd, act, dir, plan->src_layer, s, any_layer, any_iter,
                            plan->bias, plan->dst_layer, s, attr);
    F::primitive_desc infer(eng, inf, act, dir, plan->src_layer, s, any_layer, any_iter,
                            plan->bias, plan->dst_layer, s, attr);
    Bw::primitive_desc back(eng, bwd, act, dir, plan->src_layer, s, any_layer, any_iter,
                            plan->bias, plan->dst_layer, s, plan->src_layer, s,
                            plan->weights_layer, plan->weights_iter, plan->bias,
                            plan->dst_layer, s, train, attr);
    plan->train_pd = train, plan->infer_pd = infer, plan->backward_pd = back;
  }
  plan->train = dnnl::primitive(plan->train_pd);
  plan->infer = dnnl::primitive(plan->infer_pd);
  plan->backward = dnnl::primitive(plan->backward_pd);
  return plan;
}

Plan& GetPlan(const Key& key) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, MakePlan(key)).first;
  return *it->second;
}

memory::desc ArgMd(const dnnl::primitive_desc& pd, int arg) {
  return pd.query_md(dnnl::query::exec_arg_md, arg);
}

// `user` in the layout the primitive wants for `arg`: `user` itself, or a reordered copy.
memory Prepared(const dnnl::primitive_desc& pd, int arg, const memory& user, dnnl::stream& s) {
  const auto want = ArgMd(pd, arg);
  if (want == user.get_desc()) return user;
  const KeptSlot slot = arg == DNNL_ARG_WEIGHTS_LAYER ? kWeightsLayer : kWeightsIter;
  memory copy(want, Engine(), Kept(slot, want.get_size()));
  dnnl::reorder(user, copy).execute(s, const_cast<memory&>(user), copy);
  return copy;
}

memory Wrap(const memory::desc& md, const void* data) {
  return memory(md, Engine(), const_cast<void*>(data));
}

Key KeyOf(int64_t kind, ffi::Buffer<ffi::F32>& xs, ffi::Buffer<ffi::F32>& h0) {
  auto x = xs.dimensions();
  return Key{kind, x[0], x[1], x[2], h0.dimensions()[1]};
}

ffi::Error CheckKind(int64_t kind, int64_t batch_major, ffi::Buffer<ffi::S32>& lengths) {
  if (kind < kRnnTanh || kind > kGru)
    return ffi::Error::InvalidArgument("bptt_rnn: kind must be 0..3, got " + std::to_string(kind));
  if (batch_major != 0)
    return ffi::Error::InvalidArgument("bptt_rnn: the oneDNN kernels take time-major sequences");
  if (lengths.element_count() != 0)
    return ffi::Error::InvalidArgument("bptt_rnn: the oneDNN kernels take no lengths");
  return ffi::Error::Success();
}

// The arguments the forward and the backward primitive share: the sequence, the
// starting state, the weights (in the primitive's layout), the bias, the
// outputs and the scratchpad.
std::unordered_map<int, memory> Args(const Plan& p, const dnnl::primitive_desc& pd,
                                     dnnl::stream& s, const float* xs, const float* h0,
                                     const float* w, const float* u, const float* bias,
                                     const float* hs, const float* h_t) {
  const auto scratch = pd.scratchpad_desc();
  return {
      {DNNL_ARG_SRC_LAYER, Wrap(p.src_layer, xs)},
      {DNNL_ARG_SRC_ITER, Wrap(p.state, h0)},
      {DNNL_ARG_WEIGHTS_LAYER, Prepared(pd, DNNL_ARG_WEIGHTS_LAYER, Wrap(p.weights_layer, w), s)},
      {DNNL_ARG_WEIGHTS_ITER, Prepared(pd, DNNL_ARG_WEIGHTS_ITER, Wrap(p.weights_iter, u), s)},
      {DNNL_ARG_BIAS, Wrap(p.bias, bias)},
      {DNNL_ARG_DST_LAYER, Wrap(p.dst_layer, hs)},
      {DNNL_ARG_DST_ITER, Wrap(p.state, h_t)},
      {DNNL_ARG_SCRATCHPAD, memory(scratch, Engine(), Kept(kScratch, scratch.get_size()))},
  };
}

// threads: the written-out kernels' split (bptt_jax/_kernel.py passes 0, all, here, where
// oneDNN's primitives split the work themselves).
ffi::Error Forward(int64_t batch_major, int64_t kind, int64_t training, int64_t /*threads*/,
                   ffi::Buffer<ffi::F32> xs,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> bias,
                   ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> hs,
                   ffi::ResultBuffer<ffi::F32> h_t,
                   ffi::ResultBuffer<ffi::F32> c_t, ffi::ResultBuffer<ffi::U8> workspace) {
  if (auto err = CheckKind(kind, batch_major, lengths); err.failure()) return err;
  return Guarded("bptt_rnn_forward (oneDNN)", [&]() -> ffi::Error {
    Plan& p = GetPlan(KeyOf(kind, xs, h0));
    const auto& pd = training ? p.train_pd : p.infer_pd;
    dnnl::stream s(Engine());
    AdviseHugePages(hs->typed_data(), hs->size_bytes());
    if (training) AdviseHugePages(workspace->typed_data(), workspace->size_bytes());
    auto args = Args(p, pd, s, xs.typed_data(), h0.typed_data(), w.typed_data(), u.typed_data(),
                     bias.typed_data(), hs->typed_data(), h_t->typed_data());
    if (kind == kLstm) {
      args[DNNL_ARG_SRC_ITER_C] = Wrap(p.state, c0.typed_data());
      args[DNNL_ARG_DST_ITER_C] = Wrap(p.state, c_t->typed_data());
    }
    if (training) {
      const auto ws = pd.workspace_desc();
      if (static_cast<int64_t>(ws.get_size()) != workspace->size_bytes())
        return ffi::Error::InvalidArgument(
            "bptt_rnn_forward: workspace of " + std::to_string(workspace->size_bytes()) +
            " bytes, the primitive needs " + std::to_string(ws.get_size()));
      args[DNNL_ARG_WORKSPACE] = Wrap(ws, workspace->typed_data());
    }
    (training ? p.train : p.infer).execute(s, args);
    s.wait();
    return ffi::Error::Success();
  });
}

ffi::Error Backward(int64_t batch_major, int64_t kind, ffi::Buffer<ffi::F32> xs,
                    ffi::Buffer<ffi::F32> h0,
                    ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> u,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> hs,
                    ffi::Buffer<ffi::F32> h_t, ffi::Buffer<ffi::F32> c_t,
                    ffi::Buffer<ffi::U8> workspace, ffi::Buffer<ffi::F32> dhs,
                    ffi::Buffer<ffi::F32> dh_t, ffi::Buffer<ffi::F32> dc_t,
                    ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> dxs,
                    ffi::ResultBuffer<ffi::F32> dh0,
                    ffi::ResultBuffer<ffi::F32> dc0, ffi::ResultBuffer<ffi::F32> dw,
                    ffi::ResultBuffer<ffi::F32> du, ffi::ResultBuffer<ffi::F32> dbias) {
  if (auto err = CheckKind(kind, batch_major, lengths); err.failure()) return err;
  return Guarded("bptt_rnn_backward (oneDNN)", [&]() -> ffi::Error {
    Plan& p = GetPlan(KeyOf(kind, xs, h0));
    const auto& pd = p.backward_pd;
    dnnl::stream s(Engine());
    AdviseHugePages(dxs->typed_data(), dxs->size_bytes());
    // oneDNN adds the weight gradients to what the buffers hold.
    std::memset(dw->typed_data(), 0, dw->size_bytes());
    std::memset(du->typed_data(), 0, du->size_bytes());
    std::memset(dbias->typed_data(), 0, dbias->size_bytes());
    auto args = Args(p, pd, s, xs.typed_data(), h0.typed_data(), w.typed_data(), u.typed_data(),
                     bias.typed_data(), hs.typed_data(), h_t.typed_data());
    args.insert({
        {DNNL_ARG_WORKSPACE, Wrap(pd.workspace_desc(), workspace.typed_data())},
        {DNNL_ARG_DIFF_DST_LAYER, Wrap(p.dst_layer, dhs.typed_data())},
        {DNNL_ARG_DIFF_DST_ITER, Wrap(p.state, dh_t.typed_data())},
        {DNNL_ARG_DIFF_SRC_LAYER, Wrap(p.src_layer, dxs->typed_data())},
        {DNNL_ARG_DIFF_SRC_ITER, Wrap(p.state, dh0->typed_data())},
        {DNNL_ARG_DIFF_WEIGHTS_LAYER, Wrap(p.weights_layer, dw->typed_data())},
        {DNNL_ARG_DIFF_WEIGHTS_ITER, Wrap(p.weights_iter, du->typed_data())},
        {DNNL_ARG_DIFF_BIAS, Wrap(p.bias, dbias->typed_data())},
    });
    if (kind == kLstm) {
      args[DNNL_ARG_SRC_ITER_C] = Wrap(p.state, c0.typed_data());
      args[DNNL_ARG_DST_ITER_C] = Wrap(p.state, c_t.typed_data());
      args[DNNL_ARG_DIFF_DST_ITER_C] = Wrap(p.state, dc_t.typed_data());
      args[DNNL_ARG_DIFF_SRC_ITER_C] = Wrap(p.state, dc0->typed_data());
    }
    p.backward.execute(s, args);
    s.wait();
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttRnnForward, Forward, ForwardBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttRnnBackward, Backward, BackwardBinding());

// Called at trace time, through ctypes.

extern "C" {

// The training workspace of a shape in bytes, or -1 with the reason in `error`.
int64_t bptt_rnn_workspace_bytes(int64_t kind, int64_t T, int64_t B, int64_t D, int64_t H,
                                 char* error, int64_t error_size) {
  try {
    return static_cast<int64_t>(
        GetPlan(Key{kind, T, B, D, H}).train_pd.workspace_desc().get_size());
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
    return -1;
  }
}

void bptt_rnn_onednn_version(int64_t* out) {
  const auto* v = dnnl::version();
  out[0] = v->major, out[1] = v->minor, out[2] = v->patch;
}

int64_t bptt_rnn_threads() { return omp_get_max_threads(); }

}  // extern "C"
