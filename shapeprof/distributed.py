"""How many GPUs a training step needs under DDP or FSDP full sharding, and what it spends talking.

A training step holds the parameters, their gradients, the optimizer state and the activations kept for
backward. Under DDP every GPU holds all of it but its own activations, and the gradients are all-reduced
once per step. Under FSDP FULL_SHARD (ZeRO-3) parameters, gradients and optimizer state are each split
into N shards; a unit's parameters are all-gathered whole while it runs (in forward, and again in
backward), and its gradients are reduce-scattered back to shards. This module does that arithmetic on
figures another module computes (bytes of each kind, for the whole model and the per-GPU batch): memory
per GPU, the collectives of one step with their bytes and time over the spec's interconnect, whether it
fits, and the smallest N that does. Nothing distributed runs.

    >>> p = 8_030_261_248                      # Llama-3-8B: bf16 params and grads, 12 B/param of AdamW state
    >>> plan = distributed_plan(parameter_bytes=2 * p, gradient_bytes=2 * p, optimizer_state_bytes=12 * p,
    ...                         activation_bytes=8 * 2**30, largest_unit_bytes=2_101_354_496,
    ...                         spec="a100-80gb-sxm", gpus=8, strategy="fsdp")
    >>> plan.memory_per_gpu["optimizer_state"], plan.memory_per_gpu["total"], plan.fits
    (12045391872, 30954520576, True)
    >>> [(c.op, c.count, c.bytes_per_gpu) for c in plan.communication]
    [('all-gather', 2, 14052957184), ('reduce-scatter', 1, 14052957184)]
    >>> round(plan.comm_seconds, 4)            # 3 x 14.05 GB at 300 GB/s, one way of A100 NVLink
    0.1405
    >>> fit = smallest_fit(parameter_bytes=2 * p, gradient_bytes=2 * p, optimizer_state_bytes=12 * p,
    ...                    activation_bytes=8 * 2**30, spec="a100-80gb-sxm", strategy="ddp")
    >>> fit.gpus is None, fit.reason.startswith("DDP does not shard")
    (True, True)

Conventions (each also stated where it is used):

- Bytes are whole numbers; a shard is ceil(bytes / N), the largest rank's share (FSDP pads each flat
  parameter so that all shards are equal; the padding of under N elements per unit is not counted).
- Ring collectives over N GPUs, as NCCL runs them for large messages: an all-gather or a reduce-scatter of
  S bytes has each GPU send (N - 1) chunks of ceil(S / N) bytes, and receive as many; an all-reduce is a
  reduce-scatter then an all-gather, 2 (N - 1) chunks. `bytes_per_gpu` is what one GPU sends.
- Time = bytes sent / one-way bandwidth. `DeviceSpec.interconnect_bandwidth` adds both directions (A100
  NVLink: 600 GB/s = 300 each way), so one way is half of it: the convention of `shapeprof.advice`'s
  tensor-parallel all-reduce (`each_way = spec.interconnect_bandwidth / 2`, time 2 (t - 1) / t x bytes /
  each_way); `ring_bytes_per_gpu` / `one_way_bandwidth` give the same figure whenever the bytes divide by
  N, and could replace that helper. The bandwidth is what nccl-tests calls bus bandwidth (one way).
- More GPUs than `gpus_per_node` (default 8, a DGX/HGX node) put the ring across nodes, and a ring runs at
  its slowest link: min(one way of the spec's interconnect, `inter_node_each_way`). The default
  inter-node figure, 50e9 B/s, is one 400 Gb/s InfiniBand NDR port per GPU, one way (a DGX H100 has eight
  ConnectX-7 ports, one per GPU; a DGX A100 has 200 Gb/s HDR per GPU: pass 25e9). An assumption, not a
  property of the spec: pass your cluster's figure.
- Peaks only: no latency term (a few microseconds per call, which large gradient buckets and FSDP units
  amortise), no overlap with compute (FSDP and DDP overlap most of it; `comm_seconds` is what there is to
  hide), no contention, one forward and backward per step (no gradient accumulation).
- N = 1 is plain single-GPU training whatever the strategy: no wrapper, no communication, no buckets.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .hardware import DeviceSpec, get_spec
from .text import fmt_bytes

__all__ = [
    "COLLECTIVES", "GPUS_PER_NODE", "INTER_NODE_EACH_WAY", "MEMORY_UTILIZATION", "STRATEGIES",
    "Collective", "DistributedPlan", "FitResult", "distributed_plan", "one_way_bandwidth",
    "ring_bytes_per_gpu", "smallest_fit",
]

STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")
COLLECTIVES: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter")

#: The share of device memory a plan may fill (the rest
#: goes to the CUDA context, the caching allocator's fragmentation, NCCL's buffers). advice.py takes it from here
#: (for serving: what weights and KV cache may take, vLLM's default gpu_memory_utilization).
MEMORY_UTILIZATION = 0.9
#: GPUs one node holds, all on the spec's interconnect (NVLink within a DGX/HGX node).
GPUS_PER_NODE = 8
#: Bytes/s one GPU sends to another node, one way: a 400 Gb/s InfiniBand NDR port per GPU (DGX H100:
#: eight ConnectX-7 ports, one per GPU) = 50 GB/s. An assumption; a DGX A100's 200 Gb/s HDR is 25e9.
INTER_NODE_EACH_WAY = 50e9

_MEMORY_KEYS = ("parameters", "gradients", "optimizer_state", "activations", "gathered_parameters",
                "unsharded_gradient", "reducer_buckets")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def ring_bytes_per_gpu(op: str, nbytes: int, gpus: int) -> int:
    """Bytes one GPU sends (and receives) in a ring `op` over `nbytes` across `gpus` GPUs.

    The buffer is cut in `gpus` chunks of ceil(nbytes / gpus) (the largest chunk bounds each ring step); an
    all-gather or reduce-scatter takes gpus - 1 steps, an all-reduce (reduce-scatter, then all-gather) twice as
    many. `nbytes` is the whole buffer: the gathered result, the reduce-scatter's input, the all-reduced tensor.

        >>> ring_bytes_per_gpu("all-reduce", 1000, 8), ring_bytes_per_gpu("all-gather", 1000, 8)
        (1750, 875)
        >>> ring_bytes_per_gpu("all-reduce", 1000, 1)
        0
    """
    if op not in COLLECTIVES:
        raise ValueError(f"op: unknown collective {op!r}; use one of {', '.join(COLLECTIVES)}")
    steps = 2 * (gpus - 1) if op == "all-reduce" else gpus - 1
    return steps * _ceil_div(nbytes, gpus)


def one_way_bandwidth(spec: str | DeviceSpec | None = None) -> float:
    """Bytes/s one device sends to its peers: half the spec's interconnect_bandwidth, which adds both ways.

        >>> one_way_bandwidth("a100-80gb-sxm") / 1e9, one_way_bandwidth("h100-sxm") / 1e9
        (300.0, 450.0)
    """
    return get_spec(spec).interconnect_bandwidth / 2


@dataclass(frozen=True)
class Collective:
    """One kind of collective in a training step, each call over the whole model's bytes.

    DDP issues its all-reduce per gradient bucket and FSDP its collectives per unit; the bytes of those calls add
    up to one call over the whole model, which is what an entry holds (bandwidth-bound, the split changes
    nothing). `count` calls per step; `bytes_per_gpu` and `seconds` are per call.
    """

    op: str                    # "all-reduce", "all-gather" or "reduce-scatter"
    what: str                  # "gradients" or "parameters"
    phase: str                 # "backward", or "forward, backward" for FSDP's two all-gathers
    count: int                 # calls per step
    nbytes: int                # the buffer: all gradients (in their reduce dtype) or all parameters (param dtype)
    bytes_per_gpu: int         # sent by each GPU per call (received likewise): see ring_bytes_per_gpu
    bandwidth_each_way: float  # bytes/s the ring runs at: its slowest link, one way
    seconds: float             # per call: bytes_per_gpu / bandwidth_each_way

    def to_dict(self) -> dict[str, Any]:
        """Plain data for json.dumps."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DistributedPlan:
    """Memory per GPU and communication per step of one training run over `gpus` GPUs.

    `memory_per_gpu` holds bytes on the busiest GPU, by kind, and their "total":
    parameters, gradients, optimizer_state: the full figures under DDP, ceil(figure / N) under FSDP;
    activations: the per-GPU batch's, as given (data parallelism splits the batch, not a sample's activations);
    gathered_parameters: FSDP only, the all-gathered parameters of the largest unit being computed and of the
    units prefetched beside it (every unit's, with reshard_after_forward=False); unsharded_gradient: FSDP only,
    the largest unit's whole gradient before its reduce-scatter; reducer_buckets: DDP over N > 1 only, the
    Reducer's flat gradient buckets, a second copy of the gradients unless gradient_as_bucket_view=True.
    """

    strategy: str
    spec: str
    gpus: int
    gpus_per_node: int
    nodes: int
    link: str                              # "none" (N = 1), "intra-node" or "inter-node": what bounds the ring
    bandwidth_each_way: float              # bytes/s, one way; 0.0 when N = 1
    memory_per_gpu: dict[str, int]
    memory_utilization: float
    memory_limit: float                    # memory_utilization x spec.memory_capacity
    communication: tuple[Collective, ...]
    notes: tuple[str, ...] = ()

    @property
    def comm_seconds(self) -> float:
        """Seconds a step spends in collectives, none overlapped: sum of count x seconds."""
        return sum(c.count * c.seconds for c in self.communication)

    @property
    def comm_bytes_per_gpu(self) -> int:
        """Bytes each GPU sends per step (it receives as many): sum of count x bytes_per_gpu."""
        return sum(c.count * c.bytes_per_gpu for c in self.communication)

    @property
    def fits(self) -> bool:
        """Whether the busiest GPU's total fits in memory_utilization of the device's memory."""
        return self.memory_per_gpu["total"] <= self.memory_limit

    def to_dict(self) -> dict[str, Any]:
        """Plain data for json.dumps (derived figures included)."""
        d = dataclasses.asdict(self)
        d["communication"] = [c.to_dict() for c in self.communication]
        d["notes"] = list(self.notes)
        return {**d, "comm_seconds": self.comm_seconds, "comm_bytes_per_gpu": self.comm_bytes_per_gpu,
                "fits": self.fits}


