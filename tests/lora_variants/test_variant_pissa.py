"""PiSSA and OLoRA as pure functions: optimality, exact reconstruction, PEFT's own factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from variants_kit import known_spectrum

from rankwise.lora.init_svd import (
    from_peft_init,
    olora_init,
    pissa_exact_init,
    pissa_init,
    to_peft_init,
)


def _optimal_error(W: torch.Tensor, r: int) -> float:
    """sqrt(Σ_{i>r} σ_i²) from the eigenvalues of the smaller Gram matrix, in float64."""
    M = W.double()
    gram = M.T @ M if M.shape[0] >= M.shape[1] else M @ M.T
    sq = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)  # σ_i², descending
    return float(sq[r:].sum().sqrt())


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_pissa_exact_residual_is_the_optimal_truncation(shape: tuple[int, int]) -> None:
    W = known_spectrum(*shape, decay=0.85)
    r, s = 5, 2.0
    A, B, base = pissa_exact_init(W, r=r, scaling=s)
    assert A.shape == (r, shape[1]) and B.shape == (shape[0], r)
    # ‖W_res‖_F = sqrt(Σ_{i>r} σ_i²): Eckart–Young optimal, and W_res + s·B A = W exactly
    assert float(base.norm()) == pytest.approx(_optimal_error(W, r), rel=1e-10)
    torch.testing.assert_close(base + s * B @ A, W, rtol=0, atol=1e-12)
    assert int(torch.linalg.matrix_rank(W - base)) == r
    # the √S split: AAᵀ = BᵀB = diag(S_r / s)
    S = torch.linalg.svdvals(W)[:r]
    torch.testing.assert_close(A @ A.T, torch.diag(S / s), atol=1e-12, rtol=0)
    torch.testing.assert_close(B.T @ B, torch.diag(S / s), atol=1e-12, rtol=0)


def test_pissa_randomized_close_to_optimal_on_a_flat_tail() -> None:
    W = known_spectrum(120, 80, decay=0.97, seed=3)
    res = pissa_init(W, r=8, scaling=1.0, generator=0)
    assert float(res.base.norm()) <= 1.01 * _optimal_error(W, 8)
    torch.testing.assert_close(res.base + res.B @ res.A, W, rtol=0, atol=1e-12)
    again = pissa_init(W, r=8, scaling=1.0, generator=0)
    assert torch.equal(res.A, again.A) and torch.equal(res.base, again.base)


def test_pissa_fast_path_within_one_percent_on_minilm(
    minilm_weights: dict[str, torch.Tensor],
) -> None:
    assert len(minilm_weights) == 36
    worst = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small LAPACK calls: one thread is faster on a shared CPU
    try:
        for W in minilm_weights.values():
            res = pissa_init(W, r=8, scaling=2.0, generator=0)
            assert res.base.dtype == W.dtype
            worst = max(worst, float(res.base.double().norm()) / _optimal_error(W, 8))
    finally:
        torch.set_num_threads(threads)
    assert 1.0 - 1e-4 <= worst <= 1.01


def _peft_layer(W: torch.Tensor, init: str, r: int, alpha: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
            with torch.no_grad():
                self.lin.weight.copy_(W)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], init_lora_weights=init)
    return get_peft_model(One(), cfg).base_model.model.lin


@pytest.mark.parametrize(("name", "ours"), [("pissa", pissa_exact_init), ("olora", olora_init)])
def test_same_residual_and_update_as_peft(name: str, ours: object) -> None:
    W = known_spectrum(48, 32, decay=0.9, seed=5, dtype=torch.float32)
    r, alpha = 4, 8.0
    layer = _peft_layer(W, name, r, alpha)
    A, B, base = ours(W, r=r, scaling=alpha / r)  # type: ignore[operator]
    peft_A, peft_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(base, layer.base_layer.weight.detach(), atol=1e-5, rtol=0)
    # factors agree up to the sign of each singular pair; the product agrees exactly
    torch.testing.assert_close(B @ A, (peft_B @ peft_A).detach(), atol=1e-5, rtol=0)


def test_olora_factors() -> None:
    W = known_spectrum(30, 20, seed=2)
    A, B, base = olora_init(W, r=6, scaling=0.5)
    torch.testing.assert_close(B.T @ B, torch.eye(6, dtype=W.dtype), atol=1e-12, rtol=0)
    assert torch.allclose(A.tril(-1), torch.zeros_like(A))  # rows of R: upper trapezoidal
    torch.testing.assert_close(base + 0.5 * B @ A, W, rtol=0, atol=1e-12)


@pytest.mark.parametrize("init", [pissa_init, olora_init])
def test_embeddings_fall_back_to_the_default(init: object) -> None:
    W = torch.randn(16, 50)  # (dim, num_embeddings)
    A, B, base = init(W, r=4, scaling=1.0, embedding=True, generator=0)  # type: ignore[operator]
    assert base is None and torch.count_nonzero(A) == 0


@pytest.mark.parametrize("init", [pissa_init, olora_init])
def test_bad_rank_is_named(init: object) -> None:
    with pytest.raises(ValueError, match="r must be"):
        init(torch.randn(6, 4), r=5, scaling=1.0)  # type: ignore[operator]
    with pytest.raises(ValueError, match="weight must be"):
        init(torch.randn(6, 4, 2), r=2, scaling=1.0)  # type: ignore[operator]


def test_peft_init_names_at_the_file_edge() -> None:
    assert from_peft_init("pissa") == "pissa_exact"
    assert from_peft_init("pissa_niter_16") == "pissa"
    assert from_peft_init("olora") == "olora" and from_peft_init(True) is True
    for ours in ("pissa", "pissa_exact", "olora", "lora_ga", True, False, "gaussian"):
        assert from_peft_init(to_peft_init(ours)) == ours


def test_peft_randomized_pissa_spelling_is_accepted_in_the_config() -> None:
    """PEFT's "pissa_niter_N" (its randomized PiSSA) was refused by LoraConfig, though files
    holding it load: it is rankwise's "pissa" (a randomized SVD), in code as in files."""
    from lora_testkit import tiny_bert_cls

    from rankwise.lora import LoraConfig, inject

    config = LoraConfig(r=4, target_modules=["query"], init_lora_weights="pissa_niter_4")
    assert config.init_lora_weights == "pissa"
    models = [
        inject(tiny_bert_cls(), LoraConfig(r=4, target_modules=["query"], init_lora_weights=i))
        for i in ("pissa_niter_16", "pissa")
    ]
    states = [m.state_dict() for m in models]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_original_base_factors_and_config() -> None:
    from rankwise.lora import LoraConfig
    from rankwise.lora.init_svd import original_base_config, original_base_factors

    W = known_spectrum(20, 12, seed=4)
    s = 1.5
    A0, B0, W_res = pissa_exact_init(W, r=3, scaling=s)
    g = torch.Generator().manual_seed(0)
    A = A0 + 0.1 * torch.randn(A0.shape, generator=g, dtype=W.dtype)  # "trained"
    B = B0 + 0.1 * torch.randn(B0.shape, generator=g, dtype=W.dtype)
    A2, B2 = original_base_factors(A, B, A0, B0)
    assert A2.shape == (6, 12) and B2.shape == (20, 6)
    torch.testing.assert_close(W + s * B2 @ A2, W_res + s * B @ A, atol=1e-12, rtol=0)
    cfg = LoraConfig(r=3, lora_alpha=4.5, alpha_pattern={"q": 2}, init_lora_weights="gaussian")
    out = original_base_config(cfg)
    assert (out.r, out.lora_alpha, out.alpha_pattern, out.init_lora_weights) == (
        6,
        9.0,
        {"q": 4},
        True,
    )
    assert out.scaling(r=6, alpha=9.0) == cfg.scaling(r=3, alpha=4.5)
    rs = original_base_config(LoraConfig(r=4, lora_alpha=8, use_rslora=True))
    assert rs.scaling(r=rs.r, alpha=rs.lora_alpha) == pytest.approx(8 / 2)
    with pytest.raises(ValueError, match="rslora"):
        original_base_config(LoraConfig(r=4, use_rslora=True, rank_pattern={"q": 2}))


