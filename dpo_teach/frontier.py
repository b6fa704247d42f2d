"""The reward-vs-KL frontier of notebook 09: every method measured the same way, side by side.

Rafailov et al. (2023, Figure 2, left) plot, for each method and hyper-parameter, the expected
ground-truth reward of the policy's samples against the KL divergence KL(pi || pi_ref) that buys it,
for checkpoints along each training run. This module runs that experiment in the course's world:

- every method starts from the same SFT policy (notebook 05), which is also pi_ref;
- every method consumes the same labelled pairs: DPO trains on exactly the pairs the reward model
  of PPO and best-of-N was fitted to (same prompts, same number of labels);
- every checkpoint is evaluated the same way (`Experiment.evaluate_samples`): `samples_per_prompt` responses
  to each of the same held-out prompts, sampled at temperature 1 with the same sampling seed
  (a paired design), scored by the oracle, with the sequence-level KL estimated from the same
  samples; the per-prompt numbers are kept, so that every comparison gets a paired bootstrap
  interval over prompts and seeds (`dpo_teach.stats`);
- one method per function, each returning a `Run` (its checkpoints as `Point`s and its cost):
  `sft`, `preferred_ft`, `best_of_n`, `dpo`, `ppo` (fixed or adaptive KL coefficient; reward model,
  or the oracle: "PPO-GT");
- a method's frontier is the upper concave hull of its checkpoints (`concave_frontier`): a mixture
  of two policies is itself a policy, with a reward between theirs and a KL no larger than the
  mixture of theirs, so every point under a chord between two checkpoints is achievable;
- the ideal frontier of the oracle itself, pi*_beta ~ pi_ref exp(r*/beta), is estimated by
  self-normalised importance sampling over many SFT samples per prompt (`ideal_frontier`).

The powered sweep is run by `python -m dpo_teach.sweep` (the preset's settings.sweep); notebook 09
runs a reduced live sweep (settings.live_sweep) and loads the powered one's results from
data/results/<preset>/. Costs are read from the training histories (dpo_teach.training's format,
PPO's included) by one function, `training_cost`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from dpo_teach import dpo, pipeline, ppo
from dpo_teach.cost import measure_cost, models_mb
from dpo_teach.evaluation import evaluate_policy, seeded_sampling
from dpo_teach.models import frozen_copy
from dpo_teach.presets import Preset, get_preset
from dpo_teach.reward import RewardModel, train_reward_model
from dpo_teach.sampling import generate
from dpo_teach.settings import SweepConfig
from dpo_teach.sft import train_sft
from dpo_teach.stats import Interval, paired_bootstrap
from dpo_teach.world import load_prompts, oracle_reward

__all__ = ["SweepConfig", "sweep_config", "paper_sweep_config", "live_sweep_config", "training_cost", "Point", "Run",
           "Experiment", "best_of_n_rewards", "best_of_n_kl", "on_frontier", "concave_frontier", "frontier_at",
           "MethodData", "method_data", "frontier_gap", "frontier_band", "point_gap", "length_controlled", "ideal_frontier", "IdealFrontier",
           "length_reward_curve", "length_explained", "cost_to_reach", "seed_spread", "mean_curve",
           "run_to_dict", "run_from_dict"]


def sweep_config(preset: Preset | None = None, **overrides) -> SweepConfig:
    """The powered sweep of a preset (default: the current one; its settings.sweep), with fields replaced."""
    return replace((preset or get_preset()).settings.sweep, **overrides)


def paper_sweep_config(preset: Preset | None = None, **overrides) -> SweepConfig:
    """The paper's full grid where a preset has one as an opt-in (settings.paper_sweep), else its sweep."""
    settings = (preset or get_preset()).settings
    return replace(settings.paper_sweep or settings.sweep, **overrides)


def live_sweep_config(preset: Preset | None = None, **overrides) -> SweepConfig:
    """The reduced sweep notebook 09 runs live (settings.live_sweep; its conclusions come from the powered one)."""
    return replace((preset or get_preset()).settings.live_sweep, **overrides)


def training_cost(history: dict[str, list], i: int = -1) -> dict[str, float]:
    """What a training run had cost after its step i (default: the last), from its history
    (dpo_teach.training's format): training seconds, sequences generated, sequences through forward
    passes (with a gradient, "sequences", or without one, PPO's "inference_sequences") and
    through backward passes (those with a gradient)."""
    def at(key: str) -> float:
        return history[key][i] if key in history else 0

    return {"seconds": at("seconds"), "sequences_generated": at("generated_sequences"),
            "forward_sequences": at("sequences") + at("inference_sequences"), "backward_sequences": at("sequences")}


