"""The demo's model: a small Llama trained on CPU, once, on simple English stories made here.

Nothing is downloaded and no text is shipped: ``story_corpus`` writes short stories from a small
template grammar (seeded, deterministic; every word comes from this module's lists, so no outside
text is involved). ``train_demo_model`` fits a byte-level BPE tokenizer and an 8-layer Llama of
1.8 million parameters to it in a few minutes on two CPU cores and saves a normal
Hugging Face checkpoint (safetensors + tokenizer). ``ensure_demo_model`` trains only when the
directory lacks a model made by this recipe.

The model makes simple, mostly grammatical sentences about cats, dogs and balls. It knows nothing
else: it cannot answer questions, follow instructions or say anything true about the world.
"""

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from farmesh_core.openmp import torch_threads

logger = logging.getLogger(__name__)

# Bump when the grammar or the recipe changes: a cached model made by another version is retrained.
RECIPE_VERSION = 1
MARKER = "farmesh-demo-model.json"

# ---- the story grammar ---------------------------------------------------------------------------
ANIMALS = ["cat", "dog", "bird", "rabbit", "fox", "bear", "duck", "frog", "mouse", "pig", "cow", "owl", "horse", "lion"]
NAMES = {
    "he": ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Bob", "Dan", "Finn"],
    "she": ["Lily", "Mia", "Anna", "Sue", "Emma", "Lucy", "Rose", "Kate", "Amy", "Ella"],
}
OBJECT_PRONOUN = {"he": "him", "she": "her"}
POSSESSIVE = {"he": "his", "she": "her"}
SIZES = ["little", "big", "small", "young", "old", "tiny"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited"]
FEELINGS_BAD = ["sad", "scared", "worried", "upset"]
COLORS = ["red", "blue", "green", "yellow", "white", "brown", "pink", "orange"]
THINGS = ["ball", "kite", "hat", "box", "book", "boat", "cup", "toy", "bell", "key", "drum", "bag"]
FOODS = ["apples", "cake", "carrots", "cookies", "pie", "eggs", "bananas", "bread", "cheese", "berries", "soup"]
HOMES = [
    "in a small house",
    "in a big red barn",
    "near a dark forest",
    "by the blue sea",
    "on a green hill",
    "in a busy town",
    "under an old tree",
    "next to a quiet river",
]
PLACES = ["park", "forest", "garden", "beach", "river", "market", "farm", "lake", "school", "hill"]
HOBBIES = [
    "play in the sun",
    "run and jump",
    "sing songs",
    "read books",
    "climb trees",
    "swim in the water",
    "dig in the dirt",
    "look at the stars",
    "help {pos} mom",
    "draw pictures",
]
TROUBLES = [
    ("The {thing} was stuck in a tall tree.", "climbed up the tree and got the {thing} down"),
    ("The {thing} fell into the water.", "found a long stick and pulled the {thing} out"),
    ("The {thing} was too heavy to carry.", "helped carry the {thing} home"),
    ("The {thing} was broken.", "fixed the {thing} with some string"),
    ("The {thing} rolled down the hill.", "ran fast and caught the {thing}"),
    ("The {thing} was under a big rock.", "pushed the rock away"),
]
MORALS = [
    "it is good to help your friends",
    "friends make everything better",
    "sharing makes everyone happy",
    "it is good to be kind",
    "you should never give up",
    "it is fun to work together",
    "being brave is important",
]
OPENINGS = ["Once upon a time,", "Once upon a time,", "Once upon a time,", "Long ago,"]
WEATHER = ["The sun was shining.", "It was a warm day.", "The sky was blue.", "It was a windy day.", "It was raining."]


def _a(word: str) -> str:
    """``word`` with its indefinite article: "a cat", "an owl"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _character(rng: random.Random, avoid: str = "") -> dict:
    pronoun = rng.choice(["he", "she"])
    name = rng.choice([n for n in NAMES[pronoun] if n != avoid])
    return {
        "name": name,
        "animal": rng.choice(ANIMALS),
        "size": rng.choice(SIZES),
        "he": pronoun,
        "He": pronoun.capitalize(),
        "him": OBJECT_PRONOUN[pronoun],
        "pos": POSSESSIVE[pronoun],
        "Pos": POSSESSIVE[pronoun].capitalize(),
    }


def make_story(rng: random.Random) -> str:
    """One short story: a hero, a place, a find, a friend, a trouble, help, a happy ending."""
    a = _character(rng)
    b = _character(rng, avoid=a["name"])
    thing = rng.choice(THINGS)
    color = rng.choice(COLORS)
    place = rng.choice(PLACES)
    food = rng.choice(FOODS)
    opening = rng.choice(OPENINGS)
    if opening.startswith("Once"):
        first = f"{opening} there was {_a(a['size'])} {a['animal']} named {a['name']}."
    else:
        first = f"{opening} {_a(a['size'])} {a['animal']} named {a['name']} lived {rng.choice(HOMES)}."
    s = [first]
    if opening.startswith("Once"):
        s.append(f"{a['name']} lived {rng.choice(HOMES)}.")
    hobby = rng.choice(HOBBIES).format(pos=a["pos"])
    s.append(rng.choice([f"{a['He']} liked to {hobby}.", f"Every day, {a['he']} liked to {hobby}."]))
    if rng.random() < 0.5:
        s.append(f"{a['He']} loved to eat {food}.")
    s.append(rng.choice(WEATHER) if rng.random() < 0.5 else f"One morning, {a['name']} went to the {place}.")
    if not s[-1].startswith("One morning"):
        s.append(f"{a['name']} went to the {place}.")
    s.append(f"There {a['he']} saw {_a(color)} {thing}.")
    s.append(
        rng.choice(
            [
                f'"What a nice {thing}!" said {a["name"]}.',
                f"{a['He']} wanted to play with the {thing}.",
                f'"I want that {thing}," {a["he"]} said.',
            ]
        )
    )
    trouble, fix = rng.choice(TROUBLES)
    s.append(trouble.format(thing=thing))
    feeling = rng.choice(FEELINGS_BAD)
    s.append(f"{a['name']} felt {feeling}.")
    s.append(f"Then {_a(b['size'])} {b['animal']} named {b['name']} came by.")
    s.append(
        rng.choice(
            [
                f'"Why are you {feeling}?" asked {b["name"]}.',
                f'"Can I help you?" asked {b["name"]}.',
                f'"Do not worry," said {b["name"]}. "I will help you."',
            ]
        )
    )
    s.append(f"{b['name']} {fix.format(thing=thing)}.")
    s.append(f"{a['name']} was so {rng.choice(FEELINGS_GOOD)}.")
    s.append(
        rng.choice(
            [
                f'"Thank you, {b["name"]}!" said {a["name"]}.',
                f"{a['He']} said thank you to {b['name']}.",
                f"{a['He']} gave {b['name']} a big hug.",
            ]
        )
    )
    ending = rng.random()
    if ending < 0.4:
        s.append(f"They played with the {thing} all day.")
    elif ending < 0.7:
        s.append(f"{a['name']} shared {a['pos']} {food} with {b['name']}.")
    else:
        s.append(f"From that day on, {a['name']} and {b['name']} were best friends.")
    if rng.random() < 0.5:
        s.append(f"{a['name']} learned that {rng.choice(MORALS)}.")
    s.append("The end.")
    return " ".join(s)


def story_corpus(num_stories: int, seed: int = 0) -> list[str]:
    """``num_stories`` stories from the grammar; the same list for the same seed."""
    rng = random.Random(seed)
    return [make_story(rng) for _ in range(num_stories)]


# ---- training --------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """The recipe of the demo model: ``steps`` x ``batch_size`` x ``seq_len`` tokens are seen.

    The defaults (about 1.8 million parameters, 200 steps of 2048 tokens) take a few minutes on two
    busy CPU cores and give a model whose greedy text is simple, readable English.
    """

    seed: int = 0
    num_stories: int = 4000
    vocab_size: int = 2048  # an upper bound: the corpus has few words, so the BPE ends near 800 tokens
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 200
    lr: float = 5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01


def _token_stream(tokenizer, stories: list[str]) -> torch.Tensor:
    """Every story as ``<s> story </s>``, concatenated into one long 1-D tensor of ids."""
    ids = []
    for encoding in tokenizer(stories, add_special_tokens=True)["input_ids"]:
        ids.extend(encoding)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _make_model(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def training_threads() -> int:
    """Torch threads for training: the cores that are idle now, at least one.

    On a busy machine two OpenMP threads that fight other processes for two cores run many times
    slower than one thread does, so training takes only the cores the load average leaves free.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = cores - int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else cores
    return max(1, min(cores, torch.get_num_threads(), free))


def train(cfg: TrainConfig, progress: bool = True, threads: int | None = None):
    """Train the tokenizer and the model per ``cfg``; return ``(model, tokenizer, losses)``.

    Deterministic for a given ``cfg`` and thread count on one machine: the corpus, the batches and
    the initial weights all come from ``cfg.seed``. ``threads`` defaults to ``training_threads()``.
    """
    with torch_threads(threads or training_threads()):
        return _train(cfg, progress)


def _train(cfg: TrainConfig, progress: bool):
    from tqdm.auto import tqdm

    from farmesh_core.checkpoint_maker import build_tokenizer

    stories = story_corpus(cfg.num_stories, cfg.seed)
    tokenizer = build_tokenizer(cfg.vocab_size, stories)
    data = _token_stream(tokenizer, stories)
    torch.manual_seed(cfg.seed)
    model = _make_model(cfg, tokenizer)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; norms do not
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))

    generator = torch.Generator().manual_seed(cfg.seed)
    starts_max = len(data) - cfg.seq_len
    losses = []
    bar = tqdm(range(cfg.steps), desc="Training the demo model", unit="step", disable=not progress)
    for step in bar:
        starts = torch.randint(0, starts_max, (cfg.batch_size,), generator=generator)
        batch = torch.stack([data[s : s + cfg.seq_len] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels: next-token loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return model, tokenizer, losses


def save(model, tokenizer, out_dir: str, cfg: TrainConfig, losses: list[float], seconds: float, threads: int) -> str:
    """Write the checkpoint to a temporary sibling directory, then move it into place."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-model-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "recipe_version": RECIPE_VERSION,
            "config": asdict(cfg),
            "parameters": sum(p.numel() for p in model.parameters()),
            "first_loss": losses[0],
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),  # the mean of the last 20 steps
            "train_seconds": round(seconds, 1),
            "torch_threads": threads,
        }
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def train_demo_model(out_dir: str, cfg: TrainConfig | None = None, progress: bool = True) -> str:
    """Train the demo model per ``cfg`` (default: the demo's recipe) and save it to ``out_dir``."""
    cfg = cfg or TrainConfig()
    threads = training_threads()
    began = time.perf_counter()
    model, tokenizer, losses = train(cfg, progress=progress, threads=threads)
    seconds = time.perf_counter() - began
    logger.info(
        "Trained the demo model in %.0f s on %d thread(s) (%d steps, loss %.2f -> %.2f)",
        seconds,
        threads,
        cfg.steps,
        losses[0],
        losses[-1],
    )
    return save(model, tokenizer, out_dir, cfg, losses, seconds, threads)


def needs_training(model_dir: str) -> bool:
    """Whether ``model_dir`` lacks a checkpoint, or holds a demo model of an older recipe.

    A checkpoint this module did not make (no marker file) is never replaced.
    """
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        return True
    try:
        with open(os.path.join(model_dir, MARKER)) as f:
            return json.load(f).get("recipe_version") != RECIPE_VERSION
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True


def ensure_demo_model(model_dir: str, progress: bool = True) -> str:
    """Train the demo model into ``model_dir`` unless a checkpoint is there already; return it."""
    if needs_training(model_dir):
        logger.info("Training the demo model once (a few minutes on CPU); it is cached in %s", model_dir)
        train_demo_model(model_dir, progress=progress)
    return model_dir
