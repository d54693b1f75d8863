// Block-sparse causal attention for XLA:CPU, as two XLA FFI custom calls (forward and backward).
//
// Loaded by musenet_jax/cpu_attention.py, which compiles this file for the host CPU on first use.
// Layout: q, k, v, o, do, dq, dk, dv are f32[Z, T, N, H] (Z = flattened leading batch dims, T tokens,
// N heads, H head dim); lse is f32[Z, N, T]. Every (z, n) head is independent; heads are spread over
// XLA's intra-op thread pool.
//
// A pattern is cut into the same disjoint components as pallas_kernels.patterns, and each component is
// computed on the few tiles that hold its allowed (query, key) pairs:
//   natural pieces: a block of Bq consecutive queries reads one contiguous key window; every query row's
//     allowed keys in that window form one interval [lo(i), hi(i)]:
//       dense          j in [0, i]
//       strided local  j in [i - l, i]
//       fixed local    j in [floor(i / l) * l, i]
//       fixed summary  keys gathered at the c summary positions of every block, a prefix of that list.
//   the grid piece (strided summary): in the [R, l] grid view (position = g * l + c), causal attention down
//     each column c; query row g reads key rows g' <= g - m (m = 2 beside the local band, else 0).
// All pieces of a query share one softmax (one row max, one denominator), so the result equals dense
// attention under the pattern's mask. The backward recomputes the probabilities from the saved
// log-sum-exp (flash-attention style) and never stores a [T, T] array.
//
// The matmuls run on one register-blocked kernel (6 rows x 16 columns of fp32 accumulators) written with
// GCC/Clang vector extensions, so the same source vectorises for AVX2, AVX-512 and NEON. Within a block's
// window, 6 x 16 tiles that hold no allowed pair are skipped (the `Band` ranges). What keeps the kernel
// near that tile's speed is memory layout: keys are repacked into 16-key panels (K^T, V^T) and 16-column
// row panels (K, V) as the windows reach them, dK / dV leave their accumulators as the windows pass, the
// grid piece works on grid-order copies, and accumulators are written before they are read.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