def total_sequences(cost: dict) -> int:
    """The course's unit of training cost: sequences generated + forward passes + backward passes."""
    return int(cost.get("sequences_generated", 0) + cost.get("forward_sequences", 0) + cost.get("backward_sequences", 0))


@dataclass
class Point:
    """One checkpoint placed on the frontier, with its per-prompt measurements."""

    method: str  # "SFT", "DPO", "PPO", "PPO-GT", "Preferred-FT", "Best-of-N"
    setting: str  # the hyper-parameter, e.g. "beta=0.1", "kl_coef=0.05", "target_kl=4", "N=4"
    seed: int
    step: int  # training step of the checkpoint (0: the SFT policy)
    oracle_reward: float  # mean oracle reward of the samples
    oracle_reward_se: float  # its standard error over prompts
    kl: float  # estimated KL(pi || pi_ref) in nats per sequence
    kl_se: float
    length: float = 0.0  # mean response length in tokens
    seconds: float = 0.0  # training wall time up to this checkpoint (evaluation excluded)
    sequences: int = 0  # training cost up to this checkpoint: sequences generated + forward + backward
    rewards: list[float] = field(default_factory=list, repr=False)  # (P,) per prompt, mean over its samples
    kls: list[float] = field(default_factory=list, repr=False)  # (P,)
    lengths: list[float] = field(default_factory=list, repr=False)  # (P,)


@dataclass
class Run:
    """A training run (or a baseline): its checkpoints and what it cost."""

    method: str
    setting: str
    seed: int
    points: list[Point] = field(default_factory=list)
    cost: dict = field(default_factory=dict)  # see Experiment.* for the keys

    @property
    def final(self) -> Point:
        return self.points[-1]


def run_to_dict(run: Run, digits: int = 5) -> dict:
    """A Run as plain JSON-ready data (per-prompt numbers rounded to `digits` decimals)."""
    data = asdict(run)
    for point in data["points"]:
        for key in ("rewards", "kls", "lengths"):
            point[key] = [round(v, digits) for v in point[key]]
    return data


def run_from_dict(data: dict) -> Run:
    return Run(data["method"], data["setting"], data["seed"], [Point(**p) for p in data["points"]], data["cost"])


def _point(method: str, setting: str, seed: int, step: int, rewards, kls, lengths, seconds: float = 0.0,
           sequences: int = 0) -> Point:
    """A Point from per-prompt tensors (P,)."""
    rewards, kls, lengths = (torch.as_tensor(x, dtype=torch.float64) for x in (rewards, kls, lengths))
    n = len(rewards)
    se = (lambda x: x.std().item() / math.sqrt(n)) if n > 1 else (lambda x: 0.0)
    return Point(method, setting, seed, step, rewards.mean().item(), se(rewards), kls.mean().item(), se(kls),
                 lengths.mean().item(), seconds, int(sequences), rewards.tolist(), kls.tolist(), lengths.tolist())


