"""SIGKILL at random moments: training and feature encoding resume, and no half-written file is ever read.

Each kill lands at a random point of a random step (or chunk): inside the forward pass, the optimizer step, or
the write of a 12 MB checkpoint. After every kill, every file a reader opens under its final name must be complete
(it parses in full); temporaries may be left beside them, and the next run removes or ignores them. The resumed
runs must end exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration  # subprocesses killed and resumed many times over

WORKER = Path(__file__).with_name("_crash_worker.py")
sys.path.insert(0, str(WORKER.parent))
from _corpora import noise_pngs  # noqa: E402
from _crash_worker import ENCODER_KEY, STEPS, encode_files, train_regression  # noqa: E402


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _kill_after(proc: subprocess.Popen, marker: str, count: int, rng: random.Random) -> bool:
    """SIGKILLs ``proc`` a random moment after its ``count``-th line starting with ``marker``; False if it ended."""
    seen = 0
    for line in proc.stdout:
        if line.startswith(marker):
            seen += 1
            if seen >= count:
                time.sleep(rng.uniform(0.0, 0.15))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return True
        if line.startswith("done"):
            break
    proc.wait(timeout=60)
    return False


def _kill_mid_write(proc: subprocess.Popen, run: Path, after_step: int) -> None:
    """SIGKILLs ``proc`` while it writes its checkpoint (its temporary exists), after step ``after_step`` starts.

    A writer that wrote straight onto ``trainer_state.pt`` would never show a temporary, and fails here.
    """
    for line in proc.stdout:
        if line.startswith(f"step {after_step}"):
            break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if any(run.glob(".trainer_state.pt.*.tmp")):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return
        time.sleep(0.0005)
    proc.kill()
    raise AssertionError("the checkpoint was never seen being written under a temporary name")


def _finish(*args: str) -> str:
    proc = _start(*args)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, f"resumed run failed:\n{out[-2000:]}\n{err[-3000:]}"
    return out


def _check_training_files(run: Path) -> int:
    """Every file of a (killed) run directory parses in full; returns the checkpoint's step (0 if none)."""
    from safetensors.torch import load_file

    step = 0
    if (run / "trainer_state.pt").exists():
        state = torch.load(run / "trainer_state.pt", weights_only=False)
        step = state["step"]
        assert set(state["params"]) == {"weight", "bias"}
    if (run / "metrics.csv").exists():
        with (run / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert all(r["step"] and r["train/loss"] for r in rows)
        assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    best = run / "best"
    if (best / "model.safetensors").exists():
        assert set(load_file(str(best / "model.safetensors"))) == {"weight", "bias"}
    if (best / "selection.json").exists():
        assert json.loads((best / "selection.json").read_text())["step"] in (*range(5, STEPS, 5), STEPS)
    return step


def test_training_killed_at_random_moments_resumes_exactly(tmp_path):
    rng = random.Random(os.getpid())  # a different set of moments on every run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed processes (OMP_NUM_THREADS=1), so the sums round alike
    try:
        reference = train_regression(tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "killed"
    steps_at_kill = []
    for _ in range(2):
        proc = _start("train", str(run))
        if _kill_after(proc, "step", rng.randint(2, STEPS // 3), rng):
            steps_at_kill.append(_check_training_files(run))
    before = _check_training_files(run)
    _kill_mid_write(_start("train", str(run)), run, before + 2)
    steps_at_kill.append(_check_training_files(run))
    assert steps_at_kill, "no run was killed"
    assert steps_at_kill == sorted(steps_at_kill) and steps_at_kill[-1] > 0, f"no progress kept: {steps_at_kill}"
    _finish("train", str(run))
    assert _check_training_files(run) == STEPS
    assert not list(run.glob(".*.tmp")), "temporaries of killed writes were left behind"
    resumed = torch.load(run / "trainer_state.pt", weights_only=False)["params"]
    for name, p in reference.named_parameters():
        assert torch.equal(resumed[name], p.detach()), f"{name} differs from the uninterrupted run"
    with (tmp_path / "reference" / "metrics.csv").open() as f1, (run / "metrics.csv").open() as f2:
        assert list(csv.DictReader(f1)) == list(csv.DictReader(f2))


def test_encoding_killed_at_random_moments_resumes_without_reencoding(tmp_path):
    from cirlab.features.cache import FeatureCache

    rng = random.Random(os.getpid())
    paths = noise_pngs(tmp_path / "images", 96)
    (tmp_path / "paths.json").write_text(json.dumps([str(p) for p in paths]))
    reference = encode_files(paths, tmp_path / "reference").embeds
    cache_dir = tmp_path / "cache"
    committed = []
    for _ in range(3):
        proc = _start("encode", str(tmp_path / "paths.json"), str(cache_dir))
        if not _kill_after(proc, "chunk", rng.randint(1, 3), rng):
            continue
        # Only what was committed is read, and all of it is complete.
        partial = FeatureCache(cache_dir).lookup(paths, ENCODER_KEY)
        np.testing.assert_allclose(partial.embeds, reference[partial.positions], rtol=1e-5, atol=1e-6)
        committed.append(len(partial))
    assert committed and committed == sorted(committed) and committed[-1] > 0, f"nothing kept: {committed}"
    out = _finish("encode", str(tmp_path / "paths.json"), str(cache_dir))
    n_encoded = int(out.split("encoded ")[1].split()[0])
    assert n_encoded == len(paths) - committed[-1], "the resumed run re-encoded committed files"
    final = encode_files(paths, cache_dir)
    assert final.n_encoded == 0
    np.testing.assert_allclose(final.embeds, reference, rtol=1e-5, atol=1e-6)


def test_stale_temporaries_are_removed_and_the_file_kept(tmp_path):
    from cirlab.io import atomic_write_text, remove_stale_temporaries

    atomic_write_text(tmp_path / "metrics.csv", "step\n1\n")
    (tmp_path / ".metrics.csv.k1ll3d.tmp").write_text("step\n1\n2")  # what a SIGKILL mid-write leaves
    (tmp_path / ".other.csv.abc.tmp").write_text("")  # another file's temporary is not touched
    assert [p.name for p in remove_stale_temporaries(tmp_path / "metrics.csv")] == [".metrics.csv.k1ll3d.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.csv.abc.tmp", "metrics.csv"]


def test_files_get_the_mode_the_umask_gives(tmp_path, tiny_backbone):
    """Not 0600 whatever the umask (mkstemp's mode): a service account must be able to read an index built by
    another user."""
    from cirlab.features import FeatureCache
    from cirlab.index import build_index
    from cirlab.io import atomic_write_text
    from imagefiles import make_gallery

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.json", "{}")
        tiny_backbone.save_pretrained(tmp_path / "model")
        make_gallery(tmp_path / "images", 3)
        build_index(tmp_path / "images", tmp_path / "index", backbone="tiny", cache=FeatureCache(tmp_path / "cache"),
                    log=lambda m: None)  # fmt: skip
    finally:
        os.umask(old)
    written = [tmp_path / "report.json", *(tmp_path / "index").iterdir(), *(tmp_path / "cache").rglob("*.npy")]
    written += [p for p in (tmp_path / "cache").rglob("manifest.json")]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written if p.is_file() and p.name != ".lock"}
    assert set(modes.values()) == {"0o644"}, modes
    assert oct((tmp_path / "model").stat().st_mode & 0o777) == "0o755"


def test_writes_are_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    """Data then directory: after a power cut the file is the old one or the whole new one, never empty."""
    from cirlab.io import atomic_write_text

    synced = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_text(tmp_path / "config.json", "{}")
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".config.json.")) and synced[1] == str(tmp_path)


def test_a_failed_write_names_the_file_and_leaves_no_temporary(tmp_path):
    """A write that fails part-way (here: over the file-size limit, as a full disk would) says which file."""
    code = (
        "import resource, signal, sys\n"
        "from cirlab.io import atomic_write_bytes\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
        "try:\n"
        f"    atomic_write_bytes({str(tmp_path / 'weights.bin')!r}, b'x' * (1 << 20))\n"
        "except OSError as err:\n"
        "    print(err)\n"
        "    sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "File too large" in done.stdout and str(tmp_path / "weights.bin") in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_torch_save_names_the_checkpoint(tmp_path):
    """torch.save reports a full disk as a RuntimeError of its own naming no file; the error names the checkpoint."""
    import shutil

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"]).returncode != 0:
        pytest.skip("needs unshare -Urm to mount a small tmpfs")
    (tmp_path / "run").mkdir()
    code = (
        "import sys, torch\n"
        "from cirlab.io import atomic_path\n"
        "try:\n"
        f"    with atomic_path({str(tmp_path / 'run' / 'trainer_state.pt')!r}) as tmp:\n"
        "        torch.save(torch.zeros(1 << 20), tmp)\n"
        "except OSError as err:\n"
        "    print(err)\n"
        "    sys.exit(1)\n"
    )
    mount = f"mount -t tmpfs -o size=512k none {tmp_path / 'run'}"
    run = f'{mount} && {sys.executable} -c "$CODE"; echo rc=$?; ls -a {tmp_path / "run"}'
    done = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", run], env={**os.environ, "CODE": code}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert "rc=1" in done.stdout, (done.stdout, done.stderr[-2000:])
    assert "No space left on device" in done.stdout and str(tmp_path / "run" / "trainer_state.pt") in done.stdout
    assert ".tmp" not in done.stdout.split("rc=1")[1]
