"""Token loops: the node that runs a session's last layers chooses each next token and pushes its
embedding to the first node of the chain, so that a greedy generation goes round the nodes without
waiting for the client at every token (``wire.TokenLoop``).

The client asks for it on a step; the request travels with the pushes of that step to this node.
Each turn the node chooses the token from its output as the client would (the checkpoint's own head,
in the checkpoint's dtype: the same logits, and the first of their best), answers the
client with it, and pushes the token's embedding to the first node of the ring with the loop's next
turn, which comes back to this node through the chain. Every node still answers the client, which
keeps each node's inputs as before: when a node fails, the client replaces it and replays them.

A turn saves the client's part of a token (its final norm, LM head, choice, the next embedding and
sending it) and the hand-off through the client: on one machine the client waking; across
machines, a round trip to it.
"""

from dataclasses import dataclass

import torch
from torch import nn

from farmesh_core.architecture import ClientHead
from farmesh_core.client.generation import NoEosBefore, TokenChooser, next_token, settled
from farmesh_core.module_hooks import has_forward_hooks, has_global_forward_hooks
from farmesh_core.wire import PushTarget, TokenLoop, WireTensor, wire_tensor


@dataclass
class TurnAsk:
    """A one-token step's token-loop turn, handed to the decode batcher with the step so that the turns
    of a batch's sessions take one pass through the head (``NodeHead.choose_rows``): the session's
    length after the step, its loop, and the token where the batch chose it."""

    length: int
    loop: TokenLoop
    token: int | None = None


class NodeHead:
    """The embeddings, final norm and LM head of the model, as a client loads them, on the node that
    serves the model's last layer.

    A turn is on the chain's critical path, right after the layers' step has pushed the head's code
    and weights out of the caches: a plain embedding is read there as its weight's row, one torch
    call instead of the module's (25 against 65 us cold, baseline model)."""

    def __init__(self, head: ClientHead, num_layers: int):
        self.head, self.num_layers = head, num_layers
        self.dtype = head.lm_head.weight.dtype
        embeddings = head.embeddings
        plain = type(embeddings) is nn.Embedding and embeddings.max_norm is None
        self._rows = embeddings.weight if plain and not has_forward_hooks(embeddings) else None
        self._greedy = TokenChooser()  # (holds no state a choice depends on: one for every unmasked turn)
        self._no_ids = torch.empty(1, 0, dtype=torch.long)

    @torch.inference_mode()
    def choose(self, hidden: torch.Tensor, length: int, loop: TokenLoop) -> int:
        """The greedy token after ``hidden`` [1, seq, hidden] (the output of the session's last layer), the
        session then holding ``length`` tokens, after ``NoEosBefore``'s mask: the client's own choice
        (``next_token``), from a large head's quick approximate logits where their error bound cannot
        change it, else from the exact logits. A 32k-vocabulary head's exact pass made a token loop
        slower than the client choosing (4.79 against 4.15 ms a token); with the quick logits, 3.80
        against 4.27."""
        chooser, ids = self._chooser(length, loop)
        return int(next_token(self.head, chooser, ids, self.head.in_head_dtype(hidden[:, -1]))[0])

    @torch.inference_mode()
    def choose_rows(self, outputs: list[torch.Tensor], asks: list[TurnAsk]) -> None:
        """The tokens of several sessions' turns (``ask.token``) after their steps' ``outputs`` [1, 1,
        hidden], as :meth:`choose` would choose each: one pass through a large head's quick logits for
        all of them, each row then settled alone (near ties scored again, else its exact logits). The
        quick logits of 8 rows of a 32k-vocabulary head took 1.4 ms, of one 0.41. Where the head has
        no quick logits, or there is one turn, the tokens are left to :meth:`choose`, turn by turn."""
        lasts = self.head.in_head_dtype(torch.cat([output[:, -1] for output in outputs]))
        rows = self.head.approximate_rows(lasts) if len(asks) > 1 else None
        if rows is None:
            return
        for i, (approximate, ask) in enumerate(zip(rows, asks, strict=True)):
            chooser, ids = self._chooser(ask.length, ask.loop)
            ask.token = int(settled(self.head, chooser, ids, approximate, lasts[i : i + 1])[0])

    def _chooser(self, length: int, loop: TokenLoop) -> tuple[TokenChooser, torch.Tensor]:
        """The loop's chooser for a session holding ``length`` tokens (greedy, after ``NoEosBefore``'s
        mask while it applies), and the ids it is given."""
        if loop.masked_ids and length < loop.masked_until:
            chooser = TokenChooser.greedy_after([NoEosBefore(loop.masked_until, loop.masked_ids)])
            return chooser, torch.empty(1, length, dtype=torch.long)  # NoEosBefore reads only their number
        return self._greedy, self._no_ids

    @torch.inference_mode()
    def embedding(self, token: int) -> WireTensor:
        """The first layer's input for ``token``, as the client sends it."""
        if self._rows is None or has_global_forward_hooks():
            return wire_tensor(self.head.embed(torch.tensor([[token]])))
        return wire_tensor(self.head.normalised(self._rows[token].view(1, 1, -1)))


def next_turn(loop: TokenLoop, token: int, length: int, max_length: int) -> TokenLoop | None:
    """The loop's next turn after choosing ``token`` with ``length`` tokens in the session (the ring's
    step numbers one further), or None where it ends: the last token asked for, an EOS, or a full session."""
    if loop.tokens <= 1 or token in loop.eos_token_ids or length >= max_length:
        return None
    ring = [PushTarget(peer_id=t.peer_id, session_id=t.session_id, key=t.key, step=t.step + 1) for t in loop.ring]
    return loop.model_copy(update={"ring": ring, "tokens": loop.tokens - 1})