def best_of_n_rewards(scores: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """(P,) oracle rewards of the samples the reward model picks among the first n of each prompt;
    scores (reward model) and rewards (oracle) are (N_max, P), sample j of prompt i at [j, i]."""
    best = scores[:n].argmax(dim=0)  # (P,) the sample the reward model likes best
    return rewards[:n].gather(0, best.unsqueeze(0)).squeeze(0)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || pi_ref) = log n - (n - 1) / n (Stiennon et al. 2020, appendix G.3; Beirami et
    al. 2024 show it is an upper bound, exact when all samples are distinct)."""
    return math.log(n) - (n - 1) / n


class Experiment:
    """The shared ingredients of the sweep (SFT policy, reference, reward model, pairs, prompts) and
    one method per function. Every function trains a fresh copy of the SFT policy."""

    def __init__(self, preset: Preset | None = None, sweep: SweepConfig | None = None, eval_seed: int = 1234,
                 parts: dict | None = None):
        """parts replaces any of the course's ingredients (e.g. small models in tests): "sft_policy",
        "tokenizer", "pairs" (training pairs), "train_prompts", "eval_prompts", "reward_model",
        "reward_cost" (what training the reward model cost, see reward_model_cost)."""
        self.preset = preset or get_preset()
        self.sweep = sweep or sweep_config(self.preset)
        parts = parts or {}
        if "sft_policy" in parts:
            self.sft_policy, self.tokenizer = parts["sft_policy"], parts["tokenizer"]
        else:
            self.sft_policy, self.tokenizer = pipeline.get_sft_policy(self.preset)
        self.ref_model = frozen_copy(self.sft_policy)
        self.pairs = parts["pairs"] if "pairs" in parts else pipeline.get_preference_pairs(self.preset)["train"]
        self.train_prompts = parts["train_prompts"] if "train_prompts" in parts else load_prompts(self.preset, "train")
        self.eval_prompts = (parts["eval_prompts"] if "eval_prompts" in parts
                             else load_prompts(self.preset, "test", n=self.sweep.eval_prompts))
        self.eval_seed = eval_seed
        self._reward_model = parts.get("reward_model")
        self._reward_cost = parts.get("reward_cost")
        self._ref_logps = None
        self._ref_cost = None
        self._sft_evaluation = None

    # ---- shared pieces ---------------------------------------------------------------------------

    @property
    def lengths(self) -> dict:
        return dict(max_prompt_tokens=self.preset.max_prompt_tokens, max_response_tokens=self.preset.max_response_tokens)

    @property
    def reward_model(self):
        """The reward model of notebook 06 (trained on `self.pairs`), loaded, or trained when missing."""
        if self._reward_model is None:
            with torch.enable_grad():  # training may happen here, even when called under no_grad
                self._reward_model = pipeline.get_reward_model(self.preset)
        return self._reward_model

    def reward_model_cost(self) -> dict:
        """What fitting the reward model cost, charged to every method that uses it (PPO, best-of-N):
        seconds and sequences of notebook 06's recipe on `self.pairs`, trained and timed once here
        (its weights are not used: the cached reward model has the same recipe)."""
        if self._reward_cost is None:
            config = self.preset.settings.reward
            reward_model = RewardModel.from_policy(self.sft_policy)
            with torch.enable_grad(), measure_cost(self.preset.device, held=(reward_model,)) as cost:
                history = train_reward_model(reward_model, self.tokenizer, self.pairs, config)
            self._reward_cost = {**training_cost(history), "seconds": cost.seconds, "peak_memory_mb": cost.peak_memory_mb,
                                 "labels": len(self.pairs), "pairs_read": config.num_steps * config.batch_size}
        return self._reward_cost

    def ref_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of every training pair, computed once and shared by all DPO runs
        (the cost of that one pass is charged to each run, see dpo)."""
        if self._ref_logps is None:
            with measure_cost(self.preset.device, held=(self.ref_model,)) as cost:
                self._ref_logps = dpo.precompute_ref_logps(self.ref_model, self.tokenizer, self.pairs, **self.lengths)
            self._ref_cost = {"seconds": cost.seconds, "peak_memory_mb": cost.peak_memory_mb,
                              "forward_sequences": 2 * len(self.pairs)}
        return self._ref_logps

    def evaluate_samples(self, policy) -> dict[str, torch.Tensor]:
        """Per-prompt oracle reward, KL estimate and response length of `policy`, each (P,): the mean
        over samples_per_prompt responses to each held-out prompt, sampled with the same seed for
        every policy (so that differences between methods are not sampling noise of the prompts)."""
        n, num = self.sweep.samples_per_prompt, len(self.eval_prompts)
        result = evaluate_policy(policy, self.ref_model, self.tokenizer, self.eval_prompts * n,
                                 max_new_tokens=self.preset.max_new_tokens, seed=self.eval_seed,
                                 max_prompt_tokens=self.preset.max_prompt_tokens)
        lengths = result["generation"].response_mask.sum(1).to(torch.float64)
        return {key: value.to(torch.float64).view(n, num).mean(0)
                for key, value in (("rewards", result["rewards"]), ("kls", result["kls"]), ("lengths", lengths))}

    def evaluate(self, policy) -> dict[str, float]:
        """Mean and standard error (over prompts) of the oracle reward and the KL of `policy`."""
        p = _point("", "", 0, 0, **self.evaluate_samples(policy))
        return {"oracle_reward": p.oracle_reward, "oracle_reward_se": p.oracle_reward_se, "kl": p.kl,
                "kl_se": p.kl_se, "length": p.length}

    def sft_samples(self) -> dict[str, torch.Tensor]:
        """evaluate_samples(SFT policy), computed once: the starting point of every run."""
        if self._sft_evaluation is None:
            self._sft_evaluation = self.evaluate_samples(self.sft_policy)
        return self._sft_evaluation

    def fresh_policy(self):
        """A trainable copy of the SFT policy: every run starts from one."""
        policy = copy.deepcopy(self.sft_policy)
        policy.requires_grad_(True)
        return policy

    # ---- one function per method -----------------------------------------------------------------

    def sft(self) -> Run:
        """The starting point: the SFT policy itself (KL 0 by definition)."""
        return Run("SFT", "-", 0, [_point("SFT", "-", 0, 0, **self.sft_samples())],
                   {"seconds": 0.0, "models_held": 1, "sequences_generated": 0, "forward_sequences": 0,
                    "backward_sequences": 0, "peak_memory_mb": models_mb([self.sft_policy])})

    def dpo(self, beta: float, seed: int = 0) -> Run:
        """DPO from SFT on every training pair, checkpoints every sweep.dpo_eval_every steps."""
        config = dpo.dpo_config(self.preset, beta=beta, seed=seed, num_steps=self.sweep.dpo_steps,
                                eval_every=self.sweep.dpo_eval_every)
        ref_logps = self.ref_logps()
        policy = self.fresh_policy()
        samples = []  # per-prompt results of each checkpoint, in order

        def evaluate(policy) -> dict[str, float]:  # the first call is at step 0, on the SFT policy itself
            samples.append(self.sft_samples() if not samples else self.evaluate_samples(policy))
            return {}

        with measure_cost(self.preset.device, held=(policy,)) as cost:
            history = dpo.train_dpo(policy, self.tokenizer, self.pairs, config, ref_logps=ref_logps,
                                    eval_fn=evaluate, progress=False, **self.lengths)
        setting = f"beta={beta:g}"
        ref = self._ref_cost
        points = []
        for step, sample in zip(history["eval/step"], samples):
            spent = self._with(ref, training_cost(history, step - 1)) if step else {"seconds": 0.0}
            points.append(_point("DPO", setting, seed, step, **sample, seconds=spent["seconds"],
                                 sequences=total_sequences(spent)))
        return Run("DPO", setting, seed, points, {
            **self._with(ref, training_cost(history)),
            "peak_memory_mb": max(cost.peak_memory_mb, ref["peak_memory_mb"]),
            "models_held": 1,  # the reference ran once, before training, over the pairs
            "labels": len(self.pairs), "pairs_read": config.num_steps * config.batch_size})

    @staticmethod
    def _with(upfront: dict, spent: dict) -> dict[str, float]:
        """A run's cost so far (training_cost) plus what was paid before it started (the reward
        model's training, the reference log-probs): seconds and sequences added up."""
        keys = ("seconds", "sequences_generated", "forward_sequences", "backward_sequences")
        return {key: spent.get(key, 0) + upfront.get(key, 0) for key in keys}

    def ppo(self, kl_coef: float, seed: int = 0, ground_truth: bool = False, target_kl: float | None = None) -> Run:
        """PPO from SFT against the reward model (or, with ground_truth, the oracle: "PPO-GT"); with
        target_kl, the KL coefficient starts at kl_coef and adapts towards that sequence KL."""
        config = replace(self.preset.settings.ppo, kl_coef=kl_coef, target_kl=target_kl,
                         kl_horizon=self.sweep.ppo_kl_horizon, seed=seed, num_steps=self.sweep.ppo_steps,
                         eval_every=self.sweep.ppo_eval_every)
        reward = ppo.oracle_fn if ground_truth else self.reward_model
        policy = self.fresh_policy()
        samples = []

        def evaluate(policy) -> dict:  # the first call is at step 0, on the SFT policy itself
            samples.append(self.sft_samples() if not samples else self.evaluate_samples(policy))
            return {}

        held = (policy, self.ref_model) if ground_truth else (policy, self.ref_model, reward)
        with measure_cost(self.preset.device, held=held) as cost:
            history = ppo.train_ppo(policy, self.ref_model, reward, self.tokenizer, self.train_prompts, config,
                                    eval_fn=evaluate, progress=False)
        method = "PPO-GT" if ground_truth else "PPO"
        setting = f"target_kl={target_kl:g}" if target_kl is not None else f"kl_coef={kl_coef:g}"
        rm = {"seconds": 0.0} if ground_truth else self.reward_model_cost()
        points = []
        for step, sample in zip(history["eval/step"], samples):
            spent = self._with(rm, training_cost(history, step - 1)) if step else {"seconds": 0.0}
            points.append(_point(method, setting, seed, step, **sample, sequences=total_sequences(spent),
                                 seconds=spent["seconds"]))
        return Run(method, setting, seed, points, {
            **self._with(rm, training_cost(history)),
            "peak_memory_mb": max(cost.peak_memory_mb, rm.get("peak_memory_mb", 0.0)),
            "models_held": len(held), "reward_model_seconds": rm["seconds"],
            "labels": 0 if ground_truth else len(self.pairs), "final_kl_coef": history["train/kl_coef"][-1]})

    def preferred_ft(self, seed: int = 0) -> Run:
        """"Preferred-FT": supervised fine-tuning of the SFT policy on the chosen responses only, with
        DPO's learning rate and batch size, on the same pairs."""
        base = dpo.dpo_config(self.preset)
        config = replace(self.preset.settings.sft, num_steps=self.sweep.preferred_ft_steps, batch_size=base.batch_size,
                         lr=base.lr, seed=seed, warmup_steps=base.warmup_steps, eval_every=self.sweep.preferred_ft_steps,
                         **self.lengths)
        records = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in self.pairs]
        policy = self.fresh_policy()
        with measure_cost(self.preset.device, held=(policy,)) as cost:
            history = train_sft(policy, self.tokenizer, records, config, response_key="chosen", progress=False)
        spent = {**training_cost(history), "seconds": cost.seconds}
        point = _point("Preferred-FT", "chosen only", seed, config.num_steps, **self.evaluate_samples(policy),
                       seconds=cost.seconds, sequences=total_sequences(spent))
        return Run("Preferred-FT", "chosen only", seed, [point], {
            **spent, "peak_memory_mb": cost.peak_memory_mb, "models_held": 1,
            "labels": len(self.pairs), "pairs_read": config.num_steps * config.batch_size})

    def best_of_n(self, ns: tuple[int, ...], seed: int = 0) -> list[Run]:
        """Best-of-N from SFT: N samples per prompt, the one the reward model scores highest is kept.

        The largest N is sampled once; smaller N use its first N samples. The KL is the analytic
        value log N - (N - 1) / N (best_of_n_kl): the best-of-N policy has no density to evaluate.
        Its cost is that of answering the held-out prompts once (sampling and scoring), plus the
        reward model's training.
        """
        n_max, num = max(ns), len(self.eval_prompts)
        reward_model = self.reward_model  # outside no_grad: it may have to be trained first
        rm = self.reward_model_cost()
        score = ppo.reward_model_fn(reward_model, self.tokenizer.pad_token_id)
        held = (self.sft_policy, reward_model)
        scores, generations = [], []
        with torch.no_grad(), measure_cost(self.preset.device, held=held) as cost, \
                seeded_sampling(seed, torch.device(self.preset.device)):
            for _ in range(n_max):  # sample j of every prompt, then score it with the reward model
                generation = generate(self.sft_policy, self.tokenizer, self.eval_prompts,
                                      max_new_tokens=self.preset.max_new_tokens, temperature=1.0, top_k=0,
                                      top_p=1.0, max_prompt_tokens=self.preset.max_prompt_tokens)
                scores.append(score(generation))
                generations.append(generation)
        scores = torch.stack(scores)  # (N_max, P); the oracle's scores below are evaluation, not cost
        rewards = torch.stack([oracle_reward(g.full_texts) for g in generations])  # (N_max, P)
        lengths = torch.stack([g.response_mask.sum(1).to(torch.float64) for g in generations])  # (N_max, P)
        runs = []
        for n in ns:
            spent = self._with(rm, {"seconds": cost.seconds * n / n_max,  # at inference, per evaluation set
                                    "sequences_generated": n * num, "forward_sequences": n * num})
            point = _point("Best-of-N", f"N={n}", seed, 0, best_of_n_rewards(scores, rewards, n),
                           torch.full((num,), best_of_n_kl(n)), best_of_n_rewards(scores, lengths, n),
                           seconds=spent["seconds"], sequences=total_sequences(spent))
            runs.append(Run("Best-of-N", f"N={n}", seed, [point], {
                **spent, "peak_memory_mb": max(cost.peak_memory_mb, rm["peak_memory_mb"]),
                "models_held": len(held), "reward_model_seconds": rm["seconds"], "labels": len(self.pairs)}))
        return runs

    def ideal_samples(self, num_samples: int | None = None, seed: int = 99) -> dict[str, torch.Tensor]:
        """num_samples SFT samples per held-out prompt: oracle rewards and lengths, each (K, P)."""
        k = num_samples or self.sweep.ideal_samples
        rewards, lengths = [], []
        for i in range(k):
            with torch.no_grad(), seeded_sampling(seed + i, torch.device(self.preset.device)):
                generation = generate(self.sft_policy, self.tokenizer, self.eval_prompts,
                                      max_new_tokens=self.preset.max_new_tokens, temperature=1.0, top_k=0,
                                      top_p=1.0, max_prompt_tokens=self.preset.max_prompt_tokens)
            rewards.append(oracle_reward(generation.full_texts).to(torch.float64))
            lengths.append(generation.response_mask.sum(1).to(torch.float64))
        return {"rewards": torch.stack(rewards), "lengths": torch.stack(lengths)}


