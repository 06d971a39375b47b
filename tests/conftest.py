"""Test-wide settings."""

import os

# The CPU forms (fcn_jax.models.forms, fcn_jax.tune) are measured once per machine at first use; the tests
# take the fixed default set instead, so that every run traces the same programs (tests of the
# measurement itself point the cache elsewhere and clear this).
os.environ.setdefault('FCN_JAX_CPU_FORMS', 'default')
