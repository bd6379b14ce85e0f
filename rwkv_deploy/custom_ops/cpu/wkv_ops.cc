// ONNX Runtime custom-op library: the rwkv domain's fused WKV operators on the CPU.
//
// The math is rwkv_deploy/models/wkv.py, one token at a time over T (T = 1 is the decode step):
//   rwkv::WKV4(w[A], u[A], k[B,T,A], v[B,T,A], aa[B,A], bb[B,A], pp[B,A]) -> y[B,T,A], aa', bb', pp'
//   rwkv::WKV5(r, k, v, w [B,T,H,N], u[H,N], S[B,H,N,N] key x value)     -> y[B,T,H,N], S'
//   rwkv::WKV7(r, w, k, v, a, b [B,T,H,N], S[B,H,N,N] value x key)       -> y[B,T,H,N], S'
// Independent recurrences (channels for v4, heads for v5-v7) run in parallel on ONNX Runtime's
// intra-op thread pool. Bad shapes return an error status; nothing is read out of bounds.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// MatMulQ's AVX-512 VNNI and AMX paths are compiled for those targets alone and taken only where the CPU has
// them; a compiler too old for their intrinsics (GCC < 9 / clang < 9, AMX: GCC < 11 / clang < 12) builds the plain
// loop alone.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 9))
#include <immintrin.h>
#define RWKV_VNNI 1
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define RWKV_AMX 1  // AMX tiles need the kernel's permission (arch_prctl), asked once per process
#endif
#endif

#define ORT_API_MANUAL_INIT  // a custom-op library gets the API from the runtime that loads it
#include "onnxruntime_lite_custom_op.h"
#ifdef RWKV_WITH_CUDA
#include "wkv_launchers.h"  // cuda/: the kernels' C launchers (build.py passes -I for it)
#endif

using Ort::Custom::Tensor;
using Shape = std::vector<int64_t>;

namespace {

Ort::Status Invalid(const std::string& msg) { return Ort::Status(msg.c_str(), ORT_INVALID_ARGUMENT); }

std::string Str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// expected may hold -1 for "any"; returns an error naming the input when the shape differs.
Ort::Status Expect(const char* op, const char* name, const Shape& got, const Shape& expected) {
  bool ok = got.size() == expected.size();
  for (size_t i = 0; ok && i < got.size(); ++i) ok = expected[i] < 0 || got[i] == expected[i];
  if (ok) return Ort::Status{nullptr};
  return Invalid(std::string("rwkv::") + op + ": input " + name + " has shape " + Str(got) + ", expected " +
                 Str(expected) + " (-1 = any)");
}

#define RETURN_IF_ERROR(expr)              \
  do {                                     \
    Ort::Status _s = (expr);               \
    if (!_s.IsOK()) return _s;             \
  } while (0)

template <typename Fn>
void ParallelFor(OrtKernelContext* ctx, size_t total, Fn& fn) {
  Ort::KernelContext(ctx).ParallelFor(
      [](void* data, size_t i) { (*static_cast<Fn*>(data))(i); }, total, 0, &fn);
}

// ---- shape checks, shared by the CPU and CUDA kernels ----
Ort::Status Check4(const Tensor<float>& w, const Tensor<float>& u, const Tensor<float>& k, const Tensor<float>& v,
                   const Tensor<float>& aa, const Tensor<float>& bb, const Tensor<float>& pp, int64_t& B, int64_t& T,
                   int64_t& A) {
  const Shape ks = k.Shape();
  if (ks.size() != 3) return Invalid("rwkv::WKV4: input k must be [B, T, A], got " + Str(ks));
  B = ks[0], T = ks[1], A = ks[2];
  RETURN_IF_ERROR(Expect("WKV4", "w", w.Shape(), {A}));
  RETURN_IF_ERROR(Expect("WKV4", "u", u.Shape(), {A}));
  RETURN_IF_ERROR(Expect("WKV4", "v", v.Shape(), {B, T, A}));
  RETURN_IF_ERROR(Expect("WKV4", "aa", aa.Shape(), {B, A}));
  RETURN_IF_ERROR(Expect("WKV4", "bb", bb.Shape(), {B, A}));
  return Expect("WKV4", "pp", pp.Shape(), {B, A});
}

// n_seq inputs of [B, T, H, N] and S [B, H, N, N].
Ort::Status HeadShapes(const char* op, const std::vector<const Tensor<float>*>& seq, const char* const* names,
                       const Tensor<float>& S, int64_t& B, int64_t& T, int64_t& H, int64_t& N) {
  const Shape s0 = seq[0]->Shape();
  if (s0.size() != 4) {
    return Invalid(std::string("rwkv::") + op + ": input " + names[0] + " must be [B, T, H, N], got " + Str(s0));
  }
  B = s0[0], T = s0[1], H = s0[2], N = s0[3];
  for (size_t i = 1; i < seq.size(); ++i) RETURN_IF_ERROR(Expect(op, names[i], seq[i]->Shape(), {B, T, H, N}));
  return Expect(op, "S", S.Shape(), {B, H, N, N});
}

Ort::Status Check5(const Tensor<float>& r, const Tensor<float>& k, const Tensor<float>& v, const Tensor<float>& w,
                   const Tensor<float>& u, const Tensor<float>& S, int64_t& B, int64_t& T, int64_t& H, int64_t& N) {
  static const char* names[] = {"r", "k", "v", "w"};
  RETURN_IF_ERROR(HeadShapes("WKV5", {&r, &k, &v, &w}, names, S, B, T, H, N));
  return Expect("WKV5", "u", u.Shape(), {H, N});
}

Ort::Status Check7(const Tensor<float>& r, const Tensor<float>& w, const Tensor<float>& k, const Tensor<float>& v,
                   const Tensor<float>& a, const Tensor<float>& b, const Tensor<float>& S, int64_t& B, int64_t& T,
                   int64_t& H, int64_t& N) {
  static const char* names[] = {"r", "w", "k", "v", "a", "b"};
  return HeadShapes("WKV7", {&r, &w, &k, &v, &a, &b}, names, S, B, T, H, N);
}

// The CPU kernels' vector paths, in order of speed; RWKV_DEPLOY_MATMULQ=plain|avx2|vnni caps them (tests and
// benchmarks run each on one CPU; read per call, a few hundred nanoseconds against tens of microseconds).
enum class QPath { kPlain, kAvx2, kVnni, kAmx };
const char* const kPathNames[] = {"plain", "avx2", "vnni", "amx"};

QPath Cap() {  // RWKV_DEPLOY_MATMULQ's path, or no cap (kAmx)
  const char* cap = std::getenv("RWKV_DEPLOY_MATMULQ");
  for (int p = 0; cap && p < static_cast<int>(QPath::kAmx); ++p)
    if (std::strcmp(cap, kPathNames[p]) == 0) return static_cast<QPath>(p);
  return QPath::kAmx;
}

#ifdef RWKV_VNNI
bool HasAvx512() {  // F, BW and VL: every AVX-512 CPU but the Xeon Phis
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// exp(x) for x <= 0, 16 lanes: Cody-Waite reduction by ln 2 and Cephes' degree-5 polynomial (within 2 ulp of the
// exact value); below -104 (float's exp is 0 there) clamped, so that -1e38 (the state's "minus infinity") gives 0.
__attribute__((target("avx512f"))) inline __m512 ExpNonPositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

template <typename To, typename From>
inline To BitCast(From v) {
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

// c ? x : y by masks, not a branch (a data-dependent branch mispredicts half the time: WKV4's scalar loop took 10 %
// longer with branches)
inline float Pick(bool c, float x, float y) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return BitCast<float>((BitCast<uint32_t>(x) & m) | (BitCast<uint32_t>(y) & ~m));
}

// ---- RWKV-4: the stable "pp" form, one recurrence per (batch row, channel) ----
#ifdef RWKV_VNNI
// The same recurrence for `chunks` x 16 channels (the first at offset o of token 0; the state in a_, b_, p_),
// 16 lanes at a time with ExpNonPositive, products and sums in the scalar loop's order; returns the channels done.
__attribute__((target("avx512f"))) int64_t WKV4Lanes(int64_t T, int64_t A, int64_t o, int64_t chunks,
                                                     const float* W, const float* U, const float* K, const float* V,
                                                     float* a_, float* b_, float* p_, float* Y) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t c = 16 * q;
    const __m512 w = _mm512_loadu_ps(W + c), u = _mm512_loadu_ps(U + c);
    __m512 a = _mm512_loadu_ps(a_ + c), bs = _mm512_loadu_ps(b_ + c), p = _mm512_loadu_ps(p_ + c);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = o + t * A + c;
      const __m512 kt = _mm512_loadu_ps(K + i), vt = _mm512_loadu_ps(V + i);
      __m512 ww = _mm512_add_ps(u, kt);
      __m512 d = ExpNonPositive(_mm512_sub_ps(zero, _mm512_abs_ps(_mm512_sub_ps(p, ww))));  // -|p - ww|
      __mmask16 m = _mm512_cmp_ps_mask(p, ww, _CMP_GE_OQ);
      __m512 e1 = _mm512_mask_blend_ps(m, d, one), e2 = _mm512_mask_blend_ps(m, one, d);
      _mm512_storeu_ps(Y + i, _mm512_div_ps(_mm512_add_ps(_mm512_mul_ps(e1, a), _mm512_mul_ps(e2, vt)),
                                            _mm512_add_ps(_mm512_mul_ps(e1, bs), e2)));
      ww = _mm512_add_ps(w, p);
      d = ExpNonPositive(_mm512_sub_ps(zero, _mm512_abs_ps(_mm512_sub_ps(ww, kt))));
      m = _mm512_cmp_ps_mask(ww, kt, _CMP_GE_OQ);
      e1 = _mm512_mask_blend_ps(m, d, one);
      e2 = _mm512_mask_blend_ps(m, one, d);
      a = _mm512_add_ps(_mm512_mul_ps(e1, a), _mm512_mul_ps(e2, vt));
      bs = _mm512_add_ps(_mm512_mul_ps(e1, bs), e2);
      p = _mm512_max_ps(ww, kt);
    }
    _mm512_storeu_ps(a_ + c, a);
    _mm512_storeu_ps(b_ + c, bs);
    _mm512_storeu_ps(p_ + c, p);
  }
  return 16 * chunks;
}
#endif

