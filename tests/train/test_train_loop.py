"""The training loop on tiny models: resume is bit-identical, accumulation is exact, only the
adapter trains, causal LM masks prompts, a fixed seed repeats itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise.train import TrainConfig, train
from rankwise.train.loop import fused_adamw
from rankwise.train.metrics import read_metrics


def _quiet(_: str) -> None:
    pass


def _config(model: Path, data: Path, out: Path, **changes) -> TrainConfig:
    base = {
        "model": str(model),
        "data": str(data),
        "output": str(out),
        "batch_size": 8,
        "lr": 5e-3,
        "save_every": 0,
    }
    base.update(changes)
    return TrainConfig(**base)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_the_optimizer_is_torchs_fused_adamw(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # one pass per parameter instead of the single-tensor loop's ~10 (benchmarks/adamw.py)
    train(_config(tiny_bert, toy_tsv, tmp_path, max_steps=2, save_every=1), echo=_quiet)
    state_file = tmp_path / "checkpoints" / "step-000001" / "state.pt"  # the last: the adapter
    state = torch.load(state_file, weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert groups and all(g["fused"] is True for g in groups)


def test_fused_adamw_needs_floating_point_cpu_or_gpu_parameters() -> None:
    def groups(*params: torch.Tensor) -> list[dict]:
        return [{"params": list(params)}]

    w = torch.nn.Parameter(torch.zeros(2, 2))
    assert fused_adamw(groups(w, torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))))
    assert not fused_adamw(groups(w, torch.nn.Parameter(torch.zeros(2, device="meta"))))
    assert not fused_adamw(groups(w, torch.zeros(2, dtype=torch.int64)))
    assert not fused_adamw([{"params": []}])


@pytest.mark.slow
def test_resume_after_a_stop_is_bit_identical(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # LoRA dropout and model dropout on: the RNG state must be restored for identical results.
    common = {"max_steps": 9, "save_every": 2, "grad_accum": 2, "model_dropout": 0.1}
    train(_config(tiny_bert, toy_tsv, tmp_path / "whole", **common), echo=_quiet)
    stopped = train(
        _config(tiny_bert, toy_tsv, tmp_path / "cut", **common), echo=_quiet, stop_after=5
    )
    assert stopped.steps == 5 and not (tmp_path / "cut" / "adapter").exists()
    resumed = train(
        _config(tiny_bert, toy_tsv, tmp_path / "cut", resume=True, **common), echo=_quiet
    )
    assert resumed.resumed_from == 4 and resumed.steps == 9
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "whole/adapter/adapter_model.safetensors").read_bytes() == (
        tmp_path / "cut/adapter/adapter_model.safetensors"
    ).read_bytes()
    losses = [
        [r["loss"] for r in read_metrics(p / "metrics.jsonl") if "loss" in r]
        for p in (tmp_path / "whole", tmp_path / "cut")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 9


def test_grad_accumulation_equals_the_big_batch(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    off = {"max_steps": 4, "dropout": 0.0, "model_dropout": 0.0}
    big = _config(tiny_bert, toy_tsv, tmp_path / "big", batch_size=16, **off)
    small = _config(tiny_bert, toy_tsv, tmp_path / "small", batch_size=4, grad_accum=4, **off)
    train(big, echo=_quiet)
    train(small, echo=_quiet)
    a, b = _adapter(tmp_path / "big"), _adapter(tmp_path / "small")
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-4  # the adapter did train
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_only_adapter_and_head_change_and_merge_is_exact(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    result = train(
        _config(tiny_bert, toy_tsv, tmp_path / "o", max_steps=3, merge=True), echo=_quiet
    )
    assert result.merge_check is not None and result.merge_check.identical
    assert 0 < result.trainable < result.total
    keys = _adapter(tmp_path / "o").keys()
    assert all(".lora_A." in k or ".lora_B." in k or ".classifier." in k for k in keys)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o" / "merged")
    ids = torch.tensor([[101, 2307, 3185, 102]])
    assert merged.config.id2label == {0: "0", 1: "1"}
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    assert torch.equal(
        base_sd["bert.embeddings.word_embeddings.weight"],
        merged_sd["bert.embeddings.word_embeddings.weight"],
    )
    assert not torch.equal(
        base_sd["bert.encoder.layer.0.attention.self.query.weight"],
        merged_sd["bert.encoder.layer.0.attention.self.query.weight"],
    )
    merged.eval()
    assert merged(input_ids=ids).logits.shape == (1, 2)
    task = json.loads((tmp_path / "o" / "adapter" / "rankwise_task.json").read_text())
    assert task["label_names"] == ["0", "1"] and task["task"] == "classification"


def test_a_fixed_seed_repeats_its_metrics(tiny_bert: Path, toy_tsv: Path, tmp_path: Path) -> None:
    runs = [
        train(
            _config(tiny_bert, toy_tsv, tmp_path / str(i), max_steps=3, method="full"), echo=_quiet
        )
        for i in range(2)
    ]
    metrics = [
        [
            {k: v for k, v in r.items() if k != "examples_per_s"}
            for r in read_metrics(tmp_path / str(i) / "metrics.jsonl")
        ]
        for i in range(2)
    ]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 5  # before, 3 steps, after
    assert runs[0].after.loss == runs[1].after.loss
    assert runs[0].after.predictions == runs[1].after.predictions
    assert (tmp_path / "0" / "model" / "config.json").is_file()


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_causal_lm_with_prompt_masking(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model = request.getfixturevalue(fixture)
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"question {i} :", "response": "yes" if i % 2 else "no no"} for i in range(40)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    targets = ("c_attn", "c_proj") if fixture == "tiny_gpt2" else ("q_proj", "v_proj")
    config = _config(
        model,
        data,
        tmp_path / "run",
        task="causal-lm",
        max_steps=12,
        lr=2e-2,
        targets=targets,
        eval_split=8.0,
    )
    result = train(config, echo=_quiet)
    assert result.before is not None and result.after is not None
    assert result.after.perplexity is not None and result.after.accuracy is None
    assert result.after.perplexity < 0.8 * result.before.perplexity  # 2 answers: learnable
    assert result.merge_check is not None and result.merge_check.identical


def test_causal_loss_counts_only_response_tokens(tiny_gpt2: Path) -> None:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rankwise.train.batching import collate, encode
    from rankwise.train.data import TextDataset
    from rankwise.train.evaluate import loss_sum

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ds = TextDataset(("yes it is", "no"), None, (), ("is it ?", "well , is it"), "t")
    enc = encode(ds, tok, task="causal-lm", max_length=32)
    batch = collate(enc, [0, 1], pad_id=tok.pad_token_id)
    with torch.no_grad():
        got, logits = loss_sum(model, batch, "causal-lm")
        expected = torch.tensor(0.0)
        for b in range(2):
            ids = list(enc.input_ids[b])
            bos = 0 if tok.bos_token_id is None else 1
            start = len(tok(ds.prompts[b], add_special_tokens=False)["input_ids"]) + bos
            row = model(input_ids=torch.tensor([ids])).logits[0]  # unpadded: (seq, vocab)
            for t in range(start, len(ids)):  # predict token t from position t - 1
                expected += F.cross_entropy(row[t - 1], torch.tensor(ids[t]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_resume_refuses_a_different_global_batch(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(_config(tiny_bert, toy_tsv, out, max_steps=4, save_every=1), echo=_quiet, stop_after=1)
    changed = _config(tiny_bert, toy_tsv, out, max_steps=4, save_every=1, batch_size=4, resume=True)
    with pytest.raises(ValueError, match="examples per step"):
        train(changed, echo=_quiet)


def test_tied_target_merge_is_refused_before_training(tiny_gpt2: Path, tmp_path: Path) -> None:
    """lm_head is tied to wte in GPT-2: --merge is refused before any step or file, and
    without --merge the run finishes, its merge check skipped with the reason."""
    from rankwise.errors import ConfigError

    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q {i} :", "response": "yes"} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    kwargs = dict(task="causal-lm", max_steps=2, targets=("c_attn", "lm_head"), eval_split=8.0)
    with pytest.raises(ConfigError, match="--merge: the weight of 'lm_head' is tied"):
        train(_config(tiny_gpt2, data, tmp_path / "merged", merge=True, **kwargs), echo=_quiet)
    assert not (tmp_path / "merged").exists()
    said: list[str] = []
    result = train(_config(tiny_gpt2, data, tmp_path / "run", **kwargs), echo=said.append)
    assert result.merge_check is None and any("merge check skipped" in s for s in said)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_a_diverging_run_stops_with_a_clear_error(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path
) -> None:
    # The loss went NaN and the run saved a NaN adapter, then failed in merge ("would give
    # non-finite weights"); metrics.jsonl held bare NaN (not JSON)
    out = tmp_path / "run"
    config = TrainConfig(model=str(tiny_bert), data=str(toy_tsv), output=str(out), lr=1e12,
                         warmup=0.0, max_steps=6, batch_size=8, save_every=0, merge=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"training diverged at step \d: the loss is (nan|inf)"):
        train(config, echo=lambda _: None)
    assert not (out / "adapter").exists() and not (out / "merged").exists()
    assert all(isinstance(r.get("loss", 0.0), float) for r in read_metrics(out / "metrics.jsonl"))
    assert "NaN" not in (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("eval_every", [0, 1])
def test_a_run_whose_last_update_diverges_saves_nothing(
    tiny_bert: Path, toy_tsv: Path, tmp_path: Path, eval_every: int
) -> None:
    # each step's loss is checked before its update: the last update's 1e30 weights were
    # saved, held-out loss nan with an accuracy reported, the merge check "identical", exit 0
    # (and a mid-run evaluation wrote a bare NaN into metrics.jsonl)
    out = tmp_path / "run"
    config = TrainConfig(model=str(tiny_bert), data=str(toy_tsv), output=str(out), lr=1e30,
                         warmup=0.0, max_steps=eval_every + 1, batch_size=8, save_every=0,
                         eval_every=eval_every, merge=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"training diverged by step 1: the held-out loss is nan"):
        train(config, echo=_quiet)
    assert not (out / "adapter").exists() and not (out / "merged").exists()
    assert "NaN" not in (out / "metrics.jsonl").read_text()


def test_the_merge_check_never_calls_non_finite_logits_identical(
    tiny_bert: Path, toy_tsv: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rankwise.train.batching import encode
    from rankwise.train.data import load_dataset
    from rankwise.train.evaluate import evaluate
    from rankwise.train.methods import prepare
    from rankwise.train.outputs import check_merge

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    prepared = prepare(model, TrainConfig(model=str(tiny_bert)), generator=0)
    data = load_dataset(str(toy_tsv))
    enc = encode(data, AutoTokenizer.from_pretrained(tiny_bert), task="classification",
                 max_length=32)  # fmt: skip
    after = evaluate(model, enc)
    assert check_merge(prepared, enc, after, pad_id=0).identical
    logits = after.logits.clone()
    logits[0, 0] = float("nan")  # argmax still picks a class: the predictions all agree
    check = check_merge(prepared, enc, after._replace(logits=logits), pad_id=0)
    assert check.mismatches == 0 and not check.identical