def test_recorded_initial_factors_stay_out_of_the_state_dict() -> None:
    from rankwise.lora import LoraLinear
    from rankwise.lora.init_svd import initial_factors, record_initial_factors

    layer = LoraLinear(nn.Linear(6, 5), r=2, lora_alpha=2, scaling=1.0, lora_dropout=0.0)
    assert initial_factors(layer) is None
    record_initial_factors(layer)
    A0, B0 = initial_factors(layer)
    assert torch.equal(A0, layer.lora_A.weight) and A0 is not layer.lora_A.weight
    assert not any("init" in k for k in layer.state_dict())


@pytest.mark.parametrize("generator", [None, 5])
def test_randomized_pissa_reloads_exactly_whatever_the_generator(generator, tmp_path) -> None:
    """The file records only "pissa": load_adapter rebuilds the residual base, so the
    randomized SVD uses its own fixed seed (reloads drifted by ~1e-3 unless inject's
    generator was seed 0)."""
    from lora_testkit import logits, tiny_bert_cls

    from rankwise.io import load_adapter, save_adapter
    from rankwise.lora import LoraConfig, inject

    cfg = LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights="pissa")
    model = inject(tiny_bert_cls(), cfg, generator=generator)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(0.05)  # trained
    with pytest.warns(RuntimeWarning, match="PEFT draws its own"):  # PEFT cannot rebuild it
        save_adapter(model, tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # its own file: rebuilt exactly, no word
        again = load_adapter(tiny_bert_cls(), tmp_path)
    torch.testing.assert_close(logits(again, "bert"), logits(model, "bert"), rtol=0, atol=1e-6)


def test_a_randomized_pissa_file_from_peft_loads_with_a_warning(tmp_path) -> None:
    """PEFT's "pissa_niter_N" residual is its own random draw, not in the file: the residual
    rebuilt here differs and the logits with it (0.15 on a tiny Llama), which loaded without
    a word while the same situation warns on save."""
    import peft
    from lora_testkit import tiny_bert_cls

    from rankwise.io import load_adapter

    cfg = peft.LoraConfig(r=4, target_modules=["query"], init_lora_weights="pissa_niter_2")
    peft.get_peft_model(tiny_bert_cls(), cfg).save_pretrained(tmp_path)
    with pytest.warns(RuntimeWarning, match="randomized-PiSSA adapter written by PEFT"):
        load_adapter(tiny_bert_cls(), tmp_path)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_residual_initializer_on_a_tied_weight_is_refused(init: str) -> None:
    """GPT-2's ``lm_head`` shares its weight with ``wte``: writing the residual there moved
    the input embeddings too (logits at init off by ~0.4, no warning) and the adapter
    re-expressed for the original base did not reproduce the trained model."""
    from lora_testkit import tiny_gpt2

    from rankwise.errors import InjectionError
    from rankwise.lora import LoraConfig, inject

    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=init)
    with pytest.raises(InjectionError, match=r"lm_head: its weight is shared with \['transformer"):
        inject(model, cfg, generator=0)
    assert not hasattr(model, "_rankwise_lora")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.lm_head.weight is model.transformer.wte.weight
    inject(model, cfg.replace(target_modules=["c_attn"]), generator=0)  # untied targets: fine
    inject(tiny_gpt2(), cfg.replace(init_lora_weights=True), generator=0)  # base kept: fine


