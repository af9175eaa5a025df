// A tiny host emulation of the CUDA features kernels.cuh uses, so the *same kernel source* runs on
// a CPU in tests (csrc/cuda/emulator.cpp, tests/kernels/test_cuda_compile.py). Not a performance tool.
//
// Each CUDA thread of a block is a ucontext fiber; blocks run one after another, so block-wide
// `static` variables stand in for shared memory. Barriers (__syncthreads, __syncwarp and the two
// halves of every shuffle) park a fiber until all participants arrive; the scheduler round-robins
// over fibers. Lanes that touch values out of step with the others (a missed barrier, a wrong
// shuffle partner) therefore show up as wrong results or a detected deadlock.
#pragma once

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>  // dim3 and the host halves of cuda_bf16.h / cuda_fp16.h

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace fastpatch_emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 thread_idx;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  dim3 block_idx, block_dim;
  std::vector<float> dynamic_smem;
  // Barrier i < warps: warp i (32 lanes); barrier `warps`: the whole block.
  std::vector<int> arrived, generation;
  std::vector<float> exchange;  // one slot per thread for shuffles
  long switches = 0;
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline Fiber& self() { return block()->fibers[block()->current]; }
inline float* dynamic_smem() { return block()->dynamic_smem.data(); }

inline void yield() {
  Block& b = *block();
  if (++b.switches > 2000000000L) {
    std::fprintf(stderr, "emulator: no progress (deadlock at a barrier?)\n");
    std::abort();
  }
  swapcontext(&self().ctx, &b.scheduler);
}

inline void barrier(int id, int participants) {
  Block& b = *block();
  const int gen = b.generation[id];
  if (++b.arrived[id] == participants) {
    b.arrived[id] = 0;
    ++b.generation[id];
    return;
  }
  while (b.generation[id] == gen) yield();
}

inline unsigned linear_tid() { return self().thread_idx.x; }

}  // namespace fastpatch_emu

#define threadIdx (::fastpatch_emu::self().thread_idx)
#define blockIdx (::fastpatch_emu::block()->block_idx)
#define blockDim (::fastpatch_emu::block()->block_dim)

inline void __syncthreads() {
  ::fastpatch_emu::barrier(static_cast<int>(::fastpatch_emu::block()->block_dim.x / 32),
                           static_cast<int>(::fastpatch_emu::block()->block_dim.x));
}

inline void __syncwarp(unsigned = 0xffffffffu) {
  ::fastpatch_emu::barrier(static_cast<int>(::fastpatch_emu::linear_tid() / 32), 32);
}

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  auto& b = *::fastpatch_emu::block();
  const unsigned t = ::fastpatch_emu::linear_tid();
  const unsigned warp_base = t / 32 * 32, lane = t % 32;
  b.exchange[t] = v;
  __syncwarp();
  const float other = b.exchange[warp_base + (lane ^ static_cast<unsigned>(lane_mask))];
  __syncwarp();
  return other;
}

inline int atomicAdd(int* address, int value) {  // fibers never run concurrently
  const int old = *address;
  *address = old + value;
  return old;
}

namespace fastpatch_emu {

template <typename Params>
struct Launch {
  static void (*kernel)(Params);
  static const Params* params;
  static void entry() {
    kernel(*params);
    self().done = true;
  }
};
template <typename Params>
void (*Launch<Params>::kernel)(Params) = nullptr;
template <typename Params>
const Params* Launch<Params>::params = nullptr;

// Runs kernel<<<blocks, threads, smem_bytes>>>(params) to completion, block by block.
template <typename Params>
void launch(void (*kernel)(Params), long blocks, int threads, long smem_bytes, const Params& params) {
  constexpr size_t kStack = 256 * 1024;  // cached rows and unrolled loops live on the fiber stack
  Block b;
  b.block_dim = dim3(threads);
  b.fibers.resize(threads);
  for (auto& f : b.fibers) f.stack.resize(kStack);
  b.dynamic_smem.assign(static_cast<size_t>(smem_bytes / 4 + 1), 0.f);
  b.exchange.assign(threads, 0.f);
  Launch<Params>::kernel = kernel;
  Launch<Params>::params = &params;
  block() = &b;
  for (long blk = 0; blk < blocks; ++blk) {
    b.block_idx = dim3(static_cast<unsigned>(blk));
    b.arrived.assign(threads / 32 + 1, 0);
    b.generation.assign(threads / 32 + 1, 0);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = b.fibers[t];
      f.done = false;
      f.thread_idx = dim3(t);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = &b.scheduler;
      makecontext(&f.ctx, &Launch<Params>::entry, 0);
    }
    for (bool running = true; running;) {
      running = false;
      for (int t = 0; t < threads; ++t) {
        if (b.fibers[t].done) continue;
        running = true;
        b.current = t;
        swapcontext(&b.scheduler, &b.fibers[t].ctx);
      }
    }
  }
  block() = nullptr;
}

}  // namespace fastpatch_emu
