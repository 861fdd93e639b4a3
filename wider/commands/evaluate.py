"""Evaluate a checkpoint: perplexity (the run's validation split, an indexed dataset, raw text / JSONL) and
zero-shot tasks (LAMBADA, BLiMP, PIQA, HellaSwag, ARC-Easy, CBT) from local files. One process, CPU or GPU.

CPU (after ./run.sh, which trains runs/widenet_smoke (the default preset)):
    python recipes/evaluate.py perplexity --checkpoint runs/widenet_smoke
    python recipes/evaluate.py perplexity --checkpoint runs/widenet_smoke --text corpus/held_out.jsonl.gz --json-key text
    python recipes/evaluate.py tasks --checkpoint runs/widenet_smoke --tasks lambada,blimp,piqa --task-dir data/tasks
GPU (bf16 by default on CUDA), an indexed dataset, a given checkpoint, overlapping windows:
    python recipes/evaluate.py perplexity --checkpoint runs/gpt350m/checkpoints/step_00010000 --device cuda \\
        --data-path data/my_text_document --stride 1024 --batch-size 16
    python recipes/evaluate.py tasks --checkpoint releases/gpt350m --tasks all --task-dir data/tasks --limit 500
Results: RUN_DIR/eval/<name>.json (with the checkpoint's step) and TensorBoard scalars eval/<name>/... in
RUN_DIR/tensorboard. Tasks from lm-evaluation-harness: `lm_eval --model wider --model_args checkpoint=RUN_DIR
--tasks ...` (or `python -m wider.eval.harness ...`; see wider/eval/harness.py).
Every flag: python recipes/evaluate.py perplexity --help / python recipes/evaluate.py tasks --help
"""

import argparse
import sys

