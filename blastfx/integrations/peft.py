"""LoRA on BLAST layers with peft.

``get_peft_model(model, LoraConfig(target_modules=[...]))`` wraps each targeted BLAST layer in
:class:`BlastLoraLinear` (peft's LoRA ``Linear`` with the BLAST layer as its base), and
``target_modules="all-linear"`` includes BLAST layers. Only the adapters train; the factors stay
frozen like any base weight.

Merging is exact: a rank-k LoRA update B A is itself a BLAST matrix with couplings 1, so it joins
the layer's factors as k more rank components (:meth:`blastfx.BlastLinear.add_low_rank_`);
``merge_and_unload`` returns a model whose BLAST layers have rank r + k, which saves and loads like
any compressed model, and unmerging drops those components again. Layers with quantized factors
take adapters for training but cannot take a merge (codes cannot change rank exactly): a merge that
would reach one is refused before any layer merges. DoRA and the initializations
computed from the base weight (PiSSA, OLoRA, LoftQ, ...) need a dense weight: they raise, naming
the layer.

Why a registration and not a ``LoraConfig`` option: peft picks the LoRA layer class from a fixed list
of known base layers, and experimental per-config custom modules must be registered on every config
by hand; registering here makes the plain calls above work. Importing this module registers (``import
blastfx`` arranges that for when peft is imported).
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
from peft.tuners import tuners_utils
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer

from ..structures.blast.nn import BlastLinear


class BlastLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` around a :class:`BlastLinear`: the forward is the BLAST layer's plus
    the adapters'; merging appends the adapters to the BLAST factors (exact)."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False            # a BLAST layer computes x W^T, whatever layer it replaced
        self._blast_merged_ranks: list[int] = []   # rank appended by each merged adapter, in merge order

    def _get_in_out_features(self, module):
        if isinstance(module, BlastLinear):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer):
        if isinstance(base_layer, BlastLinear):
            return base_layer.U.device, base_layer.U.dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    @property
    def lora_variants(self):
        return {(): None}

    def resolve_lora_variant(self, *, config, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError:
            asked = [name for name in ("use_dora", "use_bdlora", "arrow_config", "alora_invocation_tokens",
                                       "velora_config", "monteclora_config", "kasa_config", "mica")
                     if getattr(config, name, None)]
            raise ValueError(f"LoRA variant {', '.join(asked) or 'requested'} is not available on BLAST layers "
                             f"({self.kwargs.get('target_name', 'a BlastLinear')}): it needs the layer's dense "
                             "weight, which a BLAST layer does not store. Use plain LoRA, or blastfx.to_dense(model) "
                             "first.") from None

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Append each adapter's B A (times its scaling) to the BLAST factors: exact, rank + r per adapter."""
        adapter_names = tuners_utils.check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            B = self.lora_B[name].weight * self.scaling[name]
            A = self.lora_A[name].weight
            if safe_merge and not (torch.isfinite(B).all() and torch.isfinite(A).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            bias = None
            if self.lora_bias[name]:
                if base.bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
                bias = self.lora_B[name].bias * self.scaling[name]
            base.add_low_rank_(B.detach(), A.detach())
            if bias is not None:
                with torch.no_grad():
                    base.bias += bias.to(base.bias.dtype)
            self._blast_merged_ranks.append(A.shape[0])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Drop what :meth:`merge` appended (exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.remove_rank_(self._blast_merged_ranks.pop())
            if self.lora_bias.get(name):
                with torch.no_grad():
                    base.bias -= (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)

    def __repr__(self) -> str:
        return "blastfx." + super().__repr__()


def _base_layer(target):
    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


def _lora_for_blast(original):
    @functools.wraps(original)
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = _base_layer(target)
        custom = lora_config._custom_modules or {}
        if (isinstance(base, BlastLinear) and kwargs.get("parameter_name") is None
                and not any(isinstance(base, key) for key in custom)):
            return BlastLoraLinear(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._blastfx = True
    return staticmethod(_create_new_module)


def _all_linear_with_blast(original):
    @functools.wraps(original)
    def _maybe_include_all_linear_layers(peft_config, model):
        targets = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
        peft_config = original(peft_config, model)
        if not all_linear:
            return peft_config
        inside_adapters = {f"{prefix}.{suffix}" for prefix, module in model.named_modules()
                           if isinstance(module, BaseTunerLayer) for suffix, _ in module.named_modules() if suffix}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        blast = {name for name, module in model.named_modules()
                 if isinstance(module, BlastLinear) and module is not head and name not in inside_adapters}
        peft_config.target_modules = set(peft_config.target_modules or ()) | blast
        return peft_config

    _maybe_include_all_linear_layers._blastfx = True
    return _maybe_include_all_linear_layers


def _quantized_targets(model, adapter_names) -> list[str]:
    """The LoRA-wrapped BLAST layers of ``model`` with quantized factors that a merge of ``adapter_names``
    (default: each layer's active adapters) would have to change."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, BlastLoraLinear) and module.get_base_layer().quantized:
            merging = adapter_names if adapter_names is not None else module.active_adapters
            if any(a in module.lora_A for a in merging):
                names.append(name)
    return names


def _refusing_quantized_merges(original):
    """``merge_and_unload`` / ``merge_adapter`` that refuse before merging anything where a quantized
    BLAST layer would have to take an adapter: peft merges layer by layer, so the per-layer refusal
    alone left the float layers before it merged and the model half unloaded."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def merging(self, *args, **kwargs):
        adapter_names = signature.bind(self, *args, **kwargs).arguments.get("adapter_names")
        quantized = _quantized_targets(self.model, adapter_names)
        if quantized:
            more = f" and {len(quantized) - 1} more" if len(quantized) > 1 else ""
            raise ValueError(f"cannot merge LoRA into {quantized[0]!r}{more}: their BLAST factors are quantized codes, "
                             "which cannot change rank exactly; nothing was merged. Merge into the float model and "
                             "quantize after (blastfx.structures.blast.quant.quantize_model), or keep the adapters "
                             "unmerged")
        return original(self, *args, **kwargs)

    merging._blastfx = True
    return merging


def register() -> None:
    """Make peft's LoRA wrap BLAST layers (idempotent)."""
    for method in ("merge_and_unload", "merge_adapter"):
        if not getattr(getattr(LoraModel, method), "_blastfx", False):
            setattr(LoraModel, method, _refusing_quantized_merges(getattr(LoraModel, method)))
    if not getattr(LoraModel._create_new_module, "_blastfx", False):
        LoraModel._create_new_module = _lora_for_blast(LoraModel._create_new_module)
    if not getattr(tuners_utils._maybe_include_all_linear_layers, "_blastfx", False):
        tuners_utils._maybe_include_all_linear_layers = _all_linear_with_blast(
            tuners_utils._maybe_include_all_linear_layers)


register()
