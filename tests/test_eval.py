"""Evaluation (wider/eval, recipes/evaluate.py): windowed perplexity against per-token references, batched and
shared log-likelihoods against one-request-at-a-time forward passes, every zero-shot task's public file format
mapped onto lm-evaluation-harness's own task definitions (the prompts it builds = prompts written out by hand) and
the harness-run scores equal to references from those prompts and the metrics' definitions (a case where length
normalisation changes the answer), the run's validation loss reproduced from a checkpoint and from an exported
release within 1e-5, results in JSON and TensorBoard, clear errors for missing and damaged task files, and
lm-evaluation-harness running local tasks end to end."""

from __future__ import annotations

import gzip
import json
import math
import subprocess

import numpy as np
import pytest
import torch

from conftest import PY, REPO, TINY, child_env, explain, run_recipe

SEQ = 32


# --- a model built directly (the scoring engine's unit tests) --------------------------------------------------

@pytest.fixture(scope="module")
def tok(embedded):
    from wider.data import SentencePieceTokenizer

    return SentencePieceTokenizer(embedded["tokenizer"])


def _cfg(**data):
    from wider.config import RunConfig

    cfg = RunConfig()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 2, 64, 4
    cfg.model.seq_length = SEQ
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.fixture(scope="module")
def model(single_rank, tok):
    from wider import parallel
    from wider.models import ARCHITECTURES

    parallel.set_seed(7)
    return ARCHITECTURES["gpt"].build(_cfg(), tok.vocab_size, False, None).eval()


def _scorer(model, tok, batch_size=4, **data):
    from wider.eval.scoring import Scorer

    return Scorer(model, tok, _cfg(**data), torch.device("cpu"), batch_size, progress=False)


def _loss_at(model, inputs, labels):
    """Per-token loss of one row through the model's own loss path (the reference)."""
    x = torch.tensor([inputs])
    with torch.no_grad():
        return model(x, torch.arange(len(inputs))[None], None, labels=torch.tensor([labels]))[0].double()


