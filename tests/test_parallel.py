"""Tensor parallelism through megatron-core parallel_state, on two CPU ranks."""

from __future__ import annotations

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
