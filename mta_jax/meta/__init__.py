"""Meta-learning core: differentiable inner loop, MAML outer objective, algorithm registry, meta-step."""
from mta_jax.meta.algorithms import ALGORITHMS, Algorithm, MetaConfig
from mta_jax.meta.inner import INNER_OPTIMIZERS, InnerAux, InnerConfig, adapt, inner_optimizer
from mta_jax.meta.outer import map_tasks, meta_loss, num_tasks, task_loss
from mta_jax.meta.step import MetaState, adapt_for_eval, init_state, initial_params, make_meta_step

__all__ = [
    "ALGORITHMS", "Algorithm", "MetaConfig",
    "INNER_OPTIMIZERS", "InnerAux", "InnerConfig", "adapt", "inner_optimizer",
    "map_tasks", "meta_loss", "num_tasks", "task_loss",
    "MetaState", "adapt_for_eval", "init_state", "initial_params", "make_meta_step",
]
