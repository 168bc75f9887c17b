"""`python tests/pause_for_sigterm.py STEP train.py FLAGS...`: train.py, each rank paused in step STEP until its
SIGTERM arrives.

So a test knows the step a signal arrived in without reading the clock: once every rank has printed
"paused in step STEP" (after the step's first loss), the test sends SIGTERM (to the process, or to
torchrun's agent, which forwards it); each rank resumes the step as soon as its own handler has run.
The handler is the loop's own (only wrapped to be seen): what the run then does is the real thing.
Each process prints its exit status last ("exit status N").

Every line goes out in one write(): under torchrun both ranks share the agent's stdout, and with
PYTHONUNBUFFERED (tests/launch.py) print() writes its text and its newline as two writes, so two ranks pausing in
the same instant came out as "paused in step 3paused in step 3" and the test never saw its second pause
(reproduced with a cold __pycache__: 1 run in 2).
"""

import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kfdeb, as train.py finds it
import kfdeb.cli  # noqa: E402
import kfdeb.loop  # noqa: E402

PAUSE_STEP = int(sys.argv[1])
received = []
handle, add_loss = kfdeb.loop.StopRequest._handle, kfdeb.loop.StepMeter.add_loss


def say(line: str) -> None:
    """One line in one write (module docstring)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def seen_handle(self, signum, frame):
    received.append(signum)
    handle(self, signum, frame)


def pausing_add_loss(self, task_index, loss, step):
    add_loss(self, task_index, loss, step)
    if step == PAUSE_STEP and task_index == 0:
        say(f"paused in step {step}")
        deadline = time.time() + 120
        while not received and time.time() < deadline:
            time.sleep(0.01)  # the handler runs between two of these sleeps


def reporting_exit(status):  # a torchrun worker's own status, which its agent does not pass on after a SIGTERM
    say(f"exit status {status}")
    exit_process(status)


exit_process = kfdeb.cli.exit_process
kfdeb.cli.exit_process = reporting_exit
kfdeb.loop.StopRequest._handle = seen_handle
kfdeb.loop.StepMeter.add_loss = pausing_add_loss
sys.argv = sys.argv[2:]  # train.py and its flags, as if run directly (the stop message repeats them)
runpy.run_path(sys.argv[0], run_name="__main__")
