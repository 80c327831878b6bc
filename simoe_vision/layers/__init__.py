"""MoE layers: the MoE MLP, its experts bank and the capacity dispatch math."""
from .dispatch import assign_slots, expert_capacity
from .experts import Experts
from .moe_mlp import MoeMlp, attach_aux_loss, aux_loss_scale

__all__ = ['MoeMlp', 'Experts', 'assign_slots', 'expert_capacity', 'attach_aux_loss', 'aux_loss_scale']
