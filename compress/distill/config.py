"""The `distill` stage's recipe schema (pydantic, strict): the stage config (teacher, student,
steps, optimizer, precision, processes and sharding), its loss (LossConfig), its training data
(DataConfig) and the optional sequences the teacher generates for it (GeneratedConfig)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from compress.schema import Strict


class LossConfig(Strict):
    kd: float = Field(1.0, ge=0.0, description="weight of the teacher-student divergence on the logits")
    kind: Literal["forward", "reverse", "jsd", "skew"] = Field(
        "forward", description="forward KL(teacher||student), reverse KL(student||teacher), jsd (Jensen-Shannon, "
        "mixture weight beta), skew (KL(teacher || beta teacher + (1-beta) student))")
    temperature: float = Field(1.0, gt=0.0, description="softens both distributions; the loss is scaled by T^2")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: the teacher's weight in the mixture; skew: alpha")
    ce: float = Field(0.0, ge=0.0, description="weight of cross-entropy on the data's next tokens")
    hidden: float = Field(0.0, ge=0.0, description="weight of MSE between mapped layers' hidden states")
    layer_map: list[Annotated[list[int], Field(min_length=2, max_length=2)]] | None = Field(
        None, description="hidden: [[student_layer, teacher_layer], ...]; default: every student layer to the "
        "teacher layer at the same relative depth")
    chunk: int = Field(1024, gt=0, description="positions per loss chunk (logits never held for more)")


class GeneratedConfig(Strict):
    sequences: int = Field(..., gt=0, description="prompts the teacher continues (their sequences are added to "
                           "the training windows)")
    prompt_len: int = Field(32, gt=0, description="prompt tokens, cut from random training windows")
    new_tokens: int = Field(256, gt=0, description="tokens generated per prompt (fewer where EOS comes first)")
    temperature: float = Field(1.0, ge=0.0, description="0: greedy; else sampled from the full distribution")
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description="auto: vLLM on a GPU where it is installed, "
                                                  "else transformers")


class DataConfig(Strict):
    datasets: list[str] = Field(["wikitext2-valid"], min_length=1, description="built-in names (wikitext2-valid, "
                                "tinyshakespeare, gsm8k, ...), text/.jsonl files or hf:ID, joined")
    seq_len: int = Field(512, gt=1, description="tokens per packed sequence")
    eval_blocks: int = Field(8, ge=0, description="sequences held out for the periodic perplexity")
    generated: GeneratedConfig | None = Field(None, description="sequence-level distillation: add the teacher's own "
                                              "continuations of prompts from the data")


class DistillConfig(Strict):
    teacher: str = Field("base", description="base: the recipe's input model; or a model directory")
    student: Literal["input", "every_other"] = Field(
        "input", description="input: the stage's input model; every_other: the teacher's even-numbered layers")
    loss: LossConfig = Field(default_factory=LossConfig, description="the training objective: divergence from the "
                             "teacher on the logits, cross-entropy, hidden-state MSE")
    data: DataConfig = Field(default_factory=DataConfig, description="the training text, packed into sequences")
    steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="sequences per optimizer step, over all processes")
    grad_accum: int = Field(1, gt=0, description="micro-batches per step, of batch_size / grad_accum sequences each")
    lr: float = Field(1e-4, gt=0.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0: no clipping")
    eval_every: int = Field(50, ge=0, description="held-out perplexity every N steps (0: at the end only)")
    save_every: int = Field(50, ge=0, description="checkpoint every N steps for resume (0: none)")
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each decoder layer of student and teacher, and the "
                          "loss arithmetic over the vocabulary (fewer, fused kernels: faster on a GPU once "
                          "compiled, a minute or so of compiling first)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on a GPU, fp32 "
                                                      "on the CPU")
    keep_zeros: bool = Field(True, description="recovery training of a pruned artifact: linear layers (and 3-D "
                             "expert weights) with >= 5 % exact zeros keep them (their masks re-applied after every "
                             "step)")
    freeze_router: bool = Field(False, description="mixture-of-experts students: the routers are not trained "
                                "(each token keeps the experts the compressed model picks)")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes: ddp (a whole student per GPU) or fsdp (the student's parameters, "
        "gradients and optimizer state split over the GPUs, for students that do not fit one; the teacher stays whole "
        "on each, in bf16)")
    processes: int | Literal["auto"] = Field(
        1, description="processes to train on, one per GPU: 1 trains in this process; N > 1 starts N through "
        "torch's launcher, each training through accelerate on its slice of every batch; auto: every visible GPU")
    nodes: int = Field(1, gt=0, description="hosts to train on, `processes` on each: N > 1 starts this host's share "
                       "through torch's launcher with a c10d rendezvous at `rendezvous`, and each other host joins "
                       "with `python -m compress.distill.launch <run>/work/<stage>/spec.json` (the run directory on "
                       "storage every host mounts)")
    rendezvous: str | None = Field(None, pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d+$",
                                   description="nodes > 1: HOST:PORT of the rendezvous, reachable from every host "
                                   "(torch's c10d store, started by whichever host reaches it first)")

    @model_validator(mode="after")
    def _nodes_need_a_rendezvous(self):
        if self.nodes > 1 and self.rendezvous is None:
            raise ValueError("nodes > 1 needs rendezvous: HOST:PORT (a port every host can reach)")
        return self
