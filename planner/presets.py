"""Model shapes the planner knows by name, and the model identity a plan records. Torch-free.

A model identity is the dict of the numbers that define a decoder's tensor shapes: a plan made
for one identity is refused for another (see ``planfile.check_plan_matches``). Numbers are
from each model's published ``config.json`` and, for the MEMO paper's GPT models, Table 2 of
arXiv 2407.12117.
"""

from __future__ import annotations

IDENTITY_FIELDS = ("model_type", "layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab")


def _gpt(layers: int, hidden: int, heads: int) -> dict:
    # The paper's GPT: LayerNorm, GeLU MLP of 4x hidden, multi-head attention, vocabulary 50257.
    return {"model_type": "gpt2", "layers": layers, "hidden": hidden, "intermediate": 4 * hidden, "heads": heads,
            "kv_heads": heads, "head_dim": hidden // heads, "vocab": 50257}


PRESETS: dict[str, dict] = {
    "memo-paper-7b": _gpt(32, 4096, 32),
    "memo-paper-13b": _gpt(40, 5120, 40),
    "memo-paper-30b": _gpt(48, 7168, 56),
    "memo-paper-65b": _gpt(80, 8192, 64),
    "llama2-7b": {"model_type": "llama", "layers": 32, "hidden": 4096, "intermediate": 11008, "heads": 32,
                  "kv_heads": 32, "head_dim": 128, "vocab": 32000},
    "llama3-8b": {"model_type": "llama", "layers": 32, "hidden": 4096, "intermediate": 14336, "heads": 32,
                  "kv_heads": 8, "head_dim": 128, "vocab": 128256, "rope_theta": 500000.0},
    "mistral-7b": {"model_type": "mistral", "layers": 32, "hidden": 4096, "intermediate": 14336, "heads": 32,
                   "kv_heads": 8, "head_dim": 128, "vocab": 32000, "sliding_window": 4096},
    "qwen2-7b": {"model_type": "qwen2", "layers": 28, "hidden": 3584, "intermediate": 18944, "heads": 28,
                 "kv_heads": 4, "head_dim": 128, "vocab": 152064, "rope_theta": 1000000.0},
}
# Aliases users type.
ALIASES = {"gpt-7b": "memo-paper-7b", "gpt-13b": "memo-paper-13b", "gpt-30b": "memo-paper-30b",
           "gpt-65b": "memo-paper-65b", "llama-2-7b": "llama2-7b", "llama-3-8b": "llama3-8b"}


class UnknownPreset(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict:
    """The identity (plus extras such as rope_theta) of a named model; raises ``UnknownPreset``
    listing the known names."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise UnknownPreset(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)} "
                            f"(or pass the path of a config.json)")
    return dict(PRESETS[key], name=key)


# NOTE [ Bounded model sizes ]
#
# 1. The planner's work grows with the model's numbers: lists and Level-2 allocations per layer,
#    head and vocabulary terms in the cost model. A config with 10**9 layers once used 23.5 GB
#    before it was killed. ``check_model_bounds`` refuses any number above MODEL_BOUNDS before
#    anything is profiled or allocated.
# 2. The bounds are above every published decoder (at most ~130 layers, hidden 25,600, intermediate
#    ~100K, up to 232 heads, head size 256, vocabulary ~260K) and low enough that a plan at the bounds
#    is answered in bounded time and memory: the layer-policy search grows as layers squared, and a
#    job at the bounds that does not fit (256 layers, hidden 2**17, 4096 heads, vocabulary 2**24,
#    1M tokens on 8 GPUs) took 3 minutes and 0.4 GB (tests/test_plan_bounds.py refuses the 10**9
#    layer config in seconds under a 2 GiB address-space limit).
MODEL_BOUNDS = {"layers": 256, "hidden": 1 << 17, "intermediate": 1 << 20, "heads": 1024, "kv_heads": 1024,
                "head_dim": 1 << 14, "vocab": 1 << 24}


class ModelBoundsError(ValueError):
    """A model number that is not a positive int or exceeds MODEL_BOUNDS; the message says which."""


def check_model_bounds(model: dict, where: str) -> None:
    """NOTE [ Bounded model sizes ]: every number of the identity a positive int within MODEL_BOUNDS,
    kv_heads dividing heads; raises ``ModelBoundsError`` naming the field, its value and the bound."""
    for key, bound in MODEL_BOUNDS.items():
        value = model.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelBoundsError(f"{where}: {key} is {value!r}, not a positive integer; fix the config")
        if value > bound:
            raise ModelBoundsError(f"{where}: {key} = {value:,} exceeds memo's bound of {bound:,}, above every "
                                   f"published decoder (NOTE [ Bounded model sizes ]); check the config's numbers")
    if model["heads"] % model["kv_heads"]:
        raise ModelBoundsError(f"{where}: {model['heads']} attention heads are not a multiple of {model['kv_heads']} "
                               f"kv heads; fix the config")


def identity_of(model: dict) -> dict:
    """Only the shape-defining fields of a model dict, in a fixed order."""
    return {k: model[k] for k in IDENTITY_FIELDS}


def mlp_kind(model: dict) -> str:
    """'gelu' (two matrices, GPT) or 'swiglu' (gate, up, down: Llama, Mistral, Qwen2)."""
    return "gelu" if model["model_type"] in ("gpt2", "gpt_neox", "gptj", "gpt_bigcode") else "swiglu"


def layer_parameters(model: dict) -> int:
    """Parameters of one decoder layer (weights and biases, norms included)."""
    h, f = model["hidden"], model["intermediate"]
    q = model["heads"] * model["head_dim"]
    kv = model["kv_heads"] * model["head_dim"]
    attn = h * (q + 2 * kv) + q * h
    if mlp_kind(model) == "gelu":
        # GPT-2 style: biases everywhere, two LayerNorms with weight and bias.
        return attn + (q + 2 * kv) + h + 2 * h * f + f + h + 4 * h
    bias = (q + 2 * kv) if model["model_type"] == "qwen2" else 0
    return attn + bias + 3 * h * f + 2 * h


def model_parameters(model: dict) -> int:
    """All parameters: layers, token embedding, final norm, and the LM head unless tied (GPT)."""
    h, v = model["hidden"], model["vocab"]
    gpt = mlp_kind(model) == "gelu"          # GPT: tied LM head, final LayerNorm with bias
    return model["layers"] * layer_parameters(model) + v * h + (0 if gpt else v * h) + (2 * h if gpt else h)
