"""The model-zoo families (issue 10): pretrained MiniLM fine-tuning, GPT-2 and Llama byte LMs, ViT,
transformers ResNet and a VGG-style CNN. Plain Python like `eqlab.models.registry`, which merges these
into its FAMILIES: options with types and ranges, parameter counts, and the symmetries each family is
expected to carry for given options (what the identity stage must find; `registry.missing_symmetries`).

An expected symmetry names a transformation family as `eqlab.analyses.discover` reports it. Only exact
ones are declared: a symmetry that an option breaks (a norm eps > 0, a non-homogeneous activation, a
tied unembedding) is left out for those options, and its measured violation is then a result, not a miss.
"""
from __future__ import annotations

from eqlab.models.registry import GPT2_ACTIVATIONS, Family, Option, OptionError

BYTES = 256            # byte-level vocabulary of the text LMs
MINILM = {"vocab": 30522, "positions": 512, "hidden": 384, "intermediate": 1536, "layers": 6}
DIGIT_SETS = ("all", "0-4", "5-9")

_ATTENTION = {"qk_gl": "per-head GL(d_head) of W_Q, W_K (logits depend on Q Kᵀ only)",
              "vo_gl": "per-head GL(d_head) of W_V, W_O (output depends on V W_O only)",
              "head_permutation": "heads are interchangeable",
              "key_bias_translation": "a key bias shifts every logit of a query equally (softmax invariant)"}
_SOFTMAX = {"softmax_translation": "cross-entropy is invariant to a shift of all logits (untied head)"}
_RELU = {"relu_rescale": "ReLU is positively homogeneous: scale a unit's fan-in by a, its fan-out by 1/a",
         "permutation": "hidden units of an elementwise activation are interchangeable"}


def _ln(o: dict, eps_key: str) -> dict:
    out = {"ln_gain_rescale": "a LayerNorm gain can move into the linear layer it feeds",
           "ln_residual_translation": "LayerNorm removes a common shift of the residual stream"}
    if o[eps_key] == 0:
        out["ln_residual_scale"] = "LayerNorm with eps = 0 removes a common scale of the residual stream"
    return out


def _pos_int(hi, why=""):
    return Option("int", minimum=1, maximum=hi, why=why)


def _divides(o: dict, whole: str, part: str) -> OptionError | None:
    if o[whole] % o[part]:
        return OptionError(part, f"must divide {whole} = {o[whole]} (got {o[part]})")
    return None


# ---------------------------------------------------------------------------------------------- minilm_cls
def _minilm_params(o: dict) -> int:
    h, i, c = MINILM["hidden"], MINILM["intermediate"], o["classes"]
    emb = (MINILM["vocab"] + MINILM["positions"] + 2) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return emb + o["layers"] * layer + (h * h + h) + (h * c + c)


def _minilm_symmetries(o: dict) -> dict:
    # BERT is post-LN with eps = 1e-12 and GELU: no residual scale, no MLP rescale (both measured violations)
    return {**_SOFTMAX, **_ATTENTION, "ln_gain_rescale": "a LayerNorm gain can move into the linear layer it feeds",
            "ln_residual_translation": "LayerNorm removes a common shift of the residual stream"}


# ----------------------------------------------------------------------------------------------- gpt2_text
def _gpt2_text_params(o: dict) -> int:
    e, n = o["n_embd"], o["n_layer"]
    block = 2 * e + (3 * e * e + 3 * e) + (e * e + e) + 2 * e + (4 * e * e + 4 * e) + (4 * e * e + e)
    return BYTES * e + o["seq_len"] * e + n * block + 2 * e + (0 if o["tie_word_embeddings"] else BYTES * e)


def _gpt2_text_symmetries(o: dict) -> dict:
    out = {**_ATTENTION, **_ln(o, "layer_norm_epsilon"), "permutation": _RELU["permutation"]}
    if not o["tie_word_embeddings"]:
        out.update(_SOFTMAX)
    if o["activation"] == "relu":
        out["relu_rescale"] = _RELU["relu_rescale"]
    return out