using Index = int64_t;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// --- Vector helpers -------------------------------------------------------------------------------

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads and stores
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store8(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp(x) on 8 lanes: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial (rel. error
// ~2e-7). Lanes below -87 (including -inf) give exactly 0.
inline v8 exp8(v8 x) {
  const v8 too_small = splat(-87.0f);
  v8i zero_lane = x < too_small;
  x = x < too_small ? too_small : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  v8 n = (x * splat(1.44269504088896341f) + magic) - magic;
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 result = p * (v8)bits;
  return zero_lane ? splat(0.0f) : result;
}

inline Index round8(Index x) { return (x + 7) / 8 * 8; }

// --- GEMM: C[M, N] (+)= A[M, K] B[K, N] ------------------------------------------------------------
//
// A is row-major. B and C are row-major or panel-major: the layout of keys transposed to [H, keys] in
// panels of 16 keys ([keys / 16][H][16]), so that a window of keys is a run of contiguous 4 KiB panels
// and the kernel streams each panel from L1 (a [H, T] row-major transpose would put every one of the H
// rows of a tile on its own page).

constexpr Index kPanel = 16;

template <class F>
struct Mat {
  F* p;
  Index ld;       // row stride (16 inside a panel)
  Index pstride;  // panel stride, 0 for row-major
  F* col(Index c) const { return pstride ? p + (c / kPanel) * pstride + c % kPanel : p + c; }
};
using In = Mat<const float>;
using Out = Mat<float>;

inline In rows_in(const float* p, Index ld) { return {p, ld, 0}; }
inline Out rows_out(float* p, Index ld) { return {p, ld, 0}; }
// Columns [c0, ...) of a panel-major matrix with `r` rows; c0 must be a multiple of 16.
inline In panels_in(const float* p, Index r, Index c0) { return {p + c0 / kPanel * r * kPanel, kPanel, r * kPanel}; }
inline Out panels_out(float* p, Index r, Index c0) { return {p + c0 / kPanel * r * kPanel, kPanel, r * kPanel}; }

template <int MR>
inline void kernel16(Index K, const float* A, Index lda, const float* B, Index ldb, float* C, Index ldc,
                     bool acc) {
  v8 c0[MR], c1[MR];
  // Unrolled so that the accumulators live in registers from the start (a rolled loop is compiled to a
  // memset of a stack copy, ~15 % of a 6 x 16 x 64 tile).
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = splat(0.0f);
  for (Index k = 0; k < K; ++k) {
    const v8 b0 = load8(B + k * ldb), b1 = load8(B + k * ldb + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const v8 a = splat(A[r * lda + k]);
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
    if (acc) {
      c0[r] += load8(c);
      c1[r] += load8(c + 8);
    }
    store8(c, c0[r]);
    store8(c + 8, c1[r]);
  }
}

template <int MR>
inline void kernel8(Index K, const float* A, Index lda, const float* B, Index ldb, float* C, Index ldc,
                    bool acc) {
  v8 c0[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c0[r] = splat(0.0f);
  for (Index k = 0; k < K; ++k) {
    const v8 b0 = load8(B + k * ldb);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) c0[r] += splat(A[r * lda + k]) * b0;
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
    store8(c, acc ? c0[r] + load8(c) : c0[r]);
  }
}

template <int MR>
inline void tile(Index K, const float* A, Index lda, const float* B, Index ldb, float* C, Index ldc, bool acc,
                 bool wide) {
  if (wide) {
    kernel16<MR>(K, A, lda, B, ldb, C, ldc, acc);
  } else {
    kernel8<MR>(K, A, lda, B, ldb, C, ldc, acc);
  }
}

template <int MR>
inline void tile_or_zero(Index K, const float* A, Index lda, const float* B, Index ldb, float* C, Index ldc, bool acc,
                         bool wide) {
  if (K > 0) {
    tile<MR>(K, A, lda, B, ldb, C, ldc, acc, wide);
  } else if (!acc) {
    for (int r = 0; r < MR; ++r) std::memset(C + r * ldc, 0, sizeof(float) * (wide ? 16 : 8));
  }
}

// Every tile contracts over all of [0, K).
struct FullRange {
  Index K;
  void operator()(Index, Index, Index, Index, Index* k0, Index* k1) const {
    *k0 = 0;
    *k1 = K;
  }
};

// C (+)= A B, tile by tile (6 rows x 16 or 8 columns). range(i0, i1, j0, j1, &k0, &k1) narrows the
// contraction of the tile C[i0:i1, j0:j1] to [k0, k1): zero terms are skipped, an empty range skips the
// tile (zero-filled unless accumulating). That is how banded products skip what a mask would zero.
template <class Range>
void gemm_tiles(Index M, Index N, const float* A, Index lda, In B, Out C, bool acc, const Range& range) {
  if (M <= 0 || N <= 0) return;
  Index j = 0;
  for (; j + 8 <= N;) {
    // 16 columns stay inside one panel: j is a multiple of 8 and only the last step is 8 wide.
    const bool wide = j + 16 <= N;
    const Index j1 = j + (wide ? 16 : 8);
    const float* b = B.col(j);
    float* c = C.col(j);
    for (Index i = 0; i < M; i += 6) {
      const Index mr = std::min<Index>(6, M - i);
      Index k0, k1;
      range(i, i + mr, j, j1, &k0, &k1);
      const Index kn = std::max<Index>(0, k1 - k0);
      const float* a = A + i * lda + k0;
      const float* bk = b + k0 * B.ld;
      float* ci = c + i * C.ld;
      switch (mr) {
        case 6: tile_or_zero<6>(kn, a, lda, bk, B.ld, ci, C.ld, acc, wide); break;
        case 5: tile_or_zero<5>(kn, a, lda, bk, B.ld, ci, C.ld, acc, wide); break;
        case 4: tile_or_zero<4>(kn, a, lda, bk, B.ld, ci, C.ld, acc, wide); break;
        case 3: tile_or_zero<3>(kn, a, lda, bk, B.ld, ci, C.ld, acc, wide); break;
        case 2: tile_or_zero<2>(kn, a, lda, bk, B.ld, ci, C.ld, acc, wide); break;
        default: tile_or_zero<1>(kn, a, lda, bk, B.ld, ci, C.ld, acc, wide); break;
      }
    }
    j = j1;
  }
  for (; j < N; ++j) {  // the last N % 8 columns
    const float* b = B.col(j);
    float* c = C.col(j);
    for (Index i = 0; i < M; ++i) {
      Index k0, k1;
      range(i, i + 1, j, j + 1, &k0, &k1);
      float s = 0.0f;
      for (Index k = k0; k < k1; ++k) s += A[i * lda + k] * b[k * B.ld];
      c[i * C.ld] = acc ? c[i * C.ld] + s : s;
    }
  }
}

void gemm(Index M, Index N, Index K, const float* A, Index lda, In B, Out C, bool acc) {
  gemm_tiles(M, N, A, lda, B, C, acc, FullRange{K});
}

// The band of one block of queries against its key window: query row r may read window keys
// [lo[r], hi[r]] (empty if hi < lo); both bounds are nondecreasing in r.
struct Band {
  const Index *lo, *hi;
  Index m, w;  // rows, window width

  // Tiles of S = Q K^T (contraction over H) that hold an allowed entry; the others are skipped.
  struct Logits {
    const Band& band;
    Index H;
    void operator()(Index i0, Index i1, Index j0, Index j1, Index* k0, Index* k1) const {
      const bool hit = band.lo[i0] < j1 && band.hi[i1 - 1] >= j0;
      *k0 = 0;
      *k1 = hit ? H : 0;
    }
  };
  // Rows of P V or dS K (contraction over the window's keys): only the rows' allowed keys.
  struct Keys {
    const Band& band;
    void operator()(Index i0, Index i1, Index, Index, Index* k0, Index* k1) const {
      *k0 = std::max<Index>(0, band.lo[i0]);
      *k1 = std::min(band.w, band.hi[i1 - 1] + 1);
    }
  };
  // Columns of Q^T dS or dO^T P (contraction over the block's queries): only queries that read them.
  struct Queries {
    const Band& band;
    void operator()(Index, Index, Index j0, Index j1, Index* k0, Index* k1) const {
      *k0 = std::lower_bound(band.hi, band.hi + band.m, j0) - band.hi;
      *k1 = std::upper_bound(band.lo, band.lo + band.m, j1 - 1) - band.lo;
    }
  };
};

// --- Transposes ---------------------------------------------------------------------------------

// Transposes an 8 x 8 block: row r of the result (dst[r]) is column r of the rows src[0..7]; with `add`
// the result is added to dst. Eight unpack/shuffle/permute rounds on AVX, plain loops elsewhere.
inline void transpose8x8(const float* const* src, float* const* dst, bool add) {
#if defined(__AVX__)
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src[i]);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) {
    _mm256_storeu_ps(dst[i], add ? _mm256_add_ps(_mm256_loadu_ps(dst[i]), t[i]) : t[i]);
  }
#else
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) dst[i][j] = add ? dst[i][j] + src[j][i] : src[j][i];
  }
#endif
}

// Row j of the result is column j of the n x C matrix whose row r is src_row(r); dst_row(c) is where
// column c goes (n floats). Full 8 x 8 blocks are vectorised; the edges are scalar.
template <class SrcRow, class DstRow>
inline void transpose_blocks(Index n, Index C, SrcRow src_row, DstRow dst_row, bool add) {
  Index r0 = 0;
  for (; r0 + 8 <= n; r0 += 8) {
    const float* src[8];
    for (int i = 0; i < 8; ++i) src[i] = src_row(r0 + i);
    Index c0 = 0;
    for (; c0 + 8 <= C; c0 += 8) {
      const float* s8[8];
      float* d8[8];
      for (int i = 0; i < 8; ++i) s8[i] = src[i] + c0, d8[i] = dst_row(c0 + i) + r0;
      transpose8x8(s8, d8, add);
    }
    for (; c0 < C; ++c0) {
      float* d = dst_row(c0) + r0;
      for (int i = 0; i < 8; ++i) d[i] = add ? d[i] + src[i][c0] : src[i][c0];
    }
  }
  for (; r0 < n; ++r0) {
    const float* src = src_row(r0);
    for (Index c = 0; c < C; ++c) {
      float* d = dst_row(c) + r0;
      *d = add ? *d + src[c] : src[c];
    }
  }
}

