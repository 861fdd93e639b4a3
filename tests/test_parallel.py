"""Parallel set-up: tensor parallelism through megatron-core parallel_state on two CPU ranks, and the guard against
an orphaned lock of DeepSpeed's CPU shm-op build."""

from __future__ import annotations

import pytest
from conftest import TINY, explain, run_recipe, train_losses


def test_tp2_equals_tp1_for_three_steps(data_args, tmp_path):
    common = [*TINY, *data_args, "--train-iters", "3", "--warmup-iters", "1"]
    # megatron pads the vocabulary to a multiple of divisor x TP: choose divisors that give one padded size
    # (8192 for the 8000-piece tokenizer), so that both models are the same function.
    p1 = run_recipe([*common, "--run-dir", str(tmp_path / "tp1"), "--make-vocab-size-divisible-by", "256"])
    assert p1.returncode == 0, explain(p1)
    p2 = run_recipe([*common, "--run-dir", str(tmp_path / "tp2"), "--tensor-parallel", "2",
                     "--make-vocab-size-divisible-by", "128"], ranks=2)
    assert p2.returncode == 0, explain(p2)
    assert "tp 2 x dp 1" in p2.stdout
    a, b = train_losses(tmp_path / "tp1"), train_losses(tmp_path / "tp2")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])


def test_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """DeepSpeed's CPU shm op builds under torch's FileBaton, which waits for ever on a lock a killed build left."""
    import os
    import time

    from wider.parallel import STALE_BUILD_LOCK_S, clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert clear_stale_build_lock("op") is None  # no build dir, no lock
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir(exist_ok=True)
    lock.touch()
    assert clear_stale_build_lock("op") is None and lock.exists()  # a build running now
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    assert clear_stale_build_lock("op") == str(lock) and not lock.exists()


def test_run_after_a_killed_op_build_goes_on(data_args, tmp_path):
    """A run whose shm-op build directory holds an orphaned lock (a build killed an hour ago) trains instead of
    hanging in torch's FileBaton. The built op is copied in, so the test pays for no compile."""
    import os
    import shutil
    import time

    import torch

    from wider.parallel import extension_build_dir

    built = extension_build_dir("deepspeed_shm_comm")
    if torch.cuda.is_available() or not os.path.exists(os.path.join(built, "deepspeed_shm_comm.so")):
        pytest.skip("needs DeepSpeed's CPU shm op built (run.sh's set-up builds it) and no GPU")
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / "deepspeed_shm_comm")  # copy2: mtimes kept, ninja sees nothing to do
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    p = run_recipe([*TINY, *data_args, "--train-iters", "1", "--warmup-iters", "1",
                    "--run-dir", str(tmp_path / "run")],
                   env={"TORCH_EXTENSIONS_DIR": str(ext)}, timeout=300)
    assert p.returncode == 0, explain(p)
    assert f"removed {lock}" in p.stdout, explain(p)
    assert sorted(train_losses(tmp_path / "run")) == [1]
