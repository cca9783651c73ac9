"""SwiGLU neurons of a loaded model: counted per language (LAPE), switched off or on (steering).

Every SwiGLU MLP of the decoder is a unit (lape_stats.Unit): each dense layer's MLP, and each expert of a
MoE layer (by expert index, whatever slot it sits in). megatron-core computes linear_fc1 -> [gate | up] ->
silu(gate) * up -> linear_fc2; a forward hook on linear_fc1 sees the gate of every token the unit
processes, and nothing else: an expert sees exactly the tokens routed to it, so its own token count is
the denominator. Neuron j is active when silu(gate_j) > 0, i.e. gate_j > 0.

Steering rewrites gate_j in the same hook: deactivation sets it to 0 (silu(0) = 0, so silu(gate) * up is
0 for that neuron); activation sets it to silu's inverse of the target value (silu is increasing above
x = -1.278, its minimum), so silu(gate_j) equals the target exactly.

Tensor parallelism splits the intermediate dimension: rank r holds neurons [r * n, (r + 1) * n) of every
unit. Counts are gathered over the tensor-parallel group into whole-unit tensors; steering indices are
mapped to the local shard. Either way, results do not depend on the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .lape_stats import ActivationCounts, Unit

SILU_MIN_X = -1.2784645  # silu is increasing on [SILU_MIN_X, inf); its minimum value there
SILU_MIN = float(F.silu(torch.tensor(SILU_MIN_X, dtype=torch.float64)))


@dataclass
class UnitSlot:
    """One SwiGLU MLP of this rank: its unit, its linear_fc1, and its neurons [first, first + local) of total."""
    unit: Unit
    fc1: torch.nn.Module
    local: int
    first: int
    total: int


def swiglu_units(model) -> List[UnitSlot]:
    """The SwiGLU MLPs of a (one pipeline stage) PostMoEGPTModel, in layer order, experts by expert index."""
    from megatron.core import parallel_state
    from megatron.core.transformer.mlp import MLP

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    slots = []
    for layer in model.decoder.layers:
        number = layer.layer_number  # 1..num_layers over the whole model, as the training metrics number them
        mlp = layer.mlp
        if isinstance(mlp, MLP):
            slots.append(_slot(Unit(number), mlp, tp, rank))
            continue
        experts = getattr(getattr(mlp, "experts", None), "local_experts", None)
        if experts is None:
            raise ValueError(f"layer {number}: {type(getattr(mlp, 'experts', mlp)).__name__} experts are not "
                             "supported here (SwiGLU neurons are read from megatron-core's SequentialMLP experts); "
                             "run the analysis with the local layer spec (model.transformer_impl=local)")
        expert_of_slot = getattr(mlp.experts, "expert_of_slot", None)
        first_slot = getattr(mlp.experts, "first_slot", 0)
        for i, expert in enumerate(experts):
            index = expert_of_slot[first_slot + i] if expert_of_slot else first_slot + i
            if index >= 0:
                slots.append(_slot(Unit(number, index), expert, tp, rank))
    return slots


def _slot(unit: Unit, mlp, tp: int, rank: int) -> UnitSlot:
    if not mlp.config.gated_linear_unit or mlp.config.activation_func is not F.silu:
        raise ValueError(f"{unit.name}: not a SwiGLU MLP")
    local = mlp.linear_fc1.weight.shape[0] // 2
    return UnitSlot(unit, mlp.linear_fc1, local, rank * local, local * tp)


def _gate(output) -> Tuple[torch.Tensor, int]:
    out = output[0] if isinstance(output, tuple) else output
    return out, out.shape[-1] // 2


class NeuronCounter:
    """Counts active neurons per unit for the language set in `language`, while attached."""

    def __init__(self, model, languages: List[str]):
        self.languages = list(languages)
        self.language: Optional[str] = None
        self.slots = swiglu_units(model)
        n = len(self.languages)
        self.active = {s.unit: torch.zeros(n, s.local, dtype=torch.int64) for s in self.slots}
        self.act_sum = {s.unit: torch.zeros(n, s.local, dtype=torch.float64) for s in self.slots}
        self.tokens = {s.unit: torch.zeros(n, dtype=torch.int64) for s in self.slots}
        self._handles = []

    def __enter__(self):
        self._handles = [s.fc1.register_forward_hook(self._hook(s.unit)) for s in self.slots]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, unit: Unit) -> Callable:
        def hook(module, args, output):
            if self.language is None:
                return None
            out, n = _gate(output)
            gate = out[..., :n].detach().reshape(-1, n)
            k = self.languages.index(self.language)
            self.active[unit][k] += (gate > 0).sum(0).cpu()
            self.act_sum[unit][k] += F.silu(gate.double()).sum(0).cpu()
            self.tokens[unit][k] += gate.shape[0]
            return None
        return hook

    def gathered(self) -> ActivationCounts:
        """Whole-unit counts (every rank gets the same), neurons in global order."""
        def whole(t: torch.Tensor) -> torch.Tensor:
            from megatron.core import parallel_state

            if parallel_state.get_tensor_model_parallel_world_size() == 1:
                return t
            group = parallel_state.get_tensor_model_parallel_group()
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, t.contiguous(), group=group)
            return torch.cat(parts, dim=-1)

        units = [s.unit for s in self.slots]
        return ActivationCounts(self.languages, units, {u: whole(self.active[u]) for u in units},
                                {u: self.tokens[u].clone() for u in units}, {u: whole(self.act_sum[u]) for u in units})


def silu_inverse(value: torch.Tensor) -> torch.Tensor:
    """x >= SILU_MIN_X with silu(x) = value (value >= silu's minimum), by Newton steps in float64."""
    y = value.double().clamp_min(SILU_MIN + 1e-12)
    x = torch.where(y > 0, y + 0.5, torch.zeros_like(y))
    for _ in range(60):
        s = torch.sigmoid(x)
        grad = s * (1 + x * (1 - s))
        x = (x - (x * s - y) / grad.clamp_min(1e-12)).clamp_min(SILU_MIN_X)
    return x


class Steering:
    """Sets chosen neurons' silu(gate) to 0 (deactivate) or to a value (activate) while attached.

    `targets` maps a unit to (global neuron indices, values): value None deactivates, a float tensor of the
    same length sets silu(gate) to those values."""

    def __init__(self, model, targets: Dict[Unit, Tuple[torch.Tensor, Optional[torch.Tensor]]]):
        self.slots = {s.unit: s for s in swiglu_units(model)}
        unknown = sorted(set(targets) - set(self.slots))
        if unknown:
            raise ValueError(f"the neuron sets name units this model does not have: {[u.name for u in unknown]}")
        self.local = {}
        for unit, (index, values) in targets.items():
            slot = self.slots[unit]
            index = torch.as_tensor(index, dtype=torch.long)
            if len(index) and (int(index.max()) >= slot.total or int(index.min()) < 0):
                raise ValueError(f"{unit.name}: neuron index {int(index.max())} out of range (it has {slot.total})")
            mine = (index >= slot.first) & (index < slot.first + slot.local)
            gate = None if values is None else silu_inverse(torch.as_tensor(values)[mine])
            if bool(mine.any()):
                self.local[unit] = (index[mine] - slot.first, gate)
        self._handles = []

    def __enter__(self):
        self._handles = [self.slots[u].fc1.register_forward_hook(self._hook(*t)) for u, t in self.local.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    @staticmethod
    def _hook(index: torch.Tensor, gate_values: Optional[torch.Tensor]) -> Callable:
        def hook(module, args, output):
            out, n = _gate(output)
            out = out.clone()
            idx = index.to(out.device)
            if gate_values is None:
                out[..., idx] = 0
            else:
                out[..., idx] = gate_values.to(device=out.device, dtype=out.dtype)
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return hook


def steering_targets(sets, deactivate: List[str], activate: List[str]) -> Dict[Unit, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Targets for Steering from NeuronSets: the union of the deactivated languages' neurons (set to 0), and
    the activated languages' neurons set to their mean activation on that language's corpus."""
    for lang in [*deactivate, *activate]:
        if lang not in sets.languages:
            raise ValueError(f"language {lang!r} has no neuron set (the file has {sets.languages})")
    chosen: Dict[Unit, Dict[int, Optional[float]]] = {}
    for lang in deactivate:
        for unit, neurons in sets.neurons[lang].items():
            chosen.setdefault(unit, {}).update({n: None for n in neurons})
    for lang in activate:
        for unit, neurons in sets.neurons[lang].items():
            values = sets.mean_activation[lang][unit]
            chosen.setdefault(unit, {}).update(dict(zip(neurons, values)))
    targets = {}
    for unit, picks in chosen.items():
        index = torch.tensor(sorted(picks), dtype=torch.long)
        if all(picks[n] is None for n in picks):
            targets[unit] = (index, None)
        else:  # deactivated ones within an activated unit: value 0
            targets[unit] = (index, torch.tensor([0.0 if picks[n] is None else picks[n] for n in sorted(picks)],
                                                 dtype=torch.float64))
    return targets