// dst[c * ldd + r] = src[r * lds + c] for an R x C block.
void transpose(Index R, Index C, const float* src, Index lds, float* dst, Index ldd) {
  transpose_blocks(
      R, C, [&](Index r) { return src + r * lds; }, [&](Index c) { return dst + c * ldd; }, false);
}

// dst[0, n) += src[0, n).
inline void add_row(float* dst, const float* src, Index n) {
  Index h = 0;
  for (; h + 8 <= n; h += 8) store8(dst + h, load8(dst + h) + load8(src + h));
  for (; h < n; ++h) dst[h] += src[h];
}

// --- Patterns -------------------------------------------------------------------------------------

enum PatternKind : int64_t { kDense = 0, kStrided = 1, kFixed = 2 };
enum Part : int64_t { kBoth = 0, kLocal = 1, kSummary = 2 };
enum PieceKind { kDenseCausal, kStridedLocal, kFixedLocal, kFixedSummaryEarlier, kFixedSummaryCausal };

struct Pattern {
  int64_t kind, stride, summary, part;
  float scale;
  Index block_q;

  // Natural pieces in the order their key windows are laid out.
  std::vector<PieceKind> natural_pieces() const {
    if (kind == kDense) return {kDenseCausal};
    if (kind == kStrided) {
      if (part == kSummary) return {};
      return {kStridedLocal};
    }
    if (part == kLocal) return {kFixedLocal};
    if (part == kSummary) return {kFixedSummaryCausal};
    return {kFixedLocal, kFixedSummaryEarlier};
  }
  bool has_grid() const { return kind == kStrided && part != kLocal; }
  // The grid piece's query row g reads key rows g' <= g - grid_skip (same column).
  Index grid_skip() const { return part == kSummary ? 0 : 2; }
  bool gathers_summary() const { return kind == kFixed && part != kLocal; }
};

// Allowed keys of query i in the piece's own key index space: [lo, hi], empty when hi < lo.
inline void interval(const Pattern& p, PieceKind piece, Index i, Index* lo, Index* hi) {
  const Index l = p.stride, c = p.summary;
  *lo = 0;
  *hi = -1;
  switch (piece) {
    case kDenseCausal: *lo = 0; *hi = i; return;
    case kStridedLocal: *lo = std::max<Index>(0, i - l); *hi = i; return;
    case kFixedLocal: *lo = i / l * l; *hi = i; return;
    case kFixedSummaryEarlier: *lo = 0; *hi = i / l * c - 1; return;
    case kFixedSummaryCausal:
      *lo = 0;
      *hi = i / l * c + std::clamp<Index>(i % l - (l - c) + 1, 0, c) - 1;
      return;
  }
}

// One (z, n) head: row r of q is q + r * rs.
struct HeadPtrs {
  const float *q, *k, *v;
  Index rs;
};

// The grid piece's rows of column c: positions c, c + l, c + 2l, ... below T.
inline Index column_rows(Index T, Index l, Index c) { return c < T ? (T - c + l - 1) / l : 0; }

// Key window [k0, k1) of a natural piece for query rows [i0, i1) (intervals are monotone in i).
inline void window(const Pattern& p, PieceKind piece, Index i0, Index i1, Index len, Index* k0, Index* k1) {
  Index lo0, hi0, lo1, hi1;
  interval(p, piece, i0, &lo0, &hi0);
  interval(p, piece, i1 - 1, &lo1, &hi1);
  *k0 = std::max<Index>(0, lo0) / kPanel * kPanel;  // whole panels of K^T
  *k1 = std::min<Index>(len, hi1 + 1);
  if (*k1 < *k0) *k1 = *k0;
}

// The band of queries [i0, i0 + m) in a natural piece's key window [k0, k0 + w), into lo / hi.
inline Band make_band(const Pattern& p, PieceKind piece, Index i0, Index m, Index k0, Index w, std::vector<Index>& lo,
                      std::vector<Index>& hi) {
  lo.resize(m);
  hi.resize(m);
  for (Index r = 0; r < m; ++r) {
    Index a, b;
    interval(p, piece, i0 + r, &a, &b);
    lo[r] = std::max<Index>(a - k0, 0);
    hi[r] = std::min(b - k0, w - 1);
  }
  return Band{lo.data(), hi.data(), m, w};
}

// --- Threading ------------------------------------------------------------------------------------

// Runs f(0) .. f(n - 1) on XLA's intra-op pool and the calling thread. The caller only waits for items
// already claimed, so tasks that the pool starts late (or never, if its threads are busy) cost nothing.
void parallel_for(ffi::ThreadPool& pool, Index n, const std::function<void(Index)>& f) {
  struct State {
    std::atomic<Index> next{0};
    std::atomic<Index> busy{0};
    Index n = 0;
    const std::function<void(Index)>* f = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->f = &f;
  auto work = [](State* s) {
    for (Index t; (t = s->next.fetch_add(1)) < s->n;) (*s->f)(t);
  };
  // The caller works too: num_threads() workers in all, one per core of the intra-op pool.
  const Index helpers = std::min<Index>(n, pool.num_threads()) - 1;
  for (Index w = 0; w < helpers; ++w) {
    pool.Schedule([state, work] {
      state->busy.fetch_add(1);
      work(state.get());
      if (state->busy.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    });
  }
  work(state.get());
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->busy.load() == 0; });
}

// --- Per-head buffers -----------------------------------------------------------------------------
// Buffers live in thread-local storage and keep their capacity across heads and calls: a head at
// T = 8192, H = 64 needs about 12 MiB, and fresh pages for every head cost more than the arithmetic.

