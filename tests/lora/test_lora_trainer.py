"""Adapters inside ``transformers.Trainer``: trains only the adapter (and head), saves, reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_testkit import logits, tiny_bert_cls

from rankwise.io import load_adapter, save_adapter
from rankwise.lora import LoraConfig, inject


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 99, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _training_args(out: Path, **changes: object) -> object:
    """Trainer arguments of these tests: CPU, seed 0, batch 8, lr 1e-2, no logging or workers;
    ``changes`` set the run's own (steps, saving, evaluation)."""
    import transformers

    defaults = dict(per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
                    use_cpu=True, seed=0, logging_strategy="no", dataloader_num_workers=0)  # fmt: skip
    return transformers.TrainingArguments(output_dir=str(out), **{**defaults, **changes})


@pytest.mark.slow
def test_trainer_trains_only_adapters_and_round_trips(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    model = inject(
        tiny_bert_cls(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
        generator=0,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(32))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(".lora_B." in n for n in changed)
    assert all(".lora_" in n or n.startswith("classifier.") for n in changed)
    model.eval()
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(tiny_bert_cls(), tmp_path / "adapter")
    torch.testing.assert_close(logits(again, "bert"), logits(model, "bert"), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_save_adapter_callback_writes_peft_adapters_into_checkpoints(tmp_path: Path) -> None:
    """Trainer saves a model that is not a PeftModel whole (wrapped keys in model.safetensors),
    which neither load_adapter nor PeftModel.from_pretrained reads: the callback adds the
    adapter files to every checkpoint folder and to output_dir."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from peft import PeftModel

    from rankwise.train import SaveAdapterCallback

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = inject(tiny_bert_cls(), config, generator=0)
    out = tmp_path / "run"
    args = _training_args(out, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Data(32), callbacks=[SaveAdapterCallback()]
    )
    trainer.train()
    model.eval()
    for folder in (out / "checkpoint-2", out / "checkpoint-4", out):
        assert (folder / "adapter_model.safetensors").is_file(), folder
        assert (folder / "adapter_config.json").is_file(), folder
    assert (out / "checkpoint-4" / "optimizer.pt").is_file()  # Trainer's own files are kept
    want = logits(model, "bert")
    for folder in (out / "checkpoint-4", out):
        again = load_adapter(tiny_bert_cls(), folder)
        torch.testing.assert_close(logits(again, "bert"), want, rtol=0, atol=1e-6)
    peft_model = PeftModel.from_pretrained(tiny_bert_cls(), str(out)).eval()
    torch.testing.assert_close(logits(peft_model, "bert"), want, rtol=0, atol=1e-5)
    early = load_adapter(tiny_bert_cls(), out / "checkpoint-2")
    assert not torch.allclose(logits(early, "bert"), want)  # the step-2 adapter, not the last


@pytest.mark.slow
@pytest.mark.parametrize("init", ["lora_ga", "pissa"])
def test_save_adapter_callback_writes_residual_adapters_for_the_original_base(
    tmp_path: Path, init: str
) -> None:
    """LoRA-GA's plain save is refused, so the callback crashed Trainer at its first checkpoint;
    a randomized-PiSSA checkpoint loaded in PEFT (which draws its own residual) predicted
    1.5e-2 off. By default both are written for the unmodified base, which PEFT and rankwise
    load to the trained model's logits."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from peft import PeftModel

    from rankwise.lora import lora_ga_init
    from rankwise.train import SaveAdapterCallback

    kwargs = {"init_lora_weights": "pissa"} if init == "pissa" else {}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                        **kwargs)  # fmt: skip
    data = _Data(32)
    if init == "lora_ga":
        batch = {"input_ids": data.ids[:8], "labels": data.labels[:8]}
        model = lora_ga_init(tiny_bert_cls(), config, [batch], generator=0)
    else:
        model = inject(tiny_bert_cls(), config, generator=0)
    out = tmp_path / "run"
    args = _training_args(out, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[SaveAdapterCallback()]
    )
    trainer.train()
    model.eval()
    want = logits(model, "bert")
    for folder in (out / "checkpoint-2", out):
        peft_model = PeftModel.from_pretrained(tiny_bert_cls(), str(folder)).eval()
        torch.testing.assert_close(logits(peft_model, "bert"), want, rtol=0, atol=1e-5)
        again = load_adapter(tiny_bert_cls(), folder)
        torch.testing.assert_close(logits(again, "bert"), want, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="for_original_base: expected None, True or False"):
        SaveAdapterCallback(for_original_base="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_adalora_callback_matches_the_hand_written_loop_and_resumes(tmp_path: Path) -> None:
    """AdaLoraCallback = orthogonal regularization in the loss + update_and_allocate after each
    optimizer step (checked here against the hand-written integration, itself equal to PEFT's
    AdaLoRA under Trainer) + the allocator's state in checkpoints: a run resumed after the
    final mask (step 8 of 10, masks fixed from 7) trained the pruned triplets again and saved
    every triplet (rank_pattern lost)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from rankwise.errors import ConfigError
    from rankwise.lora import AdaLoraConfig, RankAllocator, orthogonal_regularization
    from rankwise.train import AdaLoraCallback, SaveAdapterCallback

    def build() -> tuple[torch.nn.Module, RankAllocator]:
        config = AdaLoraConfig(init_r=6, target_r=3, total_step=10, tinit=2, tfinal=3, deltaT=1,
                               lora_alpha=8, target_modules=["query", "value"],
                               task_type="SEQ_CLS", orth_reg_weight=0.5)  # fmt: skip
        model = inject(tiny_bert_cls(), config, generator=0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # λ = 0 at init: give the scores something to rank
            for name, p in model.named_parameters():
                if "lora_E" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        return model, RankAllocator(model, config)

    def args(out: Path) -> object:
        return transformers.TrainingArguments(
            output_dir=str(out), max_steps=10, save_strategy="steps", save_steps=4,
            per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True,
            seed=0, logging_strategy="no", dataloader_num_workers=0,
        )  # fmt: skip

    class Hand(transformers.TrainerCallback):
        def __init__(self, allocator: RankAllocator) -> None:
            self.allocator = allocator

        def on_optimizer_step(self, args, state, control, **kwargs) -> None:
            self.allocator.update_and_allocate(state.global_step)

    class RegularizedTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = model(**inputs)
            loss = out.loss + 0.5 * orthogonal_regularization(model)
            return (loss, out) if return_outputs else loss

    class StopAt8(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs) -> None:
            control.should_training_stop = state.global_step == 8

    def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    data = _Data(80)
    ref, ref_alloc = build()
    RegularizedTrainer(model=ref, args=args(tmp_path / "ref"), train_dataset=data,
                       callbacks=[Hand(ref_alloc)]).train()  # fmt: skip
    model, allocator = build()
    callbacks = [AdaLoraCallback(allocator), SaveAdapterCallback()]
    transformers.Trainer(model=model, args=args(tmp_path / "cb"), train_dataset=data,
                         callbacks=callbacks).train()  # fmt: skip
    want = params(model)
    for name, value in params(ref).items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=name)
    kept = sum(int((v != 0).sum()) for n, v in want.items() if "lora_E" in n)
    assert kept == 3 * 4  # target_r × layers

    out = tmp_path / "resumed"
    first, first_alloc = build()
    transformers.Trainer(model=first, args=args(out), train_dataset=data,
                         callbacks=[AdaLoraCallback(first_alloc), StopAt8()]).train()  # fmt: skip
    assert (out / "checkpoint-8" / "adalora_allocator.safetensors").is_file()
    again, again_alloc = build()
    transformers.Trainer(model=again, args=args(out), train_dataset=data,
                         callbacks=[AdaLoraCallback(again_alloc), SaveAdapterCallback()]).train(
        resume_from_checkpoint=str(out / "checkpoint-8"))  # fmt: skip
    for name, value in params(again).items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6, msg=name)
    saved = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert (
        saved == json.loads((tmp_path / "cb" / "adapter_config.json").read_text())["rank_pattern"]
    )
    assert sum(sum(v) for v in saved.values()) == 12

    (out / "checkpoint-8" / "adalora_allocator.safetensors").unlink()
    late, late_alloc = build()
    trainer = transformers.Trainer(model=late, args=args(out), train_dataset=data,
                                   callbacks=[AdaLoraCallback(late_alloc)])  # fmt: skip
    with pytest.raises(ConfigError, match="adalora_allocator.safetensors does not exist"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-8"))


@pytest.mark.slow
def test_adalora_callback_adds_the_orthogonal_term_to_each_micro_batch_loss_as_peft(
    tmp_path: Path,
) -> None:
    # as PEFT's AdaLoraModel.forward: the term rides on each forward's loss, so for a model
    # whose loss Trainer does not divide by the accumulation steps (it takes
    # num_items_in_batch, as Llama) it counts once per micro-batch: the data gradient is the
    # same for 4 x 1, 2 x 2 and 1 x 4, the term's gradient (accum - 1) times more
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.lora import AdaLoraConfig, RankAllocator, orthogonal_regularization
    from rankwise.train import AdaLoraCallback

    ids = torch.randint(1, 60, (4, 8), generator=torch.Generator().manual_seed(0))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": ids[i]}

    class Grab(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n}

    grads = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=2))  # fmt: skip
        config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, tinit=2, tfinal=3, deltaT=1,
                               lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               orth_reg_weight=0.5, init_lora_weights=False)  # fmt: skip
        model = inject(base, config, generator=0)
        grab = Grab()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"a{accum}"), max_steps=1, learning_rate=1e-3,
            per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_grad_norm=0,
            report_to=[], use_cpu=True, seed=0, save_strategy="no", logging_strategy="no",
            dataloader_num_workers=0,
        )  # fmt: skip
        callbacks = [AdaLoraCallback(RankAllocator(model, config)), grab]
        transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                             callbacks=callbacks).train()  # fmt: skip
        grads.append(grab.grads)
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(base.config)  # the same initial weights as each run's
    model = inject(fresh, config, generator=0)
    (0.5 * orthogonal_regularization(model)).backward()
    term = {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}
    for accum, other in zip((2, 4), grads[1:]):
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g + (accum - 1) * term[name], rtol=1e-4,
                                       atol=1e-6)  # fmt: skip


def test_save_adapter_callback_writes_olora_on_conv1d_for_the_original_base(
    tmp_path: Path,
) -> None:
    # PEFT 0.21.2's OLoRA cannot rebuild GPT-2's Conv1D residual: the callback's default now
    # saves such an adapter for the unmodified base, as rankwise finetune does
    pytest.importorskip("transformers")
    from lora_testkit import tiny_gpt2
    from peft import PeftModel
    from transformers import TrainerState

    from rankwise.train import SaveAdapterCallback

    model = inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"],
                                           init_lora_weights="olora"))  # fmt: skip
    SaveAdapterCallback()._save(model, tmp_path / "a", TrainerState())
    theirs = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, "gpt2"), logits(model.eval(), "gpt2"), rtol=0,
                               atol=1e-5)  # fmt: skip


def test_save_adapter_callback_saves_randomized_pissa_with_dora_plainly(tmp_path: Path) -> None:
    """DoRA cannot be re-expressed for the original base: the callback's default took the
    for_original_base route for randomized PiSSA anyway and failed at the first checkpoint,
    after the training time was spent. It now writes the plain save, with its warning."""
    from transformers import TrainerState

    from rankwise.io.adapter import needs_original_base
    from rankwise.train import SaveAdapterCallback

    cfg = LoraConfig(r=2, target_modules=["query"], init_lora_weights="pissa", use_dora=True)
    model = inject(tiny_bert_cls(), cfg, generator=0)
    assert not needs_original_base(model)
    with pytest.warns(RuntimeWarning, match="DoRA adapter has no for_original_base form"):
        SaveAdapterCallback()._save(model, tmp_path / "adapter", TrainerState())
    loaded = load_adapter(tiny_bert_cls(), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, "bert"), logits(model, "bert"))


@pytest.mark.slow
def test_trainer_checkpoints_and_resumes_a_tied_lm_head_target(tmp_path: Path) -> None:
    """GPT-2's lm_head shares wte's weight: as a target, Trainer's first checkpoint failed
    (save_pretrained: "shared tensors ... not properly defined"), losing the run. The wrapper
    declares its tied base weight, so the checkpoint saves and a resumed run equals the
    uninterrupted one."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from lora_testkit import tiny_gpt2

    from rankwise.train import SaveAdapterCallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(1, 99, (16, 8), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    config = LoraConfig(r=2, target_modules=["c_attn", "lm_head"])

    def run(out: Path, resume: bool = False) -> torch.nn.Module:
        model = inject(tiny_gpt2(), config, generator=0)
        args = transformers.TrainingArguments(
            output_dir=str(out),
            max_steps=4,
            save_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            seed=0,
            logging_strategy="no",
            dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=Tokens(), callbacks=[SaveAdapterCallback()]
        )
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
        assert model.lm_head.base_layer.weight is model.transformer.wte.weight  # still tied
        return model.eval()

    full = run(tmp_path / "full")
    assert (tmp_path / "full" / "checkpoint-2" / "model.safetensors").is_file()
    (tmp_path / "resumed").mkdir()
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = run(tmp_path / "resumed", resume=True)
    torch.testing.assert_close(logits(resumed, "gpt2"), logits(full, "gpt2"), rtol=0, atol=1e-6)
    adapter = load_adapter(tiny_gpt2(), tmp_path / "full")
    torch.testing.assert_close(logits(adapter, "gpt2"), logits(full, "gpt2"), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("adalora_first", [True, False])
def test_adalora_with_load_best_model_at_end_saves_the_best_models_ranks(
    tmp_path: Path, adalora_first: bool
) -> None:
    # Trainer reloaded the best checkpoint's weights, but the allocator (and so the rank_pattern
    # a save cuts the factors to) stayed the last step's: output_dir's adapter lost 40-96% of
    # the best model's update in three of four layers. With SaveAdapterCallback listed first,
    # its on_train_end saved before AdaLoraCallback's restored the best ranks (audit)
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from rankwise.lora import AdaLoraConfig, RankAllocator
    from rankwise.train import AdaLoraCallback, SaveAdapterCallback

    kw = dict(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=4, deltaT=1, lora_alpha=8,
              target_modules=["query", "value"], task_type="SEQ_CLS", orth_reg_weight=0.5)  # fmt: skip
    model = inject(tiny_bert_cls(), AdaLoraConfig(**kw), generator=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    scores = iter(range(-1, -100, -1))  # the first evaluation (step 4) is the best
    out = tmp_path / "run"
    args = _training_args(
        out, max_steps=12, save_strategy="steps", save_steps=4, eval_strategy="steps",
        eval_steps=4, load_best_model_at_end=True, metric_for_best_model="score",
        greater_is_better=True,
    )  # fmt: skip
    callbacks = [AdaLoraCallback(RankAllocator(model, AdaLoraConfig(**kw))), SaveAdapterCallback()]
    callbacks = callbacks if adalora_first else callbacks[::-1]
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Data(96), eval_dataset=_Data(8),
        compute_metrics=lambda _: {"score": next(scores)}, callbacks=callbacks,
    )  # fmt: skip
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-4")
    best = json.loads((out / "checkpoint-4" / "adapter_config.json").read_text())["rank_pattern"]
    final = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert final == best
    torch.testing.assert_close(
        logits(load_adapter(tiny_bert_cls(), out), "bert"), logits(model, "bert"), atol=1e-6, rtol=0
    )


@pytest.mark.slow
def test_save_adapter_callback_follows_a_hyperparameter_search_trial(tmp_path: Path) -> None:
    # a trial saves under output_dir/run-<n>/checkpoint-N: the callback wrote a stray
    # output_dir/checkpoint-N with the adapter only, and the final adapter into output_dir
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from rankwise.train import SaveAdapterCallback

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = inject(tiny_bert_cls(), config, generator=0)
    out = tmp_path / "search"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True, seed=0,
        logging_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Data(32), callbacks=[SaveAdapterCallback()]
    )
    trainer._get_output_dir = lambda trial: str(out / "run-0")  # what a search trial gets
    trainer.train()
    assert sorted(p.name for p in out.iterdir()) == ["run-0"]
    trial = out / "run-0"
    for folder in (trial / "checkpoint-2", trial):
        assert (folder / "adapter_model.safetensors").is_file()


def test_a_pruned_trial_saves_its_own_model_not_the_best_checkpoints(tmp_path: Path) -> None:
    """Optuna's pruning calls on_train_end mid-run and raises, without Trainer loading the best
    model: the trial's folder got the best checkpoint's adapter, not the model it ended with.
    After the run's summary log (train_runtime), Trainer has loaded the best model: copied."""
    transformers = pytest.importorskip("transformers")
    from rankwise.train import SaveAdapterCallback

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query"], task_type="SEQ_CLS")
    best = tmp_path / "checkpoint-2"
    save_adapter(inject(tiny_bert_cls(), config, generator=0), best)
    model = inject(tiny_bert_cls(), config, generator=1)  # the live model: other factors
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(2))
    args = _training_args(tmp_path, load_best_model_at_end=True, eval_strategy="steps",
                          save_strategy="steps")  # fmt: skip
    for history, source in (([{"loss": 0.7, "step": 3}], "model"),
                            ([{"loss": 0.7}, {"train_runtime": 1.0}], "best")):  # fmt: skip
        out = tmp_path / source
        args.output_dir = str(out)
        state = transformers.TrainerState(best_model_checkpoint=str(best), log_history=history)
        SaveAdapterCallback().on_train_end(args, state, transformers.TrainerControl(), model=model)
        expected = (load_adapter(tiny_bert_cls(), best) if source == "best" else model).eval()
        torch.testing.assert_close(
            logits(load_adapter(tiny_bert_cls(), out), "bert"), logits(expected, "bert"),
            atol=1e-6, rtol=0,
        )  # fmt: skip
