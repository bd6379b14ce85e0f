"""The rwkv ONNX domain: fused WKV operators (CPU and CUDA) and, with `export --matmul cpu`, products that the
library's CPU kernels compute from the stored weights as they are."""

CPU_PRODUCTS = ("MatMulF16", "MatMulQ8", "MatMulQ4")  # x86 CPU kernels only: no CUDA kernel, no TensorRT plugin
