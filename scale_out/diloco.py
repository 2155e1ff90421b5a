"""Async side workers for AGILLM: DiLoCo and Streaming DiLoCo on torchft, against synchronous data parallelism.

AGILLM 4.1 trains layer groups on side workers and blends their updates into the model. This is DiLoCo (Douillard et
al. 2023, arXiv:2311.08105) and Streaming DiLoCo (Douillard et al. 2025, arXiv:2501.18512), which torchft implements
(`torchft.local_sgd.DiLoCo`): every replica trains its own copy with an inner optimizer (AdamW) for `sync_every` (H)
steps on its own data, then the replicas average their pseudo-gradients (global weights - local weights) and an
outer optimizer (Nesterov SGD, lr 0.7, momentum 0.9 in the paper) updates the global weights. With several
fragments (here: AGILLM's decoder layers split into contiguous layer groups), each group is averaged at its own time,
H / fragments steps apart, so a sync moves one layer group's bytes instead of the whole model's.

    torchrun --nproc_per_node 2 -m scale_out.diloco --output runs/diloco            # DiLoCo, Shakespeare
    torchrun --nproc_per_node 2 -m scale_out.diloco --mode sync --output runs/ddp   # torch DDP, same data
    torchrun --nproc_per_node 2 -m scale_out.diloco --model FOLDER --fragments 2 --sync-every 16 ...

Each process is one torchft replica (a replica group of one process); rank 0 starts torchft's lighthouse (the
quorum service) in-process unless `--lighthouse ADDRESS` names one already running (`torchft_lighthouse
--min_replicas 2 --bind [::]:29510`, e.g. for workers on several hosts). torch's default process group (gloo) is used
only to agree on the lighthouse address and the evaluation points; DiLoCo's averaging goes through torchft's
`Manager`. Rank 0 saves the global model (every fragment's outer weights) as a Hub-ready folder that loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

import argparse
import contextlib
import datetime
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)

# The tiny AGILLM trained when no `--model` folder is given (vocabulary: the shipped tokenizer's 8192 ids).
TINY_FIELDS = {
    "vocab_size": 8192,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@dataclass
class TrainingPlan:
    """One training run; every process of the run uses the same plan."""

    mode: str = "diloco"  # "diloco" (torchft) or "sync" (torch DDP, the synchronous baseline)
    steps: int = 96  # inner steps per process (equal compute: the same for both modes)
    batch_per_process: int = 8  # rows of `block_size` tokens per process and step
    block_size: int = 64
    inner_optimizer: str = "adamw"  # "adamw" (as in DiLoCo) or "sgd" (no optimizer state: exact comparisons)
    inner_lr: float = 3e-3
    sync_every: int = 16  # H: inner steps between two syncs of the same fragment
    fragments: int = 1  # layer groups synced at different times (Streaming DiLoCo); 1 = DiLoCo
    outer_lr: float = 0.7
    outer_momentum: float = 0.9  # Nesterov momentum, as in the DiLoCo paper; 0 = plain SGD
    eval_every: int = 16  # held-out loss every so many steps (and after the last)
    seed: int = 0
    track_agreement: bool = False  # record after each step which fragments are equal on all replicas (tests)

    def check(self) -> None:
        if self.mode not in ("diloco", "sync"):
            raise ValueError(f"mode must be 'diloco' or 'sync', got {self.mode!r}")
        if self.inner_optimizer not in ("adamw", "sgd"):
            raise ValueError(f"inner_optimizer must be 'adamw' or 'sgd', got {self.inner_optimizer!r}")
        if self.mode == "diloco" and self.sync_every % self.fragments:
            raise ValueError(f"sync_every ({self.sync_every}) must be a multiple of fragments ({self.fragments})")
        if min(self.steps, self.batch_per_process, self.block_size, self.fragments, self.sync_every) < 1:
            raise ValueError(f"steps, batch sizes, fragments and sync_every must be positive: {self}")


@dataclass
class CommunicationLog:
    """What a process handed to all-reduce: calls, payload bytes (tensor sizes, not wire bytes) and sync rounds
    (steps at which any communication happened)."""

    allreduce_calls: int = 0
    allreduce_bytes: int = 0
    sync_steps: list[int] = field(default_factory=list)

    def record(self, tensor: torch.Tensor, step: int) -> None:
        self.allreduce_calls += 1
        self.allreduce_bytes += tensor.numel() * tensor.element_size()
        if not self.sync_steps or self.sync_steps[-1] != step:
            self.sync_steps.append(step)


def layer_group_fragments(model: nn.Module, num_fragments: int) -> list[nn.ParameterList]:
    """AGILLM's parameters as `num_fragments` contiguous layer groups, the units Streaming DiLoCo syncs separately.

    Decoder layer `i` goes to group `i * num_fragments // num_layers`; the embedding joins the first group and every
    other parameter (final norm, an untied head, extra heads) the last. A tied head shares the embedding's tensor,
    which `named_parameters` lists once, so it is averaged once, with the first group.
    """
    num_layers = model.config.num_hidden_layers
    if not 1 <= num_fragments <= num_layers:
        raise ValueError(f"fragments must be between 1 and the {num_layers} decoder layers, got {num_fragments}")
    prefix = f"{model.base_model_prefix}.layers."
    groups: list[list[nn.Parameter]] = [[] for _ in range(num_fragments)]
    for name, parameter in model.named_parameters():
        if name.startswith(prefix):
            layer = int(name[len(prefix):].split(".")[0])
            groups[layer * num_fragments // num_layers].append(parameter)
        elif name.startswith(f"{model.base_model_prefix}.embed_tokens."):
            groups[0].append(parameter)
        else:
            groups[-1].append(parameter)
    return [nn.ParameterList(group) for group in groups]


# ----------------------------------------------------------------------------------------------------------------
# Data: fixed-size token blocks, the same global order in both modes; replica r trains on its rows of each batch.


def shakespeare_blocks(block_size: int, train_tokens: int, held_out_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training blocks, held-out blocks) of the shipped Shakespeare corpus, tokenized with the shipped tokenizer.

    Training blocks come from the training plays in order, at least `train_tokens` tokens; held-out blocks are
    evenly spaced over the held-out plays (`corpus.shakespeare.HELD_OUT_PLAYS`), never seen in training.
    """
    from transformers import AutoTokenizer

    from corpus.shakespeare import train_and_held_out
    from tokenizer import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    train_texts, held_out_texts = train_and_held_out()

    def blocks(texts: list[str], enough_tokens: int | None) -> torch.Tensor:
        ids: list[int] = []
        for text in texts:
            # whole plays, packed into blocks below (verbose=False: no warning about the model's context length)
            ids += tokenizer(text, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
            if enough_tokens is not None and len(ids) >= enough_tokens:
                break
        usable = len(ids) // block_size * block_size
        return torch.tensor(ids[:usable]).view(-1, block_size)

    train = blocks(train_texts, train_tokens + block_size)
    held_out = blocks(held_out_texts, None)
    spaced = torch.linspace(0, len(held_out) - 1, held_out_blocks).round().long()
    return train, held_out[spaced]


def random_blocks(vocab_size: int, block_size: int, count: int, seed: int) -> torch.Tensor:
    """`count` blocks of uniformly random ids from 32 up (past AGILLM's reserved special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(32, vocab_size, (count, block_size), generator=generator)


def global_batch(train: torch.Tensor, step: int, global_batch_size: int) -> torch.Tensor:
    """The rows every process together trains on at `step` (wrapping around the training blocks)."""
    rows = torch.arange(step * global_batch_size, (step + 1) * global_batch_size) % len(train)
    return train[rows]


def process_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per_process = len(batch) // world_size
    return batch[rank * per_process:(rank + 1) * per_process]


@torch.no_grad()
def held_out_loss(model: nn.Module, held_out: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss over the held-out blocks (equal-length blocks: the mean of the per-batch means)."""
    was_training = model.training
    model.eval()
    losses = [model(input_ids=rows, labels=rows).loss * len(rows) for rows in held_out.split(batch_size)]
    model.train(was_training)
    return (torch.stack(losses).sum() / len(held_out)).item()


# ----------------------------------------------------------------------------------------------------------------
# torchft: lighthouse, manager, DiLoCo.


def start_lighthouse(min_replicas: int):
    """torchft's lighthouse (quorum service) in this process, on a free port; `.address()` is what managers need."""
    from torchft.coordination import LighthouseServer

    # IPv4 on every interface: workers reach it through this host's name, and a container may have no IPv6.
    return LighthouseServer(bind="0.0.0.0:0", min_replicas=min_replicas)


def lighthouse_address(plan_replicas: int, given: str | None):
    """(address, server or None): rank 0 starts a lighthouse unless one is given; every rank learns its address."""
    server = None
    if given is None and dist.get_rank() == 0:
        server = start_lighthouse(plan_replicas)
        given = server.address()
    address = [given]
    dist.broadcast_object_list(address, src=0)
    return address[0], server


def make_manager(replica_id: str, lighthouse: str, min_replicas: int, model: nn.Module, optimizer,
                 log: CommunicationLog, step_counter: list[int], timeout: datetime.timedelta = COLLECTIVE_TIMEOUT):
    """A torchft `Manager` for a replica group of one process.

    The replica group's TCPStore is this process's own (on a free port of this host); the replicas find each other
    through the lighthouse and all-reduce over torchft's reconfigurable gloo process group. `init_sync=False`:
    every replica starts from the same weights (the same folder or seed); a replica that joins later still heals
    from a peer through `state_dict` / `load_state_dict` (model and inner optimizer).
    """
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    class CountingManager(Manager):
        """torchft's Manager, counting what each all-reduce hands to the process group."""

        def allreduce(self, tensor, *args, **kwargs):
            log.record(tensor, step_counter[0])
            return super().allreduce(tensor, *args, **kwargs)

    # The quorum hands this store's address to the other replicas (their process group meets there): advertise the
    # host name, as torchft does for the manager itself, so replicas on other hosts can reach it.
    host = socket.gethostname()
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)

    def state_dict():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(state):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    manager = CountingManager(
        pg=ProcessGroupGloo(timeout=timeout), load_state_dict=load_state_dict, state_dict=state_dict,
        min_replica_size=min_replicas, use_async_quorum=False,  # DiLoCo requires a synchronous quorum
        replica_id=replica_id, store_addr=host, store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=lighthouse, init_sync=False, timeout=timeout, quorum_timeout=timeout,
        connect_timeout=timeout,
    )
    return manager, store


