// CUDA kernels of the rwkv-domain WKV operators (the math of rwkv_deploy/models/wkv.py), one token at a time
// over T (T = 1 is the decode step). Plain C launchers on a caller-given stream (wkv_launchers.h: shapes and
// contract), so that the same source serves an ONNX Runtime CUDA-provider op and a TensorRT plugin.
// Each block owns one (batch row, head) and keeps that head's N x N state in registers: thread j holds one
// column (v5: a value channel) or one row (v7: a value channel), so the state is read and written once per
// call, not once per token; the decode step is bound by that state traffic (bench/cuda_bench.py).
#include <cuda_runtime.h>

#include "wkv_launchers.h"

namespace {

__global__ void wkv4_kernel(int B, int T, int A, const float* __restrict__ w, const float* __restrict__ u,
                            const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ aa,
                            const float* __restrict__ bb, const float* __restrict__ pp, float* __restrict__ y,
                            float* __restrict__ aa_out, float* __restrict__ bb_out, float* __restrict__ pp_out) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // (b, c)
  if (idx >= B * A) return;
  const int b = idx / A, c = idx % A;
  float a_ = aa[idx], b_ = bb[idx], p_ = pp[idx];
  const float wc = w[c], uc = u[c];
  for (int t = 0; t < T; ++t) {
    const int i = (b * T + t) * A + c;
    const float kt = k[i], vt = v[i];
    float ww = uc + kt, p = fmaxf(p_, ww);
    float e1 = expf(p_ - p), e2 = expf(ww - p);
    y[i] = (e1 * a_ + e2 * vt) / (e1 * b_ + e2);
    ww = wc + p_;
    p = fmaxf(ww, kt);
    e1 = expf(ww - p);
    e2 = expf(kt - p);
    a_ = e1 * a_ + e2 * vt;
    b_ = e1 * b_ + e2;
    p_ = p;
  }
  aa_out[idx] = a_;
  bb_out[idx] = b_;
  pp_out[idx] = p_;
}

// v5/v6: thread j holds column j of S (S[i][j], i = key channel).
template <int N>
__global__ void wkv5_kernel(int T, int H, const float* __restrict__ r, const float* __restrict__ k,
                            const float* __restrict__ v, const float* __restrict__ w, const float* __restrict__ u,
                            const float* __restrict__ S, float* __restrict__ y, float* __restrict__ S_out) {
  const int bh = blockIdx.x, b = bh / H, h = bh % H, j = threadIdx.x;
  __shared__ float rs[N], ks[N], ws[N], us[N];
  float s[N];
  const float* Sh = S + (size_t)bh * N * N;
#pragma unroll
  for (int i = 0; i < N; ++i) s[i] = Sh[i * N + j];
  us[j] = u[h * N + j];
  for (int t = 0; t < T; ++t) {
    const size_t o = ((size_t)(b * T + t) * H + h) * N;
    __syncthreads();
    rs[j] = r[o + j];
    ks[j] = k[o + j];
    ws[j] = w[o + j];
    __syncthreads();
    const float vj = v[o + j];
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float kv = ks[i] * vj;
      acc += rs[i] * (us[i] * kv + s[i]);
      s[i] = s[i] * ws[i] + kv;
    }
    y[o + j] = acc;
  }
  float* So = S_out + (size_t)bh * N * N;
#pragma unroll
  for (int i = 0; i < N; ++i) So[i * N + j] = s[i];
}

// v7 keeps row i of S (a value channel) in thread i, but rows are contiguous in memory, so a direct load would
// have a warp touch 32 rows per instruction (15 % of copy bandwidth on an H100). Rows therefore move between
// global memory and registers through a shared tile, W columns at a time: the global side is coalesced and the
// pitch W + 1 keeps the shared side free of bank conflicts.
template <int N>
struct RowTile {
  static constexpr int W = N < 32 ? N : 32;
  float v[N][W + 1];
};

