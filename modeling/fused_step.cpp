// SiMBA's decoding step for a few rows (batch x 2 with CFG) as one OpenMP region: see modeling/fused.py.
//
// A step streams every weight once. TorchInductor's version of it runs ~16 parallel loops per layer, each
// ending in a barrier after which the next loop reads what the other cores wrote; here a layer has 5:
//   norm1 (every thread, redundantly) -> in_proj rows split       | barrier
//   conv + SSM + y * silu(z), split by (row, head)               | barrier
//   conv-state shift; gated norm (redundantly) -> out_proj + x    | barrier
//   norm2 (redundantly) -> fc1 + GELU                            | barrier
//   fc2 + x                                                      | barrier
// Weight products ("gemv") stream one weight row at a time (above 8 activation rows, tiles of 3 weight rows) and
// multiply every activation row by it while it is in registers; each thread streams one contiguous range of
// weight rows. Before each barrier a thread prefetches the start of its share of the next phase (kPrefetchBytes).
// The SSM update keeps B and C in registers.
//
// Everything is fp32, in the order of modeling.mamba2.Mamba2.step and modeling.layers.Block.step; results equal
// the eager step to fp32 rounding (tests/modeling/test_fused.py). Built by modeling/fused.py with
// `-O3 -march=native -fopenmp`; no PyTorch headers, called through ctypes.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// Vectors of the machine's widest float registers (-march=native): 16 floats with AVX-512, 8 with AVX, 4 otherwise
// (SSE, NEON), and how many registers it has. A wider Vec than the registers would be split into pairs and spill.
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegisters = 16;
#elif defined(__aarch64__)
constexpr int kLanes = 4, kRegisters = 32;
#else
constexpr int kLanes = 4, kRegisters = 16;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int kBlockRows = 8;  // rows per register block of a weight product
constexpr int kMaxRows = 64;

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

typedef float Four __attribute__((vector_size(4 * sizeof(float))));

inline float hsum(Vec v) {  // a tree of halves, in a few shuffles
#if defined(__AVX512F__)
  typedef float Eight __attribute__((vector_size(8 * sizeof(float))));
  const Eight h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Four q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#elif defined(__AVX__)
  const Four q = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  const Four q = v;
#endif
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// The model's sizes, in the order of modeling/fused.py's `dims`.
struct Dims {
  int64_t d_model, n_layers, d_inner, d_state, ngroups, nheads, headdim, d_conv, mlp_dim, vocab;
  int64_t d_in_proj() const { return 2 * d_inner + 2 * ngroups * d_state + nheads; }
  int64_t conv_dim() const { return d_inner + 2 * ngroups * d_state; }
};

// Per-layer pointers, in the order of modeling/fused.py's LAYER_PARAMS.
enum LayerParam {
  kNorm1, kInW, kInB, kConvW, kConvB, kDtBias, kALog, kD, kGateNormW, kOutW, kOutB, kNorm2, kFc1W, kFc1B, kFc2W,
  kFc2B, kLayerParams
};
constexpr int kGlobalParams = 4;  // token embedding, final norm, head, sinusoid frequencies
constexpr int kLayerScalars = 5;  // norm1 eps, gated norm eps, norm2 eps, dt clamp low, dt clamp high

inline int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// out[r, n] (+)= a[r, :] . W[n, :] (+ bias[n]) for n in [n0, n1): W is (N, K) row-major, as nn.Linear keeps it.
template <int R, bool kAccumulate>
void gemv(const float* W, const float* bias, const float* a, int64_t lda, float* out, int64_t ldo, int64_t n0,
          int64_t n1, int64_t K) {
  const int64_t k_vec = K - K % (2 * kLanes);
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = W + n * K;
    Vec acc0[R], acc1[R];  // two chains per row: the adds' latency stays hidden behind the stream
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = Vec{};
    int64_t k = 0;
    for (; k < k_vec; k += 2 * kLanes) {
      const Vec w0 = load(w + k), w1 = load(w + k + kLanes);
      for (int r = 0; r < R; ++r) {
        acc0[r] += load(a + r * lda + k) * w0;
        acc1[r] += load(a + r * lda + k + kLanes) * w1;
      }
    }
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc0[r] + acc1[r]);
      for (int64_t j = k; j < K; ++j) s += a[r * lda + j] * w[j];
      if (bias) s += bias[n];
      if (kAccumulate)
        out[r * ldo + n] += s;
      else
        out[r * ldo + n] = s;
    }
  }
}

