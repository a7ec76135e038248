"""The model-zoo families (issue 10): pretrained MiniLM (and any local checkpoint folder) fine-tuning,
GPT-2 and Llama byte LMs, ViT, transformers ResNet and a VGG-style CNN. Plain Python like
`eqlab.models.registry`, which merges these into its FAMILIES: options with types and ranges, parameter
counts, and the symmetries each family is expected to carry (declared in `eqlab.models.symmetry_decls`).
"""
from __future__ import annotations

import json
import os

from eqlab.models import symmetry_decls as expect
from eqlab.models.registry import GPT2_ACTIVATIONS, Family, Option, OptionError

BYTES = 256            # byte-level vocabulary of the text LMs
MINILM = {"vocab": 30522, "positions": 512, "hidden": 384, "intermediate": 1536, "layers": 6}
DIGIT_SETS = ("all", "0-4", "5-9")


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


# --------------------------------------------------------------------------------------------- hf_text_cls
def _folder_config(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _hf_text_cross(o: dict) -> OptionError | None:
    config = _folder_config(o["path"])
    if config is None:
        return OptionError("path", f"not a transformers checkpoint folder (no readable config.json): {o['path']!r}")
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    if layers is not None and o["layers"] > layers:
        return OptionError("layers", f"must be <= {layers}, the checkpoint's layers (got {o['layers']})")
    return None


def _hf_text_params(o: dict) -> int:
    """BERT checkpoints exactly (encoder, pooler, head); 0 (not known before loading) for other types."""
    c = _folder_config(o["path"]) or {}
    if c.get("model_type") != "bert":
        return 0
    h, i, k = c["hidden_size"], c["intermediate_size"], o["classes"]
    emb = (c["vocab_size"] + c["max_position_embeddings"] + c.get("type_vocab_size", 2)) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return emb + (o["layers"] or c["num_hidden_layers"]) * layer + (h * h + h) + (h * k + k)


def _hf_text_symmetries(o: dict) -> dict:
    return expect.minilm_cls(o) if (_folder_config(o["path"]) or {}).get("model_type") == "bert" else {}


# ----------------------------------------------------------------------------------------------- gpt2_text
def _gpt2_text_params(o: dict) -> int:
    e, n = o["n_embd"], o["n_layer"]
    block = 2 * e + (3 * e * e + 3 * e) + (e * e + e) + 2 * e + (4 * e * e + 4 * e) + (4 * e * e + e)
    return BYTES * e + o["seq_len"] * e + n * block + 2 * e + (0 if o["tie_word_embeddings"] else BYTES * e)


# ---------------------------------------------------------------------------------------------- llama_text
def _llama_params(o: dict) -> int:
    h, i, kv = o["hidden"], o["intermediate"], o["n_kv_head"] * (o["hidden"] // o["n_head"])
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return BYTES * h + o["n_layer"] * layer + h + (0 if o["tie_word_embeddings"] else BYTES * h)


def _llama_cross(o: dict) -> OptionError | None:
    return _divides(o, "hidden", "n_head") or _divides(o, "n_head", "n_kv_head")


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
        n_params=_minilm_params, symmetries=expect.minilm_cls),
    "hf_text_cls": Family(
        "eqlab.models.text_classifier:hf_text_cls", "eqlab.models.text_classifier:hf_text_cls_data",
        "eqlab.models.losses:cross_entropy", ("path", "classes", "seq_len", "per_class"),
        options={"path": Option("str"),
                 "layers": Option("int", minimum=0, maximum=1024, why="0 keeps all of the checkpoint's layers"),
                 "classes": Option("int", minimum=2, maximum=4, why="the topics are asyncio, email, logging, tkinter"),
                 "seq_len": Option("int", minimum=4, maximum=8192),
                 "per_class": Option("int", minimum=2, maximum=100,
                                     why="logging has 113 docstrings of 20+ words; longer seq_len leaves fewer")},
        defaults={"path": "", "layers": 0, "classes": 4, "seq_len": 32, "per_class": 24},
        n_params=_hf_text_params, cross_check=_hf_text_cross, symmetries=_hf_text_symmetries),
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
        symmetries=expect.gpt2_text),
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
        n_params=_llama_params, cross_check=_llama_cross, symmetries=expect.llama_text),
    "vit_images": Family(
        "eqlab.models.vit_images:vit_images", "eqlab.models.digit_images:digit_images", "eqlab.models.losses:cross_entropy",
        ("image_size", "digit_set"),
        options={"n_layer": _pos_int(256), "hidden": _pos_int(16_384), "n_head": _pos_int(1024),
                 "intermediate": _pos_int(65_536), "patch": _pos_int(256), "image_size": _IMAGE_SIZE,
                 "activation": Option("str", choices=("relu", "gelu", "gelu_new", "silu", "tanh")),
                 "layer_norm_eps": Option("float", minimum=0, maximum=1e6), "digit_set": _DIGIT_SET},
        defaults={"n_layer": 1, "hidden": 32, "n_head": 2, "intermediate": 64, "patch": 4, "image_size": 8,
                  "activation": "relu", "layer_norm_eps": 1e-12, "digit_set": "all"},
        n_params=_vit_params, cross_check=_vit_cross, symmetries=expect.vit_images),
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
        n_params=_resnet_params, cross_check=_resnet_cross, symmetries=expect.resnet_images),
    "vgg_images": Family(
        "eqlab.models.vgg_images:VGGImages", "eqlab.models.digit_images:digit_images", "eqlab.models.losses:cross_entropy",
        ("image_size", "digit_set"),
        options={"channels": Option("int_list", minimum=1, maximum=4096), "convs": _pos_int(16),
                 "hidden": _pos_int(1_000_000), "image_size": _IMAGE_SIZE,
                 "activation": Option("str", choices=("relu", "gelu", "tanh")), "digit_set": _DIGIT_SET},
        defaults={"channels": [8, 16], "convs": 1, "hidden": 32, "image_size": 8, "activation": "relu",
                  "digit_set": "all"},
        n_params=_vgg_params, cross_check=_vgg_cross, symmetries=expect.vgg_images),
}
