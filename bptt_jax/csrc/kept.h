// Buffers kept per thread between calls, and C++ errors turned into XLA FFI errors.
//
// A kernel that allocated its scratch memory on every call would hand fresh
// pages to fault in on every training step; kept per thread, because XLA may
// run calls from several threads at once.

#ifndef BPTT_JAX_CSRC_KEPT_H_
#define BPTT_JAX_CSRC_KEPT_H_

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <new>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Asks Linux to back [p, p + bytes) with transparent huge pages (2 MiB) from the next
// first touch on, where its setting allows them ("madvise" or "always"). The first touch
// of fresh memory is paid page by page: a 164 MB workspace that XLA hands over fresh on
// every training step takes ~130 ms to fault in 4 KiB pages and ~22 ms in 2 MiB ones,
// and rows far apart (the gate arrays' rows) then share TLB entries. Advice only: a
// refusal changes nothing, and memory already touched keeps its pages.
inline void AdviseHugePages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end >= begin + kHuge) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

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
    AdviseHugePages(s.data, s.size);
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
