"""Every setting of the course in one place: the configuration of each stage, and one table per preset.

The top half defines what each stage can be told (a frozen dataclass per stage, its fields
commented); the bottom half, SETTINGS, says what the two presets tell them, with the reason for
each choice. Every stage reads its settings from here (`get_preset().settings`, see presets.py):

    settings = get_preset().settings
    settings.sft, settings.pairs, settings.reward, settings.ppo, settings.dpo, settings.sweep,
    settings.variants, settings.scale_out

The dataclass defaults are the "tiny" preset's values, so that a config made by hand (in a test, a
notebook exercise) starts from the course's CPU settings. Lengths are defined once, below, and every
default that bounds a length refers to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dpo_teach.training import TrainConfig

__all__ = ["PROMPT_TOKENS", "RESPONSE_TOKENS", "NEW_TOKENS", "SFT_RESPONSE_TOKENS", "GPT2_PROMPT_TOKENS",
           "GPT2_RESPONSE_TOKENS", "GPT2_NEW_TOKENS", "GPT2_SFT_RESPONSE_TOKENS", "SFTConfig", "PairsConfig", "RewardConfig",
           "PPOConfig", "DPOConfig", "SweepConfig", "VariantsConfig", "ScaleOutConfig", "Settings", "SETTINGS", "scaled"]

# ---- Lengths, in tokens (the "tiny" preset's; "gpt2" sets its own in SETTINGS) ---------------------

PROMPT_TOKENS = 16  # prompts are cut from the left to this many tokens (EOS start token included);
#                     the world's prompts are 2-6 words, so none is cut
RESPONSE_TOKENS = 48  # responses of preference pairs are cut from the right to this many (EOS included)
NEW_TOKENS = 40  # tokens sampled per response (most samples of the tiny SFT policy end before)
SFT_RESPONSE_TOKENS = 96  # SFT completions (whole reviews) are cut from the right to this many

# The "gpt2" preset's (GPT-2 reads 1,024 positions; IMDb reviews are long, so cuts matter there).
GPT2_PROMPT_TOKENS = 16  # IMDb prompts: the first words of a review
GPT2_RESPONSE_TOKENS = 64  # pairs' responses: 48 sampled tokens fit, with room for EOS
GPT2_NEW_TOKENS = 48  # tokens sampled per response
GPT2_SFT_RESPONSE_TOKENS = 128  # SFT reviews are cut to their first 128 tokens


# ---- What each stage can be told ----------------------------------------------------------------


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning (dpo_teach.sft): whole reviews as completions of the empty prompt."""

    num_steps: int = 200
    batch_size: int = 32  # records per step
    lr: float = 5e-4
    warmup_steps: int = 20  # then TrainConfig's cosine decay to 10% of lr, AdamW betas (0.9, 0.95)
    eval_every: int = 50  # held-out perplexity every this many steps (when eval records are given)
    max_prompt_tokens: int = PROMPT_TOKENS
    max_response_tokens: int = SFT_RESPONSE_TOKENS  # completions are cut from the right to this many tokens


@dataclass(frozen=True)
class PairsConfig:
    """Preference pairs (dpo_teach.pairs): which prompts, how many samples, which judge."""

    num_train_prompts: int = 400  # training prompts (the first ones of the "train" prompt set)
    num_test_prompts: int = 100  # held-out prompts: the LAST ones of the "test" prompt set, so that
    #                              they differ from the evaluation prompts (the first ones)
    completions_per_prompt: int = 4  # samples per prompt; every two of them form a pair
    labels: str = "oracle"  # "oracle" (deterministic) or "bradley_terry" (sampled labels)
    bt_scale: float = 10.0  # with "bradley_terry": p(a beats b) = sigma(bt_scale * score difference)
    max_new_tokens: int = NEW_TOKENS  # tokens sampled per response
    max_prompt_tokens: int = PROMPT_TOKENS
    seed: int = 0  # seeds sampling (train prompts) and labels; the test split uses seed + 1