# ---- Frontiers -----------------------------------------------------------------------------------


def on_frontier(kls: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """(M,) 1.0 for the points no other point beats: none has a KL as low or lower and a reward as
    high or higher, better in one of the two; else 0.0."""
    no_more_kl = kls.unsqueeze(0) <= kls.unsqueeze(1)  # [i, j]: kl_j <= kl_i
    no_less_reward = rewards.unsqueeze(0) >= rewards.unsqueeze(1)
    strictly = (kls.unsqueeze(0) < kls.unsqueeze(1)) | (rewards.unsqueeze(0) > rewards.unsqueeze(1))
    dominated = (no_more_kl & no_less_reward & strictly).any(dim=1)
    return (~dominated).to(rewards.dtype)


def concave_frontier(kls, rewards) -> tuple[list[float], list[float]]:
    """The achievable frontier of a set of checkpoints: the vertices (kl, reward), sorted by KL, of
    the upper concave hull of the points, kept up to the highest reward (with a larger KL budget
    one can always stay at a policy with less KL, so the frontier never falls).

    Why the hull: mixing two policies with weights (1 - t, t) gives a policy whose expected reward
    is the mixture of theirs and whose KL is at most the mixture of theirs (KL is convex), so the
    chord between two checkpoints lies on or under what is achievable.
    """
    points = sorted(zip((float(k) for k in kls), (float(r) for r in rewards)), key=lambda p: (p[0], -p[1]))
    hull: list[tuple[float, float]] = []
    for p in points:  # Andrew's monotone chain, upper half
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] on or under the chord
                hull.pop()
            else:
                break
        hull.append(p)
    top = max(range(len(hull)), key=lambda i: hull[i][1])
    hull = hull[:top + 1]
    return [x for x, _ in hull], [y for _, y in hull]


