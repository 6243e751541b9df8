"""Property-based fuzzing of adapter loading and config parsing (a short run of the fuzzer in
``benchmarks/fuzz_adapters.py``): mutated valid directories give either a loaded model with
finite values or one of rankwise's own errors, with the model unchanged, in under 5 s each."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_fuzzkit import JSON_VALUES, Mutation, Seed, classify, make_seeds, mutations, run_case

from rankwise.io.config_json import config_from_json

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    return make_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-case") / "adapter"


def test_mutated_adapter_directories(seeds: list[Seed], workdir: Path) -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    seen: dict[str, int] = {}

    @SETTINGS
    @given(index=st.integers(0, len(seeds) - 1), mutation=mutations())
    def check(index: int, mutation: Mutation) -> None:
        for outcome in run_case(seeds[index], mutation, workdir):
            seen[outcome.status] = seen.get(outcome.status, 0) + 1
            assert outcome.status != "failure", (outcome, mutation)  # "known": see KNOWN_BUGS

    check()
    assert seen.get("refused", 0) > 0 and seen.get("ok", 0) > 0, seen  # both paths exercised
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 300_000  # < 300 MB


@SETTINGS
@given(doc=JSON_VALUES)
def test_config_parsing_of_arbitrary_json(doc: object) -> None:
    try:
        config_from_json(doc, source="fuzz")
    except Exception as err:  # noqa: BLE001 - classified: rankwise's own, or a known bug
        assert classify(err)[0] in ("refused", "known"), err


@SETTINGS
@given(fields=st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules",
       "rank_pattern", "alpha_pattern", "layers_to_transform", "bias", "lora_dropout",
       "modules_to_save", "init_lora_weights", "use_rslora"]), JSON_VALUES))  # fmt: skip
def test_config_parsing_of_lora_documents(fields: dict[str, object]) -> None:
    doc = {"peft_type": "LORA", "r": 4, "target_modules": ["q"], **fields}
    try:
        config = config_from_json(json.loads(json.dumps(doc)), source="fuzz")
    except Exception as err:  # noqa: BLE001 - classified: rankwise's own, or a known bug
        assert classify(err)[0] in ("refused", "known"), err
        return
    assert config.r >= 1 and config.lora_alpha > 0  # what parsing accepted is valid
