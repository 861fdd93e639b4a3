"""Generation (wider.generation, recipes/generate.py): the key/value cache gives the same logits and greedy tokens
as recomputing the whole sequence, for every architecture in the registry; the per-step forward really sees only
the new token; top-k / top-p / temperature / seed behave as documented; bad requests get clear errors."""

from __future__ import annotations

import pytest
import torch

from wider import presets
from wider.generation import (FullRecompute, GenerationError, SamplingParams, check_prompt, filter_logits, generate,
                              inference_mode, next_tokens)
from wider.models import ARCHITECTURES
from wider.moe.config import MoERuntime
from wider.moe.settings import MoESettings

VOCAB, SEQ = 128, 32
# Tiny fp32 models from each architecture's smoke preset; init_method_std 0.2 (10x the default) so that the
# logits are decisive and a greedy path cannot flip on float rounding. moeut keeps its own init (DESIGN 5.6).
SMALL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=SEQ, init_method_std=0.2)
SHAPES = {
    "gpt": ("gpt_smoke", {}),
    "gpt_moe": ("glam_smoke", dict(num_experts=4, moe_ffn_hidden_size=64)),
    "widenet": ("widenet_smoke", dict(num_experts=4, moe_ffn_hidden_size=64)),
    # Layer groups: 2 distinct layers applied A, B, A, B: the cache must be keyed per application (depth).
    "moeut": ("moeut_smoke", dict(num_layers=4, layer_group_size=2, head_dim=16, num_experts=8, moe_top_k=2,
                                  moe_ffn_hidden_size=32)),
    "umoe": ("umoe_smoke", dict(head_dim=16, num_experts=8, moe_ffn_hidden_size=32, moe_top_k=2, query_rank=4)),
}
# A tight capacity: without the dropless override of generation, a cached step (B tokens) and a full recomputation
# (B x L tokens) would drop different assignments and the comparison below would fail.
TIGHT = MoESettings(capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1)
PROMPTS = ([5, 6, 7], [9, 3, 100, 41, 7, 7, 2, 60, 15])  # two lengths
NEW = 10


def _config(arch: str):
    preset, extra = SHAPES.get(arch, (f"{arch}_smoke", {}))
    cfg = presets.replace(presets.get(preset), model={**SMALL, **extra})
    assert cfg.model.arch == arch, f"preset {preset} builds {cfg.model.arch}, not {arch}: update SHAPES"
    ARCHITECTURES[arch].validate(cfg, 1)
    return cfg


@pytest.fixture(scope="module")
def models(single_rank):
    from wider import parallel

    built = {}
    for arch in ARCHITECTURES:
        parallel.set_seed(1)
        built[arch] = ARCHITECTURES[arch].build(_config(arch), VOCAB, False, MoERuntime(TIGHT)).eval()
    return built