def frontier_at(xs: list[float], ys: list[float], kl: float) -> float:
    """The frontier (vertices xs, ys from concave_frontier) at a KL budget: linear between vertices,
    flat after the last one (its best reward), NaN below the first (no checkpoint with so little KL)."""
    if kl < xs[0] - 1e-12:
        return math.nan
    for (x1, y1), (x2, y2) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if kl <= x2:
            return y1 + (y2 - y1) * (kl - x1) / (x2 - x1) if x2 > x1 else max(y1, y2)
    return ys[-1]


@dataclass
class MethodData:
    """The per-prompt measurements of one method's checkpoints, stacked for the bootstrap."""

    method: str
    labels: list[tuple[str, int]]  # (setting, step) of each checkpoint column
    rewards: torch.Tensor  # (S, C, P): seeds x checkpoints x prompts
    kls: torch.Tensor  # (S, C, P)
    lengths: torch.Tensor  # (S, C, P)
    seeds: list[int]

    def curve(self, rewards: torch.Tensor | None = None, kls: torch.Tensor | None = None):
        """(kl (C,), reward (C,)): each checkpoint's mean over seeds and prompts."""
        rewards = self.rewards if rewards is None else rewards
        kls = self.kls if kls is None else kls
        return kls.mean(dim=(0, 2)), rewards.mean(dim=(0, 2))

    def frontier(self) -> tuple[list[float], list[float]]:
        return concave_frontier(*self.curve())


