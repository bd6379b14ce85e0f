"""The web page (clients/web) in headless Chromium: served by serve.mjs, driven with playwright-core
(clients/web/drive.mjs) on the system Chromium. The page generates and shows the text that the same library
generates in Node, its window.rwkvScore gives the Python runtime's logits for every version, and the server
refuses paths that leave what it serves.

RWKV_UPDATE_SCREENSHOT=1 also writes the page's screenshot to docs/web-client.png.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from clients_common import REPO, assert_same_logits, python_score, score_tokens
from conftest import VERSIONS

JS = REPO / "clients" / "js"
WEB = REPO / "clients" / "web"
CHROMIUM = Path("/usr/bin/chromium")
PROMPT = "The quick brown fox"
MAX_TOKENS, SEED = 48, 5


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (the web client's server and driver need Node 20)"
    for pkg in ("onnxruntime-web", "@huggingface/tokenizers", "playwright-core"):
        if not (JS / "node_modules" / pkg / "package.json").is_file():
            return f"clients/js/node_modules/{pkg} is missing: cd clients/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium): the page is tested in the system Chromium"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def site(world_model, exported, make_ckpt, tmp_path_factory):
    """serve.mjs on a free port: /export/ (= /exports/0/) is a copy of the World-tokenizer model, /exports/N/ the
    fp32 export of VERSIONS[N-1], and the last one a v7 export with its weights in weights.onnx.data (which ONNX
    Runtime Web fetches itself). Yields (base URL, {export path: folder}); stops the server afterwards."""
    from rwkv_deploy import export

    root = tmp_path_factory.mktemp("web")
    world = root / "world"
    shutil.copytree(world_model[1], world)
    (root / "secret.txt").write_text("outside the export folder\n")
    (world / "leak.txt").symlink_to(root / "secret.txt")  # a symlink that leads out: must not be served
    folders = {"/exports/0/": world, **{f"/exports/{i + 1}/": exported(v) for i, v in enumerate(VERSIONS)}}
    folders[f"/exports/{len(folders)}/"] = export(make_ckpt("7"), root / "external", prefill="last", external_data=True)
    args = [a for f in folders.values() for a in ("--export", f)]
    proc = subprocess.Popen(["node", str(WEB / "serve.mjs"), *map(str, args), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving http://127.0.0.1:PORT/ ..." once it listens
        assert line.startswith("serving http://127.0.0.1:"), line + proc.stderr.read()
        yield line.split()[1], folders
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def driven(site, tmp_path_factory):
    """One Chromium session: generate on the page, take a screenshot, then rwkvScore on every version's folder."""
    url, folders = site
    tmp = tmp_path_factory.mktemp("chromium")
    jobs = [{"export": path, "tokens": score_tokens(_vocab(folder))} for path, folder in folders.items()
            if path != "/exports/0/"]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    shot = tmp / "web-client.png"
    t0 = time.perf_counter()
    # one wasm thread, as `cli.mjs run --runtime web`: the sampled text is compared with it
    r = subprocess.run(["node", str(WEB / "drive.mjs"), "--url", url + "?threads=1", "--generate", "--prompt", PROMPT,
                        "--max-tokens", str(MAX_TOKENS), "--seed", str(SEED), "--screenshot", str(shot),
                        "--score", str(tmp / "jobs.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"\nChromium: generation, screenshot and {len(jobs)} scores in {time.perf_counter() - t0:.1f} s")
    if os.environ.get("RWKV_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "web-client.png")
    return json.loads(r.stdout), shot, jobs


def _vocab(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["vocab_size"]


def test_page_generates_and_shows_text(driven, site):
    result, shot, _ = driven
    gen = result["generation"]
    assert gen["status"] == "done", gen["status"]
    assert gen["last"]["text"].strip(), gen
    # what is on the page is exactly what was generated, piece by piece
    assert gen["output"] == gen["last"]["text"] == "".join(gen["last"]["pieces"])
    assert "tokens/s" in gen["stats"] and gen["last"]["stats"]["tokens"] > 0, gen["stats"]
    # and the same text as the library generates in Node on the same runtime, prompt and seed
    world = site[1]["/exports/0/"]
    cli = subprocess.run(["node", str(JS / "cli.mjs"), "run", str(world), "--prompt", PROMPT, "--max-tokens",
                          str(MAX_TOKENS), "--seed", str(SEED), "--runtime", "web"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == gen["output"] + "\n"
    assert not [m for m in result["console"] if m.startswith(("error", "pageerror", "http"))], result["console"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("version", [*VERSIONS, "7-external-data"])
def test_page_score_matches_python(driven, site, version):
    result, _, jobs = driven
    i = VERSIONS.index(version) if version in VERSIONS else len(VERSIONS)
    folder = site[1][jobs[i]["export"]]
    tokens = jobs[i]["tokens"]
    ours = np.array(result["scores"][i], dtype=np.float64)
    assert ours.shape == (len(tokens), _vocab(folder)), ours.shape
    d = assert_same_logits(ours, python_score(folder, tokens))
    print(f"\nv{version} fp32 chromium: max|Δ|/std = {d:.3g}")


def _get(url: str, path: str, method: str = "GET") -> int:
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path)  # sent as is: no client-side normalisation of `..`
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status


def test_server_serves_read_only_and_refuses_traversal(site):
    url, _ = site
    for path in ("/", "/export/manifest.json", "/exports/2/manifest.json", "/lib/session.mjs", "/app/main.mjs",
                 "/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs"):
        assert _get(url, path) == 200, path
    for path in ("/export/../manifest.json", "/export/../../../../etc/passwd", "/export/%2e%2e/%2e%2e/etc/passwd",
                 "/export/..%2f..%2fetc%2fpasswd", "/lib/../../README.md", "/app/../js/package.json",
                 "/export/leak.txt", "/exports/99/manifest.json", "/etc/passwd", "/export/", "/export/golden",
                 "/node_modules/onnxruntime-web/package.json"):
        assert _get(url, path) == 404, path
    assert _get(url, "/export/manifest.json", "POST") == 405
    assert _get(url, "/export/manifest.json", "PUT") == 405


def test_server_bad_arguments(tmp_path):
    for args, word in (([], "--export"), (["--export", tmp_path], "manifest.json"),
                       (["--export", tmp_path, "--port", "x"], "manifest.json")):
        r = subprocess.run(["node", str(WEB / "serve.mjs"), *map(str, args)], capture_output=True, text=True,
                           timeout=30)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], r.stderr