Ort::Status WKV4(OrtKernelContext* ctx, const Tensor<float>& w, const Tensor<float>& u, const Tensor<float>& k,
                 const Tensor<float>& v, const Tensor<float>& aa, const Tensor<float>& bb, const Tensor<float>& pp,
                 Tensor<float>& y, Tensor<float>& aa_out, Tensor<float>& bb_out, Tensor<float>& pp_out) {
  int64_t B, T, A;
  RETURN_IF_ERROR(Check4(w, u, k, v, aa, bb, pp, B, T, A));
  const float *W = w.Data(), *U = u.Data(), *K = k.Data(), *V = v.Data();
  const float *AA = aa.Data(), *BB = bb.Data(), *PP = pp.Data();
  float* Y = y.Allocate({B, T, A});
  float* AO = aa_out.Allocate({B, A});
  float* BO = bb_out.Allocate({B, A});
  float* PO = pp_out.Allocate({B, A});
  constexpr int64_t block = 64;  // channels per task
  const int64_t blocks = (A + block - 1) / block;
#ifdef RWKV_VNNI
  const bool vector = Cap() >= QPath::kVnni && HasAvx512();
#endif
  auto body = [&](size_t task) {
    const int64_t b = task / blocks, c0 = (task % blocks) * block, n = std::min(A, c0 + block) - c0;
    // The block's state; AVX-512 takes 16 channels at a time over all T (12 layers of 256 tokens x 768 channels:
    // 3.1 ms, where the scalar loop's two calls of exp a step took 22-26 ms), the scalar loop the rest.
    float a_[block], b_[block], p_[block];
    std::copy_n(AA + b * A + c0, n, a_);
    std::copy_n(BB + b * A + c0, n, b_);
    std::copy_n(PP + b * A + c0, n, p_);
    int64_t j0 = 0;  // channels below j0 are done by the vector path
#ifdef RWKV_VNNI
    if (vector) j0 = WKV4Lanes(T, A, b * T * A + c0, n / 16, W + c0, U + c0, K, V, a_, b_, p_, Y);
#endif
    for (int64_t t = 0; t < T; ++t) {
      const int64_t o = (b * T + t) * A + c0;
      // Of each pair exp(x - max(x, z)), exp(z - max(x, z)) one is exp(0) = 1 and the other exp(-|x - z|)
      // (IEEE subtraction is antisymmetric): two exponentials a token instead of four, the same bits.
      for (int64_t j = j0; j < n; ++j) {
        const float kt = K[o + j], vt = V[o + j];
        float ww = U[c0 + j] + kt, d = std::exp(-std::fabs(p_[j] - ww));
        float e1 = Pick(p_[j] >= ww, 1.0f, d), e2 = Pick(p_[j] >= ww, d, 1.0f);
        Y[o + j] = (e1 * a_[j] + e2 * vt) / (e1 * b_[j] + e2);
        ww = W[c0 + j] + p_[j];
        d = std::exp(-std::fabs(ww - kt));
        e1 = Pick(ww >= kt, 1.0f, d);
        e2 = Pick(ww >= kt, d, 1.0f);
        a_[j] = e1 * a_[j] + e2 * vt;
        b_[j] = e1 * b_[j] + e2;
        p_[j] = std::max(ww, kt);
      }
    }
    std::copy_n(a_, n, AO + b * A + c0);
    std::copy_n(b_, n, BO + b * A + c0);
    std::copy_n(p_, n, PO + b * A + c0);
  };
  ParallelFor(ctx, static_cast<size_t>(B * blocks), body);
  return Ort::Status{nullptr};
}

// WKV5/WKV7 outputs: y [B, T, H, N], and S_out [B, H, N, N], which each head's task starts as a copy of its own
// head of S (StartHead) and then updates in place: copied by one thread up front, the state took longer than the
// recurrence (12 v7 layers of 12 x 64 x 64: 461 us a step before, 270 us after, with WKV7Head's own change).
void HeadOutputs(Tensor<float>& y, Tensor<float>& S_out, int64_t B, int64_t T, int64_t H, int64_t N, float*& Y,
                 float*& SO) {
  Y = y.Allocate({B, T, H, N});
  SO = S_out.Allocate({B, H, N, N});
}

float* StartHead(const Tensor<float>& S, float* SO, size_t task, int64_t N) {
  float* head = SO + task * N * N;
  std::memcpy(head, S.Data() + task * N * N, sizeof(float) * N * N);
  return head;
}

// ---- RWKV-5.x / 6: S[i=key][j=value]; the output reads the old state ----
// One head of one sequence over T tokens, as WKV7Head below (several instruction sets, picked at load).
// Sums run in double and each state entry is rounded to float once per token: the kernel is then no further from
// exact math than the portable graph's MatMuls (a float running sum over i was several times further).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__) && defined(__GLIBC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void WKV5Head(int64_t T, int64_t N, int64_t stride, const float* R, const float* K, const float* V,
                     const float* W, const float* uh, float* s, float* Y, double* acc) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * stride;
    const float *rt = R + o, *kt = K + o, *vt = V + o, *wt = W + o;
    for (int64_t j = 0; j < N; ++j) acc[j] = 0.0;
    for (int64_t i = 0; i < N; ++i) {  // y = r (u k vᵀ + S);  S = k vᵀ + diag(w) S
      const double ri = rt[i], ki = kt[i], wi = wt[i], ruk = ri * uh[i] * ki;
      float* si = s + i * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        acc[j] += ri * si[j] + ruk * vt[j];
        si[j] = static_cast<float>(si[j] * wi + ki * vt[j]);
      }
    }
    for (int64_t j = 0; j < N; ++j) Y[o + j] = static_cast<float>(acc[j]);
  }
}

Ort::Status WKV5(OrtKernelContext* ctx, const Tensor<float>& r, const Tensor<float>& k, const Tensor<float>& v,
                 const Tensor<float>& w, const Tensor<float>& u, const Tensor<float>& S, Tensor<float>& y,
                 Tensor<float>& S_out) {
  int64_t B, T, H, N;
  RETURN_IF_ERROR(Check5(r, k, v, w, u, S, B, T, H, N));
  float *Y, *SO;
  HeadOutputs(y, S_out, B, T, H, N, Y, SO);
  auto body = [&](size_t task) {
    const int64_t b = task / H, h = task % H, o = (b * T * H + h) * N;  // token 0 of this head
    std::vector<double> acc(N);
    WKV5Head(T, N, H * N, r.Data() + o, k.Data() + o, v.Data() + o, w.Data() + o, u.Data() + h * N,
             StartHead(S, SO, task, N), Y + o, acc.data());
  };
  ParallelFor(ctx, static_cast<size_t>(B * H), body);
  return Ort::Status{nullptr};
}

// ---- RWKV-7: S[i=value][j=key]; S = S diag(w) + (S a) bᵀ + v kᵀ; the output reads the new state ----
// One head of one sequence over T tokens (token t's vectors at x + t * stride). Built for several instruction sets
// and picked when the library loads (GCC's target_clones, an ifunc: glibc on Linux x86-64, elsewhere the plain
// build): the double sums vectorize 2, 4 or 8 wide, and no -march flag can stop the library loading on an older CPU.
// Four rows of the state from s (N apart), their values vt and outputs yt: sums in double, one rounding per state
// entry (see WKV5). Four at once, so that their sums' reductions overlap: 12 layers at batch 16 took 3.4 ms instead
// of 3.8 a step, 256 tokens 32.5 instead of 38.0 (the same bits). Written out: with arrays of sums and
// `reduction(+ : sa[:4])`, GCC's code was twice as slow.
__attribute__((always_inline)) inline void WKV7Rows4(int64_t N, float* s, const float* vt, float* yt, const double* rd,
                                                     const double* wd, const double* kd, const double* ad,
                                                     const double* bd) {
  float *s0 = s, *s1 = s + N, *s2 = s + 2 * N, *s3 = s + 3 * N;
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;  // (S a)_i
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t j = 0; j < N; ++j) a0 += s0[j] * ad[j], a1 += s1[j] * ad[j], a2 += s2[j] * ad[j], a3 += s3[j] * ad[j];
  const double v0 = vt[0], v1 = vt[1], v2 = vt[2], v3 = vt[3];
  double y0 = 0.0, y1 = 0.0, y2 = 0.0, y3 = 0.0;
