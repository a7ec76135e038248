"""The symmetries each model family is expected to carry, as a function of its (full) options.

A declaration maps a transformation family, named as `eqlab.analyses.discover` reports it, to why it is
expected; `eqlab.models.registry.missing_symmetries` compares it with what discovery verified. Only exact
ones are declared: a symmetry that an option breaks (a norm eps > 0, a non-homogeneous activation, a tied
unembedding) is left out for those options, and its measured violation is then a result, not a miss.
Plain Python (no torch), like the registry.
"""
from __future__ import annotations

ATTENTION = {"qk_gl": "per-head GL(d_head) of W_Q, W_K (logits depend on Q Kᵀ only)",
             "vo_gl": "per-head GL(d_head) of W_V, W_O (output depends on V W_O only)",
             "head_permutation": "heads are interchangeable",
             "key_bias_translation": "a key bias shifts every logit of a query equally (softmax invariant)"}
SOFTMAX = {"softmax_translation": "cross-entropy is invariant to a shift of all logits (untied head)"}
# Bias transfers (analyses.discover.transfers): exact whatever the eps, wherever the readers have biases.
BIAS_TRANSFERS = {"ln_bias_transfer": "a LayerNorm bias read only by linear maps with biases moves into them "
                                      "(β → β + δ, b → b − Wδ)",
                  "value_bias_transfer": "a value bias moves into the output projection's bias (softmax rows sum "
                                         "to 1: P(V + 1δᵀ) = PV + 1δᵀ)"}
RELU = {"relu_rescale": "ReLU is positively homogeneous: scale a unit's fan-in by a, its fan-out by 1/a",
        "permutation": "hidden units of an elementwise activation are interchangeable"}


def layer_norm(o: dict, eps_key: str) -> dict:
    out = {"ln_gain_rescale": "a LayerNorm gain can move into the linear layer it feeds",
           "ln_residual_translation": "LayerNorm removes a common shift of the residual stream"}
    if o[eps_key] == 0:
        out["ln_residual_scale"] = "LayerNorm with eps = 0 removes a common scale of the residual stream"
    return out


def minilm_cls(o: dict) -> dict:
    # BERT is post-LN with eps = 1e-12 and GELU: no residual scale, no MLP rescale (both measured violations)
    # post-LN: only the last LayerNorm (read by the pooler alone) has a bias transfer; the value bias always
    return {**SOFTMAX, **ATTENTION, **BIAS_TRANSFERS,
            "ln_gain_rescale": "a LayerNorm gain can move into the linear layer it feeds",
            "ln_residual_translation": "LayerNorm removes a common shift of the residual stream"}


def gpt2_text(o: dict) -> dict:
    out = {**ATTENTION, **layer_norm(o, "layer_norm_epsilon"), **BIAS_TRANSFERS, "permutation": RELU["permutation"]}
    if o["tie_word_embeddings"]:
        # the token embedding writes the residual stream and (tied) reads it as the unembedding: a shift or a
        # scale of the stream would have to move that one matrix two ways at once (discovery: broken, shared)
        out.pop("ln_residual_translation")
        out.pop("ln_residual_scale", None)
    else:
        out.update(SOFTMAX)
    if o["activation"] == "relu":
        out["relu_rescale"] = RELU["relu_rescale"]
    return out


def llama_text(o: dict) -> dict:
    out = {"qk_commutant": "rotary positions leave only the commutant of the rotations of W_Q, W_K",
           "vo_gl": ATTENTION["vo_gl"], "head_permutation": ATTENTION["head_permutation"],
           "rms_gain_rescale": "an RMSNorm gain can move into the linear layer it feeds",
           "glu_rescale": "SwiGLU's up projection is linear: scale a unit's up row by a, its down column by 1/a",
           "sign_flip": "negate a SwiGLU unit's up row and down column",
           "permutation": "SwiGLU units are interchangeable"}
    if not o["tie_word_embeddings"]:
        out.update(SOFTMAX)
    if o["rms_norm_eps"] == 0:
        out["rms_residual_scale"] = "RMSNorm with eps = 0 removes a common scale of the residual stream"
    return out


def vit_images(o: dict) -> dict:
    out = {**SOFTMAX, **ATTENTION, **layer_norm(o, "layer_norm_eps"), **BIAS_TRANSFERS,
           "permutation": RELU["permutation"]}
    if o["activation"] == "relu":
        out["relu_rescale"] = RELU["relu_rescale"]
    return out


def resnet_images(o: dict) -> dict:
    out = {**SOFTMAX, **RELU}
    if o["bn_eps"] <= 1e-20:  # 1e-20 is below float64 resolution of any Var(pre-activation) in these nets
        out["bn_scale"] = "a conv filter feeding a BatchNorm (batch statistics) is scale invariant"
    return out


def vgg_images(o: dict) -> dict:
    return {**SOFTMAX, **RELU} if o["activation"] == "relu" else {**SOFTMAX, "permutation": RELU["permutation"]}


def digits_cnn(o: dict) -> dict:
    out = {**SOFTMAX, "permutation": RELU["permutation"],
           "bn_translation": "a conv bias feeding a BatchNorm is removed by its mean subtraction"}
    if o["activation"] == "relu":
        out["relu_rescale"] = RELU["relu_rescale"]
    if o["bn_eps"] <= 1e-20:
        out["bn_scale"] = "a conv filter feeding a BatchNorm (batch statistics) is scale invariant"
    return out


def modadd_gpt2(o: dict) -> dict:
    return gpt2_text(o)  # the same GPT-2 blocks and options
