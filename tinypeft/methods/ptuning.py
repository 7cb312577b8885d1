"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): prompt tuning whose NV virtual-token embeddings are
not free parameters but the output of a small network, the prompt encoder, over a trainable table:

    P = encoder(E),   E (NV, C) trainable,   P (NV, C) prepended to every sequence as prompt tuning does.

PEFT's two encoders (peft.tuners.p_tuning.PromptEncoder), with its tensor names:
- MLP:  P = relu(relu(E W0ᵀ + b0) W2ᵀ + b2) W4ᵀ + b4        mlp_head.{0,2,4}: (H, C), (H, H), (C, H)
- LSTM: a bidirectional LSTM of encoder_num_layers layers over the NV rows of E (one sequence, in order),
        its (NV, 2H) output through relu(· W0ᵀ + b0) W2ᵀ + b2   mlp_head.{0,2}: (2H, 2H), (C, 2H)
H = encoder_hidden_size (PEFT: the model width C when None). The virtual tokens then enter exactly as
prompt tuning's (prompt.py: the positions, the mask and the labels).

The LSTM's backward runs through time by hand (`lstm_direction_backward`); it is the one place a
method loops over positions, because each step needs the state of the one before. NV is small (20 by
default), and each step is a handful of (4H)-vector operations.

Saving is PEFT's: the file holds only the encoder's output, `prompt_embeddings` (NV, C). Loading such a
file replaces the encoder by that table (what PEFT computes with in inference mode); the encoder's own
tensors (the names below) load as themselves.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, namespace, to_numpy
from ..config import shown
from ..errors import CheckpointError, ConfigError, MergeError
from ..sites import Sites
from .base import Adapter, register
from .prompt import PROMPT_EMBEDDINGS, PromptEmbeddingSite, prompt_backward, prompt_forward
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, register_method
from .virtual_tokens import NUM_VIRTUAL_TOKENS, SHAPE_FIELDS_INERT, VirtualTokenConfig

if TYPE_CHECKING:
    from ..model import GPT

ENCODER_TYPES = ("MLP", "LSTM")
EMBEDDING = "prompt_encoder.embedding.weight"  # E (NV, C)


def head_names(n_linear: int) -> list[tuple[str, str]]:
    """(weight, bias) names of mlp_head's linear layers, at Sequential indices 0, 2, 4 (ReLUs between)."""
    return [
        (f"prompt_encoder.mlp_head.{2 * i}.weight", f"prompt_encoder.mlp_head.{2 * i}.bias") for i in range(n_linear)
    ]


