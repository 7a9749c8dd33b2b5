"""A compact decoder forward over a Hugging Face model's own modules, with a static KV cache.

:class:`Decoder` holds references to the embeddings, norms and linear layers of a Llama-family causal LM
(``LlamaForCausalLM``, ``BitNetForCausalLM``, and the Llama-shaped Mistral / Qwen2 / Qwen3) and runs them in the
order their ``forward`` does, but over a preallocated :class:`StaticKVCache` and with
``F.scaled_dot_product_attention`` (for one token per row on the Triton backend,
:func:`bittern.kernels.decode_attention`: rope, cache write and attention in one kernel that reads only the slots
each row sees): every tensor shape of a decode step is fixed, so the step can be captured in a CUDA graph. The
linear layers are called as modules (``layer(x)``): a :class:`~bittern.nn.TernaryLinear`, a
:class:`~bittern.nn.BitLinear` or an ``nn.Linear`` each computes what it computes in the Hugging Face model.

Slots and positions: a batch of ``B`` prompts is left-padded to a common length ``P``; token ``t`` of the padded
batch lives in cache slot ``t`` for every row, and row ``b``'s first ``pad[b]`` slots are padding. The rope
position of slot ``t`` in row ``b`` is ``t - pad[b]``; a query at slot ``i`` sees the keys at slots
``pad[b] … i`` (and within the sliding window, if the layer has one). A padding query sees only itself, so
every softmax row has a finite maximum (no NaN reaches the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bittern import kernels, reference
from bittern.errors import ConfigError
from bittern.kernels import cpu
from bittern.nn import TernaryLinear, project


class _NotNativeError(Exception):
    """A module the native CPU decode step does not run (raised and caught while planning it)."""


SUPPORTED_MODEL_TYPES = ("llama", "bitnet", "mistral", "qwen2", "qwen3")
"""``config.model_type`` values whose decoder layer :class:`Decoder` reproduces."""


@dataclass(frozen=True)
class _Layer:
    """References to one decoder block's modules (None where the architecture has no such module)."""

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module | None  # Qwen3: RMSNorm over head_dim before rope
    k_norm: nn.Module | None
    attn_sub_norm: nn.Module | None  # BitNet: RMSNorm(hidden) before o_proj
    post_norm: nn.Module
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act: nn.Module
    ffn_sub_norm: nn.Module | None  # BitNet: RMSNorm(intermediate) before down_proj
    scaling: float
    sliding_window: int | None


_Norm = tuple[torch.Tensor, float]  # an RMSNorm's weight and epsilon
_Packed = tuple[torch.Tensor, int, torch.Tensor]  # a TernaryLinear's packed weight, out_features, weight scale


@dataclass(frozen=True)
class _NativeLayer:
    """One decoder block as the native CPU decode step runs it (:meth:`Decoder._native_step`): the tensors of its
    norms and packed layers, read once."""

    input_norm: _Norm
    qkv: list[_Packed]
    qkv_bias: list[torch.Tensor | None]
    o_proj: _Packed
    o_bias: torch.Tensor | None
    attn_sub_norm: _Norm | None
    post_norm: _Norm
    gate_up: list[_Packed]
    down: _Packed
    down_bias: torch.Tensor | None
    ffn_sub_norm: _Norm | None
    relu2: bool  # the activation is transformers' ReLUSquaredActivation (computed natively, bit for bit)


