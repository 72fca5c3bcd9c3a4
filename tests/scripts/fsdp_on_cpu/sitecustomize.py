"""Lets accelerate run FSDP on CPU processes (gloo), for the tests: put this folder on PYTHONPATH.

accelerate turns an FSDP plugin into FSDP only on accelerators (its MULTI_CPU set-up ignores the plugin), while
torch's FSDP2 (``fully_shard``) itself shards and gathers over gloo on CPUs. This lift does for MULTI_CPU what
accelerate does for accelerators (state.py: the FSDP type on the accelerator state and on the process state, which
every later ``AcceleratorState()`` copies); the sharding, the gathers and every code path of the trainer under FSDP
are then the real ones, only the device differs from a GPU run.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