// Floats in a panel-major [H, n] buffer (n rounded up to whole panels).
inline Index panel_floats(Index n, Index H) { return (n + kPanel - 1) / kPanel * kPanel * H; }

inline Index round16(Index x) { return (x + kPanel - 1) / kPanel * kPanel; }

// Keys [j0, j1) (j0 a multiple of 16) of t, a panel-major [H, n] buffer, = the transpose of rows j of x
// at x + (idx ? idx[j] : j) * xs. Keys past n in the last panel are zero.
void to_panels(Index j0, Index j1, Index n, Index H, const float* x, Index xs, const Index* idx, float* t) {
  for (Index p0 = j0; p0 < j1; p0 += kPanel) {
    float* panel = t + p0 * H;
    const Index cnt = std::min(kPanel, n - p0);
    if (cnt < kPanel) std::fill(panel, panel + kPanel * H, 0.0f);
    transpose_blocks(
        cnt, H, [&](Index j) { return x + (idx ? idx[p0 + j] : p0 + j) * xs; },
        [&](Index h) { return panel + h * kPanel; }, false);
  }
}

// Rows j in [j0, j1) (j0 a multiple of 16) of x, at x + (idx ? idx[j] : j) * xs, (+)= the transpose of
// the panel-major [H, n] buffer t.
void from_panels(Index j0, Index j1, Index H, const float* t, float* x, Index xs, const Index* idx, bool add) {
  for (Index p0 = j0; p0 < j1; p0 += kPanel) {
    const float* panel = t + p0 * H;
    const Index cnt = std::min(kPanel, j1 - p0);
    transpose_blocks(
        H, cnt, [&](Index h) { return panel + h * kPanel; },
        [&](Index j) { return x + (idx ? idx[p0 + j] : p0 + j) * xs; }, add);
  }
}

// Masks one row of raw logits in place: x * scale on [lo, hi], -inf elsewhere up to ld (a multiple of 8).
// Returns the max. Branch-free on 8 lanes.
inline float mask_row(float* row, Index ld, Index lo, Index hi, float scale) {
  const v8 vs = splat(scale), ninf = splat(kNegInf);
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const int32_t lo32 = static_cast<int32_t>(std::clamp<Index>(lo, -1, ld)),
                hi32 = static_cast<int32_t>(std::clamp<Index>(hi, -1, ld));
  v8 vmax = ninf;
  for (Index j = 0; j < ld; j += 8) {
    const v8i idx = lane + static_cast<int32_t>(j);
    const v8 x = (idx >= lo32) & (idx <= hi32) ? load8(row + j) * vs : ninf;
    store8(row + j, x);
    vmax = x > vmax ? x : vmax;
  }
  float mx = kNegInf;
  for (int t = 0; t < 8; ++t) mx = std::max(mx, vmax[t]);
  return mx;
}

// row[j] = exp(row[j] - mx) on [0, ld) (ld a multiple of 8); returns the sum.
inline float exp_row(float* row, Index ld, float mx) {
  v8 acc = splat(0.0f);
  const v8 vm = splat(mx);
  for (Index j = 0; j < ld; j += 8) {
    const v8 e = exp8(load8(row + j) - vm);
    store8(row + j, e);
    acc += e;
  }
  float total = 0.0f;
  for (int t = 0; t < 8; ++t) total += acc[t];
  return total;
}

inline bool is_summary(PieceKind piece) { return piece == kFixedSummaryEarlier || piece == kFixedSummaryCausal; }

// Keys in rows, split into column panels of 16 (the B operand of P V and dS K): key j, column h at
// t[(h / 16) * rows + j * 16 + h % 16] with rows = 16 * n rounded up to 16. A tile's B panel is then one
// contiguous run; read in place, rows rs floats apart would map onto a few L1 sets and evict each other.
inline Index row_panel_stride(Index n) { return (n + kPanel - 1) / kPanel * kPanel * kPanel; }

void to_row_panels(Index j0, Index j1, Index n, Index H, const float* x, Index xs, const Index* idx, float* t) {
  const Index stride = row_panel_stride(n);
  for (Index j = j0; j < j1; ++j) {
    const float* src = x + (idx ? idx[j] : j) * xs;
    Index h0 = 0;
    for (; h0 + kPanel <= H; h0 += kPanel) {
      float* dst = t + h0 / kPanel * stride + j * kPanel;
      store8(dst, load8(src + h0));
      store8(dst + 8, load8(src + h0 + 8));
    }
    if (h0 < H) std::memcpy(t + h0 / kPanel * stride + j * kPanel, src + h0, sizeof(float) * (H - h0));
  }
}

// The keys one natural piece reads, by its own key index s in [0, len): the head's rows (natural) or the
// gathered summary rows of the fixed pattern (idx). Its copies are built panel by panel just before a
// block's window first reaches them, and the backward's dK / dV accumulators are written out as soon as
// the windows have moved past them, so only about one window of them is ever in cache.
struct Source {
  const Index* idx = nullptr;
  Index len = 0, built = 0, flushed = 0;
  bool backward = false;
  std::vector<float> kt, vt;    // K^T, V^T: panel-major [H, len] (V^T backward only)
  std::vector<float> kr, vr;    // K rows (backward), V rows (forward) in column panels
  std::vector<float> dkt, dvt;  // backward: dK^T, dV^T accumulators, panel-major like kt

  void init(Index n, const Index* rows, Index H, bool bwd) {
    idx = rows, len = n, built = 0, flushed = 0, backward = bwd;
    const Index pf = panel_floats(n, H), rp = (H + kPanel - 1) / kPanel * row_panel_stride(n);
    kt.resize(pf);
    if (bwd) {
      vt.resize(pf);
      kr.resize(rp);
      dkt.resize(pf);
      dvt.resize(pf);
    } else {
      vr.resize(rp);
    }
  }

