"""The registry on its own: loading, publishing, defaults, deletion, what it keeps per version."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from service.errors import InvalidInput, NotFound
from service.registry.build import BuiltPolicy
from service.registry.registry import Registry
from service.registry.store import ModelStore
from service.runtime.policy import PolicyRuntime
from tests.helpers import SPECS, random_weights, write_policy


def test_load_all_keeps_what_prepare_makes_and_reports_broken_versions(tmp_path):
    write_policy(tmp_path, "q", SPECS["q"])
    write_policy(tmp_path, "q", SPECS["q"], seed=1)
    (tmp_path / "q" / "2" / "weights.safetensors").write_bytes(b"garbage")
    prepared = []

    def prepare(spec, built, device):
        prepared.append(spec.kind)
        return ("runtime", built)

    registry = Registry(ModelStore(tmp_path), prepare=prepare)
    assert not registry.ready
    registry.load_all()
    assert registry.ready and prepared == ["qvalue"]
    loaded = registry.resolve("q")
    assert loaded.version == 1 and loaded.runtime[0] == "runtime"
    assert isinstance(loaded.runtime[1], BuiltPolicy)
    assert "safetensors" in registry.entry("q").errors[2]
    with pytest.raises(NotFound, match="failed to load"):
        registry.resolve("q", 2)
    with pytest.raises(NotFound, match="'nope' not found"):
        registry.resolve("nope")
    assert registry.has("q") and not registry.has("nope")


def test_publish_refuses_bad_versions_and_writes_nothing(tmp_path):
    registry = Registry(ModelStore(tmp_path), prepare=PolicyRuntime)
    registry.load_all()
    with pytest.raises(InvalidInput, match="kind"):
        registry.publish("q", {**SPECS["q"], "kind": "nope"}, random_weights(SPECS["q"]))
    with pytest.raises(InvalidInput, match="weights do not match"):
        registry.publish("q", SPECS["q"], random_weights(SPECS["cat"]))
    with pytest.raises(InvalidInput, match="invalid policy name"):
        registry.publish("../q", SPECS["q"], random_weights(SPECS["q"]))
    assert ModelStore(tmp_path).names() == []
    assert registry.publish("q", SPECS["q"], random_weights(SPECS["q"])) == 1
    runtime = registry.resolve("q").runtime
    assert isinstance(runtime, PolicyRuntime)
    assert runtime.act(torch.zeros(2, 4)).action.shape == (2,)


def test_default_version_and_deletion(tmp_path):
    registry = Registry(ModelStore(tmp_path))
    for seed in range(3):
        registry.publish("q", SPECS["q"], random_weights(SPECS["q"], seed))
    assert registry.entry("q").default_version == 3
    registry.set_default("q", 2)
    assert registry.resolve("q").version == 2
    assert Registry(ModelStore(tmp_path)).store.read_default("q") == 2  # on disk
    with pytest.raises(NotFound):
        registry.set_default("q", 9)
    registry.delete_version("q", 2)
    assert registry.resolve("q").version == 3  # the default's file went with it
    assert ModelStore(tmp_path).read_default("q") is None
    registry.delete_version("q", 1)
    registry.delete_version("q", 3)
    with pytest.raises(NotFound):
        registry.entry("q")
    assert ModelStore(tmp_path).names() == []


def test_a_request_keeps_its_version_while_it_is_deleted(tmp_path):
    registry = Registry(ModelStore(tmp_path))
    registry.publish("q", SPECS["q"], random_weights(SPECS["q"]))
    held = registry.resolve("q")
    registry.delete_version("q", 1)
    out = held.runtime.core(TensorDict({"observation": torch.zeros(1, 4)}, batch_size=[1]))
    assert out["action"].shape == (1,)


def test_load_all_picks_up_new_versions_and_forgets_removed_ones(tmp_path):
    registry = Registry(ModelStore(tmp_path))
    registry.load_all()
    write_policy(tmp_path, "q", SPECS["q"])  # another process publishes
    registry.load_all()
    assert registry.entry("q").versions.keys() == {1}
    ModelStore(tmp_path).delete_version("q", 1)  # and deletes
    registry.load_all()
    assert not registry.has("q")
