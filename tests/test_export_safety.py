"""What export must never do to the user's files, and what it must leave behind (nothing) when it fails or is
killed; checkpoints that once hung, crashed or ran out of memory instead of giving one `error:` line."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rwkv_deploy.exporters.export as ex
import rwkv_deploy.staging as staging
from conftest import one_error_line, run_cli
from rwkv_deploy.errors import RWKVDeployError
from rwkv_deploy.models import load_checkpoint
from rwkv_deploy.models.synthetic import make_checkpoint, save_checkpoint




def temp_folders(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def fake_export(folder: Path) -> Path:
    """A folder that --force may replace: it has an rwkv-deploy manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "rwkv-deploy/1"}))
    return folder


# --- what --force may replace ------------------------------------------------------------------------------------

def test_force_refuses_a_folder_that_is_not_an_export(make_ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "manifest.json").write_text(json.dumps({"format": "something-else/1"}))
    one_error_line(run_cli("export", make_ckpt("4"), "-o", out, "--force"), "not an rwkv-deploy export folder",
                   "remove it by hand")
    assert (out / "notes.txt").read_text() == "precious"
    assert temp_folders(tmp_path) == []


def test_force_refuses_the_folder_holding_the_checkpoint(make_ckpt, tmp_path):
    out = fake_export(tmp_path / "o")  # an export folder, yet it holds the checkpoint: never replaced
    ckpt = out / "sub" / "m.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(make_ckpt("4").read_bytes())
    one_error_line(run_cli("export", ckpt, "-o", out, "--force"), "holds the checkpoint")
    assert ckpt.exists()
    # the same checkpoint reached through a symlink from outside
    link = tmp_path / "link.pth"
    link.symlink_to(ckpt)
    one_error_line(run_cli("export", link, "-o", out, "--force"), "holds the checkpoint")
    assert ckpt.exists()


def test_force_refuses_a_folder_whose_hf_weights_point_into_it(tmp_path):
    """An HF folder (as in the HF cache) whose weight file is a link into OUT: OUT holds the checkpoint's data."""
    out = fake_export(tmp_path / "o")
    blob = out / "blob"
    save_checkpoint(make_checkpoint("4"), blob)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    (hf / "pytorch_model.bin").symlink_to(blob)
    one_error_line(run_cli("export", hf, "-o", out, "--force"), "holds the checkpoint")
    assert blob.exists()


def test_force_refuses_the_current_folder(make_ckpt, tmp_path):
    cwd = fake_export(tmp_path / "work")  # even an export folder is not replaced while it is the current folder
    (cwd / "keep.txt").write_text("x")
    one_error_line(run_cli("export", make_ckpt("4"), "-o", ".", "--force", cwd=cwd), "current folder")
    one_error_line(run_cli("export", make_ckpt("4"), "-o", "..", "--force", cwd=cwd), "current folder")
    assert sorted(p.name for p in cwd.iterdir()) == ["keep.txt", "manifest.json"]