@contextlib.contextmanager
def outer_weights(model: nn.Module, diloco):
    """Inside: the model holds the global (outer) weights of every fragment, as the last syncs left them; after:
    this replica's local weights again. torchft keeps the outer weights in each fragment (`original_parameters`);
    `restore_parameters()` copies them in (DiLoCo 0.2.0 has no public accessor for its fragment list)."""
    local = [parameter.detach().clone() for parameter in model.parameters()]
    for fragment in diloco._fragments:
        fragment.restore_parameters()
    try:
        yield model
    finally:
        with torch.no_grad():
            for parameter, saved in zip(model.parameters(), local, strict=True):
                parameter.copy_(saved)


def inner_optimizer(model: nn.Module, plan: TrainingPlan) -> torch.optim.Optimizer:
    if plan.inner_optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=plan.inner_lr)
    return torch.optim.AdamW(model.parameters(), lr=plan.inner_lr, weight_decay=0.1, betas=(0.9, 0.95))


def outer_optimizers(fragments: list[nn.ParameterList], plan: TrainingPlan) -> list[torch.optim.Optimizer]:
    """One outer SGD per fragment (each keeps its own momentum), Nesterov when momentum is set."""
    nesterov = plan.outer_momentum > 0
    return [torch.optim.SGD(fragment.parameters(), lr=plan.outer_lr, momentum=plan.outer_momentum,
                            nesterov=nesterov) for fragment in fragments]


