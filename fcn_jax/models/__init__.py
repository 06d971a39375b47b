"""FCN models: `build(arch, ...)` returns a flax module; `describe(arch)` its Table 1 figures."""

from fcn_jax.models.fcn import (ARCHS, AUX_OUTPUT, FCN, MODEL_CONFIG_FIELDS, ArchSpec, Head, Stream,
                                build, build_from_config, count_params, describe, frozen_mask,
                                geometry, head_classes, init_variables)

__all__ = ['ARCHS', 'AUX_OUTPUT', 'ArchSpec', 'FCN', 'Head', 'MODEL_CONFIG_FIELDS', 'Stream',
           'build', 'build_from_config', 'count_params', 'describe', 'frozen_mask', 'geometry',
           'head_classes', 'init_variables']
