"""The decode steps' copy of the LLM: weight-only int8 and int4 linear layers in bf16, for the compiled decode
steps (compiled_decoder.py). A decode step reads every weight once to produce one token, so fewer bytes per
weight is what makes it fast; activations stay bf16 and nothing is quantised per call. Where a weight already lies
on a 4-bit grid (the bundled SmolLM2 comes from a Q4_1 GGUF file), int4 reproduces it exactly in fewer bytes than
int8; everything else is int8 with one scale per output channel. The layers are written as the patterns inductor
replaces by its int8 / int4 weight-only GEMM kernels: they are never run eagerly in the fast path."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear

from .attention import use_decode_attention
from .fused_projections import fuse_projections, merge_lora
from .policy import int4_kernels_pay_off

INT4_GROUP = 32  # weights per scale and zero point along a row: Q4_1's blocks, and torch's int4 kernels take it
# A LoRA adapter on an int4 layer costs two small matmuls a step (merged, it would move the weights off their
# grid); they pay for themselves only on large layers. Below this many weights a layer with an adapter stays int8,
# adapter merged.
LORA_SIDE_PATH_MIN_WEIGHTS = 1 << 20


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
    int4 values outside the top 16."""

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
    use_decode_attention(fast)
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
