"""Test-wide settings."""

import os
import shutil
import tempfile

# The CPU forms (fcn_jax.models.forms, fcn_jax.tune) are measured once per machine at first use; the tests
# take the fixed default set instead, so that every run traces the same programs (tests of the
# measurement itself point the cache elsewhere and clear this).
os.environ.setdefault('FCN_JAX_CPU_FORMS', 'default')

# Compiling is most of the suite's time, and many tests compile the same small programs (in the
# pytest workers and in the CLIs they start): one persistent XLA cache for the whole run, made by the
# first process here (xdist's workers and every subprocess inherit it through the environment), and
# removed by that process at the end. A cached program is the compiled one, bit for bit. A
# JAX_COMPILATION_CACHE_DIR of the caller's own is used as it is and kept.
_OWN_XLA_CACHE = None
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  _OWN_XLA_CACHE = tempfile.mkdtemp(prefix='fcn_jax_test_xla_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_XLA_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
  try:  # a size limit makes jax lock the cache (filelock): two workers may write one entry at once
    import filelock  # noqa: F401
    os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))
  except ImportError:
    pass


def pytest_unconfigure(config):
  if _OWN_XLA_CACHE:
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)