@dataclass(frozen=True)
class FitResult:
    """The smallest number of GPUs that fits, with its plan, or None and why not."""

    strategy: str
    spec: str
    gpus: int | None
    plan: DistributedPlan | None        # the fitting plan; else the plan at the largest N tried
    tried: tuple[int, ...]              # the N whose plans were computed, in order
    reason: str                         # one line

    @property
    def fits(self) -> bool:
        return self.gpus is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for json.dumps."""
        return {"strategy": self.strategy, "spec": self.spec, "gpus": self.gpus, "fits": self.fits,
                "plan": self.plan.to_dict() if self.plan is not None else None, "tried": list(self.tried),
                "reason": self.reason}


def distributed_plan(*, parameter_bytes: int, gradient_bytes: int, optimizer_state_bytes: int,
                     activation_bytes: int, spec: str | DeviceSpec | None = None, gpus: int = 1,
                     strategy: str = "fsdp", memory_utilization: float = MEMORY_UTILIZATION,
                     parameters: int | None = None, param_dtype_bytes: int = 2,
                     grad_reduce_dtype_bytes: int | None = None, largest_unit_bytes: int | None = None,
                     units: int | None = None, prefetch: int = 1, reshard_after_forward: bool = True,
                     gradient_as_bucket_view: bool = False, gpus_per_node: int = GPUS_PER_NODE,
                     inter_node_each_way: float = INTER_NODE_EACH_WAY) -> DistributedPlan:
    """Memory per GPU and the collectives of one training step on `gpus` GPUs under DDP or FSDP FULL_SHARD.

        >>> plan = distributed_plan(parameter_bytes=2000, gradient_bytes=2000, optimizer_state_bytes=12000,
        ...                         activation_bytes=500, spec="h100-sxm", gpus=4, strategy="ddp")
        >>> plan.memory_per_gpu["total"], plan.communication[0].bytes_per_gpu   # 2 x 3/4 x 2000 sent per GPU
        (18500, 3000)

    Args:
        parameter_bytes, gradient_bytes, optimizer_state_bytes: the whole model's, as one GPU would hold them
            (mixed precision is the caller's accounting: bf16 parameters and gradients with fp32 master weights and
            AdamW moments is 2 + 2 + 12 bytes a parameter, the master weights counted in optimizer_state_bytes).
        activation_bytes: what one GPU keeps for backward for its own per-GPU batch (pass the per-GPU figure:
            data parallelism splits the global batch, it does not shard activations).
        spec: the device (a name, a spec file or a DeviceSpec); default A100-80GB SXM.
        gpus: N, the data-parallel world size. 1 is single-GPU training: no communication.
        strategy: "ddp" (nothing sharded, gradients all-reduced) or "fsdp" (FULL_SHARD / ZeRO-3).
        memory_utilization: the share of spec.memory_capacity a plan may fill, in (0, 1].
        parameters: the number of parameter elements; default parameter_bytes / param_dtype_bytes (which must
            divide). Pass it when the parameters are held in another dtype than they are gathered in.
        param_dtype_bytes: bytes per parameter as FSDP all-gathers them (its MixedPrecision param_dtype; bf16: 2).
        grad_reduce_dtype_bytes: bytes per gradient element as they are reduced (FSDP's reduce_dtype, DDP's
            comm hook); default: as held, so the reduced buffer is gradient_bytes.
        largest_unit_bytes: FSDP: the bytes (param dtype) of the largest unit's parameters, gathered whole while it
            runs. Required under FSDP with N > 1, or `units` instead; the whole model is never assumed.
        units: FSDP: the number of units, to take the largest as ceil(all parameters / units): an even split,
            which is low where one unit (often the root, holding embeddings and the output head) is bigger.
        prefetch: FSDP: units gathered ahead of the one being computed (FSDP's default BACKWARD_PRE and FSDP2's
            implicit prefetch hold one more; each is counted as large as the largest, an upper bound).
        reshard_after_forward: FSDP: False keeps each unit gathered from its forward to its backward (SHARD_GRAD_OP,
            ZeRO-2): no second all-gather, but every unit's parameters gathered at the end of forward.
        gradient_as_bucket_view: DDP: True makes the gradients views into the Reducer's buckets (no second copy).
        gpus_per_node: GPUs on the spec's interconnect; more put the ring across nodes.
        inter_node_each_way: bytes/s one GPU sends across nodes, one way (default 50e9, 400 Gb/s NDR per GPU).

    Returns:
        A DistributedPlan.
    Raises:
        ValueError: one line naming the argument (negative or fractional bytes, gpus < 1, an unknown strategy,
            memory_utilization outside (0, 1], FSDP over N > 1 without largest_unit_bytes or units, a spec with
            no interconnect for N > 1). SpecError (a ValueError) for an unknown spec.
    """
    p_bytes = _bytes("parameter_bytes", parameter_bytes)
    g_bytes = _bytes("gradient_bytes", gradient_bytes)
    o_bytes = _bytes("optimizer_state_bytes", optimizer_state_bytes)
    a_bytes = _bytes("activation_bytes", activation_bytes)
    n = _whole("gpus", gpus, minimum=1)
    strat = _strategy(strategy)
    util = _utilization(memory_utilization)
    p_dtype = _whole("param_dtype_bytes", param_dtype_bytes, minimum=1)
    r_dtype = None if grad_reduce_dtype_bytes is None else _whole("grad_reduce_dtype_bytes",
                                                                  grad_reduce_dtype_bytes, minimum=1)
    prefetch = _whole("prefetch", prefetch, minimum=0)
    per_node = _whole("gpus_per_node", gpus_per_node, minimum=1)
    if not isinstance(inter_node_each_way, (int, float)) or isinstance(inter_node_each_way, bool) \
            or not inter_node_each_way > 0 or math.isinf(inter_node_each_way):
        raise ValueError(f"inter_node_each_way must be bytes/s > 0, got {inter_node_each_way!r}")
    if parameters is None:
        if p_bytes % p_dtype:
            raise ValueError(f"parameters: parameter_bytes={p_bytes} is no whole number of "
                             f"{p_dtype}-byte elements; pass parameters= (the element count)")
        elements = p_bytes // p_dtype
    else:
        elements = _whole("parameters", parameters, minimum=0)
    device = get_spec(spec)

    gathered_model = elements * p_dtype                               # what one all-gather of all parameters yields
    reduced = g_bytes if r_dtype is None else elements * r_dtype      # what is all-reduced / reduce-scattered
    unit = _largest_unit(strat, n, largest_unit_bytes, units, gathered_model)
    limit = util * device.memory_capacity
    nodes = _ceil_div(n, per_node)
    notes: list[str] = []

    if n == 1:
        # single-GPU training, whatever the strategy: nothing sharded, gathered, bucketed or sent
        memory = {"parameters": p_bytes, "gradients": g_bytes, "optimizer_state": o_bytes, "activations": a_bytes}
        return _plan(strat, device, n, per_node, nodes, "none", 0.0, memory, util, limit, (), notes)

    each_way, link = _ring_link(device, n, per_node, float(inter_node_each_way))
    if nodes > 1:
        notes.append(f"{n} GPUs on {nodes} nodes of {per_node}: the ring crosses nodes and runs at its slowest "
                     f"link, {link} ({fmt_bytes(each_way)}/s each way)")

    def collective(op: str, what: str, phase: str, count: int, nbytes: int) -> Collective:
        sent = ring_bytes_per_gpu(op, nbytes, n)
        return Collective(op, what, phase, count, nbytes, sent, each_way, sent / each_way)

    if strat == "ddp":
        # every GPU holds everything; one all-reduce of all gradients per step, in buckets that copy them
        memory = {"parameters": p_bytes, "gradients": g_bytes, "optimizer_state": o_bytes, "activations": a_bytes,
                  "reducer_buckets": 0 if gradient_as_bucket_view else g_bytes}
        comm = (collective("all-reduce", "gradients", "backward", 1, reduced),)
        return _plan(strat, device, n, per_node, nodes, link, each_way, memory, util, limit, comm, notes)

    # FSDP FULL_SHARD: each rank keeps ceil(1/N) of parameters, gradients and state. While the largest unit
    # runs in backward, its gathered parameters, those of the `prefetch` units fetched ahead, and its whole
    # gradient (before the reduce-scatter) are there besides; with reshard_after_forward=False every unit
    # stays gathered from forward to backward
    if reshard_after_forward:
        gathered = min(gathered_model, (1 + prefetch) * unit)
    else:
        gathered = gathered_model
    unit_grad = _ceil_div(unit * reduced, gathered_model) if gathered_model else 0   # unit's elements x reduce dtype
    memory = {"parameters": _ceil_div(p_bytes, n), "gradients": _ceil_div(g_bytes, n),
              "optimizer_state": _ceil_div(o_bytes, n), "activations": a_bytes,
              "gathered_parameters": gathered, "unsharded_gradient": unit_grad}
    comm = (collective("all-gather", "parameters", "forward, backward" if reshard_after_forward else "forward",
                       2 if reshard_after_forward else 1, gathered_model),
            collective("reduce-scatter", "gradients", "backward", 1, reduced))
    if units is not None:
        notes.append(f"largest unit taken as all parameters / {units} units: low where one unit is bigger")
    return _plan(strat, device, n, per_node, nodes, link, each_way, memory, util, limit, comm, notes)


def smallest_fit(*, strategy: str = "fsdp", spec: str | DeviceSpec | None = None, max_gpus: int = 4096,
                 search: str = "powers-of-two", **plan_kwargs: Any) -> FitResult:
    """The smallest number of GPUs whose plan fits, searching 1, 2, 4, ... (or every N) up to max_gpus.

    Memory per GPU never rises with N under FSDP (shards only shrink), so the first N that fits is the
    smallest; under DDP nothing is sharded and N > 1 adds the gradient buckets, so the answer is 1 or none.

        >>> fit = smallest_fit(parameter_bytes=2000, gradient_bytes=2000, optimizer_state_bytes=12000,
        ...                    activation_bytes=500, spec="h100-sxm", strategy="ddp")
        >>> fit.gpus, fit.reason
        (1, 'fits on 1 GPU')

    Args:
        strategy, spec: as for distributed_plan.
        max_gpus: the largest N tried (with the powers-of-two search, tried last if it is not one).
        search: "powers-of-two" (1, 2, 4, ...) or "every" (1, 2, 3, ...).
        **plan_kwargs: the rest of distributed_plan's arguments (parameter_bytes, ... , largest_unit_bytes).

    Returns:
        A FitResult: gpus=None and a one-line reason when no N up to max_gpus fits.
    """
    strat = _strategy(strategy)
    top = _whole("max_gpus", max_gpus, minimum=1)
    if search == "powers-of-two":
        candidates = [1 << k for k in range(top.bit_length()) if 1 << k <= top]
        if candidates[-1] != top:
            candidates.append(top)
    elif search == "every":
        candidates = list(range(1, top + 1))
    else:
        raise ValueError(f"search: unknown search {search!r}; use 'powers-of-two' or 'every'")
    if "gpus" in plan_kwargs:
        raise ValueError("gpus: smallest_fit chooses it; call distributed_plan for a given N")
    device = get_spec(spec)

    def plan(n: int) -> DistributedPlan:
        return distributed_plan(spec=device, gpus=n, strategy=strat, **plan_kwargs)

    first = plan(1)
    tried = [1]
    if first.fits:
        return FitResult(strat, device.name, 1, first, tuple(tried), "fits on 1 GPU")
    limit = f"{fmt_bytes(first.memory_limit)} ({first.memory_utilization:.0%} of {fmt_bytes(device.memory_capacity)})"
    if strat == "ddp":
        held = sum(first.memory_per_gpu[k] for k in ("parameters", "gradients", "optimizer_state"))
        return FitResult(strat, device.name, None, first, tuple(tried),
                         f"DDP does not shard: every GPU holds the full parameters, gradients and optimizer state "
                         f"({fmt_bytes(held)}) plus its activations, {fmt_bytes(first.memory_per_gpu['total'])} > "
                         f"{limit} on any number of GPUs; use FSDP")
    if len(candidates) == 1:
        return FitResult(strat, device.name, None, first, tuple(tried),
                         f"{fmt_bytes(first.memory_per_gpu['total'])} per GPU > {limit} on 1 GPU (max_gpus=1)")
    last = plan(top)          # the least memory any candidate can have: if it does not fit, none does
    tried.append(top)
    if not last.fits:
        m = last.memory_per_gpu
        fixed = m["activations"] + m["gathered_parameters"] + m["unsharded_gradient"]
        why = (f"activations and the gathered unit alone ({fmt_bytes(fixed)}) exceed {limit}, however many GPUs"
               if fixed > last.memory_limit else
               f"even {top} GPUs hold {fmt_bytes(m['total'])} each > {limit}")
        return FitResult(strat, device.name, None, last, tuple(tried), f"no N <= {top} fits under FSDP: {why}")
    for n in candidates[1:-1]:
        p = plan(n)
        tried.append(n)
        if p.fits:
            return FitResult(strat, device.name, n, p, tuple(tried), f"fits on {n} GPUs")
    return FitResult(strat, device.name, top, last, tuple(tried), f"fits on {top} GPUs")


# ---------------------------------------------------------------------------------------------
# Helpers


def _plan(strat, device, n, per_node, nodes, link, each_way, memory, util, limit, comm, notes) -> DistributedPlan:
    full = {k: memory.get(k, 0) for k in _MEMORY_KEYS}
    full["total"] = sum(full.values())
    return DistributedPlan(strategy=strat, spec=device.name, gpus=n, gpus_per_node=per_node, nodes=nodes, link=link,
                           bandwidth_each_way=each_way, memory_per_gpu=full, memory_utilization=util,
                           memory_limit=limit, communication=tuple(comm), notes=tuple(notes))


def _ring_link(device: DeviceSpec, n: int, per_node: int, inter_each_way: float) -> tuple[float, str]:
    """The one-way bandwidth a ring over n GPUs runs at, and which link bounds it: the slowest one it uses."""
    intra = device.interconnect_bandwidth / 2        # the spec adds both directions (A100 NVLink: 600 = 2 x 300)
    if n <= per_node:
        links = {"intra-node": intra}
    elif per_node == 1:
        links = {"inter-node": inter_each_way}       # one GPU a node: every hop leaves the node
    else:
        links = {"intra-node": intra, "inter-node": inter_each_way}
    link = min(links, key=lambda k: (links[k], k != "inter-node"))   # a tie is named for the network
    if not links[link] > 0:
        raise ValueError(f"spec: {device.name!r} has interconnect_bandwidth=0: collectives over {n} GPUs "
                         "cannot be priced")
    return links[link], link


def _largest_unit(strat: str, n: int, largest_unit_bytes, units, gathered_model: int) -> int:
    if largest_unit_bytes is not None and units is not None:
        raise ValueError("largest_unit_bytes: give it or units, not both")
    if largest_unit_bytes is not None:
        unit = _bytes("largest_unit_bytes", largest_unit_bytes)
        if unit > gathered_model:
            raise ValueError(f"largest_unit_bytes={unit} exceeds all parameters as gathered ({gathered_model})")
        return unit
    if units is not None:
        return _ceil_div(gathered_model, _whole("units", units, minimum=1))
    if strat == "fsdp" and n > 1:
        raise ValueError("largest_unit_bytes: FSDP over N > 1 gathers each unit whole; give the largest unit's "
                         "parameter bytes (or units=)")
    return 0


def _strategy(strategy) -> str:
    s = strategy.lower() if isinstance(strategy, str) else strategy
    if s not in STRATEGIES:
        raise ValueError(f"strategy: unknown strategy {strategy!r}; use 'ddp' or 'fsdp'")
    return s


def _utilization(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {value!r}")
    return float(value)


def _whole(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _bytes(name: str, value) -> int:
    """Bytes as an int: an int, or a float holding a whole number (70.6e9 * 2), >= 0."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number of bytes >= 0, got {value!r}")
    return value