typedef void (*Gemv)(const float*, const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t);

template <bool kAccumulate>
Gemv gemv_for(int64_t rows) {
  switch (rows) {
    case 1: return gemv<1, kAccumulate>;
    case 2: return gemv<2, kAccumulate>;
    case 3: return gemv<3, kAccumulate>;
    case 4: return gemv<4, kAccumulate>;
    case 5: return gemv<5, kAccumulate>;
    case 6: return gemv<6, kAccumulate>;
    case 7: return gemv<7, kAccumulate>;
    case 8: return gemv<8, kAccumulate>;
    default: return nullptr;
  }
}

// A tile of kW weight rows (n, n + 1, ...) x kR activation rows: out[r, n + j] (+)= a[r, :] . W[n + j, :] (+ bias),
// with all kW * kR dot products accumulating in registers, so each loaded vector feeds several FMAs.
template <int kW, int kR, bool kAccumulate>
void tile(const float* W, const float* bias, const float* a, int64_t lda, float* out, int64_t ldo, int64_t n,
          int64_t K) {
  const int64_t k_vec = K - K % kLanes;
  Vec acc[kW][kR];
  for (int j = 0; j < kW; ++j)
    for (int r = 0; r < kR; ++r) acc[j][r] = Vec{};
  for (int64_t k = 0; k < k_vec; k += kLanes) {
    Vec w[kW];
    for (int j = 0; j < kW; ++j) w[j] = load(W + (n + j) * K + k);
    for (int r = 0; r < kR; ++r) {
      const Vec x = load(a + r * lda + k);
      for (int j = 0; j < kW; ++j) acc[j][r] += x * w[j];
    }
  }
  for (int j = 0; j < kW; ++j)
    for (int r = 0; r < kR; ++r) {
      const float* wj = W + (n + j) * K;
      float s = hsum(acc[j][r]);
      for (int64_t k = k_vec; k < K; ++k) s += a[r * lda + k] * wj[k];
      if (bias) s += bias[n + j];
      if (kAccumulate)
        out[r * ldo + n + j] += s;
      else
        out[r * ldo + n + j] = s;
    }
}

typedef void (*Tile)(const float*, const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t);

// Weight rows per tile: 3 x 8 accumulators + 3 weight vectors + 1 activation vector = 28 of 32 registers (AVX-512,
// NEON); with 16 registers (AVX2, SSE) one weight row, 10 registers.
constexpr int kTileW = kRegisters >= 32 ? 3 : 1;

template <bool kAccumulate>
Tile tile_for(int64_t rows) {
  switch (rows) {
    case 1: return tile<kTileW, 1, kAccumulate>;
    case 2: return tile<kTileW, 2, kAccumulate>;
    case 3: return tile<kTileW, 3, kAccumulate>;
    case 4: return tile<kTileW, 4, kAccumulate>;
    case 5: return tile<kTileW, 5, kAccumulate>;
    case 6: return tile<kTileW, 6, kAccumulate>;
    case 7: return tile<kTileW, 7, kAccumulate>;
    case 8: return tile<kTileW, 8, kAccumulate>;
    default: return nullptr;
  }
}

// More rows than kBlockRows: tiles of kTileW weight rows x kBlockRows activation rows; the tile's weight rows stay
// in L1 while every block of activation rows passes (weights are still read from memory once). Leftover weight
// rows (fewer than kTileW) go one at a time. Against one weight row at a time (gemv per block of 8 rows), the
// mid-size step took 0.81x as long at 16 rows and 0.75x at 64 (AMD EPYC, 2 threads).
template <bool kAccumulate>
void gemv_blocked(const float* W, const float* bias, const float* a, int64_t lda, float* out, int64_t ldo, int64_t n0,
                  int64_t n1, int64_t K, int64_t rows) {
  int64_t n = n0;
  for (; n + kTileW <= n1; n += kTileW)
    for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
      const int64_t block = std::min<int64_t>(kBlockRows, rows - r0);
      tile_for<kAccumulate>(block)(W, bias, a + r0 * lda, lda, out + r0 * ldo, ldo, n, K);
    }
  for (; n < n1; ++n)
    for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
      const int64_t block = std::min<int64_t>(kBlockRows, rows - r0);
      gemv_for<kAccumulate>(block)(W, bias, a + r0 * lda, lda, out + r0 * ldo, ldo, n, n + 1, K);
    }
}