def fragment_agreement(fragments: list[nn.ParameterList]) -> list[bool]:
    """Per fragment: are its weights bitwise equal on every process? (a measurement over the default group)"""
    agreed = []
    for fragment in fragments:
        flat = torch.cat([parameter.detach().flatten() for parameter in fragment])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        agreed.append(all(torch.equal(gathered[0], other) for other in gathered[1:]))
    return agreed


# ----------------------------------------------------------------------------------------------------------------
# The training loop shared by both modes.


def train(model: nn.Module, plan: TrainingPlan, train_blocks: torch.Tensor, held_out: torch.Tensor,
          lighthouse: str | None = None, run_name: str = "run", save_to: Path | None = None) -> dict:
    """Train `model` (the same weights on every process) under `plan`; returns this process's history.

    Every process runs `plan.steps` inner steps on its `plan.batch_per_process` rows of each global batch. The
    held-out loss is measured by rank 0 on the global model (DDP: the replicated weights; DiLoCo: every fragment's
    outer weights), between two barriers, outside the timed training steps. With `save_to`, rank 0 saves that
    global model there with `save_pretrained` (AGILLM's code files and `auto_map` included).
    """
    plan.check()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(plan.seed)
    model.train()
    optimizer = inner_optimizer(model, plan)
    log, step_counter = CommunicationLog(), [0]
    history = {"plan": asdict(plan), "rank": rank, "world_size": world_size, "train_loss": [], "eval_steps": [],
               "held_out_loss": [], "agreement": []}
    server = diloco = manager = None
    fragments = layer_group_fragments(model, plan.fragments if plan.mode == "diloco" else 1)

    if plan.mode == "sync":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model)

        def counting_allreduce(state, bucket):
            log.record(bucket.buffer(), step_counter[0])
            return default_hooks.allreduce_hook(None, bucket)

        trained.register_comm_hook(None, counting_allreduce)
        evaluation_view = contextlib.nullcontext
        hooks = contextlib.nullcontext()
    else:
        from torchft.local_sgd import DiLoCo

        address, server = lighthouse_address(world_size, lighthouse)
        manager, _store = make_manager(f"{run_name}_replica{rank}", address, world_size, model, optimizer, log,
                                       step_counter)
        diloco = DiLoCo(manager, list(fragments), optimizer, outer_optimizers(fragments, plan),
                        sync_every=plan.sync_every)
        trained = model

        def evaluation_view():
            return outer_weights(model, diloco)

        hooks = diloco  # entered: optimizer hooks that count inner steps and sync a fragment when its turn comes

    def evaluate(step: int) -> None:
        dist.barrier()
        if rank == 0:
            with evaluation_view():
                history["eval_steps"].append(step)
                history["held_out_loss"].append(held_out_loss(model, held_out))
        dist.barrier()

    seconds = 0.0
    with hooks:
        evaluate(0)
        for step in range(plan.steps):
            step_counter[0] = step + 1
            rows = process_rows(global_batch(train_blocks, step, plan.batch_per_process * world_size), rank,
                                world_size)
            start = time.perf_counter()
            loss = trained(input_ids=rows, labels=rows).loss
            loss.backward()
            optimizer.step()  # DiLoCo: its post-step hook syncs a fragment every sync_every / fragments steps
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - start
            history["train_loss"].append(loss.item())
            if plan.track_agreement:
                history["agreement"].append(fragment_agreement(fragments))
            if (step + 1) % plan.eval_every == 0 or step + 1 == plan.steps:
                evaluate(step + 1)

    history.update(train_seconds=seconds, **asdict(log),
                   fragment_elements=[sum(p.numel() for p in fragment) for fragment in fragments])
    if save_to is not None:
        with evaluation_view():
            if rank == 0:
                model.save_pretrained(save_to)
    if diloco is not None:
        history["outer_syncs"] = manager.current_step()  # committed fragment syncs
        manager.shutdown(wait=False)
        dist.barrier()  # every manager has stopped talking to the lighthouse
    if server is not None:
        server.shutdown()
    return history


