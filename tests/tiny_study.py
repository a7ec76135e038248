"""The smallest study that runs every stage once: for tests that start `eqlab run` as a real process."""

LIGHT = ("flat_symmetry_direction",)  # one finding: the stage runs, the rest is tested elsewhere

HEAD = """
[study]
name = "{name}"
seed = 0
[ray]
num_cpus = 2
[spectra]
top_k = 1
tol = 1e-4
max_iter = 30
workers = 1
examples = 32
microbatch = 32
block_top_k = 0
density_probes = 0
[identities]
dtypes = ["float64"]
examples = 16
probes = 1
"""
TOML = HEAD + """[[runs]]
name = "cnn"
family = "digits_cnn"
model = {{ channels = [2, 4], hidden = 8, bn_eps = 1e-20 }}
optimizer = "sgd"
lr = 0.1
batch_size = 16
steps = 2
n_checkpoints = 2
"""


def tiny_study(name: str, findings: tuple[str, ...] | None = None) -> str:
    """``findings``: run only these (`[findings] include`), for tests that read no findings rows: the
    whole set costs ≈ 5 s of the tiny study's ≈ 45 s on 2 cores."""
    text = TOML.format(name=name)
    if findings is None:
        return text
    head, runs = text.split("[[runs]]", 1)
    return head + f"[findings]\ninclude = {list(findings)!r}\n[[runs]]" + runs


def tiny_study_head(name: str) -> str:
    """Every section but the runs: for tests that bring their own run (and maybe more sections)."""
    return HEAD.format(name=name)
