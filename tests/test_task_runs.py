"""The encoder tasks through the real launcher and engine (DESIGN 5.8): the WideNet masked-LM encoder and the WideNet
ViT, each trained on two CPU ranks with its experts split over them (moe.ep_size 2, ZeRO-2), interrupted and resumed,
equal step by step to one rank accumulating the same global batches (ep 1, ZeRO-1) trained in this process; expert
files per (layer, expert), MoE health and the task's metrics in TensorBoard; fine-tuning starts from the expert-
parallel pretraining checkpoint; the image model exports to a release without a tokenizer and loads back."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import explain, run_recipe, train_losses
from test_tasks import digits, embedded_mlm  # noqa: F401 - the embedded data of the tasks

STEPS = 4
COMMON = ["--num-layers", "2", "--num-attention-heads", "4", "--micro-batch-size", "4", "--global-batch-size", "8",
          "--train-iters", str(STEPS), "--warmup-iters", "1", "--log-interval", "1", "--eval-interval", "0",
          "--final-eval-iters", "1", "--router-noise", "none"]  # noise draws differ between rank layouts
TASKS = {
    "masked_lm": ("recipes/pretrain_mlm.py", ["--preset", "widenet_mlm_smoke", *COMMON, "--hidden-size", "64",
                                              "--moe-ffn-hidden-size", "128", "--embedding-size", "32",
                                              "--seq-length", "32"]),
    # Every augmentation on: a sample must be the same on any rank layout and after a resume.
    "image_classification": ("recipes/train_vit.py", ["--preset", "widenet_vit_smoke", *COMMON, "--hidden-size", "32",
                                                      "--moe-ffn-hidden-size", "64", "--randaugment-ops", "2",
                                                      "--image-flip", "--image-crop-scale", "0.5", "--mixup-alpha",
                                                      "0.5", "--label-smoothing", "0.1"]),
}
EP2 = ["--ds-set", "moe.ep_size=2", "zero_optimization.stage=2"]


@pytest.fixture(scope="module")
def runs(single_rank, embedded_mlm, digits, tmp_path_factory):  # noqa: F811
    """task -> (reference run dir: one rank in this process, ep 1; the two-rank ep 2 run dir, interrupted and resumed)."""
    from wider import cli
    from wider.tasks import DEFAULT_PRESETS
    from wider.training import loop

    out = {}
    for task, (recipe, args) in TASKS.items():
        root = tmp_path_factory.mktemp(task)
        ref = root / "ref"
        outcome = loop.run(cli.parse([*args, "--run-dir", str(ref)], default_preset=DEFAULT_PRESETS[task], task=task))
        assert outcome.reason == "finished"
        ep2 = root / "ep2"
        for extra in (["--exit-at-iter", "2"], ["--resume", "auto"]):
            p = run_recipe([*args, *EP2, "--run-dir", str(ep2), *extra], ranks=2, recipe=recipe)
            assert p.returncode == 0, explain(p)
        assert "resumed from" in p.stdout and "ep_size 2" in p.stdout
        out[task] = (ref, ep2)
    return out


def _records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_ep2_resumed_equals_one_rank_ep1(runs, task):
    """Losses and task metrics of every step equal (1e-5), with the experts split over two ranks under ZeRO-2 and the
    run interrupted at step 2 and resumed; the checkpoint holds one file per (layer, expert); TensorBoard holds the
    task's metrics and the shared MoE's health per block."""
    ref, ep2 = runs[task]
    a, b = train_losses(ref), train_losses(ep2)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])), (s, a[s], b[s])
    metric = "mlm_accuracy" if task == "masked_lm" else "accuracy"
    for x, y in zip(_records(ref, "train"), _records(ep2, "train")):
        assert abs(x[metric] - y[metric]) <= 1e-6, (x, y)
    fa, fb = _records(ref, "final_eval")[-1], _records(ep2, "final_eval")[-1]
    assert abs(fa["loss"] - fb["loss"]) <= 1e-5 * abs(fa["loss"]) and fa[metric] == pytest.approx(fb[metric], abs=1e-9)
    ckpt = ep2 / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpt.glob("layer_*_expert_*_model_states.pt")) == [
        f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ep2 / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"valid/{metric}", f"train/{metric}", "train_moe/block00/dropped", "train_moe/block01/balance_loss"} <= tags
    summary = json.loads((ep2 / "summary.json").read_text())
    assert "majority_class_accuracy" in summary or "most_frequent_token_share" in summary


def test_fine_tuning_starts_from_the_expert_parallel_pretraining(runs, single_rank, embedded_mlm, tmp_path):  # noqa: F811
    """init_from the ep 2 masked-LM checkpoint: every tensor of the classifier's encoder equals the consolidated
    pretrained one (experts in global order), the classifier keeps its fresh initialisation; a run trains from it;
    resuming the masked-LM run as a classification run is refused, naming --init-from."""
    from wider import cli, parallel
    from wider.checkpoint import consolidate
    from wider.checkpoint.init import initialize
    from wider.checkpoint.paths import latest_complete
    from wider.config import ConfigError
    from wider.models import ARCHITECTURES
    from wider.moe.config import MoERuntime
    from wider.moe.settings import MoESettings
    from wider.training import loop

    _, ep2 = runs["masked_lm"]
    args = list(TASKS["masked_lm"][1])
    args[args.index("--preset") + 1] = "widenet_finetune_smoke"
    cfg = cli.parse([*args, "--run-dir", str(tmp_path / "ft"), "--init-from", str(ep2)], task="classification")
    parallel.set_seed(9)
    model = ARCHITECTURES["widenet"].build(cfg, 8000, False, MoERuntime(MoESettings()))
    fresh = model.classifier.weight.detach().clone()
    initialize(model, cfg, log=lambda _: None)
    source = consolidate(latest_complete(str(ep2))).weights
    for name, p in model.named_parameters():
        if name.startswith("classifier."):
            continue
        assert torch.equal(p.detach(), source[name]), name
    assert torch.equal(model.classifier.weight, fresh) and "mlm_bias" in source

    outcome = loop.run(cfg)
    assert outcome.reason == "finished"
    assert _records(tmp_path / "ft", "final_eval")[-1]["accuracy"] >= 0.0

    from wider import preflight

    resume = cli.parse([*args, "--run-dir", str(ep2), "--resume", "auto"], task="classification")
    with pytest.raises(ConfigError, match="checkpoint of task 'masked_lm'.*--init-from"):
        preflight.check(resume, 1)


def test_image_model_exports_without_a_tokenizer_and_loads(runs, tmp_path):
    """The ViT run consolidates to a release with no tokenizer.model; wider.from_pretrained gives the checkpoint's own
    logits."""
    import wider
    from wider.checkpoint import export, load_for_inference

    _, ep2 = runs["image_classification"]
    out = export(str(ep2), str(tmp_path / "release"), progress=False, log=lambda _: None)
    assert not (tmp_path / "release" / "tokenizer.model").exists()
    released, native = wider.from_pretrained(out), load_for_inference(str(ep2))
    assert released.tokenizer is None and released.config.model.task == "image_classification"
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(released.model(images), native.model(images), rtol=0, atol=0)