def lstm_names(layer: int, reverse: bool) -> tuple[str, str, str, str]:
    """torch.nn.LSTM's names: weight_ih (4H, in), weight_hh (4H, H), bias_ih (4H,), bias_hh (4H,)."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    return tuple(
        f"prompt_encoder.lstm_head.{kind}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    )


# ------------------------------------------------------------------ forward / backward
def relu_mlp_forward(x: Array, layers: Sequence[tuple[Array, Array]]) -> tuple[Array, list]:
    """y = (relu ∘ linear)… ∘ linear: every linear but the last followed by a ReLU. x (N, in) -> y (N, out);
    each (W, b) is torch's (out, in), (out,). Cache: each linear's input."""
    xp = namespace(x, *(w for pair in layers for w in pair))
    inputs = []
    for i, (W, b) in enumerate(layers):
        inputs.append(x)
        x = x @ W.T + b  # [N, in] @ [in, out] -> [N, out]
        if i < len(layers) - 1:
            x = xp.maximum(x, 0.0)
    return x, inputs


def relu_mlp_backward(dy: Array, layers: Sequence[tuple[Array, Array]], inputs: list) -> tuple[Array, list]:
    """(dx, [(dW, db), ...]). in the forward pass this was: a_{i+1} = relu(a_i Wᵢᵀ + bᵢ) (no relu after the
    last), so from the top down: dWᵢ = dzᵢᵀ aᵢ, dbᵢ = Σ_rows dzᵢ, daᵢ = dzᵢ Wᵢ, and dz_{i-1} = daᵢ ⊙ [aᵢ > 0]
    (aᵢ = relu(z_{i-1}) > 0 exactly where z_{i-1} > 0)."""
    grads = []
    dz = dy
    for i in range(len(layers) - 1, -1, -1):
        W, _ = layers[i]
        grads.append((dz.T @ inputs[i], dz.sum(axis=0)))  # [out, N] @ [N, in] -> [out, in]; [out]
        da = dz @ W  # [N, out] @ [out, in] -> [N, in]
        dz = da * (inputs[i] > 0) if i > 0 else da
    return dz, grads[::-1]


def sigmoid(z: Array) -> Array:
    xp = namespace(z)
    return 0.5 * (1.0 + xp.tanh(0.5 * z))  # = 1 / (1 + e^-z), without overflow for large |z|


def lstm_direction_forward(x: Array, W_ih: Array, W_hh: Array, b_ih: Array, b_hh: Array, reverse: bool) -> tuple:
    """One direction of one LSTM layer over the rows of x (T, in), as torch.nn.LSTM, from h = c = 0:

        z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh          (4H,): the gates i, f, g, o in torch's order
        i, f, o = σ(z_i), σ(z_f), σ(z_o);  g = tanh(z_g)
        c_t = f ⊙ c_{t-1} + i ⊙ g;  h_t = o ⊙ tanh(c_t)

    visiting t = T-1 … 0 when `reverse`. Returns h (T, H) in the rows' order, and the cache: x, the
    weights, the order of the visit, and per step (h_{t-1}, c_{t-1}, i, f, g, o, tanh c_t).
    """
    xp = namespace(x, W_ih, W_hh, b_ih, b_hh)
    T, H = x.shape[0], W_hh.shape[1]
    projected = x @ W_ih.T + b_ih + b_hh  # [T, in] @ [in, 4H] -> [T, 4H]: every step's input part at once
    h = c = xp.zeros(H, dtype=x.dtype)
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    outputs: dict[int, Array] = {}
    steps = []
    for t in order:
        z = projected[t] + W_hh @ h  # [4H] + [4H, H] @ [H]
        i, f, g, o = sigmoid(z[:H]), sigmoid(z[H : 2 * H]), xp.tanh(z[2 * H : 3 * H]), sigmoid(z[3 * H :])
        c_new = f * c + i * g
        tanh_c = xp.tanh(c_new)
        steps.append((h, c, i, f, g, o, tanh_c))
        h, c = o * tanh_c, c_new
        outputs[t] = h
    return xp.stack([outputs[t] for t in range(T)]), (x, W_ih, W_hh, order, steps)


def lstm_direction_backward(dh_out: Array, cache: tuple) -> tuple[Array, Array, Array, Array]:
    """(dx, dW_ih, dW_hh, db) for one direction (db is both biases' gradient: they enter as a sum).

    in the forward pass this was, at each step in the visit's order: z = W_ih x_t + W_hh h_prev + b,
    c = f c_prev + i g, h = o tanh c, and h fed the next step and the output. Backward through time,
    visiting the steps in reverse, with dh and dc carried from the step after:
        dh = dh_out[t] + dh_carried          do = dh ⊙ tanh c
        dc = dh ⊙ o ⊙ (1 − tanh² c) + dc_carried
        di = dc ⊙ g,  df = dc ⊙ c_prev,  dg = dc ⊙ i,  dc_carried = dc ⊙ f
        dz = [di ⊙ i(1−i), df ⊙ f(1−f), dg ⊙ (1−g²), do ⊙ o(1−o)]      (4H,)
        dh_carried = W_hhᵀ dz
    then over all steps at once: dW_hh = Σ dz h_prevᵀ, dW_ih = dZᵀ x, db = Σ_t dz, dx = dZ W_ih.
    """
    x, W_ih, W_hh, order, steps = cache
    xp = namespace(dh_out, W_hh)
    H = W_hh.shape[1]
    dh_carried = dc_carried = xp.zeros(H, dtype=dh_out.dtype)
    dz_at: dict[int, Array] = {}
    h_prev_at: dict[int, Array] = {}
    for t, (h_prev, c_prev, i, f, g, o, tanh_c) in zip(reversed(order), reversed(steps), strict=True):
        dh = dh_out[t] + dh_carried
        dc = dh * o * (1.0 - tanh_c * tanh_c) + dc_carried
        dz = xp.concatenate(
            [dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)]
        )
        dc_carried = dc * f
        dh_carried = W_hh.T @ dz  # [H, 4H] @ [4H] -> [H]
        dz_at[t], h_prev_at[t] = dz, h_prev
    dZ = xp.stack([dz_at[t] for t in range(x.shape[0])])  # [T, 4H]
    h_prev_all = xp.stack([h_prev_at[t] for t in range(x.shape[0])])  # [T, H]
    return dZ @ W_ih, dZ.T @ x, dZ.T @ h_prev_all, dZ.sum(axis=0)  # [T, in], [4H, in], [4H, H], [4H]


def lstm_forward(x: Array, params: Mapping[str, Array], n_layers: int) -> tuple[Array, list]:
    """The bidirectional LSTM: layer l's input is layer l-1's [forward h, reverse h] (T, 2H)."""
    xp = namespace(x)
    caches = []
    for layer in range(n_layers):
        outs = []
        for reverse in (False, True):
            W_ih, W_hh, b_ih, b_hh = (params[n] for n in lstm_names(layer, reverse))
            out, cache = lstm_direction_forward(x, W_ih, W_hh, b_ih, b_hh, reverse)
            outs.append(out)
            caches.append(cache)
        x = xp.concatenate(outs, axis=1)  # [T, 2H]
    return x, caches


def lstm_backward(dy: Array, caches: list, n_layers: int) -> tuple[Array, dict[str, Array]]:
    """(dE, gradients by name): the layers top down, each direction's dx summed into the layer below."""
    grads: dict[str, Array] = {}
    H = dy.shape[1] // 2
    for layer in range(n_layers - 1, -1, -1):
        dx = 0.0
        for reverse in (False, True):
            half = dy[:, H:] if reverse else dy[:, :H]  # in the forward this was concatenate([fwd, rev])
            d_in, dW_ih, dW_hh, db = lstm_direction_backward(half, caches[2 * layer + reverse])
            W_ih, W_hh, b_ih, b_hh = lstm_names(layer, reverse)
            grads |= {W_ih: dW_ih, W_hh: dW_hh, b_ih: db, b_hh: db}
            dx = dx + d_in
        dy = dx
    return dy, grads


def prompt_encoder_forward(params: Mapping[str, Array], kind: str, n_layers: int) -> tuple[Array, tuple]:
    """P (NV, C) from E = params[EMBEDDING] through PEFT's encoder of `kind`. Embedding(arange(NV)) is E."""
    E = params[EMBEDDING]
    head = [(params[w], params[b]) for w, b in head_names(3 if kind == "MLP" else 2)]
    lstm_out, lstm_caches = lstm_forward(E, params, n_layers) if kind == "LSTM" else (E, None)
    P, head_inputs = relu_mlp_forward(lstm_out, head)  # [NV, C or 2H] -> [NV, C]
    return P, (head, head_inputs, lstm_caches)


def prompt_encoder_backward(dP: Array, cache: tuple, kind: str, n_layers: int) -> dict[str, Array]:
    """Every encoder tensor's gradient from dP (NV, C): the head, then the LSTM, down to dE."""
    head, head_inputs, lstm_caches = cache
    d_head_in, head_grads = relu_mlp_backward(dP, head, head_inputs)
    pairs = zip(head_names(len(head)), head_grads, strict=True)
    grads = {name: g for names, pair in pairs for name, g in zip(names, pair, strict=True)}
    if kind == "LSTM":
        d_head_in, lstm_grads = lstm_backward(d_head_in, lstm_caches, n_layers)
        grads |= lstm_grads
    grads[EMBEDDING] = d_head_in
    return grads


@dataclass(frozen=True)
class PromptEncoderSite:
    """The embedding site: computes P with the encoder, prepends it as prompt tuning does."""

    names: tuple[str, ...]
    kind: str
    n_layers: int

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.names

    def positions(self, params: Mapping[str, Array]) -> int:
        return params[EMBEDDING].shape[0]  # NV

    def forward(
        self, params: Mapping[str, Array], inputs_embeds: Array, attention_mask: Array | None
    ) -> tuple[Array, Array | None, tuple]:
        P, encoder_cache = prompt_encoder_forward(params, self.kind, self.n_layers)
        x, mask, NV = prompt_forward(P, inputs_embeds, attention_mask)
        return x, mask, (NV, encoder_cache)

    def backward(self, dembeds: Array, cache: tuple, trainable: Collection[str]) -> tuple[Array, dict[str, Array]]:
        NV, encoder_cache = cache
        need = [n for n in self.names if n in trainable]
        dtoken_embeds, dP = prompt_backward(dembeds, NV, bool(need))
        if not need:
            return dtoken_embeds, {}
        grads = prompt_encoder_backward(dP, encoder_cache, self.kind, self.n_layers)
        return dtoken_embeds, {n: grads[n] for n in need}


# ------------------------------------------------------------------ config and adapter
@register
@dataclass
class PromptEncoderConfig(VirtualTokenConfig):
    """P-tuning, with PEFT's PromptEncoderConfig fields: encoder_reparameterization_type "MLP" or "LSTM",
    encoder_hidden_size H (None: the model's width, as PEFT fills it), encoder_num_layers (the LSTM's
    layers; PEFT's MLP always has its 3 linears and ignores it), encoder_dropout (between LSTM layers
    while training, which tinypeft does not implement: it must be 0 for the LSTM; the MLP has none)."""

    peft_type = "P_TUNING"
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in ENCODER_TYPES:
            raise ConfigError(f"encoder_reparameterization_type must be one of {ENCODER_TYPES}; got {shown(kind)}")
        self.encoder_reparameterization_type = kind
        for name in ("encoder_hidden_size", "encoder_num_layers"):
            value = getattr(self, name)
            if value is None and name == "encoder_hidden_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**20:
                raise ConfigError(f"PromptEncoderConfig.{name} must be an integer in 1..{2**20}; got {shown(value)}")
        p = self.encoder_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"PromptEncoderConfig.encoder_dropout must be a probability in [0, 1); got {shown(p)}")
        if p and kind == "LSTM":
            raise ConfigError(
                f"encoder_dropout={shown(p)}: dropout between the LSTM's layers is not implemented in tinypeft; "
                "use 0 (PEFT's default)"
            )

    def hidden(self, base: GPT) -> int:
        return self.encoder_hidden_size or base.config.n_embd

    def shapes(self, base: GPT) -> dict[str, tuple[int, ...]]:
        """Every encoder tensor's shape, in PEFT's parameter order."""
        NV, C, H = self.num_virtual_tokens, base.config.n_embd, self.hidden(base)
        shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (NV, C)}
        if self.encoder_reparameterization_type == "LSTM":
            for layer in range(self.encoder_num_layers):
                for reverse in (False, True):
                    W_ih, W_hh, b_ih, b_hh = lstm_names(layer, reverse)
                    n_in = C if layer == 0 else 2 * H
                    shapes |= {W_ih: (4 * H, n_in), W_hh: (4 * H, H), b_ih: (4 * H,), b_hh: (4 * H,)}
            widths = [2 * H, 2 * H, C]
        else:
            widths = [C, H, H, C]
        for (w, b), n_in, n_out in zip(head_names(len(widths) - 1), widths, widths[1:], strict=False):
            shapes |= {w: (n_out, n_in), b: (n_out,)}
        return shapes

    def estimated_parameters(self, base: GPT) -> int:
        return sum(int(np.prod(s)) for s in self.shapes(base).values())

    def build(self, base: GPT, seed: int = 0) -> Adapter:
        """torch's inits, from NumPy's generator: E ~ N(0, 1) (nn.Embedding); a Linear's weight and bias
        ~ U(±1/√in) (nn.Linear); every LSTM tensor ~ U(±1/√H) (nn.LSTM)."""
        rng = np.random.default_rng(seed)
        H, params = self.hidden(base), {}
        for name, shape in self.shapes(base).items():
            if name == EMBEDDING:
                value = rng.standard_normal(shape)
            else:
                fan = H if ".lstm_head." in name else self.shapes(base)[name.replace(".bias", ".weight")][1]
                value = rng.uniform(-1 / np.sqrt(fan), 1 / np.sqrt(fan), size=shape)
            params[name] = base.xp.asarray(value.astype(base.config.dtype))
        return PromptEncoderAdapter(self.filled(base, encoder_hidden_size=H), base, params)