def method_data(runs: list[Run], method: str, settings: list[str] | None = None) -> MethodData:
    """Stack the checkpoints of `method`'s runs (optionally only some settings) into MethodData.
    Every setting must have run with the same seeds and the same checkpoints."""
    chosen = [r for r in runs if r.method == method and (settings is None or r.setting in settings)]
    if not chosen:
        raise ValueError(f"no runs of method {method!r}")
    seeds = sorted({r.seed for r in chosen})
    by_key = {(r.setting, r.seed): r for r in chosen}
    run_settings = list(dict.fromkeys(r.setting for r in chosen))
    labels = [(s, p.step) for s in run_settings for p in by_key[(s, seeds[0])].points]
    tensors = {}
    for key in ("rewards", "kls", "lengths"):
        rows = []
        for seed in seeds:
            missing = [s for s in run_settings if (s, seed) not in by_key]
            if missing:
                raise ValueError(f"{method}: seed {seed} did not run for settings {missing}")
            rows.append([getattr(p, key) for s in run_settings for p in by_key[(s, seed)].points])
        tensors[key] = torch.tensor(rows, dtype=torch.float64)  # (S, C, P)
    return MethodData(method, labels, tensors["rewards"], tensors["kls"], tensors["lengths"], seeds)


def frontier_gap(a: MethodData, b: MethodData, kl_grid: list[float], num_resamples: int = 1000,
                 seed: int = 0) -> tuple[list[Interval], Interval]:
    """How far a's frontier lies above b's at each KL of kl_grid, and on average over the grid:
    paired bootstrap intervals, resampling prompts (and seeds, where both have the same seeds)."""
    def gaps(ra, ka, rb, kb):  # (G + 1,): the gap at each KL of the grid, then their mean
        fa, fb = concave_frontier(*a.curve(ra, ka)), concave_frontier(*b.curve(rb, kb))
        values = torch.tensor([frontier_at(*fa, k) - frontier_at(*fb, k) for k in kl_grid], dtype=torch.float64)
        return torch.cat([values, values.mean().reshape(1)])

    samples = (a.rewards, a.kls, b.rewards, b.kls)
    if a.seeds != b.seeds:  # resample prompts only: average over seeds first
        samples = tuple(x.mean(0, keepdim=True) for x in samples)
    intervals = paired_bootstrap(gaps, *samples, num_resamples=num_resamples, seed=seed, vector=True)
    return intervals[:-1], intervals[-1]