// A weight product for `rows` activation rows: one register block, or (more rows) blocks per weight row.
struct Product {
  Gemv block;  // null: gemv_blocked
  void (*blocked)(const float*, const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t,
                  int64_t);
  int64_t rows;

  void operator()(const float* W, const float* bias, const float* a, int64_t lda, float* out, int64_t ldo, int64_t n0,
                  int64_t n1, int64_t K) const {
    if (block)
      block(W, bias, a, lda, out, ldo, n0, n1, K);
    else
      blocked(W, bias, a, lda, out, ldo, n0, n1, K, rows);
  }
};

template <bool kAccumulate>
Product product_for(int64_t rows) {
  return Product{gemv_for<kAccumulate>(rows), gemv_blocked<kAccumulate>, rows};
}

// This thread's share [begin, end) of `count` items, as schedule(static) splits them: contiguous, sizes differing by
// at most one. Computed here rather than left to `omp for` so that a thread can name its next share in advance.
inline void my_share(int64_t count, int64_t* begin, int64_t* end) {
  const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
  const int64_t q = count / threads, r = count % threads;
  *begin = t * q + std::min(t, r);
  *end = *begin + q + (t < r ? 1 : 0);
}

// This thread's share of a product over W's N rows of K: rows [begin, end), streamed in chunks of `step` rows
// (~64 KiB of weights), the chunks split as my_share splits them.
struct RowShare {
  int64_t step, begin, end;

  RowShare(int64_t N, int64_t K)
      : step(std::max<int64_t>(kLanes, (int64_t{64} << 10) / (K * static_cast<int64_t>(sizeof(float))))) {
    int64_t first, last;
    my_share((N + step - 1) / step, &first, &last);
    begin = std::min(N, first * step);
    end = std::min(N, last * step);
  }
};

// Each phase ends with every thread asking for the first kPrefetchBytes of what it streams next (into L2), before
// the barrier: a new stream otherwise starts with the hardware prefetcher untrained, 60 times a step. On the AMD
// VMs here this made the mid-size step 12% faster when the host gave ~62 GB/s, and changed nothing at ~35 GB/s
// (8, 32 and 64 KiB did no better).
constexpr int64_t kPrefetchBytes = 16 << 10;

inline void prefetch(const float* p, int64_t bytes) {
  for (int64_t offset = 0; offset < bytes; offset += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + offset, 0, 2);
}

// The start of this thread's share of the product over W (N rows of K); W null: nothing follows.
struct NextProduct {
  const float* W;
  int64_t N, K;

  void operator()() const {
    if (!W) return;
    const RowShare share(N, K);
    const int64_t bytes = (share.end - share.begin) * K * static_cast<int64_t>(sizeof(float));
    if (bytes > 0) prefetch(W + share.begin * K, std::min(kPrefetchBytes, bytes));
  }
};

// out (+)= a . W^T (+ bias) over W's N rows, then finish(n0, n1) on each chunk of outputs; then next() (the prefetch
// of what follows) and a barrier. Called by every thread of the parallel region. Each thread streams one contiguous
// share of the rows, in chunks of ~64 KiB of weights. (Handing chunks to whichever thread is free,
// schedule(dynamic), made the mid-size step ~10% slower on the AMD VMs here: each thread's stream jumps between
// chunks.)
template <typename Finish, typename Next>
void products(const Product& gemv, const float* W, const float* bias, const float* a, int64_t lda, float* out,
              int64_t ldo, int64_t N, int64_t K, Finish finish, Next next) {
  const RowShare share(N, K);
  for (int64_t n0 = share.begin; n0 < share.end; n0 += share.step) {
    const int64_t n1 = std::min(share.end, n0 + share.step);
    gemv(W, bias, a, lda, out, ldo, n0, n1, K);
    finish(n0, n1);
  }
  next();
#pragma omp barrier
}

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight (modeling.layers.RMSNorm).
void rms_norm(const float* x, const float* weight, float eps, float* out, int64_t rows, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    Vec squares = Vec{};
    int64_t i = 0;
    for (; i + kLanes <= dim; i += kLanes) squares += load(xr + i) * load(xr + i);
    float ss = hsum(squares);
    for (; i < dim; ++i) ss += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (i = 0; i < dim; ++i) out[r * dim + i] = xr[i] * scale * weight[i];
  }
}

inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }  // F.softplus, threshold 20

typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec splat(float v) { return Vec{} + v; }

// exp(x), Cephes' single-precision polynomial (within ~1 ulp of std::exp): x = n ln2 + r, exp(r) by a degree-6
// polynomial, 2^n put into the exponent bits. x is clamped to [-87.3, 88.3], where 2^n stays a normal float
// (exp(88.3) = 2.1e38; FLT_MAX is 3.4e38).
inline Vec vexp(Vec x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.3f) ? splat(88.3f) : x;
  const Vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const Vec n = (x * 1.44269504088896341f + magic) - magic;
  const Vec r = x - n * 0.693359375f - n * -2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IntVec bits = (__builtin_convertvector(n, IntVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float expf_(float v) { return std::exp(v); }

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

inline Vec vsilu(Vec v) { return v / (1.0f + vexp(-v)); }

// GELU(v) = v / 2 * (1 + erf(v / sqrt 2)) = v / 2 * erfc(-v / sqrt 2), with erfc from Numerical Recipes' Chebyshev
// fit (relative error < 1.2e-7 everywhere): taking erfc of -u, not 1 + erf(u), keeps the relative accuracy where
// 1 + erf(u) is small.
inline Vec vgelu(Vec v) {
  const Vec u = v * static_cast<float>(M_SQRT1_2);
  const Vec a = u < 0.0f ? -u : u;
  const Vec t = 1.0f / (1.0f + 0.5f * a);
  Vec p = splat(0.17087277f);
  for (float c : {-0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f, 0.09678418f, 0.37409196f,
                  1.00002368f, -1.26551223f})
    p = p * t + c;
  const Vec tail = t * vexp(p - a * a);  // erfc(a)
  return 0.5f * v * (u < 0.0f ? tail : 2.0f - tail);
}

inline float gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * static_cast<float>(M_SQRT1_2))); }

// v[i] = f(v[i]) for i < n: vectors, then a scalar tail.
template <Vec (*kVector)(Vec), float (*kScalar)(float)>
void apply(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(v + i, kVector(load(v + i)));
  for (; i < n; ++i) v[i] = kScalar(v[i]);
}

// The layout of the workspace: buffers shared by all threads, then one private scratch per thread.
struct Workspace {
  int64_t x, zxbcdt, y, sumsq, hidden, scratch, scratch_floats;  // offsets and the scratch size, in floats

  Workspace(const Dims& d, int64_t rows) {
    x = 0;
    zxbcdt = x + padded(rows * d.d_model);
    y = zxbcdt + padded(rows * d.d_in_proj());
    sumsq = y + padded(rows * d.d_inner);
    hidden = sumsq + padded(rows * d.nheads);
    scratch = hidden + padded(rows * d.mlp_dim);
    scratch_floats = padded(std::max({rows * d.d_model, rows * d.d_inner, d.headdim + 2 * d.d_state}));
  }
  int64_t floats(int64_t threads) const { return scratch + threads * scratch_floats; }
};

// The causal conv over [state[1:], this step's input] + bias, before its SiLU, for channels [c0, c1) into
// out[0:c1-c0] (the state is shifted later). kTaps: d_conv when known at compile time (4, Mamba's default: the
// compiler vectorises the loop across channels), else 0 (any d_conv, read from d).
template <int kTaps>
void conv_pre(const Dims& d, const float* const* w, const float* xbc, const float* conv, int64_t c0, int64_t c1,
              float* out) {
  const int64_t K = kTaps ? kTaps : d.d_conv;
  const float *weight = w[kConvW], *bias = w[kConvB];
  for (int64_t c = c0; c < c1; ++c) {
    const float *state = conv + c * K, *wc = weight + c * K;
    float s = xbc[c] * wc[K - 1];
    for (int64_t k = 0; k + 1 < K; ++k) s += state[k + 1] * wc[k];
    out[c - c0] = s;
  }
  if (bias)
    for (int64_t c = c0; c < c1; ++c) out[c - c0] += bias[c];
}

