"""Builds the ONNX Runtime custom-op library (cpu/wkv_ops.cc) from source, once per source version.

The ONNX Runtime C/C++ headers are in no PyPI or Debian package; the npm package named below carries the
ORT 1.29 headers (API 29, which onnxruntime 1.29+ accepts). They are fetched with `npm pack` into the cache
at build time and never committed. `--ort-include DIR` uses headers you already have instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .. import __version__
from ..errors import RWKVDeployError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "cpu" / "wkv_ops.cc"
HEADERS_NPM = "com.github.asus4.onnxruntime@0.4.9"
HEADERS_IN_TARBALL = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
NEEDED = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_lite_custom_op.h")
LIB_NAME = "librwkv_ops.so"
CUDA_OPS_LIB_NAME = "librwkv_ops_cuda.so"
CUDA_DIR = Path(__file__).parent / "cuda"
CUDA_SOURCE = CUDA_DIR / "wkv_kernels.cu"
CUDA_HEADER = CUDA_DIR / "wkv_launchers.h"  # the launchers' prototypes, included by both sources
CUDA_LIB_NAME = "librwkv_cuda.so"
CUDA_ARCHS = ("75", "80", "86", "89", "90")
TRUSTED = "trusted.json"  # in cache_dir()/ops: {"libraries": {sha256: path}} of every library built here


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "rwkv-deploy"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _trusted_file() -> Path:
    return cache_dir() / "ops" / TRUSTED


def _read_trusted() -> dict[str, str]:
    try:
        libs = json.loads(_trusted_file().read_text()).get("libraries", {})
        return libs if isinstance(libs, dict) else {}
    except (OSError, ValueError, AttributeError):  # none recorded yet, or a damaged file: trust nothing from it
        return {}


def _record_trusted(lib: Path) -> Path:
    """Remember the sha256 of a library this installation built, so that export folders carrying a copy open.

    Two builds at once may each miss the other's entry; is_trusted_library also hashes the cached builds, so a
    lost entry only costs a hash.
    """
    from ..runtime.manifest import write_json_atomic

    libs = _read_trusted()
    digest = file_sha256(lib)
    if libs.get(digest) != str(lib):
        libs[digest] = str(lib)
        try:
            write_json_atomic(_trusted_file(), {"libraries": libs})
        except OSError as e:  # a read-only cache: the library is still counted while it stays cached
            log.warning("could not record %s as trusted in %s (%s)", lib.name, _trusted_file(), e)
    return lib


def is_trusted_library(path: Path) -> bool:
    """True if `path` has the sha256 of a library this installation built: recorded in trusted.json, or still
    in the build cache (builds of earlier sources included, so that older fused exports keep opening)."""
    digest = file_sha256(path)
    if digest in _read_trusted():
        return True
    size = path.stat().st_size
    cached = (c for name in (LIB_NAME, CUDA_OPS_LIB_NAME, CUDA_LIB_NAME) for c in (cache_dir() / "ops").glob(f"*/{name}"))
    return any(c.is_file() and c.stat().st_size == size and file_sha256(c) == digest for c in cached)


def _cached(name: str, *sources: Path) -> Path:
    """Where a library built from `sources` (headers included) by this rwkv-deploy version lives (built or not)."""
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in sources) + __version__.encode()).hexdigest()[:12]
    return cache_dir() / "ops" / f"{__version__}-{digest}" / name


def library_path(cuda: bool = False) -> Path:
    return _cached(CUDA_OPS_LIB_NAME, SOURCE, CUDA_SOURCE, CUDA_HEADER) if cuda else _cached(LIB_NAME, SOURCE)


def fetch_headers() -> Path:
    dest = cache_dir() / "ort-headers-api29"
    if all((dest / h).exists() for h in NEEDED):
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise RWKVDeployError("building the custom-op library needs the ONNX Runtime headers: install npm (they are "
                              f"fetched from the npm package {HEADERS_NPM}) or pass --ort-include DIR")
    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching ONNX Runtime headers (npm pack %s, ~150 MB)", HEADERS_NPM)
        r = subprocess.run([npm, "pack", HEADERS_NPM, "--silent"], cwd=tmp, capture_output=True, text=True)
        tgz = list(Path(tmp).glob("*.tgz"))
        if r.returncode != 0 or not tgz:
            raise RWKVDeployError(f"npm pack {HEADERS_NPM} failed: {r.stderr.strip()[-300:]}")
        staging = Path(tmp) / "headers"
        staging.mkdir()
        with tarfile.open(tgz[0]) as tar:
            for member in tar.getmembers():  # only the header files, copied by name (no paths from the archive)
                name = member.name[len(HEADERS_IN_TARBALL):]
                if member.isfile() and member.name.startswith(HEADERS_IN_TARBALL) and name.endswith(".h") and "/" not in name:
                    with tar.extractfile(member) as src, open(staging / name, "wb") as out:
                        shutil.copyfileobj(src, out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    return dest


def build_library(force: bool = False, ort_include: str | Path | None = None, cuda: bool = False) -> Path:
    """Compile (if needed) and return the path of librwkv_ops.so (CPU kernels).

    cuda=True builds librwkv_ops_cuda.so with nvcc: the CPU kernels plus CUDA-provider kernels of the same ops.
    """
    lib = library_path(cuda)
    if lib.exists() and not force:
        return _record_trusted(lib)  # built before trust was recorded, or the record was lost
    include = Path(ort_include) if ort_include else fetch_headers()
    flags = [f"-I{include}", f'-DRWKV_DEPLOY_VERSION="{__version__}"']
    if cuda:
        return _compile([_nvcc(), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler",
                         "-fvisibility=hidden", "-Xcompiler", "-fopenmp-simd", "-DRWKV_WITH_CUDA", *_gencode(), *flags,
                         f"-I{CUDA_DIR}", str(CUDA_SOURCE), str(SOURCE)], lib)
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        raise RWKVDeployError("building the custom-op library needs a C++17 compiler (g++); install one")
    # -fopenmp-simd: the pragmas let the compiler vectorize the double sums (no threads, no libgomp)
    return _compile([cxx, "-O3", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", *flags,
                     str(SOURCE)], lib)


def _compile(cmd: list[str], lib: Path) -> Path:
    """Run a compiler command (`-o` appended) into a temporary name, then rename: no half-built library."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".tmp{os.getpid()}")
    log.info("compiling %s", cmd[-1])
    r = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RWKVDeployError(f"{Path(cmd[0]).name} failed on {Path(cmd[-1]).name}:\n{r.stderr[-2000:]}")
    os.replace(tmp, lib)
    return _record_trusted(lib)


def library_version(path: Path) -> str:
    """The rwkv-deploy version tag compiled into a library, read from its bytes (the file is not loaded)."""
    found = re.search(rb"rwkv-deploy-ops-version=([0-9A-Za-z.+-]+);", Path(path).read_bytes())
    if not found:
        raise RWKVDeployError(f"{path} is not an rwkv-deploy custom-op library; rebuild it with `rwkv-deploy build-ops`")
    return found.group(1).decode()


def build_cuda_library(force: bool = False) -> Path:
    """The CUDA kernels alone (cuda/wkv_kernels.cu, C launchers) as a shared library, for tests and a TRT plugin."""
    lib = _cached(CUDA_LIB_NAME, CUDA_SOURCE, CUDA_HEADER)
    if lib.exists() and not force:
        return _record_trusted(lib)
    return _compile([_nvcc(), "-O3", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                     *_gencode(), str(CUDA_SOURCE)], lib)


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RWKVDeployError("building the CUDA kernels needs nvcc (the CUDA toolkit); it is not on PATH")
    return nvcc


def _gencode() -> list[str]:
    """Turing .. Hopper as machine code, and PTX of the newest so later GPUs can JIT it."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
    return [*gencode, f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]
