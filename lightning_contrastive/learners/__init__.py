"""Learners: what is meta-learned and how a task's fast parameters learn."""

from lightning_contrastive.learners.base import Learner
from lightning_contrastive.learners.complex_synapse import ComplexSynapse
from lightning_contrastive.learners.dual_system import DualSystem

__all__ = ["ComplexSynapse", "DualSystem", "Learner"]