# ---------------------------------------------------------------------------------------------- llama_text
def _llama_params(o: dict) -> int:
    h, i, kv = o["hidden"], o["intermediate"], o["n_kv_head"] * (o["hidden"] // o["n_head"])
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return BYTES * h + o["n_layer"] * layer + h + (0 if o["tie_word_embeddings"] else BYTES * h)


def _llama_cross(o: dict) -> OptionError | None:
    return _divides(o, "hidden", "n_head") or _divides(o, "n_head", "n_kv_head")


def _llama_symmetries(o: dict) -> dict:
    out = {"qk_commutant": "rotary positions leave only the commutant of the rotations of W_Q, W_K",
           "vo_gl": _ATTENTION["vo_gl"], "head_permutation": _ATTENTION["head_permutation"],
           "rms_gain_rescale": "an RMSNorm gain can move into the linear layer it feeds",
           "glu_rescale": "SwiGLU's up projection is linear: scale a unit's up row by a, its down column by 1/a",
           "sign_flip": "negate a SwiGLU unit's up row and down column",
           "permutation": "SwiGLU units are interchangeable"}
    if not o["tie_word_embeddings"]:
        out.update(_SOFTMAX)
    if o["rms_norm_eps"] == 0:
        out["rms_residual_scale"] = "RMSNorm with eps = 0 removes a common scale of the residual stream"
    return out


# ---------------------------------------------------------------------------------------------- vit_images
def _vit_params(o: dict) -> int:
    h, i, p = o["hidden"], o["intermediate"], o["patch"]
    patches = (o["image_size"] // p) ** 2
    emb = h + (patches + 1) * h + (p * p * h + h)
    layer = 2 * h + 3 * (h * h + h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
    return emb + o["n_layer"] * layer + 2 * h + (h * 10 + 10)


def _vit_cross(o: dict) -> OptionError | None:
    if o["image_size"] % o["patch"]:
        return OptionError("patch", f"must divide image_size = {o['image_size']} (got {o['patch']})")
    return _divides(o, "hidden", "n_head")


def _vit_symmetries(o: dict) -> dict:
    out = {**_SOFTMAX, **_ATTENTION, **_ln(o, "layer_norm_eps"), "permutation": _RELU["permutation"]}
    if o["activation"] == "relu":
        out["relu_rescale"] = _RELU["relu_rescale"]
    return out


# ------------------------------------------------------------------------------------------- resnet_images
def _resnet_params(o: dict) -> int:
    c_in = o["embedding"]
    n = 49 * c_in + 2 * c_in  # 7x7 stem conv (no bias) + its BatchNorm
    for stage, (c, depth) in enumerate(zip(o["hidden_sizes"], o["depths"])):
        for j in range(depth):
            if j == 0 and (c_in != c or stage > 0):  # a projection shortcut where shape or stride changes
                n += c_in * c + 2 * c
            n += 9 * c_in * c + 2 * c + 9 * c * c + 2 * c
            c_in = c
    return n + c_in * 10 + 10


def _resnet_cross(o: dict) -> OptionError | None:
    if len(o["depths"]) != len(o["hidden_sizes"]) or not o["depths"]:
        return OptionError("depths", f"needs one depth per stage: {len(o['hidden_sizes'])} hidden_sizes, "
                                     f"got {len(o['depths'])} depths")
    return None


def _resnet_symmetries(o: dict) -> dict:
    out = {**_SOFTMAX, **_RELU}
    if o["bn_eps"] <= 1e-20:  # 1e-20 is below float64 resolution of any Var(pre-activation) in these nets
        out["bn_scale"] = "a conv filter feeding a BatchNorm (batch statistics) is scale invariant"
    return out


# ---------------------------------------------------------------------------------------------- vgg_images
def _vgg_params(o: dict) -> int:
    n, c_in = 0, 1
    for c in o["channels"]:
        for _ in range(o["convs"]):
            n += 9 * c_in * c + c
            c_in = c
    side = o["image_size"] // 2 ** len(o["channels"])
    return n + (c_in * side * side * o["hidden"] + o["hidden"]) + (o["hidden"] * 10 + 10)


def _vgg_cross(o: dict) -> OptionError | None:
    if not o["channels"]:
        return OptionError("channels", "needs at least one stage")
    if o["image_size"] < 2 ** len(o["channels"]):
        return OptionError("image_size", f"must be >= {2 ** len(o['channels'])}: each of the "
                                         f"{len(o['channels'])} stages halves it (got {o['image_size']})")
    return None


def _vgg_symmetries(o: dict) -> dict:
    return {**_SOFTMAX, **_RELU} if o["activation"] == "relu" else {**_SOFTMAX, "permutation": _RELU["permutation"]}


_IMAGE_SIZE = Option("int", minimum=4, maximum=256, why="the 8x8 digits are resampled to image_size")
_DIGIT_SET = Option("str", choices=DIGIT_SETS)
_N_WINDOWS = Option("int", minimum=1, maximum=1_000_000)
_SEQ_LEN = Option("int", minimum=2, maximum=4096)

ZOO: dict[str, Family] = {
    "minilm_cls": Family(
        "eqlab.models.minilm_cls:minilm_cls", "eqlab.models.minilm_cls:minilm_data", "eqlab.models.losses:cross_entropy",
        ("classes", "seq_len", "per_class"),
        options={"layers": Option("int", minimum=1, maximum=6, why="all-MiniLM-L6-v2 has 6 pretrained layers"),
                 "classes": Option("int", minimum=2, maximum=4, why="the topics are asyncio, email, logging, tkinter"),
                 "seq_len": Option("int", minimum=4, maximum=512, why="the pretrained positions are 512"),
                 "per_class": Option("int", minimum=2, maximum=100,
                                     why="logging has 113 docstrings of 20+ words; longer seq_len leaves fewer")},
        defaults={"layers": 2, "classes": 4, "seq_len": 32, "per_class": 24},
        n_params=_minilm_params, symmetries=_minilm_symmetries),
    "gpt2_text": Family(
        "eqlab.models.gpt2_text:gpt2_text", "eqlab.models.byte_lm:byte_lm_data",
        "eqlab.models.byte_lm:next_token_cross_entropy", ("seq_len", "n_train", "n_test"),
        options={"n_layer": _pos_int(256), "n_embd": _pos_int(16_384), "n_head": _pos_int(1024),
                 "seq_len": _SEQ_LEN, "activation": Option("str", choices=GPT2_ACTIVATIONS),
                 "layer_norm_epsilon": Option("float", minimum=0, maximum=1e6), "tie_word_embeddings": Option("bool"),
                 "n_train": _N_WINDOWS, "n_test": _N_WINDOWS},
        defaults={"n_layer": 1, "n_embd": 32, "n_head": 2, "seq_len": 32, "activation": "relu",
                  "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False, "n_train": 64, "n_test": 32},
        n_params=_gpt2_text_params, cross_check=lambda o: _divides(o, "n_embd", "n_head"),
        symmetries=_gpt2_text_symmetries),
    "llama_text": Family(
        "eqlab.models.llama_text:llama_text", "eqlab.models.byte_lm:byte_lm_data",
        "eqlab.models.byte_lm:next_token_cross_entropy", ("seq_len", "n_train", "n_test"),
        options={"n_layer": _pos_int(256), "hidden": _pos_int(16_384), "n_head": _pos_int(1024),
                 "n_kv_head": _pos_int(1024), "intermediate": _pos_int(65_536), "seq_len": _SEQ_LEN,
                 "rms_norm_eps": Option("float", minimum=0, maximum=1e6), "tie_word_embeddings": Option("bool"),
                 "initializer_range": Option("float", positive=True, maximum=10.0, why="the weights' init std"),
                 "n_train": _N_WINDOWS, "n_test": _N_WINDOWS},
        defaults={"n_layer": 1, "hidden": 32, "n_head": 4, "n_kv_head": 2, "intermediate": 64, "seq_len": 32,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "initializer_range": 0.02, "n_train": 64,
                  "n_test": 32},
        n_params=_llama_params, cross_check=_llama_cross, symmetries=_llama_symmetries),
    "vit_images": Family(
        "eqlab.models.vit_images:vit_images", "eqlab.models.digit_images:digit_images", "eqlab.models.losses:cross_entropy",
        ("image_size", "digit_set"),
        options={"n_layer": _pos_int(256), "hidden": _pos_int(16_384), "n_head": _pos_int(1024),
                 "intermediate": _pos_int(65_536), "patch": _pos_int(256), "image_size": _IMAGE_SIZE,
                 "activation": Option("str", choices=("relu", "gelu", "gelu_new", "silu", "tanh")),
                 "layer_norm_eps": Option("float", minimum=0, maximum=1e6), "digit_set": _DIGIT_SET},
        defaults={"n_layer": 1, "hidden": 32, "n_head": 2, "intermediate": 64, "patch": 4, "image_size": 8,
                  "activation": "relu", "layer_norm_eps": 1e-12, "digit_set": "all"},
        n_params=_vit_params, cross_check=_vit_cross, symmetries=_vit_symmetries),
    "resnet_images": Family(
        "eqlab.models.resnet_images:resnet_images", "eqlab.models.digit_images:digit_images",
        "eqlab.models.losses:cross_entropy", ("image_size", "digit_set"),
        options={"embedding": _pos_int(4096), "hidden_sizes": Option("int_list", minimum=1, maximum=4096),
                 "depths": Option("int_list", minimum=1, maximum=64), "image_size": _IMAGE_SIZE,
                 "bn_eps": Option("float", positive=True, maximum=1e6,
                                  why="BatchNorm needs eps > 0 in training mode (use 1e-20 for the exact limit)"),
                 "digit_set": _DIGIT_SET},
        defaults={"embedding": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "image_size": 16, "bn_eps": 1e-5,
                  "digit_set": "all"},
        n_params=_resnet_params, cross_check=_resnet_cross, symmetries=_resnet_symmetries),
    "vgg_images": Family(
        "eqlab.models.vgg_images:VGGImages", "eqlab.models.digit_images:digit_images", "eqlab.models.losses:cross_entropy",
        ("image_size", "digit_set"),
        options={"channels": Option("int_list", minimum=1, maximum=4096), "convs": _pos_int(16),
                 "hidden": _pos_int(1_000_000), "image_size": _IMAGE_SIZE,
                 "activation": Option("str", choices=("relu", "gelu", "tanh")), "digit_set": _DIGIT_SET},
        defaults={"channels": [8, 16], "convs": 1, "hidden": 32, "image_size": 8, "activation": "relu",
                  "digit_set": "all"},
        n_params=_vgg_params, cross_check=_vgg_cross, symmetries=_vgg_symmetries),
}
