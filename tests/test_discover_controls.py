"""A candidate that discovery itself proves broken by a hard cause (its op algebra: GELU is not positively
homogeneous) is proposed so that its violation is measured, and labelled a control: ``expected=False``, so
the identity checks (and the identities stage's rows, control = not expected) call it `rejected`, never a
`violated` symmetry. On BERT (MiniLM's class), tiny config, float64."""
import torch

from eqlab.analyses.discover import discover
from eqlab.analyses.discover.zoo import ZOO
from eqlab.analyses.identities import check_all

torch.set_num_threads(1)


def test_bert_gelu_rescale_is_a_control_not_a_violation():
    model, loss, batch = ZOO["BertForSequenceClassification"]()
    d = discover(model, loss, batch)
    (g,) = [f for f in d.found if f.transformation.family == "gelu_rescale"]
    assert g.verdict == "broken" and g.cause == "algebra" and not g.transformation.expected, g.as_row()
    assert g.as_row()["control"] is True
    checks = check_all(model.double(), loss, batch, [g.transformation], probes=1)
    assert checks and {c.verdict for c in checks} == {"rejected"} and all(c.ok and not c.expected for c in checks)
    # exact and approximate findings stay symmetries: a measured eps violation is a result, not a control
    (s,) = [f for f in d.found if f.transformation.family == "ln_residual_scale"]
    assert s.verdict == "approximate" and s.transformation.expected
    assert all(f.transformation.expected for f in d.found if f.verified)
