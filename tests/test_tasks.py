"""The encoder tasks (DESIGN 5.8), in this process: WideNet's sharing reused by the text encoder and the ViT (parameter
identity), the bidirectional mask, the counts against the paper's table, the masked-LM data (megatron-core's BERT
dataset: masking statistics, whole words, sentence order) on the embedded corpus, the classification files and GLUE's
metrics against hand-computed values, the image pipeline on real files, and bad inputs refused by the pre-flight with
one message and nothing written."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO

PAPER_COUNTS = {"albert_base": 12e6, "bert_base": 89e6, "widenet_mlm_4e": 26e6, "widenet_mlm_8e": 45e6,
                "widenet_mlm_16e": 83e6, "widenet_vit_b16": 29e6, "widenet_vit_l16": 40e6, "widenet_vit_h16": 63e6,
                "vit_b16": 87e6, "vit_moe_b16": 128e6}


@pytest.fixture(scope="session")
def embedded_mlm():
    """The masked-LM corpus, its tokenizer and the verse-source task (cache/embedded_mlm, shared with ./run.sh)."""
    from data_prep.embedded_tasks import prepare_mlm

    return prepare_mlm(out_dir=str(REPO / "cache" / "embedded_mlm"), quiet=True)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as an image folder (cache/embedded_digits, shared with ./run.sh)."""
    from data_prep.embedded_tasks import prepare_digits

    return prepare_digits(out_dir=str(REPO / "cache" / "embedded_digits"), quiet=True)


def _cfg(name: str, **model):
    from wider import presets
    from wider.models import validate

    cfg = presets.get(name)
    cfg.model.__dict__.update(model)
    return validate(cfg)


def _tiny(name: str, **model):
    shape = dict(num_layers=3, hidden_size=32, num_attention_heads=4, moe_ffn_hidden_size=64, router_noise="none")
    if "mlm" in name or "finetune" in name:
        shape.update(seq_length=16, embedding_size=16, vocab_size=200)
    return _cfg(name, **{**shape, **model})


def _build(cfg, vocab: int = 200):
    from wider import parallel
    from wider.models import ARCHITECTURES
    from wider.moe.config import MoERuntime
    from wider.moe.settings import MoESettings

    parallel.set_seed(5)
    settings = MoESettings(capacity_factor=None, eval_capacity_factor=None)  # dropless: no token changes another's
    runtime = MoERuntime(settings) if cfg.model.num_experts else None
    return ARCHITECTURES[cfg.model.arch].build(cfg, vocab, False, runtime)


# --- WideNet's sharing, reused --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["widenet_mlm_smoke", "widenet_vit_smoke", "albert"])
def test_shared_blocks_hold_one_attention_one_moe_and_a_norm_pair_per_block(single_rank, name):
    """By parameter identity: every block's attention and MLP are the block stack's one shared module (the same
    tensors), each block has its own LayerNorm pair (2N distinct tensors of each kind) unless ALBERT shares them, and
    the model holds every shared tensor once; the counter agrees with the built model."""
    from wider.info import describe

    albert = name == "albert"
    cfg = _tiny("widenet_mlm_smoke", num_experts=0, share_norms=True) if albert else _tiny(name)
    model = _build(cfg)
    stack = model.encoder
    layers = list(stack.layers)
    shared_attn = {id(p) for p in stack.shared_attention.parameters()}
    shared_mlp = {id(p) for p in (stack.shared_mlp if albert else stack.shared_moe).parameters()}
    assert shared_attn and shared_mlp
    for layer in layers:
        assert {id(p) for p in layer.self_attention.parameters()} == shared_attn
        assert {id(p) for p in layer.mlp.parameters()} == shared_mlp
    norms = [{id(p) for p in norm.parameters()} for layer in layers
             for norm in (layer.input_layernorm, layer.pre_mlp_layernorm)]
    distinct = set().union(*norms)
    assert len(distinct) == (2 if albert else 2 * len(layers)) * 2  # weight and bias of each LayerNorm
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids)) and shared_attn <= set(ids) and distinct <= set(ids)
    assert sum(p.numel() for p in model.parameters()) == describe(cfg)["params_total"]
    if not albert:  # the one MoE reports once per block call
        from wider.moe import stats

        stats.clear(model)
        _forward(model, cfg).float().sum().backward()
        _, records = stats.take(model)
        assert [label for label, _ in records] == [f"block{i:02d}" for i in range(len(layers))]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.shared_attention.parameters())


