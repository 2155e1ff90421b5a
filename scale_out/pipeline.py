"""Staged AGILLM training across processes: layer ranges on different processes, forward AND backward, on
`torch.distributed.pipelining` (PyTorch's pipeline engine: `PipelineStage` + a GPipe or 1F1B schedule).

transformers' own pipeline parallelism (`from_pretrained(..., distributed_config=DistributedConfig(pp_size=2))`)
already runs AGILLM's forward and `generate` stage by stage across processes, but its point-to-point sends are not
autograd-aware, so it cannot train. This module splits AGILLM the way transformers does (the same even layer split,
the same `PipelineIdentityLayer` in place of what a stage does not own: torchtitan's "manual split" recipe) and hands
each stage to torch's pipelining engine, which moves activations forward and their gradients backward between the
processes, micro-batch by micro-batch.

    torchrun --nproc_per_node 2 -m scale_out.pipeline --output runs/pipelined --steps 64 --schedule 1f1b

A tied embedding / head (AGILLM's default) lives on the first stage (the embedding) and on the last (the head): after
backward each holds only its own share of the tied weight's gradient, so `sync_tied_gradients` sums the two shares
between those stages (what Megatron-LM does for its embedding group) before the optimizer steps; both copies then
take the same update and stay equal.
"""

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


SCHEDULES = ("gpipe", "1f1b")


def stage_layer_range(stage_index: int, num_stages: int, num_layers: int) -> tuple[int, int]:
    """[start, end) of the decoder layers a stage owns: transformers' even split (the last stage takes the rest)."""
    per_stage = num_layers // num_stages
    start = stage_index * per_stage
    return start, num_layers if stage_index == num_stages - 1 else start + per_stage


class AgillmPipelineStage(nn.Module):
    """One stage of an `AgillmForCausalLM`: its layer range, plus the embedding (first stage) or final norm and head
    (last stage). The modules it does not own become `PipelineIdentityLayer`s, so parameter names stay those of the
    whole model (a stage's state dict is a slice of the model's).

    forward: first stage `input_ids -> hidden states`, middle stages `hidden -> hidden`, last stage `-> logits`.
    """

    def __init__(self, model: nn.Module, stage_index: int, num_stages: int):
        super().__init__()
        from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

        num_layers = model.config.num_hidden_layers
        if not 1 < num_stages <= num_layers:
            raise ValueError(f"num_stages must be between 2 and the {num_layers} decoder layers, got {num_stages}")
        if not 0 <= stage_index < num_stages:
            raise ValueError(f"stage_index must be in [0, {num_stages}), got {stage_index}")
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.layer_range = stage_layer_range(stage_index, num_stages, num_layers)
        base = model.get_decoder()
        start, end = self.layer_range
        for index in range(num_layers):
            if not start <= index < end:
                base.layers[index] = PipelineIdentityLayer()
        if not self.is_first:
            base.embed_tokens = PipelineIdentityLayer()
        if not self.is_last:
            base.norm = PipelineIdentityLayer()
            model.lm_head = PipelineIdentityLayer()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            hidden = self.model.get_decoder()(input_ids=inputs, use_cache=False).last_hidden_state
        else:
            hidden = self.model.get_decoder()(inputs_embeds=inputs, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden) if self.is_last else hidden


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the next token (a causal LM's loss, no padding)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def tied_weight(stage: AgillmPipelineStage) -> nn.Parameter | None:
    """The embedding / head weight this stage holds when the model ties them (first and last stage), else None."""
    if not stage.model.config.tie_word_embeddings:
        return None
    if stage.is_first:
        return stage.model.get_decoder().embed_tokens.weight
    if stage.is_last:
        return stage.model.lm_head.weight
    return None


def tied_group(num_stages: int):
    """The process group of the first and last stage (every rank must call this, in the same order)."""
    return dist.new_group([0, num_stages - 1])


def sync_tied_gradients(stage: AgillmPipelineStage, group) -> None:
    """Sum the tied embedding / head gradient over the first and last stage (each computed its own share)."""
    weight = tied_weight(stage)
    if weight is not None:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=group)


