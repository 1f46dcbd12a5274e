"""TorchServe handler: the policy's MLP on the batches TorchServe's frontend gathers
(``batchSize`` requests or ``maxBatchDelay`` ms, whichever first). Packed into the model archive
with ``policy.py``, the version's ``policy.json`` and ``weights.safetensors``."""

import sys

import torch
from ts.torch_handler.base_handler import BaseHandler


class PolicyHandler(BaseHandler):
    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        sys.path.insert(0, model_dir)
        from policy import load_mlp

        torch.set_num_threads(1)
        self.net = load_mlp(model_dir)
        self.initialized = True

    def handle(self, data, context):
        from policy import greedy

        bodies = [row.get("body") or row.get("data") for row in data]  # JSON: parsed by TorchServe
        counts, observations = [], []
        for body in bodies:
            obs = body["observations"] if "observations" in body else [body["observation"]]
            counts.append(len(obs))
            observations.extend(obs)
        actions, out, i = greedy(self.net, observations), [], 0
        for body, n in zip(bodies, counts, strict=True):
            out.append({"actions": actions[i : i + n]} if "observations" in body else {"action": actions[i]})
            i += n
        return out
