"""Model- and directory-level analysis on a tiny BERT, checked against the real PEFT."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from rankwise.analysis import (  # noqa: E402
    Factors,
    adapter_amplification,
    adapter_similarity,
    adapter_spectrum,
    amplification,
    combine_adapters,
    extract_adapter,
    read_factors,
    resize_adapter,
)
from rankwise.analysis.adapter_files import read_config, read_extras  # noqa: E402
from rankwise.errors import AdapterFormatError  # noqa: E402

QV = ("query", "value")


def _bert(seed: int = 0) -> torch.nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 99, (3, 7), generator=g)}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).logits


def _finetune(base: torch.nn.Module, ranks: dict[str, int], seed: int) -> torch.nn.Module:
    """A copy of base whose attention layers get an exact rank-ranks[kind] update."""
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for name, module in tuned.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in ranks:
            out, inp = module.weight.shape
            B = torch.randn(out, ranks[kind], generator=g) * 0.3
            A = torch.randn(ranks[kind], inp, generator=g) * 0.3
            module.weight.data += B @ A
    return tuned


def _peft_logits(base: torch.nn.Module, directory: Path) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory))
    return _logits(model.eval())


def test_extracted_adapter_reproduces_the_finetuned_model_in_peft(tmp_path: Path) -> None:
    base = _bert()
    tuned = _finetune(base, {"query": 2, "value": 2}, seed=1)
    report = extract_adapter(base, tuned, tmp_path / "ad", rank=2)
    assert len(report.layers) == 4 and report.uncaptured == ()
    assert all(row.rank == 2 and row.relative_error < 1e-5 for row in report.layers)
    assert not torch.allclose(_logits(base), _logits(tuned), atol=1e-3)
    torch.testing.assert_close(
        _peft_logits(base, tmp_path / "ad"), _logits(tuned), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_finetune_of_a_float32_base_adapts_only_what_changed(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """Compared with the float32 base as stored, every layer of a model saved in float16
    differed by rounding: all linear layers got adapters of pure rounding noise and the
    embeddings were listed as not captured. The base is compared (and subtracted) at the
    fine-tuned model's precision."""
    base = _bert()
    tuned = _finetune(base, {"query": 2, "value": 2}, seed=1).to(dtype)
    report = extract_adapter(base, tuned, tmp_path / "ad", rank=2)
    assert (
        sorted(row.module.rsplit(".", 1)[-1] for row in report.layers)
        == ["query"] * 2 + ["value"] * 2
    )
    assert report.uncaptured == ()
    assert all(row.relative_error < 1e-2 for row in report.layers)


def test_extract_by_energy_writes_per_layer_ranks(tmp_path: Path) -> None:
    base = _bert()
    tuned = _finetune(base, {"query": 1, "value": 3}, seed=2)
    tuned.bert.pooler.dense.bias.data += 1.0  # changed, but not a linear weight: reported
    report = extract_adapter(base, tuned, tmp_path / "ad", energy=0.99999, targets=QV)
    ranks = {row.module.rsplit(".", 1)[-1]: row.rank for row in report.layers}
    assert ranks == {"query": 1, "value": 3}
    assert report.uncaptured == ("bert.pooler.dense.bias",)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["rank_pattern"]) == 2
    # PEFT reproduces the attention updates; the pooler bias is not part of the adapter.
    tuned.bert.pooler.dense.bias.data -= 1.0
    torch.testing.assert_close(
        _peft_logits(base, tmp_path / "ad"), _logits(tuned), atol=1e-5, rtol=0
    )


