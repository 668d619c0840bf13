"""Data-parallel plumbing for `torchrun --nproc_per_node K ppo_imagined.py ...` (issue 20), after CleanRL's
ppo_atari_multigpu.py: every rank steps its own imagined envs (its slice of --num-envs, its own seeds), the ranks
start from rank 0's weights and average their gradients before every optimizer step, so the weights stay the same
everywhere; the world model is fitted once, on rank 0, and shared; rank 0 alone evaluates, logs and saves.

Without torchrun (no WORLD_SIZE in the environment) `DataParallel` is one rank of one and every method does
nothing, so a plain `python ppo_imagined.py` computes exactly what it computed before. gloo on the CPU, nccl on GPUs.
"""
import dataclasses
import os
import sys
import tempfile
from collections import defaultdict

import torch
import torch.distributed as dist

import dyna
import rl_utils as ru


class DataParallel:
    """This process's place among the torchrun ranks, and the collectives the PPO loop needs."""

    def __init__(self, cuda=True):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.leader = self.rank == 0
        use_cuda = cuda and torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if self.world_size > 1:
            if use_cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def active(self):
        return self.world_size > 1

    def check_args(self, args, model):
        """torchrun's own flags: the ranks split --num-envs, and only a batched imagined env (or none) is shared."""
        if not self.active:
            return
        if args.num_envs % self.world_size:
            raise ru.ArgError("--num-envs", f"a multiple of the {self.world_size} torchrun processes (they split it)",
                              args.num_envs)
        if model is not None and dyna.vector_env_kind(args, model) != "batched":
            raise ru.ArgError("--vector-env", "batched under torchrun (a model with imagined_vector_env)",
                              args.vector_env)

    def rank_args(self, args):
        """args for this rank's envs: its slice of --num-envs, seeded as those rows are in one process."""
        per_rank = args.num_envs // self.world_size
        return dataclasses.replace(args, num_envs=per_rank, seed=args.seed + self.rank * per_rank)

    def print(self, *args, **kwargs):
        """print on rank 0 only."""
        if self.leader:
            print(*args, **kwargs)

    def initial_data(self, model, args, run, log):
        """dyna.initial_data on rank 0 (the real data, the first fit), the fitted model shared with every rank;
        (None, 0) on the others."""
        out = dyna.initial_data(model, args, run, log) if self.leader else (None, 0)
        self.share_world_model(model)
        return out

    def broadcast_module(self, module):
        """Rank 0's parameters and buffers everywhere: the same initial weights (and running statistics)."""
        if self.active:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def average_gradients(self, module):
        """Every rank's gradients replaced by their mean over the ranks, in one collective."""
        if not self.active:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def sum(self, tensor):
        """The sum over the ranks (in place)."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, tensor):
        return self.sum(tensor.detach().clone()) / self.world_size if self.active else tensor

    def agree(self, flag):
        """Rank 0's decision (evaluation, early stop) for every rank."""
        if not self.active:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def batch_moments(self, x):
        """(mean, variance, count) over the rows of x on every rank together (x on one rank: x's own)."""
        if not self.active:
            return x.mean(0), x.var(0, unbiased=False), x.shape[0]
        sums = self.sum(torch.cat([torch.tensor([x.shape[0]], dtype=x.dtype, device=x.device), x.sum(0).reshape(-1),
                                   (x * x).sum(0).reshape(-1)]))
        n, rest = sums[0], sums[1:].reshape(2, *x.shape[1:])
        mean = rest[0] / n
        return mean, (rest[1] / n - mean**2).clamp(min=0.0), n

    def share_world_model(self, model):
        """Rank 0's fitted world model on every rank (its checkpoint's bytes broadcast, loaded by the others).
        Returns True on the ranks that loaded a new model (their imagined envs must be rebuilt)."""
        if not self.active or model is None or not getattr(model, "learns", True):
            return False
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "world_model.pt")
            payload = [None]
            if self.leader:
                model.save(path)
                with open(path, "rb") as f:
                    payload[0] = f.read()
            dist.broadcast_object_list(payload, src=0)
            if self.leader:
                return False
            with open(path, "wb") as f:
                f.write(payload[0])
            model.load(path)
        return True

    def close(self):
        """Tear the process group down on every rank together: destroy_process_group is collective, and a rank
        that tore down while rank 0 still evaluated was seen to abort (SIGABRT, 'terminate called without an
        active exception') under load, after which torchrun stopped rank 0 mid-run. A rank other than 0 then ends
        its process here: it has written nothing to keep, and the same abort was seen once more, rarely, in a
        follower's interpreter shutdown after rank 0 had finished (gloo's threads freeing tensors at exit)."""
        if self.active and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            if not self.leader:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(0)


class _NullWriter:
    def add_scalar(self, *args, **kwargs):
        pass

    def close(self):
        pass


class _NullEvaluator:
    """A rank other than 0 judges nothing: it follows rank 0's decisions (DataParallel.agree)."""

    last_real = last_gap = float("nan")

    def __call__(self, *args, **kwargs):
        return None

    def solved(self, consecutive):
        return False


class Follower:
    """What a rank other than 0 has in place of `rl_utils.Run`: no run dir, no writer, no evaluation, no summary."""

    def __init__(self):
        self.writer, self.evaluator = _NullWriter(), _NullEvaluator()
        self.figures, self.timings = defaultdict(int), defaultdict(float)
        self.checkpoint = lambda: {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_dyna_round(self, metrics):
        pass

    def finish(self, *args, **kwargs):
        pass
