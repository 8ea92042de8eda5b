"""Speed options of the training step (§10), kept beside the plain loop of train.py.

    step = GraphStep(model, data, optimizer, batch_size=256, device=cuda)   # train.cuda_graph=true
    step(index, lam)                                                       # one training step
    loss_fn = compiled_loss(model, cfg.train)                              # train.compile=true

None of them is used in reproduction runs: each changes dropout's random stream (§7.5).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


def autocast(device: torch.device, bf16: bool, cache: bool = True):
    """bf16 autocast when train.bf16 is on, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    # cache=False under CUDA-graph capture: autocast's cast cache must not outlive the captured region
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process (CPU steps, §10): by default a freed
    block above the mmap threshold goes back to the kernel and the next step's tensor of the same size
    is page-faulted in and zeroed again, which cost ~10 % of a one-thread training step. Tensors up to
    32 MiB (glibc's largest mmap threshold) are then served from the heap and the top of the heap is never
    trimmed. Changes no result (only where memory comes from). False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def stacked_terms(terms: dict[str, torch.Tensor]) -> tuple[tuple, torch.Tensor]:
    """The loss terms as (names, one stacked detached tensor), so an epoch's statistics are one running
    sum on the device (no host sync inside a step; detached floats are logged, quirk 11)."""
    keys = tuple(terms)  # the α keys vary when flame.num_paths samples paths
    return keys, torch.stack([terms[k].detach().float() for k in keys])


def objective(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the backward starts from: the loss, or the sum of a stacked model's per-run losses."""
    loss = terms["loss"]
    return loss if loss.dim() == 0 else loss.sum()


def compiled_loss(model: torch.nn.Module, tc: Any, fn: Optional[Callable] = None) -> Optional[Callable]:
    """model.loss_terms (or fn: another piece of the loss) under torch.compile when train.compile is on
    (None: eager). compile_mode=reduce-overhead adds CUDA graphs on a GPU."""
    if not tc.compile:
        return None
    return torch.compile(fn or model.loss_terms, mode=None if tc.compile_mode == "default" else tc.compile_mode)


def check_graph_options(tc: Any, flame_cfg: Any, device: torch.device) -> None:
    """One-line errors for train.cuda_graph=true in a setting a captured step cannot serve."""
    if not tc.cuda_graph:
        return
    if device.type != "cuda":
        raise ValueError(f"train.cuda_graph=true needs a CUDA device, this run uses {device.type}")
    if tc.compile:
        raise ValueError("train.cuda_graph=true and train.compile=true exclude each other "
                         "(compile_mode=reduce-overhead is the compiled way to CUDA graphs)")
    if flame_cfg is not None and flame_cfg.num_paths:
        raise ValueError("train.cuda_graph=true needs flame.num_paths=0: a graph cannot sample paths per step")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("train.cuda_graph=true runs in a single process, not data parallel")


class GraphStep:
    """The training step of one full batch (gather, forward, backward, Adam, loss statistics) captured
    once as a CUDA graph and replayed; the step's cost is then one graph launch plus two small copies,
    whatever the number of kernels in it (§10). train.cuda_graph=true.

    Inputs live in static buffers (the batch's sample indices, λ as a device scalar); the running
    sums of the loss terms are accumulated inside the graph. The first `warmup` calls are real
    training steps run eagerly on a side stream (cuBLAS handles, Adam's state), the next one is
    captured and replayed, so no step is spent outside the data. A batch of another size (the last,
    partial one) runs eagerly against the same gradient buffers. Requirements, checked by
    check_graph_options: a CUDA device, Adam with capturable=True, every path each step
    (flame.num_paths=0), no torch.compile, a single process. Dropout draws from the graph-safe
    Philox stream, so the random stream differs from eager mode (as with train.compile).

    capture=False runs the identical static-buffer step eagerly: what the CPU tests exercise.
    """

    def __init__(self, model: torch.nn.Module, data: Any, optimizer: torch.optim.Optimizer, batch_size: int,
                 device: torch.device, bf16: bool = False, capture: bool = True, warmup: int = 3, runs: int = 0):
        """runs > 0: a stacked model of that many runs (flame/stack.py): the index is (runs, batch_size),
        λ one value per run, and every loss term one value per run (the objective is their sum)."""
        self.model, self.data, self.optimizer, self.device, self.bf16 = model, data, optimizer, device, bf16
        if capture and warmup < 1:
            raise ValueError("GraphStep needs at least one eager warm-up step before the capture")
        self.capture, self.warmup = capture, warmup
        self.index = torch.zeros((runs, batch_size) if runs else batch_size, dtype=torch.long, device=device)
        self.lam = torch.zeros(runs if runs else (), dtype=torch.float32, device=device)
        self.keys: Optional[tuple] = None
        self.sums: Optional[torch.Tensor] = None
        self.graph = None
        self.stream = None
        self.calls = 0  # full batches since construction: warm-up, then capture
        self.steps = 0  # full batches since reset(): the steps behind self.sums
        self.partial: dict[tuple, list] = {}  # statistics of the eager partial batches since reset()
        # λ is a device scalar the captured step never reads: a FLAME skips its paths when λ0 = 0 (λ(e)
        # may still reach 0 later, e.g. lambdaR = 0: then λ·L_wcl adds zero); an eager partial batch
        # gets the float λ and decides from it, as ever. (A stacked FLAME decides from λ0 itself.)
        self.graph_args = {"skip_paths": model.cfg.lambda0 == 0.0} if hasattr(model, "row_terms") else {}

    def _step(self) -> None:
        batch = {"seq": self.data.train_seq[self.index], "target": self.data.train_target[self.index],
                 "lam": self.lam}
        with autocast(self.device, self.bf16, cache=not self.capture):
            terms = self.model.loss_terms(batch, **self.graph_args)
        objective(terms).backward()
        self.optimizer.step()
        keys, values = stacked_terms(terms)
        if self.keys is None:
            self.keys, self.sums = keys, torch.zeros_like(values)
        elif keys != self.keys:
            raise RuntimeError("the loss terms changed between steps: CUDA graphs need a fixed set of paths")
        self.sums += values

    def _partial_step(self, index: torch.Tensor, lam: float) -> None:
        """An eager step on a batch of another size. The static .grad buffers are zeroed in place, not
        dropped, so the captured Adam step keeps reading them."""
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        batch = {"seq": self.data.train_seq[index], "target": self.data.train_target[index], "lam": lam}
        with autocast(self.device, self.bf16):
            terms = self.model.loss_terms(batch)
        objective(terms).backward()
        self.optimizer.step()
        keys, values = stacked_terms(terms)
        if keys in self.partial:
            self.partial[keys][0] += values
            self.partial[keys][1] += 1
        else:
            self.partial[keys] = [values, 1]

    def reset(self) -> None:
        """Start an epoch's statistics (outside the graph, so replays keep adding to the same buffer)."""
        self.steps = 0
        self.partial = {}
        if self.sums is not None:
            self.sums.zero_()

    def __call__(self, index: torch.Tensor, lam: float | torch.Tensor) -> None:
        if index.shape != self.index.shape:
            self._partial_step(index, lam)
            return
        self.index.copy_(index)
        if torch.is_tensor(lam):
            self.lam.copy_(lam)
        else:
            self.lam.fill_(lam)
        self.calls += 1
        self.steps += 1
        if not self.capture:
            self.optimizer.zero_grad(set_to_none=True)
            self._step()
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls <= self.warmup:
            self._warmup_step()
        else:
            self._capture()

    def _warmup_step(self) -> None:
        """An eager step on the capture's stream: per-stream library handles exist before the capture."""
        self.stream = self.stream or torch.cuda.Stream(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.optimizer.zero_grad(set_to_none=True)
            self._step()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _capture(self) -> None:
        """Record the step (a capture does not run it), then replay it once for this batch."""
        self.optimizer.zero_grad(set_to_none=True)  # the backward allocates .grad in the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, stream=self.stream):
                self._step()
        except RuntimeError as err:  # an op of this torch/GPU pair that cannot be captured
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"train.cuda_graph: capturing the training step failed ({first}); "
                               f"run with train.cuda_graph=false") from err
        self.graph.replay()

    def accumulated(self) -> list[tuple[tuple, torch.Tensor, int]]:
        """This epoch's statistics as (key tuple, summed values, steps): full batches, then partial ones."""
        full = [(self.keys, self.sums, self.steps)] if self.keys is not None and self.steps else []
        return full + [(keys, values, n) for keys, (values, n) in self.partial.items()]
