"""Read intermediate features of nnU-Net's planned networks without copying their code.

dynamic_network_architectures' U-Nets (PlainConvUNet, ResidualEncoderUNet) expose
``encoder.stages`` and ``decoder.stages``; forward hooks on those stages capture the
bottleneck and the decoder features of every forward pass.

Under torch.compile (tested with torch 2.14 in tests/training/test_compiled_features.py and, over
several epochs of every trainer, tests/trainers/test_compiled_training.py) Dynamo inlines the hooks and
replays their stores after the compiled graph, so the features are the graph's outputs, with gradients.
Two things make that hold:

- Dynamo compiles one graph per code object, shared by every instance of a class, and by default
  (``torch._dynamo.config.skip_nnmodule_hook_guards``) does not check whether an instance has hooks. A
  graph traced for an untapped U-Net (MTCM-KD's student) would then run for tapped ones of the same
  shape (its unimodal teachers) and skip their hooks, leaving the tap empty from the second step on.
  Creating a FeatureTap therefore makes Dynamo guard on hooks, for the whole process.
- Dynamo only sees hooks that exist when it traces: create the FeatureTap before the first forward pass.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel


def unwrap_network(network: nn.Module) -> nn.Module:
    """Strip DDP, torch.compile and our input wrappers to reach the U-Net itself."""
    while True:
        if isinstance(network, (DistributedDataParallel, nn.DataParallel, InputChannelSelector)):
            network = network.module
        elif isinstance(network, OptimizedModule):
            network = network._orig_mod
        else:
            return network


def decoder_stage_index(network: nn.Module, ds_level: int) -> int:
    """Decoder stage whose output feeds deep-supervision output ``ds_level`` (0 = full resolution)."""
    num_stages = len(unwrap_network(network).decoder.stages)
    if not 0 <= ds_level < num_stages:
        raise ValueError(f"deep-supervision level {ds_level} does not exist; this network has levels 0..{num_stages - 1}")
    return num_stages - 1 - ds_level


def decoder_channels(network: nn.Module, ds_level: int) -> int:
    """Number of feature channels of the decoder stage at ``ds_level``."""
    unet = unwrap_network(network)
    return int(unet.decoder.seg_layers[decoder_stage_index(unet, ds_level)].in_channels)


def bottleneck_channels(network: nn.Module) -> int:
    """Number of channels of the encoder's last stage (the bottleneck)."""
    unet = unwrap_network(network)
    return int(unet.encoder.output_channels[-1])


class FeatureTap:
    """Captures decoder features at given deep-supervision levels (and optionally the bottleneck).

    After each forward pass of ``network``, ``take()`` returns
    ``{"decoder": {level: Tensor (B, C_level, *spatial_level)}, "bottleneck": Tensor (B, C_b, *s_b)}``
    and clears the store, so features of one pass never leak into the next. Passes nobody takes features
    from (nnU-Net's validation) just overwrite them.
    """

    def __init__(self, network: nn.Module, ds_levels: Sequence[int] = (), bottleneck: bool = False):
        # Graphs of untapped and tapped networks must not be interchangeable (module docstring).
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        unet = unwrap_network(network)
        self.ds_levels = tuple(int(level) for level in ds_levels)
        self.bottleneck = bottleneck
        # Every key is always present: Dynamo guards on the store's keys, so a store that filled and emptied
        # would make the compiled network recompile whenever a pass was not followed by take().
        keys = [f"decoder{level}" for level in self.ds_levels] + (["bottleneck"] if bottleneck else [])
        self._store: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(keys)
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        for level in self.ds_levels:
            stage = unet.decoder.stages[decoder_stage_index(unet, level)]
            self._handles.append(stage.register_forward_hook(self._saver(f"decoder{level}", stage)))
        if bottleneck:
            last = unet.encoder.stages[-1]
            self._handles.append(last.register_forward_hook(self._saver("bottleneck", last)))

    def _saver(self, key: str, tapped: nn.Module):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            # A deepcopy of the network (MGSD's EMA teacher) carries this hook too: keep only the tapped stage.
            if module is tapped:
                self._store[key] = output

        return hook

    def take(self) -> Dict[str, object]:
        if any(feature is None for feature in self._store.values()):
            raise RuntimeError("FeatureTap.take() called before a forward pass of the tapped network (under "
                               "torch.compile: was the tap created after the network's first compiled call, or "
                               "was skip_nnmodule_hook_guards set back to True?)")
        out = {"decoder": {level: self._store[f"decoder{level}"] for level in self.ds_levels}}
        if self.bottleneck:
            out["bottleneck"] = self._store["bottleneck"]
        for key in self._store:
            self._store[key] = None
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class InputChannelSelector(nn.Module):
    """Feeds a network a subset of the input channels: (B, C_all, *s) -> network(x[:, channels]).

    Used where nnU-Net code hands all preprocessed channels to ``self.network`` (the
    end-of-training validation) but the network sees only some of them.
    """

    def __init__(self, module: nn.Module, channels: Sequence[int]):
        super().__init__()
        self.module = module
        self.register_buffer("channels", torch.as_tensor(list(channels), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> object:  # the network's output: a tensor or a deep-supervision list
        return self.module(x.index_select(1, self.channels.to(x.device)))

