"""A `WorldModelVectorEnv` step as one CUDA graph: the model, the env's bookkeeping and its checks in one launch.

`WorldModelVectorEnv.use_cuda_graph()` turns it on (torch output on a GPU, NEXT_STEP autoreset). On a GPU an
eager step is a few dozen small kernels launched one by one from Python, plus a host sync for the done flags and
the checks: below tens of thousands of rows the GPU waits for the host. Here one step is:

1. the actions copied into the graph's input buffer (the host checks their shape and dtype, no kernel);
2. the graph replayed: action range flag, `action_transform_fn`, `transition_fn` on the state buffers, the
   reward / flags / step counters with last step's finished rows cleared (NEXT_STEP), the done flags, one
   finiteness flag, the new state written back into the state buffers;
3. the *previous* step's verdict (finiteness, action range, done flags: copied to pinned host memory without
   blocking when that step ran) read on the host; by then the GPU is busy with this step, so it never waits;
4. the rows that finished last step reset eagerly (`reset_fn` on those rows only, written into the buffers);
5. fresh copies of the outputs returned (the caller owns them, as with the eager env).

The price of never waiting: a bad action or a non-finite value is raised at the step after the one that made
it (the env then needs a `reset()`), without the rows (the plain env, without `use_cuda_graph()`, names them). Discrete
indices are clamped into range for the model meanwhile, as in the eager env.

What a captured step needs from the adapters (the reference ensemble's meet it): tensor operations only on the
output device, no host read (`.item()`, `bool(tensor)`, `.cpu()`), the same shapes every step, the state a pytree
of tensors. A capture that fails says so and names `eager=True`, which runs the same buffers without a graph: on
any device, for tests and to find the adapter that breaks capture. Randomness should live in the state (the
ensemble's per-row counter RNG): torch's own generators work in a graph, but a replay's draws need not be an
eager step's, so only state-held randomness gives the eager env's trajectories. Adapters must not write into the
state they are given (the warm-up runs them on it).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from world_model_env import AdapterError, _check_info, _leading_dim, _scatter, _unpack, _STEP_KEYS


def _leaves(tree, where="state"):
    """(path, tensor) pairs of a pytree (dicts, tuples, lists); dict keys sorted, so the order they come in does not
    matter (the eager env matches them by key too)."""
    if isinstance(tree, Mapping):
        return [leaf for k in sorted(tree, key=str) for leaf in _leaves(tree[k], f"{where}[{k!r}]")]
    if isinstance(tree, (tuple, list)):
        return [leaf for i, t in enumerate(tree) for leaf in _leaves(t, f"{where}[{i}]")]
    return [(where, tree)]


def _clone_tree(tree):
    """The pytree with every tensor replaced by a contiguous copy the env owns (the graph writes into it)."""
    if isinstance(tree, Mapping):
        return type(tree)({k: _clone_tree(v) for k, v in tree.items()})
    if isinstance(tree, (tuple, list)):
        return type(tree)(_clone_tree(t) for t in tree)
    return tree.clone(memory_format=torch.contiguous_format) if isinstance(tree, torch.Tensor) else tree


def _clone_info(info, owner):
    """Fresh copies of a (nested) info dict of tensors; anything else would be frozen at capture, so it is refused."""
    out = {}
    for k, v in info.items():
        if isinstance(v, dict):
            out[k] = _clone_info(v, owner)
        elif isinstance(v, torch.Tensor):
            out[k] = v.clone()
        else:
            raise AdapterError(f"{owner}: transition_fn info[{k!r}] is {type(v).__name__}; under use_cuda_graph() "
                               "info values must be tensors (a graph replays tensor ops, not Python values).")
    return out


class GraphStep:
    """The graph-mode step of one `WorldModelVectorEnv` (see the module docstring). Made by `use_cuda_graph`."""

    def __init__(self, env, eager: bool = False):
        owner = f"{env._owner}.use_cuda_graph"
        if env.output != "torch":
            raise ValueError(f"{owner}: needs output='torch' (the graph's outputs are tensors), got {env.output!r}.")
        if env.autoreset_mode is not AutoresetMode.NEXT_STEP:
            raise ValueError(f"{owner}: needs autoreset_mode=NEXT_STEP (SAME_STEP reads the finished rows in the "
                             f"step itself), got {env.autoreset_mode}.")
        if not isinstance(env.single_action_space, (spaces.Discrete, spaces.Box)):
            raise ValueError(f"{owner}: supports Discrete and Box action spaces, got {env.single_action_space}.")
        if env.device is None and not eager:
            raise ValueError(f"{owner}: the env has no device; build it with device='cuda' (output='torch').")
        cuda = env.device is not None and torch.device(env.device).type == "cuda"
        if not (eager or cuda):
            raise ValueError(f"{owner}: CUDA graphs need the env on a CUDA device, got device '{env.device}'. Pass "
                             "eager=True to run the graph-mode step without a graph (tests, debugging).")
        if env._state is not None:
            raise ValueError(f"{owner}: call it before reset(): the state buffers are the first reset's state.")
        self.env, self.eager, self.cuda = env, eager, cuda
        box = isinstance(env.single_action_space, spaces.Box)
        self._box_dtype = torch.from_numpy(np.empty(0, env.single_action_space.dtype)).dtype if box else None
        self._replay = None  # () -> the step's outputs, made at the first step
        self._pending = None  # (host verdict, its copy's event or None, step number) of the last step
        self._steps_taken = 0

    # -- the env's hooks ---------------------------------------------------------------------------------------
    def after_reset(self):
        """reset() made a new state: copy it into the graph's buffers (their addresses are the graph's)."""
        env = self.env
        self._pending, self._steps_taken = None, 0  # the last step's rows all start over anyway
        if self._replay is None:
            return
        try:
            new = _leaves(env._state)
            self._check_structure(new, "reset_fn")
            for (_, dst), (_, src) in zip(self._state_leaves, new):
                dst.copy_(src)
        except Exception:
            env._state = None  # half copied: nothing to step from
            raise
        env._state = self._state
        self._steps.zero_()
        env._steps = self._steps
        self._clear.zero_()

    def step(self, actions):
        env = self.env
        actions = env._shaped_actions(actions)
        if self._box_dtype is not None:  # Box actions in the bounds' dtype, as the eager env does
            actions = actions.to(self._box_dtype)
        if self._replay is None:
            self._build(actions)
        elif actions.dtype != self._actions.dtype:  # copy_ would cast silently (floats to indices, say)
            raise ValueError(f"{env._owner}.step: actions of dtype {actions.dtype}; this env's CUDA graph was "
                             f"captured for {self._actions.dtype} (its first step's). Pass one dtype throughout.")
        with torch.no_grad(), (torch.cuda.device(self._device) if self.cuda else contextlib.nullcontext()):
            self._actions.copy_(actions)
            obs, reward, terminated, truncated, info, verdict = self._replay()
            try:
                rows = self._finished_rows()  # the previous step's verdict: the GPU runs this step meanwhile
                self._steps_taken += 1
                if len(rows):  # NEXT_STEP: last step's finished rows start over (their transition is cleared)
                    r_state, r_obs, _ = env._call_reset(env._draw_seeds(rows), None)
                    idx = env._index(rows)
                    obs.index_copy_(0, idx, r_obs)
                    _scatter(self._state, rows, r_state, "state", idx)
                    if env._obs_float:  # the returned observations' finiteness, reset rows included
                        verdict[:1].logical_and_(r_obs.sum(dtype=torch.float32).isfinite())
            except Exception:
                env._state = None  # the rows that finished were not reset: reset() before stepping again
                raise
            if self.cuda:
                host, event = self._host[self._steps_taken % 2], self._events[self._steps_taken % 2]
                host.copy_(verdict, non_blocking=True)
                event.record(torch.cuda.current_stream(self._device))
            else:
                host, event = verdict.clone(), None
            self._pending = (host, event, self._steps_taken)
            return (obs.clone(), reward.clone(), terminated.clone(), truncated.clone(),
                    _clone_info(info, env._owner))

    # -- internals ----------------------------------------------------------------------------------------------
    def _check_structure(self, new, adapter):
        """The state's leaves as the buffers are: same paths, shapes, dtypes, device."""
        env = self.env
        if [p for p, _ in new] != [p for p, _ in self._state_leaves]:
            raise AdapterError(f"{env._owner}: {adapter} returned a state of structure {[p for p, _ in new]}; the "
                               f"first reset's is {[p for p, _ in self._state_leaves]}. A CUDA graph reads fixed "
                               "buffers: both adapters must return one structure.")
        for (where, dst), (_, src) in zip(self._state_leaves, new):
            if not (isinstance(src, torch.Tensor) and src.shape == dst.shape and src.dtype == dst.dtype
                    and src.device == dst.device):
                got = (f"{type(src).__name__}" if not isinstance(src, torch.Tensor)
                       else f"shape {tuple(src.shape)}, dtype {src.dtype} on {src.device}")
                raise AdapterError(f"{env._owner}: {adapter}'s {where} must be a tensor of shape {tuple(dst.shape)}, "
                                   f"dtype {dst.dtype} on {dst.device} for a CUDA graph; got {got}.")

    def _build(self, actions):
        env = self.env
        dev = self._device = env._steps.device
        for where, leaf in _leaves(env._state):
            if not isinstance(leaf, torch.Tensor) or leaf.device != dev:
                raise AdapterError(f"{env._owner}: a CUDA graph needs the model state as tensors on {dev}; reset_fn's "
                                   f"{where} is {type(leaf).__name__}"
                                   f"{'' if not isinstance(leaf, torch.Tensor) else ' on ' + str(leaf.device)}.")
        # the buffers are the env's own copies: reset_fn's tensors may be the caller's (reset options) or views
        self._state = env._state = _clone_tree(env._state)
        self._state_leaves = _leaves(self._state)
        self._steps = env._steps
        n = env.num_envs
        self._actions = actions.detach().clone()
        self._clear = torch.zeros(n, dtype=torch.bool, device=dev)  # last step's done rows (NEXT_STEP)
        space = env.single_action_space
        if isinstance(space, spaces.Discrete):
            if actions.dtype.is_floating_point or actions.dtype == torch.bool:
                raise ValueError(f"{env._owner}.step: Discrete actions must be integers, got {actions.dtype}.")
            self._bounds = (int(space.start), int(space.start + space.n - 1))
        else:
            self._bounds = (torch.as_tensor(space.low, device=dev), torch.as_tensor(space.high, device=dev))
        with torch.no_grad():
            if self.eager:
                with torch.random.fork_rng(devices=[]):  # the check's draws from torch's generator are given back
                    self._body(write=False)  # the adapters' outputs checked once, as the graph's warm-up does
            else:
                with torch.cuda.device(dev):
                    self._capture(dev)
        if self.cuda:  # two, so that a step's copy never lands in the one the host is reading
            self._host = [torch.zeros(n + 2, dtype=torch.bool).pin_memory() for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
        if self.eager:
            self._replay = lambda: self._body(write=True)

    def _capture(self, dev):
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        # warm-up off the capture (cuBLAS handles, lazy modules): the state untouched, torch's draws given back
        with torch.cuda.stream(side), torch.random.fork_rng(devices=[torch.cuda.current_device()]):
            for _ in range(2):
                self._body(write=False)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self._body(write=True)
        except AdapterError:
            raise
        except Exception as err:  # a host read or a host->device copy in an adapter, most often
            first = err
            while first.__context__ is not None:  # the capture's own end fails too: name what failed first
                first = first.__context__
            raise AdapterError(f"{self.env._owner}: capturing the step in a CUDA graph failed ({type(first).__name__}: "
                               f"{(str(first).splitlines() or [''])[0]}). The adapters must be tensor "
                               "operations on the device without host reads (.item(), bool(tensor), .cpu()); "
                               "use_cuda_graph(eager=True) runs the same step without a graph to find the one "
                               "that breaks, or step without use_cuda_graph() (the scripts: --no-cuda-graph).") from err
        self._graph = graph

        def replay():
            graph.replay()
            return outputs

        self._replay = replay

    def _body(self, write: bool):
        """One step on the buffers: returns (obs, reward, terminated, truncated, info, verdict); write=True also
        moves the buffers on (state, step counters, the done mask). Shape and dtype checks run in Python, i.e. at
        the warm-up and the capture only. Callers hold no_grad."""
        env = self.env
        a = self._actions
        if type(self._bounds[0]) is int:  # Discrete
            clamped = a.clamp(*self._bounds)
            ok = (clamped == a).all()
        else:
            clamped, ok = a, (a.clamp(*self._bounds) == a).all()  # NaN compares unequal: not ok
        model_a = clamped if env.action_transform_fn is None else env.action_transform_fn(env.model, clamped)
        out = env.transition_fn(env.model, self._state, model_a)
        state, obs, reward, terminated = _unpack(env._owner, "transition_fn", out, _STEP_KEYS)
        if _leading_dim(state) != env.num_envs:
            raise AdapterError(f"{env._owner}: transition_fn returned a state with leading dimension "
                               f"{_leading_dim(state)}, expected {env.num_envs}.")
        new = _leaves(state)
        self._check_structure(new, "transition_fn")
        for key in ("terminated", "truncated"):  # the eager env accepts 0/1 integers, checked on the host
            if key in out and not (isinstance(out[key], torch.Tensor) and out[key].dtype == torch.bool):
                raise AdapterError(f"{env._owner}: under use_cuda_graph() transition_fn {key!r} must be a bool "
                                   f"tensor (checking 0/1 integers would read the host); got "
                                   f"{getattr(out[key], 'dtype', type(out[key]).__name__)}.")
        clear = self._clear
        obs = env._as_obs(obs, "transition_fn", env.num_envs)
        reward = env._as_vector(reward, "reward", clear)
        terminated = env._as_vector(terminated, "terminated", clear)
        steps = (self._steps + 1).masked_fill_(clear, 0)
        truncated = env._as_vector(out["truncated"], "truncated", clear) if "truncated" in out else None
        if env.max_episode_steps is not None:
            limit = steps >= env.max_episode_steps
            truncated = limit if truncated is None else truncated | limit
        elif truncated is None:
            truncated = torch.zeros_like(terminated)
        info = _check_info(env._owner, "transition_fn", out.get("info"))
        done = terminated | truncated
        total = reward.sum()
        if env._obs_float:
            total = total + obs.sum(dtype=torch.float32)
        verdict = torch.cat((total.isfinite().reshape(1), ok.reshape(1), done))
        if write:
            # a new leaf may be a buffer itself (a state that keeps the previous observation): copy such leaves first
            buffers = {dst.untyped_storage().data_ptr() for _, dst in self._state_leaves}
            sources = [src.clone() if src.untyped_storage().data_ptr() in buffers else src for _, src in new]
            for (_, dst), src in zip(self._state_leaves, sources):
                dst.copy_(src)
            self._steps.copy_(steps)
            clear.copy_(done)
        return obs, reward, terminated, truncated, info, verdict

    def _finished_rows(self) -> np.ndarray:
        """The previous step's done rows (host indices), after raising what its verdict found."""
        if self._pending is None:
            return np.zeros(0, dtype=np.int64)
        host, event, step = self._pending
        if event is not None:
            event.synchronize()
        flags = host.numpy()
        env = self.env
        if not flags[1]:
            raise ValueError(f"{env._owner}.step: some actions of step {step} after the last reset were outside "
                             f"action_space {env.single_action_space} (a CUDA graph step checks them one step late "
                             "and cannot show them; the plain env does; Discrete indices were clamped for the model "
                             "meanwhile). Pass actions from env.action_space; clip continuous actions to the bounds. "
                             "Call reset() before stepping again.")
        if not flags[0]:
            raise AdapterError(f"{env._owner}: transition_fn or reset_fn returned a non-finite observation or reward "
                               f"(NaN or Inf) in step {step} after the last reset (a CUDA graph step checks one step "
                               "late; the plain env, without use_cuda_graph(), names the rows). The world model "
                               "diverged; clip its predictions or shorten max_episode_steps. Call reset() before "
                               "stepping again.")
        return np.flatnonzero(flags[2:])