def _peft_adapter(
    base: torch.nn.Module, directory: Path, *, r: int, seed: int, **kw: object
) -> dict:
    """Save a PEFT adapter with random (non-zero) A and B; return PEFT's own delta weights."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, target_modules=list(QV), init_lora_weights=False, **kw)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(str(directory))
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


@pytest.mark.parametrize(
    "options",
    [{"lora_alpha": 16}, {"lora_alpha": 4, "use_rslora": True, "rank_pattern": {"value": 2}}],
)
def test_read_factors_of_a_peft_adapter_is_its_delta_weight(tmp_path: Path, options: dict) -> None:
    deltas = _peft_adapter(_bert(), tmp_path, r=4, seed=3, **options)
    factors = read_factors(tmp_path)
    assert sorted(factors) == sorted(deltas)
    for name, (B, A) in factors.items():
        torch.testing.assert_close(B @ A, deltas[name])


def test_resize_adapter_is_the_best_rank_k_and_loads_in_peft(tmp_path: Path) -> None:
    base = _bert()
    _peft_adapter(base, tmp_path / "r8", r=8, seed=4, lora_alpha=8)
    report = resize_adapter(tmp_path / "r8", tmp_path / "r3", 3)
    assert [row.rank for row in report] == [3] * 4 and all(row.source_rank == 8 for row in report)
    source, resized = read_factors(tmp_path / "r8"), read_factors(tmp_path / "r3")
    for row in report:
        dense = (source[row.module].B @ source[row.module].A).double()
        U, S, Vh = torch.linalg.svd(dense)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        got = resized[row.module].B.double() @ resized[row.module].A.double()
        torch.testing.assert_close(got, best, atol=1e-5, rtol=0)
        assert row.relative_error == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-4)
    # PEFT loads it and equals the base with the truncated updates merged in.
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    for name, (B, A) in resized.items():
        modules[name].weight.data += B @ A
    torch.testing.assert_close(
        _peft_logits(base, tmp_path / "r3"), _logits(merged), atol=1e-5, rtol=0
    )


def test_combine_adapters_linear_is_exact_and_loads_in_peft(tmp_path: Path) -> None:
    base = _bert()
    d1 = _peft_adapter(base, tmp_path / "a", r=4, seed=5, lora_alpha=8)
    d2 = _peft_adapter(base, tmp_path / "b", r=2, seed=6, lora_alpha=2)
    report = combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", [0.7, -0.4])
    assert all(row.rank == 6 and row.relative_error < 1e-6 for row in report)
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    for name in d1:
        modules[name].weight.data += 0.7 * d1[name] - 0.4 * d2[name]
    torch.testing.assert_close(
        _peft_logits(base, tmp_path / "ab"), _logits(merged), atol=1e-5, rtol=0
    )
    svd = combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "svd", method="svd", rank=3)
    assert all(row.rank == 3 and 0 < row.relative_error < 1 for row in svd)


def test_similarity_spectrum_and_amplification_of_adapters(tmp_path: Path) -> None:
    base = _bert()
    deltas = _peft_adapter(base, tmp_path / "a", r=4, seed=7, lora_alpha=8)
    for row in adapter_similarity(tmp_path / "a", tmp_path / "a", factor="B"):
        torch.testing.assert_close(row.phi, torch.ones(4, 4, dtype=row.phi.dtype))
    spectra = {row.module: row for row in adapter_spectrum(tmp_path / "a")}
    modules = dict(base.named_modules())
    for name, delta in deltas.items():
        S = torch.linalg.svdvals(delta.double())
        torch.testing.assert_close(
            spectra[name].spectrum.singular_values.double(), S[:4], rtol=1e-5, atol=1e-6
        )
    rows = adapter_amplification(base.bert, tmp_path / "a", generator=0)  # BertModel: suffix names
    for row in rows:
        W = modules[row.module].weight.detach().double()
        direct = amplification(W, deltas[row.module].double(), rank=4)
        assert row.amplification.factor == pytest.approx(direct.factor, rel=1e-6)
        assert row.amplification.rank == 4


def test_directory_errors_name_the_culprit(tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        read_factors(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(AdapterFormatError, match="IA3"):
        read_factors(tmp_path)
    base = _bert()
    with pytest.raises(ValueError, match="no linear layer differs"):
        extract_adapter(base, copy.deepcopy(base), tmp_path / "x", rank=2)
    with pytest.raises(KeyError, match="nosuch"):
        extract_adapter(
            base, _finetune(base, {"query": 1}, 0), tmp_path / "x", rank=1, targets=["nosuch"]
        )
    assert isinstance(Factors(torch.ones(2, 1), torch.ones(1, 2)), tuple)


def _peft_with_head(base: torch.nn.Module, directory: Path, *, seed: int, **kw: object):
    """A PEFT SEQ_CLS adapter (trained classifier head saved with it), random factors."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4, target_modules=list(QV), init_lora_weights=False, task_type="SEQ_CLS", **kw
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "classifier" in name and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    model.eval().save_pretrained(str(directory))
    return model


@pytest.mark.parametrize("bias", ["none", "all"])
def test_resize_keeps_the_trained_head_and_biases(tmp_path: Path, bias: str) -> None:
    """resize at full rank changes nothing: the trained classifier (and bias="all" biases)
    are carried, so PEFT's logits of source and result agree (they were dropped before)."""
    base = _bert()
    source = _peft_with_head(base, tmp_path / "src", seed=7, bias=bias)
    resize_adapter(tmp_path / "src", tmp_path / "same", 4)
    assert read_config(tmp_path / "same").bias == bias
    torch.testing.assert_close(
        _peft_logits(base, tmp_path / "same"), _logits(source), atol=1e-5, rtol=0
    )


