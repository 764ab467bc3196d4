"""Model configuration for the Llama-2 family (Self-RAG 7B / 13B).

``ModelConfig`` is the single source of truth for the model's shape.  It reads
the ``config.json`` written by transformers 4.x *and* 5.x, and writes one that
both read back to the same values.

Spelling differences handled here:

====================  ==========================================  ===========================================
value                 transformers 4                              transformers 5
====================  ==========================================  ===========================================
RoPE base             ``rope_theta`` (top level)                  ``rope_parameters.rope_theta``
RoPE scaling          ``rope_scaling: {"type"|"rope_type",         ``rope_parameters: {"rope_type": "default"|
                      "factor"}`` or ``null``                      "linear", "factor", ...}``
weight dtype          ``torch_dtype``                             ``dtype``
head size             usually absent (hidden / heads)             ``head_dim``
====================  ==========================================  ===========================================
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from engine.errors import ConfigError, read_json

__all__ = ["ModelConfig", "BUILTIN_CONFIGS"]

_SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
_DTYPE_ALIASES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "torch.float16": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "torch.float32": "float32",
}
_SUPPORTED_ROPE_TYPES = ("default", "linear")
_SUPPORTED_ACTS = ("silu", "swish")

# HF LlamaConfig defaults for optional fields.
_DEFAULT_RMS_EPS = 1e-6
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_MAX_POS = 2048
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = _DEFAULT_RMS_EPS
    rope_theta: float = _DEFAULT_ROPE_THETA
    rope_scaling_factor: float = 1.0  # linear position interpolation; 1.0 = none
    max_position_embeddings: int = _DEFAULT_MAX_POS
    tie_word_embeddings: bool = False
    dtype: str | None = None  # 'bfloat16' | 'float16' | 'float32' | None (unspecified)
    bos_token_id: int | None = 1
    # int, tuple of ints (a JSON list is stored as a tuple so the config stays hashable), or None
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    hidden_act: str = "silu"

    # ------------------------------------------------------------------ checks
    def __post_init__(self) -> None:
        src = "ModelConfig"
        for name in _REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"field {name!r} must be a positive integer, got {v!r}", file=src)
        for name in ("rms_norm_eps", "rope_theta", "rope_scaling_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"field {name!r} must be a positive number, got {v!r}", file=src)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"field 'tie_word_embeddings' must be a bool, got {self.tie_word_embeddings!r}", file=src)
        if self.hidden_act not in _SUPPORTED_ACTS:
            raise ConfigError(
                f"field 'hidden_act' = {self.hidden_act!r} is not supported (only 'silu' Llama MLPs are)", file=src
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"field 'num_attention_heads' = {self.num_attention_heads} does not divide "
                f"hidden_size = {self.hidden_size}",
                file=src,
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"field 'num_key_value_heads' = {self.num_key_value_heads} does not divide "
                f"num_attention_heads = {self.num_attention_heads}",
                file=src,
            )
        if self.head_dim % 2:
            raise ConfigError(f"field 'head_dim' = {self.head_dim} must be even for rotary embeddings", file=src)
        if self.dtype is not None and self.dtype not in _SUPPORTED_DTYPES:
            raise ConfigError(f"field 'dtype' = {self.dtype!r} is not one of {_SUPPORTED_DTYPES}", file=src)
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"field {name!r} must be an integer or null, got {v!r}", file=src)
        eos = self.eos_token_id
        if isinstance(eos, list):
            object.__setattr__(self, "eos_token_id", tuple(eos))
            eos = self.eos_token_id
        if eos is not None and not (
            (isinstance(eos, int) and not isinstance(eos, bool))
            or (isinstance(eos, tuple) and all(isinstance(e, int) and not isinstance(e, bool) for e in eos))
        ):
            raise ConfigError(f"field 'eos_token_id' must be an int, a list of ints or null, got {eos!r}", file=src)
        # normalise numeric types so equality does not depend on int vs float spelling
        for name in ("rms_norm_eps", "rope_theta", "rope_scaling_factor"):
            object.__setattr__(self, name, float(getattr(self, name)))

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build a config from a config.json dict (transformers 4 or 5 spelling)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}", file=source)

        def err(msg: str) -> ConfigError:
            return ConfigError(msg, file=source)

        model_type = d.get("model_type")
        if model_type is not None and model_type != "llama":
            raise err(f"field 'model_type' = {model_type!r} is not supported (expected 'llama')")

        for name in _REQUIRED:
            if d.get(name) is None:
                raise err(f"required field {name!r} is missing")

        def get_int(name: str, default: Any = None) -> Any:
            v = d.get(name)
            if v is None:
                return default
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise err(f"field {name!r} must be an integer, got {v!r}")
            return v

        def get_float(name: str, value: Any, default: float) -> float:
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise err(f"field {name!r} must be a number, got {value!r}")
            return float(value)

        hidden = get_int("hidden_size")
        heads = get_int("num_attention_heads")
        if heads <= 0:
            raise err(f"field 'num_attention_heads' must be positive, got {heads}")
        if hidden % heads:
            raise err(f"field 'num_attention_heads' = {heads} does not divide hidden_size = {hidden}")
        kv_heads = get_int("num_key_value_heads", heads)
        if kv_heads <= 0 or heads % kv_heads:
            raise err(f"field 'num_key_value_heads' = {kv_heads} does not divide num_attention_heads = {heads}")
        head_dim = get_int("head_dim", hidden // heads)

        act = d.get("hidden_act", "silu")
        if act not in _SUPPORTED_ACTS:
            raise err(f"field 'hidden_act' = {act!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise err(f"field {flag!r} = {d[flag]!r} is not supported (Llama-2 has no biases)")

        # ---- RoPE: theta and (linear) scaling factor, from either spelling
        rope_theta_top = d.get("rope_theta")
        rope_params = d.get("rope_parameters")
        rope_scaling = d.get("rope_scaling")
        params_field = "rope_parameters"
        if rope_params is None and rope_scaling is not None:
            rope_params, params_field = rope_scaling, "rope_scaling"
        if rope_params is not None and not isinstance(rope_params, dict):
            raise err(f"field {params_field!r} must be an object or null, got {rope_params!r}")
        rope_params = dict(rope_params or {})
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise err(
                f"field '{params_field}.rope_type' = {rope_type!r} is not supported "
                f"(supported: {', '.join(_SUPPORTED_ROPE_TYPES)})"
            )
        theta_val = rope_params.get("rope_theta", rope_theta_top)
        theta = get_float(f"{params_field}.rope_theta" if "rope_theta" in rope_params else "rope_theta",
                          theta_val, _DEFAULT_ROPE_THETA)
        if rope_type == "linear":
            if rope_params.get("factor") is None:
                raise err(f"field '{params_field}.factor' is required for linear RoPE scaling")
            factor = get_float(f"{params_field}.factor", rope_params["factor"], 1.0)
        else:
            factor = 1.0

        # ---- dtype: v5 'dtype' wins over v4 'torch_dtype' (as transformers does)
        raw_dtype = d.get("dtype")
        dtype_field = "dtype"
        if raw_dtype is None:
            raw_dtype, dtype_field = d.get("torch_dtype"), "torch_dtype"
        dtype = None
        if raw_dtype is not None:
            dtype = _DTYPE_ALIASES.get(str(raw_dtype))
            if dtype is None:
                raise err(f"field {dtype_field!r} = {raw_dtype!r} is not supported (use one of {_SUPPORTED_DTYPES})")

        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise err(f"field 'tie_word_embeddings' must be true or false, got {tie!r}")

        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = tuple(eos)

        try:
            return cls(
                vocab_size=get_int("vocab_size"),
                hidden_size=hidden,
                intermediate_size=get_int("intermediate_size"),
                num_hidden_layers=get_int("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=get_float("rms_norm_eps", d.get("rms_norm_eps"), _DEFAULT_RMS_EPS),
                rope_theta=theta,
                rope_scaling_factor=factor,
                max_position_embeddings=get_int("max_position_embeddings", _DEFAULT_MAX_POS),
                tie_word_embeddings=tie,
                dtype=dtype,
                bos_token_id=get_int("bos_token_id", None) if "bos_token_id" in d else 1,
                eos_token_id=eos,
                pad_token_id=get_int("pad_token_id", None),
                hidden_act=act,
            )
        except ConfigError as e:
            # re-raise naming the real source rather than "ModelConfig"
            msg = str(e).rsplit(" (file ModelConfig)", 1)[0]
            raise ConfigError(msg, file=source) from None

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike) -> "ModelConfig":
        """Read ``<dir>/config.json`` (or a config.json path), or return a built-in config by name.

        An existing path always wins over a built-in name; nothing is inferred from a folder's name.
        """
        path = os.fspath(name_or_dir)
        if os.path.isdir(path):
            cfg_file = os.path.join(path, "config.json")
            if not os.path.isfile(cfg_file):
                raise ConfigError("model directory has no config.json", file=cfg_file)
        elif os.path.isfile(path):
            cfg_file = path
        elif path in BUILTIN_CONFIGS:
            return BUILTIN_CONFIGS[path]
        else:
            raise ConfigError(
                f"{path!r} is neither a directory containing config.json nor a built-in config "
                f"(built-ins: {', '.join(sorted(BUILTIN_CONFIGS))})",
                file=path,
            )
        return cls.from_dict(read_json(cfg_file, "config", ConfigError), source=cfg_file)

    # ---------------------------------------------------------------- writing
    def to_hf_dict(self, spelling: int = 4) -> dict[str, Any]:
        """A config.json dict that transformers' LlamaConfig reads back to the same values.

        ``spelling=4``: ``rope_theta`` + ``rope_scaling`` + ``torch_dtype`` (what Llama-2 hub repos carry).
        ``spelling=5``: ``rope_parameters`` + ``dtype`` (what transformers 5 writes).
        """
        if spelling not in (4, 5):
            raise ValueError(f"spelling must be 4 or 5, got {spelling!r}")
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
        }
        linear = self.rope_scaling_factor != 1.0
        if spelling == 4:
            d["rope_theta"] = self.rope_theta
            d["rope_scaling"] = ({"type": "linear", "rope_type": "linear", "factor": self.rope_scaling_factor}
                                 if linear else None)
            d["torch_dtype"] = self.dtype
        else:
            rp: dict[str, Any] = {"rope_type": "linear" if linear else "default", "rope_theta": self.rope_theta}
            if linear:
                rp["factor"] = self.rope_scaling_factor
            d["rope_parameters"] = rp
            d["dtype"] = self.dtype
        return d

    def to_dict(self) -> dict[str, Any]:
        """Plain field dict (our own spelling, not HF's)."""
        return asdict(self)

    # ----------------------------------------------------------------- shapes
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor names -> shapes, in checkpoint order. ``lm_head.weight`` is absent when tied."""
        h, hd = self.hidden_size, self.head_dim
        q_out = self.num_attention_heads * hd
        kv_out = self.num_key_value_heads * hd
        inter = self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
            shapes[p + "mlp.gate_proj.weight"] = (inter, h)
            shapes[p + "mlp.up_proj.weight"] = (inter, h)
            shapes[p + "mlp.down_proj.weight"] = (h, inter)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def num_params(self) -> int:
        """Number of distinct parameters (a tied lm_head is counted once)."""
        return sum(math.prod(s) for s in self.weight_shapes().values())

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        names = {f.name for f in fields(self)}
        bad = set(changes) - names
        if bad:
            raise TypeError(f"unknown ModelConfig field(s): {sorted(bad)}")
        return type(self)(**{**asdict(self), **changes})


_SELFRAG_7B = ModelConfig(
    vocab_size=32016,  # Llama-2's 32000 + 16 Self-RAG reflection/special tokens
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling_factor=1.0,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    dtype="bfloat16",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=32015,
    hidden_act="silu",
)

BUILTIN_CONFIGS: dict[str, ModelConfig] = {
    "selfrag-7b": _SELFRAG_7B,
    "selfrag-13b": _SELFRAG_7B.replace(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, head_dim=128,
    ),
}