  // Builds the copies of keys up to k1 (whole panels), with zeroed gradient accumulators.
  void ensure(Index k1, Index H, const HeadPtrs& in) {
    const Index target = std::min(len, round16(k1));
    if (target <= built) return;
    to_panels(built, target, len, H, in.k, in.rs, idx, kt.data());
    if (backward) {
      to_panels(built, target, len, H, in.v, in.rs, idx, vt.data());
      to_row_panels(built, target, len, H, in.k, in.rs, idx, kr.data());
      std::fill(dkt.begin() + built * H, dkt.begin() + round16(target) * H, 0.0f);
      std::fill(dvt.begin() + built * H, dvt.begin() + round16(target) * H, 0.0f);
    } else {
      to_row_panels(built, target, len, H, in.v, in.rs, idx, vr.data());
    }
    built = target;
  }

  // Writes (or adds) dK and dV rows [flushed, upto) from the accumulators; upto a multiple of 16 or len.
  void flush(Index upto, Index H, float* dk, float* dv, Index rs, bool add) {
    upto = std::min(upto, built);
    if (upto <= flushed) return;
    from_panels(flushed, upto, H, dkt.data(), dk, rs, idx, add);
    from_panels(flushed, upto, H, dvt.data(), dv, rs, idx, add);
    flushed = upto;
  }

  In k_rows(Index s0) const { return {kr.data() + s0 * kPanel, kPanel, row_panel_stride(len)}; }
  In v_rows(Index s0) const { return {vr.data() + s0 * kPanel, kPanel, row_panel_stride(len)}; }
};

// A head's sources: natural keys, and the fixed pattern's gathered summary keys.
struct HeadKeys {
  std::vector<Index> sum_rows;
  Source natural, summary;
  bool has_natural = false;

  void init(const Pattern& p, Index T, Index H, bool backward) {
    has_natural = false;
    for (PieceKind piece : p.natural_pieces()) has_natural |= !is_summary(piece);
    if (has_natural) natural.init(T, nullptr, H, backward);
    sum_rows.clear();
    if (p.gathers_summary()) {
      for (Index j = 0; j < T; ++j) {
        if (j % p.stride >= p.stride - p.summary) sum_rows.push_back(j);
      }
      summary.init(static_cast<Index>(sum_rows.size()), sum_rows.data(), H, backward);
    }
  }

  Source& of(PieceKind piece) { return is_summary(piece) ? summary : natural; }
};

// Grid order: row c * R + g of an [l, R, H] copy is position g * l + c (the grid piece's column c is then
// one contiguous [R, H] block). Rows are moved whole (H floats), reading x in position order.
void to_grid(Index T, Index l, Index R, Index H, const float* x, Index rs, std::vector<float>& xg) {
  xg.resize(l * R * H);
  for (Index i = 0; i < T; ++i) std::memcpy(xg.data() + (i % l * R + i / l) * H, x + i * rs, sizeof(float) * H);
}

// Rows of x += their grid-order copy xg (the inverse of to_grid, accumulating).
void add_from_grid(Index T, Index l, Index R, Index H, const float* xg, float* x, Index rs) {
  for (Index i = 0; i < T; ++i) add_row(x + i * rs, xg + (i % l * R + i / l) * H, H);
}

// --- Forward --------------------------------------------------------------------------------------

