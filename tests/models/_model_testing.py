"""Helpers shared by the model tests."""

import jax

import prefjax.models as pm

_JITTED = {}


def jitted(model, method="apply"):
    """A jitted ``model.<method>`` shared by every model with the same config and head, so tests
    reuse one compilation per input shape."""
    key = (model.config, model.head, method)
    if key not in _JITTED:
        template = pm.Model(model.config, None, head=model.head)
        _JITTED[key] = jax.jit(getattr(template, method))
    return _JITTED[key]


def abstract_model(config, head="lm"):
    """A model whose params are shape-only (``jax.ShapeDtypeStruct``): nothing is compiled."""
    params = jax.eval_shape(lambda: pm.Model.init(config, jax.random.key(0), head=head).params)
    return pm.Model(config, params, head=head)