inline void conv_range(const Dims& d, const float* const* w, const float* xbc, const float* conv, int64_t c0,
                       int64_t c1, float* out) {
  if (d.d_conv == 4)
    conv_pre<4>(d, w, xbc, conv, c0, c1, out);
  else
    conv_pre<0>(d, w, xbc, conv, c0, c1, out);
}

// B and C of group g of one row (conv outputs) into BC[0:N] and BC[N:2N].
void group_BC(const Dims& d, const float* const* w, const float* xbc, const float* conv, int64_t g, float* BC) {
  const int64_t N = d.d_state;
  conv_range(d, w, xbc, conv, d.d_inner + g * N, d.d_inner + (g + 1) * N, BC);
  conv_range(d, w, xbc, conv, d.d_inner + (d.ngroups + g) * N, d.d_inner + (d.ngroups + g + 1) * N, BC + N);
  apply<vsilu, silu>(BC, 2 * N);
}

// One block of kV vectors (kV * kLanes entries) of d_state, for every p of a head: state[p, :] = dA state[p, :] + (x
// dt)[p] B and y[p] += state[p, :] . C over the block. B and C stay in registers for all P rows (16 of AVX-512's 32
// for kV = 8), so the loop loads only the state: reloading them per row made the SSM phase ~2x as long as its
// state traffic, and the mid-size step 10% slower at ~62 GB/s.
template <int kV>
void ssm_block(float* state, int64_t N, int64_t P, const float* B, const float* C, const float* xdt, float dA,
               float* y) {
  Vec b[kV], c[kV];
  for (int i = 0; i < kV; ++i) b[i] = load(B + i * kLanes), c[i] = load(C + i * kLanes);
  for (int64_t p = 0; p < P; ++p) {
    float* row = state + p * N;
    const Vec x = splat(xdt[p]);
    Vec acc[2] = {Vec{}, Vec{}};
    for (int i = 0; i < kV; ++i) {
      const Vec v = load(row + i * kLanes) * dA + x * b[i];
      store(row + i * kLanes, v);
      acc[i % 2] += v * c[i];
    }
    y[p] += hsum(acc[0] + acc[1]);
  }
}

// Vectors of B (and of C) per block of the state update: B and C take half the registers.
constexpr int kStateBlock = kRegisters / 4;

// A head's state update over all of d_state (N): blocks of kStateBlock vectors, one block of what is left, a scalar
// tail.
void ssm_update(float* state, int64_t N, int64_t P, const float* B, const float* C, const float* xdt, float dA,
                float* y) {
  constexpr int64_t kBlock = kStateBlock * kLanes;
  int64_t n = 0;
  for (; n + kBlock <= N; n += kBlock) ssm_block<kStateBlock>(state + n, N, P, B + n, C + n, xdt, dA, y);
  typedef void (*Block)(float*, int64_t, int64_t, const float*, const float*, const float*, float, float*);
  static constexpr Block kBlocks[] = {nullptr, ssm_block<1>, ssm_block<2>, ssm_block<3>,
                                      ssm_block<4>, ssm_block<5>, ssm_block<6>, ssm_block<7>};
  if (const int64_t vectors = (N - n) / kLanes) kBlocks[vectors](state + n, N, P, B + n, C + n, xdt, dA, y);
  for (n = N - N % kLanes; n < N; ++n)
    for (int64_t p = 0; p < P; ++p) {
      const float v = state[p * N + n] * dA + xdt[p] * B[n];
      state[p * N + n] = v;
      y[p] += v * C[n];
    }
}

