"""Analysis pass: every linear call site of a model, with call counts, FLOPs and shared inputs.

From the exported graph we read each ``aten.linear`` (nn.Linear, F.linear) and ``aten.addmm`` /
``aten.mm`` whose weight is a parameter (HF GPT-2 ``Conv1D`` stores it transposed, (in, out)).
Layers that read the same tensor (q/k/v, gate/up, a DiT's adaLN heads) are grouped through a
networkx graph. If the model cannot be traced we fall back to module discovery and say so.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from .capture import example_inputs_for, export_graph, normalize_example_inputs

aten = torch.ops.aten
_PASS_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
                 aten.clone.default, aten.contiguous.default, aten.detach.default, aten.flatten.using_ints,
                 aten.dropout.default}


@dataclass
class LinearSite:
    fqn: str                    # the module (for functional calls: the weight's owner path)
    kind: str                   # "linear" | "conv1d" | "functional"
    out_features: int
    in_features: int
    bias: bool
    repeated: bool              # inside a repeated block (a ModuleList of same-class blocks)
    calls: int = 0              # times called in the captured forward (0: not traced)
    tokens: int = 0             # rows multiplied, summed over calls
    group: int | None = None    # shared-input group id

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def flops(self) -> int:
        return 2 * self.tokens * self.params

    @property
    def substitutable(self) -> bool:
        return self.kind in ("linear", "conv1d")


@dataclass
class Analysis:
    sites: dict[str, LinearSite]
    groups: list[list[str]] = field(default_factory=list)
    graph: nx.Graph = field(default_factory=nx.Graph)
    traced: bool = True
    note: str = ""

    def __iter__(self):
        return iter(self.sites.values())

    def __len__(self):
        return len(self.sites)

    def table(self) -> str:
        head = f"{'layer':48} {'kind':10} {'out x in':>13} {'params':>10} {'calls':>5} {'MFLOPs':>9} {'group':>5} rep"
        rows = [head, "-" * len(head)]
        for s in self.sites.values():
            rows.append(f"{s.fqn[-48:]:48} {s.kind:10} {f'{s.out_features}x{s.in_features}':>13} {s.params:>10} "
                        f"{s.calls:>5} {s.flops / 1e6:>9.2f} {'' if s.group is None else s.group:>5} "
                        f"{'yes' if s.repeated else 'no'}")
        total = sum(s.params for s in self.sites.values())
        rows.append(f"{len(self.sites)} linear sites, {total} weight parameters; "
                    f"{len(self.groups)} shared-input groups; "
                    + ("traced with torch.export" if self.traced else f"module discovery ({self.note})"))
        return "\n".join(rows)

    __str__ = table


def block_of(name: str) -> str:
    """The repeated block a layer lives in ("model.layers.3" for "model.layers.3.mlp.up_proj")."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if parts[k].isdigit():
            return ".".join(parts[: k + 1])
    return name


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or HF Conv1D (stored (in, out))."""
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _in_repeated_block(model: nn.Module, fqn: str) -> bool:
    parts = fqn.split(".")
    for k in range(len(parts)):
        parent = model.get_submodule(".".join(parts[:k])) if k else model
        if isinstance(parent, (nn.ModuleList, nn.Sequential)) and parts[k].isdigit():
            kinds = [type(c) for c in parent.children()]
            if kinds.count(type(parent[int(parts[k])])) >= 2:
                return True
    return False


def _module_sites(model: nn.Module) -> dict[str, LinearSite]:
    sites = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            sites[name] = LinearSite(name, "linear", mod.out_features, mod.in_features, mod.bias is not None,
                                     _in_repeated_block(model, name))
        elif _is_conv1d(mod):
            sites[name] = LinearSite(name, "conv1d", mod.weight.shape[1], mod.weight.shape[0], mod.bias is not None,
                                     _in_repeated_block(model, name))
    return sites


def _source(node):
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _PASS_THROUGH:
        node = node.args[0]
    return node


def _linear_calls(ep):
    """Yield (weight parameter FQN, input node, rows) for each linear-like node of the graph."""
    params = ep.graph_signature.inputs_to_parameters
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.linear.default:
            x, w = node.args[0], node.args[1]
        elif node.target == aten.addmm.default:
            x, w = node.args[1], node.args[2]
        elif node.target in (aten.mm.default, aten.matmul.default):
            x, w = node.args[0], node.args[1]
        else:
            continue
        if not (isinstance(w, torch.fx.Node) and w.name in params):
            continue
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        rows = val.numel() // max(val.shape[-1], 1) if val is not None else 0
        yield params[w.name], x, rows


def analyze(model: nn.Module, example_inputs=None) -> Analysis:
    """Find every linear call site of ``model``; see :class:`Analysis`. ``example_inputs``: a tensor,
    tuple of args, dict of kwargs or (args, kwargs); built automatically for HF and diffusers models."""
    sites = _module_sites(model)
    inputs = normalize_example_inputs(example_inputs) or example_inputs_for(model)
    if inputs is None:
        msg = f"no example inputs for {type(model).__name__}: pass example_inputs= to trace it"
        return Analysis(sites, traced=False, note=msg)
    try:
        ep = export_graph(model, *inputs)
    except Exception as err:  # any tracing failure: report it, keep going with module discovery
        msg = f"torch.export failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        warnings.warn(f"blastfx.analyze: {msg}; falling back to module discovery", stacklevel=2)
        return Analysis(sites, traced=False, note=msg)

    graph = nx.Graph()
    readers: dict[torch.fx.Node, list[str]] = {}
    for weight_fqn, x, rows in _linear_calls(ep):
        owner = weight_fqn.rsplit(".", 1)[0]
        site = sites.get(owner)
        if site is None:   # F.linear / matmul on a parameter that no Linear module owns
            w = model.get_parameter(weight_fqn)
            if w.dim() != 2:
                continue
            site = sites[owner] = LinearSite(owner, "functional", w.shape[0], w.shape[1], False,
                                             _in_repeated_block(model, owner))
        site.calls += 1
        site.tokens += rows
        graph.add_node(owner)
        readers.setdefault(_source(x), []).append(owner)
    for names in readers.values():
        for a, b in zip(names, names[1:]):
            if a != b:
                graph.add_edge(a, b)
    groups = [sorted(c) for c in nx.connected_components(graph) if len(c) > 1]
    groups.sort(key=lambda g: list(sites).index(g[0]))
    for k, group in enumerate(groups):
        for name in group:
            sites[name].group = k
    return Analysis(sites, groups, graph, traced=True)