def _forward(model, cfg):
    B, S = 2, cfg.model.seq_length
    if cfg.model.task == "image_classification":
        return model(torch.rand(B, cfg.model.num_channels, cfg.model.image_size, cfg.model.image_size))
    tokens = torch.randint(5, 200, (B, S), generator=torch.Generator().manual_seed(1))
    predict = torch.zeros(B, S, dtype=torch.bool)
    predict[:, 2] = True
    out = model(tokens, torch.zeros_like(tokens), torch.ones_like(tokens), predict)
    return out[0].sum() + out[1].sum() if isinstance(out, tuple) else out


def test_encoder_attends_both_ways_and_hides_padding(single_rank):
    """A token's final state changes when a LATER token changes (bidirectional), not when a padded position's token
    changes (padding is masked as a key); the causal LM of the same blocks is unchanged by the later token."""
    cfg = _tiny("widenet_mlm_smoke", num_layers=2)
    model = _build(cfg).eval()
    S = cfg.model.seq_length
    tokens = torch.randint(5, 200, (1, S), generator=torch.Generator().manual_seed(2))
    types, padding = torch.zeros_like(tokens), torch.ones_like(tokens)
    padding[0, 12:] = 0
    with torch.no_grad():
        base = model.encode(tokens, types, padding)[:, 0]
        later = tokens.clone()
        later[0, 9] = (later[0, 9] + 1) % 200
        changed = model.encode(later, types, padding)[:, 0]
        padded = tokens.clone()
        padded[0, 14] = (padded[0, 14] + 7) % 200
        same = model.encode(padded, types, padding)[:, 0]
    # Positions 0..8 see position 9; real positions never see the padding (to float rounding: the padded token's
    # routing regroups the experts' GEMM rows).
    assert (changed[:9] - base[:9]).abs().max() > 1e-3
    torch.testing.assert_close(same[:12], base[:12], rtol=0, atol=1e-6)

    from wider import presets
    from wider.models import validate

    lm_cfg = validate(presets.replace(presets.get("widenet_smoke"), model=dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, moe_ffn_hidden_size=64, router_noise="none",
        seq_length=S, vocab_size=200)))
    lm = _build(lm_cfg).eval()
    pos = torch.arange(S)[None]
    with torch.no_grad():
        a, b = lm(tokens, pos, None), lm(later, pos, None)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)


# --- counts -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_preset_counts_are_the_papers_and_equal_the_meta_built_model(single_rank, name):
    """Within 6% of the WideNet paper's table (ALBERT 12M, BERT 89M, WideNet NLP 4 / 8 / 16 experts 26M / 45M / 83M;
    ViT-B 87M, ViT-MoE-B 128M, WideNet-B / L / H 29M / 40M / 63M), and the closed form equals the model built on the
    meta device at full size."""
    from wider.info import describe
    from wider.models import ARCHITECTURES
    from wider.moe.config import MoERuntime
    from wider.moe.settings import MoESettings

    cfg = _cfg(name)
    total = describe(cfg)["params_total"]
    assert abs(total / PAPER_COUNTS[name] - 1) < 0.06, (name, total)
    vocab = cfg.model.vocab_size or 0
    with torch.device("meta"):
        model = ARCHITECTURES[cfg.model.arch].build(cfg, vocab, False,
                                                    MoERuntime(MoESettings()) if cfg.model.num_experts else None)
    assert sum(p.numel() for p in model.parameters()) == ARCHITECTURES[cfg.model.arch].count(cfg, vocab).total


# --- masked-LM data --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlm_samples(single_rank, embedded_mlm, tmp_path_factory):
    """400 training samples of megatron-core's BERT dataset over the embedded sentences, seq 128, no short samples."""
    from wider.data import SentencePieceTokenizer
    from wider.tasks.registry import task_of

    cfg = _cfg("widenet_mlm_smoke", seq_length=128)
    cfg.data.short_sequence_probability = 0.0
    cfg.data.masking_probability = 0.15  # BERT's (the smoke preset predicts 30%)
    tok = SentencePieceTokenizer(embedded_mlm["tokenizer"])
    splits = task_of(cfg).build_data(tok, 400, 8, str(tmp_path_factory.mktemp("mlm_index")))
    return cfg, tok, splits


