"""Eviction policies (SPEC §5): one module each, registered by name and found automatically."""
from .base import (  # noqa: F401
    DEFAULT_CHUNK,
    ORIGINAL,
    ROLLING,
    Policy,
    Scoring,
    available_policies,
    get_policy_class,
    make_policy,
    register_policy,
    select_keep,
)
