"""Sample text from a checkpoint, with a key/value cache (wider/generation.py). One process, CPU or GPU; every
architecture of the registry (dense GPT, Switch / GLaM, WideNet, MoEUT, UMoE).
Launch lines: recipes/generate.py (also the console command wider-generate).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

from wider.devices import dtype_name, resolve_device, resolve_dtype
from wider.files import atomic_write_jsonl
from wider.generation import GenerationError


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    from wider.cli import add_model_arguments

    add_model_arguments(g)
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence at every step instead of using the key/value cache (slower; "
                        "for comparison, and for an architecture without a cache)")
    s = p.add_argument_group("prompts")
    s.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt to continue; repeatable")
    s.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="more prompts: one per non-empty line of a text file (.txt, .txt.gz, .txt.xz), or one per "
                        "line of a JSONL file (.jsonl, .jsonl.gz, ...) under --json-key")
    s.add_argument("--json-key", default="text", help="JSONL prompt files: the field holding the prompt (default text)")
    s.add_argument("--no-eod-prefix", action="store_true",
                   help="do not start the prompt with the end-of-document id (by default it does: in training a "
                        "document starts right after the previous one's end-of-document token)")
    d = p.add_argument_group("sampling")
    d.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="at most N new tokens per sample (default 64); prompt + N must fit the model's seq_length")
    d.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits before sampling; 0 = greedy (argmax; top-k, top-p and seed then do "
                        "not matter); default 1")
    d.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most probable tokens only; 0 = off (default)")
    d.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: among the smallest set of most probable tokens whose probability "
                        "reaches P, in (0, 1]; 1 = off (default). Applied after --temperature and --top-k")
    d.add_argument("--seed", type=int, default=1234,
                   help="seed of the sampling generator; prompt i uses seed + i, so a prompt's samples reproduce "
                        "whatever else is in the file (default 1234)")
    d.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="samples per prompt, drawn as one batch (default 1)")
    d.add_argument("--ignore-eod", action="store_true",
                   help="keep sampling past the end-of-document token (by default a sample stops there)")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, metavar="FILE",
                   help="also write the samples as JSONL (one line per sample: prompt, completion, token ids, why "
                        "it stopped, seed, settings), written atomically")
    return p


def read_prompts(texts: Optional[Sequence[str]], path: Optional[str], json_key: str = "text") -> list[str]:
    """Prompts from --prompt (each one a prompt) and --prompt-file: one prompt per non-empty line of a text file,
    or the `json_key` field of each line of a JSONL file (data_prep/documents.py reads both, .gz / .xz too)."""
    prompts = list(texts or [])
    if path is not None:
        from data_prep.documents import DataPrepError, iter_documents

        try:
            prompts += list(iter_documents([path], json_key=json_key, text_mode="line"))
        except DataPrepError as e:
            raise GenerationError(f"--prompt-file: {e}") from None
        if not prompts:
            raise GenerationError(f"--prompt-file {path!r} holds no prompt (no non-empty line)")
    if not prompts:
        raise GenerationError("no prompt given: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise GenerationError(f"prompt {i} is empty; give some text (the model continues it)")
    return prompts


def _completion_text(tokenizer, prompt_ids: list, new_ids: list) -> str:
    """The new tokens as text. SentencePiece drops a word-initial space at the start of a decode, so the
    completion is the decode of prompt + new minus the decode of the prompt when that is a prefix of it."""
    full, head = tokenizer.detokenize(prompt_ids + new_ids), tokenizer.detokenize(prompt_ids)
    return full[len(head):] if full.startswith(head) else tokenizer.detokenize(new_ids)


def run(args) -> int:
    """After argument parsing: load, sample every prompt, print, write --output."""
    from tqdm import tqdm

    from wider.generation import GenerationError, SamplingParams, generate

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    try:
        params.check()
        if args.num_samples < 1:
            raise GenerationError(f"--num-samples {args.num_samples} must be >= 1")
        prompts = read_prompts(args.prompt, args.prompt_file, args.json_key)
        if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise GenerationError(f"--output {args.output!r}: its directory does not exist; create it first")
        if not os.path.exists(args.checkpoint):
            raise GenerationError(f"--checkpoint {args.checkpoint!r} does not exist; give a run directory (RUN_DIR), "
                                  "a checkpoint (RUN_DIR/checkpoints/step_XXXXXXXX) or a release directory made by "
                                  "recipes/export.py")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as e:  # GenerationError, wider.devices' DeviceError
        return fail(str(e))

    from wider.checkpoint import CheckpointError, load_for_inference
    from wider.config import ConfigError
    from wider.data import DataError
    from wider.models import ARCHITECTURES

    try:
        loaded = load_for_inference(args.checkpoint, device=str(device), dtype=dtype, task="causal_lm")
    except (CheckpointError, ConfigError, DataError, OSError, ValueError) as e:
        return fail(f"--checkpoint {args.checkpoint}: {e}")
    cfg, tok = loaded.config, loaded.tokenizer
    arch = ARCHITECTURES[cfg.model.arch]
    seq = cfg.model.seq_length
    eod = None if args.ignore_eod else tok.eod
    print(f"wider generate | {loaded.source} (step {'?' if loaded.step is None else loaded.step}) | arch "
          f"{cfg.model.arch} | seq {seq} | {device} | {dtype_name(dtype)} | "
          f"{'no cache' if args.no_cache else 'kv cache'} | temperature {args.temperature} top-k {args.top_k} "
          f"top-p {args.top_p} seed {args.seed}", flush=True)

    records, total_new, total_s = [], 0, 0.0
    bar = tqdm(prompts, desc="prompts", unit="prompt", disable=len(prompts) < 2 or not sys.stderr.isatty())
    for i, text in enumerate(bar):
        ids = tok.tokenize(text)
        # Training sequences see a document start only right after the previous document's EOD
        # (data_prep/preprocess_data.py appends one to every document), so the EOD is the start-of-text context.
        prompt_ids = ([tok.eod] if not args.no_eod_prefix else []) + ids
        seeded = dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)
        try:
            if not ids:
                raise GenerationError(f"prompt {i} ({text!r}) tokenizes to no tokens; give some text")
            out = generate(loaded.model, prompt_ids, seeded, max_length=seq, num_samples=args.num_samples,
                           incremental=arch.incremental, use_cache=not args.no_cache, eod=eod,
                           vocab_size=tok.vocab_size, where=f"prompt {i}")
        except GenerationError as e:
            bar.close()
            return fail(str(e))
        except NotImplementedError as e:  # an architecture without a key/value cache
            bar.close()
            return fail(f"{e}")
        total_new += out.new_tokens
        total_s += out.prefill_s + out.decode_s
        for j, new in enumerate(out.tokens):
            completion = _completion_text(tok, ids, new)
            tqdm.write(f"--- prompt {i} sample {j} ({len(new)} tokens, {out.stop[j]}) ---\n{text}{completion}")
            records.append({"prompt_index": i, "sample": j, "prompt": text, "completion": completion,
                            "tokens": new, "prompt_tokens": len(prompt_ids), "stop": out.stop[j],
                            "seed": seeded.seed, "checkpoint": loaded.source, "step": loaded.step,
                            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                            "cache": not args.no_cache})
        tqdm.write(f"prompt {i}: {out.new_tokens} new tokens in {out.prefill_s + out.decode_s:.2f} s "
                   f"({out.tokens_per_s:.1f} tokens/s; prefill {out.prefill_s * 1e3:.1f} ms)")
    bar.close()
    rate = total_new / total_s if total_s > 0 else float("nan")
    print(f"{len(records)} samples, {total_new} new tokens, {rate:.1f} tokens/s "
          f"({'no cache' if args.no_cache else 'kv cache'})", flush=True)
    if args.output:
        atomic_write_jsonl(args.output, records)
        print(f"wrote {args.output}", flush=True)
    return 0


def main(argv=None, description: str = __doc__) -> int:
    """description: the --help text (recipes/generate.py passes its docstring, with the launch lines)."""
    from wider.recipe import quiet_libraries

    quiet_libraries()
    args = build_parser(description).parse_args(argv)
    import patches

    patches.apply_defaults()  # includes kv_cache_cpu: megatron's inference KV buffers on the model's device
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
