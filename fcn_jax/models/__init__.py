"""FCN models: `build(arch, ...)` returns a flax module; `describe(arch)` its Table 1 figures."""

from fcn_jax.models.fcn import ARCHS, FCN, build, count_params, describe, frozen_mask, geometry, init_variables

__all__ = ['ARCHS', 'FCN', 'build', 'count_params', 'describe', 'frozen_mask', 'geometry',
           'init_variables']
