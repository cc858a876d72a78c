"""DistributedInferenceClient: text in, text out, through the Far Mesh Network.

The embeddings, final norm and LM head run here; the layers run on Far Nodes in one inference
session per generation. The decode loop calls the head and the session directly (no model-level
forward), which is what keeps a step close to the network's round trip.
"""

import logging
from collections.abc import Iterator

import torch

from farmesh_core.architecture import checkpoint_dtype
from farmesh_core.client.batched_generation import GenerationBatcher
from farmesh_core.client.generation import TextStream, TokenChooser, decode
from farmesh_core.client.mesh import connect
from farmesh_core.client.remote_layers import DistributedModel
from farmesh_core.client.session import InferenceSession
from farmesh_core.config import ClientConfig

logger = logging.getLogger(__name__)


class DistributedInferenceClient:
    """Generate text with a model whose layers are served by Far Nodes.

    ``DistributedInferenceClient(model_id, dht_bootstrap).generate(prompt, max_tokens=100)`` returns
    the new text; ``stream=True`` yields it piece by piece.
    """

    def __init__(self, model_id: str, dht_bootstrap: str | list[str] | None = None, **options):
        self.config = ClientConfig(model_id=model_id, dht_bootstrap=dht_bootstrap or [], **options)
        self.checkpoint, self.adapter, self.mesh = connect(self.config)
        self.model_config = self.checkpoint.config
        self.tokenizer = self.checkpoint.tokenizer()
        self.head = self.adapter.load_client_head(
            self.checkpoint, self.model_config, checkpoint_dtype(self.model_config)
        )
        self.num_layers = self.adapter.num_layers(self.model_config)
        self.layers = DistributedModel.over(self.mesh, 0, self.num_layers)
        self.batcher = GenerationBatcher(self.config.batch_window_ms / 1000, set(self._eos_ids().tolist()))

    def close(self) -> None:
        self.mesh.close()

    def __enter__(self) -> "DistributedInferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def inference_session(self, max_length: int, batch_size: int = 1, adapter: str | None = None) -> InferenceSession:
        return InferenceSession(self.mesh, 0, self.num_layers, max_length, batch_size, adapter or self.config.adapter)

    def generate(
        self,
        prompt: str,
        max_tokens: int = 100,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stream: bool = False,
        **options,
    ) -> str | Iterator[str]:
        """The continuation of ``prompt`` (new text only). ``temperature=0`` is greedy.

        Other options: ``repetition_penalty``, ``seed``, ``stop`` (strings that end the text),
        ``adapter``. With ``stream=True`` this returns an iterator of text pieces.
        """
        pieces = self._generate_text(prompt, max_tokens, temperature, top_p, top_k, **options)
        return pieces if stream else "".join(pieces)

    def _generate_text(self, prompt, max_tokens, temperature, top_p, top_k, stop=None, **options) -> Iterator[str]:
        """Text pieces as tokens arrive: held back while a character or a stop string may be incomplete."""
        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        text = TextStream(self.tokenizer)
        stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if s]
        hold_back = max((len(s) - 1 for s in stops), default=0)
        emitted = 0
        for token in self.generate_ids(input_ids, max_tokens, temperature, top_p, top_k, **options):
            full = text.push(int(token[0]))
            hit = min((full.find(s) for s in stops if s in full), default=-1)
            if hit >= 0:
                yield full[emitted:hit]
                return
            safe = len(full.removesuffix("\ufffd")) - hold_back
            if safe > emitted:
                yield full[emitted:safe]
                emitted = safe
        if rest := text.text()[emitted:]:
            yield rest

    def generate_ids(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        adapter: str | None = None,
        session: InferenceSession | None = None,
        min_new_tokens: int = 0,
    ) -> Iterator[torch.Tensor]:
        """Yield each new token id tensor [batch] as it is chosen; stops at EOS (when every row hit it).

        ``session`` continues an open session (its earlier tokens stay cached on the nodes): pass only
        the new ``input_ids`` then. Without one, a one-row call may share a session with calls that
        start with it (see ``batched_generation``: only while, or soon after, the client generates
        several at once).
        """
        self.mesh.check_process()  # (before the batcher's lock, which a fork may have copied held)
        settings = (temperature, top_p, top_k, repetition_penalty, seed, min_new_tokens, adapter)

        def alone() -> Iterator[torch.Tensor]:
            return self._decode(input_ids, max_new_tokens, settings, session)

        def batch(rows: torch.Tensor, max_new_tokens: int) -> Iterator[torch.Tensor]:
            return self._decode(rows, max_new_tokens, settings)

        alone_only = session is not None or input_ids.shape[0] != 1 or max_new_tokens < 1
        if alone_only or (seed is not None and temperature > 0):  # (seeded draws depend on the batch)
            self.batcher.arrive()  # (an announced call that goes alone: windows need not wait for it)
            yield from alone()
            return
        key = (input_ids.shape[1], *settings)
        yield from self.batcher.generate(input_ids, max_new_tokens, key, alone, batch)

    def _decode(
        self, input_ids: torch.Tensor, max_new_tokens: int, settings: tuple, session: InferenceSession | None = None
    ) -> Iterator[torch.Tensor]:
        """``generate_ids`` of all rows of ``input_ids`` in one session (``session``, or one of its own)."""
        temperature, top_p, top_k, repetition_penalty, seed, min_new_tokens, adapter = settings
        eos = self._eos_ids()
        choose = TokenChooser(
            temperature, top_p, top_k, repetition_penalty, seed, min_new_tokens, input_ids.shape[1], eos.tolist()
        )
        if session is not None:
            yield from decode(self.head, session, input_ids, max_new_tokens, choose, eos)
            return
        with self.inference_session(input_ids.shape[1] + max_new_tokens, input_ids.shape[0], adapter) as session:
            yield from decode(self.head, session, input_ids, max_new_tokens, choose, eos)

    def _eos_ids(self) -> torch.Tensor:
        eos = self.model_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return torch.tensor([] if eos is None else eos if isinstance(eos, list) else [eos])
