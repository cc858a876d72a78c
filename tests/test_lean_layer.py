"""Lean layers (farmesh_core/lean_layer.py): the node's inference steps through unmodified Llama layers,
as plain torch calls, give bit for bit what the transformers modules give, in every kind of step a
node runs (prefill, a chunk after a prefix, one-token steps, a batch of sequences' prefill, a forward
without cache; batched one-token rows round as a batched matmul does), for multi-head and grouped-query attention,
and equal transformers' own model. Layers that are not stock Llama layers (int8-quantized, LoRA,
hooked, Mistral's sliding window) keep the module path and stay correct."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.cli import build_parser
from farmesh_core.config import NodeConfig
from farmesh_core.lean_layer import LeanLlamaLayer, lean_llama_layer
from farmesh_core.node.kv_cache import SessionCache
from farmesh_core.node.layer_span import LayerSpan
from farmesh_core.row_matmul import (
    blocks_linear,
    few_rows_linear,
    matmuls_on_one_thread,
    row_blocks,
    stacked_linear,
)
from farmesh_plugins.quantization import int8_quantization
from tests.helpers import (
    HIDDEN_SIZE,
    NUM_LAYERS,
    PROMPT,
    cpu_has_bf16_dot_products,
    hf_greedy_ids,
    hf_hidden_states,
    hf_model,
    op_counts,
    prompt_ids,
    randn,
)

STEPS = 20


def load_span(
    model_dir: str,
    prepare_layer=None,
    lean_layers: bool = True,
    one_row_threads: int = 1,
    pack: bool | None = False,
    exact: bool | None = None,
) -> LayerSpan:
    checkpoint = Checkpoint(model_dir)
    adapter = adapter_for(checkpoint.config)
    return LayerSpan(
        checkpoint, adapter, 0, NUM_LAYERS, torch.float32, "cpu", prepare_layer,
        lean_layers=lean_layers, one_row_threads=one_row_threads, pack_batch_weights=pack, exact_batches=exact,
    )  # fmt: skip


def assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected), f"max difference {(actual - expected).abs().max().item()}"


def steps_on_one_thread(pair, seed: int, dtype: torch.dtype = torch.float32) -> Callable[[], torch.Tensor]:
    """A 9-token prompt then STEPS one-token steps through both spans of ``pair`` on one torch thread (as
    a node's event loop runs them), every output bit-identical between them; returns a call of one
    more step through the first span (for ``op_counts``). The caller restores the thread count."""
    torch.set_num_threads(1)
    caches = [SessionCache(64), SessionCache(64)]
    hidden = randn(1, 9, HIDDEN_SIZE, seed=seed).to(dtype)
    for position in [0, *range(9, 9 + STEPS)]:
        outs = [span.forward(hidden, 0, NUM_LAYERS, cache, position) for span, cache in zip(pair, caches, strict=True)]
        assert_equal(*outs)
        hidden = outs[0][:, -1:]
        assert torch.get_num_threads() == 1
    return lambda: pair[0].forward(hidden, 0, NUM_LAYERS, caches[0], 9 + STEPS)


@torch.inference_mode()
def greedy(span: LayerSpan, model_dir: str, input_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding as a node serves it: the prompt, then one-token steps against a SessionCache."""
    checkpoint = Checkpoint(model_dir)
    head = span.adapter.load_client_head(checkpoint, checkpoint.config, torch.float32)
    cache, tokens, step_input = SessionCache(input_ids.shape[1] + new_tokens), [], input_ids
    for _ in range(new_tokens):
        hidden = span.forward(head.embed(step_input), 0, NUM_LAYERS, cache, cache.length)
        tokens.append(int(head.logits(hidden[:, -1]).argmax(-1)))
        step_input = torch.tensor([[tokens[-1]]])
    return tokens


@pytest.fixture(scope="module", params=["mha", "gqa"])
def model_dir(request):
    return request.getfixturevalue({"mha": "tiny_llama", "gqa": "gqa_llama"}[request.param])


@pytest.fixture(scope="module")
def spans(model_dir) -> tuple[LayerSpan, LayerSpan]:
    """The same layers twice: with lean layers (the default) and through the transformers modules."""
    return load_span(model_dir), load_span(model_dir, lean_layers=False)


# ---- bit-identical to the transformers modules, step by step -------------------------------------
def test_every_llama_layer_runs_lean_unless_turned_off(spans):
    lean, modules = spans
    assert lean.lean_count == NUM_LAYERS
    assert all(isinstance(call, LeanLlamaLayer) for call in lean.step_calls.values())
    assert modules.lean_count == 0


def test_prefill_then_chunk_then_decode_steps(spans):
    """A 7-token prefill from position 0 (SDPA's causal path), a 5-token chunk after it (explicit mask),
    then 20 one-token steps: every output is identical (each step reads the keys and values cached by
    the steps before it)."""
    caches = [SessionCache(64), SessionCache(64)]

    def step(hidden: torch.Tensor, position: int) -> torch.Tensor:
        lean, modules = (
            span.forward(hidden, 0, NUM_LAYERS, cache, position) for span, cache in zip(spans, caches, strict=True)
        )
        assert_equal(lean, modules)
        return lean

    step(randn(1, 7, HIDDEN_SIZE, seed=0), 0)
    step(randn(1, 5, HIDDEN_SIZE, seed=1), 7)
    hidden = randn(1, 1, HIDDEN_SIZE, seed=2)
    for position in range(12, 12 + STEPS):
        hidden = step(hidden, position)
    assert caches[0].length == caches[1].length == 12 + STEPS


def test_a_batch_of_sequences(spans, model_dir):
    """Two sequences in one session (batch 2, a shared session's rows). By default: a prefill bit for
    bit the modules' batch's, then one-token steps that multiply as a decode batch does and so round
    differently from the modules' batched ``F.linear``. With ``exact_batches=True``: each row gets, bit
    for bit, what the modules give it alone (its prompt row by row, its one-token steps as a decode
    batch of the rows)."""
    lean, modules = spans
    assert lean.exact_batches and not lean.exact_rows
    caches = [SessionCache(32), SessionCache(32)]
    hidden, position = randn(2, 6, HIDDEN_SIZE, seed=3), 0
    for step in range(6):
        batch = (span.forward(hidden, 0, NUM_LAYERS, c, position) for span, c in zip(spans, caches, strict=True))
        if step == 0:
            assert_equal(*batch)
        else:
            torch.testing.assert_close(*batch, atol=1e-4, rtol=1e-4)
        hidden, position = randn(2, 1, HIDDEN_SIZE, seed=10 + step), position + hidden.shape[1]
    lean = load_span(model_dir, exact=True)
    assert lean.exact_rows
    cache, alone = SessionCache(32), [SessionCache(32), SessionCache(32)]
    hidden, position = randn(2, 6, HIDDEN_SIZE, seed=3), 0
    for _ in range(6):
        rows = lean.forward(hidden, 0, NUM_LAYERS, cache, position)
        expected = torch.cat(
            [modules.forward(row, 0, NUM_LAYERS, c, position) for row, c in zip(hidden.split(1), alone, strict=True)]
        )
        assert_equal(rows, expected)
        hidden, position = expected[:, -1:], position + hidden.shape[1]


def test_batched_decoding_of_sessions_at_different_positions(spans):
    """``forward_decode_batch`` of three sessions with 3, 8 and 5 cached tokens, for several steps, gives
    each session what it gets stepping alone, lean or not. Not bit for bit: a batched matmul rounds
    differently from a one-row one (lean rows attend to their own cache; the module path pads and masks)."""
    lengths = [3, 8, 5]
    lean_span = spans[0]
    lone_caches = [SessionCache(32) for _ in lengths]
    caches = {span: [SessionCache(32) for _ in lengths] for span in spans}
    for i, length in enumerate(lengths):
        prompt = randn(1, length, HIDDEN_SIZE, seed=10 + i)
        for cache in [lone_caches[i], *(caches[span][i] for span in spans)]:
            lean_span.forward(prompt, 0, NUM_LAYERS, cache, 0)
    hiddens = [randn(1, 1, HIDDEN_SIZE, seed=20 + i) for i in range(len(lengths))]
    for step in range(4):
        positions = [length + step for length in lengths]
        alone = [
            lean_span.forward(h, 0, NUM_LAYERS, c, p) for h, c, p in zip(hiddens, lone_caches, positions, strict=True)
        ]
        for span in spans:
            batched = span.forward_decode_batch(hiddens, 0, NUM_LAYERS, caches[span], positions)
            for a, b in zip(batched, alone, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        hiddens = alone


@pytest.mark.parametrize("sessions", [2, 8, 9])
def test_batched_decoding_with_either_multiplication(spans, sessions):
    """Batches up to ``few_rows`` (8 at hidden size 256) multiply as W @ x^T, larger ones with F.linear:
    either way each row is what the session gets alone (to rounding)."""
    lean_span = spans[0]
    assert lean_span.step_calls[0].few_rows == 8
    lone, batched = [SessionCache(16) for _ in range(sessions)], [SessionCache(16) for _ in range(sessions)]
    for i in range(sessions):
        prompt = randn(1, 2 + i % 3, HIDDEN_SIZE, seed=30 + i)
        for cache in (lone[i], batched[i]):
            lean_span.forward(prompt, 0, NUM_LAYERS, cache, 0)
    hiddens = [randn(1, 1, HIDDEN_SIZE, seed=50 + i) for i in range(sessions)]
    positions = [cache.length for cache in lone]
    alone = [lean_span.forward(h, 0, NUM_LAYERS, c, p) for h, c, p in zip(hiddens, lone, positions, strict=True)]
    for a, b in zip(lean_span.forward_decode_batch(hiddens, 0, NUM_LAYERS, batched, positions), alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sessions", [2, 8, 9])
def test_batched_decoding_through_packed_weights(spans, model_dir, sessions):
    """With packed copies of the weights (``pack_batch_weights``), a decode batch's matmuls all go
    through oneDNN on them (q, k, v and gate, up as one call each through their packed stacks), each
    row is what the session gets alone (to rounding), and lone steps keep the modules' bits."""
    packed, modules = load_span(model_dir, pack=True, exact=False), spans[1]
    weights = sum(w.nbytes for call in packed.step_calls.values() for w in call.weights)
    assert packed.packed_bytes == weights and spans[0].packed_bytes == 0
    lone, batched = [SessionCache(16) for _ in range(sessions)], [SessionCache(16) for _ in range(sessions)]
    for i in range(sessions):
        prompt = randn(1, 2 + i % 3, HIDDEN_SIZE, seed=30 + i)
        for cache in lone[i], batched[i]:
            packed.forward(prompt, 0, NUM_LAYERS, cache, 0)
    hiddens = [randn(1, 1, HIDDEN_SIZE, seed=50 + i) for i in range(sessions)]
    positions = [cache.length for cache in lone]
    alone = [packed.forward(h, 0, NUM_LAYERS, c, p) for h, c, p in zip(hiddens, lone, positions, strict=True)]
    outputs = []
    ops = op_counts(lambda: outputs.extend(packed.forward_decode_batch(hiddens, 0, NUM_LAYERS, batched, positions)))
    assert all(call.qkv is not None and call.gate_up is not None for call in packed.step_calls.values())
    assert ops.get("mkldnn::_linear_pointwise") == 4 * NUM_LAYERS
    assert not {"aten::mm", "aten::addmm", "aten::bmm"} & ops.keys()
    for a, b in zip(outputs, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    caches = [SessionCache(16), SessionCache(16)]
    prompt, step = randn(1, 3, HIDDEN_SIZE, seed=1), randn(1, 1, HIDDEN_SIZE, seed=2)
    for span, cache in zip((packed, modules), caches, strict=True):
        span.forward(prompt, 0, NUM_LAYERS, cache, 0)
    assert_equal(*(span.forward(step, 0, NUM_LAYERS, c, 3) for span, c in zip((packed, modules), caches, strict=True)))


def test_weights_are_packed_by_default_only_where_memory_leaves_room(tiny_llama, monkeypatch):
    """``pack_batch_weights=None`` (a node's default) packs when the copies leave at least as much
    memory available as they take (the tiny model's few MB, here), and not when they would not; exact
    batches (which do not use the copies) never pack."""
    from farmesh_core.node import layer_span

    roomy = load_span(tiny_llama, pack=None, exact=False)
    weights = sum(w.nbytes for call in roomy.step_calls.values() for w in call.weights)
    assert layer_span._available_memory() >= 2 * weights and roomy.packed_bytes == weights
    monkeypatch.setattr(layer_span, "_available_memory", lambda: 2 * weights - 1)
    assert load_span(tiny_llama, pack=None, exact=False).packed_bytes == 0
    monkeypatch.setattr(layer_span, "_available_memory", lambda: None)  # a system that does not say
    assert load_span(tiny_llama, pack=None, exact=False).packed_bytes == 0
    assert load_span(tiny_llama, pack=True, exact=False).packed_bytes == weights
    assert load_span(tiny_llama, pack=True, exact=True).packed_bytes == 0


def test_decode_batches_keep_each_rows_lone_bits_where_the_weights_fit_the_cache(tiny_llama, monkeypatch):
    """By default a decode batch's rows get exactly their lone steps' bits where the layers' weights fit
    the last-level cache (each matmul a batched GEMV, the SiLU row by row): at a float32 near tie a
    batched GEMM's rounding gave another token. 8 sessions at different positions, 5 steps. Where the
    weights do not fit the cache (here: a 1 MB cache), batches multiply the faster way, to rounding."""
    from farmesh_core.node import layer_span

    def batch_and_alone(span: LayerSpan) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lengths = [3, 8, 5, 7, 9, 11, 4, 6]
        lone, batched = [SessionCache(32) for _ in lengths], [SessionCache(32) for _ in lengths]
        for i, length in enumerate(lengths):
            for cache in lone[i], batched[i]:
                span.forward(randn(1, length, HIDDEN_SIZE, seed=60 + i), 0, NUM_LAYERS, cache, 0)
        hiddens, pairs = [randn(1, 1, HIDDEN_SIZE, seed=70 + i) for i in range(len(lengths))], []
        for step in range(5):
            positions = [length + step for length in lengths]
            alone = [span.forward(h, 0, NUM_LAYERS, c, p) for h, c, p in zip(hiddens, lone, positions, strict=True)]
            pairs += zip(span.forward_decode_batch(hiddens, 0, NUM_LAYERS, batched, positions), alone, strict=True)
            hiddens = alone
        return pairs

    exact = load_span(tiny_llama)
    assert exact.exact_batches and exact.packed_bytes == 0
    for batch_row, alone in batch_and_alone(exact):
        assert_equal(batch_row, alone)
    monkeypatch.setattr(layer_span, "last_level_cache_bytes", lambda: 2**20)
    quick = load_span(tiny_llama, pack=True)
    assert not quick.exact_batches and quick.packed_bytes > 0
    pairs = batch_and_alone(quick)
    for batch_row, alone in pairs:
        torch.testing.assert_close(batch_row, alone, rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(batch_row, alone) for batch_row, alone in pairs)  # (what exact batches avoid)


def test_few_rows_linear_is_a_contiguous_linear():
    """Contiguous like F.linear's output: SDPA picks its kernel by the query's strides."""
    weight, x = randn(688, 256, seed=1), randn(3, 1, 256, seed=2)
    out = few_rows_linear(x, weight)
    assert out.shape == (3, 1, 688) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_one_token_steps_split_over_threads(spans, model_dir):
    """With 2 threads for one-token steps, their matmuls run as ``bmm`` over blocks of rows wherever
    that gives F.linear's bits (checked here independently, per weight), q, k, v and gate, up each
    stacked into one such matmul (their blocks checked here against each weight's F.linear), and
    every step stays bit-identical to the modules, on a thread that runs the rest on one torch thread
    as the node's event loop does."""
    split, modules = load_span(model_dir, one_row_threads=2), spans[1]
    torch.set_num_threads(2)
    for call in split.step_calls.values():
        assert call.qkv is not None and call.gate_up is not None
        for weights, stack in [((call.q, call.k, call.v), call.qkv), ((call.gate, call.up), call.gate_up)]:
            assert stack.blocks is not None and stack.sizes == [w.shape[0] for w in weights]
            x = randn(1, 1, weights[0].shape[1], seed=sum(stack.sizes))
            assert_equal(blocks_linear(x, stack.blocks), torch.cat([F.linear(x, w) for w in weights], dim=-1))
        for weight in (call.o, call.down):
            blocks = weight.view(2, weight.shape[0] // 2, weight.shape[1]).transpose(1, 2)
            x = randn(1, 1, weight.shape[1], seed=weight.shape[0])
            identical = torch.equal(blocks_linear(x, blocks), F.linear(x, weight))
            assert (id(weight) in call.row_blocks) == identical
    threads = torch.get_num_threads()
    try:
        steps_on_one_thread((split, modules), seed=5)
    finally:
        torch.set_num_threads(threads)


def test_unsplit_one_token_steps_of_split_layers_still_go_through_the_stacks(spans, model_dir):
    """A node that keeps a lone step's matmuls on its thread (``matmuls_on_one_thread``: after a long
    idle stretch, or busy with several sessions) still multiplies q, k, v and gate, up as one
    ``F.linear`` each where that keeps their bits (checked at load), bit-identical to the modules."""
    split, modules = load_span(model_dir, one_row_threads=2), spans[1]
    assert all(call.qkv.plain and call.gate_up.plain for call in split.step_calls.values())
    threads = torch.get_num_threads()
    try:
        with matmuls_on_one_thread():
            ops = op_counts(steps_on_one_thread((split, modules), seed=7))
        assert ops.get("aten::linear") == 4 * NUM_LAYERS and "aten::bmm" not in ops
    finally:
        torch.set_num_threads(threads)


def test_stacked_weights_keep_their_memory_alignment():
    """A weight's F.linear bits hang on where its memory starts within a cache line (a checkpoint's
    memory-mapped weights need not start on one): stacked, each weight is a view of its rows at the same
    offset, with its values, and its bits are those it had. Weights at different offsets stay apart."""
    raw = randn(3 * 256 * 256 + 6, seed=7)
    weights = [nn_weight(raw[6 + i * 256 * 256 : 6 + (i + 1) * 256 * 256].view(256, 256)) for i in range(3)]
    x = randn(1, 1, 256, seed=8)
    before = [(w.data_ptr() % 64, w.detach().clone(), F.linear(x, w)) for w in weights]
    stacked = stacked_linear(tuple(weights), 2)
    assert stacked is not None and stacked.sizes == [256, 256, 256]
    for weight, (offset, values, out) in zip(weights, before, strict=True):
        assert weight.data_ptr() % 64 == offset == 24 and weight.data_ptr() != raw.data_ptr() + 24
        assert_equal(weight, values)
        assert_equal(F.linear(x, weight), out)
    apart = [nn_weight(randn(256, 256, seed=9)), nn_weight(raw[7 : 7 + 256 * 256].view(256, 256))]
    assert stacked_linear(tuple(apart), 2) is None


def test_stacked_layers_let_the_checkpoint_map_go(model_dir):
    """Once a lean layer stacked its weights, none of its weights (norms included) lies in the
    checkpoint's memory-mapped file: the map, with the pages the copy read, can go. Each keeps its
    values and the alignment it had there."""
    span = load_span(model_dir, one_row_threads=2)
    checkpoint = Checkpoint(model_dir)

    def mapped_file(address: int) -> str:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    return fields[5] if len(fields) > 5 else ""
        return ""

    for index, call in span.step_calls.items():
        assert call.qkv is not None
        prefix = f"model.layers.{index}."
        names = checkpoint.names_with_prefix(prefix)
        loaded = checkpoint.load_tensors(names)
        mine = dict(span.layers[index].named_parameters())
        for name, tensor in loaded.items():
            weight = mine[name[len(prefix) :]]
            assert mapped_file(tensor.data_ptr()).endswith(".safetensors")  # (the check sees the map)
            assert not mapped_file(weight.data_ptr()).endswith(".safetensors"), name
            assert weight.data_ptr() % 64 == tensor.data_ptr() % 64
            assert_equal(weight, tensor)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_token_steps_through_one_stacked_call_on_one_thread(model_dir, dtype, pack):
    """16-bit layers (whose matmuls do not split), and float32 ones on one thread, stack q, k, v and
    gate, up into one ``F.linear`` each where that keeps their bits: one-token steps stay bit-identical
    to the modules', with 4 ``F.linear`` calls a layer instead of 7. With packed copies for decode
    batches, bfloat16 lone rows go through those (oneDNN on the packed stacks, o and down), with the
    same bits; float32 ones keep ``F.linear`` (the packed copies give other bits)."""
    checkpoint = Checkpoint(model_dir)
    adapter = adapter_for(checkpoint.config)
    threads = 2 if dtype != torch.float32 else 1
    spans = [
        LayerSpan(
            checkpoint,
            adapter,
            0,
            NUM_LAYERS,
            dtype,
            "cpu",
            one_row_threads=threads,
            lean_layers=lean,
            pack_batch_weights=pack and lean,
        )  # fmt: skip
        for lean in (True, False)
    ]
    # (the packed copies each keep F.linear's bits on such a CPU; elsewhere the check at load decides)
    through_packed = sum(
        call.qkv.lone_packed + call.gate_up.lone_packed + len(call.lone_packed) for call in spans[0].step_calls.values()
    )
    if pack and dtype == torch.bfloat16 and cpu_has_bf16_dot_products():
        assert through_packed == 4 * NUM_LAYERS
    assert through_packed == 0 or (pack and dtype == torch.bfloat16)
    for call in spans[0].step_calls.values():
        assert call.qkv is not None and call.qkv.blocks is None and call.gate_up is not None
    before = torch.get_num_threads()
    try:
        ops = op_counts(steps_on_one_thread(spans, seed=6, dtype=dtype))
        assert ops.get("mkldnn::_linear_pointwise", 0) == through_packed
        assert ops.get("aten::linear", 0) == 4 * NUM_LAYERS - through_packed
    finally:
        torch.set_num_threads(before)


def nn_weight(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor, requires_grad=False)


def test_row_blocks_only_for_weights_they_split_evenly():
    assert row_blocks(randn(687, 256, seed=1), 2) is None
    assert row_blocks(randn(688, 256, seed=1), 1) is None
    assert row_blocks(randn(688, 256, seed=1).t(), 2) is None  # not contiguous


def test_forward_without_cache_and_a_sub_range(spans):
    """A forward of a batch with no cache (the forward RPC), through all layers and through 2:5."""
    hidden = randn(2, 16, HIDDEN_SIZE, seed=4)
    for start, end in [(0, NUM_LAYERS), (2, 5)]:
        lean, modules = (span.forward(hidden, start, end) for span in spans)
        assert_equal(lean, modules)


# ---- equal to transformers' own model ------------------------------------------------------------
def test_forward_equals_transformers_model(spans, model_dir):
    """The lean span's forward is transformers' ``LlamaModel`` layer by layer, bit for bit (its last
    hidden state is after the final norm: layers 0:7 are compared)."""
    states = hf_hidden_states(model_dir)
    lean, _ = spans
    for start, end in [(0, 4), (4, NUM_LAYERS - 1)]:
        assert_equal(lean.forward(states[start], start, end), states[end])


def test_greedy_generation_equals_transformers(spans, model_dir):
    """64 greedy tokens stepped through the lean span are transformers' ``generate``, token for token."""
    lean, _ = spans
    assert greedy(lean, model_dir, prompt_ids(model_dir), 64) == list(hf_greedy_ids(model_dir, PROMPT, 64))


# ---- layers that keep the module path ------------------------------------------------------------
def test_int8_layers_keep_the_module_path(tiny_llama):
    config = NodeConfig(model_id=tiny_llama, quantization="int8")
    span = load_span(tiny_llama, lambda layer, index: int8_quantization(layer, config), pack=True)
    assert span.lean_count == 0 and span.packed_bytes == 0  # int8 weights have no packed copies
    hidden = randn(1, 4, HIDDEN_SIZE, seed=5)
    assert torch.isfinite(span.forward(hidden, 0, NUM_LAYERS, SessionCache(8), 0)).all()


def test_hooked_or_training_layers_are_not_eligible(tiny_llama):
    span = load_span(tiny_llama, lean_layers=False)
    layer = span.layers[0]
    assert lean_llama_layer(layer) is not None
    handle = layer.mlp.register_forward_hook(lambda module, args, out: out)
    assert lean_llama_layer(layer) is None
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)  # every module's
    try:
        assert lean_llama_layer(layer) is None
    finally:
        handle.remove()
    assert lean_llama_layer(layer) is not None
    layer.train()
    assert lean_llama_layer(layer) is None
    layer.eval()


def test_a_global_hook_registered_after_load_sees_every_layers_call(tiny_llama):
    """Lean layers check hooks at load; hooks for every module registered later (by any code, at any
    time) still see each layer's call, of a lone step and of a decode batch, until they are removed."""
    span = load_span(tiny_llama)
    assert span.lean_count == NUM_LAYERS
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(module) if module in span.layers.values() else None
    )
    try:
        caches = [SessionCache(8) for _ in range(2)]
        for cache in caches:
            span.forward(randn(1, 1, HIDDEN_SIZE, seed=7), 0, NUM_LAYERS, cache, 0)
        assert seen == 2 * list(span.layers.values())
        seen.clear()
        steps = [randn(1, 1, HIDDEN_SIZE, seed=8 + i) for i in range(2)]
        assert span.forward_decode_batch(steps, 0, NUM_LAYERS, caches, [1, 1]) is not None
        assert seen == list(span.layers.values())
    finally:
        handle.remove()
    seen.clear()
    span.forward(randn(1, 1, HIDDEN_SIZE, seed=9), 0, NUM_LAYERS, SessionCache(8), 0)
    assert seen == []


def test_lora_layers_keep_the_module_path(tiny_llama, tmp_path):
    """Layers with LoRA adapters (farmesh-lora) switch adapters per request: they run as modules; with
    no adapter active they give what the lean base layers give."""
    from farmesh_lora import farmesh_prepare_layer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(base_model, lora)
    adapter_dir = str(tmp_path / "lora")
    peft_model.save_pretrained(adapter_dir)
    config = NodeConfig(model_id=tiny_llama, adapters=[adapter_dir])
    span = load_span(tiny_llama, lambda layer, index: farmesh_prepare_layer(layer=layer, index=index, config=config))
    assert span.switchable and span.lean_count == 0
    hidden = randn(1, 5, HIDDEN_SIZE, seed=6)
    base = load_span(tiny_llama).forward(hidden, 0, NUM_LAYERS)
    assert_equal(span.forward(hidden, 0, NUM_LAYERS), base)
    assert not torch.equal(span.forward(hidden, 0, NUM_LAYERS, adapter_name="lora"), base)


def test_mistral_sliding_window_keeps_the_module_path(tmp_path):
    """Mistral's adapter builds its own masks (sliding window): no lean layers, and past the window
    its greedy tokens are still transformers'."""
    model_dir = make_checkpoint(str(tmp_path / "mistral"), "mistral", num_hidden_layers=NUM_LAYERS, sliding_window=12)
    span = load_span(model_dir)
    assert span.lean_count == 0
    prompt = torch.randint(3, 1024, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf_model(model_dir).generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert greedy(span, model_dir, prompt, 16) == out[0, prompt.shape[1] :].tolist()


def test_node_option_turns_lean_layers_off():
    """``farmesh node --no-lean-layers`` (NodeConfig.lean_layers=False) is the way back to the modules."""
    args = ["node", "MODEL", "--dht-bootstrap", "/ip4/127.0.0.1/tcp/1"]
    assert build_parser().parse_args(args).lean_layers is True
    assert build_parser().parse_args([*args, "--no-lean-layers"]).lean_layers is False
    assert NodeConfig(model_id="MODEL").lean_layers is True


def test_node_option_packs_batch_weights_where_memory_allows_unless_told():
    args = ["node", "MODEL", "--dht-bootstrap", "/ip4/127.0.0.1/tcp/1"]
    assert build_parser().parse_args(args).pack_batch_weights is None
    assert build_parser().parse_args([*args, "--pack-batch-weights"]).pack_batch_weights is True
    assert build_parser().parse_args([*args, "--no-pack-batch-weights"]).pack_batch_weights is False
    assert NodeConfig(model_id="MODEL").pack_batch_weights is None
