"""wider: pretraining recipes for parameter-efficient Mixture-of-Experts language models (DESIGN.md).

`import wider` stays cheap: nothing heavy (torch, megatron-core, DeepSpeed) is imported until it is used.
"""


def from_pretrained(path, device="cpu", dtype=None):
    """Load a release directory made by recipes/export.py on CPU or GPU, without DeepSpeed or a process group:
    returns a wider.checkpoint.LoadedModel (model in eval mode, config, moe block, tokenizer, source, step).
    dtype: None / torch.float32 / 'fp32' (default) or torch.bfloat16 / 'bf16'."""
    from wider.checkpoint import from_pretrained as _from_pretrained

    return _from_pretrained(path, device=device, dtype=dtype)


__all__ = ["from_pretrained"]