@dataclass(frozen=True)
class RewardConfig(TrainConfig):
    """The Bradley-Terry reward model (dpo_teach.reward)."""

    num_steps: int = 150
    batch_size: int = 32  # preference pairs per step
    lr: float = 5e-4
    warmup_steps: int = 20  # then TrainConfig's cosine decay to 10% of lr, AdamW betas (0.9, 0.95)
    eval_every: int = 50  # held-out accuracy every this many steps (when eval pairs are given)
    max_prompt_tokens: int = PROMPT_TOKENS
    max_response_tokens: int = RESPONSE_TOKENS


@dataclass(frozen=True)
class PPOConfig(TrainConfig):
    """RLHF with PPO (dpo_teach.ppo). num_steps counts rollout batches, batch_size prompts per batch."""

    num_steps: int = 40  # rollout batches: sample, score, then update on them
    batch_size: int = 32  # prompts per rollout batch (one response each)
    lr: float = 5e-5  # learning rate of policy and value head, constant
    warmup_steps: int = 0
    schedule: str = "constant"
    adam_betas: tuple[float, float] = (0.9, 0.999)  # torch's Adam defaults, as in Ziegler et al.'s code
    eval_every: int = 10  # call eval_fn after every this many rollout batches and after the last (0: never)
    num_epochs: int = 2  # PPO passes over each rollout batch
    num_minibatches: int = 2  # gradient steps per pass (each on batch_size / num_minibatches responses)
    kl_coef: float = 0.1  # weight of the per-token KL penalty (the paper's beta)
    target_kl: float | None = None  # if set, adapt kl_coef towards this sequence KL (Ziegler et al. 2019)
    kl_horizon: int = 10_000  # responses over which the adaptive controller closes the gap
    gamma: float = 1.0  # discount over tokens (1: the score at the end counts fully at every token)
    lam: float = 0.95  # GAE lambda: 0 = one-step TD (low variance, biased), 1 = Monte Carlo
    clip_range: float = 0.2  # PPO clips the probability ratio to [1 - clip_range, 1 + clip_range]
    value_clip: float | None = 0.2  # clip new values to old +- value_clip in the value loss (None: off)
    vf_coef: float = 0.1  # weight of the value loss (it shares the policy's trunk)
    entropy_coef: float = 0.0  # weight of an entropy bonus (0: the KL penalty already keeps entropy)
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over a batch's valid tokens
    max_new_tokens: int = NEW_TOKENS  # tokens sampled per response
    max_prompt_tokens: int = PROMPT_TOKENS
    temperature: float = 1.0  # sampling temperature (log-probs are those of the sampling distribution)


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """One DPO run (dpo_teach.dpo), and through VariantConfig every variant of notebook 10."""

    beta: float = 0.1  # strength of the pull towards the reference model (the paper's beta)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO), "hinge" (RSO's hinge) or "ipo"
    label_smoothing: float = 0.0  # eps of conservative DPO (sigmoid loss only)
    average_logps: bool = False  # mean instead of sum of token log-probs (IPO-style); sum is the paper's
    num_steps: int = 60  # optimizer steps
    batch_size: int = 32  # preference pairs per step (2 x batch_size sequences in one forward pass)
    lr: float = 1e-4
    warmup_steps: int = 10
    schedule: str = "constant"  # linear warm-up, then constant, as in the DPO paper
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW as TRL's trainer sets it up (no weight decay)
    eval_every: int = 30  # steps between evaluations on the held-out pairs (0: never)


@dataclass(frozen=True)
class SweepConfig:
    """The frontier experiment of notebook 09 (dpo_teach.frontier, dpo_teach.sweep)."""

    dpo_betas: tuple[float, ...]  # DPO's beta (the paper swept 0.05, 0.1, 1, 5)
    ppo_kl_coefs: tuple[float, ...]  # PPO's fixed KL coefficients
    ppo_target_kls: tuple[float, ...]  # PPO with an adaptive KL coefficient, per target KL (the paper: 3-12)
    ppo_gt_kl_coefs: tuple[float, ...]  # PPO on the oracle itself ("PPO-GT"), fixed KL coefficients
    seeds: tuple[int, ...]  # every training run is repeated with each seed
    best_of_n: tuple[int, ...]  # N of the best-of-N baseline
    dpo_steps: int  # DPO optimizer steps per run (batches of DPOConfig.batch_size pairs)
    dpo_eval_every: int  # steps between DPO checkpoints
    ppo_steps: int  # PPO rollout batches per run
    ppo_eval_every: int  # steps between PPO checkpoints
    preferred_ft_steps: int  # SFT steps on the chosen responses ("Preferred-FT")
    eval_prompts: int  # held-out prompts per evaluation
    samples_per_prompt: int  # responses per prompt per evaluation (same sampling seed for every policy)
    ideal_samples: int = 0  # SFT samples per prompt for the ideal frontier (0: not estimated)
    ppo_kl_horizon: int = 10_000  # responses over which the adaptive KL controller closes the gap (Ziegler et al.)


