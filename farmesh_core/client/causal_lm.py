"""DistributedModelForCausalLM: a transformers ``GenerationMixin`` model whose layers run on Far Nodes.

The Petals-compatible way in: ``model.generate(input_ids, ...)`` goes through transformers' own
generation loop (logits processors, stopping criteria, streamers) while the embeddings, final norm
and LM head run here and the decoder layers on the mesh. Generation is stateful on the nodes: the
KV caches live in an ``InferenceSession``, and the ``Cache`` transformers sees (``RemoteCache``) only
counts tokens. That is also why beam search is refused: nodes cannot reorder their caches. They can
drop their last tokens, so assisted decoding works (``prompt_lookup_num_tokens=``, ``assistant_model=``):
each step checks the drafts at once, and the session rewinds past those the model rejects.

Each thread (or asyncio task) has its own open session, as in Petals: threads sharing one model
generate at once, each in its own ``inference_session``, and the nodes batch their steps. Plain
greedy calls (below) that start together on sessions that have seen nothing yet go further, as
``DistributedInferenceClient.generate_ids``' do: they run as the rows of one shared session
(``batched_generation``), and each call's own session is owed its tokens, sent as one step only if
that session goes on.

Plain greedy ``generate`` calls (no logits processor but a minimum length's EOS mask) take the LM
head's quick approximate logits where their error bound cannot change the greedy choice (see
``ClientHead.approximate_logits``), as ``DistributedInferenceClient.generate`` does: the tokens stay
those of exact logits.
"""

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from transformers import (
    Cache,
    EosTokenCriteria,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    PreTrainedModel,
    StoppingCriteriaList,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from farmesh_core.architecture import checkpoint_dtype
from farmesh_core.client.batched_generation import GenerationBatcher
from farmesh_core.client.generation import (
    NoEosBefore,
    TokenChooser,
    decode,
    greedy_certain_logits,
    loop_ask,
    looped_tokens,
    next_token,
)
from farmesh_core.client.mesh import connect
from farmesh_core.client.remote_layers import DistributedModel
from farmesh_core.client.session import InferenceSession
from farmesh_core.config import ClientConfig


class RemoteCache(Cache):
    """What transformers sees of a session's KV caches: their length, and the ids behind it.

    ``tokens`` are the ids the nodes have processed (None once ``inputs_embeds`` were sent, since
    embeddings have no ids); ``pending`` are ids a previous ``generate`` returned but never sent (its
    last token); ``skip`` is how many leading ids of the current ``generate`` input are already cached.
    """

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session
        self.tokens: torch.Tensor | None = torch.zeros(session.batch_size, 0, dtype=torch.long)
        self.pending = torch.zeros(session.batch_size, 0, dtype=torch.long)
        self.skip = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.session.position + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.session.max_length

    @property
    def is_croppable(self) -> bool:
        """Yes: :meth:`crop` rewinds the session (transformers' assisted decoding asks before it drafts)."""
        return True

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens, as transformers' assisted decoding (prompt lookup,
        an assistant model) does with the drafts its step rejected: the session rewinds, and the nodes
        write its next step over them. A positive count is refused, as transformers' own layers do."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0:
            return
        self.session.rewind(self.session.position + tokens_to_remove)
        if self.tokens is not None:
            self.tokens = self.tokens[:, : self.tokens.shape[1] + tokens_to_remove]

    def record(self, input_ids: torch.Tensor | None) -> None:
        """Remember the ids just sent (``None`` for embeddings: from then on the ids are unknown)."""
        known = self.tokens is not None and input_ids is not None
        self.tokens = torch.cat([self.tokens, input_ids.to(self.tokens.device)], dim=1) if known else None


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose decoder layers are served by the Far Mesh Network (Petals' class of the same name).

    ``DistributedModelForCausalLM.from_pretrained(model_id, dht_bootstrap=...)``; options are
    ``ClientConfig`` fields (``adapter=`` picks a LoRA adapter on the nodes, ``routing=``...) and
    ``dtype=`` for the local head.
    """

    _supports_sdpa = True  # nothing attends here, but PreTrainedModel.__init__ insists on an implementation
    main_input_name = "input_ids"

    def __init__(
        self, model_id: str, dht_bootstrap: str | list[str] | None = None, dtype: torch.dtype | None = None, **options
    ):
        client_config = ClientConfig(model_id=model_id, dht_bootstrap=dht_bootstrap or [], **options)
        checkpoint, adapter, mesh = connect(client_config)
        try:
            super().__init__(checkpoint.config)
            with contextlib.suppress(OSError):  # as AutoModelForCausalLM does: the checkpoint's defaults
                self.generation_config = GenerationConfig.from_pretrained(checkpoint.path, local_files_only=True)
            self.client_config, self.mesh = client_config, mesh
            self.head = adapter.load_client_head(checkpoint, self.config, dtype or checkpoint_dtype(self.config))
            self.layers = DistributedModel.over(mesh, 0, adapter.num_layers(self.config))
            # Per thread (or task): the open session's cache, and the EOS ids of a plain greedy generate
            self._active: ContextVar[RemoteCache | None] = ContextVar("farmesh_active_cache", default=None)
            self._greedy: ContextVar[list[int] | None] = ContextVar("farmesh_greedy_eos", default=None)
            self.quick_logits = 0  # steps whose logits came from the quick approximate head
            # plain greedy generations that start together share a session (rows end where callers stop)
            self.batcher = GenerationBatcher(client_config.batch_window_ms / 1000, eos_ids=set())
            self.eval()
        except BaseException:
            mesh.close()
            raise

    @classmethod
    def from_pretrained(cls, model_id: str, *args: Any, **kwargs: Any) -> "DistributedModelForCausalLM":
        """Join the mesh that serves ``model_id``; only the embeddings, final norm and LM head are read."""
        return cls(model_id, *args, **kwargs)

    def close(self) -> None:
        """Close this thread's open session, if any, and leave the mesh (DHT peer, event loop)."""
        cache = self._active.get()
        if cache is not None:
            cache.session.close()
            self._active.set(None)
        self.mesh.close()

    def __enter__(self) -> "DistributedModelForCausalLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.head.embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head.lm_head

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[InferenceSession]:
        """Keep one session on the nodes across ``forward`` and ``generate`` calls (Petals semantics).

        The session belongs to the calling thread (or asyncio task): other threads may open their own
        on the same model meanwhile. For transformers' prompt lookup, give it ``prompt_lookup_num_tokens``
        more than the tokens it will hold: the last step may check that many drafts past them."""
        if self._active.get() is not None:
            raise RuntimeError("an inference session is already open on this model in this thread")
        # A fresh one-row session is likely on its way to a generate call that may share (``_shared_or``)
        announced = self.batcher.announce() if batch_size == 1 else contextlib.nullcontext()
        with announced:
            session = InferenceSession(
                self.mesh, 0, len(self.layers), max_length, batch_size, self.client_config.adapter
            )
            session.before_first_step = self.batcher.arrive  # a session that steps itself shares no more
            opened = self._active.set(RemoteCache(session))
            try:
                yield session
            finally:
                self._active.reset(opened)
                session.close()

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor | ModelOutput:
        """transformers' ``generate`` over the open session, or over one opened for this call.

        Inside ``inference_session`` the input may be the whole sequence so far (only the ids the
        nodes have not seen are sent) or just the new ids (they continue the previous output).
        """
        config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or config.num_beams or 1) > 1:
            raise NotImplementedError("beam search needs KV cache reordering, which Far Nodes do not offer")
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not bool(mask.all()):
            raise NotImplementedError("padding (attention_mask with zeros) is not supported: the nodes mask causally")
        cache = self._active.get()
        if cache is not None:
            return self._generate_in(cache, inputs, *args, **kwargs)
        batch = inputs.shape[0] if inputs is not None else kwargs["inputs_embeds"].shape[0]
        batch *= kwargs.get("num_return_sequences") or config.num_return_sequences or 1
        with self.inference_session(self._session_length(inputs, kwargs), batch):
            return self._generate_in(self._active.get(), inputs, *args, **kwargs)

    def _session_length(self, inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> int:
        """Tokens a one-call session must hold: the prompt plus everything it may generate, plus the
        drafts of transformers' prompt lookup, whose last check may run that far past the end."""
        source = inputs if inputs is not None else kwargs["inputs_embeds"]
        config = kwargs.get("generation_config") or self.generation_config
        drafts = kwargs.get("prompt_lookup_num_tokens") or config.prompt_lookup_num_tokens or 0
        new_tokens = kwargs.get("max_new_tokens") or config.max_new_tokens
        if new_tokens is not None:
            return source.shape[1] + new_tokens + drafts
        if kwargs.get("max_length") is not None:
            return max(kwargs["max_length"], source.shape[1] + 1) + drafts
        return source.shape[1] + (config.max_length or 20) + drafts  # a default max_length: that many new tokens

    def _generate_in(self, cache: RemoteCache, inputs: torch.Tensor | None, *args: Any, **kwargs: Any):
        """Run ``GenerationMixin.generate`` on the session's whole known sequence; strip what was added."""
        drop = cache.skip = 0
        if inputs is None:
            if cache.session.position > 0:
                raise NotImplementedError("continue a session with input_ids: inputs_embeds only start one")
        elif cache.session.position > 0:
            seen = cache.tokens
            if seen is not None and inputs.shape[1] >= seen.shape[1] and torch.equal(inputs[:, : seen.shape[1]], seen):
                cache.skip = seen.shape[1]  # the full sequence: send the suffix only
            else:  # only new ids: they follow the previous output, which also feeds the logits processors
                history = seen if seen is not None else inputs[:, :0]
                inputs = torch.cat([history, cache.pending, inputs], dim=1)
                cache.skip, drop = history.shape[1], history.shape[1] + cache.pending.shape[1]
            if inputs.shape[1] <= cache.skip:
                raise ValueError("input_ids hold no token the session has not processed yet")
        sent_before = cache.session.position
        greedy_eos = _plain_greedy_eos(self.generation_config, kwargs)
        greedy = self._greedy.set(greedy_eos)
        may_share = greedy_eos is not None and sent_before == 0 and cache.session.batch_size == 1
        try:
            with self.batcher.announce() if may_share else contextlib.nullcontext():  # (see ``_shared_or``)
                result = super().generate(inputs, *args, cache=cache, **kwargs)
        finally:
            self._greedy.reset(greedy)
        sequences = result.sequences if isinstance(result, ModelOutput) else result
        if inputs is not None:  # ids returned but never sent (the last generated token) come first next time
            cache.pending = sequences[:, cache.skip + cache.session.position - sent_before :]
        else:
            cache.pending = sequences[:, -1:]
        sequences = sequences[:, drop:]
        if isinstance(result, ModelOutput):
            result.sequences = sequences
            return result
        return sequences

    def _get_logits_processor(self, *args: Any, **kwargs: Any) -> LogitsProcessorList:
        """transformers' processors for the call, its minimum-length ones swapped for :class:`NoEosBefore`:
        the same scores, without a mask over the whole vocabulary built at every step (0.3 ms with 32k
        tokens, as much as a 4-layer step of the tiny models)."""
        processors = super()._get_logits_processor(*args, **kwargs)
        for i, processor in enumerate(processors):
            if type(processor) is MinNewTokensLengthLogitsProcessor:
                length = processor.prompt_length_to_skip + processor.min_new_tokens
            elif type(processor) is MinLengthLogitsProcessor:
                length = processor.min_length
            else:
                continue
            processors[i] = NoEosBefore(length, processor.eos_token_id.reshape(-1).tolist())
        return processors

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: RemoteCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Only what the nodes have not seen: the uncached suffix first, then one token per step."""
        inputs: dict[str, Any] = {"cache": cache, "logits_to_keep": kwargs.get("logits_to_keep", 0)}
        if is_first_iteration and inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        elif is_first_iteration or next_sequence_length is None:
            inputs["input_ids"] = input_ids[:, cache.skip if cache is not None else 0 :]
        else:
            inputs["input_ids"] = input_ids[:, -next_sequence_length:]
        return inputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: RemoteCache | None = None,
        past_key_values: RemoteCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for the given tokens: one step of the session if one is open (or ``cache`` is given),
        else a plain differentiable forward of the whole sequence through the remote layers."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padding (attention_mask with zeros) is not supported: the nodes mask causally")
        cache = cache if cache is not None else past_key_values if past_key_values is not None else self._active.get()
        if cache is not None and not isinstance(cache, RemoteCache):
            raise TypeError(f"expected the cache this model returned (a RemoteCache), got {type(cache).__name__}")
        if cache is None:
            hidden = self._kept(self.layers(self._embedded(input_ids, inputs_embeds)), logits_to_keep)
        else:
            hidden = self._session_hidden(cache, input_ids, inputs_embeds, logits_to_keep)
        greedy_eos = self._greedy.get()  # a plain greedy generate: quick logits where they make its choice
        logits = self._quick_logits(hidden, greedy_eos) if greedy_eos is not None and cache is not None else None
        if logits is None:
            logits = self.head.logits(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _embedded(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The first layer's input; Bloom normalises given embeddings too."""
        return self.head.embed(input_ids) if inputs_embeds is None else self.head.normalised(inputs_embeds)

    def _kept(self, hidden: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        """The last ``logits_to_keep`` positions (0: all; generate needs one) in the LM head's dtype."""
        return self.head.in_head_dtype(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

    def _session_hidden(
        self,
        cache: RemoteCache,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """One step of ``cache``'s session: the hidden states of its last ``logits_to_keep`` positions."""
        hidden = self._kept(cache.session.step(self._embedded(input_ids, inputs_embeds)), logits_to_keep)
        cache.record(input_ids)
        return hidden

    def _sample(
        self,
        input_ids: torch.Tensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        synced_gpus: bool = False,
        streamer: Any = None,
        **model_kwargs: Any,
    ) -> Any:
        """transformers' decoding loop; for a plain greedy call on one sequence (see the module's
        docstring), the same steps without what that call does not use. Each step is then the
        session's step and ``generate_ids``' choice of the token (from the head's quick logits where
        they make it, after the minimum length's EOS mask), with the maximum length and EOS checked
        in Python; the tokens, the streamer's calls and the output are transformers'. Each torch
        call hands over the GIL, and sessions generating from several threads pay for every
        hand-over: 17 calls per token here against 37 (the tiny Llama, 64 tokens; reads of a
        tensor's attributes not counted), and with 8 threads the client's CPU time per token fell
        from 0.9-1.07 to 0.6-0.8 ms. With a large head, choosing from its quick logits without
        making them whole (as ``generate_ids`` does) saves passes over the vocabulary: with 32k
        tokens the client's CPU per token fell from 2.48 to 2.34-2.44 ms one session at a time
        (``generate_ids``: 1.86-2.66, the machine drifting), and to 1.35-1.72 with 8 threads (from
        1.84). Such calls that start together share a session (``_shared_or``)."""
        cache = model_kwargs.get("cache")
        lean = (
            self._greedy.get() is not None
            and isinstance(cache, RemoteCache)
            and input_ids.shape[0] == 1
            and not (synced_gpus or generation_config.return_dict_in_generate)
            and not getattr(generation_config, "is_assistant", False)
            and getattr(generation_config, "prefill_chunk_size", None) is None
            and hasattr(self, "_prefill")  # transformers' own first step (5.x), which the loop reuses
            and model_kwargs.get("use_cache", True)
            and all(isinstance(p, NoEosBefore) for p in logits_processor)
        )
        if not lean:
            self.batcher.arrive()
            return super()._sample(
                input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer, **model_kwargs
            )
        stops, choose = _StopRules(stopping_criteria), TokenChooser.greedy_after(logits_processor)

        def alone(prompt: torch.Tensor = input_ids) -> Iterator[torch.Tensor]:
            """This call's tokens through its own session; each ``send`` gives it the ids so far. After the
            first, where the call stops only at its length or an EOS, in a token loop (see ``decode``)."""
            ids = yield choose(prompt, self._prefill(prompt, generation_config, model_kwargs).logits[:, -1])
            session, left = cache.session, min((c.max_length for c in stops.max_lengths), default=0) - ids.shape[1]
            loop = None if stops.others else loop_ask(choose, stops.eos, left, session.position + 1 - ids.shape[1])
            if loop is not None and session.loops(self.head.lm_head.weight.dtype):
                steps = looped_tokens(self.head, session, ids[:, -1:], loop, choose, lambda: ids)
                try:
                    for token in steps:
                        cache.record(ids[:, -1:])  # the input of the turn that chose it
                        ids = yield torch.tensor([token])
                finally:
                    steps.close()
                return
            while True:
                ids = yield next_token(self.head, choose, ids, self._session_hidden(cache, ids[:, -1:])[:, -1])

        embedded = model_kwargs.get("inputs_embeds") is not None  # (the ids of a shared session's rows are known)
        tokens = self._shared_or(alone, cache, input_ids, logits_processor, stops, embedded)
        try:
            token = next(tokens)
            while True:
                input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
                done = stops(input_ids, int(token))
                if streamer is not None:
                    streamer.put(token)
                if done:
                    break
                token = tokens.send(input_ids)
        finally:
            tokens.close()
            self.quick_logits += choose.certain_choices
        if cache.session.position == 0:  # a row of a shared session: these nodes never saw the tokens
            sent = input_ids[:, :-1]  # (the last token is returned, not sent, as a session's own generation does)
            cache.session.owe(self.head.embed(sent))
            cache.record(sent)
        if streamer is not None:
            streamer.end()
        return input_ids

    def _shared_or(
        self,
        alone: Callable[[], Iterator[torch.Tensor]],
        cache: RemoteCache,
        input_ids: torch.Tensor,
        processors: LogitsProcessorList,
        stops: "_StopRules",
        embedded: bool,
    ) -> Iterator[torch.Tensor]:
        """The tokens of a lean greedy call: from a session shared with the calls that start with it
        (``batched_generation``; as ``DistributedInferenceClient.generate_ids`` does), or ``alone()``.

        A call from token ids may share when its session has seen nothing yet and holds what it may
        generate; its tokens are then owed to that session (``InferenceSession.owe``), sent only if it
        goes on."""
        session = cache.session
        new_tokens = min((c.max_length for c in stops.max_lengths), default=0) - input_ids.shape[1]
        fits = input_ids.shape[1] + new_tokens - 1 <= session.max_length  # (else its own steps raise where due)
        if embedded or session.position > 0 or session.batch_size != 1 or new_tokens < 1 or not fits:
            self.batcher.arrive()
            return alone()
        key = (input_ids.shape[1], session.adapter, *((p.length, tuple(p.eos_token_ids)) for p in processors))

        def batch(rows: torch.Tensor, max_new_tokens: int) -> Iterator[torch.Tensor]:
            choose = TokenChooser.greedy_after(processors)
            length = rows.shape[1] + max_new_tokens
            with InferenceSession(self.mesh, 0, len(self.layers), length, rows.shape[0], session.adapter) as shared:
                try:
                    yield from decode(self.head, shared, rows, max_new_tokens, choose, _NO_EOS)
                finally:
                    self.quick_logits += choose.certain_choices

        return self.batcher.generate(input_ids, new_tokens, key, alone, batch)

    def _quick_logits(self, hidden: torch.Tensor, eos: list[int]) -> torch.Tensor | None:
        """Approximate logits of one position of one sequence, if greedy decoding picks from them what
        it would from the exact ones (see the module's docstring); else None."""
        approximate = self.head.approximate_logits(hidden) if hidden.shape[:2] == (1, 1) else None
        logits = None
        if approximate is not None:
            logits = greedy_certain_logits(approximate.logits, approximate.bound, eos, approximate.refine)
        if logits is not None:
            self.quick_logits += 1
        return logits


_NO_EOS = torch.zeros(0, dtype=torch.long)  # a shared session's rows end where their callers stop reading


class _StopRules:
    """A ``StoppingCriteriaList``'s verdict on one sequence, its maximum lengths and EOS ids checked in
    Python (transformers builds a tensor for each on every step); other criteria are called."""

    def __init__(self, criteria: StoppingCriteriaList):
        self.max_lengths: list[MaxLengthCriteria] = []
        self.eos: set[int] = set()
        self.others = StoppingCriteriaList()
        for criterion in criteria:
            max_length, eos = getattr(criterion, "max_length", None), getattr(criterion, "eos_token_id", None)
            if type(criterion) is MaxLengthCriteria and isinstance(max_length, int):
                self.max_lengths.append(criterion)
            elif type(criterion) is EosTokenCriteria and isinstance(eos, torch.Tensor):
                self.eos.update(eos.reshape(-1).tolist())
            else:  # any other, or one whose fields are not what this reads: called as transformers calls it
                self.others.append(criterion)

    def __call__(self, input_ids: torch.Tensor, token: int) -> bool:
        length = input_ids.shape[1]
        for criterion in self.max_lengths:
            if length >= criterion.max_length:
                return True
            longest = getattr(criterion, "max_position_embeddings", None)
            if longest is not None and length > longest:
                criterion(input_ids, None)  # its warning that the model's length is exceeded
        return token in self.eos or bool(self.others and self.others(input_ids, None).any())


# GenerationConfig fields that leave greedy decoding's scores alone (or matter only when sampling,
# or for beams), so a call that sets no others may take quick logits.
_SCORE_NEUTRAL = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "max_time", "stop_strings",
    "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache",
    "temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff", "top_h",
    "early_stopping", "length_penalty", "return_dict_in_generate", "output_attentions",
    "output_hidden_states", "transformers_version", "cache_implementation", "cache_config",
    "compile_config", "disable_compile",
}  # fmt: skip
# generate() arguments besides the config's fields that change no scores
_ARGS_NEUTRAL = {"generation_config", "streamer", "stopping_criteria", "synced_gpus", "tokenizer", "inputs_embeds"}


def _plain_greedy_eos(defaults: GenerationConfig, kwargs: dict[str, Any]) -> list[int] | None:
    """The EOS ids of a ``generate`` call that decodes greedily with no logits processor but a minimum
    length's (which masks EOS), one sequence at a time; None for any other call."""
    config = copy.deepcopy(kwargs.get("generation_config") or defaults)
    unused = set()
    for key, value in kwargs.items():  # as GenerationConfig.update, without its validation's warnings
        if key != "generation_config" and hasattr(config, key):
            setattr(config, key, value)
        else:
            unused.add(key)
    if unused - _ARGS_NEUTRAL or config.do_sample or (config.num_beams or 1) != 1:
        return None
    if (config.num_return_sequences or 1) != 1:
        return None
    plain = GenerationConfig()
    for source in (config, defaults):  # transformers may fill a given config's unset fields from the model's
        changed = {k for k, v in vars(source).items() if not k.startswith("_") and getattr(plain, k, None) != v}
        if changed - _SCORE_NEUTRAL - {"do_sample", "num_beams", "num_return_sequences"}:
            return None
    eos = set()
    for ids in (config.eos_token_id, defaults.eos_token_id):  # all that either may mask
        eos.update([] if ids is None else [ids] if isinstance(ids, int) else ids)
    return sorted(eos)