class PromptEncoderAdapter(Adapter):
    """The encoder's tensors, or (after loading a PEFT file, which holds only its output) the table."""

    @property
    def kind(self) -> str:
        return self.config.encoder_reparameterization_type

    @property
    def table_only(self) -> bool:
        return PROMPT_EMBEDDINGS in self.params

    def sites(self, training: bool = False) -> Sites:
        if self.table_only:
            return Sites(embedding=PromptEmbeddingSite())
        return Sites(embedding=PromptEncoderSite(tuple(self.params), self.kind, self.config.encoder_num_layers))

    def table(self) -> Array:
        """The (NV, C) virtual tokens this adapter prepends."""
        if self.table_only:
            return self.params[PROMPT_EMBEDDINGS]
        return prompt_encoder_forward(self.params, self.kind, self.config.encoder_num_layers)[0]

    def state_dict(self) -> dict[str, np.ndarray]:
        """What PEFT saves: {"prompt_embeddings": the encoder's output}."""
        return {PROMPT_EMBEDDINGS: to_numpy(self.table()).copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """{"prompt_embeddings": (NV, C)} (a PEFT file) replaces the encoder by that table; the encoder's
        own tensors load as themselves."""
        if isinstance(state, Mapping) and set(state) == {PROMPT_EMBEDDINGS} and not self.table_only:
            shape = tuple(self.params[EMBEDDING].shape)
            self.params = {PROMPT_EMBEDDINGS: self.params[EMBEDDING]}  # the table's shape is E's: (NV, C)
            try:
                super().load_state_dict(state)
            except CheckpointError:
                raise
            assert tuple(self.params[PROMPT_EMBEDDINGS].shape) == shape
            return
        super().load_state_dict(state)

    def can_merge(self) -> bool:
        return False

    def merge_error(self) -> MergeError:
        return MergeError(
            "P-tuning cannot be merged: its virtual tokens are extra inputs prepended to every sequence, not a "
            "change to any weight, so there is nothing to fold into the base model; keep the PeftModel "
            "(or save the adapter) to use them"
        )


# ------------------------------------------------------------------ the registry's entry
def _build(args: argparse.Namespace) -> PromptEncoderConfig:
    return PromptEncoderConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        encoder_reparameterization_type=args.encoder_reparameterization_type,
        encoder_hidden_size=args.encoder_hidden_size,
        encoder_num_layers=args.encoder_num_layers,
    )