@dataclass(frozen=True)
class VariantsConfig:
    """Notebook 10: DPO's variants side by side, and offline against online DPO (dpo_teach.variants,
    dpo_teach.online). Each variant's own hyper-parameters are in variants.VARIANT_SETTINGS."""

    num_steps: int = 30  # optimizer steps of every variant, on the same pairs in the same order (each once)
    batch_size: int = 16  # pairs per step, for the variants and for online and offline DPO
    online_rounds: int = 4  # online DPO: rounds of sampling from the current policy, labelling, training
    prompts_per_round: int = 64  # prompts labelled per round (one label each): steps per round =
    #                              prompts_per_round / batch_size; offline DPO gets as many labels


@dataclass(frozen=True)
class ScaleOutConfig:
    """Notebook 12: the same DPO run on one process and on several (dpo_teach.distributed)."""

    num_steps: int = 12  # optimizer steps of each run (each pair read once)
    batch_size: int = 32  # pairs per optimizer step over all processes: divisible by processes x accumulation
    lr: float = 1e-4  # large enough that the runs move the loss far more than the agreement tolerance
    warmup_steps: int = 10
    eval_pairs: int = 64  # held-out pairs, evaluated every eval_every steps
    eval_every: int = 4


@dataclass(frozen=True)
class Settings:
    """All settings of one preset."""

    max_prompt_tokens: int  # prompts are cut from the left to this many tokens
    max_response_tokens: int  # responses of pairs are cut from the right to this many tokens
    max_new_tokens: int  # tokens sampled per response during generation and evaluation
    eval_prompts: int  # held-out prompts used to evaluate a policy
    sft: SFTConfig
    pairs: PairsConfig
    reward: RewardConfig
    ppo: PPOConfig
    dpo: DPOConfig
    sweep: SweepConfig  # the powered frontier sweep (python -m dpo_teach.sweep)
    variants: VariantsConfig = VariantsConfig()  # notebook 10's comparisons
    scale_out: ScaleOutConfig = ScaleOutConfig()  # notebook 12's runs on one and on two processes
    live_sweep: SweepConfig | None = field(repr=False, default=None)  # the reduced sweep notebook 09 runs live
    paper_sweep: SweepConfig | None = field(repr=False, default=None)  # the paper's full grid, where it is an opt-in

    @property
    def max_length(self) -> int:
        """Longest prompt + response sequence the batch builder produces."""
        return self.max_prompt_tokens + self.max_response_tokens


# ---- The table ------------------------------------------------------------------------------------

