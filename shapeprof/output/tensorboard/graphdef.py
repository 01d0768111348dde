"""The analysed fx graph as a TensorFlow GraphDef, for TensorBoard's Graphs tab.

Nodes are grouped by module path (TensorBoard folds '/'-separated names into namespaces), carry their costs as
attributes, and have their bound as device, so "Color by: Device" splits memory- from compute-bound nodes.

    >>> import torch, shapeprof
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    >>> graph, run_metadata = graph_def(shapeprof.analyze(model, torch.randn(8, 64)))
    >>> [(n.name, n.op, n.device) for n in graph.node]
    [('input_1', 'Placeholder', ''), ('0/_0', 'Linear', '/device:memory-bound:0'), ('1/_1', 'ReLU', '/device:memory-bound:0'), ('output', 'Output', '')]
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass


from ...capture import target_name
from ...report import NodeStats, Report

__all__ = ["graph_def"]


def graph_def(report: Report):
    """The analysed fx graph as a TensorFlow GraphDef and RunMetadata, for TensorBoard's Graphs tab.

    Each node is named '<module path as namespaces>/<fx name>' ('blocks/0/0/blocks_0_0'), so modules fold
    into collapsible groups; carries attrs flops, bytes, bytes_read, bytes_written, intensity, bound,
    predicted_us, module_path, op, output (and measured_us, efficiency when measured) and ``_output_shapes``
    (TensorBoard labels edges with them); and has its bound as device ('/device:memory-bound:0'), so
    "Color by: Device" splits memory- from compute-bound nodes. The RunMetadata gives each node its time
    (measured if known, else predicted) and the bytes it writes, for "Color by: Compute time / Memory".
    A report read from JSON has no graph: its nodes are listed without edges.
    """
    from tensorboard.compat.proto.config_pb2 import RunMetadata
    from tensorboard.compat.proto.graph_pb2 import GraphDef
    from tensorboard.compat.proto.step_stats_pb2 import StepStats
    from tensorboard.compat.proto.versions_pb2 import VersionDef

    stats = {n.name: n for n in report.nodes}
    entries = _graph_entries(report)
    names = _graph_names(entries)
    nodes = [_node_def(e, names, stats.get(e.name)) for e in entries]
    graph = GraphDef(node=nodes, versions=VersionDef(producer=22))
    return graph, RunMetadata(step_stats=StepStats(dev_stats=_device_stats(report.nodes, names)))


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the graph needs of one fx node."""

    name: str
    kind: str                            # fx node op: placeholder, call_module ...
    op: str
    module_path: str
    inputs: list[str]
    shape: tuple[int, ...] | None        # of its (first) output
    output: str                          # 'bf16[512, 3072]'


_KIND_OP = {"placeholder": "Placeholder", "get_attr": "GetAttr", "output": "Output"}


def _graph_entries(report: Report) -> list[_Entry]:
    from ...analysis import describe_meta
    captured = report.graph_capture
    if captured is None:
        return [_Entry(n.name, n.kind, n.op, n.module_path, [], None, n.output) for n in report.nodes]
    stats = {n.name: n for n in report.nodes}
    entries = []
    for cn in captured.nodes:
        node = cn.node
        s = stats.get(node.name)
        op = s.op if s is not None else _KIND_OP.get(node.op) or target_name(node)
        entries.append(_Entry(node.name, node.op, op, cn.module_path, [i.name for i in node.all_input_nodes],
                              cn.output.shape if cn.output is not None else None, describe_meta(cn.output)))
    return entries


def _graph_names(entries: list[_Entry]) -> dict[str, str]:
    """fx name -> GraphDef name; a node whose full name is also a namespace (an fx node 'output' beside a
    module 'output') gets a suffix, since TensorBoard cannot draw a node and a group under one name."""
    full = {e.name: (e.module_path.replace(".", "/") + "/" + e.name) if e.module_path else e.name for e in entries}
    namespaces = {name.rsplit("/", 1)[0] for name in full.values() if "/" in name}
    namespaces |= {"/".join(ns.split("/")[:i]) for ns in list(namespaces) for i in range(1, ns.count("/") + 1)}
    return {k: (v + "_" if v in namespaces else v) for k, v in full.items()}