// o = softmax over all pieces; lse[i] = log-sum-exp of query i's scaled logits (-inf if it has none).
void forward_head(const Pattern& p, Index T, Index H, const HeadPtrs& in, float* o, float* lse) {
  const Index rs = in.rs, l = p.stride, bq = p.block_q;
  // O is not zeroed up front: the first natural piece writes each block's rows (a store needs no read),
  // the other pieces and the grid accumulate.
  thread_local HeadKeys keys;
  keys.init(p, T, H, false);
  const std::vector<PieceKind> pieces = p.natural_pieces();

  // Grid piece: scaled, masked logits of every query, by column: L[(c * R + g) * ldl + g'], from grid-order
  // copies of Q, K and V (see to_grid); K^T per column, its columns padded to a multiple of 8 key rows so
  // that no tile falls back to the scalar column loop.
  const Index R = (T + l - 1) / l, ldl = round8(R), skip = p.grid_skip();
  thread_local std::vector<float> L, ktc, qg, kg, vg, og;
  if (p.has_grid()) {
    to_grid(T, l, R, H, in.q, rs, qg);
    to_grid(T, l, R, H, in.k, rs, kg);
    to_grid(T, l, R, H, in.v, rs, vg);
    L.assign(static_cast<size_t>(l) * R * ldl, kNegInf);
    ktc.assign(H * ldl, 0.0f);
    for (Index c = 0; c < l; ++c) {
      const Index rc = column_rows(T, l, c);
      transpose(rc, H, kg.data() + c * R * H, H, ktc.data(), ldl);
      float* lc = L.data() + c * R * ldl;
      for (Index g0 = 0; g0 < rc; g0 += 16) {
        const Index g1 = std::min(rc, g0 + 16), ncols = std::min(round8(rc), round8(g1 - skip));
        if (g1 - skip <= 0) continue;
        gemm(g1 - g0, ncols, H, qg.data() + (c * R + g0) * H, H, rows_in(ktc.data(), ldl),
             rows_out(lc + g0 * ldl, ldl), false);
        for (Index g = g0; g < g1; ++g) mask_row(lc + g * ldl, ldl, 0, g - skip, p.scale);
      }
    }
  }

  // Natural pass, one block of queries at a time; the probabilities stay unnormalised and the outputs
  // are divided by the shared denominator (inv) instead.
  thread_local std::vector<float> s[2], inv, row_max;
  thread_local std::vector<Index> los[2], his[2];
  inv.resize(T);
  row_max.resize(bq);
  for (Index i0 = 0; i0 < T; i0 += bq) {
    const Index i1 = std::min(T, i0 + bq), m = i1 - i0;
    std::fill(row_max.begin(), row_max.end(), kNegInf);
    Index k0s[2] = {0, 0}, ws[2] = {0, 0}, lds[2] = {8, 8};
    for (size_t pi = 0; pi < pieces.size(); ++pi) {
      Source& src = keys.of(pieces[pi]);
      Index k0, k1;
      window(p, pieces[pi], i0, i1, src.len, &k0, &k1);
      src.ensure(k1, H, in);
      const Index w = k1 - k0, ld = round8(std::max<Index>(w, 1));
      k0s[pi] = k0, ws[pi] = w, lds[pi] = ld;
      s[pi].resize(m * ld);
      const Band band = make_band(p, pieces[pi], i0, m, k0, w, los[pi], his[pi]);
      // ld columns: K^T's panels are zero-padded, so the last tile may run past w (masked below).
      gemm_tiles(m, ld, in.q + i0 * rs, rs, panels_in(src.kt.data(), H, k0), rows_out(s[pi].data(), ld), false,
                 Band::Logits{band, H});
      for (Index r = 0; r < m; ++r) {
        const float mx = mask_row(s[pi].data() + r * ld, ld, band.lo[r], band.hi[r], p.scale);
        row_max[r] = std::max(row_max[r], mx);
      }
    }
    for (Index r = 0; r < m; ++r) {
      const Index i = i0 + r;
      float* grow = p.has_grid() ? L.data() + ((i % l) * R + i / l) * ldl : nullptr;
      if (grow) {
        v8 vm = splat(row_max[r]);
        for (Index j = 0; j < ldl; j += 8) {
          const v8 x = load8(grow + j);
          vm = x > vm ? x : vm;
        }
        for (int t = 0; t < 8; ++t) row_max[r] = std::max(row_max[r], vm[t]);
      }
      const float mx = row_max[r] == kNegInf ? 0.0f : row_max[r];
      float total = 0.0f;
      for (size_t pi = 0; pi < pieces.size(); ++pi) total += exp_row(s[pi].data() + r * lds[pi], lds[pi], mx);
      if (grow) total += exp_row(grow, ldl, mx);
      inv[i] = total > 0.0f ? 1.0f / total : 0.0f;
      lse[i] = total > 0.0f ? mx + std::log(total) : kNegInf;
      if (grow) {
        for (Index j = 0; j < ldl; j += 8) store8(grow + j, load8(grow + j) * splat(inv[i]));
      }
    }
    for (size_t pi = 0; pi < pieces.size(); ++pi) {
      const Source& src = keys.of(pieces[pi]);
      const Band band{los[pi].data(), his[pi].data(), m, ws[pi]};
      gemm_tiles(m, H, s[pi].data(), lds[pi], src.v_rows(k0s[pi]), rows_out(o + i0 * rs, rs), pi > 0,
                 Band::Keys{band});
    }
    for (Index i = i0; i < i1; ++i) {
      float* row = o + i * rs;
      if (pieces.empty()) {
        std::memset(row, 0, sizeof(float) * H);
      } else {
        for (Index h = 0; h < H; ++h) row[h] *= inv[i];
      }
    }
  }

  // Grid piece's values: per column, P [rc, rc] . V [rc, H] (P already normalised) into a grid-order
  // buffer, added to O's rows in position order at the end.
  if (p.has_grid()) {
    og.resize(l * R * H);
    for (Index c = 0; c < l; ++c) {
      const Index rc = column_rows(T, l, c);
      const float* lc = L.data() + c * R * ldl;
      for (Index g0 = 0; g0 < rc; g0 += 16) {
        const Index g1 = std::min(rc, g0 + 16), kk = std::max<Index>(0, std::min(rc, g1 - skip));
        gemm(g1 - g0, H, kk, lc + g0 * ldl, ldl, rows_in(vg.data() + c * R * H, H),
             rows_out(og.data() + (c * R + g0) * H, H), false);
      }
    }
    add_from_grid(T, l, R, H, og.data(), o, rs);
  }
}

// --- Backward -------------------------------------------------------------------------------------

struct GradPtrs {
  const float *o, *lse, *d_o;
  float *dq, *dk, *dv;
};

// Row of raw logits -> dS = P * (dP - D) * scale with P = exp(S * scale - lse) on [lo, hi], 0 elsewhere;
// p_row keeps P. Both rows have width w, a multiple of 8. Branch-free on 8 lanes.
inline void softmax_grad_row(float* p_row, float* dp_row, Index w, Index lo, Index hi, float scale, float lse,
                             float d) {
  if (hi < lo || lse == kNegInf) {
    std::fill(p_row, p_row + w, 0.0f);
    std::fill(dp_row, dp_row + w, 0.0f);
    return;
  }
  const v8 vs = splat(scale), vl = splat(lse), vd = splat(d), zero = splat(0.0f);
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const int32_t lo32 = static_cast<int32_t>(std::clamp<Index>(lo, -1, w)),
                hi32 = static_cast<int32_t>(std::clamp<Index>(hi, -1, w));
  for (Index j = 0; j < w; j += 8) {
    const v8i idx = lane + static_cast<int32_t>(j);
    const v8 pr = (idx >= lo32) & (idx <= hi32) ? exp8(load8(p_row + j) * vs - vl) : zero;
    store8(p_row + j, pr);
    store8(dp_row + j, pr * (load8(dp_row + j) - vd) * vs);
  }
}

