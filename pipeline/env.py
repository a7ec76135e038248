"""Process environment that Ray must see before it is imported (it reads some variables at import)."""
import os

RAY_ENV = {
    # With 0, Ray 2.60 keeps a loopback address (--address 127.0.0.1:PORT, the node address) as 127.0.0.1;
    # with 1 (its Linux default) it swaps it for this machine's external address before connecting.
    # eqlab does not force the node address when joining, so a head registered elsewhere still joins.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",            # no telemetry traffic off the machine
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # each train.report otherwise waits ~2 s for the controller
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_defaults() -> None:
    """Set each variable unless the user already chose a value."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


def worker_env() -> dict[str, str]:
    """The same variables, as a Ray runtime_env, so remote workers on a real cluster get them too."""
    return {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}
