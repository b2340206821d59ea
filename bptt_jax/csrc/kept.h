// Buffers kept per thread between calls, and C++ errors turned into XLA FFI errors.
//
// A kernel that allocated its scratch memory on every call would hand fresh
// pages to fault in on every training step; kept per thread, because XLA may
// run calls from several threads at once.

#ifndef BPTT_JAX_CSRC_KEPT_H_
#define BPTT_JAX_CSRC_KEPT_H_

#include <cstdlib>
#include <exception>
#include <new>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace {

enum KeptSlot {
  kScratch = 0,      // oneDNN's scratchpad
  kWeightsLayer,     // oneDNN's reordered weights
  kWeightsIter,
  kPackedW,          // the written-out kernels' packed weights and gradients
  kPackedU,
  kPackedBias,
  kGrads,
  kStateGrads,
  kInference,
  kSlots
};

// A buffer of at least `bytes`, 64-byte aligned, kept by this thread in `slot`;
// its contents are undefined.
inline void* Kept(KeptSlot slot, size_t bytes) {
  struct Slot {
    void* data = nullptr;
    size_t size = 0;
    ~Slot() { std::free(data); }
  };
  thread_local Slot slots[kSlots];
  Slot& s = slots[slot];
  if (bytes > s.size) {
    std::free(s.data);
    s.size = (bytes + 63) / 64 * 64;
    s.data = std::aligned_alloc(64, s.size);
    if (s.data == nullptr) {
      s.size = 0;
      throw std::bad_alloc();
    }
  }
  return s.data;
}

// `body()`, with exceptions and failed allocations turned into FFI errors naming `who`.
template <typename F>
xla::ffi::Error Guarded(const char* who, F body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return xla::ffi::Error::Internal(std::string(who) + ": out of memory for its buffers");
  } catch (const std::exception& e) {
    return xla::ffi::Error::Internal(std::string(who) + ": " + e.what());
  }
}

}  // namespace

#endif  // BPTT_JAX_CSRC_KEPT_H_
