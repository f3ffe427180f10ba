"""Compiled one-token decode steps on the CPU: chat's (batch 1) and, on request, batch VQA's full batches.

A decode step reads every weight of the LLM once to produce one token, and in eager PyTorch it also pays for a
few hundred small operator calls. Here the step runs through the weight-only copy of the LLM (weight_only.py) as
one `torch.compile`d graph: inductor turns the int8 and int4 matrix-vector products into its own CPU kernels and
fuses the small operations around them, and the KV cache is a transformers StaticCache, so the shapes stay fixed.
The kernel calls are made from C++ (inductor's cpp_wrapper), since between kernels the main thread's serial work
keeps the other cores waiting. Attention reads only the filled part of the static cache (its length is passed
in, so one graph serves every length), through attention.py's `grouped_decode_sdpa`.

Compiling takes minutes the first time (inductor caches the result on disk, keyed by a digest of the weights), so
it runs in a background thread, ends with a check that one compiled step agrees with the eager one, and decoding
stays eager until it is ready, or whenever it cannot be used: a batch of another size than the one it was compiled
for, a padded row at batch 1, a context longer than the static cache, a second reply at the same time, a compiler
missing or failing, a failed check (the error is kept in `CompiledDecoder.error` and warned once).

Prompts still run through the engine's LLM; only the steps after the first token come here. The prompt's keys and
values are copied into the static cache before the first step, and the steps' keys and values are appended to the
session's DynamicCache afterwards, so a chat session continues from its cache exactly as with eager steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import re
import threading
import time
import types
import warnings

import torch
from transformers import StaticCache

from ..inference.generation import cache_kwarg, position_ids_from_mask
from . import decode_attention
from .background_compile import short_gil_slices, yielding_to_replies
from .weight_only import weight_only_copy

logger = logging.getLogger(__name__)
WARM_UP_STEPS = 4  # a few lengths, each through the one graph compiled for a symbolic length


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
    compile (each decoder has its own copy of the step's code). Checking them all cost the decode steps a few
    percent of their speed."""
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


def wait_for_compiled_steps(runtime) -> str:
    """For measurements: wait until the runtime's decode steps are compiled (if it compiles them) and say which
    steps generations of its decoder's batch size now use, "compiled" or "eager"."""
    decoder = runtime.decoder
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
        logger.debug("compiled decode steps ready after %.0f s", self.compile_seconds)

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
        # cpp_wrapper: the graph's few hundred kernel calls made from C++, not Python (faster)
        # cpp.min_chunk_size: the small elementwise kernels (SiLU * up...) stay on one thread; waking the other
        # costs more than it saves; the GEMM templates split their work over the threads regardless
        options = {"freezing": True, "max_autotune": True, "cpp_wrapper": True, "cpp.min_chunk_size": 8192}
        # autotuning's tables are printed straight to stderr, in the middle of a server's log: not shown
        options.update({k: v for k, v in (("autotune_num_choices_displayed", 0),
                                          ("max_autotune_report_choices_stats", False)) if hasattr(inductor, k)})
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