@pytest.mark.parametrize("init", ["pissa_exact", "olora", "lora_ga"])
def test_disable_adapters_and_unload_give_the_original_base_model(init: str) -> None:
    # the wrappers ran (and unload left) the residual W - s·B0 A0: a DPO-style reference pass
    # inside disable_adapters() saw a model that never existed (0.46 off with PiSSA, 0.96 OLoRA)
    from lora_testkit import BUILDERS, logits, perturb, token_batch

    from rankwise.lora import LoraConfig, disable_adapters, inject, lora_ga_init, merge, unload

    kw = dict(r=2, lora_alpha=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    base_logits = logits(BUILDERS["bert"](), "bert")
    if init == "lora_ga":
        batch = {"input_ids": token_batch(3), "labels": torch.tensor([0, 1])}
        model = lora_ga_init(BUILDERS["bert"](), LoraConfig(**kw), [batch], generator=0)
    else:
        model = inject(BUILDERS["bert"](), LoraConfig(**kw, init_lora_weights=init), generator=0)
    perturb(model, 2)  # trained a little
    adapted = logits(model, "bert")
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, "bert"), base_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, "bert"), adapted, atol=0, rtol=0)
    merge(model)
    with disable_adapters(model):  # unmerged for the block
        torch.testing.assert_close(logits(model, "bert"), base_logits, atol=1e-5, rtol=0)
    plain = unload(model)  # the base weights; the head (modules_to_save) keeps its training
    reference = BUILDERS["bert"]()
    reference.classifier.load_state_dict(plain.classifier.state_dict())
    torch.testing.assert_close(logits(plain, "bert"), logits(reference, "bert"), atol=1e-5, rtol=0)
    original = dict(reference.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p, original[name], atol=1e-6, rtol=0)


def test_an_unload_failing_midway_leaves_the_adapted_model_and_can_be_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # layers restored before the failure (out of memory forming the next one's weight) kept
    # their adapters over W instead of W_res, and a retry added s·B0 A0 to them again
    from rankwise.lora import LoraConfig, inject, unload
    from rankwise.lora.layers import LoraLayer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected_base = base(x)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights="pissa_exact")
    model = inject(base, cfg, generator=0)
    with torch.no_grad():
        adapted = model(x)
    real, calls = LoraLayer.original_base_weight, []

    def out_of_memory_at_the_second(self: LoraLayer) -> torch.Tensor | None:
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(self)

    monkeypatch.setattr(LoraLayer, "original_base_weight", out_of_memory_at_the_second)
    with pytest.raises(torch.OutOfMemoryError):
        unload(model)
    monkeypatch.setattr(LoraLayer, "original_base_weight", real)
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-6, rtol=0)
        plain = unload(model)
        torch.testing.assert_close(plain(x), expected_base, atol=1e-5, rtol=0)
