"""How many graphs torch.compile built, in the training log: once after the first epoch, then only if a later
epoch compiles again (a recompiling training step costs seconds to minutes each time)."""
from __future__ import annotations

from typing import Optional

from torch._dynamo.utils import counters


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (all networks and compiled losses)."""
    return int(counters["stats"]["unique_graphs"])


class CompiledGraphLogMixin:
    """For nnU-Net trainers: logs the compiled-graph count at the end of the run's first epoch, and warns
    when a later epoch adds graphs. Silent while nothing was compiled (nnU-Net did not compile)."""

    _graphs_after_first_epoch: Optional[int] = None

    def on_epoch_end(self) -> None:
        # The count itself says whether anything compiled: nnU-Net's _do_i_compile() would write an INFO
        # line into the log on every call when nnUNet_compile is set on a CPU.
        self._log_compiled_graphs()
        super().on_epoch_end()

    def _log_compiled_graphs(self) -> None:
        graphs = compiled_graph_count()
        if graphs == 0:
            return
        if self._graphs_after_first_epoch is None:
            self.print_to_log_file(f"torch.compile: {graphs} graphs compiled by the end of epoch "
                                   f"{self.current_epoch} (torch._dynamo counters, unique_graphs)")
        elif graphs > self._graphs_after_first_epoch:
            self.print_to_log_file(f"WARNING: torch.compile recompiled in epoch {self.current_epoch}: "
                                   f"{graphs - self._graphs_after_first_epoch} more graphs (now {graphs})")
        self._graphs_after_first_epoch = graphs