// One Mamba-2 head h of one row, given its group's B and C: the conv outputs of its x channels, dt, the state
// update and y = state . C + D x, gated by silu(z), into y[0:P]. Returns sum(y^2) over the head.
float ssm_head(const Dims& d, const float* const* w, const float* scalars, const float* zxbcdt, const float* conv,
               const float* BC, float* ssm, float* y, float* xs, int64_t h) {  // y: this head's P outputs
  const int64_t P = d.headdim, N = d.d_state;
  const float *xbc = zxbcdt + d.d_inner, *Bs = BC, *Cs = BC + N;  // this step's raw conv inputs: x, B, C
  conv_range(d, w, xbc, conv, h * P, (h + 1) * P, xs);
  apply<vsilu, silu>(xs, P);
  float dt = softplus(zxbcdt[d.d_inner + d.conv_dim() + h] + w[kDtBias][h]);
  dt = std::min(std::max(dt, scalars[3]), scalars[4]);
  const float dA = std::exp(dt * -std::exp(w[kALog][h]));
  const float Dh = w[kD][h];
  for (int64_t p = 0; p < P; ++p) y[p] = Dh * xs[p], xs[p] *= dt;  // y = D x + ...; xs holds x dt from here
  ssm_update(ssm + h * P * N, N, P, Bs, Cs, xs, dA, y);
  // y * silu(z), and its sum of squares for the gated norm.
  const float* z = zxbcdt + h * P;
  int64_t p = 0;
  Vec squares = Vec{};
  for (; p + kLanes <= P; p += kLanes) {
    const Vec g = load(y + p) * vsilu(load(z + p));
    store(y + p, g);
    squares += g * g;
  }
  float sumsq = hsum(squares);
  for (; p < P; ++p) {
    y[p] *= silu(z[p]);
    sumsq += y[p] * y[p];
  }
  return sumsq;
}

}  // namespace