#pragma omp simd reduction(+ : y0, y1, y2, y3)
  for (int64_t j = 0; j < N; ++j) {
    const double t0 = s0[j] * wd[j] + a0 * bd[j] + v0 * kd[j], t1 = s1[j] * wd[j] + a1 * bd[j] + v1 * kd[j];
    const double t2 = s2[j] * wd[j] + a2 * bd[j] + v2 * kd[j], t3 = s3[j] * wd[j] + a3 * bd[j] + v3 * kd[j];
    s0[j] = static_cast<float>(t0), s1[j] = static_cast<float>(t1);
    s2[j] = static_cast<float>(t2), s3[j] = static_cast<float>(t3);
    y0 += t0 * rd[j], y1 += t1 * rd[j], y2 += t2 * rd[j], y3 += t3 * rd[j];
  }
  yt[0] = static_cast<float>(y0), yt[1] = static_cast<float>(y1);
  yt[2] = static_cast<float>(y2), yt[3] = static_cast<float>(y3);
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__) && defined(__GLIBC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void WKV7Head(int64_t T, int64_t N, int64_t stride, const float* R, const float* W, const float* K,
                     const float* V, const float* Av, const float* Bv, float* s, float* Y, double* d) {
  double *rd = d, *wd = d + N, *kd = d + 2 * N, *ad = d + 3 * N, *bd = d + 4 * N;  // the token's vectors, once
  std::vector<float> pad(N % 4 ? 4 * N : 0);  // the padded last rows, if N % 4
  float vp[4] = {}, yp[4];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * stride;
    for (int64_t j = 0; j < N; ++j) {
      rd[j] = R[o + j], wd[j] = W[o + j], kd[j] = K[o + j], ad[j] = Av[o + j], bd[j] = Bv[o + j];
    }
    const float* vt = V + o;
    float* yt = Y + o;
    const int64_t whole = N / 4 * 4;
    for (int64_t i = 0; i < whole; i += 4) WKV7Rows4(N, s + i * N, vt + i, yt + i, rd, wd, kd, ad, bd);
    if (whole < N) {  // the last N % 4 rows, padded to four with zero rows, which stay zero (v = 0 there)
      const int64_t rest = N - whole;
      std::copy(s + whole * N, s + N * N, pad.begin());
      std::copy(vt + whole, vt + N, vp);
      WKV7Rows4(N, pad.data(), vp, yp, rd, wd, kd, ad, bd);
      std::copy(pad.begin(), pad.begin() + rest * N, s + whole * N);
      std::copy(yp, yp + rest, yt + whole);
    }
  }
}

Ort::Status WKV7(OrtKernelContext* ctx, const Tensor<float>& r, const Tensor<float>& w, const Tensor<float>& k,
                 const Tensor<float>& v, const Tensor<float>& a, const Tensor<float>& bvec, const Tensor<float>& S,
                 Tensor<float>& y, Tensor<float>& S_out) {
  int64_t B, T, H, N;
  RETURN_IF_ERROR(Check7(r, w, k, v, a, bvec, S, B, T, H, N));
  float *Y, *SO;
  HeadOutputs(y, S_out, B, T, H, N, Y, SO);
  auto body = [&](size_t task) {
    const int64_t b = task / H, h = task % H, o = (b * T * H + h) * N;  // token 0 of this head
    std::vector<double> vectors(5 * N);
    WKV7Head(T, N, H * N, r.Data() + o, w.Data() + o, k.Data() + o, v.Data() + o, a.Data() + o, bvec.Data() + o,
             StartHead(S, SO, task, N), Y + o, vectors.data());
  };
  ParallelFor(ctx, static_cast<size_t>(B * H), body);
  return Ort::Status{nullptr};
}

// ---- rwkv::MatMulQ8 / rwkv::MatMulQ4: y [..., n] = x [..., K] W for fused int8/int4 exports (models/quant.py) ----
//   rwkv::MatMulQ8(x float[..., K], q int8[T, K/32, 2048],  scale float[T, K/32, 64]; int n) -> y float[..., n]
//   rwkv::MatMulQ4(x float[..., K], q uint8[T, K/32, 1024], scale float[T, K/32, 64]; int n) -> y float[..., n]
// W[k, c] = q[k, c] * scale[k / 32, c] (DequantizeLinear's blocks of 32 along K; q in [-127, 127], int4 [-8, 7]:
// the AVX2 path cannot negate -128, which models/quant.py never writes), stored in tiles of 64 columns:
// T = ceil(n / 64), the last tile padded with zero weights and scales (exporters/onnx_graph.py's `tiled` writes
// them). Tile t holds every block of columns 64t .. 64t + 63 in turn, so a task that takes a run of tiles reads one
// stretch of memory: in DequantizeLinear's row order each of two threads read 192 bytes of every 768-column int4
// row, and a v7 int4 step's products streamed at ~20 GB/s where its head (long runs) read at 43.
// Within block b, with k = 32b + 4g + i (g: a group of 4 rows) and column c of the tile:
//   int8: byte 4 (64g + c) + i. Every 64 bytes are 16 columns x 4 k: a row of an AMX B tile, a vpdpbusd operand.
//   int4: byte 4 (32g + c % 32) + i, the low nibble for c < 32 and the high one for c >= 32 (two's complement).
// Each row of x is first rounded to int8 per block of 32 (scale max|block| / 127, round half to even), as ONNX
// Runtime's MatMulNBits does at accuracy level 4 and models/quant.py's Int8Input models; each block's products are
// then an exact integer sum, scaled once: y[c] = sum over blocks, in order, of sum_b[c] * (x's scale * W's scale).
constexpr int64_t kQBlock = 32;
constexpr int64_t kTile = 64;    // columns a tile
constexpr int64_t kAmxRows = 4;  // from this many rows of x, AMX tiles (where the CPU has them) instead of VNNI
template <int BITS>
constexpr int64_t kBlockBytes = BITS == 8 ? 2048 : 1024;  // a block of a tile: 32 x 64 weights

struct QRows {  // x rounded per block: values, scales, and each block's sum of values
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
};

struct QView {  // the kernels' rows of a QRows
  const int8_t* q;
  const float* scale;
  const int32_t* sum;
};

#ifdef RWKV_VNNI

// QuantizeRows' arithmetic 16 lanes at a time: the same IEEE division and round half to even, so the same values.
// With the scalar loop a v4-shaped step's int4 products took 4.66 ms instead of 4.29, RWKV-7's 94 LoRA factors
// and head 0.82 instead of 0.70 (batch 1, one process).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void QuantizeBlocksAvx512(const float* x, int64_t b0,
                                                                               int64_t b1, QRows& out) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t b = b0; b < b1; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + b * kQBlock), hi = _mm512_loadu_ps(x + b * kQBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float scale = amax / 127.0f > 0.0f ? amax / 127.0f : 1.0f;
    const __m512 sv = _mm512_set1_ps(scale);
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(lo, sv), kRound));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(hi, sv), kRound));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + b * kQBlock), _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + b * kQBlock + 16), _mm512_cvtepi32_epi8(qhi));
    out.scale[b] = scale;
    out.sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
  }
}
#endif

// Blocks [b0, b1) of x; vector: AVX-512 where the CPU has it (RWKV_DEPLOY_MATMULQ=plain|avx2 keeps the scalar loop)
void QuantizeBlocks(const float* x, int64_t b0, int64_t b1, QRows& out, bool vector) {
#ifdef RWKV_VNNI
  if (vector && HasAvx512()) return QuantizeBlocksAvx512(x, b0, b1, out);
#endif
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + b * kQBlock;
    float amax = 0.0f;
    for (int64_t i = 0; i < kQBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float scale = amax / 127.0f > 0.0f ? amax / 127.0f : 1.0f;  // an all-zero block: any scale, q = 0
    int32_t sum = 0;
    for (int64_t i = 0; i < kQBlock; ++i) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xb[i] / scale));  // half to even, as torch.round
      out.q[b * kQBlock + i] = static_cast<int8_t>(v);
      sum += v;
    }
    out.scale[b] = scale;
    out.sum[b] = sum;
  }
}

// Every row of x, on the thread pool in stretches of rows once there are many (prefill: one thread rounding 256
// rows took as long as a quarter of the AMX products).
void QuantizeRows(OrtKernelContext* ctx, const float* x, int64_t rows, int64_t K, QRows& out, bool vector) {
  const int64_t nb = K / kQBlock;
  out.q.resize(rows * K);
  out.scale.resize(rows * nb);
  out.sum.resize(rows * nb);
  constexpr int64_t kRowsPerTask = 16;
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  auto body = [&](size_t t) {
    const int64_t r0 = static_cast<int64_t>(t) * kRowsPerTask, r1 = std::min(rows, r0 + kRowsPerTask);
    QuantizeBlocks(x, r0 * nb, r1 * nb, out, vector);
  };
  if (tasks > 1) {
    ParallelFor(ctx, static_cast<size_t>(tasks), body);
  } else {
    body(0);
  }
}

struct QWeights {  // one weight's tiles
  const uint8_t* q;
  const float* s;
  int64_t K, n, nbk;
  template <int BITS>
  const uint8_t* Block(int64_t t, int64_t b) const { return q + (t * nbk + b) * kBlockBytes<BITS>; }
  const float* Scales(int64_t t, int64_t b) const { return s + (t * nbk + b) * kTile; }
  int64_t Width(int64_t t) const { return std::min(kTile, n - t * kTile); }  // the tile's columns that exist
};

