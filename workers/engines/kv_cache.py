"""Decode steps over a KV cache allocated once: one lane per sequence, CUDA graphs on a GPU.

The dynamic batch (`workers.engines.growing_cache`) grows its cache by a column every step and
reshapes it whenever a sequence joins or leaves, so every decode step is a new shape and runs
eagerly, one kernel launch after another; on an H200 the LLaVA-8B engine then spent most of a
step launching kernels (bench/RESULTS.md). Here the cache is one tensor per layer of
[lanes, kv heads, context, head dim], allocated when the model loads, and a decode step reads
only fixed-shape tensors: each row's token and position are written into static inputs, its
key and value into its own lane at its own position. The step's shape depends only on how many
rows it carries and how far into the cache it attends, both rounded up to buckets, so on a GPU
each (rows, span) bucket is captured once as a CUDA graph and replayed: a step costs a few
launches, whatever the model's depth.

Rows are kept compact (sequence i in lane i); when one leaves, the rows after it move down.
Padding rows of a bucket attend to their own lane's first column and their logits are unused.

Compiled (`compiled=True`; the engine's `compile`, on a GPU by default), the step is
`torch.compile`d (Inductor: the norms, rotary embedding, activations and residual additions
fused into a few kernels instead of one per operation) with the rows and the span symbolic,
so that a few graphs (one row, more rows) serve every bucket; every bucket is run at load, so
that nothing compiles on a tenant's time, and on a GPU the CUDA graphs are then captured of
the compiled step. Steps run under the compiler's `eager_on_recompile` stance: a shape the
load did not see runs eagerly rather than compiling. Where compiling fails, the batch says so
and steps eagerly.
"""

import logging
import math
import time

import torch
from transformers import DynamicCache

from workers.engines.device import serving
from workers.engines.growing_cache import GrowingCache

log = logging.getLogger(__name__)

# Rope types whose frequencies are fixed at load: the step computes its own cos/sin from them.
STATIC_ROPE = {"default", "linear", "llama3"}
SMALLEST_SPAN = 256  # columns attended, rounded up to this times a power of two


class Unsupported(Exception):
    """The model cannot decode from lanes; the engine keeps the dynamic batch."""


def _buckets(smallest: int, largest: int) -> list[int]:
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, largest]