extern "C" {

// Floats of workspace `simba_fused_step` needs for `rows` rows and `threads` threads.
int64_t simba_fused_workspace_floats(const int64_t* dims, int64_t rows, int64_t threads) {
  const Dims d = *reinterpret_cast<const Dims*>(dims);
  return Workspace(d, rows).floats(threads);
}

// One decoding step: logits (rows, vocab) for `tokens` (rows,), advancing every layer's conv and SSM state and
// next_pos (rows,) in place. Returns 0, or 1 for an unsupported row count, 2 for a token outside the vocabulary.
int simba_fused_step(const int64_t* dims, const float* scalars, const float* const* params, float* const* states,
                     const int64_t* tokens, int64_t* next_pos, float* logits, float* workspace, int64_t rows,
                     int64_t threads) {
  const Dims d = *reinterpret_cast<const Dims*>(dims);
  if (rows < 1 || rows > kMaxRows) return 1;
  for (int64_t r = 0; r < rows; ++r)
    if (tokens[r] < 0 || tokens[r] >= d.vocab) return 2;
  const Product product = product_for<false>(rows), product_add = product_for<true>(rows);
  const Workspace layout(d, rows);
  float *const x_buf = workspace + layout.x, *const zx_buf = workspace + layout.zxbcdt;
  float *const y_buf = workspace + layout.y;
  float *const sumsq_buf = workspace + layout.sumsq, *const hidden_buf = workspace + layout.hidden;
  const int64_t D = d.d_model, din = d.d_in_proj(), di = d.d_inner, H = d.nheads;
  const int64_t conv_dim = d.conv_dim(), K = d.d_conv, group = di / d.ngroups;

  // Token embedding + sinusoidal position (cos | sin halves; params[3] holds the frequencies).
  const float *embedding = params[0], *freqs = params[3];
  const int64_t half = D / 2;
  for (int64_t r = 0; r < rows; ++r) {
    float* x = x_buf + r * D;
    std::memcpy(x, embedding + tokens[r] * D, D * sizeof(float));
    const float pos = static_cast<float>(next_pos[r]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * freqs[i];
      x[i] += std::cos(angle);
      x[half + i] += std::sin(angle);
    }
  }

  const auto none = [](int64_t, int64_t) {};
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    float* scratch = workspace + layout.scratch + omp_get_thread_num() * layout.scratch_floats;
    for (int64_t l = 0; l < d.n_layers; ++l) {
      const float* const* w = params + kGlobalParams + l * kLayerParams;
      const float* s = scalars + l * kLayerScalars;
      float *conv = states[2 * l], *ssm = states[2 * l + 1];

      rms_norm(x_buf, w[kNorm1], s[0], scratch, rows, D);
      // The SSM phase's tasks are (row, head) pairs, task = row * H + head, whose states follow each other in memory.
      int64_t first_task, last_task;
      my_share(rows * H, &first_task, &last_task);
      const int64_t head_floats = d.headdim * d.d_state;
      products(product, w[kInW], w[kInB], scratch, D, zx_buf, din, din, D, none, [&] {
        if (first_task < last_task) prefetch(ssm + first_task * head_floats, kPrefetchBytes);
      });

      const int64_t heads_per_group = H / d.ngroups;
      float *BC = scratch, *xs = scratch + 2 * d.d_state;
      int64_t have = -1;  // the (row, group) whose B, C this thread has in BC
      for (int64_t task = first_task; task < last_task; ++task) {
        const int64_t r = task / H, h = task % H, rg = r * d.ngroups + h / heads_per_group;
        const float *zx = zx_buf + r * din, *conv_r = conv + r * conv_dim * K;
        if (rg != have) group_BC(d, w, zx + di, conv_r, h / heads_per_group, BC), have = rg;
        sumsq_buf[task] = ssm_head(d, w, s, zx, conv_r, BC, ssm + r * H * head_floats, y_buf + r * di + h * d.headdim,
                                   xs, h);
      }
      NextProduct{w[kOutW], D, di}();
#pragma omp barrier

#pragma omp for nowait
      for (int64_t rc = 0; rc < rows * conv_dim; ++rc) {  // the conv state takes this step's input (read above)
        float* state = conv + rc * K;
        for (int64_t k = 0; k + 1 < K; ++k) state[k] = state[k + 1];
        state[K - 1] = zx_buf[(rc / conv_dim) * din + di + rc % conv_dim];
      }
      // Gated RMSNorm (y already holds y * silu(z)), per group of heads, with the per-head sums of squares.
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < d.ngroups; ++g) {
          float ss = 0.0f;
          for (int64_t h = g * heads_per_group; h < (g + 1) * heads_per_group; ++h) ss += sumsq_buf[r * H + h];
          const float scale = 1.0f / std::sqrt(ss / static_cast<float>(group) + s[1]);
          for (int64_t i = g * group; i < (g + 1) * group; ++i)
            scratch[r * di + i] = y_buf[r * di + i] * scale * w[kGateNormW][i];
        }
      products(product_add, w[kOutW], w[kOutB], scratch, di, x_buf, D, D, di, none,
               NextProduct{w[kFc1W], d.mlp_dim, D});

      rms_norm(x_buf, w[kNorm2], s[2], scratch, rows, D);
      products(product, w[kFc1W], w[kFc1B], scratch, D, hidden_buf, d.mlp_dim, d.mlp_dim, D,
               [&](int64_t n0, int64_t n1) {
                 for (int64_t r = 0; r < rows; ++r) apply<vgelu, gelu>(hidden_buf + r * d.mlp_dim + n0, n1 - n0);
               },
               NextProduct{w[kFc2W], D, d.mlp_dim});
      const NextProduct next = l + 1 < d.n_layers ? NextProduct{w[kLayerParams + kInW], din, D}  // next layer's
                                                  : NextProduct{params[2], d.vocab, D};           // the head
      products(product_add, w[kFc2W], w[kFc2B], hidden_buf, d.mlp_dim, x_buf, D, D, d.mlp_dim, none, next);
    }
    rms_norm(x_buf, params[1], scalars[d.n_layers * kLayerScalars], scratch, rows, D);
    products(product, params[2], nullptr, scratch, D, logits, d.vocab, d.vocab, D, none, NextProduct{nullptr, 0, 0});
  }
  for (int64_t r = 0; r < rows; ++r) next_pos[r] += 1;
  return 0;
}

// For tests: out = f(in) elementwise, through the vector code and its scalar tail, with f by `which`: 0 exp,
// 1 SiLU, 2 GELU. Returns 0, or 1 for an unknown `which`.
int simba_fused_math(int64_t which, const float* in, float* out, int64_t n) {
  std::memcpy(out, in, n * sizeof(float));
  switch (which) {
    case 0: apply<vexp, expf_>(out, n); return 0;
    case 1: apply<vsilu, silu>(out, n); return 0;
    case 2: apply<vgelu, gelu>(out, n); return 0;
    default: return 1;
  }
}

}  // extern "C"