def build_model(folder: str | None, seed: int) -> nn.Module:
    """The model every process starts from: a saved AGILLM folder (remote code), else the tiny AGILLM of this
    repository's code built from `TINY_FIELDS` with `seed` (identical on every process)."""
    if folder is not None:
        from transformers import AutoModelForCausalLM

        model = None
        for turn in range(dist.get_world_size()):  # one rank at a time: ranks share the remote-code module cache
            if dist.get_rank() == turn:
                model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
            dist.barrier()
        return model
    from configuration_agillm import AgillmConfig
    from modeling_agillm import AgillmForCausalLM

    torch.manual_seed(seed)
    return AgillmForCausalLM(AgillmConfig(**TINY_FIELDS))


def parse_args(argv=None) -> argparse.Namespace:
    defaults = TrainingPlan()
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node 2 -m scale_out.diloco",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("diloco", "sync"), default=defaults.mode)
    parser.add_argument("--model", help="a saved AGILLM folder (loaded as remote code); default: a tiny AGILLM")
    parser.add_argument("--data", choices=("shakespeare", "random"), default="shakespeare")
    parser.add_argument("--output", type=Path, required=True, help="folder for the model and history.json")
    parser.add_argument("--lighthouse", help="address of a running torchft_lighthouse (default: start one on rank 0)")
    for name in ("steps", "batch_per_process", "block_size", "sync_every", "fragments", "eval_every", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("inner_lr", "outer_lr", "outer_momentum"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--inner-optimizer", choices=("adamw", "sgd"), default=defaults.inner_optimizer)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = TrainingPlan(**{name: getattr(args, name) for name in TrainingPlan.__dataclass_fields__
                           if hasattr(args, name)})
    plan.check()
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    model = build_model(args.model, plan.seed)
    tokens = plan.steps * plan.batch_per_process * dist.get_world_size() * plan.block_size
    if args.data == "shakespeare":
        from tokenizer import TOKENIZER_DIR

        train_blocks, held_out = shakespeare_blocks(plan.block_size, tokens, held_out_blocks=64)
        tokenizer_dir = TOKENIZER_DIR
    else:
        vocab = model.config.vocab_size
        train_blocks = random_blocks(vocab, plan.block_size, tokens // plan.block_size, seed=1)
        held_out, tokenizer_dir = random_blocks(vocab, plan.block_size, 64, seed=2), None
    history = train(model, plan, train_blocks, held_out, lighthouse=args.lighthouse, save_to=args.output)
    if dist.get_rank() == 0:
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(args.output)
        (args.output / "history.json").write_text(json.dumps(history, indent=2))
        print(f"{plan.mode}: held-out loss {history['held_out_loss'][0]:.3f} -> {history['held_out_loss'][-1]:.3f}"
              f" in {history['train_seconds']:.1f} s of training; {len(history['sync_steps'])} sync rounds, "
              f"{history['allreduce_bytes'] / 2**20:.1f} MiB all-reduced per process; saved to {args.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