def frontier_band(a: MethodData, kl_grid: list[float], num_resamples: int = 1000, seed: int = 0) -> list[Interval]:
    """a's frontier at each KL of kl_grid, with its bootstrap interval over prompts and seeds."""
    def values(r, k):
        f = concave_frontier(*a.curve(r, k))
        return torch.tensor([frontier_at(*f, x) for x in kl_grid], dtype=torch.float64)

    return paired_bootstrap(values, a.rewards, a.kls, num_resamples=num_resamples, seed=seed, vector=True)


def point_gap(rewards: torch.Tensor, kls: torch.Tensor, b: MethodData, num_resamples: int = 1000,
              seed: int = 0) -> Interval:
    """How far one policy (per-prompt rewards and KLs, (P,) or (S, P)) lies above b's frontier at its
    own KL: a paired bootstrap interval over prompts (b's seeds averaged)."""
    rewards, kls = (torch.as_tensor(x, dtype=torch.float64) for x in (rewards, kls))
    if rewards.dim() == 2:
        rewards, kls = rewards.mean(0), kls.mean(0)

    def gap(r, k, rb, kb):
        return r.mean() - frontier_at(*concave_frontier(*b.curve(rb, kb)), k.mean().item())

    return paired_bootstrap(gap, rewards, kls, b.rewards.mean(0, keepdim=True), b.kls.mean(0, keepdim=True),
                            num_resamples=num_resamples, seed=seed)


# ---- The ideal frontier of the oracle --------------------------------------------------------------


@dataclass
class IdealFrontier:
    """pi*_beta ~ pi_ref exp(r*/beta) estimated per beta from K SFT samples per prompt."""

    betas: list[float]
    kl: list[float]  # mean over prompts of KL(pi*_beta || pi_ref), nats per sequence
    reward: list[float]  # mean over prompts of E_{pi*_beta}[r*]
    ess: list[float]  # mean over prompts of the effective sample size of the weights (out of K)
    reward_se: list[float]  # standard error over prompts of the reward
    num_samples: int  # K

    @property
    def reliable_kl(self) -> float:
        """The largest KL at which the mean effective sample size is still at least K / 10: beyond it
        the estimate rests on a few samples per prompt (and can never exceed log K)."""
        ok = [k for k, e in zip(self.kl, self.ess) if e >= self.num_samples / 10]
        return max(ok) if ok else 0.0