def _ptuning(**kw: Any) -> Any:
    """A factory of a PromptEncoderConfig with 3 virtual tokens and H 5, or what `kw` says."""
    return lambda: PromptEncoderConfig(**{"num_virtual_tokens": 3, "encoder_hidden_size": 5, **kw})


def _error_cases() -> list[ErrorCase]:
    def refused(when: str, says: tuple[str, ...], **kw: Any) -> ErrorCase:
        return ErrorCase(when, as_is, ConfigError, says, config=_ptuning(**kw))

    return [
        refused("P-tuning encoder type unknown", ("'GRU'", "'MLP', 'LSTM'"), encoder_reparameterization_type="GRU"),
        refused("P-tuning encoder_hidden_size 0", ("encoder_hidden_size", "got 0", "1.."), encoder_hidden_size=0),
        refused("P-tuning encoder_num_layers not an integer", ("encoder_num_layers", "got 1.5"),
                encoder_num_layers=1.5),
        refused("P-tuning encoder_dropout 1", ("encoder_dropout", "got 1", "[0, 1)"), encoder_dropout=1),
        refused("P-tuning LSTM with dropout", ("encoder_dropout=0.1", "not implemented", "use 0"),
                encoder_reparameterization_type="LSTM", encoder_dropout=0.1),
        ErrorCase("merging P-tuning", lambda model: model.merge_and_unload(), MergeError,
                  ("P-tuning cannot be merged", "nothing to fold"), config=_ptuning()),
    ]  # fmt: skip


