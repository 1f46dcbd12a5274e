"""LitServe: the policy's MLP behind LitServe's batching (``max_batch_size``, ``batch_timeout``).

python litserve_server.py VERSION_DIR PORT
"""

import sys

import litserve as ls
import torch
from policy import greedy, load_mlp

version_dir, port = sys.argv[1], int(sys.argv[2])


class PolicyAPI(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(1)
        self.net = load_mlp(version_dir)

    def decode_request(self, request):
        if "observations" in request:
            return False, request["observations"]
        return True, [request["observation"]]

    def batch(self, inputs):
        return inputs  # a list of (single, observations): one forward pass in predict

    def predict(self, requests):
        actions = greedy(self.net, [o for _, obs in requests for o in obs])
        out, i = [], 0
        for single, obs in requests:
            out.append(actions[i] if single else actions[i : i + len(obs)])
            i += len(obs)
        return out

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"action": output} if isinstance(output, int) else {"actions": output}


if __name__ == "__main__":
    # LitServe's defaults batch nothing (max_batch_size 1); fast_queue is its ZeroMQ queue between
    # the API server and the inference worker, documented for throughput
    api = PolicyAPI(max_batch_size=64, batch_timeout=0.001)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")