def stage_io_metadata(stage: AgillmPipelineStage, microbatch_shape: tuple[int, int]):
    """(input, output) of one micro-batch through `stage`, as meta tensors: what torch's `PipelineStage` needs to
    allocate its send / receive buffers without a shape-inference forward (which would feed AGILLM uninitialized
    hidden states, and AGILLM rejects non-finite `inputs_embeds`)."""
    config, dtype = stage.model.config, next(stage.parameters()).dtype
    # requires_grad: the received hidden states need their gradient computed, to be sent back to the previous stage
    hidden = torch.empty(*microbatch_shape, config.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    inputs = torch.empty(microbatch_shape, dtype=torch.long, device="meta") if stage.is_first else hidden
    if not stage.is_last:
        return inputs, hidden
    return inputs, torch.empty(*microbatch_shape, config.vocab_size, dtype=dtype, device="meta", requires_grad=True)


def build_schedule(stage_module: AgillmPipelineStage, stage_index: int, num_stages: int, batch_shape: tuple[int, int],
                   microbatches: int, schedule: str = "gpipe"):
    """torch's `PipelineStage` for `stage_module` and a GPipe or 1F1B schedule that splits every `batch_shape`
    batch into `microbatches` micro-batches; the last stage computes `next_token_loss` per micro-batch (grads are
    averaged over micro-batches: the loss of the whole batch, since micro-batches have equal token counts)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    rows, seq_len = batch_shape
    if rows % microbatches:
        raise ValueError(f"the batch's {rows} rows do not split into {microbatches} equal micro-batches")
    inputs, outputs = stage_io_metadata(stage_module, (rows // microbatches, seq_len))
    stage = PipelineStage(stage_module, stage_index, num_stages, torch.device("cpu"), input_args=inputs,
                          output_args=outputs)
    schedule_class = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    return schedule_class(stage, n_microbatches=microbatches, loss_fn=next_token_loss)


def train_step(schedule, stage: AgillmPipelineStage, input_ids: torch.Tensor, group) -> float | None:
    """Forward and backward of one batch through the pipeline, then the tied-gradient sum; returns the batch's
    loss (mean over micro-batches) on the last stage, None elsewhere. The caller steps its optimizer."""
    losses: list[torch.Tensor] = []
    if stage.is_first:
        schedule.step(input_ids)
    elif stage.is_last:
        schedule.step(target=input_ids, losses=losses)
    else:
        schedule.step()
    sync_tied_gradients(stage, group)
    return torch.stack(losses).mean().item() if stage.is_last else None


def save_pipelined_model(stage: AgillmPipelineStage, folder: Path) -> nn.Module | None:
    """Gather every stage's weights on rank 0 and save the whole model there with `save_pretrained` (a Hub-ready
    folder: AGILLM's code files and `auto_map` included); returns it on rank 0. Every rank must call it."""
    owned = stage.model.state_dict()  # a stage's `PipelineIdentityLayer`s hold nothing: only its own weights
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(owned, gathered, dst=0)
    if dist.get_rank() == 0:
        merged = {name: tensor for state in gathered for name, tensor in state.items()}
        whole = type(stage.model)(stage.model.config)
        whole.load_state_dict(merged, strict=True)
        whole.save_pretrained(folder)
        return whole
    return None


def main(argv=None) -> None:
    from scale_out import diloco

    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node 2 -m scale_out.pipeline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved AGILLM folder (loaded as remote code); default: a tiny AGILLM")
    parser.add_argument("--output", type=Path, required=True, help="folder for the trained model and losses.json")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="rows of --block-size tokens per step")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, num_stages = dist.get_rank(), dist.get_world_size()
    args.output.mkdir(parents=True, exist_ok=True)
    train_blocks, held_out = diloco.shakespeare_blocks(args.block_size, args.steps * args.batch * args.block_size, 64)
    model = diloco.build_model(args.model, seed=0)
    held_out_before = diloco.held_out_loss(model, held_out) if rank == 0 else None
    stage = AgillmPipelineStage(model, rank, num_stages)
    group = tied_group(num_stages)
    schedule = build_schedule(stage, rank, num_stages, (args.batch, args.block_size), args.microbatches,
                              args.schedule)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=args.lr, weight_decay=0.1)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        loss = train_step(schedule, stage, diloco.global_batch(train_blocks, step, args.batch), group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    seconds = time.perf_counter() - start
    whole = save_pipelined_model(stage, args.output)
    if stage.is_last:
        (args.output / "losses.json").write_text(json.dumps({"losses": losses, "seconds": seconds}))
        print(f"pipelined ({args.schedule}, {num_stages} stages): training loss {losses[0]:.3f} -> {losses[-1]:.3f}"
              f" in {seconds:.1f} s")
    if whole is not None:
        print(f"held-out loss {held_out_before:.3f} -> {diloco.held_out_loss(whole, held_out):.3f}; whole model "
              f"saved to {args.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