register_method(MethodSpec(
    name="ptuning",
    help="P-tuning: --num_virtual_tokens virtual tokens computed by a prompt encoder (MLP or LSTM)",
    default_lr=1e-2,  # the sweep in docs/ptuning.md: best task loss for the MLP at 200 steps
    build=_build,
    example=lambda cfg: PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=3),
    flags=(
        NUM_VIRTUAL_TOKENS,
        Flag(("--encoder_reparameterization_type",), {"choices": list(ENCODER_TYPES), "default": "MLP",
             "help": "the prompt encoder: PEFT's 3-layer MLP or its bidirectional LSTM + 2-layer MLP"}),
        Flag(("--encoder_hidden_size",), {"type": int, "default": None,
             "help": "the encoder's hidden size H (default: the model's width, as PEFT)"}),
        Flag(("--encoder_num_layers",), {"type": int, "default": 2, "help": "the LSTM's layers (MLP: unused)"}),
    ),
    golden_cases=(
        GoldenCase("ptuning", "mlp", "P-tuning, MLP encoder, 4 virtual tokens, H 5; NV + T = n_positions", ODD_EPS,
                   _ptuning(num_virtual_tokens=4), Batch(2, 7), seed=19),
        # seed 37: the LSTM's recurrent weights get the smallest gradients (h starts at 0); of seeds 20-39
        # and H 2-5 this one keeps every gradient above 1/100 of the largest, as every case must
        GoldenCase("ptuning", "lstm", "P-tuning, 2-layer bidirectional LSTM encoder, H 5; NV + T = n_positions; "
                   "padded batch", SMALL, _ptuning(num_virtual_tokens=4, encoder_reparameterization_type="LSTM"),
                   Batch(3, 8, "mixed"), seed=37),
    ),
    error_cases=_error_cases,
    inert_fields={
        **SHAPE_FIELDS_INERT,
        "encoder_dropout": "between LSTM layers while training only; tinypeft refuses it but 0",
    },
    peft_files="PEFT's P_TUNING: the encoder's output, the (NV, C) table, as prompt_embeddings and PEFT's "
    "adapter_config.json fields, so an adapter loads in PEFT and back (loading it, in either library, uses "
    "the table: the encoder is not saved)",
    loads_in_peft=True,
))  # fmt: skip