def ideal_point(rewards: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Self-normalised importance sampling of pi*_beta from samples of pi_ref, per prompt.

    rewards: (K, P) oracle rewards of K samples y_k ~ pi_ref(.|x) of each prompt. With weights
    w_k = exp(r_k / beta) / sum_j exp(r_j / beta) (the density ratio pi*/pi_ref up to Z):
      E_{pi*}[r] ~ sum_k w_k r_k,  log Z ~ log mean_k exp(r_k / beta),
      KL(pi* || pi_ref) = E_{pi*}[r] / beta - log Z  (from log pi*/pi_ref = r / beta - log Z).
    The estimates are consistent as K grows, biased for finite K; the KL estimate is at most log K.
    Returns per-prompt "reward", "kl" and "ess" (1 / sum_k w_k^2), each (P,).
    """
    logits = rewards / beta  # (K, P)
    weights = torch.softmax(logits, dim=0)  # (K, P)
    reward = (weights * rewards).sum(0)
    log_z = torch.logsumexp(logits, dim=0) - math.log(rewards.shape[0])
    return {"reward": reward, "kl": (reward / beta - log_z).clamp(min=0.0), "ess": 1.0 / (weights**2).sum(0)}


def ideal_frontier(rewards: torch.Tensor, betas) -> IdealFrontier:
    """The ideal frontier (ideal_point for each beta), averaged over prompts."""
    points = [ideal_point(rewards, b) for b in betas]
    n = rewards.shape[1]
    return IdealFrontier([float(b) for b in betas], [p["kl"].mean().item() for p in points],
                         [p["reward"].mean().item() for p in points], [p["ess"].mean().item() for p in points],
                         [p["reward"].std().item() / math.sqrt(n) for p in points], rewards.shape[0])


# ---- Length -----------------------------------------------------------------------------------------


def length_reward_curve(rewards: torch.Tensor, lengths: torch.Tensor) -> dict[int, float]:
    """E[r* | length] under pi_ref, from SFT samples: the mean oracle reward of the samples of each
    response length (in tokens). rewards and lengths: any shape, the same."""
    curve = {}
    for n in torch.unique(lengths).tolist():
        curve[int(n)] = rewards[lengths == n].mean().item()
    return curve


def length_explained(lengths: torch.Tensor, curve: dict[int, float]) -> torch.Tensor:
    """The reward that response length alone predicts for samples of these lengths: curve[length]
    (the nearest length seen in the SFT samples where this one was not). Same shape as lengths."""
    known = torch.tensor(sorted(curve), dtype=torch.float64)
    values = torch.tensor([curve[int(k)] for k in known.tolist()], dtype=torch.float64)
    nearest = (lengths.to(torch.float64).unsqueeze(-1) - known).abs().argmin(-1)
    return values[nearest]


def length_controlled(data: MethodData, curve: dict[int, float], sft_lengths: torch.Tensor) -> MethodData:
    """The same checkpoints with the reward that length alone explains taken out: each per-prompt
    reward minus (length_explained(its length) - the mean length_explained of the SFT samples).
    What is left is the reward a policy gains at the SFT policy's length."""
    base = length_explained(sft_lengths, curve).mean()
    adjusted = data.rewards - (length_explained(data.lengths, curve) - base)
    return replace(data, rewards=adjusted)


# ---- Tables -------------------------------------------------------------------------------------


def seed_spread(runs: list[Run]) -> list[dict]:
    """Per method and setting: mean, spread (std over seeds) and range of the final oracle reward and KL."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.method, run.setting), []).append(run)
    rows = []
    for (method, setting), group in groups.items():
        rewards = torch.tensor([r.final.oracle_reward for r in group])
        kls = torch.tensor([r.final.kl for r in group])
        rows.append({"method": method, "setting": setting, "seeds": len(group),
                     "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(group) > 1 else 0.0,
                     "reward_min": rewards.min().item(), "reward_max": rewards.max().item(),
                     "kl_mean": kls.mean().item(), "kl_std": kls.std().item() if len(group) > 1 else 0.0})
    return rows


def mean_curve(runs: list[Run]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Checkpoint-wise mean over seeds of one setting's runs: (kl, kl_se, reward, reward_se), where the
    error bars are the standard error over seeds (spread of the run-to-run results)."""
    steps = [p.step for p in runs[0].points]
    kl, kl_se, reward, reward_se = [], [], [], []
    for i, _ in enumerate(steps):
        k = torch.tensor([r.points[i].kl for r in runs])
        v = torch.tensor([r.points[i].oracle_reward for r in runs])
        n = len(runs)
        kl.append(k.mean().item())
        reward.append(v.mean().item())
        kl_se.append(k.std().item() / math.sqrt(n) if n > 1 else runs[0].points[i].kl_se)
        reward_se.append(v.std().item() / math.sqrt(n) if n > 1 else runs[0].points[i].oracle_reward_se)
    return kl, kl_se, reward, reward_se


def cost_to_reach(runs: list[Run], target: float) -> dict | None:
    """What a method pays to first reach an oracle reward >= target: for each seed, the cheapest
    checkpoint over all settings (in sequences processed), then the median over seeds of its
    sequences and seconds. None when some seed never reaches the target."""
    per_seed = {}
    for run in runs:
        for point in run.points:
            if point.oracle_reward >= target:
                best = per_seed.get(run.seed)
                if best is None or point.sequences < best["sequences"]:
                    per_seed[run.seed] = {"setting": run.setting, "step": point.step, "sequences": point.sequences,
                                          "seconds": point.seconds, "oracle_reward": point.oracle_reward}
                break
    seeds = sorted({r.seed for r in runs})
    if not seeds or len(per_seed) < len(seeds):
        return None
    sequences = torch.tensor([per_seed[s]["sequences"] for s in seeds], dtype=torch.float64)
    seconds = torch.tensor([per_seed[s]["seconds"] for s in seeds], dtype=torch.float64)
    return {"sequences": sequences.quantile(0.5).item(), "seconds": seconds.quantile(0.5).item(), "seeds": len(seeds),
            "per_seed": [per_seed[s] for s in seeds]}
