"""DQN with TorchRL: ``train(config, on_progress, should_stop) -> TrainedPolicy``.

``DQN`` builds the Q-network from the same ``PolicySpec`` the registry serves, an annealed
epsilon-greedy collection policy, a replay buffer (sequences for the recurrent variant, sampled
with ``SliceSampler``) and ``DQNLoss`` with its target network; ``update`` is one gradient
step. The loop around it (a batch, store, update, evaluate, publish) is
``common.train_offpolicy``, shared with SAC and TD3; a ``source: sessions`` job runs the same
loop over ``from_sessions.SessionsSource`` (the transitions clients report) instead of an env.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictSequential
from torchrl.data import LazyTensorStorage, RandomSampler, SliceSampler, TensorDictReplayBuffer
from torchrl.modules import EGreedyModule
from torchrl.objectives import DQNLoss, HardUpdate, SoftUpdate, ValueEstimators

from service.envs import env_specs, has_action_mask, is_pixel_env, make_env
from service.registry.build import ACTION_MASK, build_policy
from service.registry.preprocess import as_module, make_transform, split_for_storage
from service.registry.spec import PolicySpec, parse_preprocess
from service.training.common import (
    SEGMENT,
    BatchSize,
    EvalEpisodes,
    FramesPerBatch,
    LearningRate,
    NumEnvs,
    OffPolicyHyperparameters,
    Progress,
    StopCheck,
    TrainConfig,
    TrainedPolicy,
    UpdatesPerBatch,
    train_offpolicy,
)
from service.training.from_sessions import ClientReturns, SessionsSource
from service.training.imitation import Imitation, ImitationConfig

log = logging.getLogger(__name__)
PREPROCESSED = "observation_preprocessed"


class DQNHyperparameters(OffPolicyHyperparameters):
    """DQN knobs; the defaults solve CartPole-v1 (see benchmarks/train_dqn.py)."""

    lr: LearningRate = 2.3e-3
    batch_size: BatchSize = 64
    frames_per_batch: FramesPerBatch = 256
    updates_per_batch: UpdatesPerBatch = 128
    num_envs: NumEnvs = 16
    eval_episodes: EvalEpisodes = 20
    hidden_size: int = Field(64, ge=4, le=1024, description="LSTM width (recurrent only).")
    eps_start: float = Field(1.0, ge=0, le=1, description="Initial epsilon.")
    eps_end: float = Field(0.04, ge=0, le=1, description="Final epsilon.")
    exploration_fraction: float = Field(
        0.16, gt=0, le=1, description="Share of total_frames to anneal epsilon over."
    )
    target_update: Literal["hard", "soft"] = Field("hard", description="Target network update.")
    target_update_interval: int = Field(128, ge=1, description="Gradient steps between hard updates.")
    tau: float = Field(0.005, gt=0, le=1, description="Soft update rate.")
    double_dqn: bool = Field(False, description="Double DQN targets.")
    loss_function: Literal["l2", "smooth_l1"] = Field("l2", description="TD loss.")
    max_grad_norm: float = Field(10.0, gt=0, description="Gradient clipping.")
    slice_len: int = Field(16, ge=2, le=512, description="Sequence length (recurrent only).")
    value_estimator: Literal["td0", "td_lambda"] = Field(
        "td0",
        description="Q-target: one-step (td0) or Peng's Q(lambda) along each sampled sequence "
        "(td_lambda, recurrent only).",
    )
    lmbda: float = Field(0.9, ge=0, le=1, description="Lambda of td_lambda.")
    # pixel envs (CartPolePixels-v1): the seed's preprocessing and a ConvNet
    resize: int = Field(84, ge=8, le=256, description="Frames resized to resize x resize (pixels only).")
    conv_cells: list[Annotated[int, Field(ge=1, le=256)]] = Field(
        default_factory=lambda: [32, 64, 64], min_length=1, max_length=6, description="ConvNet channels."
    )
    conv_kernels: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        default_factory=lambda: [8, 4, 3], min_length=1, max_length=6, description="ConvNet kernel sizes."
    )
    conv_strides: list[Annotated[int, Field(ge=1, le=8)]] = Field(
        default_factory=lambda: [4, 2, 1], min_length=1, max_length=6, description="ConvNet strides."
    )
    norm_init_frames: int = Field(
        1000, ge=10, le=100_000, description="Random frames whose pixel mean/std set observation_norm."
    )


RECURRENT_DEFAULTS: dict[str, Any] = {
    # CartPoleNoVel-v1, 100k frames, seeds 0-2: 500 / 500 / 452 (README, Training
    # measurements); the lambda-return along each sequence took the same net from ~230 to 500.
    "num_cells": [128],
    "hidden_size": 128,
    "lr": 1e-3,
    "batch_size": 64,
    "frames_per_batch": 100,
    "updates_per_batch": 25,
    "num_envs": 1,
    "init_random_frames": 1000,
    "target_update": "soft",
    "tau": 0.01,
    "double_dqn": True,
    "value_estimator": "td_lambda",
    "lmbda": 0.9,
    "exploration_fraction": 0.3,
    "eps_end": 0.02,
    "loss_function": "smooth_l1",
    "slice_len": 16,
    "eval_every_frames": 10_000,
}


# source "sessions": the env-backed defaults, less one env-copy knob (clients are the envs)
SESSIONS_DEFAULTS: dict[str, Any] = {"num_envs": 1}

PIXEL_DEFAULTS: dict[str, Any] = {
    "num_envs": 1,
    "buffer_size": 50_000,
    "frames_per_batch": 100,
    "updates_per_batch": 25,
    "batch_size": 32,
    "lr": 2.5e-4,
}


class DQNConfig(TrainConfig, ImitationConfig):
    """One DQN training run: on an allow-listed env, or (``source: sessions``) on the
    transitions clients report through sessions bound to the job."""

    recurrent: bool = False
    hyperparameters: DQNHyperparameters = Field(default_factory=DQNHyperparameters)
    source: Literal["env", "sessions"] = "env"
    observation: dict[str, Any] | None = None  # source sessions: the clients' specs
    action: dict[str, Any] | None = None
    experience_dir: str | None = None  # source sessions: where the transitions arrive
    experience_from: list[str] = Field(default_factory=list)  # earlier jobs' dirs (siblings) seed it

    @model_validator(mode="after")
    def _source_fits(self) -> DQNConfig:
        if self.source == "env" and self.env_id is None:
            raise ValueError("env_id is required (or source 'sessions' with observation and action)")
        if self.source == "sessions":
            if self.env_id is not None or self.observation is None or self.action is None:
                raise ValueError("source 'sessions' takes observation and action specs, and no env_id")
        return self

    @classmethod
    def default_hyperparameters(cls, **kw: Any) -> dict[str, Any]:
        defaults = dict(RECURRENT_DEFAULTS) if kw.get("recurrent") else {}
        if kw.get("source") == "sessions":
            defaults.update(SESSIONS_DEFAULTS)
        if kw.get("env_id") and has_action_mask(kw["env_id"]):
            defaults["num_envs"] = 1  # masked envs are stepped one copy at a time
        if kw.get("env_id") and is_pixel_env(kw["env_id"]):
            defaults.update(PIXEL_DEFAULTS)
        return defaults

    @model_validator(mode="after")
    def _conv_layers_agree(self) -> DQNConfig:
        hp = self.hyperparameters
        if not len(hp.conv_cells) == len(hp.conv_kernels) == len(hp.conv_strides):
            raise ValueError("conv_cells, conv_kernels and conv_strides need one value per layer each")
        return self

    @model_validator(mode="after")
    def _sequences_for_lambda(self) -> DQNConfig:
        if self.hyperparameters.value_estimator == "td_lambda" and not self.recurrent:
            raise ValueError(
                "value_estimator 'td_lambda' needs sequences: use it with recurrent=true "
                "(an MLP run samples single transitions; use 'td0')"
            )
        return self

    @model_validator(mode="after")
    def _one_copy_of_a_masked_env(self) -> DQNConfig:
        if self.env_id and self.hyperparameters.num_envs > 1 and has_action_mask(self.env_id):
            raise ValueError(
                f"{self.env_id} gives action masks: its env copies are stepped one at a time, use num_envs=1"
            )
        return self


def pixel_preprocess(config: DQNConfig) -> list[dict[str, Any]]:
    """The seed's preprocessing of a pixel env: HWC uint8 → CHW, grayscale, resized (all still
    uint8, what the replay buffer stores), then ``observation_norm`` with the mean and standard
    deviation of ``norm_init_frames`` random frames (the seed's ``init_stats``)."""
    hp = config.hyperparameters
    stored = [
        {"type": "to_tensor_image", "from_int": False, "dtype": "uint8"},
        {"type": "grayscale"},
        {"type": "resize", "w": hp.resize, "h": hp.resize},
    ]
    env = make_env(config.env_id, trackers=False)
    for entry in stored:
        env.append_transform(make_transform(parse_preprocess(entry)))
    env.set_seed(config.seed)
    try:
        frames = env.rollout(hp.norm_init_frames, break_when_any_done=False)["observation"].float()
    finally:
        env.close()
    loc, scale = frames.mean().item(), max(frames.std().item(), 1e-3)
    return [*stored, {"type": "observation_norm", "loc": [[[loc]]], "scale": [[[scale]]]}]


def policy_spec_for(config: DQNConfig) -> PolicySpec:
    hp = config.hyperparameters
    if config.source == "sessions":
        specs = {"observation": config.observation, "action": config.action}
    else:
        specs = env_specs(config.env_id)
    if specs["action"].get("type") != "discrete":
        raise ValueError(f"DQN needs a discrete action space; {config.env_id or 'the clients'} have a box")
    network: dict[str, Any] = {"type": "mlp", "num_cells": hp.num_cells, "activation": hp.activation}
    preprocess: list[dict[str, Any]] = []
    if config.env_id and is_pixel_env(config.env_id):
        preprocess = pixel_preprocess(config)
        network["conv"] = {
            "num_cells": hp.conv_cells,
            "kernel_sizes": hp.conv_kernels,
            "strides": hp.conv_strides,
            "activation": "relu",
        }
    return PolicySpec.model_validate(
        {
            "kind": "qvalue",
            **specs,
            "preprocess": preprocess,
            "network": network,
            "recurrent": {"type": "lstm", "hidden_size": hp.hidden_size} if config.recurrent else None,
            "env_id": config.env_id,
            "exploration": {"epsilon": max(hp.eps_end, 0.01)},
        }
    )


class DQN:
    """The parts of one DQN run (implements ``common.OffPolicyAlgorithm``)."""

    name = "dqn"

    def __init__(self, config: DQNConfig) -> None:
        hp = self.hyperparameters = config.hyperparameters
        self.recurrent = config.recurrent
        device = torch.device(config.device)
        self.spec = policy_spec_for(config)
        # With an env that gives action masks (Taxi), the Q-network's greedy choice, the
        # epsilon-greedy draws and the target's max over next actions all respect the mask
        # (the loss runs the same masked module on the stored ("next", "action_mask")).
        masked = config.env_id is not None and has_action_mask(config.env_id)
        # Pixel envs: the env applies the uint8 part of the preprocessing (the buffer stores
        # small uint8 frames under "observation"); the float rest (observation_norm) runs in
        # front of the network, writing PREPROCESSED, which is never stored.
        self.stored_preprocess, rest = split_for_storage(self.spec.observation, self.spec.preprocess)
        key = PREPROCESSED if rest else "observation"
        self.built = build_policy(self.spec, device, action_mask=masked, observation_key=key)
        self.act_policy = self.built.core
        if rest:
            normalise = TensorDictModule(
                as_module(rest), in_keys=["observation"], out_keys=[PREPROCESSED]
            ).to(device)
            self.act_policy = TensorDictSequential(normalise, self.built.core)
        self.egreedy = EGreedyModule(
            self.built.action_spec,
            eps_init=hp.eps_start,
            eps_end=hp.eps_end,
            annealing_num_steps=max(1, int(hp.exploration_fraction * config.total_frames)),
            action_mask_key=ACTION_MASK if masked else None,
        ).to(device)
        self.collect_policy = TensorDictSequential(self.act_policy, self.egreedy)
        if config.recurrent:
            # Slices are cut within one collected batch (a contiguous stretch of one env's
            # stream), not within one episode: episodes shorter than slice_len stay sampleable
            # and the LSTM resets at is_init inside a slice, as it does when acting.
            sampler = SliceSampler(slice_len=hp.slice_len, traj_key=SEGMENT, strict_length=True)
            batch_size = hp.batch_size * hp.slice_len
        else:
            sampler, batch_size = RandomSampler(), hp.batch_size
        # no batch_size here: the loop draws sample_size x updates_per_batch at once
        self.buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(hp.buffer_size, device=device), sampler=sampler
        )
        self.sample_size = batch_size
        self.loss_fn = DQNLoss(
            self.act_policy,
            action_space=self.built.action_spec,
            delay_value=True,
            double_dqn=hp.double_dqn,
            loss_function=hp.loss_function,
        )
        if hp.value_estimator == "td_lambda":
            self.loss_fn.make_value_estimator(ValueEstimators.TDLambda, gamma=hp.gamma, lmbda=hp.lmbda)
        else:
            self.loss_fn.make_value_estimator(gamma=hp.gamma)
        if hp.target_update == "hard":
            # Stepped only every target_update_interval updates, and then copies (interval 0):
            # HardUpdate.step() walks every parameter even when it only counts (~30 µs an update).
            self.target = HardUpdate(self.loss_fn, value_network_update_interval=0)
            self.target_every = hp.target_update_interval
        else:
            self.target = SoftUpdate(self.loss_fn, tau=hp.tau)
            self.target_every = 1
        self.params = list(self.loss_fn.parameters())  # walking the module tree per update costs ~90 µs
        self.optim = torch.optim.Adam(self.params, lr=hp.lr, fused=True)
        self.updates = 0
        self.imitation = None
        if config.imitation_dir is not None:
            self.imitation = Imitation(
                config.imitation_dir, self.built, self.act_policy, self.spec, config.imitation_weight, device
            )

    def prepare(self, batch: TensorDictBase, index: int) -> TensorDictBase:
        batch = batch.exclude(PREPROCESSED, ("next", PREPROCESSED))  # float frames: recomputed
        if self.recurrent:
            batch[SEGMENT] = segment_ids(batch.shape, index, batch.device)
        return batch

    def update(self, sample: TensorDictBase) -> torch.Tensor:
        if self.recurrent:
            sample = _as_sequences(sample, self.hyperparameters.slice_len)
        loss = self.loss_fn(sample)["loss"]
        if self.imitation is not None:
            loss = loss + self.imitation.loss(sample.shape[0])
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.hyperparameters.max_grad_norm)
        self.optim.step()
        self.updates += 1
        if self.updates % self.target_every == 0:
            self.target.step()
        return loss.detach()

    def after_batch(self, frames: int) -> dict[str, Any]:
        self.egreedy.step(frames)
        return {"epsilon": float(self.egreedy.eps)}

    def restore(self, weights: dict[str, torch.Tensor], frames: int) -> None:
        """Continue an interrupted run: its last published weights (online and target), epsilon
        where the schedule was after ``frames``; the optimizer's moments start afresh."""
        self.built.core.load_state_dict(weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "already initialized": re-copying is the point
            self.target.init_()
        self.after_batch(frames)


def train(
    config: DQNConfig, on_progress: Progress | None = None, should_stop: StopCheck | None = None
) -> TrainedPolicy:
    """Train a DQN policy and return it ready to publish (``cancelled`` if stopped early)."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    algo = DQN(config)
    if config.source == "sessions":  # the transitions clients report instead of an env
        source = SessionsSource(algo, config)
        return train_offpolicy(
            algo, config, on_progress, should_stop, start, source, ClientReturns(algo, source)
        )
    return train_offpolicy(algo, config, on_progress, should_stop, start)


def segment_ids(shape: torch.Size, batch_index: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``SliceSampler`` trajectory key of a collected batch shaped ``[*envs, time]``.

    One id per env copy per batch (unique across batches): a sampled slice is always a
    contiguous stretch of one env's stream, never the end of one copy's row glued to the start
    of the next's once the batch is flattened into the buffer.
    """
    rows = shape.numel() // shape[-1]
    ids = batch_index * rows + torch.arange(rows, device=device)
    return ids.reshape(*shape[:-1], 1).expand(shape)


def _as_sequences(sample, slice_len: int):
    """SliceSampler returns flat slices; the recurrent loss wants ``[batch, time]``.

    A slice may cross an episode boundary (``is_init`` inside it). The online sequence splits
    there by itself; the target sequence (``next``) must split at the same steps, starting from
    the stored state after the new episode's first observation, or the LSTM would carry the old
    episode's state into the new one's targets.
    """
    n = sample.numel() - sample.numel() % slice_len
    seq = sample[:n].reshape(-1, slice_len)
    seq.set(("next", "is_init"), seq.get("is_init").clone())
    return seq