def test_masking_statistics_follow_bert(mlm_samples):
    """15% of each sample's tokens are predicted (megatron's count: round(0.15 x tokens), [CLS] / [SEP] never);
    of the predicted positions about 80% show [MASK], 10% a random token, 10% themselves; whole words (a piece
    that continues a word is predicted only with the piece before it); padding is never predicted."""
    from wider.tasks.masked_lm import MaskingTokenizer

    cfg, tok, splits = mlm_samples
    special = MaskingTokenizer(tok)
    predicted = masked = kept = tokens_seen = 0
    for i in range(400):
        s = splits.train[i]
        real = int(s["padding_mask"].sum())
        tokens_seen += real
        where = s["loss_mask"].bool()
        n = int(where.sum())
        assert 1 <= n <= max(1, round(0.15 * real)) and not where[real:].any()
        tokens, labels = s["tokens"], s["labels"]
        assert not np.isin(labels[where].numpy(), [special.cls, special.sep]).any()
        assert set(s["types"][real:].tolist()) <= {0} and set(s["types"][:real].tolist()) <= {0, 1}
        original = torch.where(where, labels, tokens)
        for j in torch.nonzero(where).flatten().tolist():  # whole words (a segment cut mid-word starts with a piece)
            if special.inv_vocab[int(labels[j])].startswith("##") and int(original[j - 1]) not in (special.cls,
                                                                                                  special.sep):
                assert where[j - 1], (i, j)
        predicted += n
        masked += int((tokens[where] == special.mask).sum())
        kept += int((tokens[where] == labels[where]).sum())
    assert predicted > 4000
    share = predicted / tokens_seen
    assert 0.12 < share < 0.155, share
    p_mask, p_kept = masked / predicted, kept / predicted
    sd = math.sqrt(0.8 * 0.2 / predicted)
    assert abs(p_mask - 0.8) < 4 * sd, p_mask
    assert abs(p_kept - 0.1) < 4 * math.sqrt(0.09 / predicted) + 1e-3, p_kept  # (+ a random draw of itself)


def test_sentence_order_labels(mlm_samples):
    """Label 0: segment A (its masked tokens restored) then B are consecutive sentences of one document, in order;
    label 1: they were swapped. About half are swapped."""
    from wider.tasks.masked_lm import MaskingTokenizer

    cfg, tok, splits = mlm_samples
    special = MaskingTokenizer(tok)
    raw = splits.train.dataset  # megatron-core's own samples (it reports truncation)
    corpus = raw.dataset  # megatron's IndexedDataset of sentences
    docs = corpus.document_indices
    checked = 0
    for i in range(400):
        s, r = splits.train[i], raw[i]
        if r["truncated"]:  # cut at either end of either segment: the order shows only in whole ones
            continue
        tokens = s["tokens"].clone()
        where = s["loss_mask"].bool()
        tokens[where] = s["labels"][where]
        real = tokens[: int(s["padding_mask"].sum())].tolist()
        assert real[0] == special.cls and real[-1] == special.sep
        first_sep = real.index(special.sep)
        a, b = real[1:first_sep], real[first_sep + 1:-1]
        begin, end, _ = raw.sample_index[i]
        text = [t for k in range(begin, end) for t in corpus[k].tolist()]
        doc = np.searchsorted(docs, begin, side="right") - 1
        assert end <= docs[doc + 1]  # one document
        order = int(s["sop_label"])
        assert text == (b + a if order else a + b)
        checked += 1
    assert checked > 50
    swapped = np.mean([int(splits.train[i]["sop_label"]) for i in range(400)])
    assert 0.42 < swapped < 0.58, swapped  # 0.5 +- 3.2 standard deviations


# --- classification files and metrics --------------------------------------------------------------------------------


def _classification_cfg(tmp_path, train: str, valid: str, **data):
    from wider import presets
    from wider.models import validate

    cfg = presets.get("widenet_finetune_smoke")
    cfg.data.__dict__.update(dict(train_data=train, valid_data=valid, **data))
    return validate(cfg)


