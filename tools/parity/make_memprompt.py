"""Regenerate tests/fixtures/ref_memprompt_{A,B}.pt from the MemPrompt reference code.

    python tools/parity/make_memprompt.py --refs REFS_DIR

REFS_DIR holds the checkout ``MemPrompt`` at the pinned commit (tools/parity/common.py); the command prints the
``git clone`` / ``git checkout`` lines when it is missing or elsewhere. The reference files are imported, never
edited. Configurations and layout: tests/fixtures/README.md.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from common import generator_main
from vilt_fixture import load_vilt_reference, make_fixture

MEMPROMPT_KEYS = ("prompt_type", "learnt_p", "multi_layer_prompt", "gen_prompt_length", "gen_prompt_layers",
                  "shared_prompt_length", "shared_prompt_layers", "mem_size", "top_k", "bottleneck_dim")
VARIANTS = {
    "A": dict(gen_prompt_layers=[0, 1], shared_prompt_layers=[0, 1], gen_prompt_length=4, shared_prompt_length=4,
              mem_size=4, top_k=2),
    "B": dict(gen_prompt_layers=[0, 1, 2], shared_prompt_layers=[0, 1, 2], gen_prompt_length=3,
              shared_prompt_length=2, mem_size=5, top_k=3),
}
MIN_GAP = 1e-3       # k-th vs (k+1)-th cosine: a smaller gap would make the retrieval fragile to rounding




def retrieval_recorder(model: torch.nn.Module) -> Callable[[], dict[str, Any]]:
    """Hook every generated-prompt memory; the returned function gives, per module, its query, cosines, top-k
    indices (ascending), the smallest k-th/(k+1)-th cosine gap and its output, and removes the hooks."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if name.startswith(("gen_t_prompt_memory.", "gen_v_prompt_memory.")) and name.count(".") == 1:
            def hook(mod: torch.nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                seen[name] = (inputs[0].detach().clone(), output.detach().clone())
            handles.append(module.register_forward_hook(hook))
    modules = dict(model.named_modules())

    def collect() -> dict[str, Any]:
        for handle in handles:
            handle.remove()
        out = {}
        for name in sorted(seen, key=lambda n: (int(n.rsplit(".", 1)[1]), n.split("_")[1])):
            query, output = seen[name]
            mod = modules[name]
            cosine = F.normalize(query, dim=-1) @ F.normalize(mod.prompt_keys.detach(), dim=-1).T
            k = min(mod.top_k, mod.memory_size)
            ranked = cosine.sort(dim=1, descending=True).values
            gap = (ranked[:, k - 1] - ranked[:, k]).min().item() if k < mod.memory_size else float("inf")
            if gap < MIN_GAP:
                raise SystemExit(f"error: near-tie in {name} (gap {gap:.1e}); change the fixture batch seed")
            out[name] = {"query": query, "cosine": cosine.detach(),
                         "topk_indices_sorted": cosine.topk(k, dim=1).indices.sort(dim=1).values,
                         "min_gap_kth": gap, "output": output}
        return out
    return collect


def main(argv: list[str] | None = None) -> int:
    return generator_main(__doc__.splitlines()[0], "memprompt", VARIANTS,
                          lambda refs: load_vilt_reference(refs, "memprompt", "src", "MemPromptTransformer",
                                                           MEMPROMPT_KEYS),
                          lambda ref, name: make_fixture(ref, name, VARIANTS[name], debug=retrieval_recorder), argv)


if __name__ == "__main__":
    sys.exit(main())
