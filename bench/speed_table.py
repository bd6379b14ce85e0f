"""Side by side in one run: rwkv-deploy's exports of 169M-shaped random checkpoints (v4 and v7 by default), the
official package, and rwkv.cpp when RWKVCPP points at a local build of it (../shared/peers/build_rwkvcpp.sh).

Each export is timed by `rwkv-deploy bench` in its own process (peak RSS is then its own); the official package by
`bench --against rwkv` on the first export; rwkv.cpp through the peers' bench_rwkvcpp binary on FP32/FP16/Q8_0/Q4_0
conversions of the same checkpoint. Decode tok/s at batch 1 and prefill tok/s of --prompt-len tokens, one table.
The machine's speed can drift over a run of many minutes, so every runtime is timed once per round, --rounds
times in turn: the table gives medians over rounds, and the ratios the issue asks for are taken within each round
(runtimes minutes apart at most) before their median is reported.

    python bench/speed_table.py [--versions 4 7] [--precisions fp32 fp16 int8 int4 fp32-fused fp16-cpu int8-fused
        int4-fused]
        [--tokens 64] [--prompt-len 256] [--repeats 3] [--rounds 3] [--threads 2] [--dir speed] [--json F] [--plot F.png]
    (--precisions also takes fp16-cpu: --wkv fused --matmul cpu, float16 weights read by the library's kernels)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_model_args, write_checkpoint  # noqa: E402

from rwkv_deploy.runtime.manifest import write_bytes_atomic  # noqa: E402

CLI = [sys.executable, "-m", "rwkv_deploy.cli"]
RWKVCPP_FORMATS = ("FP32", "FP16", "Q8_0", "Q4_0")


def export_args(variant: str) -> list[str]:
    """fp16 -> portable; int8-fused -> --wkv fused (its products: the CPU kernels); fp16-cpu -> --wkv fused
    --matmul cpu."""
    precision, _, mode = variant.partition("-")
    extra = {"": [], "fused": ["--wkv", "fused"], "cpu": ["--wkv", "fused", "--matmul", "cpu"]}[mode]
    return ["--precision", precision, "--prefill", *extra]


def run_bench(folder: Path, a, out: Path, against: bool) -> dict:
    cmd = [*CLI, "bench", str(folder), "--tokens", str(a.tokens), "--prompt-len", str(a.prompt_len),
           "--repeats", str(a.repeats), "--json", str(out), "--provider", "cpu"]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    cmd += ["--against", "rwkv"] if against else []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())[0]


def rwkvcpp(ckpt: Path, version: str, a, work: Path) -> dict[str, dict]:
    """{format: {decode_tok_s, prefill_tok_s}} from rwkv.cpp's own conversions of `ckpt`."""
    root = Path(os.environ["RWKVCPP"]).resolve() / "src"
    work, ckpt = work.resolve(), ckpt.resolve()  # quantize.py runs in root, so relative paths (--dir speed) break
    binary = work / "bench_rwkvcpp"
    peers = Path(__file__).resolve().parents[2] / "shared" / "peers"

    def run(cmd: list[str], **kw) -> str:  # rwkv.cpp logs every tensor; show its output only when it fails
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
        if r.returncode:
            sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
            raise subprocess.CalledProcessError(r.returncode, cmd)
        return r.stdout

    if not binary.exists() or binary.stat().st_mtime < (peers / "bench_rwkvcpp.c").stat().st_mtime:
        run(["cc", "-O2", "-o", str(binary), str(peers / "bench_rwkvcpp.c"), f"-I{root}",
             f"-L{root / 'build'}", "-lrwkv", f"-Wl,-rpath,{root / 'build'}", "-lm"])
    source = ckpt
    if version == "7":  # rwkv.cpp at the pinned commit cannot load layer 0's unused v0/v1/v2 (peers README)
        import torch

        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        source = work / f"{ckpt.stem}-rwkvcpp.pth"
        torch.save({k: v for k, v in sd.items() if not k.startswith(("blocks.0.att.v0", "blocks.0.att.v1",
                                                                     "blocks.0.att.v2"))}, source)
    tokens = work / "tokens.txt"
    tokens.write_text(" ".join(str(i * 7919 % 50000) for i in range(max(a.prompt_len, a.tokens + 8))))
    out = {}
    for fmt in RWKVCPP_FORMATS:
        model = work / f"{ckpt.stem}-{fmt}.bin"
        if model.exists():
            pass  # converted in an earlier round (or run)
        elif fmt in ("FP32", "FP16"):
            run([sys.executable, str(root / "python" / "convert_pytorch_to_ggml.py"), str(source), str(model), fmt])
        else:
            run([sys.executable, "python/quantize.py", str(work / f"{ckpt.stem}-FP16.bin"), str(model), fmt],
                cwd=root)
        threads = str(a.threads or os.cpu_count())
        dec = run([str(binary), str(model), threads, "decode", str(tokens), "8", str(a.tokens), str(a.repeats)])
        pre = run([str(binary), str(model), threads, "prefill", str(tokens), str(a.prompt_len), str(a.repeats),
                   "64"])
        out[fmt] = {"decode_tok_s": json.loads(dec.splitlines()[-1])["median"],
                    "prefill_tok_s": max(json.loads(x)["median"] for x in pre.splitlines() if x.startswith("{"))}
    return out