template <int N>
__device__ __forceinline__ void load_rows(const float* __restrict__ src, float (&s)[N], RowTile<N>& tile) {
  constexpr int W = RowTile<N>::W;
  const int i = threadIdx.x, col = i % W;
#pragma unroll
  for (int c = 0; c < N; c += W) {
    __syncthreads();
    for (int row = i / W; row < N; row += N / W) tile.v[row][col] = src[row * N + c + col];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < W; ++j) s[c + j] = tile.v[i][j];
  }
}

template <int N>
__device__ __forceinline__ void store_rows(float* __restrict__ dst, const float (&s)[N], RowTile<N>& tile) {
  constexpr int W = RowTile<N>::W;
  const int i = threadIdx.x, col = i % W;
#pragma unroll
  for (int c = 0; c < N; c += W) {
    __syncthreads();
#pragma unroll
    for (int j = 0; j < W; ++j) tile.v[i][j] = s[c + j];
    __syncthreads();
    for (int row = i / W; row < N; row += N / W) dst[row * N + c + col] = tile.v[row][col];
  }
}

// v7: thread i holds row i of S (S[i][j], j = key channel).
template <int N>
__global__ void wkv7_kernel(int T, int H, const float* __restrict__ r, const float* __restrict__ w,
                            const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ a,
                            const float* __restrict__ bvec, const float* __restrict__ S, float* __restrict__ y,
                            float* __restrict__ S_out) {
  const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
  __shared__ float rs[N], ws[N], ks[N], as[N], bs[N];
  __shared__ RowTile<N> tile;
  float s[N];
  load_rows<N>(S + (size_t)bh * N * N, s, tile);
  for (int t = 0; t < T; ++t) {
    const size_t o = ((size_t)(b * T + t) * H + h) * N;
    __syncthreads();
    rs[i] = r[o + i];
    ws[i] = w[o + i];
    ks[i] = k[o + i];
    as[i] = a[o + i];
    bs[i] = bvec[o + i];
    __syncthreads();
    const float vi = v[o + i];
    float sa = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) sa += s[j] * as[j];
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      s[j] = s[j] * ws[j] + sa * bs[j] + vi * ks[j];
      acc += s[j] * rs[j];
    }
    y[o + i] = acc;
  }
  store_rows<N>(S_out + (size_t)bh * N * N, s, tile);
}

}  // namespace

// C linkage and default visibility come from the declarations in wkv_launchers.h.

RWKV_CUDA_EXPORT int rwkv_wkv4_cuda(int B, int T, int A, const float* w, const float* u, const float* k,
                                    const float* v, const float* aa, const float* bb, const float* pp, float* y,
                                    float* aa_out, float* bb_out, float* pp_out, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int threads = 128, blocks = (B * A + threads - 1) / threads;
  wkv4_kernel<<<blocks, threads, 0, stream>>>(B, T, A, w, u, k, v, aa, bb, pp, y, aa_out, bb_out, pp_out);
  return (int)cudaGetLastError();
}

#define RWKV_HEAD_SIZES(X) X(16) X(32) X(64) X(128)

RWKV_CUDA_EXPORT int rwkv_wkv5_cuda(int B, int T, int H, int N, const float* r, const float* k, const float* v,
                                    const float* w, const float* u, const float* S, float* y, float* S_out,
                                    void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (N) {
#define CASE(n) \
  case n: wkv5_kernel<n><<<B * H, n, 0, stream>>>(T, H, r, k, v, w, u, S, y, S_out); break;
    RWKV_HEAD_SIZES(CASE)
#undef CASE
    default: return (int)cudaErrorInvalidValue;  // head sizes outside 16/32/64/128 are not built
  }
  return (int)cudaGetLastError();
}

RWKV_CUDA_EXPORT int rwkv_wkv7_cuda(int B, int T, int H, int N, const float* r, const float* w, const float* k,
                                    const float* v, const float* a, const float* b, const float* S, float* y,
                                    float* S_out, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (N) {
#define CASE(n) \
  case n: wkv7_kernel<n><<<B * H, n, 0, stream>>>(T, H, r, w, k, v, a, b, S, y, S_out); break;
    RWKV_HEAD_SIZES(CASE)
#undef CASE
    default: return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
