"""CUDA kernels (custom_ops/cuda/wkv_kernels.cu): built with nvcc where present, run where a GPU is."""
import ctypes
import shutil

import pytest
import torch

from rwkv_deploy.models.wkv import run_wkv4, run_wkv5, run_wkv7

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed here")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.fixture(scope="module")
def cuda_lib():
    from rwkv_deploy.custom_ops.build import build_cuda_library

    return build_cuda_library()


@needs_nvcc
def test_kernels_compile_and_export_their_launchers(cuda_lib):
    symbols = cuda_lib.read_bytes()
    for name in (b"rwkv_wkv4_cuda", b"rwkv_wkv5_cuda", b"rwkv_wkv7_cuda"):
        assert name in symbols


@needs_nvcc
def test_onnxruntime_cuda_provider_library_compiles():
    """The CUDA-provider build of the op library compiles and keeps the CPU kernels; running it needs
    onnxruntime-gpu and a GPU, which no machine here has."""
    from rwkv_deploy.custom_ops.build import build_library, library_version

    lib = build_library(cuda=True)
    data = lib.read_bytes()
    assert b"RegisterCustomOps" in data and b"rwkv_wkv5_cuda" in data and library_version(lib)


@needs_nvcc
def test_cuda_provider_library_still_runs_on_the_cpu(make_ckpt, tmp_path):
    """Registered in CPU-only onnxruntime, the combined library's CPU kernels run a fused export."""
    import numpy as np

    from rwkv_deploy import export, open_session
    from rwkv_deploy.custom_ops.build import build_library

    out = export(make_ckpt("7"), tmp_path / "o", wkv="fused")
    cpu = open_session(out)
    other = tmp_path / "with-cuda"  # another path: the process already holds out/librwkv_ops.so
    shutil.copytree(out, other)
    (other / "librwkv_ops.so").unlink()
    shutil.copyfile(build_library(cuda=True), other / "librwkv_ops.so")
    both = open_session(other, providers=["CPUExecutionProvider"])
    tokens = np.array([3, 5])
    np.testing.assert_allclose(both.step(tokens, both.init_state(2))[0], cpu.step(tokens, cpu.init_state(2))[0],
                               rtol=1e-6, atol=1e-6)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


@needs_nvcc
@needs_gpu
@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("kind", ["4", "5", "7"])
def test_kernels_match_reference(cuda_lib, kind, T):
    lib = ctypes.CDLL(str(cuda_lib))
    g = torch.Generator().manual_seed(0)
    B, H, N = 3, 4, 64
    A = H * N

    def rnd(*shape, lo=-1.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    dev = lambda t: t.float().cuda().contiguous()  # noqa: E731
    if kind == "4":
        args = [-torch.exp(rnd(A, lo=-5, hi=2)), rnd(A), rnd(B, T, A, lo=-3, hi=3), rnd(B, T, A),
                rnd(B, A), rnd(B, A, lo=0.1, hi=2), rnd(B, A)]
        y_ref, st_ref = run_wkv4(*args)
        st_ref = list(st_ref)
        ins = [dev(a) for a in args]
        outs = [torch.empty(B, T, A, device="cuda")] + [torch.empty(B, A, device="cuda") for _ in range(3)]
        rc = lib.rwkv_wkv4_cuda(B, T, A, *map(_ptr, ins), *map(_ptr, outs), stream)
    elif kind == "5":
        args = [rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N, lo=0.5, hi=1), rnd(H, N),
                rnd(B, H, N, N)]
        y_ref, S_ref = run_wkv5(*args)
        st_ref = [S_ref]
        ins = [dev(a) for a in args]
        outs = [torch.empty(B, T, H, N, device="cuda"), torch.empty(B, H, N, N, device="cuda")]
        rc = lib.rwkv_wkv5_cuda(B, T, H, N, *map(_ptr, ins), *map(_ptr, outs), stream)
    else:
        kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
        a_rate = rnd(B, T, H, N, lo=0, hi=1)
        args = [rnd(B, T, H, N), rnd(B, T, H, N, lo=0.5, hi=1), rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * a_rate,
                rnd(B, H, N, N)]
        y_ref, S_ref = run_wkv7(*args)
        st_ref = [S_ref]
        ins = [dev(a) for a in args]
        outs = [torch.empty(B, T, H, N, device="cuda"), torch.empty(B, H, N, N, device="cuda")]
        rc = lib.rwkv_wkv7_cuda(B, T, H, N, *map(_ptr, ins), *map(_ptr, outs), stream)
    torch.cuda.synchronize()
    assert rc == 0
    for got, want in zip(outs, [y_ref, *st_ref]):
        err = (got.double().cpu() - want).abs().max() / want.abs().max()
        assert err <= 1e-5, err
