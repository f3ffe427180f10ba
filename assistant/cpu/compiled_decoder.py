"""Compiled one-token decode steps for chat on the CPU (`--quantize auto`/`int8`, on x86 CPUs with AVX2 or
AVX-512: compiled_steps_run_fast), and,
when asked, for the full batches of batch VQA (`python -m assistant.vqa run --compile always`).

A decode step reads every weight of the LLM once to produce one token, and in eager PyTorch it also
pays for a few hundred small operator calls. Here a copy of the LLM keeps its linear layers as int8
weights with one scale per output channel (weight-only: activations stay bf16, nothing is quantised per
call), or, with AVX-512, as int4 where the weights already lie on a 4-bit grid (the bundled SmolLM2 comes from
a Q4_1 GGUF file: int4 reproduces its weights exactly, in about a third fewer bytes than int8; a LoRA adapter
then stays beside the large layers instead of being merged, LORA_SIDE_PATH_MIN_WEIGHTS; with AVX2 only, torch's
int4 kernel is compute-bound and all-int8 is faster: int4_kernels_pay_off), and the whole step
(embedding lookup, 30 layers, LM head) is one `torch.compile`d graph: inductor
turns the int8 and int4 matrix-vector products into its own AMX / AVX-512 / AVX2 kernels, fuses the small operations
around them, and the KV cache is a transformers StaticCache, so the shapes stay fixed. Between kernels
the main thread's serial work keeps the second core waiting, so there is little of it: the kernel calls
are made from C++ (inductor's cpp_wrapper), and in Llama-architecture models the query/key/value and the
gate/up projections are one matrix each (fewer, larger GEMMs). Attention reads only the filled part of the
static cache (the length is passed in, so the graph is compiled for a symbolic length, not once per
length), through our one-token attention kernel (decode_attention.py: each key/value row read once for
the query heads that share it, positions split evenly over the threads), or where that cannot be built,
through SDPA with those query heads stacked as rows of one call instead of copying keys and values.

Measured on the default model (README, benchmarks/chat_speed.py): on the AMX machine more than 3x the eager int8
decode steps, 3.8-5.4x plain transformers `generate` in fp32, 0.47-0.54x llama.cpp (the machine varies; 0.50-0.54x
since gate/up stay int4, 0.52x with the step's guards on its arguments only); on the AVX2 machine (all-int8)
about 3x the eager int8 steps, 5.7-6.0x `generate`, 0.71-0.82x llama.cpp.
Compiling takes about 2 minutes the first time (inductor caches the result on disk, keyed by a digest of the
weights; 20-25 s afterwards on the AMX machine, 32-35 s on the AVX2 one, 41-60 s beside other work), so it runs in
a background thread at load, ends with a check that one compiled step agrees with the eager one, and decoding uses
the eager path until it is ready, or whenever it cannot be used: a batch of another size than the one it was
compiled for (1 for chat), a padded row at batch 1, a context longer than the static cache, a second reply
generated at the same time, a compiler missing or failing, a failed check (the error is kept in
`CompiledDecoder.error` and warned once). A decoder for batches of N rows (batch VQA's left-padded rows, after a
shared image prefix) has a graph of its own that also takes the rows' attention mask and positions, and attends
through SDPA with the mask: at batch 16, 20 ms a step against 46 for the eager int8 steps of all 16 rows; but batch
VQA's packed batches (packed_batch.py) step only the rows still answering, so this pays only where answers run long
(a sentence: about 10% more items/s; one word: 2% fewer) and only on request (`python -m assistant.vqa run
--compile always`).

Prompts (prefill) still run through the engine's LLM (quantization.py); only the steps after the first
token come here. The prompt's keys and values are copied into the static cache before the first step
and the steps' keys and values are appended to the session's DynamicCache afterwards, so a chat session
continues from its cache exactly as with eager steps.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import re
import threading
import time
import types
import warnings

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from transformers import AttentionInterface, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import decode_attention
from .background_compile import short_gil_slices, yielding_to_replies
from .fused_projections import fuse_projections, merge_lora
from ..inference.generation import cache_kwarg, position_ids_from_mask

logger = logging.getLogger(__name__)
ATTENTION = "grouped_decode_sdpa"
WARM_UP_STEPS = 4  # a few lengths, each through the one graph compiled for a symbolic length
INT4_GROUP = 32  # weights per scale and zero point along a row: Q4_1's blocks, and torch's int4 kernels take it
# A LoRA adapter on an int4 layer costs two small matmuls a step (merged, it would move the weights off their
# grid); they pay for themselves only on large layers. Default model, same-process A/Bs (tokens/s): gate/up
# (576 x 3,072) int4 with its adapter beside it 156.2 against all-int8 147.1; every layer so 125.3 against
# 141.1; gate/up and down (576 x 1,536) 151.8 against gate/up alone 154.9 (with the adapter in a C++ operator).
# Below this many weights a layer with an adapter stays int8, adapter merged.
LORA_SIDE_PATH_MIN_WEIGHTS = 1 << 20


def grouped_decode_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, except for one query token: attention over the first
    `valid_length` cache positions only, through our decode kernel (decode_attention.py) where it is built
    and takes the shapes, else through SDPA with the query heads that share a key/value head stacked as
    rows of one call (no per-head copies of the keys and values). Our kernel takes no mask: it serves one
    unpadded row, which sees every filled position; batches (left-padded rows) go through SDPA with the mask."""
    groups = getattr(module, "num_key_value_groups", 1)
    valid = kwargs.get("valid_length")
    if query.shape[2] != 1 or valid is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] == 1 and decode_attention.supports(module, query.dtype):
        return decode_attention.decode_attention(query, key, value, valid, module.scaling).transpose(1, 2), None
    batch, heads, _, dim = query.shape
    stacked = query.reshape(batch, heads // groups, groups, dim)
    mask = attention_mask[..., :valid] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(stacked, key[:, :, :valid], value[:, :, :valid],
                                                           attn_mask=mask, scale=module.scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(ATTENTION, grouped_decode_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class Int8WeightOnlyLinear(torch.nn.Module):
    """`linear(x)` with int8 weights and one scale per output channel; written as dequantise-then-matmul,
    the pattern inductor replaces by its int8 weight-only kernels (never run eagerly in the fast path)."""

    def __init__(self, linear: torch.nn.Linear, dtype=torch.bfloat16):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


def int4_grid(weight: torch.Tensor, group: int = INT4_GROUP):
    """The nearest asymmetric 4-bit grid of each `group` weights along a row (Q4_1's scheme): codes 0-15,
    `scale` and `low` per group, weight ~ low + scale * code."""
    weight = weight.detach().float()
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    codes = torch.round((groups - low[..., None]) / scale.clamp(min=1e-30)[..., None]).clamp(0, 15)
    return codes.to(torch.int32).reshape(rows, columns), scale, low


def exact_int4_grid(weight: torch.Tensor, group: int = INT4_GROUP):
    """int4_grid(weight) where it reproduces every weight (to a thousandth of its group's step: the weights
    were dequantised from 4-bit codes, as a Q4_1 GGUF file's are), else None."""
    if weight.dim() != 2 or weight.shape[1] % group:
        return None
    codes, scale, low = int4_grid(weight, group)
    groups = weight.detach().float().reshape(*scale.shape, group)
    off = (groups - low[..., None] - codes.reshape(groups.shape) * scale[..., None]).abs()
    return (codes, scale, low) if bool((off <= 1e-3 * scale[..., None] + 1e-30).all()) else None


def pack_int4(codes, scale, low, dtype):
    """Codes, scales and zero points in the layout torch's int4 CPU kernel (and inductor's template for it)
    reads: value = (code - 8) * scale + zero. The scales in the activations' dtype: converted per call,
    inductor's int4 GEMM lowering would get a computed tensor where it wants a buffer and stop."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return packed, torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(dtype)


class Int4WeightOnlyLinear(torch.nn.Module):
    """`linear(x)` for a weight that lies on a 4-bit grid already (exact_int4_grid): its codes, scales and
    zero points as they are, so nothing is rounded but the scales to bf16. A LoRA adapter (A, B with its
    scaling folded in) stays beside it as two small matmuls."""

    def __init__(self, linear: torch.nn.Linear, grid, lora=None, dtype=torch.bfloat16, group: int = INT4_GROUP):
        super().__init__()
        packed, scale_zero = pack_int4(*grid, dtype)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        # as batched products (1, in, rank) and (1, rank, out): inductor gives bf16 linear layers and 2-D matmuls
        # oneDNN-packed weights, and never keeps a graph holding those in its disk cache (3 minutes to compile
        # at every start instead of 40 s)
        self.register_buffer("lora_a", None if lora is None else lora[0].detach().t()[None].contiguous().to(dtype))
        self.register_buffer("lora_b", None if lora is None else lora[1].detach().t()[None].contiguous().to(dtype))
        self.group = group

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)
        if self.lora_a is not None:
            y = y + torch.bmm(torch.bmm(flat[None], self.lora_a), self.lora_b)[0]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)


class RescoredLMHead(torch.nn.Module):
    """The LM head in two passes: every logit from int4 weights (groups of 32, asymmetric), then the `top`
    largest recomputed exactly from the Int8WeightOnlyLinear head's rows. The head is a fifth of a step's
    bytes for SmolLM2 (49,152 x 576); int4 reads 18 MB instead of 28. The greedy pick is the int8 head's
    whenever it is among the int4 pass's top 16 (the same 150 tokens in the A/B below); sampling sees
    int4 values outside the top 16. Measured, same process: 124.8 vs 116.1 tokens/s."""

    def __init__(self, head: Int8WeightOnlyLinear, weight: torch.Tensor, top: int = 16, group: int = INT4_GROUP):
        super().__init__()
        packed, scale_zero = pack_int4(*int4_grid(weight, group), head.scale.dtype)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.exact, self.top, self.group = head, top, group

    def forward(self, hidden):
        flat = hidden.reshape(-1, hidden.shape[-1])
        approximate = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)
        top = approximate.topk(self.top, dim=-1).indices
        # a product and a sum rather than a matmul: inductor would take gathered int8 rows for its int8
        # weight-only GEMM pattern, which needs the weight as a buffer, and stop with an assertion
        rows = self.exact.weight[top].float() * self.exact.scale[top, None].float()
        exact = (flat[:, None, :].float() * rows).sum(-1)
        if self.exact.bias is not None:
            exact = exact + self.exact.bias[top].float()
        logits = approximate.scatter(-1, top, exact.to(approximate.dtype))
        return logits.reshape(*hidden.shape[:-1], -1)


def rescored_head(head: Int8WeightOnlyLinear, weight: torch.Tensor):
    """RescoredLMHead where torch's int4 CPU kernels take these shapes, else `head` as it is."""
    try:
        fast = RescoredLMHead(head, weight)
        fast(torch.zeros(1, weight.shape[1], dtype=head.scale.dtype))
        return fast
    except (RuntimeError, AttributeError):  # an older torch, a width not a multiple of the group...
        return head


def lora_factors(llm):
    """(a deep copy of `llm` without its LoRA adapter, {linear layer's name: (A, B * scaling)}) for a peft
    LoRA model of one plain adapter; (a deep copy with the adapter merged, {}) for any other peft model;
    (a deep copy, {}) for a model without one."""
    if not isinstance(llm, PeftModel):
        return copy.deepcopy(llm), {}
    layers = {n: m for n, m in llm.get_base_model().named_modules()
              if hasattr(m, "lora_A") and hasattr(m, "base_layer")}

    def plain(m):
        adapter = m.active_adapters[0] if len(m.active_adapters) == 1 else None
        return (type(m) is LoraLinear and adapter in m.lora_A and not m.use_dora.get(adapter)
                and not getattr(m, "fan_in_fan_out", False) and not getattr(m, "lora_bias", {}).get(adapter, False))

    if not all(plain(m) for m in layers.values()):  # DoRA, several adapters, biases...: merged, as eager steps do
        return copy.deepcopy(llm).merge_and_unload(), {}
    adapters = {}
    for name, m in layers.items():
        adapter = m.active_adapters[0]
        adapters[name] = (m.lora_A[adapter].weight.detach().float().clone(),
                          m.lora_B[adapter].weight.detach().float() * m.scaling[adapter])
    return copy.deepcopy(llm).unload(), adapters


def int4_kernels_pay_off() -> bool:
    """Whether the decode copy should use int4 layers on this CPU: with AVX-512 (inductor's int4 weight-only GEMM
    templates; AMX machine: gate/up int4 153.7 tokens/s against 146.1 all-int8, the int4-and-rescore LM head 124.8
    against 116.1). With AVX2 only, torch's int4 kernel is compute-bound and every layer int8 is faster (a 2-core
    AMD EPYC, same-process A/Bs of 6 rounds: all-int8 83.5 tokens/s against 62.1 for int4 gate/up and LM head,
    87.3 against 79.1 for the int4 LM head alone)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def weight_only_copy(llm, dtype=torch.bfloat16, int4: bool | None = None):
    """A copy of `llm` in `dtype` for the decode steps: fused projections (fuse_projections), each linear layer
    as Int4WeightOnlyLinear where its weights already lie on a 4-bit grid, else as Int8WeightOnlyLinear, and
    the LM head (untied from the embedding) as RescoredLMHead over the int8 one. A LoRA adapter (peft) stays
    beside an int4 layer of at least LORA_SIDE_PATH_MIN_WEIGHTS weights and is merged into every other layer.
    `int4`: False keeps every layer and the LM head int8 (adapter merged); None: int4_kernels_pay_off()."""
    int4 = int4_kernels_pay_off() if int4 is None else int4
    fast, adapters = lora_factors(llm)
    head = fast.get_output_embeddings()
    if head is not None and head.weight is fast.get_input_embeddings().weight:
        untied = torch.nn.Linear(head.in_features, head.out_features, bias=False)
        untied.weight = torch.nn.Parameter(head.weight.detach().clone())
        fast.set_output_embeddings(untied)
    fuse_projections(fast, adapters)
    head_weight = fast.get_output_embeddings().weight.detach()  # no copy: its Linear is swapped out below
    for name, module in [(n, m) for n, m in fast.named_modules() if isinstance(m, torch.nn.Linear)]:
        fast.set_submodule(name, _weight_only_linear(module, adapters.get(name), dtype, int4))
    fast = fast.to(dtype).eval()
    if int4:
        fast.set_output_embeddings(rescored_head(fast.get_output_embeddings(), head_weight))
    fast.set_attn_implementation(ATTENTION)
    return fast


def _weight_only_linear(linear: torch.nn.Linear, lora, dtype, int4: bool):
    # the grid is looked for only where int4 could be used: it is most of the copy's time at load
    int4_pays = int4 and (lora is None or linear.weight.numel() >= LORA_SIDE_PATH_MIN_WEIGHTS)
    grid = exact_int4_grid(linear.weight) if int4_pays else None
    if grid is not None:
        try:
            return Int4WeightOnlyLinear(linear, grid, lora, dtype)
        except RuntimeError:  # an older torch, rows not a multiple of what its int4 packing takes...
            pass
    merge_lora(linear, lora)
    return Int8WeightOnlyLinear(linear, dtype)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A digest of every tensor of `module` (names and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def guards_on_step_arguments(entries) -> list[bool]:
    """Which of Dynamo's guards a compiled step checks before each call: those on the step's arguments (their
    types, shapes, strides, valid_length's range) and on global state (grad mode...), not the 800 on the decoder's
    own copy of the LLM, its static cache and the globals its code reads, which nothing changes after the
    compile (each decoder has its own copy of the step's code). Checking them all cost 6% of the decode steps'
    speed (same-process A/B, default model, 8 rounds: 115.0 tokens/s against 108.6)."""
    arguments = set(inspect.signature(CompiledDecoder._step).parameters) - {"self"}
    keep = []
    for entry in entries:
        name = getattr(entry, "name", "") or ""
        base = re.match(r"(?:L\['(\w+)'\]|(\w+))", name)
        keep.append(not name or (base is not None and (base.group(1) or base.group(2)) in arguments))
    return keep


def prime_fx_tracing() -> None:
    """Make, in this thread, what inductor would otherwise make with torch.fx's symbolic tracing in the compile's
    thread: the first time a process lowers a loop body, inductor traces a dummy function (kept for the process),
    and while torch.fx traces it replaces `nn.Module.__call__` for every thread: the model running meanwhile in
    another thread (calibration at load, a reply in serve.py) failed with "module is not installed as a submodule"."""
    try:
        from torch._inductor.loop_body import InterpreterShim

        InterpreterShim._dummy_gm()
    except (ImportError, AttributeError):  # another torch: nothing to prime
        pass


def compiled_steps_run_fast() -> bool:
    """Whether load_model should compile decode steps on this CPU: where they were measured faster than the eager
    int8 steps. x86 with AVX-512 (AMX machine, default model: 3x eager) or AVX2 (a 2-core AMD EPYC without
    AVX-512 or fast bf16: 56-68 tokens/s against 24-31 eager with int4 layers, 83-92 all-int8; the bf16
    activations cost little there, the int8 weights are what a step reads, through inductor's AVX2 micro-GEMMs);
    elsewhere (ARM, x86 without AVX2) only where bf16 matrix products are fast, as before that measurement."""
    from .int8 import bf16_matmul_is_fast

    capability = torch.backends.cpu.get_cpu_capability()
    return capability == "AVX2" or capability.startswith("AVX512") or bf16_matmul_is_fast()


def wait_for_compiled_steps(model) -> str:
    """For measurements: wait until `model`'s decode steps are compiled (if it compiles them) and say
    which steps generations of its decoder's batch size now use, "compiled" or "eager"."""
    decoder = getattr(model, "compiled_decoder", None)
    return "compiled" if decoder is not None and decoder.wait() else "eager"


class CompiledDecoder:
    """Decode steps for generations of `batch_size` rows through a compiled weight-only copy of the LLM
    (module docstring). `start()` compiles in a background thread; `steps(...)` gives a step function once
    `ready`. Batch 1 serves chat; a larger batch serves batch VQA's full batches, whose rows are left-padded:
    its graph takes the rows' attention mask and positions, and its cache holds `batch_size` x `max_length`."""

    def __init__(self, llm, max_length: int = 4096, batch_size: int = 1, int4: bool | None = None):
        prime_fx_tracing()
        self.max_length = max_length
        self.batch_size = batch_size
        self.llm = weight_only_copy(llm, int4=int4)
        self.cache = StaticCache(config=self.llm.config, max_cache_len=max_length)
        # batches: which cache positions each row attends to (its prompt's real tokens, then every step)
        self.mask = torch.zeros((batch_size, max_length), dtype=torch.long)
        self._cache_kwarg = cache_kwarg(self.llm)
        self.ready = threading.Event()
        self.error: str | None = None
        self.compile_seconds: float | None = None
        self._busy = threading.Lock()  # one static cache: one reply at a time
        self._compiled = None
        self._thread = None

    # ---- compiling ------------------------------------------------------------------------------
    def start(self, yield_to_replies: bool = False) -> "CompiledDecoder":
        """Compile and warm up in a background thread (decoding stays eager until `ready`); `yield_to_replies`:
        the compile pauses while the engine computes a reply (background_compile.py; for serving people)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._compile, args=(yield_to_replies,), name="compile-decode",
                                            daemon=True)
            self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compiled (or failed); True if usable."""
        if self._thread is None:
            self.start()
        self._thread.join(timeout)
        return self.ready.is_set()

    def _step(self, token_ids, position, valid_length: int, attention_mask=None, position_ids=None):
        return self.llm(input_ids=token_ids, cache_position=position, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=True, valid_length=valid_length,
                        **{self._cache_kwarg: self.cache}).logits[:, -1]

    def _rows(self, position: int, real_tokens=None):
        """The step's row arguments: (mask, position ids) for a batch, nothing for one row. `real_tokens`
        (batch, 1), contiguous (Dynamo guards on strides): each row's tokens before `position` (left padding
        not counted), by default all of them."""
        if self.batch_size == 1:
            return ()
        if real_tokens is None:
            real_tokens = torch.full((self.batch_size, 1), position)
        return self.mask, real_tokens

    def _compile(self, yield_to_replies: bool = False) -> None:
        start = time.perf_counter()
        try:  # replies served meanwhile get the GIL back sooner, or the whole machine while they compute
            with short_gil_slices(), yielding_to_replies(yield_to_replies):
                self._warm_up()
                self._check_against_eager()
            self.compile_seconds = time.perf_counter() - start
            self.ready.set()
        except Exception as e:  # no C++ compiler, an unsupported model...: eager decode steps stay
            self.error = f"{type(e).__name__}: {e}".strip()[:500]
            warnings.warn(f"compiled decode steps are off, decoding stays eager ({self.error})", RuntimeWarning)
            return
        logger.info("compiled decode steps ready after %.0f s", self.compile_seconds)

    def _warm_up(self) -> None:
        decode_attention.load()  # the attention kernel: built on first use, SDPA where it cannot be
        self.mask.fill_(1)  # the warm-up's rows see every position they have filled
        with torch.inference_mode():  # one eager step first: the static cache allocates its tensors outside the graph
            # (made in inference mode, as every step's tokens are: Dynamo would compile again for other ones)
            tokens = torch.zeros((self.batch_size, 1), dtype=torch.long)
            self._step(tokens, torch.tensor([0]), 1, *self._rows(0))
        for layer in self.cache.layers:  # transformers marks them static; freezing would then copy them into the
            for tensor in (layer.keys, layer.values, layer.cumulative_length):  # graph as constants, and the
                if hasattr(tensor, "_dynamo_static_input_type"):  # prompts we copy in would never arrive
                    del tensor._dynamo_static_input_type
        import torch._inductor.config as inductor

        # Dynamo keeps compiled code per code object, and with the module guards skipped it would hand a
        # second decoder in this process (another model of the same shapes) the first one's frozen weights:
        # each decoder compiles its own copy of the step's code
        own_step = types.FunctionType(CompiledDecoder._step.__code__.replace(), globals(), "_step",
                                      CompiledDecoder._step.__defaults__)
        self._compiled = torch.compile(types.MethodType(own_step, self), fullgraph=True, dynamic=None, options={
            "guard_filter_fn": guards_on_step_arguments,
        })  # dynamic=None: shapes stay static; valid_length is made symbolic below (one graph for every length)
        # freezing: weights become constants (int8 kernels, no dequantised copy per call); max_autotune: lets
        # inductor pick its int8 weight-only GEMM templates (AMX / AVX-512)
        # inductor's on-disk cache keys frozen weights by shape only, yet keeps what it computed from them (the
        # GEMM kernels' packed weights): without the fingerprint in the key, another model of the same shapes
        # (a fine-tune of the default) would decode with the weights of the one compiled first
        tag = f"assistant-decode-{weights_fingerprint(self.llm)}"
        # cpp_wrapper: the graph's few hundred kernel calls made from C++, not Python (119 vs 110 tokens/s)
        # cpp.min_chunk_size: the small elementwise kernels (SiLU * up over 1,536 values...) stay on one thread;
        # waking the other costs more than it saves (A/Bs: 138.6 vs 131.7, 138.9 vs 137.2, 119.3 vs 116.7
        # after a 398-token prompt); the GEMM templates split their work over the threads regardless
        options = {"freezing": True, "max_autotune": True, "cpp_wrapper": True, "cpp.min_chunk_size": 8192}
        # valid_length symbolic from the first call: left to Dynamo, it is a constant at the first call and the
        # graph compiles twice (a warm compile took 40 s, 24 s without the first graph, never used again)
        compiler = {"cache_key_tag": tag}
        if "dynamic_sources" in torch.compiler.config._config:  # torch 2.7+
            compiler["dynamic_sources"] = "L['valid_length']"
        with inductor.patch(options), \
                torch.compiler.config.patch(compiler), \
                torch.inference_mode(), self._busy:
            for k in range(WARM_UP_STEPS):
                self._compiled(tokens, torch.tensor([k]), k + 1, *self._rows(k))

    @torch.inference_mode()
    def _check_against_eager(self, length: int = 6) -> None:
        """One step compiled and eagerly from the same cache must agree (within int8/bf16 rounding), or the
        compiled steps stay off: a wrong answer is worse than a slow one (a stale compiled artifact, see the
        cache key above, gave logits off by 70% of their size). Ordinary tokens spread over the vocabulary
        (special tokens, at either end of it, can push a small model's activations to extremes where the two
        roundings part), at a length past the warm-up's, so the graph checked is the one every length uses."""
        vocab = self.llm.config.vocab_size
        tokens = [vocab * k // (length + 2) for k in range(1, length + 1)]
        rows = self.batch_size
        self.mask.fill_(1)
        self.mask[0, 0] = 0  # in a batch, row 0 left-padded by one position: the check covers the mask too
        positions = position_ids_from_mask(self.mask[:, :length])  # each position's real tokens before it
        logits = []
        for step in (self._step, self._compiled):
            self._rewind()  # the same rewind as before every reply
            for position, token in enumerate(tokens[:-1]):
                self._step(torch.full((rows, 1), token), torch.tensor([position]), position + 1,
                           *self._rows(position, positions[:, position:position + 1].contiguous()))
            logits.append(step(torch.full((rows, 1), tokens[-1]), torch.tensor([length - 1]), length,
                               *self._rows(length - 1, positions[:, -1:].contiguous())).float())
        eager, compiled = logits
        error = (compiled - eager).abs().max().item() / max(eager.abs().max().item(), 1e-6)
        if not error <= 0.1:
            raise RuntimeError(f"compiled step disagrees with the eager step (relative error {error:.3f})")

    # ---- decoding ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def steps(self, cache, attention_mask, max_new_tokens: int):
        """Within the block, `step(token_ids) -> logits`: feeds one token after the prompt and the tokens
        stepped before (None if the compiled path cannot take this generation: the caller then steps
        eagerly). `cache`: the DynamicCache the prompt was prefilled into; on exit it holds the keys and
        values of every token stepped, as eager steps leave it."""
        rows, length = attention_mask.shape
        usable = (self.ready.is_set() and rows == self.batch_size and (rows > 1 or bool(attention_mask.all()))
                  and cache.get_seq_length() == length and length + max_new_tokens <= self.max_length)
        if not usable or not self._busy.acquire(blocking=False):
            yield None
            return
        fed = 0
        real_tokens = attention_mask.sum(-1, keepdim=True)  # the first step's position in each row
        try:
            @torch.inference_mode()
            def step(token_ids):
                nonlocal fed
                if fed == 0:  # here rather than on entry: the first token is out before the copy
                    self._load(cache, attention_mask)
                position = length + fed
                self.mask[:, position] = 1
                logits = self._compiled(token_ids.reshape(rows, 1), torch.tensor([position]), position + 1,
                                        *self._rows(position, real_tokens + fed))
                fed += 1
                return logits

            yield step
        finally:
            try:
                self._store(cache, length, fed)
            finally:
                self._busy.release()

    @torch.inference_mode()
    def _load(self, cache, attention_mask) -> None:
        self._rewind()
        self.mask.zero_()
        self.mask[:, :attention_mask.shape[1]] = attention_mask
        for layer, dynamic in enumerate(cache.layers):
            self.cache.update(dynamic.keys.to(self.llm.dtype), dynamic.values.to(self.llm.dtype), layer)

    def _rewind(self) -> None:
        """Static layers write where their own count of held positions says: back to 0. Only the counts:
        what lies past them is never read (the attention stops at `valid_length`), and zeroing all
        `max_length` positions as `reset()` does took 5 ms of the wait for a reply's second token."""
        counts = [getattr(layer, "cumulative_length", None) for layer in self.cache.layers]
        if all(isinstance(count, torch.Tensor) for count in counts):
            for count in counts:
                count.zero_()
        else:  # another transformers version's layers
            self.cache.reset()

    @torch.inference_mode()
    def _store(self, cache, start: int, count: int) -> None:
        if count == 0:
            return
        for layer, static in enumerate(self.cache.layers):
            keys = static.keys[:, :, start:start + count]
            values = static.values[:, :, start:start + count]
            dynamic = cache.layers[layer]
            cache.update(keys.to(dynamic.keys.dtype), values.to(dynamic.values.dtype), layer)
