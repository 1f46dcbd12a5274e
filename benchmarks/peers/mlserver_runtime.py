"""MLServer: a custom runtime serving the policy's MLP; MLServer's adaptive batching merges the
requests' ``observation`` tensors along the first axis (``max_batch_size``, ``max_batch_time``
in the model settings ``benchmarks.peers.run`` writes)."""

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from policy import greedy, load_mlp


class PolicyModel(MLModel):
    async def load(self) -> bool:
        torch.set_num_threads(1)
        self.net = load_mlp(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        observations = NumpyCodec.decode_input(payload.inputs[0])
        actions = np.asarray(greedy(self.net, observations), dtype=np.int64).reshape(-1, 1)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("action", actions)])