class StaticKVCache:
    """Keys and values of every layer, preallocated: ``keys[i]``, ``values[i]`` are ``[B, kv_heads, S, head_dim]``.

    ``B`` is the largest batch the engine runs and ``S`` its longest sequence; a batch of ``b <= B`` rows uses the
    views ``[:b]``. Writes go through ``index_put_`` on the whole cache tensor with tensors of rows and slots (or, for
    one token per row on the Triton backend, the attention kernel's own stores), so they are capturable in a CUDA
    graph and, compiled, write only those slots (a write through a ``[:b]`` view compiles to a new buffer holding
    every slot of those rows, copied back into the cache).
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.batch = batch
        self.max_seq_len = max_seq_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _module(parent: nn.Module, name: str, where: str) -> nn.Module:
    module = getattr(parent, name, None)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where} has no '{name}' module; the engine supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    return module


def _sliding_window(config, index: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


_HF_RMS_NORMS = frozenset({"LlamaRMSNorm", "BitNetRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
"""Hugging Face norm classes whose forward is ``LlamaRMSNorm``'s (``weight``, ``variance_epsilon``): the ones
:func:`bittern.kernels.rms_norm` computes."""


def _norm(
    norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None, consumers: list[nn.Module]
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``s = x + delta`` (``x`` when ``delta`` is None), ``norm(s)`` and, when every one of ``consumers`` (the layers
    reading the norm's output) is a packed ternary layer, the output's int8 quantization for them:
    ``(s, normed, quantized or None)``.

    On the Triton backend, outside torch.compile, a Hugging Face RMSNorm is one fused kernel
    (:func:`bittern.kernels.rms_norm`: the add, the norm and the quantization in one pass; the eager prompt forward
    would otherwise launch seven or more kernels); on the native CPU kernels the add and the norm are one call (the
    packed products that follow quantize their input themselves). Elsewhere the module itself runs: under
    torch.compile inductor fuses the same work, and the traced graph stays the model's own."""
    triton = kernels.uses_triton(x)
    fused = (
        type(norm).__name__ in _HF_RMS_NORMS
        and not torch.compiler.is_compiling()
        and (triton or kernels.native_cpu(x))
        and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))  # kernels: no autograd
    )
    if fused:
        quantize = triton and all(isinstance(layer, TernaryLinear) for layer in consumers)
        return kernels.rms_norm(x, norm.weight, norm.variance_epsilon, delta, quantize)
    summed = x if delta is None else x + delta
    return summed, norm(summed), None