def _cache_shape(model, max_batch: int, context: int) -> tuple[int, int, int, int, int]:
    """The keys' (and the values') shape: layers, lanes, kv heads, columns, head dim. One
    column more than the context: no span is then the whole of the cache, which a compiled
    step would otherwise need a graph of its own for."""
    config = model.model.language_model.config
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    return layers, max_batch, kv_heads, context + 1, head_dim


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FixedCache:
    """The same contract as `GrowingCache` (rows, add, step, keep), over a preallocated cache."""

    def __init__(self, model, max_batch: int, context: int, graphs: bool, compiled: bool = False):
        text = model.model.language_model
        config = text.config
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope not in STATIC_ROPE:
            raise Unsupported(f"rope type {rope!r} changes with the sequence length")
        self.embed, self.layers, self.norm = text.embed_tokens, text.layers, text.norm
        self.head = model.lm_head
        self.inv_freq = text.rotary_emb.inv_freq.float()
        self.rope_scaling = float(text.rotary_emb.attention_scaling)
        self.heads = config.num_attention_heads
        shape = _cache_shape(model, max_batch, context)
        _, _, self.kv_heads, _, self.head_dim = shape
        weight = self.head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.max_batch, self.context = max_batch, context
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # Static inputs of a step: each lane's next token and its position (= tokens before it).
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.columns = torch.arange(context + 1, device=self.device)
        self.lane_ids = torch.arange(max_batch, device=self.device)
        self.row_buckets = _buckets(1, max_batch)
        self.span_buckets = _buckets(min(SMALLEST_SPAN, context), context)
        self.rows: list = []
        self.lengths: list[int] = []  # tokens in each row's lane (= its next position)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.compile_seconds = 0.0
        self.compiled = False
        self._step = self._forward
        if compiled:
            self._compile_all()
        if graphs:
            self._capture_all()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    @staticmethod
    def bytes_for(model, max_batch: int, context: int) -> int:
        """What the cache of `max_batch` lanes of `context` tokens takes, before making it."""
        keys = math.prod(_cache_shape(model, max_batch, context))
        return 2 * keys * model.lm_head.weight.element_size()

    @torch.inference_mode()
    def add(self, row, cache: DynamicCache, length: int) -> None:
        """Put a prefilled sequence (`cache`: batch of one, `length` tokens) in the next lane."""
        if length >= self.context:
            raise ValueError(f"a sequence of {length} tokens does not fit {self.context} columns")
        lane = len(self.rows)
        for i, layer in enumerate(cache.layers):
            self.keys[i, lane, :, :length] = layer.keys[0]
            self.values[i, lane, :, :length] = layer.values[0]
        self.positions[lane] = length
        self.rows.append(row)
        self.lengths.append(length)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: `tokens` (one per row, on the device) go in; the rows' next-token
        logits ([rows, vocabulary], float) come out."""
        n = len(self.rows)
        self.tokens[:n] = tokens
        rows = next(b for b in self.row_buckets if b >= n)
        span = next(s for s in self.span_buckets if s > max(self.lengths))
        graph = self._graphs.get((rows, span))
        if graph is not None:
            graph[0].replay()
            logits = graph[1][:n]
        else:
            with serving(self.compiled):
                logits = self._step(rows, span)[:n]
        self.positions[:n] += 1
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    @torch.inference_mode()
    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices (ascending); later rows move down to fill."""
        for lane, old in enumerate(keep):
            if old != lane:  # old > lane, and no earlier move wrote to old: safe in order
                used = self.lengths[old]
                self.keys[:, lane, :, :used] = self.keys[:, old, :, :used]
                self.values[:, lane, :, :used] = self.values[:, old, :, :used]
                self.positions[lane] = self.positions[old]
        self.positions[len(keep) :] = 0  # padding rows attend to their first column only
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]

    # -- the step itself ------------------------------------------------------------------------

    def _forward(self, rows: int, span: int) -> torch.Tensor:
        """Logits ([rows, vocabulary], float32) for lanes [0, rows), attending to columns
        [0, span). Only fixed-shape tensors: capturable as a CUDA graph."""
        positions = self.positions[:rows]
        hidden = self.embed(self.tokens[:rows]).unsqueeze(1)  # [rows, 1, hidden]
        angles = positions.unsqueeze(1).float() * self.inv_freq  # [rows, head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)
        cos = (angles.cos() * self.rope_scaling).to(self.dtype)[:, None, None, :]
        sin = (angles.sin() * self.rope_scaling).to(self.dtype)[:, None, None, :]
        # Each row sees the columns up to and including its own position.
        visible = self.columns[:span].unsqueeze(0) <= positions.unsqueeze(1)  # [rows, span]
        mask = torch.zeros((rows, 1, 1, span), dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible[:, None, None, :], float("-inf"))
        lanes = self.lane_ids[:rows]
        groups = self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            # The query heads of one kv head form its "sequence" of `groups` queries: grouped
            # attention against the cache as it is, with no copy of keys per query head.
            query = attention.q_proj(x).view(rows, self.kv_heads, groups, self.head_dim)
            key = attention.k_proj(x).view(rows, self.kv_heads, 1, self.head_dim)
            value = attention.v_proj(x).view(rows, self.kv_heads, self.head_dim)
            query = query * cos + _rotate_half(query) * sin
            key = (key * cos + _rotate_half(key) * sin)[:, :, 0]
            self.keys[i][lanes, :, positions] = key
            self.values[i][lanes, :, positions] = value
            out = torch.nn.functional.scaled_dot_product_attention(
                query,
                self.keys[i, :rows, :, :span],
                self.values[i, :rows, :, :span],
                attn_mask=mask,
                scale=attention.scaling,
            )  # [rows, kv heads, groups, head_dim], heads in q_proj's order
            hidden = hidden + attention.o_proj(out.reshape(rows, 1, self.heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.head(self.norm(hidden)[:, 0]).float()

    @torch.inference_mode()
    def _compile_all(self) -> None:
        """Compile the step and run it for every (rows, span) bucket (at load: never billed;
        the lanes are empty, so what the runs write into them is overwritten by the first
        sequences). If compiling fails, the batch steps eagerly and the log says why."""
        started = time.perf_counter()
        step = torch.compile(self._forward, dynamic=True, fullgraph=True)
        try:
            for rows in self.row_buckets:
                for span in self.span_buckets:
                    step(rows, span)
        except Exception:
            log.exception("compiling the decode step failed: it runs uncompiled")
            return
        self._step, self.compiled = step, True
        self.compile_seconds = time.perf_counter() - started
        log.info(
            "compiled the decode step for rows %s x spans %s in %.1fs",
            self.row_buckets,
            self.span_buckets,
            self.compile_seconds,
        )

    def _capture_all(self) -> None:
        """Capture every (rows, span) bucket's step as a CUDA graph (at load: never billed)."""
        started = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream(self.device)
        for rows in self.row_buckets:
            for span in self.span_buckets:
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):  # warm-up off the capture, as CUDA asks
                    self._step(rows, span)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA work (none is expected) cannot break it
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    logits = self._step(rows, span)
                pool = graph.pool()
                self._graphs[(rows, span)] = (graph, logits)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        log.info(
            "captured %d decode graphs (rows %s x spans %s) in %.2fs; KV cache %.2f GiB",
            len(self._graphs),
            self.row_buckets,
            self.span_buckets,
            self.capture_seconds,
            self.cache_bytes / 2**30,
        )


# With decode="auto", a GPU keeps this much free beside the lane cache (prefills' activations),
# or the engine decodes with the growing cache instead.
HEADROOM_BYTES = 2 * 2**30


@torch.inference_mode()
def decode_batch(
    model, decode: str, choice: str, max_batch: int, context_window: int, compiled: bool = False
) -> "GrowingCache | FixedCache":
    """The cache an engine decodes over: `decode` is fixed or dynamic; `choice` auto on a GPU
    takes the fixed cache only if it fits beside HEADROOM_BYTES, else the growing cache;
    `compiled`: the fixed cache's step compiled (the growing cache's shapes change every step,
    so it never is)."""
    device = model.device
    if decode == "dynamic":
        return GrowingCache(model)
    if device.type == "cuda" and choice == "auto":
        needed = FixedCache.bytes_for(model, max_batch, context_window)
        free, _ = torch.cuda.mem_get_info(device)
        if needed + HEADROOM_BYTES > free:
            log.warning(
                "decoding with a growing cache: a fixed cache of %d x %d tokens needs "
                "%.1f GiB and %.1f GiB are free (GPUHOST_CONCURRENCY sets the lanes)",
                max_batch,
                context_window,
                needed / 2**30,
                free / 2**30,
            )
            return GrowingCache(model)
    try:
        return FixedCache(
            model, max_batch, context_window, graphs=device.type == "cuda", compiled=compiled
        )
    except Unsupported as exc:
        log.warning("decoding with a growing cache: %s", exc)
        return GrowingCache(model)