SETTINGS = {
    # CPU, 2 cores, offline: the review world and the tiny GPT-2 of data/base_model. Each notebook
    # runs in minutes; the whole course in about 15.
    "tiny": Settings(
        max_prompt_tokens=PROMPT_TOKENS, max_response_tokens=RESPONSE_TOKENS, max_new_tokens=NEW_TOKENS,
        eval_prompts=128,  # enough for a standard error of about 0.02 on a mean oracle reward
        # about 40 s: 200 x 32 = 6,400 whole reviews, each read once (of the 12,000 training reviews)
        sft=SFTConfig(num_steps=200, batch_size=32, lr=5e-4, warmup_steps=20, eval_every=50,
                      max_response_tokens=SFT_RESPONSE_TOKENS),
        # 400 training prompts x 4 samples = 2,400 possible pairs (the paper: 4 samples per prompt)
        pairs=PairsConfig(num_train_prompts=400, num_test_prompts=100, completions_per_prompt=4),
        # about 40 s: 150 x 32 pairs, two passes over the pairs (more overfits the small data)
        reward=RewardConfig(num_steps=150, batch_size=32, lr=5e-4, warmup_steps=20, eval_every=50),
        # about a minute: 40 rollout batches of 32 prompts, the paper's beta 0.1 as KL coefficient
        ppo=PPOConfig(num_steps=40, batch_size=32, lr=5e-5, kl_coef=0.1, eval_every=10),
        # under a minute: 60 x 32 = 1,920 pairs, each at most once; beta 0.1 (the paper's, TRL's default)
        dpo=DPOConfig(beta=0.1, num_steps=60, batch_size=32, lr=1e-4, warmup_steps=10, eval_every=30),
        # notebook 10, a few minutes: 7 variants x 30 steps of 16 pairs (480 pairs, each once); online
        # DPO in 4 rounds of 64 prompts (256 labels, 16 steps) against offline DPO on as many labels
        variants=VariantsConfig(num_steps=30, batch_size=16, online_rounds=4, prompts_per_round=64),
        # notebook 12, three runs of about 15 s each on 2 cores: 12 steps of DPO's 32 pairs, at DPO's
        # learning rate and warm-up (the loss moves by a few hundredths)
        scale_out=ScaleOutConfig(num_steps=12, batch_size=32, eval_pairs=64, eval_every=4),
        # About 40 minutes (`python -m dpo_teach.sweep --preset tiny`): 3 betas, 3 fixed KL coefficients
        # (notebook 07's 0.1 among them) and two KL targets, PPO-GT, 3 seeds; DPO for one pass over all
        # 2,362 pairs (74 x 32: every label the reward model was fitted to), PPO for notebook 07's 40
        # rollout batches; every checkpoint on 256 held-out prompts x 2 samples (the same for every
        # policy); the ideal frontier from 64 SFT samples per prompt. The adaptive controller's horizon
        # is sized to the run: 40 x 32 = 1,280 responses, so a horizon of 256 lets the coefficient move
        # by up to 2.5% a step (Ziegler et al.'s 10,000 would hardly move it).
        sweep=SweepConfig(dpo_betas=(0.05, 0.1, 0.5), ppo_kl_coefs=(0.05, 0.1, 0.2), ppo_target_kls=(3.0, 6.0),
                          ppo_gt_kl_coefs=(0.1,), seeds=(0, 1, 2), best_of_n=(2, 4, 8, 16), dpo_steps=74,
                          dpo_eval_every=15, ppo_steps=40, ppo_eval_every=10, preferred_ft_steps=74,
                          eval_prompts=256, samples_per_prompt=2, ideal_samples=64, ppo_kl_horizon=256),
        # What notebook 09 runs live (about a minute and a half): one setting of each trained method,
        # one seed, fewer prompts. Its conclusions come from the powered sweep.
        live_sweep=SweepConfig(dpo_betas=(0.1,), ppo_kl_coefs=(0.1,), ppo_target_kls=(), ppo_gt_kl_coefs=(),
                               seeds=(0,), best_of_n=(2, 4, 8), dpo_steps=40, dpo_eval_every=20, ppo_steps=16,
                               ppo_eval_every=8, preferred_ft_steps=20, eval_prompts=128, samples_per_prompt=1),
    ),
    # GPU, GPT-2 (124M) on IMDb reviews. Targets, set by estimate and not yet verified by a GPU run
    # (README, "On a GPU"): on a Colab T4 (16 GB) each notebook within 20 minutes, the whole course
    # within 2 hours, peak GPU memory under 14 GB. `python -m dpo_teach.rehearse` on a GPU measures them.
    "gpt2": Settings(
        max_prompt_tokens=GPT2_PROMPT_TOKENS, max_response_tokens=GPT2_RESPONSE_TOKENS,
        max_new_tokens=GPT2_NEW_TOKENS,
        eval_prompts=256,  # twice the tiny preset's held-out prompts
        # the smaller learning rate of a pretrained 124M model; 600 x 32 = 19,200 reviews, about
        # three quarters of one pass over IMDb's 25,000 training reviews
        sft=SFTConfig(num_steps=600, batch_size=32, lr=5e-5, warmup_steps=50, eval_every=200,
                      max_prompt_tokens=GPT2_PROMPT_TOKENS, max_response_tokens=GPT2_SFT_RESPONSE_TOKENS),
        # 1,000 prompts x 4 samples = up to 6,000 pairs (6 per prompt, less the ties)
        pairs=PairsConfig(num_train_prompts=1000, num_test_prompts=200, completions_per_prompt=4,
                          max_new_tokens=GPT2_NEW_TOKENS, max_prompt_tokens=GPT2_PROMPT_TOKENS),
        # a learning rate of 1e-5 for a 124M trunk; 400 x 32 = 12,800 pairs read, about two passes
        reward=RewardConfig(num_steps=400, batch_size=32, lr=1e-5, warmup_steps=40, eval_every=100,
                            max_prompt_tokens=GPT2_PROMPT_TOKENS, max_response_tokens=GPT2_RESPONSE_TOKENS),
        # TRL's PPO learning rate order for GPT-2 (1e-5), 64 prompts per rollout, 60 rollout batches
        ppo=PPOConfig(num_steps=60, batch_size=64, lr=1e-5, kl_coef=0.1, eval_every=20,
                      max_new_tokens=GPT2_NEW_TOKENS, max_prompt_tokens=GPT2_PROMPT_TOKENS),
        # the paper's batch of 64 pairs and learning rate of 1e-6; 300 x 64 = 19,200 pairs read,
        # about three passes
        dpo=DPOConfig(beta=0.1, num_steps=300, batch_size=64, lr=1e-6, warmup_steps=30, eval_every=100),
        # notebook 10: each variant reads 100 x 32 = 3,200 pairs once; online DPO 4 rounds of 256 prompts
        variants=VariantsConfig(num_steps=100, batch_size=32, online_rounds=4, prompts_per_round=256),
        # notebook 12 compares its runs on CPU processes (a Colab has one GPU; two processes need two
        # devices), where GPT-2 takes seconds a step: a few short steps of small batches, with ten times
        # DPO's learning rate and no warm-up, so that four steps move the loss
        scale_out=ScaleOutConfig(num_steps=4, batch_size=8, eval_pairs=16, eval_every=2, lr=1e-5, warmup_steps=1),
        # what notebook 09 runs on a GPU by default (within the T4 budget): two betas, two KL
        # coefficients, PPO-GT, two seeds, short runs (PPO: 20 rollout batches, a third of notebook
        # 07's), an ideal frontier from 16 samples per prompt
        sweep=SweepConfig(dpo_betas=(0.1, 1.0), ppo_kl_coefs=(0.05, 0.1), ppo_target_kls=(), ppo_gt_kl_coefs=(0.1,),
                          seeds=(0, 1), best_of_n=(2, 4, 16), dpo_steps=150, dpo_eval_every=50, ppo_steps=20,
                          ppo_eval_every=5, preferred_ft_steps=100, eval_prompts=128, samples_per_prompt=1,
                          ideal_samples=16, ppo_kl_horizon=1280),
        # a grid modelled on the paper's (its four betas, four KL coefficients, two KL targets, PPO-GT,
        # three seeds): many hours on a T4, an opt-in of notebook 09 (DPO_TEACH_FULL_SWEEP=1, or
        # `python -m dpo_teach.sweep --preset gpt2 --full`)
        paper_sweep=SweepConfig(dpo_betas=(0.05, 0.1, 1.0, 5.0), ppo_kl_coefs=(0.02, 0.05, 0.1, 0.2),
                                ppo_target_kls=(6.0, 12.0), ppo_gt_kl_coefs=(0.05, 0.1), seeds=(0, 1, 2),
                                best_of_n=(2, 4, 16, 64), dpo_steps=600, dpo_eval_every=100, ppo_steps=200,
                                ppo_eval_every=25, preferred_ft_steps=300, eval_prompts=512, samples_per_prompt=1,
                                ideal_samples=64, ppo_kl_horizon=1280),
        # one setting per method, one seed, before the sweep
        live_sweep=SweepConfig(dpo_betas=(0.1,), ppo_kl_coefs=(0.1,), ppo_target_kls=(), ppo_gt_kl_coefs=(),
                               seeds=(0,), best_of_n=(2, 4, 16), dpo_steps=100, dpo_eval_every=50, ppo_steps=20,
                               ppo_eval_every=10, preferred_ft_steps=50, eval_prompts=128, samples_per_prompt=1),
    ),
}


