"""Knowledge distillation (the `distill` stage): a frozen teacher teaches a student on packed
text. The stage is compress.distill.distill; its schema compress.distill.config; one training
process compress.distill.student, its trainer compress.distill.trainer (forward passes and
losses: pair, losses; checkpoints: checkpoint; DDP / FSDP2: parallel); several processes
compress.distill.launch and compress.distill.worker; teacher-generated data
compress.distill.generate; the packed text compress.distill.data."""

from compress.distill.config import DataConfig, DistillConfig, GeneratedConfig, LossConfig
from compress.distill.distill import STAGE, apply, check, generated, n_processes, teacher_dir
from compress.distill.student import attention_flops, every_other, layer_map, prepare, student_depth, train_student

__all__ = ["STAGE", "DataConfig", "DistillConfig", "GeneratedConfig", "LossConfig", "apply", "attention_flops",
           "check", "every_other", "generated", "layer_map", "n_processes", "prepare", "student_depth",
           "teacher_dir", "train_student"]