void backward_head(const Pattern& p, Index T, Index H, const HeadPtrs& in, const GradPtrs& g) {
  const Index rs = in.rs, l = p.stride, bq = p.block_q;
  // dQ is zeroed block by block, just before the block's first product accumulates into it (see below).
  // D_i = dO_i . O_i: the softmax Jacobian's row term.
  thread_local std::vector<float> dd;
  dd.resize(T);
  for (Index i = 0; i < T; ++i) {
    const float *x = g.d_o + i * rs, *y = g.o + i * rs;
    v8 acc = splat(0.0f);
    Index h = 0;
    for (; h + 8 <= H; h += 8) acc += load8(x + h) * load8(y + h);
    float s = 0.0f;
    for (int t = 0; t < 8; ++t) s += acc[t];
    for (; h < H; ++h) s += x[h] * y[h];
    dd[i] = s;
  }

  // Natural pieces: dK and dV accumulate transposed (panel-major [H, keys]), so that dK^T += Q^T dS and
  // dV^T += dO^T P multiply row-major tiles with no per-tile transposes; Q^T and dO^T (their A operands)
  // are transposed block by block.
  thread_local HeadKeys keys;
  keys.init(p, T, H, true);
  const std::vector<PieceKind> pieces = p.natural_pieces();
  thread_local std::vector<float> qt, dot, s, dp;
  thread_local std::vector<Index> lo, hi;
  qt.resize(H * bq);
  dot.resize(H * bq);
  for (Index i0 = 0; i0 < T; i0 += bq) {
    const Index i1 = std::min(T, i0 + bq), m = i1 - i0;
    if (!pieces.empty()) {
      transpose(m, H, in.q + i0 * rs, rs, qt.data(), m);
      transpose(m, H, g.d_o + i0 * rs, rs, dot.data(), m);
    }
    bool first = true;
    for (PieceKind piece : pieces) {
      Source& src = keys.of(piece);
      Index k0, k1;
      window(p, piece, i0, i1, src.len, &k0, &k1);
      const Index w = k1 - k0, ld = round8(std::max<Index>(w, 1));
      if (w <= 0) continue;
      src.ensure(k1, H, in);
      s.resize(m * ld);
      dp.resize(m * ld);
      const Band band = make_band(p, piece, i0, m, k0, w, lo, hi);
      gemm_tiles(m, ld, in.q + i0 * rs, rs, panels_in(src.kt.data(), H, k0), rows_out(s.data(), ld), false,
                 Band::Logits{band, H});
      gemm_tiles(m, ld, g.d_o + i0 * rs, rs, panels_in(src.vt.data(), H, k0), rows_out(dp.data(), ld), false,
                 Band::Logits{band, H});
      for (Index r = 0; r < m; ++r) {
        softmax_grad_row(s.data() + r * ld, dp.data() + r * ld, ld, band.lo[r], band.hi[r], p.scale, g.lse[i0 + r],
                         dd[i0 + r]);
      }
      // dQ += dS K (the block's first piece writes its rows: no read of rows evicted since);
      // dK^T += Q^T dS;  dV^T += dO^T P (ld columns: the accumulators' panels are padded).
      gemm_tiles(m, H, dp.data(), ld, src.k_rows(k0), rows_out(g.dq + i0 * rs, rs), !first, Band::Keys{band});
      first = false;
      gemm_tiles(H, ld, qt.data(), m, rows_in(dp.data(), ld), panels_out(src.dkt.data(), H, k0), true,
                 Band::Queries{band});
      gemm_tiles(H, ld, dot.data(), m, rows_in(s.data(), ld), panels_out(src.dvt.data(), H, k0), true,
                 Band::Queries{band});
    }
    if (first) {  // no piece wrote these rows
      for (Index i = i0; i < i1; ++i) std::memset(g.dq + i * rs, 0, sizeof(float) * H);
    }
    // Natural keys below the next block's window are final: write their dK, dV rows now.
    if (keys.has_natural && i1 < T) {
      for (PieceKind piece : pieces) {
        if (is_summary(piece)) continue;
        Index k0, k1;
        window(p, piece, i1, std::min(T, i1 + bq), T, &k0, &k1);
        keys.natural.flush(k0, H, g.dk, g.dv, rs, false);
      }
    }
  }
  // The rest of dK, dV (zeros where no natural piece reads natural keys); the summary keys' part adds on.
  if (keys.has_natural) {
    keys.natural.ensure(T, H, in);  // keys no window reached: zero accumulators
    keys.natural.flush(T, H, g.dk, g.dv, rs, false);
  } else {
    for (Index i = 0; i < T; ++i) {
      std::memset(g.dk + i * rs, 0, sizeof(float) * H);
      std::memset(g.dv + i * rs, 0, sizeof(float) * H);
    }
  }
  if (!keys.sum_rows.empty()) {
    keys.summary.ensure(keys.summary.len, H, in);
    keys.summary.flush(keys.summary.len, H, g.dk, g.dv, rs, true);
  }

  if (!p.has_grid()) return;
  // Grid piece, one column c at a time, on grid-order copies (see to_grid), as one band: query row g reads
  // key rows [0, g - skip]. The same products as for the natural pieces on [rc, rc] tiles: dK^T += Q^T dS
  // and dV^T += dO^T P accumulate transposed ([H, rows]). K^T, V^T, Q^T and dO^T are [H, R8] copies per
  // column (rows padded to 8 keys; pad columns finite and masked). dQ, dK, dV collect in grid order and
  // are added to their rows in position order at the end.
  const Index R = (T + l - 1) / l, skip = p.grid_skip(), R8 = round8(R);
  thread_local std::vector<float> qg, kg, vg, dog, dqg, dkg, dvg, ktc, vtc, qct, doct, st, dpt, dkct, dvct;
  thread_local std::vector<Index> glo, ghi;
  to_grid(T, l, R, H, in.q, rs, qg);
  to_grid(T, l, R, H, in.k, rs, kg);
  to_grid(T, l, R, H, in.v, rs, vg);
  to_grid(T, l, R, H, g.d_o, rs, dog);
  for (auto* x : {&dqg, &dkg, &dvg}) x->resize(l * R * H);
  for (auto* x : {&ktc, &vtc, &qct, &doct}) x->assign(H * R8, 0.0f);
  for (auto* x : {&st, &dpt}) x->resize(R * R8);
  for (auto* x : {&dkct, &dvct}) x->resize(H * R8);
  for (Index c = 0; c < l; ++c) {
    const Index rc = column_rows(T, l, c);
    if (rc == 0) continue;
    const Index base = c * R * H;
    transpose(rc, H, kg.data() + base, H, ktc.data(), R8);
    transpose(rc, H, vg.data() + base, H, vtc.data(), R8);
    transpose(rc, H, qg.data() + base, H, qct.data(), R8);
    transpose(rc, H, dog.data() + base, H, doct.data(), R8);
    glo.assign(rc, 0);
    ghi.resize(rc);
    for (Index r = 0; r < rc; ++r) ghi[r] = r - skip;
    const Band band{glo.data(), ghi.data(), rc, rc};
    gemm_tiles(rc, R8, qg.data() + base, H, rows_in(ktc.data(), R8), rows_out(st.data(), R8), false,
               Band::Logits{band, H});
    gemm_tiles(rc, R8, dog.data() + base, H, rows_in(vtc.data(), R8), rows_out(dpt.data(), R8), false,
               Band::Logits{band, H});
    for (Index r = 0; r < rc; ++r) {
      const Index i = r * l + c;
      softmax_grad_row(st.data() + r * R8, dpt.data() + r * R8, R8, 0, r - skip, p.scale, g.lse[i], dd[i]);
    }
    // dQ = dS K;  dK^T = Q^T dS;  dV^T = dO^T P.
    gemm_tiles(rc, H, dpt.data(), R8, rows_in(kg.data() + base, H), rows_out(dqg.data() + base, H), false,
               Band::Keys{band});
    gemm_tiles(H, R8, qct.data(), R8, rows_in(dpt.data(), R8), rows_out(dkct.data(), R8), false,
               Band::Queries{band});
    gemm_tiles(H, R8, doct.data(), R8, rows_in(st.data(), R8), rows_out(dvct.data(), R8), false,
               Band::Queries{band});
    transpose(H, rc, dkct.data(), R8, dkg.data() + base, H);
    transpose(H, rc, dvct.data(), R8, dvg.data() + base, H);
  }
  add_from_grid(T, l, R, H, dqg.data(), g.dq, rs);
  add_from_grid(T, l, R, H, dkg.data(), g.dk, rs);
  add_from_grid(T, l, R, H, dvg.data(), g.dv, rs);
}