# ---- Scaled-down settings, for rehearsals ---------------------------------------------------------------


def _count(value: int, factor: float, least: int) -> int:
    return max(least, round(value * factor))


def _scaled_run(config, factor: float):
    """A training config with its steps, warm-up, evaluation interval and batch scaled by factor."""
    steps = _count(config.num_steps, factor, 2)
    every = _count(config.eval_every * steps / config.num_steps, 1, 1) if config.eval_every else 0
    batch = 2 * _count(config.batch_size / 2, factor, 2)  # even: PPO splits it into 2 minibatches
    return replace(config, num_steps=steps, warmup_steps=min(steps, _count(config.warmup_steps, factor, 1)),
                   eval_every=every, batch_size=batch)


def _scaled_sweep(sweep: SweepConfig | None, factor: float) -> SweepConfig | None:
    if sweep is None:
        return None
    counts = {name: _count(getattr(sweep, name), factor, 2)
              for name in ("dpo_steps", "ppo_steps", "preferred_ft_steps", "eval_prompts", "ppo_kl_horizon")}
    counts["dpo_eval_every"] = _count(sweep.dpo_eval_every * counts["dpo_steps"] / sweep.dpo_steps, 1, 1)
    counts["ppo_eval_every"] = _count(sweep.ppo_eval_every * counts["ppo_steps"] / sweep.ppo_steps, 1, 1)
    counts["ideal_samples"] = _count(sweep.ideal_samples, factor, 2) if sweep.ideal_samples else 0
    return replace(sweep, **counts)


