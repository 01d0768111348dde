"""Tests for shapeprof/graphdef.py: the fx graph as a GraphDef for TensorBoard's Graphs tab."""
from __future__ import annotations

import torch

import shapeprof
from examples.llama import LlamaConfig, Transformer
from shapeprof.output.tensorboard.graphdef import graph_def


def test_a_node_named_like_a_module_namespace_is_renamed():
    # Transformer has a module `output` (its head) and the fx graph an `output_1` node; `norm` is a module and a
    # namespace; no GraphDef name may also be a namespace, or TensorBoard cannot draw it.
    report = shapeprof.analyze(Transformer(LlamaConfig.tiny()), torch.zeros(1, 8, dtype=torch.long))
    graph, _ = graph_def(report)
    names = [n.name for n in graph.node]
    namespaces = {"/".join(name.split("/")[:i]) for name in names for i in range(1, name.count("/") + 1)}
    assert len(names) == len(set(names)) and not namespaces & set(names)
    assert "output/output" in names and "layers/1/attention/wq/layers_1_attention_wq" in names
    by_name = {n.name: n for n in graph.node}
    assert all(i in by_name for n in graph.node for i in n.input)   # every edge has both ends


def test_run_metadata_times_every_working_node():
    report = shapeprof.analyze(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU()), torch.randn(64, 256))
    _, run_metadata = graph_def(report)
    stats = {s.node_name: s for d in run_metadata.step_stats.dev_stats for s in d.node_stats}
    assert set(stats) == {"0/_0", "1/_1"}
    assert all(s.all_start_micros > 0 for s in stats.values())
    assert stats["0/_0"].memory[0].total_bytes == 64 * 256 * 4          # its output
    devices = {d.device for d in run_metadata.step_stats.dev_stats}
    assert devices <= {"/device:memory-bound:0", "/device:compute-bound:0"}


def test_a_report_read_from_json_lists_its_nodes():
    report = shapeprof.analyze(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), torch.randn(2, 8))
    graph, _ = graph_def(shapeprof.Report.from_json(report.to_json()))
    assert [(n.name, n.op, list(n.input)) for n in graph.node] == [("0/_0", "Linear", []), ("1/_1", "ReLU", [])]
    assert graph.node[0].attr["flops"].i == 2 * 2 * 8 * 8
