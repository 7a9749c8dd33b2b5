"""Ternary layers: :class:`BitLinear` for training and :class:`TernaryLinear` for packed inference.

Both compute through :mod:`bittern.quant`; neither holds any math of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bittern import kernels, packing, quant
from bittern.kernels import shapes


class BitLinear(nn.Linear):
    """A linear layer trained with ternary weights and int8 activations (BitNet b1.58).

    It keeps full-precision latent weights (``weight``, ``[N, K]``) and, in the forward pass, uses their
    fake-quantized value ``Wt / s_w`` on fake-quantized activations ``xq / s_x``; gradients pass both
    quantizers unchanged (straight-through estimator). Being an ``nn.Linear`` subclass, PEFT and
    transformers see ``in_features``, ``out_features``, ``weight`` and ``bias`` as usual.

    Attributes:
        lam: quantization strength λ in [0, 1] (0 = full precision, 1 = fully ternary); a warmup schedule
            moves it from 0 to 1 when converting a full-precision model.
        per_channel: one weight scale per output row instead of one per tensor.
        quantize_activations: switch activation quantization off (weights stay ternary); used to compare
            with the bf16 variant, which has no activation quantization.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        lam: float = 1.0,
        per_channel: bool = False,
        quantize_activations: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lam = lam
        self.per_channel = per_channel
        self.quantize_activations = quantize_activations

    @property
    def lam(self) -> float:
        """The quantization strength λ in [0, 1]; setting anything else raises ``ValueError``."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = quant.check_lam(value)

    @classmethod
    def from_linear(cls, linear: nn.Linear, lam: float = 1.0, per_channel: bool = False) -> BitLinear:
        """A BitLinear that shares ``linear``'s parameters (no copy; works on meta, cpu and cuda)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
            lam=lam,
            per_channel=per_channel,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing the latent weights (the full-precision view of this layer)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=self.weight.dtype
        )
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., K]`` → ``[..., N]`` in ``x``'s dtype.

        Fully quantized (λ = 1, activations quantized) the output is computed from integers exactly as
        :class:`TernaryLinear` computes it (bit-identical), through :mod:`bittern.kernels` (the Triton kernels
        on a GPU); inside an autocast region it comes out in autocast's dtype, like ``nn.Linear``'s. Otherwise
        (the λ warmup) it is computed from the blended fake-quantized tensors. Gradients follow the
        straight-through estimator in both cases.
        """
        if self.lam == 1.0 and self.quantize_activations:
            return kernels.ternary_linear(x, self.weight, self.bias, self.per_channel)
        if self.quantize_activations:
            x = quant.ste_activations(x, self.lam)
        weight = quant.ste_weight(self.weight, self.lam, self.per_channel)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam}, per_channel={self.per_channel}"


class TernaryLinear(nn.Module):
    """A packed ternary linear layer for inference.

    Buffers:
        packed_weight: uint8 ``[ceil(N/4), K]`` in the Hugging Face 2-bit layout (:mod:`bittern.packing`).
        weight_scale: float32 ``[1]`` (per tensor) or ``[N]`` (per channel): ``s_w = 1 / mean|W|``, the published
            reciprocal scale (transformers' ``BitLinear.weight_scale``); a code is worth ``1 / s_w``. It stays
            float32 when the module is cast to another dtype.
        bias: ``[N]`` full precision or None (never quantized).

    Forward: per-token int8 activation quantization, exact integer matmul, divided by ``s_w * s_x``,
    bias: :func:`bittern.quant.integer_linear`, through :mod:`bittern.kernels`. On a GPU the Triton kernels
    multiply straight from ``packed_weight`` (decode and prefill kernels, :mod:`bittern.kernels.packed`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        per_channel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.per_channel = per_channel
        rows = packing.packed_rows(out_features)
        # byte value 0b01010101 = code 0 in every slot
        self.register_buffer("packed_weight", torch.full((rows, in_features), 0x55, dtype=torch.uint8, device=device))
        self.register_buffer(
            "weight_scale", torch.ones(out_features if per_channel else 1, dtype=torch.float32, device=device)
        )
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(), device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        per_channel: bool | None = None,
    ) -> TernaryLinear:
        """Build from int8 codes ``[N, K]``, a float32 weight scale ``s_w`` ``[1]`` or ``[N]`` and a bias."""
        return cls.from_packed(packing.pack_ternary_rows(codes), codes.shape[0], scale, bias, per_channel)

    @classmethod
    def from_packed(
        cls,
        packed: torch.Tensor,
        out_features: int,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        per_channel: bool | None = None,
    ) -> TernaryLinear:
        """Build from packed codes as stored (uint8 ``[ceil(N/4), K]``, :mod:`bittern.packing`; held, not copied),
        ``N = out_features``, a float32 weight scale ``s_w`` ``[1]`` or ``[N]`` and a bias."""
        if packed.dim() != 2 or packed.dtype != torch.uint8 or packed.shape[0] != packing.packed_rows(out_features):
            raise ValueError(
                f"packed codes for {out_features} outputs must be uint8 [{packing.packed_rows(out_features)}, K], "
                f"got {packed.dtype} {tuple(packed.shape)}"
            )
        if per_channel is None:
            per_channel = scale.numel() != 1
        layer = cls(packed.shape[1], out_features, bias=bias is not None, per_channel=per_channel, device="meta")
        layer.packed_weight = packed.contiguous()
        layer.weight_scale = scale.detach().to(torch.float32).reshape(-1).clone()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @classmethod
    def from_bitlinear(cls, layer: nn.Linear, per_channel: bool | None = None) -> TernaryLinear:
        """Quantize a trained :class:`BitLinear` (or any ``nn.Linear``) into a packed layer.

        Codes and scale come from the latent weights as stored, upcast to float32 (never from a bf16-rounded
        copy), so the packed layer computes exactly what ``BitLinear.eval()`` computes.
        """
        if per_channel is None:
            per_channel = getattr(layer, "per_channel", False)
        codes, scale = quant.ternarize(layer.weight, per_channel=per_channel)
        return cls.from_codes(codes, scale, layer.bias, per_channel=per_channel)

    def to_bitlinear(self, dtype: torch.dtype = torch.float32, lam: float = 1.0) -> BitLinear:
        """A :class:`BitLinear` whose fake-quantized weight equals this layer's ``Wt / s_w`` (up to the last bit of
        the scale).

        The latent weight is ``(Wt / s_w) / d`` with ``d`` the fraction of non-zero codes (per tensor or per
        row): its mean ``|W|`` is ``1 / s_w`` again, so re-ternarizing yields the same codes and the scale to
        float32 rounding. (Taking ``Wt / s_w`` itself as the latent weight would shrink the magnitude by ``d``.)
        """
        codes = self.codes()
        density = codes.ne(0).to(torch.float32)
        density = density.mean(dim=1, keepdim=True) if self.per_channel else density.mean().reshape(1, 1)
        latent = quant.dequantize_weight(codes, self.weight_scale) / density.clamp(min=1e-12)
        layer = BitLinear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.packed_weight.device,
            dtype=dtype,
            lam=lam,
            per_channel=self.per_channel,
        )
        with torch.no_grad():
            layer.weight.copy_(latent.to(dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias.to(dtype))
        return layer

    # --- views ----------------------------------------------------------------------------------------

    @property
    def qweight(self) -> torch.Tensor:
        """``packed_weight`` under the name PEFT looks for on a quantized linear layer (GPTQ and AWQ layers call
        their packed integer weight ``qweight``). PEFT reads it to put adapters on this layer's device (a layer of
        buffers only has no parameter to ask) and keeps adapters in their own float dtype, since it is not
        floating. Read-only; not part of the state dict."""
        return self.packed_weight

    def codes(self) -> torch.Tensor:
        """The ternary codes, int8 ``[N, K]`` (unpacked in one Triton pass on the Triton backend)."""
        return kernels.unpack_codes(self.packed_weight, self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Wt / s_w`` as a dense ``[N, K]`` tensor of ``dtype``."""
        return quant.dequantize_weight(self.codes(), self.weight_scale, dtype)

    # --- module protocol ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., K]`` floating → ``[..., N]`` in ``x``'s dtype (autocast's inside an autocast region).

        Without gradients, the product runs straight from the packed weight (on a GPU: the packed-weight
        inference kernels). When ``x`` needs a gradient (adapters or anything else training below this frozen
        layer), the backward pass keeps this layer's 2-bit packed weight rather than the int8 codes the product
        ran on, and unpacks them again when the gradient ``grad_y @ (Wt / s_w)`` is computed: a quarter of the memory
        per layer held from forward to backward.
        """
        if not (torch.is_grad_enabled() and x.requires_grad):
            return kernels.packed_linear(x, self.packed_weight, self.out_features, self.weight_scale, self.bias)
        codes = self.codes()
        # (under torch.compile the compiled graph decides what backward keeps; dynamo does not trace these hooks)
        if torch.compiler.is_compiling():
            return kernels.integer_linear(x, codes, self.weight_scale, self.bias)
        packed, rows = self.packed_weight, self.out_features

        def keep(tensor: torch.Tensor):
            return _PackedCodes(packed, rows) if tensor is codes else tensor

        def restore(saved):
            return saved.unpack() if isinstance(saved, _PackedCodes) else saved

        with torch.autograd.graph.saved_tensors_hooks(keep, restore):
            return kernels.integer_linear(x, codes, self.weight_scale, self.bias)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # Keep the scale in float32 when the module is cast (model.to(torch.bfloat16)): move it, never round it.
        scale = self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(scale) if scale is not None else None
            self._buffers["weight_scale"] = (
                None if scale is None else scale.to(device=moved.device, dtype=torch.float32)
            )
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, per_channel={self.per_channel}"
        )


class _PackedCodes:
    """What a :class:`TernaryLinear` saves for backward in place of its int8 codes: the packed weight itself."""

    __slots__ = ("packed", "rows")

    def __init__(self, packed: torch.Tensor, rows: int) -> None:
        self.packed = packed
        self.rows = rows

    def unpack(self) -> torch.Tensor:
        return kernels.unpack_codes(self.packed, self.rows)


def project(
    x: torch.Tensor, layers: list[nn.Module], quantized: tuple[torch.Tensor, torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]``, with bias-free :class:`TernaryLinear` layers of one input (q/k/v,
    gate/up) decoded in one kernel launch where :func:`bittern.kernels.packed_linear_group` applies: the same
    numbers, fewer launches.

    Plain ``nn.Linear`` layers (a bf16 checkpoint's, an LM head) run on :func:`bittern.kernels.dense_linear` where
    :func:`bittern.kernels.dense_linear_applies`: a decode step's one row, or a few rows of an LM head.

    ``quantized``: ``x``'s per-token int8 quantization made beforehand, ``(xq, a)`` as
    :func:`bittern.quant.quantize_activations` gives it (e.g. by :func:`bittern.kernels.rms_norm` with the norm that
    made ``x``): one to three packed layers (only a lone one with a bias) then take it and skip quantizing ``x``
    again; any other layers ignore it.
    """
    needs_grad = torch.is_grad_enabled() and x.requires_grad  # then each layer's own forward (and backward)
    if (
        quantized is not None
        and not needs_grad
        and all(isinstance(la, TernaryLinear) for la in layers)
        and shapes.groupable([la.weight_scale for la in layers], [la.bias for la in layers])
    ):
        return kernels.packed_quantized(
            *quantized,
            [layer.packed_weight for layer in layers],
            [layer.out_features for layer in layers],
            [layer.weight_scale for layer in layers],
            layers[0].bias,
            kernels.output_dtype(x),
        )
    if all(type(la) is nn.Linear and kernels.dense_linear_applies(x, la.weight) for la in layers):
        return [kernels.dense_linear(x, layer.weight, layer.bias) for layer in layers]
    if len(layers) > 1 and not needs_grad and all(isinstance(la, TernaryLinear) and la.bias is None for la in layers):
        return kernels.packed_linear_group(
            x,
            [layer.packed_weight for layer in layers],
            [layer.out_features for layer in layers],
            [layer.weight_scale for layer in layers],
        )
    return [layer(x) for layer in layers]
