"""Run by tests/evaluate/test_evaluate_main.py in every process of a launch: python -m helpers.evaluate with ARGS, each
process killed (SIGKILL: nothing cleaned up) as it starts its job number $IPA_TEST_KILL_AT (from 1)."""
import os
import signal
import sys

import helpers.evaluate.grid as grid_module
from helpers.evaluate.__main__ import main

real, calls = grid_module.generate_images, []


def generate(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(os.environ["IPA_TEST_KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)


grid_module.generate_images = generate
main(sys.argv[1:])
