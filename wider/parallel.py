"""Parallel set-up: process groups, the megatron <-> DeepSpeed adapter, device and seeds.

One launch = world of ranks started by the `deepspeed` launcher (or torch.multiprocessing in tests).
Tensor parallelism comes from megatron-core's parallel_state; data parallelism is the rest of the world;
DeepSpeed learns the layout through `MegatronMPU`, the small adapter it expects (DeepSpeed calls
`get_model_parallel_rank()` / `get_model_parallel_world_size()`, which parallel_state does not have).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankLayout:
    """This rank's place in the launch: global rank, tensor- and data-parallel sizes and ranks, its device."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# DeepSpeed JIT-builds its CPU shared-memory all-reduce op (deepspeed_shm_comm) on first use, under a torch
# FileBaton: a `lock` file created with O_EXCL and removed when the build ends. A build killed midway (Ctrl-C
# in the first run, a test timeout) leaves the file behind, and every later process then waits on it for ever
# with no output (torch 2.13's FileBaton.wait has no timeout). A build takes one to three minutes on 2 cores,
# so a lock older than this is orphaned.
STALE_BUILD_LOCK_S = 900


def extension_build_dir(name: str) -> str:
    """Where torch JIT-builds extension `name` ($TORCH_EXTENSIONS_DIR/name, else torch's default): torch's own
    computation, private but the one its build uses (it creates the directory, as the build would)."""
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(name, verbose=False)