TASK_LAYOUT = """task files under --task-dir DIR (the public formats; nothing is downloaded):
  lambada    DIR/lambada/lambada_test.jsonl       OpenAI's LAMBADA test set ({"text": ...} lines)
  blimp      DIR/blimp/*.jsonl                     BLiMP, one file per paradigm (sentence_good / sentence_bad)
  piqa       DIR/piqa/valid.jsonl + valid-labels.lst   PIQA goal / sol1 / sol2, labels in the .lst beside it
  hellaswag  DIR/hellaswag/hellaswag_val.jsonl     HellaSwag (ctx_a, ctx_b, activity_label, endings, label)
  arc_easy   DIR/arc_easy/ARC-Easy-Test.jsonl      AI2 ARC-Easy (question.stem, question.choices, answerKey)
  cbt_cn     DIR/cbt/cbtest_CN_test_2500ex.txt     Children's Book Test, common nouns (text format)
  cbt_ne     DIR/cbt/cbtest_NE_test_2500ex.txt     Children's Book Test, named entities
  (cbt = cbt_cn,cbt_ne; all = every task)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{perplexity,tasks}")

    common = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    g = common.add_argument_group("model")
    from wider.cli import add_model_arguments

    add_model_arguments(g, ("auto", "fp32", "bf16", "fp16"))
    g.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="rows per forward pass; default: the run's micro-batch size (so that MoE capacity sees "
                        "the token count of the run's own evaluation batches)")
    g.add_argument("--dropless", action="store_true",
                   help="MoE: compute every routed assignment (no capacity). Default: the run's "
                        "moe.eval_capacity_factor, as its training-time evaluation, which makes MoE scores "
                        "depend on how requests are batched")
    g.add_argument("--ec-routing", default=None, choices=["position", "token_choice", "train"],
                   help="expert-choice models (model.moe_router expert_choice) only: how their MoE layers route "
                        "here. position: per-position groups over each scored batch (no future token); token_choice: "
                        "each token its top-k experts of the same scores (no other token); train: the training "
                        "groups (moe.ec_group; sees later tokens, for measuring the gap). Default: the run's "
                        "moe.ec_eval_routing (position unless set). The results name the routing used")
    o = common.add_argument_group("output")
    o.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N items: documents (--text / --data-path), validation samples, "
                        "or examples per task (per paradigm for BLiMP); default: all")
    o.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where eval/<name>.json and tensorboard/ go; default: the run directory (the release "
                        "directory for a release)")
    o.add_argument("--no-write", action="store_true", help="print the results only; write no JSON or TensorBoard")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")

    pp = sub.add_parser("perplexity", allow_abbrev=False, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="per-token loss, perplexity (and bits per byte for raw text)",
                        description="Perplexity on the run's own validation split (default: the exact samples "
                                    "of its final evaluation, which this reproduces), an indexed dataset, or raw "
                                    "text / JSONL tokenized with the run's tokenizer (EOD after every document, "
                                    "as data_prep/preprocess_data.py writes them). Streams are scored in windows "
                                    "of the model's seq_length; see --stride.")
    src = pp.add_argument_group("data (default: the run's validation split)")
    src.add_argument("--data-path", default=None, metavar="PREFIX",
                     help="an indexed dataset PREFIX(.bin/.idx) made by data_prep/preprocess_data.py with the run's "
                          "tokenizer; its documents in order")
    src.add_argument("--text", nargs="+", default=None, metavar="FILE",
                     help="raw text / JSONL files (.txt, .jsonl, .jsonl.gz, .jsonl.xz, .parquet; directories "
                          "expand to the files inside), read by data_prep/documents.py")
    src.add_argument("--json-key", default="text", help="JSONL / parquet: the field holding the text (default text)")
    src.add_argument("--text-mode", default="file", choices=["file", "line", "paragraph"],
                     help="plain text: one document per file (default), per non-empty line, or per blank-line "
                          "separated paragraph")
    src.add_argument("--stride", type=int, default=None, metavar="S",
                     help="windows advance by S tokens: the first window scores seq_length tokens, each later "
                          "one the next S with the seq_length - S before them as context, the last one is "
                          "shifted to a full window. Default seq_length (disjoint windows, like the training "
                          "evaluation and lm-evaluation-harness's rolling log-likelihood); seq_length / 2 "
                          "gives every token after the first window at least half a window of context")
    src.add_argument("--name", default=None,
                     help="result name (eval/ppl_<name>.json); default: valid, or the file / prefix base name")
    src.add_argument("--data-parallel", type=int, default=None, metavar="N",
                     help="validation split: split the samples as a run on N data-parallel ranks did (only MoE "
                          "capacity depends on it); default: the dp the checkpoint recorded, else 1")
    src.add_argument("--index-cache", default=None, metavar="DIR",
                     help="validation split: megatron's sample-index cache; default: the run's data.index_cache, "
                          "else RUN_DIR/../.index_cache (the training run's default)")

    tp = sub.add_parser("tasks", allow_abbrev=False, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="zero-shot tasks from local files", epilog=TASK_LAYOUT,
                        description="Zero-shot tasks as lm-evaluation-harness tasks over local files, run by its "
                                    "evaluator with the `wider` lm-eval model, so the scores are the harness's own "
                                    "(wider/eval/tasks.py maps each file format onto lm-eval's definition): acc, "
                                    "and acc_norm (log-likelihood per character of the answer) for PIQA, "
                                    "HellaSwag and ARC-Easy; last-word accuracy and perplexity for LAMBADA; "
                                    "minimal-pair accuracy per paradigm and overall for BLiMP; accuracy for CBT "
                                    "(GPT-2's method; lm-eval ships no CBT task, wider defines it). Standard errors "
                                    "as lm-eval computes them. --no-progress does not reach the progress bars "
                                    "drawn inside lm-eval's evaluator.")
    tp.add_argument("--tasks", required=True,
                    help="comma-separated: lambada, blimp, piqa, hellaswag, arc_easy, cbt_cn, cbt_ne, cbt, all")
    tp.add_argument("--task-dir", default=None, metavar="DIR", help="where the task files lie (layout below)")
    tp.add_argument("--task-file", action="append", default=None, metavar="NAME=PATH",
                    help="the file of one task (BLiMP: a directory of paradigm files or one paradigm file), "
                         "overriding --task-dir; repeatable")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # before any heavy import: --help and usage errors return at once
    from wider.recipe import quiet_libraries

    quiet_libraries()
    for flag in ("batch_size", "limit", "stride", "data_parallel"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            print(f"error: --{flag.replace('_', '-')} {v} must be a positive integer", file=sys.stderr)
            return 2
    import patches

    patches.apply_defaults()
    from wider.eval import run

    return run.main(args)


if __name__ == "__main__":
    sys.exit(main())