def test_glue_tsv_pairs_headerless_tsv_and_jsonl_are_read_and_encoded(tmp_path, embedded_mlm):
    """GLUE's layouts: a pair TSV with a header (RTE), a TSV without header and numbered columns (CoLA), JSONL; a `"`
    inside a TSV field is text (GLUE's processors read without quoting). Encoded as [CLS] A [SEP] B [SEP], types 0 then
    1, cut longest-first."""
    from wider.data import SentencePieceTokenizer
    from wider.tasks.classification import encode, read_examples, special_ids

    rte = tmp_path / "rte.tsv"
    rte.write_text('index\tsentence1\tsentence2\tlabel\n0\tThe "king" went up.\tHe went.\tentailment\n'
                   '1\tAnd it was so.\tNothing was.\tnot_entailment\n')
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tThe people went up.\ngj04\t0\t*\tUp went people the the.\n")
    jsonl = tmp_path / "sst.jsonl"
    jsonl.write_text('{"sentence": "a good word", "label": 1}\n{"sentence": "a bad one", "label": 0}\n')
    cfg = _classification_cfg(tmp_path, str(rte), str(rte), text_columns=["sentence1", "sentence2"],
                              labels=["entailment", "not_entailment"])
    ex = read_examples(str(rte), cfg.data)
    assert ex.texts[0] == ('The "king" went up.', "He went.") and ex.labels.tolist() == [0, 1]
    cola_cfg = _classification_cfg(tmp_path, str(cola), str(cola), text_columns=["3"], label_column="1",
                                   labels=["0", "1"], tsv_header=False, metric="mcc")
    assert read_examples(str(cola), cola_cfg.data).labels.tolist() == [1, 0]
    sst = _classification_cfg(tmp_path, str(jsonl), str(jsonl), text_columns=["sentence"], labels=["0", "1"])
    assert read_examples(str(jsonl), sst.data).texts[1] == ("a bad one", None)

    tok = SentencePieceTokenizer(embedded_mlm["tokenizer"])
    ids = special_ids(tok)
    (tokens, first), = encode(tok, ids, type(ex)(texts=[ex.texts[0]], labels=ex.labels[:1], path=""), 64)
    a, b = tok.tokenize('The "king" went up.'), tok.tokenize("He went.")
    assert tokens.tolist() == [ids["cls"], *a, ids["sep"], *b, ids["sep"]] and first == len(a) + 2
    long = type(ex)(texts=[("word " * 40, "other " * 5)], labels=ex.labels[:1], path="")
    (cut, first), = encode(tok, ids, long, 20)
    assert len(cut) == 20 and first > 20 - first  # the longer segment gave way


def test_glue_metrics_equal_hand_computed_values():
    """Accuracy, F1 of the second label and Matthews correlation from summed confusion matrices, against the
    definitions computed by hand (binary and 3-class)."""
    from wider.tasks.base import confusion_metrics, confusion_sums

    # Binary: TP 3, TN 4, FP 1, FN 2 (label 1 positive), confusion rows = true, columns = predicted.
    binary = np.array([[4, 1], [2, 3]], dtype=float)
    got = confusion_metrics(binary, binary_f1=True)
    tp, tn, fp, fn = 3, 4, 1, 2
    assert got["accuracy"] == pytest.approx(7 / 10)
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    # Three classes: Gorodkin's R_K = (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)).
    conf = np.array([[5, 1, 0], [2, 3, 1], [0, 2, 6]], dtype=float)
    s, c = conf.sum(), np.trace(conf)
    t_k, p_k = conf.sum(1), conf.sum(0)
    mcc = (c * s - (p_k * t_k).sum()) / math.sqrt((s * s - (p_k ** 2).sum()) * (s * s - (t_k ** 2).sum()))
    got = confusion_metrics(conf, binary_f1=False)
    assert got["accuracy"] == pytest.approx(14 / 20) and got["mcc"] == pytest.approx(mcc) and "f1" not in got
    # The sums a rank contributes: loss, count, the confusion of its batch.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    sums = confusion_sums(logits, torch.tensor([0, 0, 1]), torch.tensor(1.5))
    assert sums.tolist() == [1.5, 3.0, 1.0, 1.0, 1.0, 0.0]


# --- images ------------------------------------------------------------------------------------------------------------


def _folder(root, spec: dict, size=(12, 10)):
    rng = np.random.default_rng(0)
    for cls, names in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for n in names:
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / cls / n)
    return root


