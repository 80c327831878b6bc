"""MoE layers: the MoE settings, the MoE MLP, its experts bank (whole, or sharded over processes: expert
parallelism), the capacity dispatch math and the attention layer that hands its graph to the router."""
from .attention import GraphAttention
from .config import CAPACITY_GROUPS, DROPLESS, EVAL_DISPATCHES, MoeConfig
from .dispatch import assign_slots, buffer_rows, expert_capacity, row_sources
from .expert_parallel import (
    ExpertParallelLayout,
    ShardedExperts,
    clip_grad_norm_,
    exclude_from_ddp,
    expert_parallel_size,
    gather_optimizer_state,
    gather_state_dict,
    reduce_expert_gradients,
    shard_optimizer_state,
)
from .experts import Experts
from .moe_mlp import MoeMlp, attach_aux_loss

__all__ = ['MoeConfig', 'DROPLESS', 'CAPACITY_GROUPS', 'EVAL_DISPATCHES', 'MoeMlp', 'Experts', 'GraphAttention',
           'assign_slots', 'buffer_rows', 'row_sources', 'expert_capacity', 'attach_aux_loss', 'ExpertParallelLayout',
           'ShardedExperts', 'clip_grad_norm_', 'exclude_from_ddp', 'expert_parallel_size', 'gather_optimizer_state',
           'gather_state_dict', 'reduce_expert_gradients', 'shard_optimizer_state']
