"""The RNN state of one sequence.

A :class:`State` is a value: ``Model.forward`` returns a new one and never changes the one it is
given. Layout (L layers, C = n_embd, H heads of size N):

- ``att_x`` (L, C): the last token's ln1 output, for the time-mix token shift;
- ``ffn_x`` (L, C): the last token's ln2 output, for the channel-mix token shift;
- ``wkv``: v4 (L, 3, n_att) = numerator ``aa``, denominator ``bb``, exponent ``pp``;
  v5/v6 (L, H, N_k, N_v); v7 (L, H, N_v, N_k) (each version's own orientation of the matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.config import ModelConfig, Version


@dataclass(frozen=True)
class State:
    version: Version
    att_x: torch.Tensor
    ffn_x: torch.Tensor
    wkv: torch.Tensor
    n_tokens: int = 0

    @classmethod
    def zeros(cls, cfg: ModelConfig, device="cpu") -> "State":
        L, C = cfg.n_layer, cfg.n_embd
        if cfg.version is Version.V4:
            wkv = torch.zeros(L, 3, cfg.n_att, dtype=torch.float32, device=device)
            wkv[:, 2] = -1e30  # pp: log-scale exponent of the empty sum
        else:
            N = cfg.head_size
            wkv = torch.zeros(L, cfg.n_head, N, N, dtype=torch.float32, device=device)
        z = torch.zeros(L, C, dtype=torch.float32, device=device)
        return cls(cfg.version, z, z.clone(), wkv, 0)

    def copy(self) -> "State":
        return State(self.version, self.att_x.clone(), self.ffn_x.clone(), self.wkv.clone(),
                     self.n_tokens)

    @property
    def device(self) -> torch.device:
        return self.wkv.device
