"""The layers a node serves, loaded from the checkpoint and called directly (no model-level forward)."""

import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from transformers import PretrainedConfig

from farmesh_core.architecture import ArchitectureAdapter, LayerCall
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.lean_layer import LeanLlamaLayer
from farmesh_core.module_hooks import has_global_forward_hooks
from farmesh_core.node.kv_cache import BatchedDecodeCache, SessionCache
from farmesh_core.openmp import torch_threads
from farmesh_core.row_matmul import StepLinear, decode_batch_rows, last_level_cache_bytes, step_linears
from farmesh_plugins.quantization import module_nbytes

logger = logging.getLogger(__name__)


def _available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class LayerSpan:
    """Layers ``start:end`` of one model; runs any contiguous sub-range of them.

    ``pack_batch_weights``: keep packed copies of the weights for decode batches (True), not (False), or
    where memory leaves room (None, a node's default: see ``NodeConfig.pack_batch_weights``).
    ``exact_batches``: the lean layers' decode batches give each row its lone step's bits (True), or
    multiply faster with other bits (False), or the former where their float32 weights fit the CPU's
    last-level cache (None: see ``NodeConfig.exact_batches``). With True, a session's several rows
    get their lone bits too (``_rows_exactly``; not by default: it cost shared sessions a third of
    their throughput).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        adapter: ArchitectureAdapter,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: str,
        prepare_layer=None,
        progress=None,
        *,
        lean_layers: bool = True,
        one_row_threads: int = 1,
        pack_batch_weights: bool | None = False,
        exact_batches: bool | None = None,
    ):
        self.adapter, self.start, self.end, self.dtype, self.device = adapter, start, end, dtype, device
        # (tokens, threads) -> whether one thread gives the same bits (see same_bits_on_one_thread)
        self._one_thread_verdicts: dict[tuple[int, int], bool] = {}
        self.config: PretrainedConfig = adapter.prepare_config(checkpoint.config)
        self.hidden_size = adapter.hidden_size(self.config)
        self.one_row_threads = one_row_threads  # threads a lone one-token step splits its matmuls over
        self.layers = {}
        for index in range(start, end):
            layer = adapter.load_layer(checkpoint, self.config, index, dtype, device)
            if prepare_layer is not None:
                layer = prepare_layer(layer, index) or layer
            self.layers[index] = layer
            if progress is not None:
                progress(index - start + 1, end - start)
        self.context = adapter.build_span_context(self.config, device)
        # Layers that a farmesh_prepare_layer hook (farmesh-lora) gave a ``farmesh_set_adapter(name)``
        # method: every request runs them with its adapter active (None: the base model), see _using.
        self.switchable = [layer for layer in self.layers.values() if hasattr(layer, "farmesh_set_adapter")]
        # How inference steps (no autograd) call each layer: the adapter's lean call where it has one for
        # the layer as prepared (not quantized, no LoRA: see ArchitectureAdapter.lean_layer), else run_layer,
        # with StepLinears in place of its plain linears (see row_matmul) unless lean_layers is off.
        self.step_calls: dict[int, LayerCall] = {}
        self.module_calls = {index: partial(adapter.run_layer, layer) for index, layer in self.layers.items()}
        self.lean_count = self.step_linear_count = 0
        for index, layer in self.layers.items():
            quick = lean_layers and layer not in self.switchable
            lean = adapter.lean_layer(layer, one_row_threads) if quick else None
            self.step_calls[index] = self.module_calls[index] if lean is None else lean
            self.lean_count += lean is not None
            if quick and lean is None:
                self.step_linear_count += step_linears(layer, one_row_threads, adapter.linear_classes)
        logger.debug(
            "layers %d:%d: %d of them run lean, %d linears of the others run as StepLinear",
            start, end, self.lean_count, self.step_linear_count,
        )  # fmt: skip
        self.exact_batches = self._exact_batches(exact_batches)
        self.exact_rows = self.exact_batches and exact_batches is True
        self.packed_bytes = self._pack_for_batches(pack_batch_weights)
        self._weight_bytes = {i: module_nbytes(layer) for i, layer in self.layers.items()}  # quantized ones too
        # The same for any span of the model (a moving node's sessions may step on its old span's layers).
        self.layer_bytes = sum(self._weight_bytes.values()) // len(self._weight_bytes)
        self._adapter_lock = threading.Lock()
        self._active_adapter: str | None = None

    def _exact_batches(self, exact: bool | None) -> bool:
        """Whether the lean layers' decode batches keep each row's lone bits (``exact``; None: where the
        lean layers' weights fit the last-level cache, since exact rows read each weight once per row)."""
        lean = [call for call in self.step_calls.values() if isinstance(call, LeanLlamaLayer)]
        if exact is None:  # (exact rows are checked for float32 on CPUs)
            fits = sum(weight.nbytes for call in lean for weight in call.weights) <= last_level_cache_bytes()
            exact = fits and self.device == "cpu" and self.dtype == torch.float32
        for call in lean:
            call.exact_batches = exact
        return bool(lean) and exact

    def _pack_for_batches(self, pack: bool | None) -> int:
        """Packed copies of the lean layers' and StepLinears' weights for decode batches (see
        ``row_matmul.packed_weight``), with ``pack`` None only where they leave at least as much memory
        available as they take; returns their bytes."""
        packable: list[LeanLlamaLayer | StepLinear] = [
            call for call in self.step_calls.values() if isinstance(call, LeanLlamaLayer) and not self.exact_rows
        ]  # (a shared session's rows use the copies unless they are exact)
        packable += [
            module for layer in self.layers.values() for module in layer.modules() if isinstance(module, StepLinear)
        ]
        if not packable or self.device != "cpu":  # nothing oneDNN packs here: quantized or LoRA layers, a GPU
            return 0
        if pack is None:
            need = sum(weight.nbytes for item in packable for weight in item.weights)
            available = _available_memory()
            pack = available is not None and available >= 2 * need
            if not pack:
                logger.info(
                    "layers %d:%d: decode batches use unpacked weights (packing needs %.0f MB, %s available)",
                    self.start, self.end, need / 2**20, "unknown" if available is None else f"{available / 2**20:.0f} MB",
                )  # fmt: skip
        if not pack:
            return 0
        packed = sum(item.pack_for_batches() for item in packable)
        if packed:
            logger.info(
                "layers %d:%d: weights packed for decode batches (%.0f MB more)", self.start, self.end, packed / 2**20
            )
        else:
            logger.info("layers %d:%d: oneDNN has no packed matmul for %s here", self.start, self.end, self.dtype)
        return packed

    @contextmanager
    def _using(self, adapter_name: str | None):
        """Run the body with LoRA adapter ``adapter_name`` active in every switchable layer. The
        switch is span-wide state, so steps (event loop and compute thread) hold a lock meanwhile."""
        if not self.switchable:
            yield
            return
        with self._adapter_lock:
            if adapter_name != self._active_adapter:
                for layer in self.switchable:
                    layer.farmesh_set_adapter(adapter_name)
                self._active_adapter = adapter_name
            yield

    def _calls(self) -> dict[int, LayerCall]:
        """How this step calls each layer: ``step_calls``, or the modules where forward hooks were
        registered for every module (after the lean layers checked for hooks at load)."""
        return self.module_calls if has_global_forward_hooks() else self.step_calls

    def kv_bytes_per_token(self, start: int, end: int) -> int:
        return (end - start) * self.adapter.kv_bytes_per_token(self.config, self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        cache: SessionCache | None = None,
        position: int = 0,
        adapter_name: str | None = None,
    ) -> torch.Tensor:
        """Run layers ``start:end`` on ``hidden`` [batch, seq, hidden] whose first token is at ``position``,
        with LoRA adapter ``adapter_name`` (None: the base model)."""
        hidden = hidden.to(self.device, self.dtype)
        if cache is not None:
            cache.begin_step(position)
        if self.exact_rows and cache is not None and hidden.shape[0] > 1:
            hidden = self._rows_exactly(hidden, start, end, cache, position, adapter_name)
            cache.end_step(hidden.shape[1])
            return hidden
        kwargs = self.adapter.prepare(self.context, hidden, position)
        # A one-token step of a session's several rows multiplies as a decode batch does (packed weights),
        # in lean layers and StepLinears alike
        rows = (
            decode_batch_rows() if cache is not None and hidden.shape[0] > 1 and hidden.shape[1] == 1 else nullcontext()
        )
        calls = self._calls()
        with self._using(adapter_name), rows:
            for index in range(start, end):
                hidden = calls[index](hidden, cache, kwargs)
        if cache is not None:
            cache.end_step(hidden.shape[1])
        return hidden

    def _rows_exactly(self, hidden, start: int, end: int, cache: SessionCache, position: int, adapter_name):
        """A step of a session's several rows (a shared session's), each row with the bits it would get
        alone, as exact decode batches give sessions theirs: a one-token step as a decode batch of the
        rows, a longer one row by row (a GEMM over all rows' tokens, and attention over all rows on
        two threads, round otherwise: four rows of 6 tokens came 1.1e-4 from their lone prompts).
        A one-token step of 8 rows through 4 layers took 6.0 ms so, against 2.6 through the packed
        weights; 8 generations sharing a session ran at 377 tok/s against 557."""
        rows = [cache.row(index, hidden.shape[0]) for index in range(hidden.shape[0])]
        if hidden.shape[1] == 1:
            steps = list(hidden.split(1))
            outputs = self.forward_decode_batch(steps, start, end, rows, [position] * len(steps), adapter_name)
            if outputs is not None:
                return torch.cat(outputs)
        outputs, calls = [], self._calls()
        with self._using(adapter_name):
            for row, row_cache in zip(hidden.split(1), rows, strict=True):
                kwargs = self.adapter.prepare(self.context, row, position)
                for layer in range(start, end):
                    row = calls[layer](row, row_cache, kwargs)
                outputs.append(row)
        return torch.cat(outputs)

    @torch.inference_mode()
    def forward_decode_batch(
        self,
        hiddens: list[torch.Tensor],
        start: int,
        end: int,
        caches: list[SessionCache],
        positions: list[int],
        adapter_name: str | None = None,
    ) -> list[torch.Tensor] | None:
        """One-token steps [1, 1, hidden] of several sessions (all with adapter ``adapter_name``) as one
        batch; None if the family can't."""
        calls = self._calls()
        if self._padding_outweighs_batching(len(hiddens), max(positions) + 1, start, end, calls):
            return None
        hidden = torch.cat(hiddens).to(self.device, self.dtype)
        kwargs = self.adapter.prepare_decode_batch(self.context, hidden, positions)
        if kwargs is None:
            return None
        cache = BatchedDecodeCache(caches, positions)
        with self._using(adapter_name), decode_batch_rows():
            for index in range(start, end):
                hidden = calls[index](hidden, cache, kwargs)
        cache.end_step()
        return list(hidden.split(1))

    def _padding_outweighs_batching(
        self, rows: int, length: int, start: int, end: int, calls: dict[int, LayerCall]
    ) -> bool:
        """Whether a decode batch would copy more bytes of keys and values than the layers' weights.

        Layers that run as modules (all but lean ones) take the batch's keys and values padded into one
        tensor, a copy of every row's cache per layer (``BatchedDecodeCache``); batching saves reading
        the weights once per row. Past that point, with long sessions, the rows step alone.
        """
        modules = [i for i in range(start, end) if not isinstance(calls[i], LeanLlamaLayer)]
        padded = rows * length * self.adapter.kv_bytes_per_token(self.config, self.dtype) * len(modules)
        return padded > sum(self._weight_bytes[i] for i in modules)

    def backward(
        self, hidden: torch.Tensor, grad_output: torch.Tensor, start: int, end: int, adapter_name: str | None = None
    ) -> torch.Tensor:
        """Gradient of ``<forward(hidden), grad_output>`` w.r.t. ``hidden``; layer weights get no gradient."""
        with torch.enable_grad(), self._using(adapter_name):
            hidden = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            kwargs = self.adapter.prepare(self.context, hidden, 0)
            out = hidden
            for index in range(start, end):
                out = self.adapter.run_layer(self.layers[index], out, None, kwargs)
            (grad_input,) = torch.autograd.grad(out, hidden, grad_output.to(out.dtype))
        return grad_input

    def same_bits_on_one_thread(self, tokens: int, threads: int) -> bool:
        """Whether a step of ``tokens`` tokens through the whole span gives the same bits on one torch
        thread as on ``threads``, checked once per token count (and thread count) on a seeded input.

        MKL picks its matmul kernels by shape and thread count: with the baseline's weights, 5, 6, 7,
        9, 10 and 11 rows came out with other bits on 1 thread than on 2 (the other counts of 1-128
        the same)."""
        verdict = self._one_thread_verdicts.get((tokens, threads))
        if verdict is None:
            hidden = torch.randn(1, tokens, self.hidden_size, generator=torch.Generator().manual_seed(tokens))
            outputs = []
            for count in (1, threads):
                with torch_threads(count):
                    outputs.append(self.forward(hidden, self.start, self.end, SessionCache(tokens), 0))
            verdict = self._one_thread_verdicts[tokens, threads] = torch.equal(*outputs)
        return verdict

    def measure_throughput(self, steps: int = 8) -> float:
        """One-token steps per second through the whole span (what a decoding client gets)."""
        cache = SessionCache(max_length=steps + 1)
        hidden = torch.zeros(1, 1, self.hidden_size, dtype=self.dtype, device=self.device)
        self.forward(hidden, self.start, self.end, cache, 0)
        began = time.perf_counter()
        for position in range(1, steps + 1):
            self.forward(hidden, self.start, self.end, cache, position)
        return steps / (time.perf_counter() - began)
