"""The processes of one launch (torchrun, accelerate launch): which one this is, its share of a list of jobs,
waiting for the others. A lone process (a notebook, python -m ...) is process 0 of 1, and then nothing here
touches torch.distributed or Accelerate: the notebooks' single-process path stays as it was.

    for job in my_share(jobs): ...      # jobs[rank::world]: every job done once, by one process
    wait_for_everyone()                 # a barrier (Accelerate's PartialState: gloo on CPUs, NCCL on GPUs)
    value = from_main(value)            # the main process's value, on every process
    values = gather(value)              # every process's value, by rank, on every process
    with main_first(): prepare()        # the main process first, then the others (which then find it done)

Jobs are dealt round-robin rather than in contiguous blocks (accelerate's split_between_processes): the
grid lists its jobs headline comparison first, and dealt out this way the jobs done at any moment are close
to a prefix of that list, so a launch stopped part way has still done the first jobs, as one process would.
"""

from __future__ import annotations

import atexit
import contextlib
import os


def world_size() -> int:
    """How many processes the launch has (WORLD_SIZE, set by torchrun and accelerate launch; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's number in the launch, 0 for the main one (RANK; 0 alone)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def state():
    """Accelerate's PartialState of the launch, started on first use: torch.distributed over gloo without a
    GPU (cpu=True: without it torchrun on CPUs gives N lone processes), else NCCL with this process's own GPU
    made the current one (so "cuda" means it). Shared with an Accelerator the process already made. The process
    group is destroyed when the process exits: one left to the interpreter's end makes gloo abort now and then
    ("terminate called without an active exception"), failing a launch that did its work."""
    import torch
    from accelerate import PartialState

    global _ENDING
    state = PartialState(cpu=not torch.cuda.is_available())
    if not _ENDING:
        atexit.register(lambda: PartialState().destroy_process_group())
        _ENDING = True
    return state


_ENDING = False  # whether state() has registered the process group's end at exit


def start() -> None:
    """Join the launch's processes (and, on GPUs, take this process's GPU) before loading any model; alone:
    nothing."""
    if world_size() > 1:
        state()


def my_share(jobs, *, process: int | None = None, processes: int | None = None) -> list:
    """This process's jobs: every world_size()-th job from its rank() on (all of them alone). process and
    processes stand in for rank() and world_size()."""
    jobs = list(jobs)
    return jobs[(rank() if process is None else process)::(world_size() if processes is None else processes)]


def wait_for_everyone() -> None:
    """Wait until every process of the launch gets here (nothing alone)."""
    if world_size() > 1:
        state().wait_for_everyone()


def from_main(value):
    """The main process's `value` on every process (a picklable object; alone: value)."""
    if world_size() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    state()
    box = [value if is_main() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(value) -> list:
    """Every process's `value` (picklable), in rank order, on every process (alone: [value])."""
    if world_size() == 1:
        return [value]
    from accelerate.utils import gather_object

    state()
    return gather_object([value])


@contextlib.contextmanager
def main_first():
    """The block runs in the main process first, then in the others together (alone: just the block)."""
    if world_size() == 1:
        yield
        return
    with state().main_process_first():
        yield
