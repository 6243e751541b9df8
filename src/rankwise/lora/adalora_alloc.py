"""AdaLoRA's rank allocator: importance scores, the cubic budget schedule, masking (a hook).

Zhang et al. 2023, "AdaLoRA", §3.2–3.3, with PEFT 0.21.2's exact formulas
(``peft/tuners/adalora/layer.py`` ``RankAllocator``, ``model.py`` ``update_and_allocate``):

* sensitivity of every entry ``I = |w ⊙ ∂L/∂w|`` (eq. 8), smoothed
  ``Ī ← β1 Ī + (1 − β1) I`` (eq. 9) and its uncertainty ``Ū ← β2 Ū + (1 − β2) |I − Ī|``
  (eq. 10); the entry score is ``s = Ī · Ū`` (eq. 11);
* the score of triplet ``i`` is ``s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` (eq. 12);
* budget ``b(t)`` (total rank over all layers): ``b0 = Σ init ranks`` for ``t ≤ tinit``;
  ``b_T = target_r × #layers`` for ``t > T − tfinal``; in between the cubic decrease
  ``b(t) = ⌊(b0 − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³ + b_T⌋`` (eq. 13), applied every
  ``deltaT`` steps;
* masking: the ``b0 − b(t)`` lowest-scoring triplets get ``λ_i = 0`` (all triplets whose score
  is ``≤`` the ``(b0 − b)``-th smallest, as PEFT's ``kthvalue`` threshold).

Call :meth:`RankAllocator.update_and_allocate` once per optimizer step, after ``backward()``
(and ``optimizer.step()``) and before ``zero_grad()``; it records the kept triplets in
``config.rank_pattern`` for saving.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from rankwise.errors import ConfigError
from rankwise.lora.adalora import AdaLoraConfig, AdaLoraLayer
from rankwise.lora.inject import STATE_ATTR, LoraState

PARAMS = ("lora_A", "lora_E", "lora_B")


class Allocation(NamedTuple):
    """One step of the allocator: the rank budget and whether masks were (re)applied."""

    budget: int
    masked: bool


def budget_schedule(
    config: AdaLoraConfig, step: int, *, init_budget: int, target_budget: int
) -> Allocation:
    """``(b(t), mask now?)`` per the module docstring (PEFT ``RankAllocator.budget_schedule``)."""
    total = config.total_step
    if total is None:
        raise ConfigError("total_step: AdaLoRA needs the total number of training steps")
    if step <= config.tinit:
        return Allocation(init_budget, False)
    if step > total - config.tfinal:
        return Allocation(target_budget, True)
    progress = 1 - (step - config.tinit) / (total - config.tfinal - config.tinit)
    budget = int((init_budget - target_budget) * progress**3 + target_budget)
    return Allocation(budget, step % config.deltaT == 0)


class RankAllocator:
    """AdaLoRA's budget allocation over every AdaLoRA layer of ``model`` (:class:`AdaLoraLayer`:
    linear and convolution alike)."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig) -> None:
        if not isinstance(config, AdaLoraConfig):
            raise ConfigError(f"config: expected an AdaLoraConfig, found {type(config).__name__}")
        self.config = config
        # inject() attaches its own copy of the config (with task heads, fan_in_fan_out
        # resolved): save_adapter reads that one, so the kept triplets go there too
        attached = getattr(model, STATE_ATTR, None)
        self._attached = attached.config if isinstance(attached, LoraState) else None
        self.layers: dict[str, AdaLoraLayer] = {
            name: m for name, m in model.named_modules() if isinstance(m, AdaLoraLayer)
        }
        if not self.layers:
            raise ConfigError("model: no AdaLoRA layers; inject(model, AdaLoraConfig(...)) first")
        if config.target_r > config.init_r:  # nothing to prune: PEFT fails at the first mask
            raise ConfigError(
                f"target_r: the average rank AdaLoRA prunes to must be <= init_r = "
                f"{config.init_r} to train, found {config.target_r}"
            )
        pruned = {n: layer.r for n, layer in self.layers.items() if layer.r != config.init_r}
        if pruned:  # masks are init_r long: training ran, then the save failed on them
            name, r = next(iter(pruned.items()))
            raise ConfigError(
                f"RankAllocator: AdaLoRA layer {name!r} has r={r}, expected init_r="
                f"{config.init_r} triplets to allocate over"
                f"{f' ({len(pruned) - 1} more such layers)' if len(pruned) > 1 else ''}: its "
                "adapter was pruned before (loaded from a file, or injected with a config whose "
                "rank_pattern an earlier allocation filled in); train from a fresh inject with "
                "rank_pattern=None"
            )
        self.init_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.reset_importance()

    def reset_importance(self) -> None:
        """Forget the smoothed sensitivities and uncertainties."""
        self.exp_avg_ipt: dict[str, Tensor] = {}
        self.exp_avg_unc: dict[str, Tensor] = {}

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{n}.{p}", getattr(layer, p)) for n, layer in self.layers.items() for p in PARAMS]

    @torch.no_grad()
    def update_importance(self) -> None:
        """Eq. (8)–(10) for every entry of every trainable ``P``, ``λ``, ``Q``.

        ConfigError if one has no gradient: called after ``zero_grad()`` (or before the first
        ``backward()``), every score would be 0 and the next mask would prune every triplet.
        """
        b1, b2 = self.config.beta1, self.config.beta2
        params = [(key, p) for key, p in self._params() if p.requires_grad]
        missing = [key for key, p in params if p.grad is None]
        if missing:
            raise ConfigError(
                f"update_and_allocate: {missing[0]} has no gradient"
                f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}; call it "
                "after backward() and before zero_grad() (with transformers.Trainer: in a "
                "callback's on_optimizer_step, not on_step_end)"
            )
        for key, p in params:
            ipt = (p * p.grad).abs()
            avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
            unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt
            self.exp_avg_ipt[key] = avg
            self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def triplet_scores(self) -> dict[str, Tensor]:
        """Eq. (12): ``<module>.lora_E`` -> ``(r,)`` score of each triplet."""
        out = {}
        for name, layer in self.layers.items():
            s = {p: self._score(f"{name}.{p}", getattr(layer, p)) for p in PARAMS}
            # (r,) = λ score + mean over the row of Q + mean over the column of P
            out[f"{name}.lora_E"] = (
                s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
            )
        return out

    def _score(self, key: str, p: Tensor) -> Tensor:
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(p)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero ``λ`` of the ``init_budget − budget`` least important triplets; the kept mask."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        if k <= 0:
            return {key: [True] * s.numel() for key, s in scores.items()}
        # in the scores' own dtype (PEFT's): a float32 threshold rounded below the k-th float64
        # score kept that triplet, one over budget about half the time
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values
        pattern = {}
        for name, layer in self.layers.items():
            keep = scores[f"{name}.lora_E"] > threshold  # (r,)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[f"{name}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """Zero ``λ`` of every triplet ``pattern`` marks as pruned."""
        for name, layer in self.layers.items():
            mask = pattern.get(f"{name}.lora_E")
            if mask is not None:
                keep = torch.tensor(mask, dtype=torch.bool, device=layer.lora_E.device)
                layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, step: int) -> Allocation:
        """One training step of AdaLoRA (PEFT ``AdaLoraModel.update_and_allocate``)."""
        cfg = self.config
        final = (cfg.total_step or 0) - cfg.tfinal
        sched = budget_schedule(
            cfg, step, init_budget=self.init_budget, target_budget=self.target_budget
        )
        if step < final:
            self.update_importance()
            if sched.masked:
                self._record(self.mask_to_budget(sched.budget))
            return sched
        if step == final:
            if not self.exp_avg_ipt:  # no budgeting step ran (tinit = 0 and a final mask at
                # the first step): all scores 0 would tie and prune every triplet, where PEFT
                # fails (KeyError); score this step's gradients instead
                self.update_importance()
            self._record(self.mask_to_budget(sched.budget))
            self.reset_importance()
            return Allocation(sched.budget, True)
        if not cfg.rank_pattern:  # PEFT fails here too (rank_pattern None)
            raise ConfigError(
                f"update_and_allocate({step}): past the final mask (step {final}) but no kept "
                "triplets are recorded, so the pruned ones would train again; a resumed run "
                "must restore the allocator (RankAllocator.load_state_dict, or "
                "rankwise.train.AdaLoraCallback under transformers.Trainer)"
            )
        self.apply_rank_pattern(cfg.rank_pattern)
        return Allocation(sched.budget, True)

    def state_dict(self) -> dict[str, object]:
        """What a resumed run needs: the smoothed scores and the recorded kept triplets."""
        return {
            "exp_avg_ipt": {k: v.detach().clone() for k, v in self.exp_avg_ipt.items()},
            "exp_avg_unc": {k: v.detach().clone() for k, v in self.exp_avg_unc.items()},
            "rank_pattern": {k: list(v) for k, v in (self.config.rank_pattern or {}).items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s output (scores of unknown parameters are refused)."""
        missing = {"exp_avg_ipt", "exp_avg_unc", "rank_pattern"} - set(state)
        if missing:
            raise ValueError(f"AdaLoRA allocator state lacks {sorted(missing)}")
        params = dict(self._params())
        known = set(params)
        scores: dict[str, dict[str, Tensor]] = {}
        for field in ("exp_avg_ipt", "exp_avg_unc"):
            given = state[field]
            if not isinstance(given, dict) or not set(given) <= known:
                extra = sorted(set(given) - known) if isinstance(given, dict) else given
                raise ValueError(f"AdaLoRA allocator state: {field} names unknown {extra!r:.80}")
            for k, v in given.items():
                if not isinstance(v, Tensor) or v.shape != params[k].shape:
                    raise ValueError(
                        f"AdaLoRA allocator state: {field}[{k!r}] is not a tensor of shape "
                        f"{tuple(params[k].shape)}"
                    )
            # on the parameters' device (a checkpoint is read onto the CPU)
            scores[field] = {k: v.to(params[k].device, copy=True) for k, v in given.items()}
        pattern = state["rank_pattern"]
        if not isinstance(pattern, dict):
            raise ValueError(f"AdaLoRA allocator state: rank_pattern is {pattern!r:.80}")
        for key, mask in pattern.items():  # as a saved config's (AdaLoraConfig._check_masks)
            layer = self.layers.get(key[: -len(".lora_E")]) if key.endswith(".lora_E") else None
            if layer is None:
                raise ValueError(
                    f"AdaLoRA allocator state: rank_pattern names {key!r:.80}, not "
                    "'<AdaLoRA layer>.lora_E' of this model"
                )
            if not (
                isinstance(mask, (list, tuple))
                and len(mask) == layer.lora_E.shape[0]
                and all(isinstance(b, bool) for b in mask)
            ):
                raise ValueError(
                    f"AdaLoRA allocator state: rank_pattern[{key!r}] must be "
                    f"{layer.lora_E.shape[0]} booleans (init_r), found {mask!r:.80}"
                )
        self.exp_avg_ipt, self.exp_avg_unc = scores["exp_avg_ipt"], scores["exp_avg_unc"]
        self._record({k: [bool(b) for b in v] for k, v in pattern.items()})

    def _record(self, pattern: dict[str, list[bool]]) -> None:
        self.config.rank_pattern = pattern
        if self._attached is not None and self._attached is not self.config:
            self._attached.rank_pattern = pattern
