"""A progress display for TensorRT builds (they take minutes): one line per phase, or one
updating line on a terminal."""

from __future__ import annotations

import sys
import time


def build_progress_monitor(trt, stream=None):
    """A ``trt.IProgressMonitor`` printing the builder's phases and steps to ``stream``."""

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.stream = stream or sys.stdout
            self.started = time.time()
            self.phases = {}  # name -> (depth, steps)
            self.tty = self.stream.isatty()

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = self.phases[parent_phase][0] + 1 if parent_phase in self.phases else 0
            self.phases[phase_name] = (depth, num_steps)
            if depth <= 1:
                self._show(f"{'  ' * depth}{phase_name} (0/{num_steps})", final=not self.tty)

        def step_complete(self, phase_name, step):
            depth, steps = self.phases.get(phase_name, (0, 0))
            if self.tty and depth <= 1:
                self._show(f"{'  ' * depth}{phase_name} ({step + 1}/{steps})", final=False)
            return True  # never cancel

        def phase_finish(self, phase_name):
            depth, steps = self.phases.pop(phase_name, (0, 0))
            if depth == 0:
                self._show(f"{phase_name} done", final=True)

        def _show(self, text: str, final: bool):
            line = f"  [{time.time() - self.started:6.1f} s] {text}"
            self.stream.write(("\r\033[K" if self.tty else "") + line + ("\n" if final else ""))
            self.stream.flush()

    return BuildProgress()