// Tiles [ta, tb) of every row, any CPU: where there is no vector path. Each block is first put back in row order
// (32 x 64 int8), so that every row's loops run over contiguous columns and vectorize (GCC builds them for AVX2 and
// the baseline and picks at load, as the WKV kernels). Forced on this CPU, a v4 int4 batch-16 step took 107 ms this
// way and 233 reading the tile's own order (4 bytes apart); batch 1 about the same (18 ms).
template <int BITS>
__attribute__((always_inline)) inline void TilesPlainBody(const QWeights& w, int64_t ta, int64_t tb, int64_t M,
                                                          QView x, float* y) {
  std::vector<float> f(M * kTile);  // [M, 64]: each row's sums over the blocks so far
  int8_t wn[kQBlock][kTile];        // the block, [k][c]
  for (int64_t t = ta; t < tb; ++t) {
    std::fill(f.begin(), f.end(), 0.0f);
    for (int64_t b = 0; b < w.nbk; ++b) {
      const uint8_t* blk = w.Block<BITS>(t, b);
      for (int g = 0; g < kQBlock / 4; ++g)
        for (int i = 0; i < 4; ++i) {
          int8_t* row = wn[4 * g + i];
          if (BITS == 8) {
            for (int c = 0; c < kTile; ++c) row[c] = static_cast<int8_t>(blk[256 * g + 4 * c + i]);
          } else {
            for (int c = 0; c < kTile / 2; ++c) {
              const uint8_t v = blk[128 * g + 4 * c + i];
              row[c] = static_cast<int8_t>(((v & 15) ^ 8) - 8);
              row[c + kTile / 2] = static_cast<int8_t>(((v >> 4) ^ 8) - 8);
            }
          }
        }
      const float* s = w.Scales(t, b);
      for (int64_t m = 0; m < M; ++m) {
        int32_t d[kTile] = {};
        for (int k = 0; k < kQBlock; ++k) {
          const int32_t xk = x.q[m * w.K + b * kQBlock + k];
          for (int c = 0; c < kTile; ++c) d[c] += xk * wn[k][c];
        }
        const float xs = x.scale[m * w.nbk + b];
        float* fm = f.data() + m * kTile;
        for (int c = 0; c < kTile; ++c) fm[c] += static_cast<float>(d[c]) * (xs * s[c]);
      }
    }
    for (int64_t m = 0; m < M; ++m) std::memcpy(y + m * w.n + t * kTile, f.data() + m * kTile, sizeof(float) * w.Width(t));
  }
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__) && defined(__GLIBC__)
#define PLAIN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PLAIN_CLONES
#endif
PLAIN_CLONES void TilesPlain8(const QWeights& w, int64_t ta, int64_t tb, int64_t M, QView x, float* y) {
  TilesPlainBody<8>(w, ta, tb, M, x, y);
}
PLAIN_CLONES void TilesPlain4(const QWeights& w, int64_t ta, int64_t tb, int64_t M, QView x, float* y) {
  TilesPlainBody<4>(w, ta, tb, M, x, y);
}

#ifdef RWKV_VNNI
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
bool HasVnni() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
}

// The bytes 2 KB past a block (the next block or two of the same tile) into L1: on a tile's run the hardware
// prefetcher alone left a v7 int4 step's products waiting (5.85 -> 5.37 ms a step with it, 2 threads; 1, 3 and 4 KB
// ahead, every other line, into L2 only, and the scales as well: no better, within the noise).
template <int BITS>
__attribute__((always_inline)) inline void PrefetchAhead(const uint8_t* blk) {
  for (int64_t line = 0; line < kBlockBytes<BITS>; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(blk + 2048 + line), _MM_HINT_T0);
}

// Tile t's 64 columns of one row (16 in each of f) into y, only those that exist
VNNI_TARGET inline void StoreTile(const __m512* f, int64_t width, float* y) {
  for (int j = 0; j < 4; ++j) {
    const int64_t left = std::clamp<int64_t>(width - 16 * j, 0, 16);
    _mm512_mask_storeu_ps(y + 16 * j, static_cast<__mmask16>((1u << left) - 1), f[j]);
  }
}

// MT rows (1 or 2) from row m0 through tile t with AVX-512 VNNI. vpdpbusd multiplies unsigned by signed bytes, so
// the weights go in offset by 128 (int4: 8) and each block's sum of x times the offset comes off after the products.
// One row keeps two chains of sums per column, so that vpdpbusd's latency overlaps.
template <int BITS, int MT>
VNNI_TARGET __attribute__((always_inline)) inline void TilePassVnni(const QWeights& w, int64_t t, int64_t m0,
                                                                    QView x, float* y) {
  constexpr int kChains = MT == 1 ? 2 : 1;
  const __m512i nibble = _mm512_set1_epi8(0x0F), offset = _mm512_set1_epi8(BITS == 8 ? static_cast<char>(0x80) : 8);
  __m512 f[MT][4];
  for (auto& row : f)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.nbk; ++b) {
    const uint8_t* blk = w.Block<BITS>(t, b);
    PrefetchAhead<BITS>(blk);
    __m512i acc[MT * kChains][4];
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_si512();
    for (int g = 0; g < kQBlock / 4; ++g) {
      __m512i wv[4];  // columns 16j .. 16j + 15, 4 k each, unsigned
      if (BITS == 8) {
        for (int j = 0; j < 4; ++j) wv[j] = _mm512_xor_si512(_mm512_loadu_si512(blk + 256 * g + 64 * j), offset);
      } else {
        for (int h = 0; h < 2; ++h) {
          const __m512i v = _mm512_loadu_si512(blk + 128 * g + 64 * h);
          wv[h] = _mm512_xor_si512(_mm512_and_si512(v, nibble), offset);
          wv[h + 2] = _mm512_xor_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), offset);
        }
      }
      for (int i = 0; i < MT; ++i) {
        int32_t xk;  // x's 4 values at k..k+3, in every lane
        std::memcpy(&xk, x.q + (m0 + i) * w.K + b * kQBlock + 4 * g, 4);
        const __m512i xb = _mm512_set1_epi32(xk);
        __m512i* a = acc[MT == 1 ? g % kChains : i];
        for (int j = 0; j < 4; ++j) a[j] = _mm512_dpbusd_epi32(a[j], wv[j], xb);
      }
    }
    const float* s = w.Scales(t, b);
    for (int i = 0; i < MT; ++i) {
      const int64_t mb = (m0 + i) * w.nbk + b;
      const __m512i off = _mm512_set1_epi32((BITS == 8 ? 128 : 8) * x.sum[mb]);
      const __m512 xs = _mm512_set1_ps(x.scale[mb]);
      for (int j = 0; j < 4; ++j) {
        const __m512i sum = kChains == 2 ? _mm512_add_epi32(acc[0][j], acc[1][j]) : acc[i][j];
        f[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, off)),
                                  _mm512_mul_ps(xs, _mm512_loadu_ps(s + 16 * j)), f[i][j]);
      }
    }
  }
  for (int i = 0; i < MT; ++i) StoreTile(f[i], w.Width(t), y + (m0 + i) * w.n + t * kTile);
}

// Tiles [ta, tb) of every row, two rows a pass (one where there is one): the tile's weights (K x 64 bytes) stay in
// L2 between passes. From kAmxRows rows, the AMX path where the CPU has one.
template <int BITS>
VNNI_TARGET void TilesVnni(const QWeights& w, int64_t ta, int64_t tb, int64_t M, QView x, float* y) {
  for (int64_t t = ta; t < tb; ++t) {
    int64_t m0 = 0;
    for (; m0 + 2 <= M; m0 += 2) TilePassVnni<BITS, 2>(w, t, m0, x, y);
    if (m0 < M) TilePassVnni<BITS, 1>(w, t, m0, x, y);
  }
}

// ---- AVX2 (no AVX-512 VNNI): the products as ggml's pre-VNNI kernels do them: |x| times the weights with x's
// sign (vpsignb), pairs summed by vpmaddubsw (at most 2 x 127 x 127, no saturation), then pairs of pairs by
// vpmaddwd. Signed weights: no offset to take back off. 16 vector registers: a tile in two halves of 32 columns.
#define AVX2_TARGET __attribute__((target("avx2,fma")))
bool HasAvx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

template <int BITS>
AVX2_TARGET void TilesAvx2(const QWeights& w, int64_t ta, int64_t tb, int64_t M, QView x, float* y) {
  const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  alignas(32) float out[kTile];
  for (int64_t t = ta; t < tb; ++t)
    for (int64_t m = 0; m < M; ++m) {
      for (int half = 0; half < 2; ++half) {  // columns 32 half + 8v .. + 7 in f[v]
        __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < w.nbk; ++b) {
          const uint8_t* blk = w.Block<BITS>(t, b);
          __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                            _mm256_setzero_si256()};
          for (int g = 0; g < kQBlock / 4; ++g) {
            int32_t xk;  // x's 4 values at k..k+3, in every 32-bit lane
            std::memcpy(&xk, x.q + m * w.K + b * kQBlock + 4 * g, 4);
            const __m256i xb = _mm256_set1_epi32(xk), ax = _mm256_abs_epi8(xb);
            for (int v = 0; v < 4; ++v) {  // v = 2jj + hh: 8 columns, 4 k each
              __m256i wv;
              if (BITS == 8) {
                wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 256 * g + 64 * (2 * half + v / 2) +
                                                                         32 * (v % 2)));
              } else {
                const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 * g + 32 * v));
                const __m256i u = _mm256_and_si256(half ? _mm256_srli_epi16(p, 4) : p, nibble);
                wv = _mm256_sub_epi8(_mm256_xor_si256(u, eight), eight);  // two's complement nibbles -> int8
              }
              const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xb));
              acc[v] = _mm256_add_epi32(acc[v], _mm256_madd_epi16(pairs, ones));
            }
          }
          const __m256 xs = _mm256_set1_ps(x.scale[m * w.nbk + b]);
          const float* s = w.Scales(t, b) + 32 * half;
          for (int v = 0; v < 4; ++v)
            f[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[v]), _mm256_mul_ps(xs, _mm256_loadu_ps(s + 8 * v)), f[v]);
        }
        for (int v = 0; v < 4; ++v) _mm256_store_ps(out + 32 * half + 8 * v, f[v]);
      }
      std::memcpy(y + m * w.n + t * kTile, out, sizeof(float) * w.Width(t));
    }
}

