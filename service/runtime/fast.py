"""Fast paths: a Q-value or actor policy acting deterministically is its plain networks.

The same weights as the TorchRL module, without the TensorDict plumbing (~4x cheaper for small
MLPs, and for an LSTM step). What they copy from TorchRL, and where:
- the masked argmax of ``QValueModule(action_mask_key=...)``: masked values set to the dtype's
  lowest, then ``max``;
- ``LSTMModule``'s step outside recurrent mode: ``(h, c)`` zeroed where ``is_init``, one time
  step through ``nn.LSTM``.
``tests/test_fast_paths.py`` checks both against the TorchRL modules they replace.
"""

from __future__ import annotations

import torch
from torchrl.modules import LSTMModule, QValueModule

from service.exploration import Exploration
from service.registry.spec import DictObservationSpec, PolicySpec
from service.runtime.call import ActResult, State


class FastPath:
    """The plain networks of ``core`` (a built policy's TensorDict modules), split at the LSTM."""

    def __init__(self, spec: PolicySpec, core: torch.nn.Module, device: torch.device) -> None:
        self.qvalue = spec.kind == "qvalue"
        self.device = device
        # every TensorDictModule's network in order (a one-hot encoder, a ConvNet, the MLP),
        # split at the LSTM, without the QValueModule, whose argmax ``act`` does
        mods = [m for m in core.module if not isinstance(m, QValueModule)]
        cut = next((i for i, m in enumerate(mods) if isinstance(m, LSTMModule)), None)
        self.lstm = self.encoder = None
        if cut is not None:
            self.lstm = mods[cut].lstm
            self.encoder = _sequence([m.module for m in mods[:cut]])
            mods = mods[cut + 1 :]
        self.head = _sequence([m.module for m in mods])

    @staticmethod
    def supports(spec: PolicySpec) -> bool:
        return spec.kind in ("qvalue", "actor") and not isinstance(spec.observation, DictObservationSpec)

    def act(
        self,
        observation: torch.Tensor,
        state: State | None,
        is_init: torch.Tensor | None,
        return_info: bool,
        mask: torch.Tensor | None,
    ) -> ActResult:
        """The deterministic action (and Q-values); ``state`` gets the next ``(h, c)`` first."""
        with torch.inference_mode():
            x = observation.to(self.device)
            parts: tuple[torch.Tensor, ...] = ()
            if self.lstm is not None:
                x, parts = self.lstm_step(x, state, is_init)
            out = self.head(x)
            if mask is not None:  # as QValueModule(action_mask_key=...) does
                out = torch.where(mask.to(self.device), out, torch.finfo(out.dtype).min)
        if self.qvalue:
            best = out.max(-1)
            info = {"action_value": out, "chosen_action_value": best.values} if return_info else None
            return ActResult(best.indices, info, Exploration.deterministic, parts or None)
        return ActResult(out, {} if return_info else None, Exploration.deterministic, parts or None)

    def lstm_step(
        self, x: torch.Tensor, state: State, is_init: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One LSTM step as ``LSTMModule`` takes it outside recurrent mode: the encoders, then
        ``(h, c)`` (``[B, layers, hidden]``) zeroed where ``is_init``; the features and the next
        ``(h, c)``."""
        if self.encoder is not None:
            x = self.encoder(x)
        keep = (~is_init.to(self.device)).reshape(-1, 1, 1)
        h, c = (torch.where(keep, t.to(self.device), 0.0).transpose(0, 1).contiguous() for t in state[:2])
        y, (h, c) = self.lstm(x.unsqueeze(1), (h, c))
        return y.squeeze(1), (h.transpose(0, 1), c.transpose(0, 1))


def _sequence(nets: list[torch.nn.Module]) -> torch.nn.Module | None:
    if not nets:
        return None
    return nets[0] if len(nets) == 1 else torch.nn.Sequential(*nets)
