// The two XLA FFI calls that each family of whole-sequence kernels implements:
//
//   forward(xs, h0, c0, W, U, bias, lengths; batch_major, kind, training, threads)
//       -> (hs, h_T, c_T, workspace)
//   backward(xs, h0, c0, W, U, bias, hs, h_T, c_T, workspace, dhs, dh_T, dc_T, lengths;
//            batch_major, kind) -> (dxs, dh0, dc0, dW, dU, dbias)
//
// lengths is int32 [B] (each sequence's steps: past its end its states stay, its
// outputs are zero and its inputs must be finite; the written-out kernels only) or
// empty (every sequence runs all T steps).
//
// Every array is float32 (the workspace bytes) in the layouts that
// bptt_jax/_kernel.py passes: sequences time-major [T, B, C] (batch_major = 0) or
// batch-major [B, T, C] (1, the written-out kernels only), states [B, H],
// W [D, G*H], U [H, G*H], bias [G'*H], the gate blocks in oneDNN's order.

#ifndef BPTT_JAX_CSRC_RNN_CALLS_H_
#define BPTT_JAX_CSRC_RNN_CALLS_H_

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace {

inline auto ForwardBinding() {
  namespace ffi = xla::ffi;
  return ffi::Ffi::Bind()
      .Attr<int64_t>("batch_major")
      .Attr<int64_t>("kind")
      .Attr<int64_t>("training")
      .Attr<int64_t>("threads")  // the most threads to split over; 0: all
      .Arg<ffi::Buffer<ffi::F32>>()   // xs
      .Arg<ffi::Buffer<ffi::F32>>()   // h0
      .Arg<ffi::Buffer<ffi::F32>>()   // c0
      .Arg<ffi::Buffer<ffi::F32>>()   // W
      .Arg<ffi::Buffer<ffi::F32>>()   // U
      .Arg<ffi::Buffer<ffi::F32>>()   // bias
      .Arg<ffi::Buffer<ffi::S32>>()   // lengths
      .Ret<ffi::Buffer<ffi::F32>>()   // hs
      .Ret<ffi::Buffer<ffi::F32>>()   // h_T
      .Ret<ffi::Buffer<ffi::F32>>()   // c_T
      .Ret<ffi::Buffer<ffi::U8>>();   // workspace
}

inline auto BackwardBinding() {
  namespace ffi = xla::ffi;
  return ffi::Ffi::Bind()
      .Attr<int64_t>("batch_major")
      .Attr<int64_t>("kind")
      .Arg<ffi::Buffer<ffi::F32>>()   // xs
      .Arg<ffi::Buffer<ffi::F32>>()   // h0
      .Arg<ffi::Buffer<ffi::F32>>()   // c0
      .Arg<ffi::Buffer<ffi::F32>>()   // W
      .Arg<ffi::Buffer<ffi::F32>>()   // U
      .Arg<ffi::Buffer<ffi::F32>>()   // bias
      .Arg<ffi::Buffer<ffi::F32>>()   // hs
      .Arg<ffi::Buffer<ffi::F32>>()   // h_T
      .Arg<ffi::Buffer<ffi::F32>>()   // c_T
      .Arg<ffi::Buffer<ffi::U8>>()    // workspace
      .Arg<ffi::Buffer<ffi::F32>>()   // dhs
      .Arg<ffi::Buffer<ffi::F32>>()   // dh_T
      .Arg<ffi::Buffer<ffi::F32>>()   // dc_T
      .Arg<ffi::Buffer<ffi::S32>>()   // lengths
      .Ret<ffi::Buffer<ffi::F32>>()   // dxs
      .Ret<ffi::Buffer<ffi::F32>>()   // dh0
      .Ret<ffi::Buffer<ffi::F32>>()   // dc0
      .Ret<ffi::Buffer<ffi::F32>>()   // dW
      .Ret<ffi::Buffer<ffi::F32>>()   // dU
      .Ret<ffi::Buffer<ffi::F32>>();  // dbias
}

}  // namespace

#endif  // BPTT_JAX_CSRC_RNN_CALLS_H_