// --- FFI entry points -----------------------------------------------------------------------------

struct Shape {
  Index z = 1, t = 0, n = 0, h = 0;
};

ffi::Error parse(ffi::Buffer<ffi::F32>& x, Shape* shape) {
  auto dims = x.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("sparse attention: expected [..., T, N, H] inputs");
  const size_t r = dims.size();
  shape->t = dims[r - 3];
  shape->n = dims[r - 2];
  shape->h = dims[r - 1];
  shape->z = 1;
  for (size_t d = 0; d + 3 < r; ++d) shape->z *= dims[d];
  return ffi::Error::Success();
}

ffi::Error make_pattern(int64_t kind, int64_t stride, int64_t summary, int64_t part, int64_t block_q, float scale,
                        Pattern* p) {
  if (kind < kDense || kind > kFixed) return ffi::Error::InvalidArgument("sparse attention: unknown pattern");
  if (kind != kDense && stride < 1) return ffi::Error::InvalidArgument("sparse attention: stride must be >= 1");
  if (kind == kFixed && (summary < 1 || summary > stride)) {
    return ffi::Error::InvalidArgument("sparse attention: need 1 <= summary <= stride");
  }
  if (part < kBoth || part > kSummary || (kind == kDense && part != kBoth)) {
    return ffi::Error::InvalidArgument("sparse attention: bad part");
  }
  if (block_q < 1) return ffi::Error::InvalidArgument("sparse attention: block_q must be >= 1");
  *p = Pattern{kind, kind == kDense ? 1 : stride, summary, part, scale, block_q};
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, int64_t pattern, int64_t stride,
                   int64_t summary, int64_t part, int64_t block_q, float scale) {
  Shape sh;
  if (auto err = parse(q, &sh); err.failure()) return err;
  Pattern p;
  if (auto err = make_pattern(pattern, stride, summary, part, block_q, scale, &p); err.failure()) return err;
  const Index per_z = sh.t * sh.n * sh.h;
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  float *od = o->typed_data(), *ld = lse->typed_data();
  parallel_for(pool, sh.z * sh.n, [&](Index task) {
    const Index z = task / sh.n, n = task % sh.n, off = z * per_z + n * sh.h;
    forward_head(p, sh.t, sh.h, HeadPtrs{qd + off, kd + off, vd + off, sh.n * sh.h}, od + off,
                 ld + task * sh.t);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_o,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    int64_t pattern, int64_t stride, int64_t summary, int64_t part, int64_t block_q, float scale) {
  Shape sh;
  if (auto err = parse(q, &sh); err.failure()) return err;
  Pattern p;
  if (auto err = make_pattern(pattern, stride, summary, part, block_q, scale, &p); err.failure()) return err;
  const Index per_z = sh.t * sh.n * sh.h;
  parallel_for(pool, sh.z * sh.n, [&](Index task) {
    const Index z = task / sh.n, n = task % sh.n, off = z * per_z + n * sh.h;
    const HeadPtrs in{q.typed_data() + off, k.typed_data() + off, v.typed_data() + off, sh.n * sh.h};
    const GradPtrs gp{o.typed_data() + off, lse.typed_data() + task * sh.t, d_o.typed_data() + off,
                      dq->typed_data() + off, dk->typed_data() + off, dv->typed_data() + off};
    backward_head(p, sh.t, sh.h, in, gp);
  });
  return ffi::Error::Success();
}

// Both calls take the kernel's parameters as the same attributes, in `Forward` / `Backward`'s order.
template <typename Binding>
auto BindParams(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("pattern")
      .template Attr<int64_t>("stride")
      .template Attr<int64_t>("summary")
      .template Attr<int64_t>("part")
      .template Attr<int64_t>("block_q")
      .template Attr<float>("scale");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MusenetSparseAttentionForward, Forward,
                              BindParams(ffi::Ffi::Bind()
                                             .Ctx<ffi::ThreadPool>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Ret<ffi::Buffer<ffi::F32>>()
                                             .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MusenetSparseAttentionBackward, Backward,
                              BindParams(ffi::Ffi::Bind()
                                             .Ctx<ffi::ThreadPool>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Ret<ffi::Buffer<ffi::F32>>()
                                             .Ret<ffi::Buffer<ffi::F32>>()
                                             .Ret<ffi::Buffer<ffi::F32>>()));
