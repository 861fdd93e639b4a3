"""The "moe" block of a DeepSpeed JSON: capacity, token dropping, aux-loss weights and expert parallelism.

DESIGN section 4: these knobs live in the ds_config next to what DeepSpeed owns (ZeRO stage, precision),
because they are run-time / parallel-layout settings, not the model's shape (expert count, top-k and
expert width are model fields in wider.config.ModelConfig). DeepSpeed ignores keys it does not know, so
this block is validated here: an unknown key (a typo such as `capacity_facter`) is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Optional


EC_EVAL_ROUTINGS = ("position", "token_choice", "train")


class MoESettingsError(ValueError):
    """A bad value in the "moe" block; the message names the key and the fix."""


def _f(default, help: str):  # noqa: A002
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MoESettings:
    """Keys of the ds_config "moe" block (all optional; these defaults apply when a key is absent)."""

    capacity_factor: Optional[float] = _f(
        1.25, "Training capacity per expert = ceil(k * capacity_factor * tokens / num_experts) over the local "
              "micro-batch (at least min_capacity); assignments past it are dropped and the token passes "
              "through the residual. null = dropless.")
    eval_capacity_factor: Optional[float] = _f(
        2.0, "The same for evaluation (model.eval()); null = dropless.")
    min_capacity: int = _f(4, "Lower bound of the capacity per expert (tokens).")
    drop_tokens: bool = _f(True, "false = dropless whatever the capacity factors say (DeepSpeed's meaning).")
    aux_loss_weight: float = _f(0.01, "Weight of the balance loss E * sum_i f_i * P_i, added once per call "
                                      "of each MoE layer (a shared layer counts at every call); 0 = off.")
    aux_loss_scope: str = _f("batch", "What the balance loss averages over: 'batch' (f_i and P_i over every token of the "
                                      "local micro-batch, Switch / GShard) or 'sequence' (E * sum_i f_i P_i per sequence, "
                                      "then the mean over sequences: DeepSeek's sequence-level loss, used by UMoE).")
    z_loss_weight: float = _f(0.0, "Weight of the router z-loss mean(logsumexp(logits)^2) (ST-MoE uses "
                                   "1e-3); 0 = off.")
    entropy_weight_ffn: float = _f(0.01, "Sigmoid-router (sigma-MoE / MoEUT) FFN layers only: weight of minus the "
                                         "entropy of the mean router distribution softmax(s) over each sequence's "
                                         "tokens (pooled over every call of a shared layer), averaged over "
                                         "sequences; such layers take no balance loss. 0 = off. MoEUT: 0.01.")
    entropy_weight_attention: float = _f(0.001, "The same regulariser for SwitchHead attention's V and O routers "
                                                "(per head, averaged over heads). 0 = off. MoEUT: 0.001.")
    ep_size: int = _f(1, "Expert-parallel size: experts are split over this many ranks (DeepSpeed's "
                         "expert-parallel groups); must divide the data-parallel size and num_experts.")
    ec_group: object = _f("position", "Expert Choice routing (model.moe_router 'expert_choice') only: the routing "
                                      "group in which each expert takes its tokens in training. 'position' (the "
                                      "tokens at one sequence position across the local micro-batch: llm-random's "
                                      "group_by_batch, which the fine-grained scaling law was trained with; no "
                                      "token's routing sees a later token of its own sequence), 'batch' (every token "
                                      "of the local micro-batch: Zhou et al.; routing sees the future) or a positive "
                                      "integer N (N consecutive tokens in the layer's [s, b] order; the last group "
                                      "may be smaller).")
    ec_eval_routing: str = _f("position", "Expert Choice only: the routing in evaluation (model.eval(): validation, "
                                          "recipes/evaluate.py). 'position' (per-position groups over the evaluated "
                                          "micro-batch: uses no future token), 'token_choice' (each token takes the "
                                          "top-k experts of the same router scores, dropless: uses no other token) or "
                                          "'train' (the training groups, ec_group: may see the future; for measuring "
                                          "the gap). Generation always uses 'token_choice'.")
    bias_update_speed: float = _f(0.001, "Auxiliary-loss-free balancing (model.router_bias true) only: after each "
                                         "optimizer step every expert's selection bias moves by this much towards "
                                         "equal load (+speed if its load over the step, summed over data-parallel "
                                         "ranks, is below the mean, -speed if above; DeepSeek-V3: 0.001). 0 = frozen.")

    def capacity_factor_for(self, training: bool) -> Optional[float]:
        """The factor in force, None when dropless."""
        if not self.drop_tokens:
            return None
        return self.capacity_factor if training else self.eval_capacity_factor

    @classmethod
    def from_block(cls, block: Optional[dict], where: str = "ds_config") -> "MoESettings":
        block = dict(block or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in block:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise MoESettingsError(f"{where}: unknown key moe.{key}; {hint}valid keys: {names}")
        s = cls(**block)
        s.check(where)
        return s

    def check(self, where: str = "ds_config") -> None:
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise MoESettingsError(f"{where}: moe.{name} must be a positive number or null (dropless), "
                                       f"got {v!r}")
        if isinstance(self.min_capacity, bool) or not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise MoESettingsError(f"{where}: moe.min_capacity must be an integer >= 0, got {self.min_capacity!r}")
        if not isinstance(self.drop_tokens, bool):
            raise MoESettingsError(f"{where}: moe.drop_tokens must be true or false, got {self.drop_tokens!r}")
        for name in ("aux_loss_weight", "z_loss_weight", "entropy_weight_ffn", "entropy_weight_attention"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise MoESettingsError(f"{where}: moe.{name} must be a number >= 0 (0 = off), got {v!r}")
        if self.aux_loss_scope not in ("batch", "sequence"):
            raise MoESettingsError(f"{where}: moe.aux_loss_scope must be 'batch' or 'sequence', got {self.aux_loss_scope!r}")
        if isinstance(self.ep_size, bool) or not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise MoESettingsError(f"{where}: moe.ep_size must be a positive integer, got {self.ep_size!r}")
        g = self.ec_group
        if not (g in ("position", "batch") or (isinstance(g, int) and not isinstance(g, bool) and g >= 1)):
            raise MoESettingsError(f"{where}: moe.ec_group must be 'position', 'batch' or a positive integer (tokens "
                                   f"per routing group), got {g!r}")
        if self.ec_eval_routing not in EC_EVAL_ROUTINGS:
            raise MoESettingsError(f"{where}: moe.ec_eval_routing must be one of {EC_EVAL_ROUTINGS}, got "
                                   f"{self.ec_eval_routing!r}")
        v = self.bias_update_speed
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise MoESettingsError(f"{where}: moe.bias_update_speed must be a number >= 0 (0 = the biases stay "
                                   f"frozen; DeepSeek-V3 uses 0.001), got {v!r}")

    def check_layout(self, num_experts: int, top_k: int, dp: Optional[int], where: str = "ds_config") -> None:
        """Checks that need the model's expert count and the data-parallel size."""
        if top_k > num_experts:
            raise MoESettingsError(f"model.moe_top_k {top_k} exceeds model.num_experts {num_experts}; "
                                   f"use --moe-top-k <= {num_experts}")
        if num_experts % self.ep_size:
            raise MoESettingsError(f"{where}: num_experts {num_experts} is not divisible by moe.ep_size "
                                   f"{self.ep_size}; choose an ep_size that divides it")
        if dp is not None and dp % self.ep_size:
            raise MoESettingsError(f"{where}: moe.ep_size {self.ep_size} does not divide the data-parallel "
                                   f"size {dp}; launch a multiple of {self.ep_size} ranks or lower ep_size")

    def check_routing(self, selection: str, num_experts: int, top_k: int, micro_batch: int, softmax_over: str,
                      where: str = "ds_config") -> None:
        """Checks of the block against the model's routing (model.moe_router; micro_batch: the per-rank micro-batch,
        which 'position' groups span)."""
        if selection != "expert_choice":
            return
        if self.capacity_factor_for(True) is None:
            raise MoESettingsError(f"{where}: expert choice (model.moe_router) needs a capacity: each expert takes "
                                   "capacity_factor x group x k / experts tokens of each group. Set "
                                   "moe.capacity_factor (llm-random: 1.0) and moe.drop_tokens true")
        group = micro_batch if self.ec_group == "position" else self.ec_group
        if isinstance(group, int):
            exact = self.capacity_factor * group * top_k / num_experts
            if round(exact) < 1:
                raise MoESettingsError(
                    f"{where}: expert choice with routing groups of {group} tokens (moe.ec_group {self.ec_group!r}"
                    f"{', the micro-batch' if self.ec_group == 'position' else ''}) gives each of the {num_experts} "
                    f"experts round({self.capacity_factor} x {group} x {top_k} / {num_experts}) = 0 tokens per group; "
                    f"make the groups at least {math.ceil(0.5 * num_experts / (self.capacity_factor * top_k))} tokens "
                    "(a larger --micro-batch-size for 'position', or moe.ec_group)")
        if softmax_over == "tokens" and self.ec_eval_routing == "token_choice":
            raise MoESettingsError(f"{where}: moe.ec_eval_routing 'token_choice' needs per-token scores, but "
                                   "model.ec_softmax_over is 'tokens'; use ec_eval_routing 'position'")

