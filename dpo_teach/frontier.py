"""The reward-vs-KL frontier of notebook 09: every method measured the same way, side by side.

Rafailov et al. (2023, Figure 2, left) plot, for each method and hyper-parameter, the expected
ground-truth reward of the policy's samples against the KL divergence KL(pi || pi_ref) that buys it,
for checkpoints along each training run. This module runs that experiment in the course's world:

- every method starts from the same SFT policy (notebook 05), which is also pi_ref;
- every checkpoint is evaluated the same way (`Experiment.evaluate`): one response per held-out
  prompt, sampled at temperature 1 with the same sampling seed, scored by the oracle, with the
  sequence-level KL estimated from the same samples (mean of log pi(y|x) - log pi_ref(y|x));
- one method per function, each returning a `Run` (its checkpoints as `Point`s and its cost):
  `sft`, `preferred_ft`, `best_of_n`, `dpo`, `ppo` (reward model, or the oracle: "PPO-GT").

The sizes of the sweep are set per preset by `SWEEPS` (a reduced one on the CPU preset).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from dpo_teach import dpo, pipeline, ppo
from dpo_teach.cost import measure_cost
from dpo_teach.evaluation import evaluate_policy, seeded_sampling
from dpo_teach.models import frozen_copy
from dpo_teach.presets import Preset, get_preset
from dpo_teach.sampling import generate
from dpo_teach.sft import SFTConfig, train_sft
from dpo_teach.world import load_prompts, oracle_reward


@dataclass(frozen=True)
class SweepConfig:
    """What notebook 09 runs: hyper-parameters per method, seeds and run lengths."""

    dpo_betas: tuple[float, ...]  # DPO's beta (the paper swept 0.05, 0.1, 1, 5)
    ppo_kl_coefs: tuple[float, ...]  # PPO's fixed KL coefficient (the paper swept target KLs 3-12)
    seeds: tuple[int, ...]  # every training run is repeated with each seed
    best_of_n: tuple[int, ...]  # N of the best-of-N baseline
    dpo_steps: int  # DPO optimizer steps per run (batches of DPOConfig.batch_size pairs)
    dpo_eval_every: int  # steps between DPO checkpoints
    ppo_steps: int  # PPO rollout batches per run
    ppo_eval_every: int  # steps between PPO checkpoints
    preferred_ft_steps: int  # SFT steps on the chosen responses ("Preferred-FT")
    eval_prompts: int  # held-out prompts per evaluation (one sample each)
    ppo_gt: bool = False  # also run PPO with the oracle as its reward (the paper's "PPO-GT")


SWEEPS = {
    # CPU, 2 cores: about 3 minutes. Two betas, two KL coefficients, two seeds, short runs (KL up to ~3 nats).
    "tiny": SweepConfig(dpo_betas=(0.05, 0.5), ppo_kl_coefs=(0.05, 0.2), seeds=(0, 1), best_of_n=(2, 4, 8),
                        dpo_steps=30, dpo_eval_every=15, ppo_steps=14, ppo_eval_every=7,
                        preferred_ft_steps=20, eval_prompts=64),
    # GPU: the paper's grid of four betas, four KL coefficients, three seeds, PPO-GT.
    "gpt2": SweepConfig(dpo_betas=(0.05, 0.1, 1.0, 5.0), ppo_kl_coefs=(0.02, 0.05, 0.1, 0.2), seeds=(0, 1, 2),
                        best_of_n=(2, 4, 16, 64), dpo_steps=600, dpo_eval_every=100, ppo_steps=200,
                        ppo_eval_every=25, preferred_ft_steps=300, eval_prompts=512, ppo_gt=True),
}


def sweep_config(preset: Preset | None = None, **overrides) -> SweepConfig:
    """The sweep of a preset (default: the current one), with fields replaced."""
    from dataclasses import replace

    preset = preset or get_preset()
    return replace(SWEEPS[preset.name], **overrides)


@dataclass
class Point:
    """One checkpoint placed on the frontier."""

    method: str  # "SFT", "DPO", "PPO", "PPO-GT", "Preferred-FT", "Best-of-N"
    setting: str  # the hyper-parameter, e.g. "beta=0.1", "kl_coef=0.05", "N=4"
    seed: int
    step: int  # training step of the checkpoint (0: the SFT policy)
    oracle_reward: float  # mean oracle reward of the samples
    oracle_reward_se: float  # its standard error over prompts
    kl: float  # estimated KL(pi || pi_ref) in nats per sequence
    kl_se: float
    seconds: float = 0.0  # training wall time up to this checkpoint (evaluation excluded)


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


def _summary(rewards: torch.Tensor, kls: torch.Tensor) -> dict[str, float]:
    n = len(rewards)
    return {"oracle_reward": rewards.mean().item(), "oracle_reward_se": rewards.std().item() / math.sqrt(n),
            "kl": kls.mean().item(), "kl_se": kls.std().item() / math.sqrt(n)}


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
        "tokenizer", "pairs" (training pairs), "train_prompts", "eval_prompts", "reward_model"."""
        self.preset = preset or get_preset()
        self.sweep = sweep or sweep_config(self.preset)
        parts = parts or {}
        if "sft_policy" in parts:
            self.sft_policy, self.tokenizer = parts["sft_policy"], parts["tokenizer"]
        else:
            self.sft_policy, self.tokenizer = pipeline.get_sft_policy(self.preset)
        self.ref_model = frozen_copy(self.sft_policy)
        self.pairs = parts["pairs"] if "pairs" in parts else pipeline.get_preference_pairs(self.preset)["train"]
        self.train_prompts = parts.get("train_prompts") or load_prompts(self.preset, "train")
        self.eval_prompts = parts.get("eval_prompts") or load_prompts(self.preset, "test", n=self.sweep.eval_prompts)
        self.eval_seed = eval_seed
        self._reward_model = parts.get("reward_model")
        self._ref_logps = {}
        self._sft_evaluation = None

    # ---- shared pieces ---------------------------------------------------------------------------

    @property
    def reward_model(self):
        if self._reward_model is None:
            self._reward_model = pipeline.get_reward_model(self.preset)
        return self._reward_model

    def ref_logps(self, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the first num_pairs training pairs, computed once and shared by all runs."""
        if num_pairs not in self._ref_logps:
            self._ref_logps[num_pairs] = dpo.precompute_ref_logps(
                self.ref_model, self.tokenizer, self.pairs.select(range(num_pairs)),
                max_prompt_tokens=self.preset.max_prompt_tokens, max_response_tokens=self.preset.max_response_tokens)
        return self._ref_logps[num_pairs]

    def evaluate(self, policy) -> dict[str, float]:
        """Oracle reward and KL to pi_ref of one sample per held-out prompt (same sampling seed for every
        policy, so that differences between methods are not sampling noise of the prompts' draws)."""
        result = evaluate_policy(policy, self.ref_model, self.tokenizer, self.eval_prompts,
                                 max_new_tokens=self.preset.max_new_tokens, seed=self.eval_seed,
                                 max_prompt_tokens=self.preset.max_prompt_tokens)
        return _summary(result["rewards"], result["kls"])

    def sft_evaluation(self) -> dict[str, float]:
        """evaluate(SFT policy), computed once: the starting point of every run."""
        if self._sft_evaluation is None:
            self._sft_evaluation = self.evaluate(self.sft_policy)
        return self._sft_evaluation

    def fresh_policy(self):
        """A trainable copy of the SFT policy: every run starts from one."""
        policy = copy.deepcopy(self.sft_policy)
        policy.requires_grad_(True)
        return policy

    # ---- one function per method -----------------------------------------------------------------

    def sft(self) -> Run:
        """The starting point: the SFT policy itself (KL 0 by definition)."""
        return Run("SFT", "-", 0, [Point("SFT", "-", 0, 0, **self.sft_evaluation())],
                   {"seconds": 0.0, "models_held": 1, "tokens_generated": 0,
                    "forward_sequences": 0, "backward_sequences": 0, "peak_memory_mb": 0.0})

    def dpo(self, beta: float, seed: int = 0) -> Run:
        """DPO from SFT on the preference pairs, evaluated every sweep.dpo_eval_every steps."""
        config = dpo.dpo_config(self.preset, beta=beta, seed=seed, num_steps=self.sweep.dpo_steps,
                                eval_every=self.sweep.dpo_eval_every)
        num_pairs = min(len(self.pairs), config.num_steps * config.batch_size)
        ref_logps = self.ref_logps(num_pairs)
        policy = self.fresh_policy()
        calls = []

        def evaluate(policy) -> dict[str, float]:  # the first call is at step 0, on the SFT policy itself
            calls.append(1)
            return self.sft_evaluation() if len(calls) == 1 else self.evaluate(policy)

        with measure_cost(self.preset.device) as cost:
            history = dpo.train_dpo(policy, self.tokenizer, self.pairs.select(range(num_pairs)), config,
                                    ref_logps=ref_logps, eval_fn=evaluate, progress=False,
                                    max_prompt_tokens=self.preset.max_prompt_tokens,
                                    max_response_tokens=self.preset.max_response_tokens)
        setting = f"beta={beta:g}"
        points = [Point("DPO", setting, seed, step, seconds=history["seconds"][step - 1] if step else 0.0,
                        **{k: history[f"eval/{k}"][i] for k in ("oracle_reward", "oracle_reward_se", "kl", "kl_se")})
                  for i, step in enumerate(history["eval_step"])]
        sequences = history["sequences"][-1]
        return Run("DPO", setting, seed, points, {
            "seconds": history["seconds"][-1], "peak_memory_mb": cost.peak_memory_mb,
            "models_held": 1,  # the reference ran once, before training, over the pairs
            "tokens_generated": 0,
            "forward_sequences": sequences + 2 * num_pairs,  # the policy's passes + the reference's one pass over the pairs
            "backward_sequences": sequences})

    def ppo(self, kl_coef: float, seed: int = 0, ground_truth: bool = False) -> Run:
        """PPO from SFT against the reward model (or, with ground_truth, the oracle: "PPO-GT")."""
        config = ppo.PPOConfig(kl_coef=kl_coef, seed=seed, num_steps=self.sweep.ppo_steps,
                               eval_every=self.sweep.ppo_eval_every, max_new_tokens=self.preset.max_new_tokens,
                               max_prompt_tokens=self.preset.max_prompt_tokens)
        reward = ppo.oracle_fn if ground_truth else self.reward_model
        policy = self.fresh_policy()
        with measure_cost(self.preset.device) as cost:
            history = ppo.train_ppo(policy, self.ref_model, reward, self.tokenizer, self.train_prompts, config,
                                    eval_fn=self.evaluate, progress=False)
        method, setting = ("PPO-GT" if ground_truth else "PPO"), f"kl_coef={kl_coef:g}"
        start = Point(method, setting, seed, 0, **self.sft_evaluation())
        points = [start] + [
            Point(method, setting, seed, step, seconds=history["wall_seconds"][step - 1],
                  **{k: history[f"eval_{k}"][i] for k in ("oracle_reward", "oracle_reward_se", "kl", "kl_se")})
            for i, step in enumerate(history["eval_step"])]
        return Run(method, setting, seed, points, {
            "seconds": history["wall_seconds"][-1], "peak_memory_mb": cost.peak_memory_mb,
            "models_held": history["num_models"][-1], "tokens_generated": history["tokens_generated"][-1],
            "forward_sequences": history["forward_sequences"][-1],
            "backward_sequences": history["backward_sequences"][-1]})

    def preferred_ft(self, seed: int = 0) -> Run:
        """"Preferred-FT": supervised fine-tuning of the SFT policy on the chosen responses only."""
        config = SFTConfig(num_steps=self.sweep.preferred_ft_steps, seed=seed, warmup_steps=5,
                           max_prompt_tokens=self.preset.max_prompt_tokens,
                           max_response_tokens=self.preset.max_response_tokens,
                           eval_every=self.sweep.preferred_ft_steps)
        records = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in self.pairs]
        policy = self.fresh_policy()
        with measure_cost(self.preset.device) as cost:
            train_sft(policy, self.tokenizer, records, config, response_key="chosen")
        point = Point("Preferred-FT", "chosen only", seed, config.num_steps, seconds=cost.seconds,
                      **self.evaluate(policy))
        sequences = config.num_steps * config.batch_size
        return Run("Preferred-FT", "chosen only", seed, [point], {
            "seconds": cost.seconds, "peak_memory_mb": cost.peak_memory_mb, "models_held": 1,
            "tokens_generated": 0, "forward_sequences": sequences, "backward_sequences": sequences})

    @torch.no_grad()
    def best_of_n(self, ns: tuple[int, ...], seed: int = 0) -> list[Run]:
        """Best-of-N from SFT: N samples per prompt, the one the reward model scores highest is kept.

        The largest N is sampled once; smaller N use its first N samples. The KL is the analytic
        value log N - (N - 1) / N (best_of_n_kl): the best-of-N policy has no density to evaluate.
        """
        n_max = max(ns)
        score = ppo.reward_model_fn(self.reward_model, self.tokenizer.pad_token_id)  # loaded before measuring
        start = time.perf_counter()
        with measure_cost(self.preset.device) as cost, seeded_sampling(seed, torch.device(self.preset.device)):
            generation = generate(self.sft_policy, self.tokenizer, self.eval_prompts * n_max,
                                  max_new_tokens=self.preset.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                  max_prompt_tokens=self.preset.max_prompt_tokens)
            scores = score(generation)
        seconds = time.perf_counter() - start
        num = len(self.eval_prompts)
        scores = scores.view(n_max, num)  # sample j of prompt i sits at j * num + i
        rewards = oracle_reward(generation.full_texts).view(n_max, num)
        tokens = generation.response_mask.sum(1).view(n_max, num)
        runs = []
        for n in ns:
            picked = best_of_n_rewards(scores, rewards, n)
            kl = best_of_n_kl(n)
            point = Point("Best-of-N", f"N={n}", seed, 0, picked.mean().item(), picked.std().item() / math.sqrt(num),
                          kl, 0.0, seconds=seconds * n / n_max)
            runs.append(Run("Best-of-N", f"N={n}", seed, [point], {
                "seconds": seconds * n / n_max, "peak_memory_mb": cost.peak_memory_mb, "models_held": 2,
                "tokens_generated": int(tokens[:n].sum()),  # at inference, per evaluation set
                "forward_sequences": 2 * n * num, "backward_sequences": 0}))
        return runs


def points_table(runs: list[Run]) -> list[dict]:
    """Every checkpoint of every run as a flat record (e.g. for pandas or a printed table)."""
    return [asdict(point) for run in runs for point in run.points]


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


def reward_at_kl(points: list[Point], kl: float) -> float | None:
    """The oracle reward a method's frontier reaches at a given KL: linear interpolation between its
    checkpoints sorted by KL (None outside the range of KL the method covered)."""
    ordered = sorted(points, key=lambda p: p.kl)
    if len(ordered) == 1 and ordered[0].kl == kl:
        return ordered[0].oracle_reward
    for a, b in zip(ordered, ordered[1:]):
        if a.kl <= kl <= b.kl:
            t = 0.0 if b.kl == a.kl else (kl - a.kl) / (b.kl - a.kl)
            return a.oracle_reward + t * (b.oracle_reward - a.oracle_reward)
    return None


def on_frontier(kls: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """(M,) 1.0 for the points no other point beats: none has a KL as low or lower and a reward as
    high or higher, better in one of the two; else 0.0."""
    no_more_kl = kls.unsqueeze(0) <= kls.unsqueeze(1)  # [i, j]: kl_j <= kl_i
    no_less_reward = rewards.unsqueeze(0) >= rewards.unsqueeze(1)
    strictly = (kls.unsqueeze(0) < kls.unsqueeze(1)) | (rewards.unsqueeze(0) > rewards.unsqueeze(1))
    dominated = (no_more_kl & no_less_reward & strictly).any(dim=1)
    return (~dominated).to(rewards.dtype)


def upper_frontier(points: list[Point]) -> list[Point]:
    """The points of `points` on the frontier (see on_frontier), sorted by KL."""
    kls = torch.tensor([p.kl for p in points], dtype=torch.float64)
    rewards = torch.tensor([p.oracle_reward for p in points], dtype=torch.float64)
    keep = on_frontier(kls, rewards).bool().tolist()
    return sorted((p for p, k in zip(points, keep) if k), key=lambda p: p.kl)


def cost_to_reach(runs: list[Run], target: float) -> dict | None:
    """Training seconds (and checkpoint) at which the first of `runs` reaches an oracle reward >= target,
    over all runs of a method: the cheapest such checkpoint, or None if no checkpoint reaches it."""
    best = None
    for run in runs:
        for point in run.points:
            if point.oracle_reward >= target and (best is None or point.seconds < best["seconds"]):
                best = {"setting": run.setting, "seed": run.seed, "step": point.step, "seconds": point.seconds,
                        "oracle_reward": point.oracle_reward, "kl": point.kl}
                break
    return best


# ---- The sweep's results, kept for notebook 10 ----------------------------------------------------


def _runs_key(preset: Preset, sweep: SweepConfig) -> dict:
    """What the runs were made from: the recipe of the SFT policy, pairs and reward model, and the sweep."""
    key = pipeline._key(preset, "sft", "pairs", "reward")
    key["reward_weights_sha256"] = pipeline._sha256(pipeline.artefact_dir(preset, "reward_model") / "model.safetensors")
    key["sweep"] = asdict(sweep)
    return json.loads(json.dumps(key))


def save_runs(runs: list[Run], preset: Preset | None = None, sweep: SweepConfig | None = None):
    """Store the runs of notebook 09 in the cache, keyed by their recipe and sweep."""
    preset = preset or get_preset()
    sweep = sweep or sweep_config(preset)
    return pipeline._save(preset, "frontier_runs", _runs_key(preset, sweep), lambda folder: None,
                          {"runs": [asdict(run) for run in runs]})


def load_runs(preset: Preset | None = None, sweep: SweepConfig | None = None) -> list[Run] | None:
    """The runs stored by save_runs for this preset's recipe and sweep, or None when there are none
    (notebook 09 not run, or run with another recipe or sweep)."""
    preset = preset or get_preset()
    sweep = sweep or sweep_config(preset)
    stored = pipeline._cached(preset, "frontier_runs", _runs_key(preset, sweep))
    if stored is None:
        return None
    return [Run(r["method"], r["setting"], r["seed"], [Point(**p) for p in r["points"]], r["cost"])
            for r in stored["runs"]]
