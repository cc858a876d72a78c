"""The coordinator's side of the mesh: one DistributedInferenceClient shared by every request.

Each generation runs in its own worker thread, in an inference session of its own or as a row of
one shared with requests that started with it (same prompt length and settings, see
``client/batched_generation.py``). What the threads share is made safe here: the tokenizer (a Rust
object that refuses concurrent use: "Already borrowed") behind a lock, and the status page's DHT
reads behind another.
"""

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from farmesh_core import metrics
from farmesh_core.client.inference_client import DistributedInferenceClient
from farmesh_core.coordinator.schemas import GREEDY, APIError, SamplingOptions
from farmesh_core.dht import fetch_node_records
from farmesh_core.status import summarize_mesh

logger = logging.getLogger(__name__)


@dataclass
class Token:
    """One generated token: the text it releases (may be empty) and, on the last one, why it ended."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop sequence) or "length"


class MeshEngine:
    """Prompts to token ids, and token ids to text through the Far Mesh Network, for many threads."""

    def __init__(self, client: DistributedInferenceClient, model_name: str | None = None):
        self.client = client
        self.model_id = client.config.model_id
        self.model_name = model_name or default_model_name(self.model_id)
        self.tokenizer = client.tokenizer
        self.context_length: int | None = getattr(client.model_config, "max_position_embeddings", None)
        self._tokenizer_lock = threading.Lock()
        self._mesh_lock = threading.Lock()
        eos = client.model_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set() if eos is None else set(eos if isinstance(eos, list) else [eos])
        self.sampling_defaults = sampling_defaults(client.checkpoint.path)
        metrics.COORDINATOR_SHARED_ROWS.set_function(lambda: client.batcher.batched_rows)

    def close(self) -> None:
        self.client.close()

    def serves(self, name: str) -> bool:
        """Whether ``name`` (the served name, the MODEL argument or its absolute path) is this model."""
        if name in (self.model_name, self.model_id):
            return True
        path = os.path.expanduser(name)
        return os.path.isdir(path) and os.path.realpath(path) == os.path.realpath(self.client.checkpoint.path)

    # ---- prompts -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, exactly as ``DistributedInferenceClient.generate`` makes them."""
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat as token ids: the tokenizer's chat template if it has one, else ``chat_text``."""
        if not getattr(self.tokenizer, "chat_template", None):
            return self.encode(chat_text(messages))
        try:
            with self._tokenizer_lock:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may refuse a role or an order of messages
            raise APIError(400, f"the model's chat template refused the messages: {e}", param="messages") from e
        return self.encode(text, add_special_tokens=False)  # the template writes the special tokens itself

    # ---- the mesh ------------------------------------------------------------------------------
    def mesh_status(self) -> dict:
        """The same data as ``farmesh status --json``, read through the client's own DHT peer."""
        mesh = self.client.mesh
        with self._mesh_lock:
            records = fetch_node_records(mesh.dht, mesh.prefix, online_only=False)
        return summarize_mesh(self.model_id, mesh.prefix, self.client.num_layers, records)

    def check_length(self, prompt_ids: list[int], options: SamplingOptions) -> int:
        """The number of tokens to generate at most; a 400 when the prompt leaves no room for them."""
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = None if self.context_length is None else self.context_length - len(prompt_ids)
        max_tokens = options.max_tokens if options.max_tokens is not None else room
        if room is not None and max_tokens > room:
            raise APIError(
                400,
                f"this model's maximum context length is {self.context_length} tokens; the prompt has "
                f"{len(prompt_ids)} and {max_tokens} more were requested: shorten the prompt or max_tokens",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        return max_tokens if max_tokens is not None else 256

    def generate(self, prompt_ids: list[int], max_tokens: int, options: SamplingOptions) -> Iterator[Token]:
        """Yield one Token per generated token; the generation starts on the first ``next`` and ends
        (its session closes, or its row of a shared one is left) when the generator ends or is closed.
        Raises NoRouteError if no chain of nodes covers the model."""
        ids = self.client.generate_ids(
            torch.tensor([prompt_ids]), max_tokens, temperature=options.temperature, top_p=options.top_p,
            top_k=options.top_k, seed=options.seed, min_new_tokens=options.min_tokens,
        )  # fmt: skip
        try:
            yield from self._text(ids, max_tokens, options.stop)
        finally:
            ids.close()

    def _text(self, ids: Iterator[torch.Tensor], max_tokens: int, stops: list[str]) -> Iterator[Token]:
        """Tokens to text pieces: a piece per token, holding back an unfinished character and what
        could be the start of a stop sequence; cut where a stop sequence appears. Without one, the
        pieces add up to the decoded text of all the tokens."""
        hold = max((len(s) for s in stops), default=1) - 1
        generated: list[int] = []
        emitted, clean = 0, ""  # clean: the latest decoded text that does not end inside a character
        for token in ids:
            token_id = int(token[0])
            generated.append(token_id)
            text = self.decode(generated)
            if not text.endswith("\ufffd"):
                clean = text
            hit = min((clean.find(s) for s in stops if s in clean), default=-1)
            if hit >= 0:
                yield Token(clean[emitted:hit], "stop")
                return
            if token_id in self.eos_ids or len(generated) >= max_tokens:  # all of it, as transformers decodes it
                yield Token(text[emitted:], "stop" if token_id in self.eos_ids else "length")
                return
            safe = max(emitted, len(clean) - hold)
            yield Token(clean[emitted:safe])
            emitted = safe


def sampling_defaults(model_dir: str) -> dict:
    """What a request that names no temperature, top_p or top_k gets, as in transformers' ``generate``:
    greedy, unless the checkpoint's generation_config.json says ``do_sample`` (then its values)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError):
        return dict(GREEDY)
    if not config.do_sample:
        return dict(GREEDY)
    return {"temperature": config.temperature or 1.0, "top_p": config.top_p or 1.0, "top_k": config.top_k or 0}


def default_model_name(model_id: str) -> str:
    """The name clients use: a local checkpoint's directory name, or the Hugging Face id itself."""
    path = os.path.expanduser(model_id)
    return os.path.basename(os.path.normpath(path)) if os.path.isdir(path) else model_id


def chat_text(messages: list[dict]) -> str:
    """A chat for a model without a chat template: ``role: content`` lines, then ``assistant:``."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class GenerationTimer:
    """Time to first token, time between tokens and token counts of one request, into the metrics."""

    def __init__(self):
        self.began = self.last = time.perf_counter()
        self.tokens = 0

    def token(self) -> None:
        now = time.perf_counter()
        if self.tokens == 0:
            metrics.COORDINATOR_FIRST_TOKEN_SECONDS.observe(now - self.began)
        else:
            metrics.COORDINATOR_TOKEN_SECONDS.observe(now - self.last)
        self.last = now
        self.tokens += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.began
