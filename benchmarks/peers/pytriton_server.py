"""Triton (through PyTriton): the policy's MLP as a Python model behind Triton's dynamic batcher.

python pytriton_server.py VERSION_DIR HTTP_PORT GRPC_PORT METRICS_PORT
"""

import sys

import numpy as np
import torch
from policy import greedy, load_mlp
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

version_dir, http_port, grpc_port, metrics_port = sys.argv[1], *map(int, sys.argv[2:5])
torch.set_num_threads(1)
net = load_mlp(version_dir)


@batch
def infer(observation: np.ndarray) -> dict:
    return {"action": np.asarray(greedy(net, observation), dtype=np.int64).reshape(-1, 1)}


config = TritonConfig(
    http_address="127.0.0.1", http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port
)
with Triton(config=config) as triton:
    triton.bind(
        model_name="cartpole",
        infer_func=infer,
        inputs=[Tensor(name="observation", dtype=np.float32, shape=(-1,))],
        outputs=[Tensor(name="action", dtype=np.int64, shape=(1,))],
        # PyTriton's default max_batch_size is 4 and its batcher waits 0 µs: the throughput
        # settings of Triton's docs are a larger batch and a short queue delay
        config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=1000)),
        strict=False,
    )
    triton.serve()