class Decoder:
    """The forward pass of a Hugging Face causal LM, over a static KV cache.

    Args:
        model: a ``LlamaForCausalLM``-shaped model (see :data:`SUPPORTED_MODEL_TYPES`), on its device and dtype.
        max_seq_len: the longest sequence (prompt + new tokens) the rope table covers.

    Raises:
        ConfigError: an unsupported architecture, or ``max_seq_len`` beyond ``max_position_embeddings``.
    """

    def __init__(self, model: nn.Module, max_seq_len: int) -> None:
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"the engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models, not model_type {model_type!r}"
            )
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_seq_len > limit:
            raise ConfigError(f"max_seq_len ({max_seq_len}) exceeds the model's max_position_embeddings ({limit})")
        base = _module(model, "model", type(model).__name__)
        self.config = config
        self.embed = _module(base, "embed_tokens", "the decoder")
        self.norm = _module(base, "norm", "the decoder")
        head = model.get_output_embeddings()
        if head is None:
            raise ConfigError(f"{type(model).__name__} has no output embeddings (LM head)")
        self.head = head
        self.layers = [self._layer(block, i, _sliding_window(config, i)) for i, block in enumerate(base.layers)]
        self.head_dim: int = base.layers[0].self_attn.head_dim
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.max_seq_len = max_seq_len
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        # The rope table from the model's own rotary module (any rope type its config names), built once:
        # cos/sin [max_seq_len, head_dim] in the model's dtype, exactly as the model computes them per forward.
        positions = torch.arange(max_seq_len, device=self.device)[None]
        probe = torch.zeros((), dtype=self.dtype, device=self.device)
        cos, sin = _module(base, "rotary_emb", "the decoder")(probe, position_ids=positions)
        self.cos, self.sin = cos[0], sin[0]
        self.slots = torch.arange(max_seq_len, device=self.device)
        self._native: list[_NativeLayer] | bool | None = None  # the native decode plan; False: not this model

    @staticmethod
    def _layer(block: nn.Module, index: int, sliding_window: int | None) -> _Layer:
        where = f"decoder layer {index}"
        attn = _module(block, "self_attn", where)
        mlp = _module(block, "mlp", where)
        return _Layer(
            input_norm=_module(block, "input_layernorm", where),
            q_proj=_module(attn, "q_proj", where),
            k_proj=_module(attn, "k_proj", where),
            v_proj=_module(attn, "v_proj", where),
            o_proj=_module(attn, "o_proj", where),
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            attn_sub_norm=getattr(attn, "attn_sub_norm", None),
            post_norm=_module(block, "post_attention_layernorm", where),
            gate_proj=_module(mlp, "gate_proj", where),
            up_proj=_module(mlp, "up_proj", where),
            down_proj=_module(mlp, "down_proj", where),
            act=mlp.act_fn,
            ffn_sub_norm=getattr(mlp, "ffn_sub_norm", None),
            scaling=float(attn.scaling),
            sliding_window=sliding_window,
        )

    def new_cache(self, batch: int) -> StaticKVCache:
        """A zeroed cache for ``batch`` rows of up to ``max_seq_len`` tokens, in the model's dtype and device."""
        return StaticKVCache(
            len(self.layers), batch, self.num_kv_heads, self.max_seq_len, self.head_dim, self.dtype, self.device
        )

    def _mask(self, slots: torch.Tensor, pad: torch.Tensor, key_len: int, window: int | None) -> torch.Tensor:
        """bool ``[B, 1, T, key_len]``: which key slots each query slot sees (see the module docstring)."""
        keys = self.slots[:key_len][None, None, :]  # [1, 1, S]
        queries = slots[None, :, None]  # [1, T, 1]
        causal = keys <= queries
        real = keys >= pad[:, None, None]  # [B, 1, S]
        allowed = causal & (real | (keys == queries))
        if window is not None:
            allowed = allowed & (keys > queries - window)
        return allowed[:, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        slots: torch.Tensor,
        pad: torch.Tensor,
        cache: StaticKVCache,
        key_len: int,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run ``input_ids`` through the model, writing their keys and values into ``cache``.

        Args:
            input_ids: int64 ``[B, T]``, the tokens of slots ``slots`` of every row.
            slots: int64 ``[T]``, consecutive cache slots of the tokens (the same for every row).
            pad: int64 ``[B]``, the number of left-padding slots of each row.
            cache: the cache to read and write (rows ``[:B]``).
            key_len: how many cache slots attention reads (``>= slots[-1] + 1``); the decode step reads all
                ``max_seq_len`` slots so that its shapes never change.
            last_only: compute the LM head only for the last token.

        Returns:
            logits ``[B, T, V]`` (``[B, 1, V]`` with ``last_only``) in the model's dtype.
        """
        batch, length = input_ids.shape
        if length == 1 and self._native_step_applies():
            return self._native_step(input_ids, slots, pad, cache)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [B, 1, T, D] of the masked path, made once
        masks: dict[int | None, torch.Tensor] = {}
        groups = self.num_heads // self.num_kv_heads
        x = self.embed(input_ids)
        pending: torch.Tensor | None = None  # the last block's output, added into x by the next norm
        for index, layer in enumerate(self.layers):
            qkv = [layer.q_proj, layer.k_proj, layer.v_proj]
            x, h, quantized = _norm(layer.input_norm, x, pending, qkv)
            q, k, v = project(h, qkv, quantized)  # one launch when they are packed
            q = q.view(batch, length, self.num_heads, self.head_dim)
            k = k.view(batch, length, self.num_kv_heads, self.head_dim)
            v = v.view(batch, length, self.num_kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q = layer.q_norm(q)
            if layer.k_norm is not None:
                k = layer.k_norm(k)
            if length == 1 and kernels.decode_attention_applies(q):  # rope, cache write and attention: one kernel
                out = kernels.decode_attention(  # the rope tables whole: the kernel reads its positions' rows
                    q.reshape(batch, self.num_kv_heads, groups, self.head_dim),  # the query heads of one KV head
                    k.reshape(batch, self.num_kv_heads, self.head_dim),
                    v.reshape(batch, self.num_kv_heads, self.head_dim),
                    self.cos, self.sin, cache.keys[index], cache.values[index], slots, pad, layer.scaling,
                    layer.sliding_window,
                )  # fmt: skip
            else:
                if rope is None:
                    positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # [B, T]
                    rope = (self.cos[positions][:, None], self.sin[positions][:, None])
                out = self._attention(index, layer, q, k, v, *rope, slots, pad, cache, key_len, masks)
            out = out.reshape(batch, self.num_heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)
            quantized = None
            if layer.attn_sub_norm is not None:
                _, out, quantized = _norm(layer.attn_sub_norm, out, None, [layer.o_proj])
            attended = project(out, [layer.o_proj], quantized)[0]
            gate_up = [layer.gate_proj, layer.up_proj]
            x, h, quantized = _norm(layer.post_norm, x, attended, gate_up)
            gate, up = project(h, gate_up, quantized)
            h = layer.act(gate) * up
            quantized = None
            if layer.ffn_sub_norm is not None:
                _, h, quantized = _norm(layer.ffn_sub_norm, h, None, [layer.down_proj])
            pending = project(h, [layer.down_proj], quantized)[0]
        if last_only:
            x = x[:, -1:]
            pending = None if pending is None else pending[:, -1:]
        return project(_norm(self.norm, x, pending, [self.head])[1], [self.head])[0]

    # --- the native CPU decode step -------------------------------------------------------------------------------

    def _native_plan(self) -> list[_NativeLayer] | None:
        """Every block's tensors for :meth:`_native_step`, or None when some module is not one it runs (a norm other
        than a Hugging Face RMSNorm, a projection other than a packed :class:`~bittern.nn.TernaryLinear`, q/k norms).
        Read once: like a captured CUDA graph, the step then holds these tensors (the engine never replaces them)."""

        def norm(module: nn.Module | None) -> _Norm | None:
            if module is None:
                return None
            if type(module).__name__ not in _HF_RMS_NORMS or module.weight.dtype not in kernels.CPU_FLOATS:
                raise _NotNativeError
            return module.weight, float(module.variance_epsilon)

        def packed(module: nn.Module) -> _Packed:
            if not isinstance(module, TernaryLinear):
                raise _NotNativeError
            return module.packed_weight, module.out_features, module.weight_scale

        try:
            plan = []
            for layer in self.layers:
                if layer.q_norm is not None or layer.k_norm is not None:
                    raise _NotNativeError
                qkv = [layer.q_proj, layer.k_proj, layer.v_proj]
                plan.append(
                    _NativeLayer(
                        input_norm=norm(layer.input_norm),
                        qkv=[packed(m) for m in qkv],
                        qkv_bias=[m.bias for m in qkv],
                        o_proj=packed(layer.o_proj),
                        o_bias=layer.o_proj.bias,
                        attn_sub_norm=norm(layer.attn_sub_norm),
                        post_norm=norm(layer.post_norm),
                        gate_up=[packed(layer.gate_proj), packed(layer.up_proj)],
                        down=packed(layer.down_proj),
                        down_bias=layer.down_proj.bias,
                        ffn_sub_norm=norm(layer.ffn_sub_norm),
                        relu2=type(layer.act).__name__ == "ReLUSquaredActivation",
                    )
                )
            norm(self.norm)
        except _NotNativeError:
            return None
        if self.embed.weight.dtype not in kernels.CPU_FLOATS or self.dtype not in kernels.CPU_FLOATS:
            return None
        return plan

    def _native_step_applies(self) -> bool:
        """Whether a one-token step runs on :meth:`_native_step`: a CPU model on the native kernels (the ``auto``
        backend, outside torch.compile), no gradient, no autocast, and a model it runs (:meth:`_native_plan`)."""
        if self._native is False or self.device.type != "cpu":
            return False
        if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not kernels.native_cpu(self.slots):
            return False
        if self._native is None:
            self._native = self._native_plan() or False
        return self._native is not False

    def _native_step(
        self, input_ids: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor, cache: StaticKVCache
    ) -> torch.Tensor:
        """:meth:`forward` of one token per row on the native CPU kernels, without the dispatch of every call: per
        block each norm and the packed layers reading it in one call (:func:`bittern.kernels.cpu.norm_linear`; a
        BitNet feed-forward's relu² and ``ffn_sub_norm`` in the ``down_proj`` call), rope + cache write + attention
        in one (:func:`bittern.kernels.cpu.decode_attention`): four or five calls a block. The same numbers as
        :meth:`forward` on the native kernels. ``[B, 1, V]`` logits."""
        plan = self._native
        assert isinstance(plan, list)
        batch = input_ids.shape[0]
        dtype = self.dtype
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        groups = heads // kv_heads
        x = self.embed(input_ids)
        pending: torch.Tensor | None = None
        for index, (layer, block) in enumerate(zip(self.layers, plan, strict=True)):
            if any(b is not None for b in block.qkv_bias):
                x, h = cpu.rms_norm(x, *block.input_norm, pending)
                q, k, v = (cpu.packed_linear(h, *w, b, dtype) for w, b in zip(block.qkv, block.qkv_bias, strict=True))
            else:
                x, (q, k, v) = cpu.norm_linear(x, *block.input_norm, *zip(*block.qkv, strict=True), residual=pending,
                                               out_dtype=dtype)  # fmt: skip
            out = cpu.decode_attention(
                q.view(batch, kv_heads, groups, dim), k.view(batch, kv_heads, dim), v.view(batch, kv_heads, dim),
                self.cos, self.sin, cache.keys[index], cache.values[index], slots, pad, layer.scaling,
                layer.sliding_window,
            ).view(batch, 1, heads * dim)  # fmt: skip
            if block.attn_sub_norm is not None:
                attended = cpu.norm_linear(out, *block.attn_sub_norm, *zip(block.o_proj), bias=block.o_bias,
                                           out_dtype=dtype)[1][0]  # fmt: skip
            else:
                attended = cpu.packed_linear(out, *block.o_proj, block.o_bias, dtype)
            x, (gate, up) = cpu.norm_linear(x, *block.post_norm, *zip(*block.gate_up, strict=True), residual=attended,
                                            out_dtype=dtype)  # fmt: skip
            if block.relu2 and block.ffn_sub_norm is not None:  # ffn_sub_norm(relu(gate)² * up) in the same call
                pending = cpu.norm_linear(up, *block.ffn_sub_norm, *zip(block.down), gate=gate, bias=block.down_bias,
                                          out_dtype=dtype)[1][0]  # fmt: skip
                continue
            h = cpu.relu2_mul(gate, up) if block.relu2 else layer.act(gate) * up
            if block.ffn_sub_norm is not None:
                pending = cpu.norm_linear(h, *block.ffn_sub_norm, *zip(block.down), bias=block.down_bias,
                                          out_dtype=dtype)[1][0]  # fmt: skip
            else:
                pending = cpu.packed_linear(h, *block.down, block.down_bias, dtype)
        h = cpu.rms_norm(x, self.norm.weight, float(self.norm.variance_epsilon), pending)[1]
        return project(h, [self.head])[0]

    def _attention(
        self,
        index: int,
        layer: _Layer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        pad: torch.Tensor,
        cache: StaticKVCache,
        key_len: int,
        masks: dict[int | None, torch.Tensor],
    ) -> torch.Tensor:
        """Rope, the cache write and masked SDPA of layer ``index`` for ``q`` ``[B, T, H, D]`` and ``k`` / ``v``
        ``[B, T, H_kv, D]`` (``cos`` / ``sin`` ``[B, 1, T, D]``; ``masks`` per sliding window, filled on first use):
        ``[B, H_kv, G * T, D]``."""
        batch, length = q.shape[:2]
        groups = self.num_heads // self.num_kv_heads
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        q = reference.rotate_half_rope(q, cos, sin)
        k = reference.rotate_half_rope(k, cos, sin)
        rows = torch.arange(batch, device=q.device)[:, None, None]
        heads = torch.arange(self.num_kv_heads, device=q.device)[None, :, None]
        where = (rows, heads, slots[None, None, :])  # [B, 1, 1], [1, H_kv, 1], [1, 1, T]: each slot written
        cache.keys[index].index_put_(where, k)
        cache.values[index].index_put_(where, v)
        keys, values = cache.keys[index][:batch], cache.values[index][:batch]
        if layer.sliding_window not in masks:
            mask = self._mask(slots, pad, key_len, layer.sliding_window)  # [B, 1, T, S]
            masks[layer.sliding_window] = mask.repeat(1, 1, groups, 1)  # once per head of the group
        # grouped-query attention without repeating the cache: the query heads of one KV head are stacked
        return F.scaled_dot_product_attention(
            q.reshape(batch, self.num_kv_heads, groups * length, self.head_dim),
            keys[:, :, :key_len],
            values[:, :, :key_len],
            attn_mask=masks[layer.sliding_window],
            scale=layer.scaling,
        )  # [B, kv_heads, groups * T, D]
