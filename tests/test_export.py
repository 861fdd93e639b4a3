"""Portable checkpoints (issue 8): consolidation of native DeepSpeed checkpoints, load_for_inference, export and
wider.from_pretrained.

The reference for "what the training model held" is read independently of wider.checkpoint: DeepSpeed's own
module state dict plus its per-expert files, loaded into a freshly built model through the MoE layer's state-dict
hooks (for an fp32 run these are the weights the engine trained), or the live engine itself through DeepSpeed's
safe_get_full_fp32_param / safe_get_full_optimizer_state.

Runs: every registered architecture trained 2 steps by the real training loop in this process (one rank, a mix
of ZeRO stages 0 / 1 / 2 and one bf16 run), plus the two-rank expert-parallel runs of tests/test_reshard.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PY, REPO, TINY, child_env
from test_reshard import SAVE, ep2_run, resumed_two_ranks  # noqa: F401 - session fixtures shared with test_reshard

# ds_config overrides per architecture: together they cover ZeRO 0 (no ZeRO: optimizer states by position, with
# expert files), 1 and 2, and bf16 runs with and without ZeRO (fp32 masters from ZeRO's bf16 optimizer files, or
# from DeepSpeed's bf16 optimizer's fp32 copies). ZeRO-1 fp32 is the two-rank runs' (test_reshard). Others: ZeRO 1.
LAYOUTS = {
    "gpt": ["zero_optimization.stage=2"],
    "gpt_moe": ["zero_optimization.stage=0"],
    "widenet": ["zero_optimization.stage=1", "bf16.enabled=true"],
    "moeut": ["zero_optimization.stage=0", "bf16.enabled=true"],
    "umoe": ["zero_optimization.stage=2"],
}


def _arch_cfg(arch: str, data_args, run_dir, extra=()):
    from wider import cli
    from wider.presets import default_for

    ds_set = LAYOUTS.get(arch, ["zero_optimization.stage=1"])  # added to the preset's own (capacity etc.)
    argv = [*TINY, *data_args, "--train-iters", "2", "--final-eval-iters", "1", "--run-dir", str(run_dir),
            "--ds-set", *ds_set, *extra]
    return cli.parse(argv, default_preset=default_for(arch), arch=arch)


@pytest.fixture(scope="module")
def arch_runs(single_rank, data_args, tmp_path_factory):
    """arch -> run directory, each trained by wider.training.loop.run in this process."""
    from wider.models import ARCHITECTURES
    from wider.training import loop

    out = {}
    for arch in ARCHITECTURES:
        run_dir = tmp_path_factory.mktemp(f"run_{arch}") / "run"
        outcome = loop.run(_arch_cfg(arch, data_args, run_dir))
        assert outcome.reason == "finished" and outcome.step == 2
        out[arch] = run_dir
    return out


def _native_model(ckpt, dtype=torch.float32):
    """The model DeepSpeed's own files describe: module state dict + per-expert files (global expert ids in the
    file names), loaded by torch's load_state_dict through wider's MoE hooks into an ep_size-1 model."""
    from wider.checkpoint.rebuild import build_for_config, run_config_of
    from wider.checkpoint.native import inspect, moe_block, vocab_size_of

    info = inspect(str(ckpt))
    cfg = run_config_of(info)
    model = build_for_config(cfg, moe_block(info, ep_size=1), vocab_size_of(info, cfg), bf16=dtype == torch.bfloat16)
    model = model.to(dtype)
    sd = dict(torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), weights_only=False,
                         map_location="cpu")["module"])
    for f in sorted(os.listdir(ckpt)):
        if f.startswith("layer_") and "_expert_" in f:
            sd.update(torch.load(os.path.join(ckpt, f), weights_only=False, map_location="cpu"))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _batch(vocab: int = 8000, B: int = 2, S: int = 32):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, vocab, (B, S), generator=g), torch.arange(S).expand(B, S)


def _logits(model):
    from wider.moe import stats

    tokens, pos = _batch()
    stats.clear(model)
    with torch.no_grad():
        return model(tokens, pos, None)


def _latest(run_dir):
    from wider.checkpoint.paths import latest_complete

    return latest_complete(str(run_dir))


# --- consolidation ---------------------------------------------------------------------------------------------

def test_every_architecture_consolidates_to_the_training_weights_and_logits(arch_runs):
    """fp32 runs: the consolidated tensors are bit-equal to DeepSpeed's module + expert files, and the loaded
    model's logits to the reference model's. The bf16 run: fp32 masters (not the bf16 copy) whose bf16 rounding
    is the module; loaded in bf16 it gives the training model's logits exactly."""
    from wider.checkpoint import consolidate, load_for_inference

    for arch, run_dir in arch_runs.items():
        ckpt = _latest(run_dir)
        bf16 = "bf16.enabled=true" in LAYOUTS.get(arch, [])
        dtype = torch.bfloat16 if bf16 else torch.float32
        ref = _native_model(ckpt, dtype)
        cons = consolidate(ckpt)
        assert cons.info.step == 2
        ref_params = dict(ref.named_parameters())
        assert sorted(ref_params) == sorted(n for n in cons.weights if n in ref_params), arch
        for name, p in ref_params.items():
            got = cons.weights[name]
            assert got.dtype == torch.float32
            assert torch.equal(got.to(dtype), p), (arch, name)
        if bf16:  # the masters carry more than the bf16 copy
            assert any(not torch.equal(cons.weights[n], p.float()) for n, p in ref_params.items()), arch
        loaded = load_for_inference(str(run_dir), dtype=dtype)
        assert loaded.source == ckpt and loaded.step == 2 and not loaded.model.training
        assert loaded.config.model.arch == arch and (loaded.moe is None) == (arch == "gpt")
        assert loaded.moe is None or loaded.moe.ep_size == 1
        assert all(p.dtype == dtype for p in loaded.model.parameters())
        assert torch.equal(_logits(loaded.model), _logits(ref)), arch


