"""The toy world: digit sorting with a gold reward that is a program.

A prompt is 3 to 6 digits and the task token, e.g. "3142>"; the right answer is the digits
sorted, "1234", followed by EOS. The gold reward is the fraction of positions right; a filler
symbol "~" costs a little, and an answer that never emits EOS scores 0. Every character is
one token, so positions in text are positions in tokens.

Building the world stands in for what a real run downloads: a reference (SFT) model that is
mediocre and varied, and an offline preference set labelled by the gold reward with two
controlled defects, label noise and a spurious feature (the filler forced onto the chosen
answer). Each pair records which defect it carries, so a run can report what selection did
to each kind, as "SeRA: Self-Reviewing and Alignment of LLMs using Implicit Reward Margins"
claims it should.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from sera_ray.data import schema
from sera_ray.tiny import build_tiny_llama, build_tokenizer, save_pretrained
from sera_ray.toy.sft import sample_answers, torch_threads, train_sft

logger = logging.getLogger(__name__)

DIGITS = "0123456789"
TASK = ">"
FILLER = "~"

# 256 byte-level symbols plus PAD, BOS and EOS: a vocabulary this small leaves BPE no room to
# merge, so every character stays one token.
TOKENIZER_VOCAB_SIZE = 259

DEFAULT_FILLER_PENALTY = 0.1

PROMPT_ID = "prompt_id"
IS_NOISY = "is_noisy"
IS_SPURIOUS = "is_spurious"
CHOSEN_GOLD = "chosen_gold"
REJECTED_GOLD = "rejected_gold"

REFERENCE_DIR = "reference"
OFFLINE_FILE = "offline.jsonl"
BOOTSTRAP_PROMPTS_FILE = "bootstrap_prompts.jsonl"
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"
WORLD_FILE = "world.json"


class ToyWorldConfig(BaseModel):
    """Everything that decides the toy world; the same config and seed build the same world."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # One seed drives prompts, SFT data, pairs, model init and sampling, so a world is rebuilt.
    seed: int = 0
    # Enough prompts for about a thousand pairs, what DPO on these CPUs digests in a minute.
    num_train_prompts: int = 1024
    # Enough held-out prompts that a gold-reward mean moves by well under 0.05 between seeds.
    num_eval_prompts: int = 128
    # Three digits is the shortest prompt where sorting and copying usually differ.
    min_digits: int = 3
    # Six digits keeps every sequence under 16 tokens, so SFT and sampling stay fast.
    max_digits: int = 6
    # The epsilon of the paper's noisy-label setting: a fifth of the pairs flipped.
    label_noise: float = 0.2
    # Filler forced onto chosen in 30% of pairs, far above what the gold reward justifies.
    spurious_rate: float = 0.3
    # Small against a one-digit error (1/6 or more), so the filler alone never decides a pair.
    filler_penalty: float = DEFAULT_FILLER_PENALTY
    # Half the SFT answers right: the reference is competent but leaves room to improve.
    sft_correct: float = 0.5
    # A systematic wrong mode (copy the prompt) that a preference signal can train away.
    sft_copy: float = 0.25
    # Sorted answers with one small random edit: near misses that make pairs informative.
    sft_edit: float = 0.25
    # Some SFT answers carry the filler, so the reference already emits it now and then.
    sft_filler_rate: float = 0.2
    # Enough steps to learn most of the mixture on fresh prompts, in well under a minute.
    # Limitation: at 400 steps the copy mode is learnt only partly; wrong answers come out as
    # muddled near misses more often than as clean copies of the prompt.
    sft_steps: int = 400
    # 64 sequences of at most 16 tokens: a step is a few milliseconds on two cores.
    sft_batch_size: int = 64
    # A high rate suits a model this small and a run this short.
    sft_learning_rate: float = 3e-3
    # A short warmup keeps the first AdamW steps from blowing up the random init.
    sft_warmup_steps: int = 30
    # 128 hidden with head_dim 64: two heads, the smallest shape vLLM's CPU build accepts.
    hidden_size: int = 128
    # Two layers suffice for sorting a handful of digits approximately.
    num_layers: int = 2
    # Twice the hidden size, as small as the MLP gets without starving it.
    intermediate_size: int = 256
    # One pair per prompt, so pairs and prompts are counted the same way.
    pairs_per_prompt: int = 1
    # A pair's two answers are redrawn this often before the prompt is skipped.
    max_redraws: int = 16
    # Four samples per eval prompt measure how varied the reference is.
    eval_samples_per_prompt: int = 4
    # The matrices are too small for a second thread to pay, and on a busy machine two
    # spinning threads ran SFT ten times slower than one.
    torch_threads: int = 1

    @model_validator(mode="after")
    def _check(self) -> ToyWorldConfig:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError("need 1 <= min_digits <= max_digits")
        if abs(self.sft_correct + self.sft_copy + self.sft_edit - 1.0) > 1e-6:
            raise ValueError("sft_correct + sft_copy + sft_edit must sum to 1")
        for name in ("label_noise", "spurious_rate", "sft_filler_rate", "filler_penalty"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.hidden_size % 64:
            raise ValueError("hidden_size must be a multiple of head_dim 64")
        return self

    @classmethod
    def small(cls, **overrides) -> ToyWorldConfig:
        """A world for tests: fewer prompts and SFT steps, built in a few seconds."""
        values = {
            "num_train_prompts": 256,
            "num_eval_prompts": 48,
            "sft_steps": 150,
            "sft_warmup_steps": 10,
        }
        return cls(**{**values, **overrides})

    @property
    def max_new_tokens(self) -> int:
        """Room for the longest right answer, a filler or two, one extra digit and EOS."""
        return self.max_digits + 4


# The task.


def target(prompt: str) -> str:
    """The right answer to a prompt: its digits, sorted."""
    return "".join(sorted(prompt.removesuffix(TASK)))


def has_filler(answer: str) -> bool:
    """Whether an answer carries the filler symbol."""
    return FILLER in answer


def gold_reward(
    prompt: str, answer: str, finished: bool, filler_penalty: float = DEFAULT_FILLER_PENALTY
) -> float:
    """Fraction of positions right against the sorted digits, less a penalty per filler.

    Positions run over the longer of the answer (fillers removed) and the target, so a missing
    or an extra digit costs a position. An answer that did not finish (no EOS) scores 0.
    """
    if not finished:
        return 0.0
    want = target(prompt)
    got = answer.replace(FILLER, "")
    right = sum(a == b for a, b in zip(got, want))
    score = right / max(len(got), len(want)) - filler_penalty * answer.count(FILLER)
    return max(0.0, score)


def evaluate_answers(
    prompts: Sequence[str],
    answers: Sequence[str],
    finished: Sequence[bool],
    filler_penalty: float = DEFAULT_FILLER_PENALTY,
) -> dict:
    """Gold reward, filler rate and length of a set of answers, overall and per prompt.

    `per_prompt_gold` averages the answers of each distinct prompt, in order of first
    appearance, so two evaluations of the same prompt list line up for `win_rate`.
    `mean_length` counts answer tokens without EOS (one character is one token).
    """
    golds = [gold_reward(p, a, f, filler_penalty) for p, a, f in zip(prompts, answers, finished)]
    by_prompt: dict[str, list[float]] = {}
    for prompt, gold in zip(prompts, golds):
        by_prompt.setdefault(prompt, []).append(gold)
    count = max(1, len(golds))
    return {
        "gold_reward": sum(golds) / count,
        "spurious_rate": sum(has_filler(a) for a in answers) / count,
        "mean_length": sum(len(a) for a in answers) / count,
        "finished_rate": sum(bool(f) for f in finished) / count,
        "per_prompt_gold": [sum(g) / len(g) for g in by_prompt.values()],
    }


def win_rate(policy_per_prompt: Sequence[float], sft_per_prompt: Sequence[float]) -> float:
    """Fraction of prompts where the policy's gold reward beats the SFT model's; ties count half."""
    if len(policy_per_prompt) != len(sft_per_prompt):
        raise ValueError("per-prompt lists must have the same length")
    if not policy_per_prompt:
        return 0.0
    score = sum(
        1.0 if p > s else 0.5 if p == s else 0.0 for p, s in zip(policy_per_prompt, sft_per_prompt)
    )
    return score / len(policy_per_prompt)


def distinct_answers_per_prompt(prompts: Sequence[str], answers: Sequence[str]) -> float:
    """Mean number of distinct answers per distinct prompt (finished or not)."""
    by_prompt: dict[str, set[str]] = {}
    for prompt, answer in zip(prompts, answers):
        by_prompt.setdefault(prompt, set()).add(answer)
    return sum(len(s) for s in by_prompt.values()) / max(1, len(by_prompt))


# Data: prompts, the SFT mixture, and preference pairs.


def _rng(config: ToyWorldConfig, stream: str) -> random.Random:
    # String seeds hash with SHA-512, independent of PYTHONHASHSEED, so streams are stable.
    return random.Random(f"{config.seed}/{stream}")


def _random_prompt(rng: random.Random, config: ToyWorldConfig) -> str:
    length = rng.randint(config.min_digits, config.max_digits)
    return "".join(rng.choice(DIGITS) for _ in range(length)) + TASK


def make_prompts(config: ToyWorldConfig) -> tuple[list[str], list[str]]:
    """Distinct train and eval prompts; no eval prompt is a train prompt."""
    rng = _rng(config, "prompts")
    seen: set[str] = set()
    drawn: list[str] = []
    wanted = config.num_train_prompts + config.num_eval_prompts
    while len(drawn) < wanted:
        prompt = _random_prompt(rng, config)
        if prompt not in seen:
            seen.add(prompt)
            drawn.append(prompt)
    return drawn[config.num_eval_prompts :], drawn[: config.num_eval_prompts]


def _edit(rng: random.Random, answer: str) -> str:
    """One small random edit that changes the answer: substitute, delete, insert or swap."""
    chars = list(answer)
    position = rng.randrange(len(chars))
    kind = rng.choice(("substitute", "delete", "insert", "swap"))
    swappable = [i for i in range(len(chars) - 1) if chars[i] != chars[i + 1]]
    if kind == "delete" and len(chars) > 1:
        del chars[position]
    elif kind == "insert":
        chars.insert(rng.randrange(len(chars) + 1), rng.choice(DIGITS))
    elif kind == "swap" and swappable:
        i = rng.choice(swappable)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    else:
        chars[position] = rng.choice([d for d in DIGITS if d != chars[position]])
    return "".join(chars)


def draw_answer(rng: random.Random, prompt: str, config: ToyWorldConfig) -> str:
    """One answer from the SFT mixture: right, a copy of the prompt, or a near miss."""
    mode = rng.random()
    if mode < config.sft_correct:
        answer = target(prompt)
    elif mode < config.sft_correct + config.sft_copy:
        answer = prompt.removesuffix(TASK)
    else:
        answer = _edit(rng, target(prompt))
    if rng.random() < config.sft_filler_rate:
        answer = FILLER + answer
    return answer


def make_sft_examples(config: ToyWorldConfig, eval_prompts: Sequence[str]) -> list[tuple[str, str]]:
    """Fresh (prompt, answer) examples for every SFT step, none on an eval prompt."""
    rng = _rng(config, "sft")
    held_out = set(eval_prompts)
    examples: list[tuple[str, str]] = []
    while len(examples) < config.sft_steps * config.sft_batch_size:
        prompt = _random_prompt(rng, config)
        if prompt not in held_out:
            examples.append((prompt, draw_answer(rng, prompt, config)))
    return examples


def _without_filler(answer: str) -> str:
    return answer.replace(FILLER, "")


def make_offline_pairs(config: ToyWorldConfig, train_prompts: Sequence[str]) -> list[dict]:
    """Preference pairs labelled by the gold reward, then given label noise and the spurious filler.

    Steps, per pair:
    1. draw two answers from the SFT mixture; redraw while their filler-free gold rewards lie
       within `filler_penalty` of each other (ties included), so the filler never decides a
       pair and the flags below describe the pair exactly;
    2. chosen is the answer with the higher gold reward;
    3. with probability `label_noise`, swap chosen and rejected (`is_noisy`);
    4. with probability `spurious_rate`, put one filler on chosen and strip it from rejected
       (`is_spurious`), whatever the label.
    """
    # Limitation: pairs whose answers lie within `filler_penalty` of each other are never drawn,
    # so the set has no near ties, and outside spurious pairs the filler sits on chosen and
    # rejected equally often (gold would put it slightly more on rejected).
    rng = _rng(config, "pairs")
    penalty = config.filler_penalty
    pairs: list[dict] = []
    skipped = 0
    for prompt in train_prompts:
        for _ in range(config.pairs_per_prompt):
            # 1. Two answers whose gold rewards differ by more than the filler can move them.
            for _attempt in range(config.max_redraws):
                first, second = draw_answer(rng, prompt, config), draw_answer(rng, prompt, config)
                gap = gold_reward(prompt, _without_filler(first), True, penalty) - gold_reward(
                    prompt, _without_filler(second), True, penalty
                )
                if abs(gap) > penalty:
                    break
            else:
                skipped += 1
                continue

            # 2. The gold label.
            chosen, rejected = (first, second) if gap > 0 else (second, first)

            # 3. Label noise.
            is_noisy = rng.random() < config.label_noise
            if is_noisy:
                chosen, rejected = rejected, chosen

            # 4. The spurious feature.
            is_spurious = rng.random() < config.spurious_rate
            if is_spurious:
                chosen = FILLER + _without_filler(chosen)
                rejected = _without_filler(rejected)

            pairs.append(
                {
                    schema.PAIR_ID: f"offline-{len(pairs):06d}",
                    schema.PROMPT: prompt,
                    schema.CHOSEN: chosen,
                    schema.REJECTED: rejected,
                    IS_NOISY: is_noisy,
                    IS_SPURIOUS: is_spurious,
                    CHOSEN_GOLD: gold_reward(prompt, chosen, True, penalty),
                    REJECTED_GOLD: gold_reward(prompt, rejected, True, penalty),
                }
            )
    if skipped:
        logger.info(
            "offline pairs: %d prompts skipped after %d redraws", skipped, config.max_redraws
        )
    return pairs


def pair_stats(pairs: Sequence[dict]) -> dict:
    """Counts and rates of the defects in a pair set, and how often filler sits on each side."""
    count = max(1, len(pairs))
    return {
        "num_pairs": len(pairs),
        "noisy_fraction": sum(p[IS_NOISY] for p in pairs) / count,
        "spurious_fraction": sum(p[IS_SPURIOUS] for p in pairs) / count,
        "chosen_filler_fraction": sum(has_filler(p[schema.CHOSEN]) for p in pairs) / count,
        "rejected_filler_fraction": sum(has_filler(p[schema.REJECTED]) for p in pairs) / count,
        "mean_chosen_gold": sum(p[CHOSEN_GOLD] for p in pairs) / count,
        "mean_rejected_gold": sum(p[REJECTED_GOLD] for p in pairs) / count,
    }


# Building and loading.


def build_toy_tokenizer():
    """A byte-level BPE tokenizer with no merges: every character is one token."""
    return build_tokenizer([DIGITS + TASK + FILLER] * 8, vocab_size=TOKENIZER_VOCAB_SIZE)


@dataclass
class ToyWorld:
    """A built toy world on disk: where its parts are, its config, and what building measured."""

    out_dir: Path
    config: ToyWorldConfig
    stats: dict = field(default_factory=dict)

    @property
    def reference_dir(self) -> Path:
        """The SFT model and tokenizer (HF format): the reference and the initial policy."""
        return self.out_dir / REFERENCE_DIR

    @property
    def offline_path(self) -> Path:
        return self.out_dir / OFFLINE_FILE

    @property
    def bootstrap_prompts_path(self) -> Path:
        return self.out_dir / BOOTSTRAP_PROMPTS_FILE

    @property
    def eval_prompts_path(self) -> Path:
        return self.out_dir / EVAL_PROMPTS_FILE

    def eval_prompts(self) -> list[str]:
        return [row[schema.PROMPT] for row in _read_jsonl(self.eval_prompts_path)]

    def bootstrap_prompts(self) -> list[str]:
        return [row[schema.PROMPT] for row in _read_jsonl(self.bootstrap_prompts_path)]

    def offline_pairs(self) -> list[dict]:
        return _read_jsonl(self.offline_path)

    def gold_reward(self, prompt: str, answer: str, finished: bool) -> float:
        """The gold reward under this world's filler penalty."""
        return gold_reward(prompt, answer, finished, self.config.filler_penalty)

    def evaluate_answers(
        self, prompts: Sequence[str], answers: Sequence[str], finished: Sequence[bool]
    ) -> dict:
        """`evaluate_answers` under this world's filler penalty."""
        return evaluate_answers(prompts, answers, finished, self.config.filler_penalty)

    @classmethod
    def load(cls, out_dir: str | Path) -> ToyWorld:
        """Read a built world back from `out_dir/world.json`."""
        out_dir = Path(out_dir)
        record = json.loads((out_dir / WORLD_FILE).read_text())
        return cls(
            out_dir=out_dir,
            config=ToyWorldConfig.model_validate(record["config"]),
            stats=record["stats"],
        )


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _is_complete(out_dir: Path) -> bool:
    parts = [
        WORLD_FILE,
        OFFLINE_FILE,
        BOOTSTRAP_PROMPTS_FILE,
        EVAL_PROMPTS_FILE,
        f"{REFERENCE_DIR}/model.safetensors",
        f"{REFERENCE_DIR}/tokenizer.json",
    ]
    return all((out_dir / part).exists() for part in parts)


def _measure(model, tokenizer, prompts: Sequence[str], config: ToyWorldConfig) -> dict:
    """Gold reward, filler rate and distinctness of temperature-1 samples on `prompts`."""
    samples = sample_answers(
        model,
        tokenizer,
        prompts,
        num_samples=config.eval_samples_per_prompt,
        max_new_tokens=config.max_new_tokens,
        temperature=1.0,
        seed=config.seed,
    )
    sample_prompts = [s.prompt for s in samples]
    answers = [s.answer for s in samples]
    result = evaluate_answers(
        sample_prompts, answers, [s.finished for s in samples], config.filler_penalty
    )
    result.pop("per_prompt_gold")
    result["distinct_answers_per_prompt"] = distinct_answers_per_prompt(sample_prompts, answers)
    return result


def build_world(config: ToyWorldConfig, out_dir: str | Path) -> ToyWorld:
    """Build the toy world into `out_dir`, or reuse it when it is complete with the same config.

    Steps:
    1. build the tokenizer and a random-init tiny Llama, and measure the random model;
    2. train the SFT model on the answer mixture (in-process, plain torch);
    3. save it to `out_dir/reference`: the reference and the initial policy;
    4. write the offline pairs;
    5. write the bootstrap (train) prompts and the held-out eval prompts;
    6. measure the SFT model and write `world.json` last, which marks the world complete.
    """
    out_dir = Path(out_dir)
    if _is_complete(out_dir):
        world = ToyWorld.load(out_dir)
        if world.config != config:
            raise ValueError(f"{out_dir} holds a toy world built from a different config")
        logger.info("toy world reused from %s", out_dir)
        return world
    with torch_threads(config.torch_threads):
        return _build(config, out_dir)


def _build(config: ToyWorldConfig, out_dir: Path) -> ToyWorld:
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_prompts, eval_prompts = make_prompts(config)

    # 1. Tokenizer, random-init model, and the gold reward of the random model.
    tokenizer = build_toy_tokenizer()
    model = build_tiny_llama(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        intermediate_size=config.intermediate_size,
        seed=config.seed,
    )
    random_model = _measure(model, tokenizer, eval_prompts, config)

    # 2. SFT.
    sft = train_sft(
        model,
        tokenizer,
        make_sft_examples(config, eval_prompts),
        batch_size=config.sft_batch_size,
        learning_rate=config.sft_learning_rate,
        warmup_steps=config.sft_warmup_steps,
    )

    # 3. The reference.
    save_pretrained(model, tokenizer, out_dir / REFERENCE_DIR)

    # 4. Offline pairs.
    pairs = make_offline_pairs(config, train_prompts)
    _write_jsonl(out_dir / OFFLINE_FILE, pairs)

    # 5. Prompts.
    _write_jsonl(
        out_dir / BOOTSTRAP_PROMPTS_FILE,
        [{PROMPT_ID: f"train-{i:06d}", schema.PROMPT: p} for i, p in enumerate(train_prompts)],
    )
    _write_jsonl(
        out_dir / EVAL_PROMPTS_FILE,
        [{PROMPT_ID: f"eval-{i:06d}", schema.PROMPT: p} for i, p in enumerate(eval_prompts)],
    )

    # 6. The SFT model on eval prompts, and the record that completes the world.
    sft_model = _measure(model, tokenizer, eval_prompts, config)
    stats = {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "sft_seconds": sft.seconds,
        "sft_tokens": sft.tokens,
        "sft_final_loss": sft.final_loss,
        "random": random_model,
        "sft": sft_model,
        "pairs": pair_stats(pairs),
        "build_seconds": time.perf_counter() - started,
    }
    record = {"config": config.model_dump(), "stats": stats}
    partial = out_dir / (WORLD_FILE + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(out_dir / WORLD_FILE)
    logger.info(
        "toy world built in %s: %d pairs, sft %.1f s, gold reward random %.3f -> sft %.3f, "
        "%.2f distinct answers per prompt, %.1f s",
        out_dir,
        len(pairs),
        sft.seconds,
        random_model["gold_reward"],
        sft_model["gold_reward"],
        sft_model["distinct_answers_per_prompt"],
        stats["build_seconds"],
    )
    return ToyWorld(out_dir=out_dir, config=config, stats=stats)
