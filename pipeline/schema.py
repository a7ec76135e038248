"""The result tables' Arrow schemas. Documented for users in results/README.md.

Evolution rule: only add columns, never change a column's type; bump SCHEMA_VERSION when adding.
"""
import pyarrow as pa

SCHEMA_VERSION = 5  # 2: config_hash on every row; runs.status / diverged_at_step; identities.verdict
#                    3: spectra.hvp_method / hvp_method_reason; conservation.tolerance / verdict /
#                       tolerance_reason
#                    4: metrics (per training step); inspections' discovery verdict columns
#                    5: checkpoints.saved_at, spectra.computed_at (training and analysis overlap in time)

# Columns every row carries: the row key (study, run_id, step) and the schema version.
_KEY = [
    ("schema_version", pa.int32()),
    ("study", pa.string()),
    ("run_id", pa.string()),
    ("step", pa.int64()),
    # sha256 (16 hex) of everything that produced the row: the run's configuration, the stage's settings and
    # the checkpoint's weights. A rerun skips a key only when the stored hash equals the one it would write.
    ("config_hash", pa.string()),
]

TABLES: dict[str, pa.Schema] = {
    "runs": pa.schema(_KEY + [
        ("family", pa.string()),
        ("optimizer", pa.string()),
        ("lr", pa.float64()),
        ("weight_decay", pa.float64()),
        ("steps", pa.int64()),
        ("seed", pa.int64()),
        ("n_params", pa.int64()),
        ("n_train", pa.int64()),
        ("n_test", pa.int64()),
        ("train_workers", pa.int64()),
        ("config_json", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),            # ok | diverged (a non-finite loss or weights during training)
        ("diverged_at_step", pa.int64()),   # first step with a non-finite training loss; NULL when ok
    ]),
    "checkpoints": pa.schema(_KEY + [
        ("train_loss", pa.float64()),
        ("test_loss", pa.float64()),
        ("train_acc", pa.float64()),
        ("test_acc", pa.float64()),
        ("param_norm", pa.float64()),
        ("grad_norm", pa.float64()),
        ("checkpoint_uri", pa.string()),
        ("saved_at", pa.timestamp("us", tz="UTC")),  # when training wrote it (rank 0's clock); NULL before v5
    ]),
    "metrics": pa.schema(_KEY + [  # every training step; key step = the checkpoint that follows it
        ("train_step", pa.int64()),
        ("loss", pa.float64()),          # the minibatch's training loss (mean over DDP ranks)
        ("grad_norm", pa.float64()),     # ‖∇L‖ of that minibatch (DDP-averaged gradient), before the step
        ("lr", pa.float64()),
    ]),
    "spectra": pa.schema(_KEY + [
        ("which", pa.string()),          # LA (largest algebraic) or SA (smallest)
        ("rank", pa.int32()),            # 0 = largest for LA, smallest for SA
        ("eigenvalue", pa.float64()),
        ("residual", pa.float64()),      # true ||Hv - lambda v|| with ||v|| = 1
        ("converged", pa.bool_()),
        ("hvps", pa.int64()),            # HVPs the whole Lanczos run used
        ("iterations", pa.int64()),
        ("workers", pa.int32()),
        ("n_examples", pa.int64()),
        ("dtype", pa.string()),
        ("seconds", pa.float64()),
        ("hvp_method", pa.string()),         # how the products were computed (method+conv), per actor if they differ
        ("hvp_method_reason", pa.string()),  # the rule that chose it (analyses/curvature/operator.py)
        ("computed_at", pa.timestamp("us", tz="UTC")),  # when the Lanczos run ended (it began `seconds` earlier)
    ]),
    "block_spectra": pa.schema(_KEY + [   # per-block Hessians H_bb, one block per module (layer)
        ("block", pa.string()),          # module name owning the block's parameters
        ("dim", pa.int64()),             # parameters in the block
        ("which", pa.string()),
        ("rank", pa.int32()),
        ("eigenvalue", pa.float64()),
        ("residual", pa.float64()),      # true ||H_bb v - lambda v||
        ("converged", pa.bool_()),
        ("hvps", pa.int64()),            # block HVPs of this block's Lanczos run
        ("seconds", pa.float64()),
        ("dtype", pa.string()),
    ]),
    "lanczos": pa.schema(_KEY + [
        ("which", pa.string()),
        ("alphas", pa.list_(pa.float64())),  # the tridiagonal, so densities can be re-derived later
        ("betas", pa.list_(pa.float64())),
        ("hvps", pa.int64()),
    ]),
    "densities": pa.schema(_KEY + [
        ("probe", pa.int32()),              # Rademacher probe index (seeded by the study seed)
        ("dim", pa.int64()),                # parameters: tr f(H) ≈ dim · mean over probes of Σ w f(θ)
        ("alphas", pa.list_(pa.float64())), # the probe's Lanczos tridiagonal: Gauss nodes/weights and
        ("betas", pa.list_(pa.float64())),  # any smoothing are re-derived from it (results/README.md)
        ("hvps", pa.int64()),               # matvecs spent on this probe
        ("workers", pa.int32()),
        ("n_examples", pa.int64()),
        ("dtype", pa.string()),
        ("seconds", pa.float64()),          # wall time of the whole lockstep SLQ run (all probes)
    ]),
    "identities": pa.schema(_KEY + [
        ("transformation", pa.string()),
        ("symmetry", pa.string()),       # the family: softmax_translation, bn_scale, relu_rescale, ...
        ("kind", pa.string()),           # continuous | discrete
        ("order", pa.int32()),           # 0 finite element, 1 gradient, 2 Hessian (quote it in SQL: "order")
        ("params", pa.list_(pa.string())),
        ("n_generators", pa.int64()),
        ("control", pa.bool_()),         # True: a negative control, expected NOT to hold
        ("dtype", pa.string()),
        ("residual", pa.float64()),
        ("tolerance", pa.float64()),
        ("holds", pa.bool_()),
        ("hvps", pa.int64()),
        # one verdict per row, computed once by analyses.identities: holds | violated for a symmetry,
        # rejected | not_discriminating for a negative control (passes the check at this order and dtype)
        ("verdict", pa.string()),
        ("tolerance_reason", pa.string()),  # why the tolerance is that number (its rounding argument)
    ]),
    "conservation": pa.schema(_KEY + [  # the step after a checkpoint, replayed in float64
        ("transformation", pa.string()),
        ("symmetry", pa.string()),
        ("optimizer", pa.string()),
        ("lr", pa.float64()),
        ("n_quantities", pa.int64()),    # conserved numbers in the family (one per generator / block entry)
        ("q_norm", pa.float64()),        # ||Q(theta_t)||
        ("change", pa.float64()),        # ||Q(theta_{t+1}) - Q(theta_t)||, measured
        ("predicted_change", pa.float64()),  # the exact law's change (NaN: the optimizer has no law, e.g. Adam)
        ("residual", pa.float64()),      # ||measured - predicted change|| / (||predicted|| + generic scale + rounding)
        ("drift_per_lr", pa.float64()),  # change / lr: O(1) for Adam, O(lr) for SGD
        ("eta2_term", pa.float64()),     # ||lr^2 Q(g)||: SGD's whole change without momentum or decay
        ("tolerance", pa.float64()),     # the rounding level of the comparison, in residual's units
        ("verdict", pa.string()),        # holds | violated | not_discriminating | no_law (analyses.conservation)
        ("tolerance_reason", pa.string()),  # the rounding argument with its numbers
    ]),
    "inspections": pa.schema(_KEY + [   # written by `eqlab inspect` (study "inspect", step -1)
        ("name", pa.string()),
        ("kind", pa.string()),
        ("symmetry", pa.string()),
        ("params", pa.list_(pa.string())),
        ("generators", pa.int64()),
        ("finite", pa.float64()),        # loss / output change at a finite group element
        ("first_order", pa.float64()),
        ("second_order", pa.float64()),
        ("holds", pa.bool_()),           # verdict == "exact"
        ("reason", pa.string()),         # why it is approximate / broken / not proposed ("" when exact)
        ("verdict", pa.string()),        # exact | approximate | broken | not_proposed
        ("rounding_level", pa.float64()),  # p·γ_n(u)·R of the worst order (the level "exact" is judged by)
        ("inputs_x3", pa.float64()),     # worst residual with the floating inputs ×3 (NaN: not run)
        ("cause", pa.string()),          # eps | algebra | caveat | inputs_x3 | unidentified | random | ""
        ("site", pa.string()),           # not_proposed rows: the norm / attention block / MLP looked at
    ]),
    "findings": pa.schema(_KEY + [   # one row per (finding, transformation, control) per checkpoint
        ("finding", pa.string()),        # e.g. flat_symmetry_direction
        ("transformation", pa.string()), # the family instance it is about (as in identities)
        ("symmetry", pa.string()),       # the family: bn_scale, relu_rescale, softmax_translation, ...
        ("control", pa.bool_()),         # True: a negative control, expected to come out violated
        ("optimizer", pa.string()),      # the condition, copied from the run spec
        ("lr", pa.float64()),
        ("momentum", pa.float64()),
        ("weight_decay", pa.float64()),
        ("dtype", pa.string()),          # the dtype the statistic was computed in
        ("n_examples", pa.int64()),      # training examples the loss was taken over
        ("probes", pa.int64()),          # random generators (directions) the statistic is over
        ("rank", pa.int32()),            # alignment: which top eigenpair (0 = largest); NULL otherwise
        ("eigenvalue", pa.float64()),    # alignment: that pair's Ritz value
        ("eigen_residual", pa.float64()),  # alignment: its true residual ||Hy - lambda y||, ||y|| = 1
        ("statistic", pa.float64()),     # the measured statistic, mean over probes
        ("statistic_std", pa.float64()), # its standard deviation over probes (0 for one probe)
        ("predicted", pa.float64()),     # the theory's value, mean over probes
        ("residual", pa.float64()),      # |measured - predicted| at the worst probe (relative to its tolerance)
        ("tolerance", pa.float64()),     # that probe's rounding bound on the residual, same units
        ("scale", pa.float64()),         # what a generic direction gives (kappa = ||Hu||, unit u): the effect size
        ("verdict", pa.string()),        # holds | violated | inconclusive (a control that passes too)
        ("tolerance_reason", pa.string()),  # the rounding argument with its numbers
        ("hvps", pa.int64()),
    ]),
}