def clear_stale_build_lock(name: str = "deepspeed_shm_comm", max_age_s: float = STALE_BUILD_LOCK_S) -> str | None:
    """Remove the JIT build lock of torch extension `name` if it is older than `max_age_s` (orphaned by a killed
    build); returns the path removed, or None. A fresh lock is left alone: another process is building."""
    import time

    lock = os.path.join(extension_build_dir(name), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return None
    if age < max_age_s:
        return None
    try:
        os.remove(lock)
    except FileNotFoundError:  # another rank removed it first
        return None
    print(f"[wider] removed {lock}: a build of {name} that stopped {age / 60:.0f} minutes ago left it, and torch "
          "would wait on it for ever; the op is built (or its finished build loaded) now", flush=True)
    return lock


def build_cpu_comm_op() -> bool:
    """Build (or load the cached) DeepSpeed CPU shm communication op now, clearing an orphaned lock first;
    run.sh's set-up calls it so the first run or test does not pay for the build. False if it cannot build
    (gloo then runs without it)."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    clear_stale_build_lock(ShareMemCommBuilder.NAME)
    try:
        ShareMemCommBuilder().load(verbose=False)
    except Exception as e:  # a missing compiler, say: DeepSpeed falls back to plain gloo
        print(f"[wider] note: DeepSpeed's shm op did not build ({type(e).__name__}: {e}); gloo is used without it",
              flush=True)
        return False
    return True


def init_distributed(tensor_parallel: int = 1, timeout_s: int = 1800) -> RankLayout:
    """Join the process group the launcher set up (env:// variables), or a one-rank group when started
    without a launcher, then build megatron's tensor/data-parallel groups. gloo on CPU, nccl on GPU."""
    import datetime

    import deepspeed
    from megatron.core import parallel_state as ps

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if not cuda:  # DeepSpeed builds or loads its CPU shm op inside init_distributed
            clear_stale_build_lock()
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a one-rank run without a launcher: any free port
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        if not cuda:
            release_shm_buffer_name()
    world = dist.get_world_size()
    if world % tensor_parallel != 0:
        raise ValueError(f"tensor_parallel {tensor_parallel} does not divide the world size {world}; "
                         "launch a multiple of it or lower --tensor-parallel")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    return current_layout()


def shm_buffer_path(rank: int) -> str:
    """The POSIX shared-memory file DeepSpeed 0.19.8's CPU communication op creates for `rank`
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: SHM_BUFFER_NAME_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>), 66 MB each."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer_name() -> None:
    """Unlink this rank's shared-memory buffer once every rank has mapped it. DeepSpeed's CPU op never unlinks its
    buffers (its shared_close is never called), so every CPU run left 66 MB per rank in /dev/shm, which is memory:
    a few hundred test launches filled it and the kernel began killing runs. The mappings stay valid after the
    unlink (POSIX shared memory lives until its last mapping goes), so the collective keeps working, and the memory
    is returned when the processes end, however they end. The barrier: a peer still opening the file must find it."""
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(dist.get_rank()))


def current_layout() -> RankLayout:
    from megatron.core import parallel_state as ps

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return RankLayout(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
        tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
    )


def expert_groups(ep_size: int):
    """The expert-parallel layout of this rank for moe.ep_size (collective on first use: every rank must call it):
    consecutive ranks split the experts ([0, 1], [2, 3], ... for ep_size 2) and the ranks holding the same experts
    ([0, 2, ...], [1, 3, ...]) average their gradients. Returns the wider.moe.config.ExpertGroups the MoE layers take.

    DeepSpeed's ZeRO and engine look expert groups up by name in tables of deepspeed.utils.groups, which its own
    MoE layer fills when the engine wraps the model; DeepSpeed 0.19.8 offers no public call that creates them
    (groups.initialize is deprecated and raises). So they are created here, once, with the function its MoE layer
    uses (the legacy consecutive ordering), and read back: this is the one place wider touches those tables."""
    from deepspeed.utils import groups

    from wider.moe.config import ExpertGroups

    name = f"ep_size_{ep_size}"
    if not dist.is_initialized():
        if ep_size == 1:  # a model built outside any launch (inference): no engine will look the groups up
            return ExpertGroups(ep_size=1, ep_rank=0, group=None, name=name)
        raise RuntimeError(f"moe.ep_size {ep_size} needs a process group: call wider.parallel.init_distributed() on "
                           "every rank first (or launch with the deepspeed launcher)")
    # Even at ep_size 1 the engine reads the expert-data-parallel group (it broadcasts expert weights over it).
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    if ep_size == 1:
        return ExpertGroups(ep_size=1, ep_rank=0, group=None, name=name)
    group = groups._get_expert_parallel_group(name)
    return ExpertGroups(ep_size=ep_size, ep_rank=dist.get_rank(group), group=group, name=name)


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    try:  # DeepSpeed's expert-parallel groups would otherwise outlive the process group they belong to
        from deepspeed.utils import groups

        for table in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP,
                      groups._EXPERT_PARALLEL_GROUP_RANKS, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            table.clear()
    except (ImportError, AttributeError):
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def global_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of the whole model's (already data-parallel-reduced) gradient, every parameter counted once:
    replicated parameters locally, tensor-parallel shards summed over the TP group, expert parameters
    (DeepSpeed's allreduce=False tag) summed over their expert-parallel group. DeepSpeed reports no norm
    without ZeRO (and averages per-rank norms when it clips there), so the loop computes it here."""
    from megatron.core import parallel_state as ps

    dense = torch.zeros((), dtype=torch.float64)
    sharded = torch.zeros((), dtype=torch.float64)
    experts: dict = {}
    device = None
    for p in model.parameters():
        if p.grad is None:
            continue
        device = p.grad.device
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "allreduce", True) is False:
            experts[p.group_name] = experts.get(p.group_name, 0.0) + sq
        elif getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            dense += sq
    dev = device or torch.device("cpu")
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        t = sharded.to(dev)
        dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
        sharded = t.cpu()
    total = dense + sharded
    if experts:
        from wider.moe.layer import moe_layers

        ep_group = {m.expert_group_name: m.config.groups.group for m in moe_layers(model)}
        for name in sorted(experts):
            t = torch.as_tensor(experts[name], dtype=torch.float64).to(dev)
            if ep_group.get(name) is not None:  # ep_size 1 holds every expert: nothing to add up
                dist.all_reduce(t, group=ep_group[name])
            total += t.cpu()
    return float(total.sqrt())


class MegatronMPU:
    """What DeepSpeed asks of an `mpu`, answered from megatron-core's parallel_state (no pipeline
    parallelism here, so "model parallel" = tensor parallel)."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_rank(self):
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps().get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self._ps().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self):
        return self._ps().get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self):
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank (tensor-parallel shards are slices of one
    CPU-initialised master weight, so every rank must draw the same numbers), then megatron's
    model-parallel RNG tracker (CPU-capable through patches/cpu_rng_tracker.py)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def all_reduce_max(value: float, device: torch.device) -> float:
    """Agree on a flag or a number across the world (used for the preemption flag)."""
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