def scaled(settings: Settings, factor: float) -> Settings:
    """`settings` with every count (training steps, warm-up, evaluation intervals, batch sizes,
    prompts, evaluation prompts, the sweeps' steps) multiplied by `factor` and rounded, each kept at a
    small working minimum; lengths, learning rates and the sweeps' grids unchanged. For rehearsals:
    DPO_TEACH_SCALE=0.02 runs every code path of a preset in a fraction of its time (presets.py)."""
    if not 0 < factor <= 1:
        raise ValueError(f"scale factor must be in (0, 1], got {factor}")
    if factor == 1:
        return settings
    pairs, variants = settings.pairs, settings.variants
    # notebook 10 probes 64 of the variants' pairs (so steps x batch >= 64) and runs online DPO on
    # distinct training prompts that have pairs (rounds x prompts per round), hence 128 prompts at least;
    # its batch shrinks with the rest, to 8 pairs at least
    batch = max(8, 2 * _count(variants.batch_size / 2, factor, 1))
    per_round = batch * _count(variants.prompts_per_round / variants.batch_size, factor, 1)
    return replace(
        settings, eval_prompts=_count(settings.eval_prompts, factor, 8),
        variants=replace(variants, num_steps=_count(variants.num_steps, factor, max(4, -(-64 // batch))),
                         batch_size=batch, prompts_per_round=per_round),
        scale_out=replace(settings.scale_out, num_steps=_count(settings.scale_out.num_steps, factor, 2),
                          eval_every=_count(settings.scale_out.eval_every, factor, 1),
                          warmup_steps=min(_count(settings.scale_out.warmup_steps, factor, 1),
                                           _count(settings.scale_out.num_steps, factor, 2))),
        sft=_scaled_run(settings.sft, factor), reward=_scaled_run(settings.reward, factor),
        ppo=_scaled_run(settings.ppo, factor), dpo=_scaled_run(settings.dpo, factor),
        pairs=replace(pairs, num_train_prompts=_count(pairs.num_train_prompts, factor, 128),
                      num_test_prompts=_count(pairs.num_test_prompts, factor, 8)),
        sweep=_scaled_sweep(settings.sweep, factor), live_sweep=_scaled_sweep(settings.live_sweep, factor),
        paper_sweep=_scaled_sweep(settings.paper_sweep, factor))
