// Buffers kept between calls, and C++ errors turned into XLA FFI errors.
//
// A kernel that allocated its scratch memory on every call would hand fresh
// pages to fault in on every training step. So the buffers come in sets, one
// buffer per slot, kept in a pool: a call takes a set for its duration (the
// one given back last, so one call after another reuses the same memory) and
// gives it back. XLA may run calls at once, from any of its pool's threads;
// there are as many sets as calls ever ran at the same time, not one per
// thread that ever ran one.

#ifndef BPTT_JAX_CSRC_KEPT_H_
#define BPTT_JAX_CSRC_KEPT_H_

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
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
  kPanels,           // the written-out kernels' per-step GEMM operands (panel_gemm.h)
  kBlocked,
  kWeightGrads,      // the written-out kernels' weight gradients, accumulated chunk by chunk
  kPartials,
  kSlots
};

// Asks Linux to back [p, p + bytes) with transparent huge pages (2 MiB) from the next
// first touch on, where its setting allows them ("madvise" or "always"). The first touch
// of fresh memory is paid page by page: a 164 MB workspace that XLA hands over fresh on
// every training step takes ~130 ms to fault in 4 KiB pages and ~22 ms in 2 MiB ones,
// and rows far apart (the gate arrays' rows) then share TLB entries. Advice only: a
// refusal changes nothing, and memory already touched keeps its pages.
//
// Memory below the program break (glibc's main heap) is left alone: a process reuses it
// step after step, so it is touched once (where the tuned allocator,
// MALLOC_MMAP_MAX_=0 with a high trim threshold, puts every buffer), and huge pages there
// only made the steps that grow the heap slow. With the advice, the long LSTM's second
// training step (the heap grows by ~220 MB, ~200 MB of it in 2 MiB pages) took 0.8-1.1 s
// against 0.43 s without it, and the steps after were level (0.32-0.45 s).
inline void AdviseHugePages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end < begin + kHuge || p < sbrk(0)) return;  // too short, or on the heap
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

struct KeptSet {
  struct Slot {
    void* data = nullptr;
    size_t size = 0;
    ~Slot() { std::free(data); }
  };
  Slot slots[kSlots];
};

// The sets no call holds.
class KeptPool {
 public:
  std::unique_ptr<KeptSet> Take() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) {
      ++made_;
      return std::make_unique<KeptSet>();
    }
    std::unique_ptr<KeptSet> set = std::move(free_.back());
    free_.pop_back();
    return set;
  }
  void Give(std::unique_ptr<KeptSet> set) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(set));
  }
  int64_t Made() {  // sets made so far: the most calls that held one at once
    std::lock_guard<std::mutex> lock(mutex_);
    return made_;
  }

 private:
  int64_t made_ = 0;
  std::mutex mutex_;
  std::vector<std::unique_ptr<KeptSet>> free_;
};

inline KeptPool& Pool() {
  static KeptPool* pool = new KeptPool;  // never destroyed: calls may outlive static destructors
  return *pool;
}

inline KeptSet*& HeldSet() {  // the set of the call running on this thread, if any
  thread_local KeptSet* held = nullptr;
  return held;
}

// Holds a set from the pool for this thread while it lives (one call).
class KeptLease {
 public:
  KeptLease() : set_(Pool().Take()), previous_(HeldSet()) { HeldSet() = set_.get(); }
  ~KeptLease() {
    HeldSet() = previous_;
    Pool().Give(std::move(set_));
  }
  KeptLease(const KeptLease&) = delete;
  KeptLease& operator=(const KeptLease&) = delete;

 private:
  std::unique_ptr<KeptSet> set_;
  KeptSet* previous_;
};

// A buffer of at least `bytes`, 64-byte aligned, in `slot` of the set that this
// thread's call holds (outside a call, as in a stand-alone driver, a set of the
// thread's own); its contents are undefined.
inline void* Kept(KeptSlot slot, size_t bytes) {
  thread_local KeptSet own;
  KeptSet* set = HeldSet() != nullptr ? HeldSet() : &own;
  KeptSet::Slot& s = set->slots[slot];
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

// `body()` holding a set of kept buffers, with exceptions and failed allocations
// turned into FFI errors naming `who`.
template <typename F>
xla::ffi::Error Guarded(const char* who, F body) {
  try {
    KeptLease lease;
    return body();
  } catch (const std::bad_alloc&) {
    return xla::ffi::Error::Internal(std::string(who) + ": out of memory for its buffers");
  } catch (const std::exception& e) {
    return xla::ffi::Error::Internal(std::string(who) + ": " + e.what());
  }
}

}  // namespace

#endif  // BPTT_JAX_CSRC_KEPT_H_