#ifdef RWKV_AMX
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,amx-tile,amx-int8")))
bool HasAmx() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!HasVnni() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25)))
      return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
}

struct TileConfig {  // the layout _tile_loadconfig reads (palette 1)
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// A block's integer sums C (16 rows x 64 columns, 16 columns a tile) times the weights' scales sw (64, in column
// order) and x's scales xs (one a row, rows nbk apart), added to acc (rows 64 floats apart).
AMX_TARGET __attribute__((always_inline)) inline void ScaleBlock(const int32_t (*C)[16][16], const float* sw,
                                                                 const float* xs, int64_t nbk, int64_t rows,
                                                                 float (*acc)[kTile]) {
  __m512 sv[4];
  for (int L = 0; L < 4; ++L) sv[L] = _mm512_loadu_ps(sw + 16 * L);
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 xi = _mm512_set1_ps(xs[i * nbk]);
    for (int L = 0; L < 4; ++L)
      _mm512_store_ps(acc[i] + 16 * L, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(C[L][i])),
                                                       _mm512_mul_ps(xi, sv[L]), _mm512_load_ps(acc[i] + 16 * L)));
  }
}

struct alignas(64) BTiles {  // an int4 block's 64 columns as four B tiles of 8 rows (groups of 4 k) x 16 columns
  uint8_t t[4][kQBlock / 4][64];
};

// An int4 block -> signed bytes in B tiles (an int8 block is B tiles as stored: tile j at 64j, rows 256 apart)
AMX_TARGET __attribute__((always_inline)) inline void UnpackTiles4(const uint8_t* blk, BTiles& out) {
  const __m512i nibble = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int g = 0; g < kQBlock / 4; ++g)
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_loadu_si512(blk + 128 * g + 64 * h);
      const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      _mm512_store_si512(out.t[h][g], _mm512_sub_epi8(_mm512_xor_si512(lo, eight), eight));
      _mm512_store_si512(out.t[h + 2][g], _mm512_sub_epi8(_mm512_xor_si512(hi, eight), eight));
    }
}

// 16 rows of x's block (a, rows lda apart) times a block's four B tiles (tile j at b + j * step, rows ldb apart)
// into tiles 2..5; StoreSums writes them out. Split so that the vector units can scale the previous block's sums
// while the tiles multiply.
AMX_TARGET __attribute__((always_inline)) inline void MultiplyBlock(const int8_t* a, int64_t lda, const uint8_t* b,
                                                                    int64_t step, int64_t ldb) {
  asm volatile("" ::: "memory");  // GCC's tile loads do not say they read memory: keep UnpackTiles4's stores before
  _tile_loadd(0, a, lda);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  _tile_loadd(1, b, ldb);
  _tile_dpbssd(2, 0, 1);
  _tile_loadd(1, b + step, ldb);
  _tile_dpbssd(3, 0, 1);
  _tile_loadd(1, b + 2 * step, ldb);
  _tile_dpbssd(4, 0, 1);
  _tile_loadd(1, b + 3 * step, ldb);
  _tile_dpbssd(5, 0, 1);
}

AMX_TARGET __attribute__((always_inline)) inline void StoreSums(int32_t (*C)[16][16]) {
  _tile_stored(2, C[0], 64);
  _tile_stored(3, C[1], 64);
  _tile_stored(4, C[2], 64);
  _tile_stored(5, C[3], 64);
}

// Tiles [ta, tb) for rows of x in tiles of 16 (x.q padded to a multiple of 16 rows) with AMX: tdpbssd's sums are
// exact and equal the VNNI path's offset-corrected ones, and the scales go on in the same order, so the two paths
// give the same bits. Per tile of weights, each 16 rows run through all its blocks with their sums in L1, written
// to y once. int4 blocks are unpacked into B tiles: for more than 16 rows while the first 16 use them, and kept
// (K x 64 bytes, in a buffer each thread keeps: allocated per call, the 192 KB of a 3072-row weight came from mmap,
// page faults included, every call); up to 16 rows, into two buffers in turn (the int4 products of a v4 batch-16
// step: 6.1 ms instead of 6.5 with a buffer allocated per call).
template <int BITS>
AMX_TARGET void TilesAmx(const QWeights& w, int64_t ta, int64_t tb, int64_t M, QView x, float* y) {
  TileConfig cfg;
  cfg.rows[0] = 16, cfg.colsb[0] = kQBlock;  // A: 16 rows of x, one block
  cfg.rows[1] = kQBlock / 4, cfg.colsb[1] = 64;  // B: 8 groups of 4 rows, 16 columns x 4 bytes
  for (int t = 2; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;  // C: 16 x 16 int32, one per 16 columns
  _tile_loadconfig(&cfg);
  const int64_t nbk = w.nbk;
  alignas(64) int32_t C[2][4][16][16];  // the sums of the current block in one, the previous block's in the other
  alignas(64) float acc[16][kTile];
  static thread_local std::vector<BTiles> kept;  // aligned: C++17's allocator honours alignas
  if (BITS == 4 && M > 16 && kept.size() < static_cast<size_t>(nbk)) kept.resize(nbk);
  BTiles turns[2];
  for (int64_t t = ta; t < tb; ++t)
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const int64_t mt = std::min<int64_t>(16, M - m0);
      std::memset(acc, 0, sizeof acc);
      for (int64_t b = 0; b < nbk; ++b) {
        const uint8_t* blk = w.Block<BITS>(t, b);
        if (m0 == 0) PrefetchAhead<BITS>(blk);
        if (BITS == 8) {
          MultiplyBlock(x.q + m0 * w.K + b * kQBlock, w.K, blk, 64, 256);
        } else {
          BTiles& bt = M > 16 ? kept[b] : turns[b % 2];
          if (m0 == 0) UnpackTiles4(blk, bt);
          MultiplyBlock(x.q + m0 * w.K + b * kQBlock, w.K, bt.t[0][0], sizeof bt.t[0], 64);
        }
        if (b > 0) ScaleBlock(C[(b - 1) % 2], w.Scales(t, b - 1), x.scale + m0 * nbk + b - 1, nbk, mt, acc);
        StoreSums(C[b % 2]);
      }
      ScaleBlock(C[(nbk - 1) % 2], w.Scales(t, nbk - 1), x.scale + m0 * nbk + nbk - 1, nbk, mt, acc);
      for (int64_t i = 0; i < mt; ++i) std::memcpy(y + (m0 + i) * w.n + t * kTile, acc[i], sizeof(float) * w.Width(t));
    }
  _tile_release();
}
#endif
#endif

// Contiguous runs of tiles: ONNX Runtime hands each of its threads a run of consecutive tasks. One per CPU the
// machine reports (ONNX Runtime's thread count is not visible to a kernel), but at least 4 tiles each.
int64_t ColumnTasks(int64_t tiles) {
  static const int64_t cpus = std::max(1u, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, std::min(tiles / 4, cpus));
}

QPath BestPath() {
  static const QPath best = [] {
#ifdef RWKV_AMX
    if (HasAmx()) return QPath::kAmx;
#endif
#ifdef RWKV_VNNI
    if (HasVnni()) return QPath::kVnni;
    if (HasAvx2()) return QPath::kAvx2;
#endif
    return QPath::kPlain;
  }();
  return best;
}

// The path this call takes: the best this CPU has, capped by RWKV_DEPLOY_MATMULQ=plain|avx2|vnni (tests and
// benchmarks run each on one CPU; read per call, a few hundred nanoseconds against tens of microseconds).
QPath Path() { return std::min(BestPath(), Cap()); }

// The products whose weights are stored in tiles of 64 columns (MatMulQ8/Q4, MatMulF16): attribute n, y's columns,
// read once when the session loads.
struct TiledProduct {
  TiledProduct(const OrtApi* api, const OrtKernelInfo* info) {
    if (OrtStatus* missing = api->KernelInfoGetAttribute_int64(info, "n", &n)) api->ReleaseStatus(missing), n = -1;
  }

  // T = ceil(n / 64), the number of tiles, or an error when the node has no n.
  Ort::Status Tiles(const std::string& op, int64_t& T) const {
    if (n <= 0)
      return Invalid(op + ": no attribute n (the number of columns) or n < 1; an export from before tiles of 64 " +
                     "columns runs with the library it shipped with");
    T = n / kTile + (n % kTile != 0);  // without overflow for any n
    return Ort::Status{nullptr};
  }

  int64_t n = -1;  // y's columns
};