def test_image_pipeline_on_real_files(tmp_path):
    """JPEG and PNG files of class folders are scanned (held-out classes indexed as the training ones), decoded,
    cropped / flipped / RandAugmented / mixed up the same way for the same sample on any call, to [-1, 1] at the
    model's size; held-out samples only resized; torch's global random stream is not touched."""
    from wider.tasks.images import ImageSamples, Augment, scan, verify

    train = _folder(tmp_path / "train", {"cat": ["a.jpg", "b.png"], "dog": ["c.JPEG", "d.png", "e.png"]})
    val = _folder(tmp_path / "val", {"dog": ["f.png"]})
    folder = scan(str(train))
    held = scan(str(val), folder.classes)
    verify(folder)
    assert folder.classes == ["cat", "dog"] and folder.labels.tolist() == [0, 0, 1, 1, 1]
    assert held.labels.tolist() == [1]
    cfg = _cfg("widenet_vit_smoke", image_size=8, num_channels=3, num_labels=2)
    cfg.data.__dict__.update(randaugment_ops=2, image_flip=True, image_crop_scale=0.3, mixup_alpha=0.5)
    from wider.tasks.base import EpochCycle

    samples = ImageSamples(folder, 40, cfg, 0, EpochCycle(5, 1), Augment(cfg))
    state = torch.get_rng_state()
    a, b, c = samples[3], samples[3], samples[4]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (3, 8, 8) and a["image"].min() >= -1 and a["image"].max() <= 1
    assert a["target"].sum() == pytest.approx(1.0) and a["target"].max() >= 0.5 - 1e-6
    plain = ImageSamples(held, 1, cfg, 1)[0]
    from wider.tasks.images import load, resize

    expected = resize(load(held.files[0], 3)[None], (8, 8))[0] * 2 - 1
    torch.testing.assert_close(plain["image"], expected, rtol=0, atol=0)
    assert plain["target"].tolist() == [0.0, 1.0]


# --- bad inputs: one message, exit 2, nothing written ---------------------------------------------------------------


def _preflight(recipe: str, argv: list, capsys) -> str:
    from wider import preflight

    assert preflight.main(recipe, argv, 1) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, embedded_mlm, digits, capsys):
    """An image folder with no classes, an unreadable image, a TSV without the named columns, a label outside the label
    set, a checkpoint of another task: each is one line naming the file and the fix, exit status 2, no run directory."""
    run = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _preflight("recipes/train_vit.py", ["--train-data", str(empty), "--run-dir", str(run)], capsys)
    assert "holds no class subfolder" in err and str(empty) in err

    broken = _folder(tmp_path / "broken", {"0": ["ok.png"], "1": ["ok.png"]})
    (broken / "1" / "bad.png").write_bytes(b"not an image at all")
    err = _preflight("recipes/train_vit.py", ["--train-data", str(broken), "--valid-data", str(broken),
                                              "--num-labels", "2", "--run-dir", str(run)], capsys)
    assert "bad.png" in err and "cannot be read" in err

    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlabel\nAnd God said.\tlaw_and_history\nAmen.\tsomething_else\n")
    err = _preflight("recipes/finetune.py", ["--train-data", str(tsv), "--text-columns", "text", "--run-dir", str(run)],
                     capsys)
    assert "no column 'text'" in err and "t.tsv" in err
    err = _preflight("recipes/finetune.py", ["--train-data", str(tsv), "--run-dir", str(run)], capsys)
    assert "line 3" in err and "'something_else' is not in data.labels" in err

    # A checkpoint of another task: an image run cannot start a classification run.
    from wider.checkpoint.paths import RELEASE_METADATA

    fake = tmp_path / "vit_release"
    fake.mkdir()
    import json

    from wider import presets

    vit = presets.get("widenet_vit_smoke")
    (fake / "config.json").write_text(json.dumps({**vit.to_dict(), "moe": None}))
    (fake / RELEASE_METADATA).write_text(json.dumps({"format": "wider-release", "format_version": 1, "step": 3}))
    (fake / "model.safetensors").write_bytes(b"")
    err = _preflight("recipes/finetune.py", ["--init-from", str(fake), "--run-dir", str(run)], capsys)
    assert "task 'image_classification'" in err and "starts from masked_lm or classification" in err
    # ... and a language-model recipe refuses a preset of another task, naming the recipe that trains it.
    from wider import preflight

    with pytest.raises(SystemExit) as e:
        preflight.main("recipes/pretrain_widenet.py", ["--preset", "widenet_vit_smoke", "--run-dir", str(run)], 1)
    assert e.value.code == 2 and "recipes/train_vit.py" in capsys.readouterr().err
    assert not run.exists()