def _ref_loglikelihood(model, eod, ctx, cont):
    """log P(cont | EOD + ctx) and greedy-ness from one unbatched forward over the row, cut to the last
    seq_length + 1 tokens (the documented truncation)."""
    row = [eod, *ctx, *cont][-(SEQ + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([row[:-1]]), torch.arange(len(row) - 1)[None], None)[0]
    logp = torch.log_softmax(logits[-len(cont):].double(), -1)
    t = torch.tensor(cont)
    return float(logp.gather(1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all())


# --- windows and perplexity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,L,S", [(2, 8, 8), (9, 8, 8), (10, 8, 8), (37, 8, 8), (37, 8, 3), (37, 8, 1), (5, 8, 2)])
def test_window_plan_scores_every_target_once_with_enough_context(n, L, S):
    from wider.eval.scoring import window_plan

    plan = window_plan(n, L, S)
    scored = []
    for k, (s, m, c) in enumerate(plan):
        assert 0 <= s and m == min(L, s + m) and s + m <= n - 1 and 1 <= c <= m
        targets = list(range(s + m - c + 1, s + m + 1))  # the last c targets of inputs [s, s+m)
        scored += targets
        if k > 0:  # after the first window: at least L - S tokens of context before the first scored target
            assert targets[0] - s - 1 >= min(L - S, targets[0] - 1)
    assert scored == list(range(1, n))
    if n - 1 >= L:
        assert plan[-1][1] == L  # the last window is shifted to a full window


def _docs():
    return ["In the beginning God created the heaven and the earth.",
            "And the earth was without form, and void; and darkness was upon the face of the deep.",
            "",  # tokenizes to nothing: skipped, as data_prep/preprocess_data.py skips it
            "And God said, Let there be light: and there was light. And God saw the light, that it was good.",
            "And God called the light Day, and the darkness he called Night. And the evening and the morning "
            "were the first day. And God said, Let there be a firmament in the midst of the waters."]


def test_text_and_indexed_perplexity_equal_per_token_references(model, tok, tmp_path):
    """stride 1: every target after the first window is scored with exactly seq_length inputs before it; the
    reference computes each of those positions with its own forward pass. Stride seq_length: disjoint windows.
    The indexed dataset of the same documents (made by data_prep/preprocess_data.py) is the same stream."""
    from data_prep.preprocess_data import preprocess
    from wider.eval import perplexity as P
    from wider.eval.scoring import window_plan

    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for d in _docs():
            f.write(json.dumps({"body": d}) + "\n")
    stream = [tok.eod]
    for d in _docs():
        ids = tok.tokenize(d)
        stream += ids + [tok.eod] if ids else []
    n = len(stream)
    assert n > 2 * SEQ
    first = _loss_at(model, stream[:SEQ], stream[1:SEQ + 1])
    ref = [float(x) for x in first] + [float(_loss_at(model, stream[t - SEQ:t], stream[t - SEQ + 1:t + 1])[-1])
                                       for t in range(SEQ + 1, n)]
    scorer = _scorer(model, tok, batch_size=5)
    res = P.score_text(scorer, [str(path)], json_key="body", stride=1)
    assert res.tokens == n - 1 and res.documents == 4
    assert res.loss == pytest.approx(sum(ref) / len(ref), abs=1e-6)
    assert res.bytes == sum(len(d.encode()) for d in _docs())
    assert res.bits_per_byte == pytest.approx(sum(ref) / math.log(2) / res.bytes, rel=1e-6)

    disjoint = P.score_text(scorer, [str(path)], json_key="body")
    windows = window_plan(n, SEQ, SEQ)
    ref_disjoint = sum(float(_loss_at(model, stream[s:s + m], stream[s + 1:s + m + 1])[-c:].sum())
                       for s, m, c in windows)
    assert disjoint.tokens == n - 1
    assert disjoint.loss * disjoint.tokens == pytest.approx(ref_disjoint, abs=1e-5)

    prefix = str(tmp_path / "docs_text_document")
    preprocess([str(path)], tok.path, prefix, json_key="body", quiet=True)
    indexed = P.score_indexed(scorer, prefix, stride=1)
    assert indexed.tokens == res.tokens and indexed.documents == 4
    assert indexed.loss == pytest.approx(res.loss, abs=1e-7)
    with pytest.raises(P.EvalError, match="stride 40 must be in"):
        P.score_text(scorer, [str(path)], json_key="body", stride=40)


# --- log-likelihoods of continuations ------------------------------------------------------------------------------

def test_batched_shared_loglikelihoods_equal_single_requests(model, tok):
    """Duplicates, one-token continuations of one context (one shared row), multi-token continuations and a
    context longer than the window (truncated on the left) in batches of 3 equal unbatched references."""
    from wider.eval.scoring import EvalError

    ctx = tok.tokenize("And God said, Let there be light: and there")
    long_ctx = tok.tokenize(" ".join(_docs()))
    assert len(long_ctx) > SEQ
    one = [[t] for t in tok.tokenize("was is be light")]
    requests = ([(ctx, c) for c in one] + [(ctx, one[0])] + [(ctx, tok.tokenize(" was light and good"))]
                + [([], tok.tokenize("In the beginning"))] + [(long_ctx, tok.tokenize(" day"))])
    scorer = _scorer(model, tok, batch_size=3)
    rows = []
    forward = scorer.forward
    scorer.forward = lambda tokens, labels=None: (rows.append(tokens.shape[0]), forward(tokens, labels))[1]
    got = scorer.loglikelihood(requests)
    assert scorer.truncated == 1
    # one row for the one-token continuations of ctx and the duplicate, one each for the other three
    assert sum(rows) == 4 and len(rows) == 2
    for (c, x), (ll, greedy, n) in zip(requests, got):
        ref_ll, ref_greedy = _ref_loglikelihood(model, tok.eod, c, x)
        assert n == len(x)
        assert ll == pytest.approx(ref_ll, abs=1e-5)
        assert greedy == ref_greedy
    with pytest.raises(EvalError, match="empty continuation"):
        scorer.loglikelihood([(ctx, [])])
    with pytest.raises(EvalError, match="more than the model's seq_length"):
        scorer.loglikelihood([([], long_ctx)])


def test_end_of_document_masking_is_honoured(model, tok):
    """A run trained with data.eod_mask and reset_position_ids is scored with megatron's document masks: text
    before an EOD inside the context no longer changes the continuation's log-likelihood."""
    real, cont = tok.tokenize("and there was light"), tok.tokenize(" and God saw")
    junk = tok.tokenize("the waters under the firmament") + [tok.eod]
    masked = _scorer(model, tok, eod_mask=True, reset_position_ids=True)
    a, b = masked.loglikelihood([(junk + real, cont), (real, cont)])
    assert a[0] == pytest.approx(b[0], abs=1e-5)
    plain = _scorer(model, tok).loglikelihood([(junk + real, cont), (real, cont)])
    assert abs(plain[0][0] - plain[1][0]) > 1e-4  # without the masks the junk is seen


def test_encode_pair_moves_trailing_spaces_to_the_continuation(model, tok):
    scorer = _scorer(model, tok)
    ctx, cont = scorer.encode_pair("Question: what\nAnswer: ", "light")
    ctx2, cont2 = scorer.encode_pair("Question: what\nAnswer:", " light")
    assert (ctx, cont) == (ctx2, cont2) and cont == tok.tokenize(" light")
    assert scorer.encode_pair("", " And God") == ([], tok.tokenize("And God"))


# --- task files in their public formats, as lm-evaluation-harness tasks ----------------------------------------

STORY = [f"Sentence number {i} tells of the {w} and the king ." for i, w in
         enumerate(["garden", "river", "Mole", "queen", "road"] * 4, 1)]
CN_QUERY, CN_CANDS = "`` Now , said the XXXXX , we go home . ''", ["garden", "river", "queen", "road", "king"]
NE_QUERY, NE_CANDS = "XXXXX went down to the river .", ["Mole", "Ratty", "Toad"]


def _cbt(path, query, answer, cands):
    with open(path, "w") as f:
        for _ in range(2):
            for i, sentence in enumerate(STORY, 1):
                f.write(f"{i} {sentence}\n")
            f.write(f"21 {query}\t{answer}\t\t{'|'.join(cands)}\n\n")


def _jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    for sub in ("lambada", "blimp", "piqa", "hellaswag", "arc_easy", "cbt"):
        (d / sub).mkdir()
    _jsonl(d / "lambada/lambada_test.jsonl", [{"text": "And God said, Let there be light: and there was light"},
                                              {"text": "In the beginning God created the heaven and the earth"},
                                              {"text": "and the evening and the morning were the first day"}])
    # Paradigms of different sizes, so that the accuracy over all pairs and the mean over paradigms can differ.
    _jsonl(d / "blimp/anaphor_number_agreement.jsonl",
           [{"sentence_good": "The men saw themselves.", "sentence_bad": "The men saw himself.", "UID": "a"},
            {"sentence_good": "The king blessed himself.", "sentence_bad": "The king blessed themselves.", "UID": "a"},
            {"sentence_good": "The women hid themselves.", "sentence_bad": "The women hid herself.", "UID": "a"}])
    _jsonl(d / "blimp/determiner_noun_agreement_1.jsonl",
           [{"sentence_good": "These sons went up.", "sentence_bad": "This sons went up.", "UID": "b"},
            {"sentence_good": "That day was good.", "sentence_bad": "Those day was good.", "UID": "b"}])
    # The second item: " a" is 1 character, " wherefore Jerusalem" 19: the sum of log-likelihoods prefers the
    # short answer, the per-character normalisation the long (gold) one.
    _jsonl(d / "piqa/valid.jsonl", [{"goal": "How do you light a lamp?", "sol1": "Pour oil in it and light the wick.",
                                     "sol2": "Pour water on it."},
                                    {"goal": "Where did the king go up?", "sol1": "a", "sol2": "wherefore Jerusalem"}])
    (d / "piqa/valid-labels.lst").write_text("0\n1\n")
    _jsonl(d / "hellaswag/hellaswag_val.jsonl", [
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
         "ctx_b": "then", "ctx": "...", "endings": [", the man continues removing the snow on his car.",
                                                    ", the man puts on a christmas coat, knitted with netting.",
                                                    ", the man stands up.", ", the man drives away."],
         "source_id": "x", "split": "val", "split_type": "indomain", "label": 3},
        {"ind": 5, "activity_label": "Home and Garden", "ctx_a": "[header] How to plant a tree [title] Dig a hole.",
         "ctx_b": "", "endings": ["[step] Put the tree in it.", "Fly away.", "Eat the tree.", "Sing."],
         "split": "val", "label": "0"}])
    _jsonl(d / "arc_easy/ARC-Easy-Test.jsonl", [
        {"id": "q1", "question": {"stem": "Which gives light by day?", "choices": [
            {"text": "the sun", "label": "A"}, {"text": "the moon", "label": "B"}, {"text": "a stone", "label": "C"}]},
         "answerKey": "A"},
        {"id": "q2", "question": {"stem": "What covers the deep?", "choices": [
            {"text": "darkness", "label": "1"}, {"text": "grass", "label": "2"}, {"text": "fire", "label": "3"},
            {"text": "sand", "label": "4"}]}, "answerKey": "1"}])
    _cbt(d / "cbt/cbtest_CN_test_2500ex.txt", CN_QUERY, "queen", CN_CANDS)
    _cbt(d / "cbt/cbtest_NE_test_2500ex.txt", NE_QUERY, "Mole", NE_CANDS)
    return d


# What each task asks the model, written out by hand from the files above and lm-evaluation-harness's prompts
# (lambada_openai, piqa, hellaswag with its WikiHow clean-up, arc_easy, blimp) and GPT-2's CBT method: per task
# a list of (context, [scored continuations], [choices as lm-eval measures their length], gold). LAMBADA: the
# continuation is the target and gold is None.
def _mc(context, choices, gold, delimiter=" "):
    return context, [delimiter + c for c in choices], choices, gold


HS_ENDINGS = [", the man continues removing the snow on his car.",
              ", the man puts on a christmas coat, knitted with netting.",
              ", the man stands up.", ", the man drives away."]
EXPECTED_PROMPTS = {
    "lambada": [("And God said, Let there be light: and there was", [" light"], None, None),
                ("In the beginning God created the heaven and the", [" earth"], None, None),
                ("and the evening and the morning were the first", [" day"], None, None)],
    "piqa": [_mc("Question: How do you light a lamp?\nAnswer:",
                 ["Pour oil in it and light the wick.", "Pour water on it."], 0),
             _mc("Question: Where did the king go up?\nAnswer:", ["a", "wherefore Jerusalem"], 1)],
    "hellaswag": [_mc("Removing ice from car: Then, the man writes over the snow. Then", HS_ENDINGS, 3),
                  _mc("Home and Garden: How to plant a tree. Dig a hole.",
                      [" Put the tree in it.", "Fly away.", "Eat the tree.", "Sing."], 0)],
    "arc_easy": [_mc("Question: Which gives light by day?\nAnswer:", ["the sun", "the moon", "a stone"], 0),
                 _mc("Question: What covers the deep?\nAnswer:", ["darkness", "grass", "fire", "sand"], 0)],
    # the choices carry their separator (an empty target delimiter): a blank glued to a token ("``XXXXX") gets none
    "cbt_cn": 2 * [_mc(" ".join(STORY) + " `` Now , said the", [f" {c} , we go home . ''" for c in CN_CANDS], 2, "")],
    "cbt_ne": 2 * [_mc(" ".join(STORY), [f" {c} went down to the river ." for c in NE_CANDS], 0, "")],
    "blimp_anaphor_number_agreement": [
        _mc("", ["The men saw themselves.", "The men saw himself."], 0),
        _mc("", ["The king blessed himself.", "The king blessed themselves."], 0),
        _mc("", ["The women hid themselves.", "The women hid herself."], 0)],
    "blimp_determiner_noun_agreement_1": [_mc("", ["These sons went up.", "This sons went up."], 0),
                                          _mc("", ["That day was good.", "Those day was good."], 0)],
}


def _harness_tasks(built) -> dict:
    """lm-eval task name -> lm-eval Task of a wider.eval.tasks.build result."""
    return {t.task_name: t for t in (built.paradigms.values() if built.paradigms else [built.harness])}


def test_task_files_become_lm_eval_tasks_with_lm_evals_prompts(task_dir, caplog):
    """Each public file format read into lm-eval's own task definitions: the requests lm-eval builds from our files
    are the prompts written out by hand above, the prompt templates are the shipped YAMLs' own, and lm-eval has
    nothing to warn about."""
    import logging

    from wider.eval import tasks as T

    with caplog.at_level(logging.WARNING):
        built = {n: T.build(n, T.task_path(n, str(task_dir), {})) for n in T.TASKS}
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")] == []
    for name, b in built.items():
        for task_name, task in _harness_tasks(b).items():
            task.build_all_requests(limit=None)
            got = {}
            for inst in task.instances:
                ctx, cont = inst.args
                got.setdefault(inst.doc_id, (ctx, []))[1].append(cont)
            want = EXPECTED_PROMPTS[task_name]
            assert [got[i] for i in sorted(got)] == [(c, x) for c, x, _, _ in want], task_name
            if want[0][3] is not None:
                docs = list(task.eval_docs)
                assert [task.doc_to_choice(d) for d in docs] == [ch for _, _, ch, _ in want], task_name
                assert [task.doc_to_target(d) for d in docs] == [g for _, _, _, g in want], task_name
    assert built["piqa"].harness.config.doc_to_text == "Question: {{goal}}\nAnswer:"  # piqa.yaml's template
    assert built["hellaswag"].harness.config.process_docs.__module__ == "lm_eval.tasks.hellaswag.utils"
    assert built["lambada"].harness.config.metric_list[0]["aggregation"] == "perplexity"
    assert set(built["blimp"].paradigms) == {"anaphor_number_agreement", "determiner_noun_agreement_1"}
    assert built["blimp"].harness.name == "blimp" and not built["lambada"].paradigms

    # a blank glued to the token before it ("``XXXXX", as CBT's tokenized text has some): no space before the option
    glued = {"sentences": ["One ."], "question": "``XXXXX , he said .", "answer": "Mole", "options": ["Mole", "Toad"]}
    cbt = built["cbt_cn"].harness
    assert (cbt.doc_to_text(glued), cbt.doc_to_choice(glued)) == ("One . ``", ["Mole , he said .", "Toad , he said ."])

    # --limit: the first N examples of each file, of each BLiMP paradigm
    limited = T.build("blimp", str(task_dir / "blimp"), limit=1)
    assert [len(t.eval_docs) for t in limited.paradigms.values()] == [1, 1]
    assert len(T.build("cbt_ne", str(task_dir / "cbt/cbtest_NE_test_2500ex.txt"), limit=1).harness.eval_docs) == 1
    assert T.resolve_names("cbt,lambada_openai,piqa,cbt_cn") == ["cbt_cn", "cbt_ne", "lambada", "piqa"]
    with pytest.raises(T.EvalError, match="unknown task 'wino'"):
        T.resolve_names("wino")


def test_task_file_errors_name_the_file_the_problem_and_the_fix(task_dir, tmp_path):
    from wider.eval import tasks as T

    with pytest.raises(T.EvalError) as e:
        T.task_path("hellaswag", str(tmp_path), {})
    msg = str(e.value)
    assert str(tmp_path / "hellaswag" / "hellaswag_val.jsonl") in msg and "github.com/rowanz/hellaswag" in msg
    assert "--task-file hellaswag=PATH" in msg
    with pytest.raises(T.EvalError, match="no file given; pass --task-dir"):
        T.task_path("lambada", None, {})
    (tmp_path / "piqa").mkdir()
    _jsonl(tmp_path / "piqa" / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    with pytest.raises(T.EvalError, match="PIQA labels file .*valid-labels.lst' does not exist"):
        T.build("piqa", str(tmp_path / "piqa" / "valid.jsonl"))
    bad = tmp_path / "bad_arc.jsonl"
    _jsonl(bad, [{"question": {"stem": "x", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "E"}])
    with pytest.raises(T.EvalError, match=r"bad_arc.jsonl:1: answerKey 'E' is none of the choice labels \['A'\]"):
        T.build("arc_easy", str(bad))
    damaged = tmp_path / "lambada.jsonl"
    damaged.write_text('{"text": "a b c"}\n{"text": "a b\n')
    with pytest.raises(T.EvalError, match=r"lambada.jsonl:2: invalid JSON .*not JSONL"):
        T.build("lambada", str(damaged))
    _jsonl(damaged, [{"passage": "a b c"}])
    with pytest.raises(T.EvalError, match=r"lambada.jsonl:1: no key 'text' \(the line has \['passage'\]\)"):
        T.build("lambada", str(damaged))
    cbt = tmp_path / "cbt.txt"
    cbt.write_text("1 One .\n3 Three .\n")
    with pytest.raises(T.EvalError, match=r"cbt.txt:2: line number 3 out of order \(expected 2\)"):
        T.build("cbt_cn", str(cbt))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(T.EvalError, match=r"task hellaswag: .*empty.jsonl holds no example"):
        T.build("hellaswag", str(tmp_path / "empty.jsonl"))
    (tmp_path / "blimp").mkdir()
    with pytest.raises(T.EvalError, match="holds no .jsonl paradigm file"):
        T.build("blimp", str(tmp_path / "blimp"))


# --- end to end: a trained run, its checkpoint, an exported release, the command line, lm-eval ---------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_args):
    """A tiny Switch MoE (2 blocks, the second with 8 top-1 experts) trained for 6 steps on 2 CPU ranks with
    expert parallelism 2 (each rank holds 4 experts). Its eval capacity factor 1.0 drops assignments (about 40%
    at this stage), so reproducing its evaluation needs the same capacity and the same micro-batches on each of
    the 2 data-parallel ranks. The final evaluation covers 2 global batches (16 x 64 tokens)."""
    d = tmp_path_factory.mktemp("evalrun") / "run"
    p = run_recipe([*TINY, *data_args, "--preset", "switch_smoke", "--train-iters", "6", "--run-dir", str(d),
                    "--ds-set", "moe.eval_capacity_factor=1.0", "moe.ep_size=2"], ranks=2,
                   recipe="recipes/pretrain_gpt_moe.py")
    assert p.returncode == 0, explain(p)
    return d


@pytest.fixture(scope="module")
def loaded(run_dir, single_rank):
    from wider.checkpoint import load_for_inference

    return load_for_inference(str(run_dir))


def _summary(run_dir) -> dict:
    with open(run_dir / "summary.json") as f:
        return json.load(f)


def _evaluate(argv) -> tuple[int, str]:
    """recipes/evaluate.py in this process (its main() is argparse + wider.eval.run)."""
    import importlib.util
    import io
    from contextlib import redirect_stderr

    spec = importlib.util.spec_from_file_location("evaluate_recipe", REPO / "recipes" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    err = io.StringIO()
    with redirect_stderr(err):
        rc = mod.main(argv)
    return rc, err.getvalue()


def test_validation_split_reproduces_the_runs_final_evaluation(loaded, run_dir):
    from wider.eval import perplexity as P
    from wider.eval.run import make_scorer

    s = _summary(run_dir)
    scorer = make_scorer(loaded, torch.device("cpu"), None, progress=False)
    assert P.run_data_parallel(loaded.source) == 2 and loaded.moe.ep_size == 1
    res = P.score_validation(scorer, str(run_dir.parent / ".index_cache"), 2)
    assert res.tokens == s["valid_tokens"] == 2 * 8 * 64
    assert abs(res.loss - s["final_valid_loss"]) < 1e-5, (res.loss, s["final_valid_loss"])
    assert loaded.step == s["steps"] == 6
    # The capacity is what makes it match: the same samples in other micro-batches (one rank's split), or
    # dropless, score otherwise.
    regrouped = P.score_validation(scorer, str(run_dir.parent / ".index_cache"), 1)
    assert abs(regrouped.loss - s["final_valid_loss"]) > 2e-5
    rc, err = _evaluate(["perplexity", "--checkpoint", str(run_dir), "--dropless", "--no-progress",
                         "--output-dir", str(run_dir.parent / "dropless")])
    assert rc == 0, err
    with open(run_dir.parent / "dropless" / "eval" / "ppl_valid.json") as f:
        dropless = json.load(f)
    assert dropless["settings"]["moe"] == "dropless" and abs(dropless["results"]["loss"] - s["final_valid_loss"]) > 2e-5


def test_exported_model_perplexity_equals_the_checkpoints_evaluation(run_dir, tmp_path, single_rank):
    """recipes/export.py's export makes a release; loaded with wider.from_pretrained, and through recipes/evaluate.py, its
    validation-split loss is the run's final validation loss within 1e-5 (fp32); the JSON and TensorBoard
    scalars are written into the release directory."""
    import wider
    from wider.eval import perplexity as P
    from wider.eval.run import make_scorer

    from wider.checkpoint import export

    release = tmp_path / "release"
    export(str(run_dir), str(release), progress=False, log=lambda *_: None)  # what recipes/export.py calls
    s = _summary(run_dir)
    rc, err = _evaluate(["perplexity", "--checkpoint", str(release), "--no-progress", "--dtype", "fp32"])
    assert rc == 0, err
    with open(release / "eval" / "ppl_valid.json") as f:
        out = json.load(f)
    assert abs(out["results"]["loss"] - s["final_valid_loss"]) < 1e-5
    assert out["results"]["tokens"] == s["valid_tokens"] and out["step"] == 6
    assert out["results"]["ppl"] == pytest.approx(math.exp(out["results"]["loss"]))
    exported = wider.from_pretrained(str(release))
    scorer = make_scorer(exported, torch.device("cpu"), None, progress=False)
    assert P.run_data_parallel(exported.source) == 2  # the release records the layout it was trained with
    res = P.score_validation(scorer, str(tmp_path / ".index_cache"), 2)
    assert abs(res.loss - s["final_valid_loss"]) < 1e-5 and exported.step == 6
    scalars = _tb_scalars(release / "tensorboard")
    assert scalars["eval/ppl_valid/loss"] == [(6, pytest.approx(out["results"]["loss"], abs=1e-6))]


def _tb_scalars(tb_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mean_stderr(xs) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    n, mu = len(xs), float(np.mean(xs))
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def _reference_metrics(scorer, names) -> dict:
    """Each task's metrics from the hand-written prompts (EXPECTED_PROMPTS) and the metrics' definitions written
    out here, with log-likelihoods from `scorer`: acc = the highest log-likelihood is gold's (the first of equal
    maxima), acc_norm = the same per character of the choice; LAMBADA: acc = greedy, ppl = exp(-mean ll)."""
    out = {}
    for name in names:
        items = EXPECTED_PROMPTS[name]
        res = [scorer.loglikelihood_text([(ctx, c) for c in conts]) for ctx, conts, _, _ in items]
        if name == "lambada":
            lls = [r[0][0] for r in res]
            out[name] = {"acc": _mean_stderr([float(r[0][1]) for r in res]), "ppl": math.exp(-np.mean(lls)), "lls": lls}
            continue
        hits, hits_norm = [], []
        for (_, _, choices, gold), r in zip(items, res):
            lls = [ll for ll, _, _ in r]
            hits.append(float(np.argmax(lls) == gold))
            hits_norm.append(float(np.argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold))
        out[name] = {"hits": hits, "acc": _mean_stderr(hits), "acc_norm": _mean_stderr(hits_norm)}
    return out


def test_command_line_tasks_equal_references_and_write_json_and_tensorboard(run_dir, task_dir, tmp_path):
    """recipes/evaluate.py tasks runs the six tasks through lm-eval's evaluator with the `wider` model (dropless,
    so that how requests are batched cannot matter): every metric and standard error equals the reference from the
    hand-written prompts; JSON and TensorBoard scalars are written; --limit, a missing and a damaged file."""
    from lm_eval.api.metrics import bootstrap_stderr, perplexity

    from wider.checkpoint import load_for_inference
    from wider.eval import tasks as T
    from wider.eval.run import make_scorer
    from wider.moe.config import MoEConfig
    from wider.moe.layer import configure

    out = tmp_path / "out"
    rc, err = _evaluate(["tasks", "--checkpoint", str(run_dir), "--tasks", "all", "--task-dir", str(task_dir),
                         "--no-progress", "--output-dir", str(out), "--batch-size", "3", "--dropless"])
    assert rc == 0, err
    ref = load_for_inference(str(run_dir))
    configure(ref.model, MoEConfig.dropless)
    want = _reference_metrics(make_scorer(ref, torch.device("cpu"), 1, progress=False), EXPECTED_PROMPTS)
    scalars = _tb_scalars(out / "tensorboard")
    got = {}
    for name in T.TASKS:
        with open(out / "eval" / f"{name}.json") as f:
            rec = json.load(f)
        assert rec["step"] == 6 and rec["kind"] == "task" and rec["settings"]["batch_size"] == 3
        assert rec["settings"]["moe"] == "dropless" and rec["settings"]["lm_eval"] == "0.4.13"
        got[name] = rec["results"]
        assert scalars[f"eval/{name}/acc"] == [(6, pytest.approx(rec["results"]["acc"]))]
    for name in ("piqa", "hellaswag", "arc_easy", "cbt_cn", "cbt_ne"):
        metrics = ("acc", "acc_norm") if name in ("piqa", "hellaswag", "arc_easy") else ("acc",)
        assert got[name]["n"] == len(EXPECTED_PROMPTS[name]) and set(got[name]) == \
            {"n", "truncated_requests", *metrics, *(m + "_stderr" for m in metrics)}
        for m in metrics:
            assert (got[name][m], got[name][m + "_stderr"]) == pytest.approx(want[name][m]), (name, m)
    assert want["piqa"]["acc"] != want["piqa"]["acc_norm"]  # the per-character normalisation decides an item

    lam = got["lambada"]
    assert (lam["acc"], lam["acc_stderr"]) == pytest.approx(want["lambada"]["acc"])
    assert lam["ppl"] == pytest.approx(want["lambada"]["ppl"], rel=1e-5)
    assert lam["ppl_stderr"] == pytest.approx(bootstrap_stderr(perplexity, want["lambada"]["lls"], 100000), rel=1e-3)

    blimp, paradigms = got["blimp"], ("anaphor_number_agreement", "determiner_noun_agreement_1")
    per = [want[f"blimp_{p}"] for p in paradigms]
    for p, w in zip(paradigms, per):
        assert blimp["paradigms"][p]["n"] == len(w["hits"])
        assert (blimp["paradigms"][p]["acc"], blimp["paradigms"][p]["acc_stderr"]) == pytest.approx(w["acc"])
    sizes, hits = [len(w["hits"]) for w in per], [h for w in per for h in w["hits"]]
    # overall: every pair counts once; the standard error from the pooled within-paradigm variance
    pooled = sum((n - 1) * n * w["acc"][1] ** 2 for n, w in zip(sizes, per)) / (sum(sizes) - len(sizes))
    assert blimp["n"] == 5 and blimp["acc"] == pytest.approx(np.mean(hits))
    assert blimp["acc_stderr"] == pytest.approx(math.sqrt(pooled / sum(sizes)))
    # lm-eval's own blimp score: the unweighted mean of the paradigms
    assert blimp["acc_macro"] == pytest.approx(np.mean([w["acc"][0] for w in per]))
    assert blimp["acc_macro_stderr"] == pytest.approx(math.sqrt(sum(w["acc"][1] ** 2 for w in per)) / len(per))
    assert "eval/piqa/acc_norm" in scalars and "eval/lambada/ppl" in scalars and "eval/blimp/acc_macro" in scalars
    assert "eval/blimp/paradigms/anaphor_number_agreement/acc" in scalars

    rc, err = _evaluate(["tasks", "--checkpoint", str(run_dir), "--tasks", "blimp,cbt_ne", "--task-dir", str(task_dir),
                         "--limit", "1", "--no-progress", "--output-dir", str(tmp_path / "limit"), "--dropless"])
    assert rc == 0, err
    with open(tmp_path / "limit" / "eval" / "blimp.json") as f:
        limited = json.load(f)["results"]
    assert limited["n"] == 2 and [r["n"] for r in limited["paradigms"].values()] == [1, 1]
    assert limited["paradigms"]["anaphor_number_agreement"]["acc_stderr"] is None  # lm-eval's "N/A" for one item

    rc, err = _evaluate(["tasks", "--checkpoint", str(run_dir), "--tasks", "lambada,arc_easy",
                         "--task-dir", str(tmp_path / "nowhere"), "--no-write"])
    assert rc == 2 and str(tmp_path / "nowhere" / "lambada" / "lambada_test.jsonl") in err
    assert "openaipublic" in err and "nothing is downloaded" in err
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text('{"question": {"stem": "x", "choices": []}, "answerKey": "A"}\n')
    # files are read before the checkpoint is loaded: the file's error, though the checkpoint does not exist either
    rc, err = _evaluate(["tasks", "--checkpoint", str(tmp_path / "missing"), "--tasks", "arc_easy",
                         "--task-file", f"arc_easy={damaged}", "--no-write"])
    assert rc == 2 and [line for line in err.splitlines() if line.startswith("error:")] == \
        [f"error: {damaged}:1: answerKey 'A' is none of the choice labels []"]
    rc, err = _evaluate(["perplexity", "--checkpoint", str(tmp_path / "missing"), "--no-write"])
    assert rc == 2 and "does not exist" in err
    rc, err = _evaluate(["perplexity", "--checkpoint", str(run_dir), "--stride", "8", "--no-write"])
    assert rc == 2 and "--stride applies to --text / --data-path" in err


def test_command_line_text_perplexity(run_dir, loaded, tmp_path):
    from wider.eval import perplexity as P
    from wider.eval.run import make_scorer

    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(_docs()) + "\n")
    out = tmp_path / "out"
    rc, err = _evaluate(["perplexity", "--checkpoint", str(run_dir), "--text", str(text), "--text-mode", "paragraph",
                         "--stride", "16", "--no-progress", "--output-dir", str(out)])
    assert rc == 0, err
    with open(out / "eval" / "ppl_held_out.json") as f:
        rec = json.load(f)
    want = P.score_text(make_scorer(loaded, torch.device("cpu"), None, progress=False), [str(text)],
                        text_mode="paragraph", stride=16)
    assert rec["results"]["documents"] == 4 and rec["settings"]["stride"] == 16
    assert rec["results"]["loss"] == pytest.approx(want.loss, abs=1e-6)
    assert rec["results"]["bits_per_byte"] == pytest.approx(want.bits_per_byte, abs=1e-6)
    assert _tb_scalars(out / "tensorboard")["eval/ppl_held_out/bits_per_byte"][0][0] == 6


LM_TASKS = {
    "wider_piqa_local.yaml": """task: wider_piqa_local
dataset_path: json
dataset_kwargs:
  cache_dir: {cache}
  data_files:
    test: {dir}/piqa_local.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "wider_gen_local.yaml": """task: wider_gen_local
dataset_path: json
dataset_kwargs:
  cache_dir: {cache}
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "wider_rolling_local.yaml": """task: wider_rolling_local
dataset_path: json
dataset_kwargs:
  cache_dir: {cache}
  data_files:
    test: {dir}/text.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""}


def test_lm_eval_harness_runs_local_tasks_end_to_end(run_dir, task_dir, tmp_path, monkeypatch, single_rank):
    """lm-eval's evaluator with `--model wider` (looked up in its registry, built from a model_args string): a
    multiple-choice task with PIQA's prompt equals the reference from the hand-written prompts, generate_until equals
    greedy decoding cut at the stop strings, loglikelihood_rolling's bits per byte equals the scorer's. Local YAML
    and data files only, nothing downloaded. (In this process: lm_eval's CLI would first index its ~10k built-in
    task files, 15 s here; `python -m wider.eval.harness` is register() + that CLI.)"""
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from wider.checkpoint import load_for_inference
    from wider.eval import harness
    from wider.eval.run import make_scorer
    from wider.generation import SamplingParams, generate
    from wider.moe.config import MoEConfig
    from wider.moe.layer import configure

    d = tmp_path / "lm"
    d.mkdir()
    labels = (task_dir / "piqa" / "valid-labels.lst").read_text().split()
    with open(task_dir / "piqa" / "valid.jsonl") as f, open(d / "piqa_local.jsonl", "w") as g:
        for line, label in zip(f, labels):
            g.write(json.dumps({**json.loads(line), "label": int(label)}) + "\n")
    prompts = ["And God said, Let there be", "In the beginning God created"]
    _jsonl(d / "gen.jsonl", [{"prompt": p, "answer": " light"} for p in prompts])
    texts = _docs()[:2]
    _jsonl(d / "text.jsonl", [{"text": t} for t in texts])
    for name, body in LM_TASKS.items():
        (d / name).write_text(body.format(dir=d, cache=tmp_path / "hf_cache"))

    harness.register()
    out = lm_eval.simple_evaluate(
        model="wider", model_args=f"checkpoint={run_dir},dtype=fp32,dropless=true,batch_size=2,device=cpu",
        tasks=["wider_piqa_local", "wider_gen_local", "wider_rolling_local"], log_samples=True,
        task_manager=TaskManager(include_path=str(d), include_defaults=False))
    results = out["results"]

    # References: the same checkpoint, dropless (so that lm-eval's batching of requests cannot matter).
    ref = load_for_inference(str(run_dir))
    configure(ref.model, MoEConfig.dropless)
    scorer = make_scorer(ref, torch.device("cpu"), 2, progress=False)
    want = _reference_metrics(scorer, ["piqa"])["piqa"]
    assert results["wider_piqa_local"]["acc,none"] == pytest.approx(want["acc"][0])
    assert results["wider_piqa_local"]["acc_norm,none"] == pytest.approx(want["acc_norm"][0])
    assert want["acc"] != want["acc_norm"]

    got = {s["doc"]["prompt"]: s["resps"][0][0] for s in out["samples"]["wider_gen_local"]}
    tok = ref.tokenizer
    for prompt in prompts:
        g = generate(ref.model, [tok.eod, *tok.tokenize(prompt)], SamplingParams(max_new_tokens=6, temperature=0),
                     max_length=ref.config.model.seq_length, use_cache=False, eod=tok.eod, vocab_size=tok.vocab_size)
        text = tok.detokenize(g.tokens[0])
        for stop in ("\n", "."):
            text = text.split(stop, 1)[0]
        assert got[prompt] == text

    nll = scorer.stream_nll([np.asarray([tok.eod, *tok.tokenize(t)]) for t in texts], apply_loss_mask=False)
    bpb = sum(x for x, _ in nll) / math.log(2) / sum(len(t.encode()) for t in texts)
    assert results["wider_rolling_local"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-5)


def test_lm_eval_hook_registers_wider_after_lm_evals_own_models(tmp_path):
    """The .pth hook (what ./run.sh installs into .venv): in a fresh interpreter, started outside the repository,
    `--model wider` resolves to WiderLM and lm-eval's own models are still registered. The line names the installed
    package, not a path to a checkout's files."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    p = subprocess.run([PY, "-m", "wider.eval.lm_eval_hook", "install", str(site_dir)], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path, env=child_env())
    assert p.returncode == 0, explain(p)
    line = (site_dir / "wider_lm_eval.pth").read_text()
    assert "/" not in line and "wider.eval.lm_eval_hook" in line
    # python -S: no site-packages .pth runs at start-up (.venv holds the installed hook and the editable install's
    # finder): the venv's packages go on sys.path by hand, wider through PYTHONPATH, and only the test's site
    # directory is processed as a site dir.
    import sysconfig

    code = ("import sys; sys.path.append(sys.argv[2]); import site; "
            "assert 'wider' not in sys.modules; site.addsitedir(sys.argv[1]); "
            "assert 'lm_eval.models' not in sys.modules and 'wider.eval.lm_eval_hook' in sys.modules; "
            "from lm_eval.api.registry import get_model, model_registry; cls = get_model('wider'); "
            "print(cls.__module__, cls.__name__, 'hf' in model_registry, 'dummy' in model_registry)")
    env = child_env(PYTHONPATH=str(REPO))
    p = subprocess.run([PY, "-S", "-c", code, str(site_dir), sysconfig.get_paths()["purelib"]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, explain(p)
    assert p.stdout.split() == ["wider.eval.harness", "WiderLM", "True", "True"]