template <int BITS, typename QT>
struct MatMulQ : TiledProduct {
  using TiledProduct::TiledProduct;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<QT>& q, const Tensor<float>& scale,
                      Tensor<float>& y) {
    const std::string op = BITS == 8 ? "rwkv::MatMulQ8" : "rwkv::MatMulQ4";
    int64_t T;
    RETURN_IF_ERROR(Tiles(op, T));
    Shape xs = x.Shape();
    const Shape& qs = q.Shape();
    if (xs.empty() || qs.size() != 3 || qs[0] != T || qs[2] != kBlockBytes<BITS> || xs.back() != qs[1] * kQBlock ||
        qs[1] == 0)
      return Invalid(op + ": x " + Str(xs) + " and q " + Str(qs) + " do not multiply (q [ceil(n / 64), K / 32, " +
                     std::to_string(kBlockBytes<BITS>) + "], n = " + std::to_string(n) + ")");
    const int64_t K = xs.back(), nbk = K / kQBlock;
    RETURN_IF_ERROR(Expect(op.c_str(), "scale", scale.Shape(), {T, nbk, kTile}));
    const int64_t M = x.NumberOfElement() / K;
    xs.back() = n;
    float* out = y.Allocate(xs);
    const QPath path = Path();
    QRows rows;
    QuantizeRows(ctx, x.Data(), M, K, rows, Cap() >= QPath::kVnni);  // AVX-512 rounding unless capped below it
    const QWeights w{reinterpret_cast<const uint8_t*>(q.Data()), scale.Data(), K, n, nbk};
#ifdef RWKV_AMX
    if (path == QPath::kAmx && M >= kAmxRows) rows.q.resize((M + 15) / 16 * 16 * K, 0);  // whole tiles of 16 rows
#endif
    const QView xv{rows.q.data(), rows.scale.data(), rows.sum.data()};
    const int64_t tasks = ColumnTasks(T);
    auto body = [&](size_t task) {
      const int64_t ta = T * static_cast<int64_t>(task) / tasks, tb = T * (static_cast<int64_t>(task) + 1) / tasks;
#ifdef RWKV_VNNI
#ifdef RWKV_AMX
      if (path == QPath::kAmx && M >= kAmxRows) return TilesAmx<BITS>(w, ta, tb, M, xv, out);
#endif
      if (path >= QPath::kVnni) return TilesVnni<BITS>(w, ta, tb, M, xv, out);
      if (path == QPath::kAvx2) return TilesAvx2<BITS>(w, ta, tb, M, xv, out);
#endif
      (BITS == 8 ? TilesPlain8 : TilesPlain4)(w, ta, tb, M, xv, out);
    };
    ParallelFor(ctx, static_cast<size_t>(tasks), body);
    return Ort::Status{nullptr};
  }

};

// ---- rwkv::MatMulF16: y [..., n] = x [..., K] W for fp16 exports on the CPU (--matmul cpu) ----
//   rwkv::MatMulF16(x float16[..., K], w float16[ceil(n / 64), K, 64]) -> y float16[..., n]; attribute n: y's columns
// ONNX Runtime's CPU provider has no float16 MatMul on x86: it widens float16 weights to float32 once at load
// and then reads 4 bytes a weight every step. This reads the 2 stored bytes and converts them in registers; the
// products and their sums are float32 (as a float16 GEMM accumulates), y is rounded to float16 once, to nearest
// even. W is stored in tiles of 64 columns (exporters/onnx_graph.py `half_tiled`: tile t holds columns 64t..64t+63
// of every row, 128 contiguous bytes a row, the last tile padded with zeros), as MatMulQ's weights are: a task
// reads one contiguous run per tile, where in W's row order each of two threads read 768 bytes of every row
// (one thread, 24 products of 768 x 3072 from L3: 15.5 -> 22.4 GB/s at one row).

// float16 bits -> float, exact for every value (checked against F16C over all 65536; a signalling NaN stays
// signalling, where F16C quiets it) and branch-free, so that the plain loop's conversion vectorizes. Normal values
// only move their exponent; subnormals go through an integer conversion, not a float rescale (a denormal float
// operand costs a microcode assist per instruction).
inline float HalfToFloat(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  const uint32_t sub = 0u - static_cast<uint32_t>(em < 0x400u), special = 0u - static_cast<uint32_t>(em >= 0x7c00u);
  const uint32_t normal = (em << 13) + (112u << 23), tiny = BitCast<uint32_t>(static_cast<float>(em) * 0x1p-24f);
  const uint32_t bits = (tiny & sub) | (((em << 13) | 0x7f800000u) & special) | (normal & ~(sub | special));
  return BitCast<float>(bits | static_cast<uint32_t>(h & 0x8000u) << 16);  // inf and nan keep their bits
}

enum class HPath { kPlain, kAvx2, kAvx512 };
const char* const kHPathNames[] = {"plain", "avx2", "avx512"};

// Tiles [ta, tb) of w's products with M rows of x (K long), written to y (rows of n floats).
struct HPart {
  const uint16_t* w;  // [T, K, 64]
  int64_t K, n, ta, tb, M;
  const float* x;  // [M, K]
  float* y;        // [M, n]
  const uint16_t* Tile(int64_t t) const { return w + t * K * kTile; }
  int64_t Width(int64_t t) const { return std::min(kTile, n - t * kTile); }
};

// Any CPU: a tile's row converted, then every row of x multiplies it (the loops over its columns vectorize; built
// for AVX2 and the baseline, as TilesPlain8/4). COLS: a whole tile's 64 as a constant trip count, or 0 for the last
// tile's `cols`. Forced on this CPU, a v4 step's products took 63 ms at one row (53 in W's row order, whose rows
// ran as long as a task's columns; converting every tile's row k into one run first took 87) and 116 at 16 (250).
template <int64_t COLS>
__attribute__((always_inline)) inline void HTilePlain(const HPart& p, int64_t t, int64_t cols) {
  const int64_t c = COLS ? COLS : cols;
  const uint16_t* tile = p.Tile(t);
  float wk[kTile];
  for (int64_t m = 0; m < p.M; ++m) std::fill_n(p.y + m * p.n + t * kTile, c, 0.0f);
  for (int64_t k = 0; k < p.K; ++k) {
    const uint16_t* row = tile + k * kTile;
    for (int64_t j = 0; j < c; ++j) wk[j] = HalfToFloat(row[j]);
    for (int64_t m = 0; m < p.M; ++m) {
      const float xk = p.x[m * p.K + k];
      float* ym = p.y + m * p.n + t * kTile;
      for (int64_t j = 0; j < c; ++j) ym[j] += xk * wk[j];
    }
  }
}

PLAIN_CLONES void HProducts(const HPart& p) {
  for (int64_t t = p.ta; t < p.tb; ++t) {
    const int64_t cols = p.Width(t);
    if (cols == kTile) HTilePlain<kTile>(p, t, cols);
    else HTilePlain<0>(p, t, cols);
  }
}

#ifdef RWKV_VNNI
#define F16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

// A tile of 64 columns of which `cols` remain: a mask for each of its 16-column quarters.
inline void TailMasks(int64_t cols, __mmask16* mask) {
  for (int j = 0; j < 4; ++j) {
    const int64_t c = std::max<int64_t>(0, std::min<int64_t>(16, cols - 16 * j));
    mask[j] = static_cast<__mmask16>((1u << c) - 1);
  }
}

// One row kk of a tile times R rows of x (each K long), added into sums acc.
template <int R>
F16_TARGET __attribute__((always_inline)) inline void HRow(const uint16_t* w, const float* x, int64_t K, int64_t kk,
                                                           __m512 (&acc)[R][4]) {
  const uint16_t* wk = w + kk * kTile;
  _mm_prefetch(reinterpret_cast<const char*>(wk) + 2048, _MM_HINT_T0);  // 16 rows on: 2 KB, as MatMulQ's
  _mm_prefetch(reinterpret_cast<const char*>(wk) + 2048 + 64, _MM_HINT_T0);
  __m512 wv[4];
  for (int j = 0; j < 4; ++j) wv[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 16 * j)));
  for (int i = 0; i < R; ++i) {
    const __m512 xb = _mm512_set1_ps(x[i * K + kk]);
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(xb, wv[j], acc[i][j]);
  }
}

// R rows of x from m0 times tile t, all K rows, the sums in registers (R is a template argument so that they stay
// there); one row of x keeps two chains of sums (even and odd k), as one chain waits on each multiply-add.
template <int R>
F16_TARGET __attribute__((always_inline)) inline void HTile(const HPart& p, int64_t m0, int64_t t,
                                                            const __mmask16* mask) {
  constexpr int C = R == 1 ? 2 : 1;
  const uint16_t* w = p.Tile(t);
  const float* x = p.x + m0 * p.K;
  __m512 acc[C][R][4];
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < 4; ++j) acc[c][i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + C <= p.K; k += C)
    for (int c = 0; c < C; ++c) HRow<R>(w, x, p.K, k + c, acc[c]);
  if (k < p.K) HRow<R>(w, x, p.K, k, acc[0]);
  float* y = p.y + m0 * p.n + t * kTile;
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j)
      _mm512_mask_storeu_ps(y + i * p.n + 16 * j, mask[j], C == 2 ? _mm512_add_ps(acc[0][i][j], acc[C - 1][i][j])
                                                                  : acc[0][i][j]);
}