def _step(arch: str, model, batch: int, length: int):
    """The architecture's cached forward: every architecture implements wider/generation.py's contract (one that
    does not raises NotImplementedError here and fails the test)."""
    return ARCHITECTURES[arch].incremental(model, batch, length)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_cached_logits_and_greedy_tokens_equal_full_recompute(models, arch):
    model = models[arch]
    greedy = SamplingParams(max_new_tokens=NEW, temperature=0)
    # Without the cache every architecture generates (the registry's forward), this one included.
    fulls = [generate(model, prompt, greedy, max_length=SEQ, num_samples=2, use_cache=False) for prompt in PROMPTS]
    _step(arch, model, 2, 4)
    for prompt, full in zip(PROMPTS, fulls):
        cached = generate(model, prompt, greedy, max_length=SEQ, num_samples=2, incremental=ARCHITECTURES[arch].incremental)
        assert cached.tokens == full.tokens and len(cached.tokens[0]) == NEW
        assert cached.tokens[0] == cached.tokens[1]  # the samples of one greedy batch agree
        # The logits themselves along that path, step by step (not only their argmax).
        path = torch.tensor([prompt + cached.tokens[0]] * 2)
        with inference_mode(model):
            step, ref = _step(arch, model, 2, path.shape[1]), FullRecompute(model, 2, path.shape[1])
            P = len(prompt)
            pairs = [(step(path[:, :P]), ref(path[:, :P]))]
            for i in range(P, path.shape[1] - 1):
                pairs.append((step(path[:, i:i + 1]), ref(path[:, i:i + 1])))
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _attention_calls(model) -> list:
    """(module, read(inputs) -> (queries, keys)) for every attention application: the modules whose class name ends
    in "Attention" take the new hidden states [S, B, D] first (megatron's self-attention slot, SwitchHead, UMoE's
    pre-mixing attention); megatron's core attention (SDPAttention) also shows the keys [L, B, heads, d] it
    attends over, read from megatron's cache."""
    from wider.models.core_attention import SDPAttention

    found = []
    for m in model.modules():  # a shared module is listed once; its hook fires at every application
        if isinstance(m, SDPAttention):
            found.append((m, lambda args: (None, args[1].shape[0])))
        elif type(m).__name__.endswith("Attention"):
            found.append((m, lambda args: (args[0].shape[0], None)))
    return found


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_step_runs_only_the_new_token(models, arch):
    """With the cache the prompt runs once and every later step sees one query position (and, for megatron's
    path, keys over every position so far); the cache has one slot per attention application."""
    model = models[arch]
    step = _step(arch, model, 2, 16)
    targets = _attention_calls(model)
    assert targets, f"no attention module found in {arch}: extend _attention_calls for it"
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, args, read=read: seen.append(read(args))) for m, read in targets]
    P = len(PROMPTS[1])
    try:
        with inference_mode(model):
            step(torch.tensor([PROMPTS[1]] * 2))
            prefill, seen[:] = list(seen), []
            for i in range(3):
                step(torch.tensor([[11 + i]] * 2))
                assert {q for q, _ in seen if q is not None} == {1}, seen
                assert {k for _, k in seen if k is not None} in (set(), {P + i + 1}), seen
                seen.clear()
    finally:
        for h in handles:
            h.remove()
    queries = [q for q, _ in prefill if q is not None]
    applications = _config(arch).model.num_layers
    assert queries == [P] * applications
    slots = step.context.key_value_memory_dict if hasattr(step, "context") else step.cache
    assert len(slots) == applications  # WideNet: one shared attention, one slot per block; MoEUT: per depth
    assert step.length == len(PROMPTS[1]) + 3