def test_combine_carries_a_shared_head_and_refuses_differing_ones(tmp_path: Path) -> None:
    base = _bert()
    _peft_with_head(base, tmp_path / "a", seed=8)
    # a second adapter with the same head: only the factors differ
    b = _peft_with_head(base, tmp_path / "b", seed=8)
    with torch.no_grad():
        for name, p in b.named_parameters():
            if ".lora_B." in name:
                p.mul_(2)
    b.save_pretrained(str(tmp_path / "b"))
    combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", [0.5, 0.5])
    head = {k: v for k, v in read_extras(tmp_path / "a").items() if "classifier" in k}
    assert head and all(torch.equal(read_extras(tmp_path / "ab")[k], v) for k, v in head.items())
    _peft_with_head(base, tmp_path / "c", seed=9)  # another head
    with pytest.raises(ValueError, match="non-LoRA tensors .* differ"):
        combine_adapters([tmp_path / "a", tmp_path / "c"], tmp_path / "ac")
    assert not (tmp_path / "ac").exists()
    # or the head of one of them, by choice
    combine_adapters([tmp_path / "a", tmp_path / "c"], tmp_path / "ac", extras_from=1)
    theirs = read_extras(tmp_path / "c")
    assert theirs.keys() == read_extras(tmp_path / "ac").keys()
    assert all(torch.equal(read_extras(tmp_path / "ac")[k], v) for k, v in theirs.items())
    with pytest.raises(ValueError, match="extras_from: expected an index in \\[0, 1\\]"):
        combine_adapters([tmp_path / "a", tmp_path / "c"], tmp_path / "ac2", extras_from=2)


def test_derived_adapters_refuse_dora_adalora_mixed_models_and_existing_output(
    tmp_path: Path,
) -> None:
    base = _bert()
    _peft_adapter(base, tmp_path / "dora", r=4, seed=1, use_dora=True)
    with pytest.raises(AdapterFormatError, match="DoRA adapter .* cannot be resized"):
        resize_adapter(tmp_path / "dora", tmp_path / "out", 2)
    torch.manual_seed(0)
    ada = peft.get_peft_model(
        copy.deepcopy(base), peft.AdaLoraConfig(r=4, target_modules=list(QV), total_step=10)
    )
    ada.save_pretrained(str(tmp_path / "ada"))
    with pytest.raises(AdapterFormatError, match="peft_type ADALORA; .* plain LoRA"):
        resize_adapter(tmp_path / "ada", tmp_path / "out", 2)
    _peft_adapter(base, tmp_path / "a", r=4, seed=2)
    _peft_adapter(base, tmp_path / "b", r=4, seed=3)
    for name, model_id in (("a", "org/bert-a"), ("b", "org/gpt-b")):
        path = tmp_path / name / "adapter_config.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": model_id})
        )
    with pytest.raises(ValueError, match="base_model_name_or_path differs"):
        combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    before = (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not an empty directory"):
        resize_adapter(tmp_path / "a", tmp_path / "b", 2)  # another adapter is never overwritten
    assert (tmp_path / "b" / "adapter_model.safetensors").read_bytes() == before
    assert not (tmp_path / "out").exists()


def test_a_rank_pattern_entry_sets_only_its_own_module(tmp_path: Path) -> None:
    """PEFT matches a rank_pattern key against every dotted suffix of a module name: the key
    '1' written for module '1' (rank 2) also gave module '0.1' rank 2, and its rank-4 factors
    failed to load ("size mismatch for ...0.1.lora_A")."""
    from torch import nn

    from rankwise.io import load_adapter

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 8))

    base, tuned = net(), net()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module, rank in ((tuned[0][0], 4), (tuned[0][1], 4), (tuned[1], 2)):
            module.weight += torch.randn(8, rank, generator=g) @ torch.randn(rank, 8, generator=g)
    report = extract_adapter(base, tuned, tmp_path / "ad", energy=0.999999)
    assert {row.module: row.rank for row in report.layers} == {"0.0": 4, "0.1": 4, "1": 2}
    x = torch.randn(3, 8, generator=g)
    with torch.no_grad():
        expected = tuned(x)
        theirs = peft.PeftModel.from_pretrained(net(), str(tmp_path / "ad")).eval()(x)
        ours = load_adapter(net(), tmp_path / "ad")(x)
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-4 * expected.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * expected.abs().max())
