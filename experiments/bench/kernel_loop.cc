// The written-out kernels' Forward and Backward (bptt_jax/csrc/fused_rnn.cc, included
// whole) timed without XLA: random float32 inputs, buffers allocated once and touched by
// a first untimed round, then the best and mean of `reps` rounds of each call.
//
//   J=$(.venv/bin/python -c "import jax; print(jax.ffi.include_dir())")
//   g++ -O3 -march=native -fno-trapping-math -fno-math-errno -std=c++17 -fopenmp
//       experiments/bench/kernel_loop.cc -o /tmp/kernel_loop -Ibptt_jax/csrc -I$J
//       -I.venv/include -L.venv/lib -ldnnl -Wl,-rpath,$PWD/.venv/lib    (one line)
//   /tmp/kernel_loop 2 16 2000 32 256 4     # kind B T D H reps: the long LSTM
//
// kind: 0 tanh RNN, 1 ReLU RNN, 2 LSTM, 3 GRU. Add -DINFERENCE to time the forward
// call as inference runs it (nothing saved) instead of the backward call. The last
// number printed is a checksum of the outputs, to compare builds.

#include "../../bptt_jax/csrc/fused_rnn.cc"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s kind B T D H reps\n", argv[0]);
    return 2;
  }
  const int64_t kind = std::atoi(argv[1]), B = std::atoi(argv[2]), T = std::atoi(argv[3]),
                D = std::atoi(argv[4]), H = std::atoi(argv[5]), reps = std::atoi(argv[6]);
  if (kind < 0 || kind > 3 || B < 1 || T < 1 || D < 1 || H < 1 || reps < 1) {
    std::fprintf(stderr, "kind must be 0..3 and B, T, D, H, reps positive\n");
    return 2;
  }
  const int64_t G = Gates(kind), bias_rows = kind == kGru ? 4 : G;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random = [&](int64_t n, float scale) {
    std::vector<float> v(n);
    for (float& x : v) x = scale * normal(rng);
    return v;
  };
  const auto xs = random(T * B * D, 1.0f), h0 = random(B * H, 0.1f), c0 = random(B * H, 0.1f),
             W = random(D * G * H, 1.0f / std::sqrt(float(D))),
             U = random(H * G * H, 1.0f / std::sqrt(float(H))), bias = random(bias_rows * H, 0.1f),
             dhs = random(T * B * H, 1.0f), dh_t = random(B * H, 1.0f), dc_t = random(B * H, 1.0f);
  std::vector<float> hs(T * B * H), h_t(B * H), c_t(B * H), dxs(T * B * D), dh0(B * H),
      dc0(B * H), dW(D * G * H), dU(H * G * H), dbias(bias_rows * H);
  const Shape s{T, B, D, H, false};
  const Blocks blk{BlockCount(H, 0), H};
  std::vector<float> workspace(WorkspaceFloats(kind, T, B, H));
  float* saved = workspace.data() + kHeader;
  float* cells = saved + SavedFloats(kind, T, B, H);
#ifdef INFERENCE
  std::vector<float> small(InferenceFloats(kind, B, H));
  const bool training = false;
  saved = nullptr;
  cells = small.data() + kHeader;
#else
  const bool training = true;
#endif
  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  double forward_best = 1e30, forward_sum = 0, backward_best = 1e30, backward_sum = 0;
  for (int64_t r = 0; r <= reps; ++r) {  // round 0 touches the buffers, untimed
    const auto t0 = Clock::now();
    Forward(kind, s, blk, xs.data(), h0.data(), c0.data(), W.data(), U.data(), bias.data(),
            /*lengths=*/nullptr, hs.data(), h_t.data(), c_t.data(), saved, cells, training);
    const auto t1 = Clock::now();
    if (training)
      Backward(kind, s, blk, xs.data(), h0.data(), W.data(), U.data(), /*lengths=*/nullptr,
               hs.data(), saved, cells, dhs.data(), dh_t.data(), dc_t.data(), dxs.data(),
               dh0.data(), dc0.data(), dW.data(), dU.data(), dbias.data());
    const auto t2 = Clock::now();
    if (r == 0) continue;
    forward_best = std::min(forward_best, ms(t0, t1)), forward_sum += ms(t0, t1);
    backward_best = std::min(backward_best, ms(t1, t2)), backward_sum += ms(t1, t2);
  }
  double checksum = 0;
  for (float v : hs) checksum += v;
  for (float v : dU) checksum += v;  // zeros in inference
  std::printf("kind %ld (B, T, D, H) = (%ld, %ld, %ld, %ld), %s, %ld rounds, %d threads: "
              "forward best %.1f ms, mean %.1f", static_cast<long>(kind), static_cast<long>(B),
              static_cast<long>(T), static_cast<long>(D), static_cast<long>(H),
              training ? "training" : "inference", static_cast<long>(reps),
              omp_get_max_threads(), forward_best, forward_sum / reps);
  if (training)
    std::printf("; backward best %.1f ms, mean %.1f", backward_best, backward_sum / reps);
  std::printf("; checksum %.6g\n", checksum);
}