def one_round(a, work: Path) -> list[tuple]:
    """(version, runtime, decode tok/s, prefill tok/s, floor tok/s) of every runtime, each timed once in turn."""
    rows = []
    for v in a.versions:
        ckpt = work / f"v{v}-{a.layers}x{a.embd}.pth"
        if not ckpt.exists():
            write_checkpoint(a, ckpt, v)
        for i, variant in enumerate(a.precisions):
            folder = work / f"v{v}-{variant}"
            if not (folder / "manifest.json").exists():
                subprocess.run([*CLI, "export", str(ckpt), "-o", str(folder), "--force", *export_args(variant)],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = run_bench(folder, a, work / f"v{v}-{variant}.json", against=i == 0)
            rows.append((v, f"rwkv-deploy {variant}", r["decode_tok_s"], r["prefill_tok_s"], r["floor_tok_s"]))
            for peer, p in r["peers"].items():
                rows.append((v, f"{peer} (official) fp32", p["decode_tok_s"], p["prefill_tok_s"], None))
        if os.environ.get("RWKVCPP"):
            for fmt, p in rwkvcpp(ckpt, v, a, work).items():
                rows.append((v, f"rwkv.cpp {fmt}", p["decode_tok_s"], p["prefill_tok_s"], None))
    return rows


def median_rows(rounds: list[list[tuple]]) -> list[tuple]:
    """Each runtime's median over the rounds."""
    import statistics

    out = []
    for k, row in enumerate(rounds[0]):
        cols = [[r[k][c] for r in rounds] for c in (2, 3, 4)]
        out.append((*row[:2], *(statistics.median(x) if x[0] is not None else None for x in cols)))
    return out


# The targets, as (label, ours, theirs, column): theirs is one runtime or None for the best peer (each of
# ours on its own: the better of two noisy runs would bias a ratio upward). Ratios are taken within each round,
# then the median of the rounds reported, so that the machine's drift over a long run cancels (each pair ran
# minutes apart at most).
RATIOS = [("int8 decode / rwkv.cpp Q8_0", "int8", "rwkv.cpp Q8_0", 2),
          ("int8 fused decode / rwkv.cpp Q8_0", "int8-fused", "rwkv.cpp Q8_0", 2),
          ("int4 decode / rwkv.cpp Q4_0", "int4", "rwkv.cpp Q4_0", 2),
          ("int4 fused decode / rwkv.cpp Q4_0", "int4-fused", "rwkv.cpp Q4_0", 2),
          ("int8 decode / official fp32", "int8", "rwkv (official) fp32", 2),
          ("int4 decode / official fp32", "int4", "rwkv (official) fp32", 2),
          ("int8 fused decode / official fp32", "int8-fused", "rwkv (official) fp32", 2),
          ("int4 fused decode / official fp32", "int4-fused", "rwkv (official) fp32", 2),
          ("fp16 decode / fp32 decode", "fp16", "rwkv-deploy fp32", 2),
          ("fp16-cpu decode / fp32 decode", "fp16-cpu", "rwkv-deploy fp32", 2),
          ("fp16-cpu decode / rwkv.cpp FP16", "fp16-cpu", "rwkv.cpp FP16", 2),
          ("fp32 decode / floor", "fp32", "rwkv-deploy fp32", 4),
          ("portable prefill / best peer", "fp32", None, 3),
          ("fp32 fused prefill / best peer", "fp32-fused", None, 3),
          ("int8 fused prefill / best peer", "int8-fused", None, 3),
          ("int4 fused prefill / best peer", "int4-fused", None, 3)]


def ratios(rounds: list[list[tuple]], versions: list[str]) -> list[tuple[str, str, list[float]]]:
    """(version, label, per-round ratios) for each target whose runtimes ran."""
    out = []
    for v in versions:
        for label, ours, theirs, col in RATIOS:
            per = []
            for rows in rounds:
                by = {r[1]: r for r in rows if r[0] == v}
                mine = by.get(f"rwkv-deploy {ours}")
                if theirs is None:  # the best of the peers
                    base = max((r[col] for n, r in by.items() if not n.startswith("rwkv-deploy")), default=None)
                else:
                    base = by[theirs][col] if theirs in by else None
                if not mine or not base:
                    break
                per.append(mine[2 if col == 4 else col] / base)  # vs floor: decode tok/s over floor tok/s
            if per:
                out.append((v, label, per))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap)
    ap.add_argument("--versions", nargs="+", default=["4", "7"])
    ap.add_argument("--precisions", nargs="+",
                    default=["fp32", "fp16", "int8", "int4", "fp32-fused", "fp16-cpu", "int8-fused", "int4-fused"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per runtime per round (median)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="times through every runtime in turn; figures are medians over rounds (default 3)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--dir", default="speed")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    a = ap.parse_args()
    if a.rounds < 1 or a.repeats < 1:
        ap.error("--rounds and --repeats must be at least 1")
    work = Path(a.dir)
    work.mkdir(exist_ok=True)
    rounds = []
    for k in range(a.rounds):
        print(f"round {k + 1}/{a.rounds}", file=sys.stderr, flush=True)
        rounds.append(one_round(a, work))
    rows = median_rows(rounds)
    print(f"batch 1, {a.layers}x{a.embd}, vocab {a.vocab}, decode over {a.tokens} steps, prefill of {a.prompt_len} "
          f"tokens; medians of {a.repeats} repeats per round, then of {a.rounds} rounds (every runtime in turn); "
          "floor = weight bytes per step / measured bandwidth")
    print(f"{'ver':<4}{'runtime':<28}{'decode tok/s':>13}{'prefill tok/s':>15}{'floor tok/s':>12}")
    for v, name, dec, pre, floor in rows:
        print(f"{v:<4}{name:<28}{dec:>13.1f}{pre:>15.1f}{floor or float('nan'):>12.1f}")
    if not os.environ.get("RWKVCPP"):
        print("(rwkv.cpp not run: set RWKVCPP to a build from ../shared/peers/build_rwkvcpp.sh)")
    found = ratios(rounds, a.versions)
    if found:
        print("\nratios within each round (median, and the rounds' range):")
        for v, label, per in found:
            import statistics

            print(f"v{v:<3}{label:<32}{statistics.median(per):6.2f}   ({min(per):.2f} - {max(per):.2f})")
    if a.json:
        write_bytes_atomic(Path(a.json), json.dumps({
            "rows": [dict(zip(("version", "runtime", "decode_tok_s", "prefill_tok_s", "floor_tok_s"), r)) for r in rows],
            "rounds": [[dict(zip(("version", "runtime", "decode_tok_s", "prefill_tok_s", "floor_tok_s"), r))
                        for r in rs] for rs in rounds],
            "ratios": [{"version": v, "ratio": label, "per_round": per} for v, label, per in found]}, indent=1).encode())
    if a.plot:
        write_bytes_atomic(Path(a.plot), plot_table(rows, a))


def plot_table(rows: list[tuple], a) -> bytes:
    """Decode and prefill tok/s of every runtime in the table, side by side per version (PNG bytes)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = list(dict.fromkeys(r[0] for r in rows))
    names = list(dict.fromkeys(r[1] for r in rows))
    color = {n: ("tab:blue" if n.startswith("rwkv-deploy") else "tab:gray" if "official" in n else "tab:orange")
             for n in names}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, col, what in ((axes[0], 2, "decode, batch 1"), (axes[1], 3, f"prefill of {a.prompt_len} tokens")):
        width = 0.8 / len(names)
        for j, n in enumerate(names):
            xs = [i + j * width for i, v in enumerate(versions) for r in rows if r[0] == v and r[1] == n]
            ys = [r[col] for v in versions for r in rows if r[0] == v and r[1] == n]
            ax.bar(xs, ys, width, color=color[n], edgecolor="white")
            for x, y in zip(xs, ys):
                ax.text(x, y, n.replace("rwkv-deploy ", "").replace(" (official) fp32", ""), rotation=90,
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(versions))], [f"RWKV-{v}" for v in versions])
        ax.set_ylabel("tokens / s")
        ax.set_title(what)
        ax.margins(y=0.25)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:gray", "tab:orange")]
    fig.legend(handles, ["rwkv-deploy (ONNX Runtime)", "rwkv (official package)", "rwkv.cpp"], loc="upper right")
    fig.suptitle(f"{a.layers}x{a.embd} random checkpoints, vocab {a.vocab}, {os.cpu_count()} CPUs, "
                 f"medians of {a.rounds} rounds")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()

if __name__ == "__main__":
    main()