def _node_def(e: _Entry, names: dict[str, str], s: NodeStats | None):
    from tensorboard.compat.proto.attr_value_pb2 import AttrValue
    from tensorboard.compat.proto.node_def_pb2 import NodeDef

    attr = {"module_path": AttrValue(s=e.module_path.encode()), "op": AttrValue(s=e.op.encode()),
            "kind": AttrValue(s=e.kind.encode())}
    if e.output:
        attr["output"] = AttrValue(s=e.output.encode())
    if e.shape is not None:
        attr["_output_shapes"] = _shapes_attr(e.shape)
    device = ""
    if s is not None:
        attr.update(_stats_attrs(s))
        device = _device(s.bound)
    return NodeDef(name=names[e.name], op=e.op, input=[names[i] for i in e.inputs if i in names], device=device,
                   attr=attr)


def _stats_attrs(s: NodeStats) -> dict:
    from tensorboard.compat.proto.attr_value_pb2 import AttrValue
    attr = {"flops": AttrValue(i=s.flops), "bytes": AttrValue(i=s.bytes), "bytes_read": AttrValue(i=s.bytes_read),
            "bytes_written": AttrValue(i=s.bytes_written), "bound": AttrValue(s=s.bound.encode()),
            "predicted_us": AttrValue(f=s.predicted_seconds * 1e6), "share": AttrValue(f=s.share),
            "aten": AttrValue(list=AttrValue.ListValue(s=[a.op.encode() for a in s.aten]))}
    if math.isfinite(s.intensity):
        attr["intensity"] = AttrValue(f=s.intensity)
    if s.measured_seconds is not None:
        attr["measured_us"] = AttrValue(f=s.measured_seconds * 1e6)
        attr["efficiency"] = AttrValue(f=s.efficiency or 0.0)
    if s.source:
        attr["source"] = AttrValue(s=s.source.encode())
    if s.uncovered:
        attr["uncovered"] = AttrValue(list=AttrValue.ListValue(s=[u.encode() for u in s.uncovered]))
    return attr


def _shapes_attr(shape):
    from tensorboard.compat.proto.attr_value_pb2 import AttrValue
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    proto = TensorShapeProto(dim=[TensorShapeProto.Dim(size=int(d)) for d in shape])
    return AttrValue(list=AttrValue.ListValue(shape=[proto]))


def _device(bound: str) -> str:
    # TensorBoard reads a device as '/device:<NAME>:<N>' (it matches /device:([^:]+:[0-9]+)$/)
    return f"/device:{bound}-bound:0"


def _device_stats(nodes: list[NodeStats], names: dict[str, str]) -> list:
    from tensorboard.compat.proto.step_stats_pb2 import AllocatorMemoryUsed, DeviceStepStats, NodeExecStats

    # TensorBoard colours by time only for nodes whose all_start_micros is set (not 0) and whose
    # all_end_rel_micros is > 0; both are whole microseconds, so sub-microsecond nodes colour as the fastest.
    start = int(time.time() * 1e6)
    by_device: dict[str, list] = {}
    clock = 0.0
    for n in nodes:
        seconds = n.measured_seconds if n.measured_seconds is not None else n.predicted_seconds
        micros = round(seconds * 1e6)
        by_device.setdefault(_device(n.bound), []).append(NodeExecStats(
            node_name=names[n.name], all_start_micros=start + round(clock * 1e6), op_start_rel_micros=0,
            op_end_rel_micros=micros, all_end_rel_micros=micros,
            # "memory" is what the node allocates: its output, i.e. the bytes it writes
            memory=[AllocatorMemoryUsed(allocator_name="output", total_bytes=n.bytes_written)]))
        clock += seconds
    return [DeviceStepStats(device=d, node_stats=s) for d, s in by_device.items()]