// Row kk of a tile's float16 -> float32.
F16_TARGET __attribute__((always_inline)) inline void HWiden(const uint16_t* src, float* dst) {
  for (int j = 0; j < 4; ++j)
    _mm512_store_ps(dst + 16 * j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * j))));
}

// R rows of x from m0 over kg rows (from k0) of a tile already in float32, 64 columns. Meanwhile the first `widen`
// rows of the next chunk (from src) are widened into dst, one a row of this one: spread among the multiply-adds,
// their loads from memory and conversions overlap them (one thread, 16 rows of 768 x 3072 products read from L3:
// 0.68-0.70 ms a product widened before its multiply-adds, 0.58-0.63 widened among them, 6 rows of x a group).
template <int R>
F16_TARGET __attribute__((always_inline)) inline void HTileWide(const HPart& p, int64_t m0, int64_t k0, int64_t kg,
                                                                int64_t t, const float* tile, const __mmask16* mask,
                                                                const uint16_t* src, float* dst, int64_t widen) {
  const float* x = p.x + m0 * p.K + k0;
  float* y = p.y + m0 * p.n + t * kTile;
  __m512 acc[R][4];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j)
      acc[i][j] = k0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[j], y + i * p.n + 16 * j);
  for (int64_t kk = 0; kk < kg; ++kk, tile += kTile) {
    if (kk < widen) {
      _mm_prefetch(reinterpret_cast<const char*>(src + (kk + 8) * kTile), _MM_HINT_T0);  // 8 rows on: 1 KB
      _mm_prefetch(reinterpret_cast<const char*>(src + (kk + 8) * kTile) + 64, _MM_HINT_T0);
      HWiden(src + kk * kTile, dst + kk * kTile);
    }
    for (int i = 0; i < R; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i * p.K + kk]);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(xb, _mm512_load_ps(tile + 16 * j), acc[i][j]);
    }
  }
  for (int64_t kk = kg; kk < widen; ++kk) HWiden(src + kk * kTile, dst + kk * kTile);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(y + i * p.n + 16 * j, mask[j], acc[i][j]);
}

// More than 4 rows of x (batched decode): each 64 rows of a tile are widened once into float32 (16 KB, in L1)
// that every row of x then reads, 6 rows of x at a time (4 at a time: 0.64-0.65 ms as above). Converted in
// registers per row of x instead, the conversions would cost as much as the multiply-adds at 4 rows.
F16_TARGET void HProductsAvx512Batched(const HPart& p) {
  constexpr int64_t KB = 64;
  alignas(64) float tiles[2][KB * kTile];  // the chunk multiplied and the next one, widened meanwhile
  if (p.ta >= p.tb) return;
  for (int64_t kk = 0; kk < std::min(KB, p.K); ++kk) HWiden(p.Tile(p.ta) + kk * kTile, tiles[0] + kk * kTile);
  int now = 0;
  for (int64_t t = p.ta; t < p.tb; ++t) {
    __mmask16 mask[4];
    TailMasks(p.Width(t), mask);
    for (int64_t k0 = 0; k0 < p.K; k0 += KB, now ^= 1) {
      const int64_t kg = std::min(KB, p.K - k0);
      const bool same = k0 + KB < p.K;  // the next chunk: this tile's next rows or the next tile's first
      const int64_t nt = same ? t : t + 1, nk = same ? k0 + KB : 0;
      const uint16_t* src = nt < p.tb ? p.Tile(nt) + nk * kTile : nullptr;
      const int64_t widen = src ? std::min(KB, p.K - nk) : 0;
      const float* tile = tiles[now];
      float* dst = tiles[now ^ 1];
      int64_t m0 = 0;
      for (; m0 + 6 <= p.M; m0 += 6) HTileWide<6>(p, m0, k0, kg, t, tile, mask, src, dst, m0 == 0 ? widen : 0);
      for (; m0 + 4 <= p.M; m0 += 4) HTileWide<4>(p, m0, k0, kg, t, tile, mask, src, dst, m0 == 0 ? widen : 0);
      switch (p.M - m0) {  // p.M > 4: never the first group, which widens
        case 3: HTileWide<3>(p, m0, k0, kg, t, tile, mask, src, dst, 0); break;
        case 2: HTileWide<2>(p, m0, k0, kg, t, tile, mask, src, dst, 0); break;
        case 1: HTileWide<1>(p, m0, k0, kg, t, tile, mask, src, dst, 0); break;
        default: break;
      }
    }
  }
}

// With AVX-512: up to 4 rows of x, a tile at a time, its rows read once for all of them.
F16_TARGET void HProductsAvx512(const HPart& p) {
  if (p.M > 4) return HProductsAvx512Batched(p);
  for (int64_t t = p.ta; t < p.tb; ++t) {
    __mmask16 mask[4];
    TailMasks(p.Width(t), mask);
    switch (p.M) {
      case 4: HTile<4>(p, 0, t, mask); break;
      case 3: HTile<3>(p, 0, t, mask); break;
      case 2: HTile<2>(p, 0, t, mask); break;
      case 1: HTile<1>(p, 0, t, mask); break;
      default: break;
    }
  }
}

// AVX2 with F16C and FMA.
#define F16C_TARGET __attribute__((target("avx2,fma,f16c")))
bool HasF16c() {
  static const bool ok = HasAvx2() && __builtin_cpu_supports("f16c");
  return ok;
}

// R rows of x from m0 times Q x 8 columns of tile t from column c0 (cols of them exist), all K rows, the sums in
// registers; `ahead` brings the rows 2 KB on into L1 (the first pass over a tile's rows).
template <int R, int Q>
F16C_TARGET __attribute__((always_inline)) inline void HTileAvx2(const HPart& p, int64_t m0, int64_t t, int64_t c0,
                                                                 int64_t cols, bool ahead) {
  const uint16_t* w = p.Tile(t) + c0;
  const float* x = p.x + m0 * p.K;
  __m256 acc[R][Q];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < Q; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.K; ++k, w += kTile) {
    if (ahead) {
      _mm_prefetch(reinterpret_cast<const char*>(w - c0) + 2048, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w - c0) + 2048 + 64, _MM_HINT_T0);
    }
    __m256 wv[Q];
    for (int j = 0; j < Q; ++j)
      wv[j] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8 * j)));
    for (int i = 0; i < R; ++i) {
      const __m256 xb = _mm256_set1_ps(x[i * p.K + k]);
      for (int j = 0; j < Q; ++j) acc[i][j] = _mm256_fmadd_ps(xb, wv[j], acc[i][j]);
    }
  }
  float* y = p.y + m0 * p.n + t * kTile + c0;
  alignas(32) float row[8 * Q];
  for (int i = 0; i < R; ++i) {
    if (cols == 8 * Q) {
      for (int j = 0; j < Q; ++j) _mm256_storeu_ps(y + i * p.n + 8 * j, acc[i][j]);
      continue;
    }
    for (int j = 0; j < Q; ++j) _mm256_store_ps(row + 8 * j, acc[i][j]);  // the last tile's columns that exist
    std::copy_n(row, cols, y + i * p.n);
  }
}

// With AVX2, F16C and FMA: one row of x takes a whole tile a pass (8 chains of sums); more, each tile in two
// halves of 32 columns (16 registers), rows of x 4 at a time. Forced on this CPU, a v4 step's products at one row:
// 11.1 ms (13.1 in W's row order; 20.1 in halves without the prefetch); 16 rows 37 (92).
F16C_TARGET void HProductsAvx2(const HPart& p) {
  for (int64_t t = p.ta; t < p.tb; ++t) {
    if (p.M == 1) {
      HTileAvx2<1, 8>(p, 0, t, 0, p.Width(t), true);
      continue;
    }
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t c0 = 32 * half, cols = std::min<int64_t>(32, p.Width(t) - c0);
      if (cols <= 0) break;
      int64_t m0 = 0;
      for (; m0 + 4 <= p.M; m0 += 4) HTileAvx2<4, 4>(p, m0, t, c0, cols, m0 == 0 && half == 0);
      switch (p.M - m0) {
        case 3: HTileAvx2<3, 4>(p, m0, t, c0, cols, m0 == 0 && half == 0); break;
        case 2: HTileAvx2<2, 4>(p, m0, t, c0, cols, m0 == 0 && half == 0); break;
        case 1: HTileAvx2<1, 4>(p, m0, t, c0, cols, m0 == 0 && half == 0); break;
        default: break;
      }
    }
  }
}

