"""CUDA kernels (custom_ops/cuda/wkv_kernels.cu): built with nvcc where present, run where a GPU is."""
import ctypes
import json
import shutil

import pytest
import torch

from conftest import VERSIONS, normalised
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
    from rwkv_deploy.custom_ops.build import build_library, file_sha256

    out = export(make_ckpt("7"), tmp_path / "o", wkv="fused")
    cpu = open_session(out)
    other = tmp_path / "with-cuda"  # another path: the process already holds out/librwkv_ops.so
    shutil.copytree(out, other)
    (other / "librwkv_ops.so").unlink()
    shutil.copyfile(build_library(cuda=True), other / "librwkv_ops.so")
    m = json.loads((other / "manifest.json").read_text())  # the manifest pins the library it was exported with
    m["requires"]["custom_ops"]["libraries"]["CPUExecutionProvider"]["sha256"] = file_sha256(other / "librwkv_ops.so")
    (other / "manifest.json").write_text(json.dumps(m))
    both = open_session(other, providers=["CPUExecutionProvider"])
    tokens = np.array([3, 5])
    np.testing.assert_allclose(both.step(tokens, both.init_state(2))[0], cpu.step(tokens, cpu.init_state(2))[0],
                               rtol=1e-6, atol=1e-6)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _run_kernel(lib, kind, B, T, H, N, device="cuda"):
    """Random inputs in realistic ranges through one launcher; returns (kernel outputs, float64 reference) and rc."""
    g = torch.Generator().manual_seed(0)
    A = H * N

    def rnd(*shape, lo=-1.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream if device == "cuda" else None)
    dev = lambda t: t.float().to(device).contiguous()  # noqa: E731
    if kind == "4":
        args = [-torch.exp(rnd(A, lo=-5, hi=2)), rnd(A), rnd(B, T, A, lo=-3, hi=3), rnd(B, T, A),
                rnd(B, A), rnd(B, A, lo=0.1, hi=2), rnd(B, A)]
        y_ref, st_ref = run_wkv4(*args)
        refs = [y_ref, *st_ref]
        outs = [torch.empty(B, T, A, device=device)] + [torch.empty(B, A, device=device) for _ in range(3)]
        launch, dims = lib.rwkv_wkv4_cuda, (B, T, A)
    elif kind == "5":
        args = [rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N, lo=0.5, hi=1), rnd(H, N),
                rnd(B, H, N, N)]
        refs = list(run_wkv5(*args))
        outs = [torch.empty(B, T, H, N, device=device), torch.empty(B, H, N, N, device=device)]
        launch, dims = lib.rwkv_wkv5_cuda, (B, T, H, N)
    else:
        kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
        a_rate = rnd(B, T, H, N, lo=0, hi=1)
        args = [rnd(B, T, H, N), rnd(B, T, H, N, lo=0.5, hi=1), rnd(B, T, H, N), rnd(B, T, H, N), -kk, kk * a_rate,
                rnd(B, H, N, N)]
        refs = list(run_wkv7(*args))
        outs = [torch.empty(B, T, H, N, device=device), torch.empty(B, H, N, N, device=device)]
        launch, dims = lib.rwkv_wkv7_cuda, (B, T, H, N)
    ins = [dev(a) for a in args]
    rc = launch(*dims, *map(_ptr, ins), *map(_ptr, outs), stream)
    if device == "cuda":
        torch.cuda.synchronize()
    return rc, outs, refs


@needs_nvcc
@pytest.mark.parametrize("kind", ["5", "7"])
def test_unbuilt_head_size_is_refused_before_launch(cuda_lib, kind):
    """A head size outside 16/32/64/128 returns cudaErrorInvalidValue (1) without touching the device."""
    rc, _, _ = _run_kernel(ctypes.CDLL(str(cuda_lib)), kind, 1, 1, 1, 24, device="cpu")
    assert rc == 1


@needs_nvcc
@needs_gpu
@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("kind,N", [("4", 64), ("5", 16), ("5", 64), ("5", 128), ("7", 16), ("7", 64), ("7", 128)])
def test_kernels_match_reference(cuda_lib, kind, N, T):
    rc, outs, refs = _run_kernel(ctypes.CDLL(str(cuda_lib)), kind, 3, T, 4, N)
    assert rc == 0
    for got, want in zip(outs, refs):
        err = (got.double().cpu() - want).abs().max() / want.abs().max()
        assert err <= 1e-5, err


@needs_nvcc
@needs_gpu
@pytest.mark.parametrize("version", VERSIONS)
def test_fused_model_on_gpu_runs_the_kernels_and_matches_cpu_reference(make_ckpt, version):
    """RWKV(wkv="fused") on CUDA calls the kernels through the torch custom ops: prefill(64) then 4 steps,
    batch 3, against the portable fp32 reference on the CPU."""
    from rwkv_deploy.custom_ops import torch_ops
    from rwkv_deploy.models.checkpoint import load_checkpoint
    from rwkv_deploy.models.model import RWKV

    ckpt = load_checkpoint(make_ckpt(version, time_state=version in ("5.2", "6"), n_embd=128, head_size=64))
    ref, gpu = RWKV(ckpt).eval(), RWKV(ckpt, wkv="fused").eval().cuda()
    tokens = torch.randint(0, ckpt.dims.vocab_size, (3, 68), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, st = ref(tokens[:, :64], ref.init_state(3), last_only=True)
        got, sg = gpu(tokens[:, :64].cuda(), gpu.init_state(3), last_only=True)
        wants, gots = [want[:, 0]], [got[:, 0].cpu()]
        for t in range(64, 68):
            w, st = ref.step(tokens[:, t], st)
            g, sg = gpu.step(tokens[:, t].cuda(), sg)
            wants.append(w)
            gots.append(g.cpu())
    assert torch_ops._cuda_lib, "the CUDA kernels were not loaded"
    assert normalised(torch.stack(gots).numpy(), torch.stack(wants).numpy()) <= 1e-5