def test_force_refuses_root(make_ckpt):
    one_error_line(run_cli("export", make_ckpt("4"), "-o", "/", "--force"), "root folder")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_force_replaces_an_export_and_leaves_no_temp(make_ckpt, tmp_path, monkeypatch, exchange):
    out = ex.export(make_ckpt("4"), tmp_path / "o")
    (out / "stale.txt").write_text("x")
    used = []
    real = staging.exchange
    monkeypatch.setattr(staging, "exchange", lambda a, b: used.append(1) or (real(a, b) if exchange else False))
    ex.export(make_ckpt("5.2"), out, force=True)
    assert used, "an existing OUT is swapped, not renamed away"
    assert json.loads((out / "manifest.json").read_text())["rwkv_version"] == "5.2"
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_force_replaces_a_symlink_not_its_target(make_ckpt, tmp_path):
    target = ex.export(make_ckpt("4"), tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    ex.export(make_ckpt("5.2"), link, force=True)
    assert link.is_dir() and not link.is_symlink()
    assert json.loads((target / "manifest.json").read_text())["rwkv_version"] == "4"


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").touch()
    if not staging.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the two-rename fallback is tested above")
    assert [p.name for p in b.iterdir()] == ["from_a"] and list(a.iterdir()) == []


# --- killed exports: SIGTERM cleans up, SIGKILL is swept by the next export --------------------------------------

@pytest.fixture(scope="module")
def bigger_ckpt(tmp_path_factory) -> Path:
    """Big enough that the export spends about a second with its temporary folder in place."""
    path = tmp_path_factory.mktemp("big") / "big.pth"
    save_checkpoint(make_checkpoint("7", n_layer=4, n_embd=256, vocab_size=4096), path)
    return path


def start_export(ckpt: Path, out: Path) -> tuple[subprocess.Popen, str]:
    """Start a CLI export and return once its temporary folder exists (and the folder's name)."""
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_deploy.cli", "export", str(ckpt), "-o", str(out),
                             "--prefill"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        found = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        if found:
            return proc, found[0]
        if proc.poll() is not None:
            pytest.fail(f"the export ended before its temporary folder was seen: {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no temporary folder appeared")


def test_sigkill_leftovers_are_swept_by_the_next_export(bigger_ckpt, make_ckpt, tmp_path):
    proc, tmp_name = start_export(bigger_ckpt, tmp_path / "o")
    proc.kill()
    proc.wait()  # reaped: its pid no longer names a running process
    assert (tmp_path / tmp_name).is_dir(), "SIGKILL cannot be caught: the folder stays until the next export"
    r = run_cli("export", make_ckpt("4"), "-o", tmp_path / "o2")
    assert r.returncode == 0, r.stderr
    assert temp_folders(tmp_path) == []
    assert (tmp_path / "o2" / "manifest.json").exists()


def test_sigterm_leaves_nothing(bigger_ckpt, tmp_path):
    proc, _ = start_export(bigger_ckpt, tmp_path / "o")
    proc.terminate()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "Traceback" not in proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_dead_owners_folders(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        host = staging.HOST
        names = {
            f".o.tmp-{dead.pid}-{host}-abc_12": False,  # swept
            f".o.old-{dead.pid}-{host}-0f0f0f0f": False,  # swept
            f".o.tmp-{alive.pid}-{host}-abc_12": True,  # its owner still runs
            f".o.tmp-{dead.pid}-00000000-abc_12": True,  # another machine's (shared folder)
            f"o.tmp-{dead.pid}-{host}-abc_12": True,  # not our pattern (no leading dot)
            "user-data": True,
        }
        for n in names:
            (tmp_path / n).mkdir()
            (tmp_path / n / "f").touch()
        target = tmp_path / "user-data"
        (tmp_path / f".o.tmp-{dead.pid}-{host}-link").symlink_to(target)  # a link is never followed nor removed
        staging.sweep_stale(tmp_path)
        for n, kept in names.items():
            assert (tmp_path / n).exists() == kept, n
        assert (tmp_path / f".o.tmp-{dead.pid}-{host}-link").is_symlink() and (target / "f").exists()
    finally:
        alive.kill()
        alive.wait()


# --- failures while writing ----------------------------------------------------------------------------------------

def test_disk_full_gives_one_error_and_leaves_nothing(make_ckpt, tmp_path, monkeypatch):
    import rwkv_deploy.exporters.onnx_graph as og

    def full(f, *a, **k):  # the disk fills while a weight is written into model.onnx
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)

    monkeypatch.setattr(og, "_append_initializer", full)
    with pytest.raises(RWKVDeployError, match="No space left on device") as e:
        ex.export(make_ckpt("4"), tmp_path / "o")
    assert "model.onnx" in str(e.value) and str(tmp_path / "o") in str(e.value)
    assert list(tmp_path.iterdir()) == []
    # an existing export is left as it was
    monkeypatch.undo()
    out = ex.export(make_ckpt("4"), tmp_path / "o")
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(og, "_append_initializer", full)
    with pytest.raises(RWKVDeployError, match="No space left on device"):
        ex.export(make_ckpt("5.2"), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "manifest.json").read_text())["rwkv_version"] == "4"
    assert temp_folders(tmp_path) == []


