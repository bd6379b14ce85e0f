// C launchers of the CUDA WKV kernels (wkv_kernels.cu), declared once: included by the kernels and by the ONNX
// Runtime CUDA-provider glue (cpu/wkv_ops.cc, with -I this folder); tests/test_cuda.py calls them via ctypes.
// All tensors fp32, contiguous, on the device; `stream` is a cudaStream_t, passed as void* so that callers need
// no CUDA header. Each returns 0, or a cudaError_t value.
//   wkv4: w,u [A]; k,v [B,T,A]; aa,bb,pp [B,A] -> y [B,T,A]; aa,bb,pp out [B,A]
//   wkv5: r,k,v,w [B,T,H,N]; u [H,N]; S [B,H,N,N] (key x value) -> y [B,T,H,N]; S out
//   wkv7: r,w,k,v,a,b [B,T,H,N]; S [B,H,N,N] (value x key)     -> y [B,T,H,N]; S out
// Head sizes N = 16, 32, 64, 128 are built; others return cudaErrorInvalidValue.
#ifndef RWKV_DEPLOY_WKV_LAUNCHERS_H_
#define RWKV_DEPLOY_WKV_LAUNCHERS_H_

// Exported from the shared library even though it is built with -fvisibility=hidden.
#define RWKV_CUDA_EXPORT __attribute__((visibility("default")))

#ifdef __cplusplus
extern "C" {
#endif

RWKV_CUDA_EXPORT int rwkv_wkv4_cuda(int B, int T, int A, const float* w, const float* u, const float* k,
                                    const float* v, const float* aa, const float* bb, const float* pp, float* y,
                                    float* aa_out, float* bb_out, float* pp_out, void* stream);
RWKV_CUDA_EXPORT int rwkv_wkv5_cuda(int B, int T, int H, int N, const float* r, const float* k, const float* v,
                                    const float* w, const float* u, const float* S, float* y, float* S_out,
                                    void* stream);
RWKV_CUDA_EXPORT int rwkv_wkv7_cuda(int B, int T, int H, int N, const float* r, const float* w, const float* k,
                                    const float* v, const float* a, const float* b, const float* S, float* y,
                                    float* S_out, void* stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // RWKV_DEPLOY_WKV_LAUNCHERS_H_