def test_static_context_extend_appends_at_the_offset():
    """The helper for megatron attention slots of our own (contract way 1): writes at sequence_len_offset and returns
    every position so far, per key; refuses what does not fit."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from wider.models.attention import static_context_extend

    ctx = StaticInferenceContext(max_batch_size=3, max_sequence_length=6)
    k1, v1 = torch.randn(4, 2, 1, 5), torch.randn(4, 2, 7)  # [S, B, ...]: prompt of 4, batch 2 (< max 3)
    k, v = static_context_extend(ctx, 1, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    static_context_extend(ctx, 2, -k1)  # another layer's slot is independent
    ctx.increment_sequence_len_offset(4)
    k2, v2 = torch.randn(1, 2, 1, 5), torch.randn(1, 2, 7)
    k, v = static_context_extend(ctx, 1, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2])) and torch.equal(v, torch.cat([v1, v2]))
    assert torch.equal(ctx.key_value_memory_dict[2][0][:4, :2], -k1)
    ctx.increment_sequence_len_offset(1)
    with pytest.raises(ValueError, match="do not fit"):
        static_context_extend(ctx, 1, torch.randn(2, 2, 1, 5), torch.randn(2, 2, 7))


def test_top_k_1_is_greedy_and_seeded_samples_reproduce(models):
    model = models["gpt"]
    greedy = generate(model, PROMPTS[0], SamplingParams(max_new_tokens=NEW, temperature=0), max_length=SEQ)
    top1 = generate(model, PROMPTS[0], SamplingParams(max_new_tokens=NEW, temperature=1.0, top_k=1, seed=3),
                    max_length=SEQ)
    assert top1.tokens == greedy.tokens
    hot = dict(max_new_tokens=NEW, temperature=4.0)
    a = generate(model, PROMPTS[0], SamplingParams(**hot, seed=7), max_length=SEQ, num_samples=3)
    b = generate(model, PROMPTS[0], SamplingParams(**hot, seed=7), max_length=SEQ, num_samples=3)
    c = generate(model, PROMPTS[0], SamplingParams(**hot, seed=8), max_length=SEQ, num_samples=3)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert len({tuple(t) for t in a.tokens}) > 1  # the samples of one batch draw independently


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]])  # sorted: 0.5, 0.25, 0.125, 0.125 (exact in binary)
    logits = probs.log()

    def kept(p):
        return set(torch.nonzero(torch.isfinite(filter_logits(logits, top_p=p)[0])).flatten().tolist())

    assert kept(0.5) == {1}  # 0.5 alone reaches 0.5
    assert kept(0.5001) == {1, 3}
    assert kept(0.75) == {1, 3}
    three = kept(0.76)  # 0.875 reaches it; which of the two tied 0.125s comes first is not specified
    assert len(three) == 3 and {1, 3} < three
    assert kept(1e-6) == {1}  # never empty
    assert kept(1.0) == {0, 1, 2, 3}
    # Draws only ever come from the kept set, with the renormalised probabilities.
    g = torch.Generator().manual_seed(0)
    draws = next_tokens(logits.expand(6000, 4), SamplingParams(temperature=1.0, top_p=0.75), g)
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 2 / 3) < 0.03
    # top-k: the k largest logits.
    assert set(torch.nonzero(torch.isfinite(filter_logits(logits, top_k=2)[0])).flatten().tolist()) == {1, 3}


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(1)
    for t in (0.5, 1.0, 2.0):
        draws = next_tokens(logits.expand(8000, 4), SamplingParams(temperature=t), g)
        freq = torch.bincount(draws, minlength=4).float() / draws.numel()
        torch.testing.assert_close(freq, torch.softmax(logits[0] / t, -1), atol=0.02, rtol=0)
    assert next_tokens(torch.tensor([[0.1, 3.0, 2.9]]), SamplingParams(temperature=0)).tolist() == [1]


def test_stops_at_end_of_document_and_masks_padded_vocabulary(models):
    model = models["gpt"]
    free = generate(model, PROMPTS[1], SamplingParams(max_new_tokens=NEW, temperature=0), max_length=SEQ)
    path = free.tokens[0]
    i = next(j for j in range(1, NEW) if path[j] not in path[:j])
    stopped = generate(model, PROMPTS[1], SamplingParams(max_new_tokens=NEW, temperature=0), max_length=SEQ,
                       eod=path[i])
    assert stopped.tokens == [path[:i]] and stopped.stop == ["eod"] and stopped.steps == i + 1
    assert free.stop == ["length"]
    # Ids at or above the tokenizer's vocabulary (megatron's padding rows) are never produced.
    small = generate(model, PROMPTS[0], SamplingParams(max_new_tokens=NEW, temperature=5.0, seed=0), max_length=SEQ,
                     vocab_size=20, num_samples=4)
    assert all(0 <= t < 20 for row in small.tokens for t in row)


def test_generation_leaves_training_settings_untouched(models):
    from wider.moe.layer import moe_layers

    model = models["widenet"]
    before = [m.config for m in moe_layers(model)]
    assert all(c.settings.drop_tokens and c.kernels.compile_routing for c in before)
    seen = []
    model.train()
    try:
        # What generation asks for while it runs: dropless and eager routing, on every layer.
        layer = moe_layers(model)[0]
        original = type(layer).route
        type(layer).route = lambda self, *a, **k: (seen.append(self.config), original(self, *a, **k))[1]
        try:
            generate(model, PROMPTS[0], SamplingParams(max_new_tokens=2, temperature=0), max_length=SEQ)
        finally:
            type(layer).route = original
        assert seen and all(not c.settings.drop_tokens and not c.kernels.compile_routing for c in seen)
        assert model.training
        assert all(a is b for a, b in zip(before, [m.config for m in moe_layers(model)]))
        assert all(not m.records for m in moe_layers(model))
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_p=0.0), "top_p \\(--top-p\\) must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p \\(--top-p\\) must be in \\(0, 1\\]"),
    (dict(temperature=-1.0), "temperature \\(--temperature\\) must be a finite number >= 0"),
    (dict(top_k=-2), "top_k \\(--top-k\\) must be an integer >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens \\(--max-new-tokens\\) must be an integer >= 1"),
])
def test_bad_sampling_parameters(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        SamplingParams(**kwargs).check()


def test_bad_prompts():
    with pytest.raises(GenerationError, match="is empty"):
        check_prompt([], 4, SEQ, VOCAB)
    with pytest.raises(GenerationError, match="30 tokens; with max_new_tokens 8 that is 38 positions, more than "
                                              "the model's seq_length 32: shorten the prompt to at most 24"):
        check_prompt([1] * 30, 8, SEQ, VOCAB)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        check_prompt([1, 500], 4, SEQ, VOCAB)


# --- recipes/generate.py end to end on a tiny trained checkpoint --------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_args):
    """A tiny WideNet (2 blocks sharing one attention and one 4-expert MoE) trained for 4 steps on one rank."""
    from conftest import TINY, explain, run_recipe

    d = tmp_path_factory.mktemp("genrun") / "run"
    p = run_recipe([*TINY, *data_args, "--preset", "widenet_smoke", "--train-iters", "4", "--run-dir", str(d)],
                   recipe="recipes/pretrain_widenet.py")
    assert p.returncode == 0, explain(p)
    return d


def _generate(argv) -> tuple[int, str, str]:
    """recipes/generate.py in this process (its main() is argparse + wider.generation.run)."""
    import importlib.util
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("generate_recipe", REPO / "recipes" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = mod.main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_recipe_samples_a_checkpoint_with_and_without_the_cache(run_dir, single_rank, embedded, tmp_path):
    import json

    from wider.data import SentencePieceTokenizer

    tok = SentencePieceTokenizer(embedded["tokenizer"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"q": "And God said"}) + "\n")
    common = ["--checkpoint", str(run_dir), "--prompt", "In the beginning", "--prompt-file", str(prompts),
              "--json-key", "q", "--max-new-tokens", "12", "--temperature", "0", "--num-samples", "2",
              "--ignore-eod"]
    records = {}
    for name, extra in (("cache", []), ("no_cache", ["--no-cache"])):
        out_file = tmp_path / f"{name}.jsonl"
        rc, out, err = _generate([*common, *extra, "--output", str(out_file)])
        assert rc == 0, err
        assert "tokens/s" in out and "arch widenet" in out and "In the beginning" in out
        records[name] = [json.loads(line) for line in out_file.read_text().splitlines()]
        assert not list(tmp_path.glob("*.tmp-*"))  # written atomically
    got, ref = records["cache"], records["no_cache"]
    assert [(r["prompt_index"], r["sample"]) for r in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]  # greedy: the cache changes nothing
    for r in got:
        ids = tok.tokenize(r["prompt"])
        assert r["prompt_tokens"] == len(ids) + 1  # the end-of-document id starts the prompt
        assert len(r["tokens"]) == 12 and r["stop"] == "length" and all(0 <= t < tok.vocab_size for t in r["tokens"])
        assert tok.detokenize(ids + r["tokens"]) == r["prompt"] + r["completion"]
    # Sampled: seeded runs reproduce.
    sampled = [*common[:-5], "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--seed", "3",
               "--num-samples", "2"]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _generate([*sampled, "--output", str(a)])[0] == 0 and _generate([*sampled, "--output", str(b)])[0] == 0
    assert a.read_text() == b.read_text()


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "In the beginning", "--max-new-tokens", "64"], "more than the model's seq_length 64"),
    (["--prompt", "  "], "prompt 0 is empty"),
    (["--prompt", "x", "--top-p", "1.5"], "top_p \\(--top-p\\) must be in \\(0, 1\\]"),
    (["--prompt", "x", "--temperature", "-1"], "temperature \\(--temperature\\) must be"),
    (["--prompt-file", "EMPTY"], "holds no prompt"),
])
def test_recipe_errors_name_the_fix(run_dir, single_rank, tmp_path, argv, match):
    import re

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    rc, out, err = _generate(["--checkpoint", str(run_dir), *argv])
    assert rc == 2 and re.search(match, err), err


def test_recipe_refuses_a_missing_checkpoint(tmp_path):
    rc, out, err = _generate(["--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"])
    assert rc == 2 and "does not exist" in err and "recipes/export.py" in err