def test_consolidation_equals_the_live_engine_and_reshards_into_another(single_rank, data_args, tmp_path):
    """A live engine (WideNet, bf16, ZeRO-2) trained two steps and saved: consolidated fp32 masters and Adam states
    equal DeepSpeed's safe_get_full_fp32_param / safe_get_full_optimizer_state. Re-sharded into an engine at
    another layout (no ZeRO in fp32 and in bf16, ZeRO-1 in fp32), it holds the same values, step and learning
    rate."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from wider.checkpoint import consolidate
    from wider.checkpoint.reshard import load_resharded
    from wider.checkpoint import store
    from wider.optim import learning_rate

    cfg = _arch_cfg("widenet", data_args, tmp_path / "live", ["--global-batch-size", "4"])  # one micro-batch a step
    cfg.train.ds_set = ["zero_optimization.stage=2", "bf16.enabled=true"]
    engine, tok = _engine(cfg)
    for _ in range(2):
        _train_step(engine, cfg)
    ckpt = store.save(engine, cfg.train.run_dir, 2, {"step": 2, "config": cfg.to_dict(),
                                                          "tokenizer_sha256": tok.sha256}, keep=0)
    cons = consolidate(ckpt, optimizer=True)
    assert cons.adam_step == 2 and cons.lr_scheduler["last_epoch"] == 2
    # DeepSpeed 0.19.8 links each parameter's optimizer-state fragments once, right after the FIRST group's first
    # step (stage_1_and_2.py _optimizer_step -> _lazy_init_hp_params_optimizer_state), when the other groups have
    # no state yet: safe_get_full_optimizer_state then fails for every parameter outside group 0. Link again now
    # that every group has its state (wider.checkpoint.reshard creates all states before linking).
    engine.optimizer._hp_optimizer_states_linked = False
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        assert torch.equal(cons.weights[name], safe_get_full_fp32_param(p)), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(cons.optimizer[name][key], safe_get_full_optimizer_state(p, key)), (name, key)

    # no ZeRO (the torch optimizer's own state; in bf16 DeepSpeed's fp32 copies beside it), ZeRO-1 (fragments)
    for stage, bf16 in ((0, False), (0, True), (1, False)):
        cfg.train.ds_set = [f"zero_optimization.stage={stage}", f"bf16.enabled={str(bf16).lower()}"]
        other, _ = _engine(cfg)
        masters = {}
        if bf16:
            opt = other.optimizer
            masters = {id(lp): hp for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(g16, g32)}
            assert masters and all(hp.dtype == torch.float32 for hp in masters.values())
        load_resharded(other, ckpt)
        for name, p in other.module.named_parameters():
            assert torch.equal(p.detach(), cons.weights[name].to(p.dtype)), (stage, name)
            if stage == 0:
                hp = masters.get(id(p), p)
                assert torch.equal(hp.detach(), cons.weights[name]), (stage, bf16, name)
                state = (other.optimizer.optimizer if bf16 else other.optimizer).state[hp]
                got = {key: state[key] for key in ("exp_avg", "exp_avg_sq")}
                assert int(state["step"]) == 2
            else:
                assert torch.equal(safe_get_full_fp32_param(p), cons.weights[name]), name
                got = {key: safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")}
            for key, value in got.items():
                assert torch.equal(value, cons.optimizer[name][key]), (stage, name, key)
        if stage == 1:
            assert all(int(st["step"]) == 2 for st in other.optimizer.optimizer.state.values())
        assert other.global_steps == 2
        assert all(g["lr"] == pytest.approx(learning_rate(2, cfg.train)) for g in other.optimizer.param_groups)


def _engine(cfg):
    """A DeepSpeed engine as wider.training.loop.run builds it (the same optimizer, schedule, ds_config)."""
    import deepspeed

    from wider import ds_config, parallel
    from wider.data import SentencePieceTokenizer
    from wider.models import ARCHITECTURES
    from wider.moe.config import MoERuntime
    from wider.optim import make_optimizer, make_scheduler

    t = cfg.train
    tok = SentencePieceTokenizer(cfg.data.tokenizer)
    ds = ds_config.build(cfg, 1)
    moe = ds_config.moe_settings(ds)
    runtime = MoERuntime(moe, groups=parallel.expert_groups(moe.ep_size))
    parallel.set_seed(t.seed)
    model = ARCHITECTURES[cfg.model.arch].build(cfg, tok.vocab_size, ds_config.uses_bf16(ds), runtime)
    opt = make_optimizer(model, t)
    sched = make_scheduler(opt, t)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds,
                                           mpu=parallel.MegatronMPU(), dist_init_required=False)
    return engine, tok


def _train_step(engine, cfg):
    from wider.moe import stats

    B, S = cfg.train.micro_batch_size, cfg.model.seq_length
    g = torch.Generator().manual_seed(int(engine.global_steps))
    tokens = torch.randint(0, 8000, (B, S + 1), generator=g)
    stats.clear(engine.module)
    loss = engine(tokens[:, :-1], torch.arange(S).expand(B, S), None, labels=tokens[:, 1:]).float().mean()
    aux, _ = stats.take(engine.module)
    engine.backward(loss if aux is None else loss + aux)
    engine.step()


def test_expert_parallel_checkpoints_consolidate_in_global_expert_order(ep2_run, resumed_two_ranks):
    """ep_size 2 over two ranks (ZeRO-1: each rank's experts whole in its own partition) and ep_size 1 over two
    ranks (ZeRO-2: every expert tensor split between the two partitions): the fp32 masters assembled from the ZeRO
    files equal DeepSpeed's module and per-expert files, experts stacked in global order."""
    from wider.checkpoint import consolidate

    for ckpt in (ep2_run / "checkpoints" / f"step_{SAVE:08d}", resumed_two_ranks[0] / "checkpoints" / "step_00000010"):
        ref = dict(_native_model(ckpt).named_parameters())
        cons = consolidate(str(ckpt), optimizer=True)
        experts = [n for n in ref if n.endswith("w1_LDF")]
        assert experts and cons.weights[experts[0]].shape[0] == 4
        for name, p in ref.items():
            assert torch.equal(cons.weights[name], p), (ckpt.name, name)
            assert cons.optimizer[name]["exp_avg"].shape == p.shape
        for e in range(4):  # expert e of the file layer_0_expert_e is row e of the stacked tensor
            f = torch.load(ckpt / f"layer_0_expert_{e}_mp_rank_00_model_states.pt", weights_only=False)
            (key,) = [k for k in f if k.endswith(".w1")]
            assert torch.equal(cons.weights[experts[0]][e], f[key])


# --- export and from_pretrained --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def releases(ep2_run, tmp_path_factory):
    from wider.checkpoint import export

    root = tmp_path_factory.mktemp("releases")
    src = ep2_run / "checkpoints" / f"step_{SAVE:08d}"
    fp32 = export(str(src), str(root / "fp32"), progress=False, log=lambda *_: None)
    bf16 = export(str(src), str(root / "bf16"), dtype="bf16", with_optimizer=True, progress=False,
                  log=lambda *_: None)
    return src, fp32, bf16


def test_release_loads_in_a_fresh_process_without_a_process_group(releases, tmp_path):
    """`import wider` pulls in nothing heavy; wider.from_pretrained, run from a directory outside the repository,
    needs no process group from the caller and gives exactly the logits of the model DeepSpeed's files describe
    (ep_size 2 checkpoint, fp32). The evaluation command works from there too."""
    src, fp32, _ = releases
    out = tmp_path / "logits.pt"
    code = f"""
import sys
import wider
assert "torch" not in sys.modules and "megatron" not in sys.modules, sorted(sys.modules)
import torch
import torch.distributed as dist
assert not dist.is_initialized()
loaded = wider.from_pretrained({str(fp32)!r})
g = torch.Generator().manual_seed(7)
tokens = torch.randint(0, 8000, (2, 32), generator=g)
with torch.no_grad():
    logits = loaded.model(tokens, torch.arange(32).expand(2, 32), None)
torch.save({{"logits": logits, "step": loaded.step, "tokenizer": loaded.tokenizer.path,
            "ep": loaded.moe.ep_size, "training": loaded.model.training}}, {str(out)!r})
"""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    p = subprocess.run([PY, "-c", code], cwd=outside, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(out)
    assert got["step"] == SAVE and got["ep"] == 1 and not got["training"]
    assert got["tokenizer"] == os.path.join(fp32, "tokenizer.model")
    assert torch.equal(got["logits"], _logits(_native_model(src)))

    (outside / "text.txt").write_text("In the beginning God created the heaven and the earth.\n")
    cmd = [str(Path(PY).parent / "wider-evaluate"), "perplexity", "--checkpoint", str(fp32), "--text", "text.txt",
           "--output-dir", "results", "--no-progress"]
    p = subprocess.run(cmd, cwd=outside, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((outside / "results" / "eval" / "ppl_text.json").read_text())
    assert result["results"]["tokens"] > 5 and result["step"] == SAVE


def test_release_files_and_bf16_halves_the_weights(releases):
    from safetensors.torch import load_file

    import wider

    src, fp32, bf16 = releases
    for d in (fp32, bf16):
        assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer.json", "metadata.json",
                "README.md"} <= set(os.listdir(d))
    meta = json.loads(open(os.path.join(fp32, "metadata.json")).read())
    assert meta["step"] == SAVE and meta["source"] == str(src) and meta["trained_layout"]["ep_size"] == 2
    assert meta["parameters"]["stored"] == meta["parameters"]["total"]
    config = json.loads(open(os.path.join(fp32, "config.json")).read())
    assert config["model"]["arch"] == "widenet" and config["moe"]["ep_size"] == 1
    assert config["moe"]["capacity_factor"] is None  # the resolved block of the run (dropless), not a default
    ratio = os.path.getsize(os.path.join(bf16, "model.safetensors")) / os.path.getsize(os.path.join(fp32,
                                                                                               "model.safetensors"))
    assert 0.49 < ratio < 0.51, ratio
    w32, w16 = load_file(os.path.join(fp32, "model.safetensors")), load_file(os.path.join(bf16, "model.safetensors"))
    assert all(w16[k].dtype == torch.bfloat16 and torch.equal(w16[k], w32[k].to(torch.bfloat16)) for k in w32)
    loaded = wider.from_pretrained(bf16, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    opt = load_file(os.path.join(bf16, "optimizer.safetensors"))
    assert {k.split(".", 1)[0] for k in opt} == {"exp_avg", "exp_avg_sq"} and len(opt) == 2 * len(w32)
    assert json.loads(open(os.path.join(bf16, "trainer_state.json")).read())["adam_step"] == SAVE


# --- errors ----------------------------------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_errors_name_the_problem_and_the_fix(ep2_run, releases, tmp_path):
    import importlib.util

    from wider.checkpoint import CheckpointError, export, from_pretrained, load_for_inference

    ckpt = ep2_run / "checkpoints" / f"step_{SAVE:08d}"
    broken = _copy(ckpt, tmp_path / "run" / "checkpoints" / f"step_{SAVE:08d}")
    (broken / "complete.json").unlink()
    with pytest.raises(CheckpointError, match="is incomplete .no complete.json"):
        load_for_inference(str(broken))
    with pytest.raises(CheckpointError, match="has no complete checkpoint .1 incomplete"):
        load_for_inference(str(tmp_path / "run"))

    gap = _copy(ckpt, tmp_path / "gap")
    (gap / "layer_0_expert_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="lacks layer_0_expert_1_mp_rank_00_model_states.pt .* copy the whole"):
        load_for_inference(str(gap))

    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="neither a run directory"):
        load_for_inference(str(tmp_path / "stray"))
    with pytest.raises(CheckpointError, match="is a DeepSpeed checkpoint, not a release; export it first"):
        from_pretrained(str(ckpt))

    _, fp32, _ = releases
    before = os.path.getmtime(os.path.join(fp32, "model.safetensors"))
    with pytest.raises(CheckpointError, match="already exists; choose another --output or pass --force"):
        export(str(ckpt), fp32, progress=False, log=lambda *_: None)
    assert os.path.getmtime(os.path.join(fp32, "model.safetensors")) == before  # untouched

    spec = importlib.util.spec_from_file_location("export_recipe", REPO / "recipes" / "export.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert recipe.main(["--source", str(broken), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()
    assert recipe.main(["--source", str(ckpt), "--output", fp32, "--force", "--no-progress"]) == 0
    assert os.path.getmtime(os.path.join(fp32, "model.safetensors")) > before
    assert not [n for n in os.listdir(os.path.dirname(fp32)) if ".tmp-" in n or ".old-" in n]
