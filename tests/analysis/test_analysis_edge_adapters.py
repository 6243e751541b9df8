"""Analysis on legal but unusual adapters (r above the layer's dims, rank_pattern, DoRA, zero or
rank-deficient updates, half precision) and bad input to the tensor-level algebra."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from rankwise.analysis import (  # noqa: E402
    Factors,
    adapter_amplification,
    adapter_spectrum,
    amplification,
    combine,
    combine_adapters,
    dare_merge,
    extract,
    resize_adapter,
    ties_merge,
)
from rankwise.analysis.adapters import factored_relative_error  # noqa: E402
from rankwise.errors import AdapterFormatError  # noqa: E402

QUERY = "encoder.layer.0.attention.self.query"


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _row(rows):  # the first layer's query
    return next(row for row in rows if row.module == QUERY)


def _peft_save(path: Path, **kwargs) -> None:
    kwargs.setdefault("target_modules", ["query", "value"])
    peft.get_peft_model(_bert(), peft.LoraConfig(**kwargs)).save_pretrained(path)


def test_combine_caps_the_rank_per_module_as_resize(tmp_path: Path) -> None:
    _peft_save(tmp_path / "big", r=40, lora_alpha=8, init_lora_weights=False)  # r > 32 = dims
    for method in ("svd", "ties"):
        rows = combine_adapters([tmp_path / "big"], tmp_path / f"out_{method}", method=method)
        assert {row.rank for row in rows} == {32}
        assert all(row.relative_error < 1e-5 for row in rows) or method == "ties"
    _peft_save(
        tmp_path / "pat",
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        rank_pattern={"layer.0.attention.self.query": 2},
    )
    rows = combine_adapters([tmp_path / "pat"], tmp_path / "out_pat", method="svd", rank=3)
    assert {row.module: row.rank for row in rows}[QUERY] == 2
    assert sorted(row.rank for row in rows) == [2, 3, 3, 3]
    resized = resize_adapter(tmp_path / "pat", tmp_path / "resized", 3)
    assert sorted(row.rank for row in resized) == [2, 3, 3, 3]


def test_combine_default_rank_is_the_largest_declared_as_peft(tmp_path: Path) -> None:
    # rank=None took max rᵢ per module: where rank_pattern lowered one input's rank, the sum of
    # a rank-2 and a rank-1 update was cut to 2 directions (0.318 off); PEFT keeps its new rank
    # (the largest r / rank_pattern entry, 4) there and is exact
    def trained(path: Path, seed: int, **kwargs) -> None:
        model = peft.get_peft_model(_bert(), peft.LoraConfig(target_modules=["query"], **kwargs))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.save_pretrained(path)

    pattern = {"layer.0.attention.self.query": 2}
    trained(tmp_path / "a", 1, r=4, lora_alpha=4, rank_pattern=pattern)
    trained(tmp_path / "b", 2, r=1, lora_alpha=1)
    for method in ("svd", "ties", "dare"):
        rows = combine_adapters(
            [tmp_path / "a", tmp_path / "b"], tmp_path / method, method=method, generator=0
        )
        ranks = {row.module: row.rank for row in rows}
        # layer 0 holds a rank-3 sum (svd keeps all of it: Σ rᵢ caps); layer 1 is cut to 4
        assert ranks[QUERY] == (3 if method == "svd" else 4), (method, ranks)
        assert ranks[QUERY.replace("layer.0", "layer.1")] == 4
    assert _row(combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "s2",
                                 method="svd")).relative_error < 1e-5  # fmt: skip


def test_amplification_of_an_adapter_with_r_above_the_dims(tmp_path: Path) -> None:
    _peft_save(
        tmp_path / "ad", r=40, lora_alpha=8, target_modules=["query"], init_lora_weights=False
    )
    rows = adapter_amplification(_bert(), tmp_path / "ad", generator=0)
    assert [row.amplification.rank for row in rows] == [32, 32]


def test_amplification_refuses_a_zero_adapter_and_caps_at_the_numerical_rank(
    tmp_path: Path,
) -> None:
    _peft_save(tmp_path / "zero", r=4, lora_alpha=8, target_modules=["query"])  # B = 0
    with pytest.raises(ValueError, match="'encoder.layer.0.attention.self.query'.*zero"):
        adapter_amplification(_bert(), tmp_path / "zero", generator=0)
    # a trained adapter whose update has rank 1 at r = 4: measured on its one direction
    model = peft.get_peft_model(
        _bert(),
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["query"], layers_to_transform=[0]),
    )
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
        layer.lora_B["default"].weight[:, 0] = torch.linspace(-1, 1, 32)
    model.save_pretrained(tmp_path / "rank1")
    row = _row(adapter_amplification(_bert(), tmp_path / "rank1", generator=0))
    W = _bert().get_submodule(QUERY).weight.detach().double()
    delta = (
        layer.lora_B["default"].weight.detach().double()
        @ layer.lora_A["default"].weight.detach().double()
    )
    expected = amplification(W, delta, rank=1, generator=0)
    assert row.amplification.rank == 1
    assert row.amplification.factor == pytest.approx(expected.factor, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amplification_default_rank_uses_the_input_precision(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 32, generator=gen, dtype=torch.float64)
    delta = torch.randn(32, 4, generator=gen, dtype=torch.float64) @ torch.randn(
        4, 32, generator=gen, dtype=torch.float64
    )
    reference = amplification(W, delta, generator=0)
    low = amplification(W.to(dtype), delta.to(dtype), generator=0)
    assert reference.rank == low.rank == 4  # was 30: float32 eps on float16 rounding noise
    assert low.factor == pytest.approx(reference.factor, rel=0.05)


def test_dora_adapters_analysed_by_their_whole_update_or_refused(tmp_path: Path) -> None:
    base = _bert()
    W0 = base.get_submodule(QUERY).weight.detach().double().clone()
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["query"], use_dora=True, init_lora_weights=False
        ),
    )
    with torch.no_grad():  # a trained magnitude vector
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(tmp_path / "dora")
    true_delta = model.merge_and_unload().get_submodule(QUERY).weight.detach().double() - W0
    with pytest.raises(AdapterFormatError, match="DoRA"):
        adapter_spectrum(tmp_path / "dora")
    row = _row(adapter_amplification(_bert(), tmp_path / "dora", generator=0))
    expected = amplification(W0, true_delta, rank=4, generator=0)
    assert row.amplification.delta_norm == pytest.approx(expected.delta_norm, rel=1e-6)
    assert row.amplification.factor == pytest.approx(expected.factor, rel=1e-6)


def _factors(seed: int, r: int = 3) -> Factors:
    gen = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(10, r, generator=gen), torch.randn(r, 12, generator=gen))


def test_combine_ties_dare_refuse_non_finite_and_mismatched_input() -> None:
    good, bad = _factors(0), _factors(1)
    bad.B[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"factors\[1\] B: expected finite"):
        combine([good, bad])
    for weights in ([1.0, math.nan], [math.inf, 1.0], ["1", 1.0]):
        with pytest.raises(ValueError, match="weights"):
            combine([good, _factors(2)], weights)
    d1, d2 = (f.B @ f.A for f in (_factors(3), _factors(4)))
    for merge in (ties_merge, dare_merge):
        with pytest.raises(ValueError, match="weights has 1 entries; deltas has 2"):
            merge([d1, d2], [1.0], density=0.5)
        with pytest.raises(ValueError, match="at least one"):
            merge([], [], density=0.5)
        with pytest.raises(ValueError, match=r"deltas\[1\] has shape"):
            merge([d1, d2[:, :5]], [1.0, 1.0], density=0.5)


def test_combine_adapters_refuses_non_finite_weights(tmp_path: Path) -> None:
    _peft_save(tmp_path / "a", r=2, lora_alpha=4, init_lora_weights=False)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        combine_adapters([tmp_path / "a"], tmp_path / "out", [math.nan])
    assert not (tmp_path / "out").exists()


def test_extract_refuses_integer_matrices() -> None:
    W = torch.arange(12).reshape(3, 4)
    with pytest.raises(TypeError, match="W_base must be a floating-point tensor"):
        extract(W, W + 1, 1)


@pytest.mark.parametrize("tail", [1e-7, 1e-10, 1e-12])
def test_factored_relative_error_is_accurate_for_tiny_errors(tail: float) -> None:
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 5, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 5, generator=gen, dtype=torch.float64))
    S = torch.tensor([3.0, 2.0, 1.0, 0.5, tail], dtype=torch.float64)
    reference = Factors(U * S, V.mT)
    approx = Factors(U[:, :4] * S[:4], V[:, :4].mT)
    expected = tail / float(torch.linalg.norm(S))
    assert factored_relative_error(reference, approx) == pytest.approx(expected, rel=1e-3)


def test_an_untrained_dora_adapter_is_refused(tmp_path: Path) -> None:
    model = peft.get_peft_model(
        _bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], use_dora=True)
    )  # B = 0: the update is float32 rounding noise of the magnitudes
    model.save_pretrained(tmp_path / "dora0")
    with pytest.raises(ValueError, match="update is zero"):
        adapter_amplification(_bert(), tmp_path / "dora0", generator=0)


@pytest.mark.parametrize("init", ["pissa_exact", "olora"])
def test_residual_adapters_are_refused_until_saved_for_the_original_base(
    init: str, tmp_path: Path
) -> None:
    # s·B A of a PiSSA/OLoRA adapter is not its update: s·B0 A0 left the base at init
    from rankwise.io import save_adapter
    from rankwise.lora import LoraConfig, inject

    model = inject(_bert(), LoraConfig(r=2, target_modules=["query"], init_lora_weights=init))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)  # trained
    save_adapter(model, tmp_path / "residual")
    on_disk = {"pissa_exact": "pissa", "olora": "olora"}[init]  # the file's value, PEFT's name
    assert (
        json.loads((tmp_path / "residual" / "adapter_config.json").read_text())["init_lora_weights"]
        == on_disk
    )
    for call in (
        lambda: adapter_spectrum(tmp_path / "residual"),
        lambda: combine_adapters([tmp_path / "residual"], tmp_path / "out"),
    ):
        with pytest.raises(
            AdapterFormatError, match=f"init_lora_weights='{on_disk}'.*for_original_base"
        ):
            call()
    assert not (tmp_path / "out").exists()
    save_adapter(model, tmp_path / "plain", for_original_base=True)
    rows = adapter_spectrum(tmp_path / "plain")
    merged = model.base_model if hasattr(model, "base_model") else model
    layer = dict(merged.named_modules())["encoder.layer.0.attention.self.query"]
    W = layer.base_layer.weight.detach() + layer.delta_weight()  # what the model computes
    update = W - dict(_bert().named_modules())["encoder.layer.0.attention.self.query"].weight
    top = torch.linalg.svdvals(update.detach().double())[0]
    assert math.isclose(float(_row(rows).spectrum.singular_values[0]), float(top), rel_tol=1e-4)


def test_combine_refuses_one_layer_named_under_two_prefixes(tmp_path: Path) -> None:
    # the same layers saved on a bare model and on a model that holds it: the union kept both
    # names, and PEFT applied one and skipped the other without a word
    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = _bert()

        def forward(self, **kwargs):
            return self.bert(**kwargs)

    _peft_save(tmp_path / "bare", r=2, lora_alpha=4, init_lora_weights=False)
    peft.get_peft_model(
        Holder(),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"], init_lora_weights=False),
    ).save_pretrained(tmp_path / "held")
    # different layers under the two prefixes (query held, key bare) were accepted too: the
    # union held both naming schemes and PEFT dropped half of it, with only a warning
    _peft_save(
        tmp_path / "bare_keys", r=2, lora_alpha=4, init_lora_weights=False, target_modules=["key"]
    )
    held = r"held' adapts 'bert\.encoder\.layer\.0\.attention\.self\.query' and "
    for other, named in (
        ("bare", r"'encoder\.layer\.0\.attention\.self\.query'"),
        ("bare_keys", r"modules under 'encoder\.layer\.0\.attention\.self'"),
    ):
        with pytest.raises(ValueError, match=held + rf".*{other}' {named}, the same part"):
            combine_adapters([tmp_path / other, tmp_path / "held"], tmp_path / "out")
        assert not (tmp_path / "out").exists()
    # disjoint layers of one model still combine (a zero update where an input lacks one)
    _peft_save(
        tmp_path / "keys", r=2, lora_alpha=4, init_lora_weights=False, target_modules=["key"]
    )
    rows = combine_adapters([tmp_path / "bare", tmp_path / "keys"], tmp_path / "union")
    assert {row.module.rsplit(".", 1)[1] for row in rows} == {"query", "value", "key"}


def test_combine_accepts_parts_of_one_model_whose_names_share_a_tail(tmp_path: Path) -> None:
    """A parent path ending in another adapter's top-level name is no prefix mismatch: the
    encoder and decoder adapters of a bert2bert model (``encoder.encoder...`` and
    ``decoder.bert.encoder...``), or modules ``1.0`` and ``0.1`` of a Sequential, were refused."""
    from safetensors.torch import save_file

    def write(path: Path, modules: list[str]) -> None:
        path.mkdir()
        g = torch.Generator().manual_seed(len(modules))
        tensors = {}
        for m in modules:
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(2, 8, generator=g)
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(8, 2, generator=g)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": modules}
        (path / "adapter_config.json").write_text(json.dumps(config))

    q = "layer.0.attention.self.query"
    pairs = [
        ([f"encoder.encoder.{q}"], [f"decoder.bert.encoder.{q}"]),
        (["1.0"], ["0.1"]),
        (["1.0.0"], ["0.0.1"]),
    ]
    for n, (first, second) in enumerate(pairs):
        write(tmp_path / f"a{n}", first)
        write(tmp_path / f"b{n}", second)
        rows = combine_adapters([tmp_path / f"a{n}", tmp_path / f"b{n}"], tmp_path / f"out{n}")
        assert {row.module for row in rows} == {*first, *second}


def test_a_non_finite_adapter_is_refused_by_key_everywhere(tmp_path: Path) -> None:
    """A diverged run's adapter: amplification died in LAPACK (a traceback through the CLI),
    the others named only ``M``; now each names the key. A NaN base weight is named too."""
    from safetensors.torch import load_file, save_file

    from rankwise.analysis import adapter_similarity

    _peft_save(tmp_path / "good", r=4, lora_alpha=8, init_lora_weights=False)
    _peft_save(tmp_path / "nan", r=4, lora_alpha=8, init_lora_weights=False)
    file = tmp_path / "nan" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = f"base_model.model.{QUERY}.lora_A.weight"
    tensors[key][1, 2] = math.inf
    save_file(tensors, file)
    calls = (
        lambda: adapter_amplification(_bert(), tmp_path / "nan", generator=0),
        lambda: adapter_spectrum(tmp_path / "nan"),
        lambda: adapter_similarity(tmp_path / "good", tmp_path / "nan"),
        lambda: resize_adapter(tmp_path / "nan", tmp_path / "out", rank=2),
    )
    for call in calls:
        with pytest.raises(AdapterFormatError, match=f"'{key}' holds NaN or inf"):
            call()
    assert not (tmp_path / "out").exists()
    model = _bert()
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=f"module '{QUERY}': the model's weight holds NaN"):
        adapter_amplification(model, tmp_path / "good", generator=0)


def test_a_conv_adapter_is_refused_as_such(tmp_path: Path) -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    peft.get_peft_model(conv, peft.LoraConfig(r=2, target_modules=["0"])).save_pretrained(tmp_path)
    with pytest.raises(AdapterFormatError, match="module '0' is a convolution adapter"):
        adapter_spectrum(tmp_path)


def test_a_small_trained_bfloat16_dora_update_is_measured(tmp_path: Path) -> None:
    """A trained DoRA update of ~1% of ‖W‖₂ stored in bfloat16 was called zero (the noise
    floor was 2·eps·‖W‖₂ = 1.6%; the rounding of an untrained one is below eps/2). One far
    below the rounding is refused as too small, not as untrained."""
    W = _bert().encoder.layer[0].attention.self.query.weight.detach().double()
    for scale, size_range in (
        (2.5e-4, (0.006, 0.015)),
        (1e-6, (0, 0.004)),
    ):  # B A tiny: bfloat16 noise
        model = peft.get_peft_model(
            _bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[QUERY], use_dora=True)
        )
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        directory = tmp_path / f"dora_{scale}"
        model.to(torch.bfloat16).save_pretrained(directory)
        merged = peft.PeftModel.from_pretrained(_bert(), directory).merge_and_unload()
        delta = merged.encoder.layer[0].attention.self.query.weight.detach().double() - W
        size = float(torch.linalg.matrix_norm(delta, 2) / torch.linalg.matrix_norm(W, 2))
        assert size_range[0] <= size < size_range[1]
        if scale < 1e-5:
            with pytest.raises(ValueError, match=r"within the rounding of its torch.bfloat16"):
                adapter_amplification(_bert(), directory, generator=0)
            # factors of two dtypes (PEFT loads them): the check multiplied them as stored
            from safetensors.torch import load_file, save_file

            file = directory / "adapter_model.safetensors"
            save_file(
                {k: v.float() if "lora_A" in k else v for k, v in load_file(file).items()}, file
            )
            with pytest.raises(ValueError, match=r"within the rounding of its torch.bfloat16"):
                adapter_amplification(_bert(), directory, generator=0)
            continue
        (row,) = adapter_amplification(_bert(), directory, generator=0)
        assert row.amplification.rank >= 1
        assert row.amplification.delta_norm == pytest.approx(float(delta.norm()), rel=0.02)


def test_write_factors_leaves_nothing_behind_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights used to be written before the config, each atomically but not together:
    a failure between left a weights-only directory that every retry refused as not empty."""
    from rankwise.analysis import adapter_files, read_factors, write_factors

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    factors = {"layer": _factors(0)}
    monkeypatch.setattr(adapter_files, "write_adapter_config", disk_full)
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "new" / "deeper" / "out", tmp_path / "empty"):
        with pytest.raises(OSError, match="No space left"):
            write_factors(target, factors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert not any((tmp_path / "empty").iterdir())
    monkeypatch.undo()
    write_factors(tmp_path / "empty", factors)  # the retry works
    torch.testing.assert_close(read_factors(tmp_path / "empty")["layer"].A, factors["layer"].A)


def test_extract_warns_about_named_targets_that_did_not_change(tmp_path: Path) -> None:
    import copy

    from rankwise.analysis import extract_adapter

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned[0].weight.add_(0.1)
    with pytest.warns(UserWarning, match=r"1 of 2 layers are equal in both models \('1'\)"):
        extract_adapter(base, tuned, tmp_path / "named", rank=2, targets=["0", "1"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # by default only changed layers are extracted
        report = extract_adapter(base, tuned, tmp_path / "default", rank=2)
    assert [row.module for row in report.layers] == ["0"]


def test_combine_adapters_names_the_source_of_another_size(tmp_path: Path) -> None:
    # the per-module check counted only the adapters holding the module: "factors[1]" for
    # the third source, and no directory
    for name in ("a", "b"):
        _peft_save(tmp_path / name, r=2, lora_alpha=4, init_lora_weights=False)
    config = transformers.BertConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        vocab_size=100,
    )  # fmt: skip
    peft.get_peft_model(
        transformers.BertModel(config),
        peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False),
    ).save_pretrained(tmp_path / "wide")
    sources = [tmp_path / "a", tmp_path / "b", tmp_path / "wide"]
    with pytest.raises(
        ValueError, match=r"wide' \(sources\[2\]\) holds a \(48, 48\) update, .*a' \(sources\[0\]\)"
    ):
        combine_adapters(sources, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _wide_bert(layers: int) -> torch.nn.Module:
    config = transformers.BertConfig(
        hidden_size=48, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
        vocab_size=100,
    )  # fmt: skip
    torch.manual_seed(1)
    return transformers.BertModel(config).eval()


def test_combine_adapters_refuses_other_layers_of_a_model_of_another_size(
    tmp_path: Path,
) -> None:
    # only modules of the same name were compared: adapters on other layers of a wider model
    # were combined into a file no model loads
    _peft_save(tmp_path / "a", r=2, target_modules=["query"], init_lora_weights=False)
    peft.get_peft_model(
        _wide_bert(4),
        peft.LoraConfig(
            r=2, target_modules=["query"], layers_to_transform=[2, 3], init_lora_weights=False
        ),
    ).save_pretrained(tmp_path / "wide")
    with pytest.raises(
        ValueError,
        match=r"layer\.[23]\.attention\.self\.query': .*wide' \(sources\[1\]\) holds a "
        r"\(48, 48\) update, .*a' \(sources\[0\]\) a \(32, 32\) one for the same module of "
        r"another layer",
    ):
        combine_adapters([tmp_path / "a", tmp_path / "wide"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_combine_adapters_warns_when_nothing_shows_one_model(tmp_path: Path) -> None:
    # no common module and no recorded base model: a wider model's adapter was combined
    # without a word (PEFT then refused the result with a size mismatch)
    _peft_save(tmp_path / "a", r=2, target_modules=["query", "value"], init_lora_weights=False)
    peft.get_peft_model(
        _wide_bert(2), peft.LoraConfig(r=2, target_modules=["key"], init_lora_weights=False)
    ).save_pretrained(tmp_path / "wide")
    with pytest.warns(RuntimeWarning, match=r"adapt no common module .* cannot check"):
        combine_adapters([tmp_path / "a", tmp_path / "wide"], tmp_path / "out")
    # adapters of the same modules (or layers of them): nothing to warn about
    _peft_save(tmp_path / "b", r=2, target_modules=["value"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "out2")


@pytest.mark.parametrize("method", ["svd", "ties"])
def test_combine_half_precision_adapters_with_a_large_weight(tmp_path: Path, method: str) -> None:
    # the report's exact sum was formed in float16 and overflowed, refusing a combination
    # whose own factors were finite (max |B| ~ 1e3), with an error naming no module
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model = peft.get_peft_model(
            _bert(), peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)
        )
        model.half().save_pretrained(tmp_path / name)
    rows = combine_adapters(
        [tmp_path / "a", tmp_path / "b"], tmp_path / method, [1e5, 1.0], method=method
    )
    assert rows and all(math.isfinite(row.relative_error) for row in rows)
    if method == "svd":  # rank 2 of a sum dominated by one rank-2 update
        assert max(row.relative_error for row in rows) < 1e-3
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / method / "adapter_model.safetensors")
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in tensors.values())


def test_linear_combine_refuses_a_rank_up_front_and_overflow_names_the_weights(
    tmp_path: Path,
) -> None:
    _peft_save(tmp_path / "a", r=2, lora_alpha=4, init_lora_weights=False)
    # the error named a module ("module 'encoder...key': ... takes no rank"), not the argument
    with pytest.raises(ValueError, match=r"^rank: method='linear' is exact"):
        combine_adapters([tmp_path / "a"], tmp_path / "out", rank=3)
    assert not (tmp_path / "out").exists()
    # weights=None: the overflow message was built from list(None), a TypeError
    half = Factors(torch.ones(4, 1, dtype=torch.float16), torch.ones(1, 4, dtype=torch.float16))
    big = Factors(torch.full((4, 1), 1e5), torch.ones(1, 4))  # float32, beyond float16's range
    with pytest.raises(ValueError, match=r"weights: \[1\.0, 1\.0\] scale the factors beyond"):
        combine([half, big])


def test_similarity_names_the_module_and_reports_what_it_leaves_out(tmp_path: Path) -> None:
    # an untrained B said only "factor B is all zeros"; modules in one adapter only were
    # dropped without a word; the same layers saved on two model classes "share no module"
    from rankwise.analysis import adapter_similarity

    _peft_save(tmp_path / "qv", r=4, lora_alpha=8, init_lora_weights=False)
    _peft_save(tmp_path / "untrained", r=4, lora_alpha=8)  # B = 0
    _peft_save(tmp_path / "q", r=4, lora_alpha=8, init_lora_weights=False, target_modules=["query"])
    with pytest.raises(
        ValueError, match=rf"module '{QUERY}' \(.*qv vs .*untrained\): X2 \(factor B\) is all zeros"
    ):
        adapter_similarity(tmp_path / "qv", tmp_path / "untrained", factor="B")
    with pytest.warns(RuntimeWarning, match=r"qv: 2 module\(s\) the other adapter does not adapt"):
        rows = adapter_similarity(tmp_path / "qv", tmp_path / "q")
    assert {row.module for row in rows} == {QUERY, QUERY.replace("layer.0", "layer.1")}
    head = transformers.BertForSequenceClassification(_bert().config)
    peft.get_peft_model(
        head, peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
    ).save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match="under another prefix .*cannot be paired by name"):
        adapter_similarity(tmp_path / "cls", tmp_path / "qv")


def test_a_float16_adapter_with_a_large_scale_stays_finite(tmp_path: Path) -> None:
    # s·B was formed in float16: r = 1, alpha = 256 and |B| ~ 1e3 overflowed to inf, and the
    # spectrum failed naming only "M" (PEFT's delta weight, in float32, is finite)
    from safetensors.torch import load_file, save_file

    _peft_save(tmp_path / "a", r=1, lora_alpha=256, init_lora_weights=False)
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = {k: (v * 3000 if "lora_B" in k else v).half() for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    rows = adapter_spectrum(tmp_path / "a")
    for row in rows:
        key = f"base_model.model.{row.module}"
        B, A = tensors[f"{key}.lora_B.weight"].double(), tensors[f"{key}.lora_A.weight"].double()
        expected = torch.linalg.matrix_norm(256 * B @ A, ord=2)
        got = row.spectrum.singular_values[0].double()
        assert torch.isfinite(got) and abs(float(got / expected) - 1) < 1e-3


def test_similarity_warns_when_a_factor_has_fewer_directions_than_rows(tmp_path: Path) -> None:
    # φ past a factor's numerical rank compares directions its SVD made up (a rank-2 r=8 factor
    # against itself rotated: φ(8, 8) = 0.54), and the table showed it without a word
    import warnings

    from safetensors.torch import load_file, save_file

    from rankwise.analysis import adapter_similarity

    _peft_save(tmp_path / "full", r=4, lora_alpha=8, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full-rank factors: nothing to say
        adapter_similarity(tmp_path / "full", tmp_path / "full")
    _peft_save(tmp_path / "low", r=4, lora_alpha=8, init_lora_weights=False)
    file = tmp_path / "low" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = f"base_model.model.{QUERY}.lora_A.weight"
    tensors[key][2:] = tensors[key][:2] * 0.5  # rows 3 and 4 repeat rows 1 and 2
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.warns(RuntimeWarning, match=rf"{QUERY} in .*low: rank 2 of 4\).*arbitrary"):
        adapter_similarity(tmp_path / "low", tmp_path / "full")


def test_a_bfloat16_adapter_stays_bfloat16_through_read_and_combine(tmp_path: Path) -> None:
    # s·B came back float32 beside a bfloat16 A: B @ A failed and combine wrote float32 files
    from safetensors.torch import load_file, save_file

    from rankwise.analysis import read_factors

    _peft_save(tmp_path / "a", r=4, lora_alpha=8, init_lora_weights=False)
    file = tmp_path / "a" / "adapter_model.safetensors"
    save_file(
        {k: v.bfloat16() for k, v in load_file(file).items()}, file, metadata={"format": "pt"}
    )
    for B, A in read_factors(tmp_path / "a").values():
        assert B.dtype == A.dtype == torch.bfloat16
        assert (B @ A).dtype == torch.bfloat16
    combine_adapters([tmp_path / "a", tmp_path / "a"], tmp_path / "out", method="linear")
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {v.dtype for k, v in written.items() if "lora_" in k} == {torch.bfloat16}


def test_a_lora_b_without_its_lora_a_is_refused(tmp_path: Path) -> None:
    """Modules were gathered from the lora_A keys: a lora_B without one was skipped, its
    update left out of the spectrum, similarity and combine results."""
    from safetensors.torch import load_file, save_file

    from rankwise.analysis import read_factors

    _peft_save(tmp_path / "a", r=4, lora_alpha=8, init_lora_weights=False)
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    dropped = next(k for k in tensors if k.endswith("value.lora_A.weight"))
    del tensors[dropped]
    save_file(tensors, file, metadata={"format": "pt"})
    orphan = dropped.replace("lora_A", "lora_B")
    with pytest.raises(AdapterFormatError, match=rf"key '{re.escape(orphan)}' has no matching"):
        read_factors(tmp_path / "a")


def test_combine_adapters_of_stages_of_other_widths_in_one_model(tmp_path: Path) -> None:
    # Swin's stages differ in width: adapters on stage 0's and stage 1's blocks were refused
    # as "models of other sizes" once every list index counted as a layer
    config = transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2
    )
    for stage in (0, 1):
        torch.manual_seed(0)
        target = rf".*layers\.{stage}\.blocks\.\d+\.attention\.q_proj"
        peft.get_peft_model(
            transformers.SwinModel(config),
            peft.LoraConfig(r=2, target_modules=target, init_lora_weights=False),
        ).save_pretrained(tmp_path / f"stage{stage}")
    rows = combine_adapters([tmp_path / "stage0", tmp_path / "stage1"], tmp_path / "out")
    assert len(rows) == 4