F16_TARGET int64_t ToHalfAvx512(const float* y, int64_t na, int64_t nb, uint16_t* out) {
  int64_t n = na;
  for (; n + 16 <= nb; n += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n),
                        _mm512_cvtps_ph(_mm512_loadu_ps(y + n), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return n;
}

F16C_TARGET int64_t ToHalfF16c(const float* y, int64_t na, int64_t nb, uint16_t* out) {
  int64_t n = na;
  for (; n + 8 <= nb; n += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + n),
                     _mm256_cvtps_ph(_mm256_loadu_ps(y + n), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return n;
}
#endif

// The fastest path this CPU has (AVX-512 F/BW/VL is enough: no VNNI needed), capped by RWKV_DEPLOY_MATMULQ=
// plain|avx2 as MatMulQ's is.
HPath BestHPath() {
#ifdef RWKV_VNNI
  const QPath cap = Cap();
  if (cap >= QPath::kVnni && HasAvx512()) return HPath::kAvx512;
  if (cap >= QPath::kAvx2 && HasF16c()) return HPath::kAvx2;
#endif
  return HPath::kPlain;
}

// y's float sums [na, nb) of each of M rows -> float16, rounded to nearest even.
void ToHalf(const float* y, int64_t N, int64_t na, int64_t nb, int64_t M, uint16_t* out, HPath path) {
  for (int64_t m = 0; m < M; ++m) {
    int64_t n = na;
#ifdef RWKV_VNNI
    if (path == HPath::kAvx512) n = ToHalfAvx512(y + m * N, na, nb, out + m * N);
    if (path == HPath::kAvx2) n = ToHalfF16c(y + m * N, na, nb, out + m * N);
#endif
    for (; n < nb; ++n) out[m * N + n] = Ort::Float16_t(y[m * N + n]).val;
  }
}

struct MatMulF16 : TiledProduct {
  using TiledProduct::TiledProduct;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<Ort::Float16_t>& x, const Tensor<Ort::Float16_t>& w,
                      Tensor<Ort::Float16_t>& y) {
    int64_t T;
    RETURN_IF_ERROR(Tiles("rwkv::MatMulF16", T));
    Shape xs = x.Shape();
    const Shape& ws = w.Shape();
    if (xs.empty() || ws.size() != 3 || ws[0] != T || ws[2] != kTile || xs.back() != ws[1] || ws[1] == 0)
      return Invalid("rwkv::MatMulF16: x " + Str(xs) + " and w " + Str(ws) + " do not multiply (w [ceil(n / 64), K, " +
                     "64], K > 0, n = " + std::to_string(n) + ")");
    const int64_t K = ws[1], M = x.NumberOfElement() / K;
    xs.back() = n;
    auto* out = reinterpret_cast<uint16_t*>(y.Allocate(xs));
    const auto* xh = reinterpret_cast<const uint16_t*>(x.Data());
    std::vector<float> xf(M * K);
    std::unique_ptr<float[]> sums(new float[M * n]);  // every path writes each of them before reading it
    for (int64_t i = 0; i < M * K; ++i) xf[i] = HalfToFloat(xh[i]);
    const HPath path = BestHPath();
    // each task a stretch of tiles, so that it also rounds its own outputs
    const int64_t tasks = ColumnTasks(T);
    auto body = [&](size_t task) {
      const int64_t ta = T * static_cast<int64_t>(task) / tasks, tb = T * (static_cast<int64_t>(task) + 1) / tasks;
      const HPart part{reinterpret_cast<const uint16_t*>(w.Data()), K, n, ta, tb, M, xf.data(), sums.get()};
#ifdef RWKV_VNNI
      if (path == HPath::kAvx512) HProductsAvx512(part);
      if (path == HPath::kAvx2) HProductsAvx2(part);
#endif
      if (path == HPath::kPlain) HProducts(part);
      ToHalf(sums.get(), n, ta * kTile, std::min(n, tb * kTile), M, out, path);
    };
    ParallelFor(ctx, static_cast<size_t>(tasks), body);
    return Ort::Status{nullptr};
  }

};

#ifdef RWKV_WITH_CUDA
// ---- the same operators for ONNX Runtime's CUDA execution provider: kernels in cuda/wkv_kernels.cu ----
// Written to ONNX Runtime's documented custom-op API; built by `rwkv-deploy build-ops --cuda`. The launchers
// it calls are tested on a GPU (tests/test_cuda.py); this glue has been compiled, never run: no machine here
// has onnxruntime-gpu.
Ort::Status Launched(const char* op, int rc) {
  if (rc == 0) return Ort::Status{nullptr};
  return Ort::Status((std::string("rwkv::") + op + ": CUDA launch failed with error " + std::to_string(rc) +
                      " (head sizes 16/32/64/128 are built)").c_str(), ORT_EP_FAIL);
}

void* Stream(OrtKernelContext* ctx) { return Ort::KernelContext(ctx).GetGPUComputeStream(); }

Ort::Status WKV4Cuda(OrtKernelContext* ctx, const Tensor<float>& w, const Tensor<float>& u, const Tensor<float>& k,
                     const Tensor<float>& v, const Tensor<float>& aa, const Tensor<float>& bb,
                     const Tensor<float>& pp, Tensor<float>& y, Tensor<float>& aa_out, Tensor<float>& bb_out,
                     Tensor<float>& pp_out) {
  int64_t B, T, A;
  RETURN_IF_ERROR(Check4(w, u, k, v, aa, bb, pp, B, T, A));
  return Launched("WKV4", rwkv_wkv4_cuda(B, T, A, w.Data(), u.Data(), k.Data(), v.Data(), aa.Data(), bb.Data(),
                                         pp.Data(), y.Allocate({B, T, A}), aa_out.Allocate({B, A}),
                                         bb_out.Allocate({B, A}), pp_out.Allocate({B, A}), Stream(ctx)));
}

Ort::Status WKV5Cuda(OrtKernelContext* ctx, const Tensor<float>& r, const Tensor<float>& k, const Tensor<float>& v,
                     const Tensor<float>& w, const Tensor<float>& u, const Tensor<float>& S, Tensor<float>& y,
                     Tensor<float>& S_out) {
  int64_t B, T, H, N;
  RETURN_IF_ERROR(Check5(r, k, v, w, u, S, B, T, H, N));
  return Launched("WKV5", rwkv_wkv5_cuda(B, T, H, N, r.Data(), k.Data(), v.Data(), w.Data(), u.Data(), S.Data(),
                                         y.Allocate({B, T, H, N}), S_out.Allocate({B, H, N, N}), Stream(ctx)));
}

Ort::Status WKV7Cuda(OrtKernelContext* ctx, const Tensor<float>& r, const Tensor<float>& w, const Tensor<float>& k,
                     const Tensor<float>& v, const Tensor<float>& a, const Tensor<float>& b, const Tensor<float>& S,
                     Tensor<float>& y, Tensor<float>& S_out) {
  int64_t B, T, H, N;
  RETURN_IF_ERROR(Check7(r, w, k, v, a, b, S, B, T, H, N));
  return Launched("WKV7", rwkv_wkv7_cuda(B, T, H, N, r.Data(), w.Data(), k.Data(), v.Data(), a.Data(), b.Data(),
                                         S.Data(), y.Allocate({B, T, H, N}), S_out.Allocate({B, H, N, N}),
                                         Stream(ctx)));
}
#endif  // RWKV_WITH_CUDA

// Ops and domain live as long as the process: every session registered with them keeps pointers to them.
std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> g_kernels;
Ort::CustomOpDomain* g_domain = nullptr;
std::once_flag g_once;

void MakeDomain() {
  g_kernels.emplace_back(Ort::Custom::CreateLiteCustomOp("WKV4", "CPUExecutionProvider", WKV4));
  g_kernels.emplace_back(Ort::Custom::CreateLiteCustomOp("WKV5", "CPUExecutionProvider", WKV5));
  g_kernels.emplace_back(Ort::Custom::CreateLiteCustomOp("WKV7", "CPUExecutionProvider", WKV7));
  g_kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<MatMulQ<8, int8_t>>("MatMulQ8", "CPUExecutionProvider"));
  g_kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<MatMulQ<4, uint8_t>>("MatMulQ4", "CPUExecutionProvider"));
  g_kernels.emplace_back(Ort::Custom::CreateLiteCustomOp<MatMulF16>("MatMulF16", "CPUExecutionProvider"));
#ifdef RWKV_WITH_CUDA
  g_kernels.emplace_back(Ort::Custom::CreateLiteCustomOp("WKV4", "CUDAExecutionProvider", WKV4Cuda));
  g_kernels.emplace_back(Ort::Custom::CreateLiteCustomOp("WKV5", "CUDAExecutionProvider", WKV5Cuda));
  g_kernels.emplace_back(Ort::Custom::CreateLiteCustomOp("WKV7", "CUDAExecutionProvider", WKV7Cuda));
#endif
  g_domain = new Ort::CustomOpDomain("rwkv");
  for (auto& k : g_kernels) g_domain->Add(k.get());
}

}  // namespace

#define RWKV_EXPORT __attribute__((visibility("default")))  // everything else stays hidden

extern "C" {

// Which rwkv-deploy wrote this library. open_session finds the tag in the file's bytes and compares it with
// the manifest (reading, not loading: a wrong library is never mapped into the process).
__attribute__((used)) static const char kVersionTag[] = "rwkv-deploy-ops-version=" RWKV_DEPLOY_VERSION ";";
RWKV_EXPORT const char* RwkvOpsVersion() { return kVersionTag; }

// The path rwkv::MatMulQ8/MatMulQ4 take on this CPU: "amx", "vnni", "avx2" or "plain" (the session warns on
// "plain": a fused quantized export is then slower than a portable one).
RWKV_EXPORT const char* RwkvMatMulQPath() { return kPathNames[static_cast<int>(Path())]; }

// The same for rwkv::MatMulF16: "avx512", "avx2" or "plain". Both honour RWKV_DEPLOY_MATMULQ, as calls do.
RWKV_EXPORT const char* RwkvMatMulF16Path() { return kHPathNames[static_cast<int>(BestHPath())]; }

RWKV_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    return nullptr;  // cannot even build a status: the runtime is older than the headers we were built with
  }
  Ort::InitApi(api);
  try {
    std::call_once(g_once, MakeDomain);
    Ort::UnownedSessionOptions(options).Add(*g_domain);
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}

}  // extern "C"
