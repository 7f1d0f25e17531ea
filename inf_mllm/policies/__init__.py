"""Eviction policies (SPEC §5): one module each, registered by name."""
from .base import (  # noqa: F401
    ORIGINAL,
    ROLLING,
    Policy,
    available_policies,
    get_policy_class,
    make_policy,
    register_policy,
    select_keep,
)
from . import full, h2o, inf_mllm, look_m, snapkv, streaming_llm, window  # noqa: F401,E402