def test_unreadable_checkpoint_names_the_file(make_ckpt, tmp_path, monkeypatch):
    """Simulated: the tests run as root, for whom a chmod 000 file is still readable."""
    import rwkv_deploy.models.checkpoint as ck

    ckpt = make_ckpt("4")

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(ck, "open", denied, raising=False)
    with pytest.raises(RWKVDeployError, match=f"cannot read {ckpt}: Permission denied"):
        load_checkpoint(ckpt)
    with pytest.raises(RWKVDeployError, match="Permission denied"):
        ex.export(ckpt, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file; the simulated test above covers it")
def test_chmod_000_checkpoint(make_ckpt, tmp_path):
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(make_ckpt("4").read_bytes())
    ckpt.chmod(0)
    one_error_line(run_cli("export", ckpt, "-o", tmp_path / "o"), str(ckpt), "Permission denied")


# --- checkpoints that hung, crashed or ran out of memory --------------------------------------------------------

def test_huge_layer_index_fails_fast(tmp_path):
    for index in ("1000000", "1000000000000000", "9" * 5000):
        sd = make_checkpoint("7")
        sd[f"blocks.{index}.att.key.weight"] = sd["blocks.0.att.key.weight"]
        ckpt = tmp_path / "huge.pth"
        save_checkpoint(sd, ckpt)
        r = subprocess.run([sys.executable, "-m", "rwkv_deploy.cli", "export", str(ckpt), "-o", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=60)
        one_error_line(r, "layer 2 has no 'blocks.2.*' keys", f"blocks.{index[:20]}")
    assert not (tmp_path / "o").exists()


def test_layer_gap_is_named(tmp_path):
    sd = {k.replace("blocks.1.", "blocks.2."): t for k, t in make_checkpoint("4").items()}
    save_checkpoint(sd, tmp_path / "gap.pth")
    with pytest.raises(RWKVDeployError, match="layer 1 has no 'blocks.1.\\*' keys, yet 'blocks.2."):
        load_checkpoint(tmp_path / "gap.pth")


def hf_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    return path


@pytest.mark.parametrize("where", ["file", "hf-config", "hf-weights"])
def test_fifo_is_refused(tmp_path, where):
    if where == "file":
        ckpt = fifo = tmp_path / "m.pth"
    else:
        ckpt = hf_folder(tmp_path / "hf")
        fifo = ckpt / ("config.json" if where == "hf-config" else "model.safetensors")
        fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "rwkv_deploy.cli", "export", str(ckpt), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=30)
    one_error_line(r, str(fifo), "FIFO")


def save_with(tmp_path: Path, key: str, change) -> Path:
    sd = make_checkpoint("4")
    sd[key] = change(sd[key])
    torch.save(sd, tmp_path / "m.pth")
    return tmp_path / "m.pth"


@pytest.mark.parametrize("kind, change, words", [
    ("fp8", lambda t: t.to(torch.float8_e4m3fn), ["float8_e4m3fn"]),
    ("int", lambda t: t.to(torch.int32), ["torch.int32"]),
    ("complex", lambda t: t.to(torch.complex64), ["complex64"]),
    ("meta", lambda t: t.to("meta"), ["meta tensor"]),
    ("sparse", lambda t: t.to_sparse(), ["sparse_coo"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_unusable_tensors_are_named(tmp_path, kind, change, words):
    ckpt = save_with(tmp_path, "blocks.0.ln1.weight", change)
    one_error_line(run_cli("export", ckpt, "-o", tmp_path / "o"), "'blocks.0.ln1.weight'", *words)
    assert not (tmp_path / "o").exists()


def test_quantized_tensor_is_named(tmp_path):
    with pytest.warns(UserWarning):  # quantize_per_tensor is deprecated; the files exist all the same
        q = torch.quantize_per_tensor(torch.ones(64), 0.1, 0, torch.qint8)
    ckpt = save_with(tmp_path, "blocks.0.ln1.weight", lambda t: q)
    with pytest.raises(RWKVDeployError, match="'blocks.0.ln1.weight' has dtype torch.qint8"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("config", ["[1, 2]", "42", '"rwkv"'])
def test_hf_config_that_is_not_an_object(tmp_path, config):
    hf = hf_folder(tmp_path / "hf")
    (hf / "config.json").write_text(config)
    one_error_line(run_cli("export", hf, "-o", tmp_path / "o"), "config.json", "expected an object")
