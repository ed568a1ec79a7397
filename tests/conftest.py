"""Every test sees 8 simulated CPU devices and the XLA:CPU flags of the entry points (set
before jax is imported)."""

import os

from ffn_jax.host import with_xla_defaults

os.environ["XLA_FLAGS"] = with_xla_defaults(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One token/corpus cache for the whole session (and the subprocesses tests start), kept
# between local runs; a clean clone fetches the corpus once.
os.environ.setdefault(
    "FFN_JAX_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "ffn_jax")
)
