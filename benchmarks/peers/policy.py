"""The served policy as every peer runs it: the registry version's MLP rebuilt from its
``policy.json`` and ``weights.safetensors`` with torch alone, so that each peer's environment
needs only torch and safetensors (not this project, whose pins conflict with theirs), and the
greedy action (argmax of the Q-values) of a batch of observations.

Only what the benchmark serves: a ``qvalue`` policy with an ``mlp`` network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "elu": torch.nn.ELU}


def load_mlp(version_dir: str | Path) -> torch.nn.Sequential:
    """The version's network: Linear layers in the order of its weights, the spec's activation
    between them."""
    version_dir = Path(version_dir)
    spec = json.loads((version_dir / "policy.json").read_text())
    if spec["kind"] != "qvalue" or spec["network"]["type"] != "mlp":
        raise ValueError(f"{version_dir}: the peers serve a qvalue MLP, not {spec['kind']}/{spec['network']}")
    weights = load_file(version_dir / "weights.safetensors")
    # keys like module.0.module.<i>.weight: the layer's index in TorchRL's MLP is the last number
    indices = sorted({int(k.split(".")[-2]) for k in weights})
    layers: list[torch.nn.Module] = []
    for n, i in enumerate(indices):
        w = next(v for k, v in weights.items() if k.endswith(f".{i}.weight"))
        b = next(v for k, v in weights.items() if k.endswith(f".{i}.bias"))
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        layers.append(linear)
        if n < len(indices) - 1:
            layers.append(ACTIVATIONS[spec["network"]["activation"]]())
    return torch.nn.Sequential(*layers).eval()


def greedy(net: torch.nn.Module, observations: list) -> list[int]:
    """Argmax actions of ``observations`` (a list of observation vectors), one forward pass."""
    with torch.inference_mode():
        return net(torch.tensor(observations, dtype=torch.float32)).argmax(-1).tolist()
