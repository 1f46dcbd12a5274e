"""Any TorchRL policy as exported programs: ``policy.json`` + one PT2 archive per exploration
mode, the form ``export_policy`` writes when the declarative spec cannot describe the module.

The policy's keys say what each tensor is, by TorchRL's conventions (``registry.tracing``
lists them). ``registry.tracing`` traces it (a positional wrapper under ``ExplorationType.DETERMINISTIC``
and, for a policy with log-probs, ``RANDOM``). The archives are then read back through the
server's own loader (``registry.program``: no pickle) and served by ``ProgramRuntime`` against
the module in-process on random inputs, two steps carrying the state, seeded for ``random``:
any difference and nothing is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torchrl.data import TensorSpec
from torchrl.envs.utils import set_exploration_type

from service.exploration import Exploration
from service.registry.program import ProgramRefused, read_programs
from service.registry.spec import IS_INIT, PolicySpec
from service.registry.tracing import DECLARATIVE_ONLY, MODES, Positional, sample_inputs, trace_programs
from service.runtime.call import ActCall
from service.runtime.program import ProgramRuntime

CHECK_BATCH = 5


def export_programs(
    policy: TensorDictModuleBase,
    observation_spec: Any,
    action_spec: TensorSpec | dict,
    *,
    state_spec: dict | None = None,
    env_id: str | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """policy.json and the archives (file name -> bytes) of ``policy``, checked as served.

    Raises:
        ValueError: the keys do not say what a tensor is, ``torch.export`` cannot trace the
            policy, or the served programs would answer differently.
    """
    spec, files, wrapper = trace_programs(
        policy, observation_spec, action_spec, state_spec=state_spec, env_id=env_id
    )
    try:
        runtime = ProgramRuntime(spec, read_programs(spec, files))
    except ProgramRefused as exc:
        raise ValueError(f"the server would refuse the exported program: {exc}") from None
    check_served(policy, wrapper, runtime, spec)
    return spec.model_dump(mode="json", exclude=DECLARATIVE_ONLY), files


def check_served(policy, wrapper: Positional, runtime: ProgramRuntime, spec: PolicySpec) -> None:
    """The served programs answer what the module answers in-process: two steps carrying the
    state, deterministic, then seeded random."""
    g = torch.Generator().manual_seed(1)
    for mode in spec.program.files:
        state = None
        for step in range(2):
            inputs = sample_inputs(spec, CHECK_BATCH, g, step)
            named = dict(zip(spec.program.inputs, inputs, strict=True))
            if state is not None:
                named.update(state)
                inputs = [named[n] for n in spec.program.inputs]
            with torch.no_grad(), set_exploration_type(MODES[mode]), torch.random.fork_rng():
                torch.manual_seed(7)
                expected = dict(zip(spec.program.outputs, wrapper(*inputs), strict=True))
            observation = _observation(spec, named)
            call = ActCall(
                observation,
                Exploration(mode),
                seed=7 if mode == "random" else None,
                return_info=True,
                state=tuple(named[n] for n in spec.program.state) if spec.program.state else None,
                is_init=named.get(IS_INIT),
                mask=named.get("action_mask"),
            )
            served = runtime.forward(call)
            got = _served_outputs(runtime, served)
            for name, want in expected.items():
                have = got[name]
                exact = name.startswith("action") and not want.is_floating_point()
                same = torch.equal(have, want) if exact else torch.allclose(have, want, atol=1e-5, rtol=1e-5)
                if not same:
                    raise ValueError(
                        f"the served program would answer {name!r} differently from the module ({mode}, "
                        f"step {step + 1}): {have.flatten()[:4].tolist()} vs {want.flatten()[:4].tolist()}"
                    )
            state = {n: expected[f"next_{n}"] for n in spec.program.state}


def _observation(spec: PolicySpec, named: dict[str, torch.Tensor]):
    names = spec.observation_names()
    if names == ["observation"]:
        return named["observation"]
    return TensorDict({n: named[n] for n in names}, batch_size=[len(named[names[0]])])


def _served_outputs(runtime: ProgramRuntime, result) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in runtime.outputs:
        head, _, leaf = name.partition(".")
        if head == "action":
            out[name] = result.action.get(leaf) if leaf else result.action
        elif name.startswith("next_"):
            out[name] = result.state[runtime.state_names.index(name[5:])]
        elif head == "log_prob" and leaf:
            out[name] = result.info["log_prob"].get(leaf)
        elif name == "log_prob":
            out[name] = result.info["joint_log_prob" if "joint_log_prob" in result.info else "log_prob"]
        else:
            out[name] = result.info[name]
    return out


def write_program_policy(path: str | os.PathLike, spec_json: dict, files: dict[str, bytes]) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "policy.json").write_text(json.dumps(spec_json, indent=1))
    return out
